"""Beyond one device, on this CPU: per-rank peak RSS and tokens/s of DDP, ZeRO-2, ZeRO-3 and FSDP2.

    flock /tmp/lora-kit-bench.lock python bench/scale_out.py [--steps=4] [--cutoff_len=256]

Each engine runs finetune.py as a user launches it (torchrun, with --deepspeed for ZeRO; accelerate launch with
configs/accelerate/fsdp2.yaml for FSDP2): 2 processes on the random 1.1B TinyLlama-shaped model that
bench/train_throughput.py builds (bf16 shards), LoRA r=16 on every projection, 1 record per process per update,
data/demo.json. Each process's peak RSS is polled from outside (every 0.1 s); tokens/s is finetune's own figure
(all ranks' real tokens, after the first update). Target: ZeRO-3 and FSDP2 per-rank peak RSS <= 0.65x DDP's.
"""
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fire

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
ENGINES = ("ddp", "zero2", "zero3", "fsdp2")


def command(engine, model, out, steps, cutoff_len, processes=2, batch=1, data="demo.json", flags=()):
    """finetune.py as a user launches it under `engine` (ddp, zero2, zero3, fsdp2; None: plain python, one
    process) on `processes` processes; bench/gpu_check.py uses it too."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    if engine is None:
        launcher = [sys.executable]
    elif engine == "fsdp2":
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                    str(ROOT / "configs" / "accelerate" / "fsdp2.yaml"), f"--num_processes={processes}",
                    f"--main_process_port={port}"]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                    f"--master_port={port}"]
    return launcher + [str(ROOT / "finetune.py"), f"--base_model={model}", f"--output_dir={out}",
                       f"--data_path={ROOT / 'data' / data}", f"--per_device_train_batch_size={batch}",
                       f"--cutoff_len={cutoff_len}", f"--max_steps={steps}", "--lora_r=16", "--lora_alpha=32",
                       "--save_steps=1000000", "--report=False", "--overwrite_output_dir=True"] + (
        [f"--deepspeed={engine}"] if engine and engine.startswith("zero") else []) + list(flags)


def training_processes(launcher):
    """The finetune.py ranks under a launcher's psutil.Process (torchrun, accelerate launch), not the launchers."""
    for p in launcher.children(recursive=True):
        head = p.cmdline()[:4]
        if any(a.endswith("finetune.py") for a in head) and not any("launch" in a or "distributed.run" in a
                                                                      for a in head):
            yield p


def run(engine, model, out, steps, cutoff_len):
    """Launch one engine; returns (peak RSS of each training process, tokens/s, seconds, the fast-path line)."""
    import psutil

    log = open(out.parent / f"{engine}.log", "w")
    t0, peaks = time.time(), {}
    proc = subprocess.Popen(command(engine, model, out, steps, cutoff_len), stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    launcher = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            for p in training_processes(launcher):
                peaks[p.pid] = max(peaks.get(p.pid, 0), p.memory_info().rss)
        except psutil.Error:
            pass
        time.sleep(0.1)
    log.close()
    text = (out.parent / f"{engine}.log").read_text()
    if proc.returncode:
        sys.exit(f"{engine} failed:\n{text[-3000:]}")
    speed = json.loads((out / "run_config.json").read_text())["training"]["tokens_per_second"]
    fast = next((line for line in text.splitlines() if "fast path:" in line), "")
    return sorted(peaks.values(), reverse=True), speed, time.time() - t0, fast.split("fast path: ")[-1].split("   ")[0]


def main(steps: int = 4, cutoff_len: int = 256, keep: str = None):
    from train_throughput import tinyllama_shaped

    tmp = Path(keep or tempfile.mkdtemp(prefix="scale-out-"))
    model = tmp / "tinyllama-shape"
    if not (model / "config.json").is_file():
        tinyllama_shaped(model)
    rows = {engine: run(engine, model, tmp / engine, steps, cutoff_len) for engine in ENGINES}
    print(f"\n2 CPU processes, {steps} updates of 1 record per process (cutoff {cutoff_len}), LoRA r=16, "
          f"1.1B TinyLlama-shaped model, finetune.py defaults otherwise")
    print(f"{'engine':8s} {'peak RSS per rank (GB)':>24s} {'vs DDP':>7s} {'tokens/s':>9s} {'wall s':>7s}  fast path")
    ddp = rows["ddp"][0][0]
    for engine, (peaks, speed, seconds, fast) in rows.items():
        per_rank = " / ".join(f"{p / 2**30:.2f}" for p in peaks)
        print(f"{engine:8s} {per_rank:>24s} {peaks[0] / ddp:6.2f}x {speed or 0:9.1f} {seconds:7.0f}  {fast}")
    for engine in ("zero3", "fsdp2"):
        ratio = rows[engine][0][0] / ddp
        print(f"target {engine} peak RSS <= 0.65x DDP's: {ratio:.2f}x {'met' if ratio <= 0.65 else 'NOT met'}")


if __name__ == "__main__":
    fire.Fire(main)
