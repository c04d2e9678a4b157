#!/usr/bin/env bash
# The GPU checks (bench/gpu_check.py says what each one shows), ready for a session that is lent a GPU.
#
#   bash bench/gpu_check.sh prepare     # here, where PyPI answers: fills .whl/ and .gpu/ (both git-ignored)
#   bash bench/gpu_check.sh [ARGS]      # there: installs .whl/, runs bench/gpu_check.py ARGS, logs into $OUT
#
# The GPU image has torch (CUDA), accelerate, safetensors, tokenizers and huggingface-hub, but not our pins of
# transformers, peft, datasets, bitsandbytes, deepspeed or fire; and nothing can be fetched there. So `prepare`
# downloads those wheels (61 MiB: under the device tool's 64 MiB with the repo) and packs the built-in model's
# tokenizer (the model itself, 93 MB as a wheel, does not fit: the checks build a random 1.1B model there).
# With the device tool:  run(command="bash bench/gpu_check.sh", carry=[".whl", ".gpu"], timeout_s=560)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"

if [ "${1:-}" = prepare ]; then
  rm -rf .whl .gpu && mkdir -p .whl .gpu
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl \
    transformers==5.23.0 peft==0.21.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 fsspec==2026.9.0 \
    bitsandbytes==0.50.2 fire==0.7.1 termcolor==3.3.0 hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 \
    annotated-types==0.8.0 typing-inspection==0.4.5
  "$PY" -m pip wheel -q --no-deps -w .whl deepspeed==0.19.8  # an sdist only: built here, pure Python
  "$PY" - <<'EOF'
import sys
sys.path.insert(0, ".")
from utils.model.loading import builtin_path, load_tokenizer
load_tokenizer(builtin_path()).save_pretrained(".gpu/tokenizer")
EOF
  tar -C .gpu -cJf .gpu/tokenizer.tar.xz tokenizer && rm -rf .gpu/tokenizer
  du -sh .whl .gpu
  exit 0
fi

[ -d .whl ] || { echo "no .whl/: run 'bash bench/gpu_check.sh prepare' where PyPI answers, then carry .whl and .gpu"; exit 2; }
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site
mkdir -p /tmp/gpu-tokenizer && tar -C /tmp/gpu-tokenizer -xJf .gpu/tokenizer.tar.xz
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers, peft, bitsandbytes, deepspeed, datasets; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__, \
'deepspeed', deepspeed.__version__, 'datasets', datasets.__version__)"
LOGS="${OUT:-/tmp/gpu-check-logs}"
mkdir -p "$LOGS"
python3 bench/gpu_check.py --tokenizer=/tmp/gpu-tokenizer/tokenizer --logs="$LOGS" "$@" 2>&1 | tee "$LOGS/gpu_check.txt"
