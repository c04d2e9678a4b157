"""Where a 2-rank run's memory goes: each training process's anonymous and file-backed RSS over time, and at its
peak, the RSS of each mapping (the heap, anonymous memory, each mapped file), largest first.

    flock /tmp/lora-kit-bench.lock python bench/rss_trace.py --engine=zero3 --model=DIR [--deepspeed=FILE]

It launches what bench/scale_out.py launches for that engine (2 updates at cutoff 64 unless told), polls
/proc/PID/status every 0.2 s and reads /proc/PID/smaps whenever a process reaches a new peak. --deepspeed=FILE
replaces the shipped config of a ZeRO engine (to try other knobs). Run it with LD_PRELOAD set to try another
allocator. Linux only.
"""
import collections
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fire

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale_out import ENGINES, command, training_processes  # noqa: E402

MAPPING = re.compile(r"^[0-9a-f]+-[0-9a-f]+ ")


def status(pid):
    """VmRSS, RssAnon and RssFile of a process, in bytes."""
    fields = {}
    for line in open(f"/proc/{pid}/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def rss_by_mapping(pid):
    """Resident bytes per mapping name ([heap], [anon], a file's path) of a process."""
    sizes, name = collections.Counter(), None
    for line in open(f"/proc/{pid}/smaps"):
        if MAPPING.match(line):
            parts = line.split(None, 5)
            name = parts[5].strip() if len(parts) > 5 else "[anon]"
        elif line.startswith("Rss:"):
            sizes[name] += int(line.split()[1]) * 1024
    return sizes


def main(engine="zero3", model=None, deepspeed=None, steps=2, cutoff_len=64, top=8):
    import psutil

    if engine not in ENGINES or not model or not Path(model, "config.json").is_file():
        sys.exit(f"--engine is one of {', '.join(ENGINES)}; --model is a model folder (bench/scale_out.py "
                 "--keep=DIR builds one in DIR/tinyllama-shape)")
    out = Path(tempfile.mkdtemp(prefix="rss-trace-"))
    cmd = command(engine, Path(model), out / "run", steps, cutoff_len)
    if deepspeed:
        cmd = [f"--deepspeed={Path(deepspeed).resolve()}" if a.startswith("--deepspeed=") else a for a in cmd]
    log = open(out / "run.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    launcher, t0 = psutil.Process(proc.pid), time.time()
    peaks, series = {}, collections.defaultdict(list)  # pid -> (seconds, status, by mapping); pid -> samples
    while proc.poll() is None:
        try:
            for p in training_processes(launcher):
                now, fields = round(time.time() - t0, 1), status(p.pid)
                series[p.pid].append((now, fields["RssAnon"] >> 20, fields["RssFile"] >> 20))
                if fields["VmRSS"] > peaks.get(p.pid, (0, {"VmRSS": 0}))[1]["VmRSS"]:
                    peaks[p.pid] = now, fields, rss_by_mapping(p.pid)
        except (psutil.Error, OSError, KeyError):
            pass  # a process that just ended
        time.sleep(0.2)
    log.close()
    if proc.returncode:
        sys.exit(f"{engine} failed; its log: {out / 'run.log'}")
    for rank, (pid, (now, fields, mappings)) in enumerate(sorted(peaks.items())):
        print(f"process {rank} (pid {pid}): peak {fields['VmRSS'] / 2**30:.2f} GB at {now} s: anonymous "
              f"{fields['RssAnon'] / 2**30:.2f} GB, file-backed {fields['RssFile'] / 2**30:.2f} GB")
        for name, size in mappings.most_common(top):
            print(f"  {size / 2**20:8.0f} MB  {name}")
        samples = series[pid][::max(1, len(series[pid]) // 30)]
        print("  seconds: anonymous MB / file MB: " + ", ".join(f"{t}: {a}/{f}" for t, a, f in samples))


if __name__ == "__main__":
    fire.Fire(main)
