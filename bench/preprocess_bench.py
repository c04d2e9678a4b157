"""Preprocessing speed: 50 000 records validated, tokenized and masked, cold and from the cache.

    python bench/preprocess_bench.py            # needs ../shared/data (alpaca_en_demo.json, alpaca_zh_demo.json)

Target: <= 20 s cold and <= 2 s cached on a 2-core CPU, for the data pipeline (not counting Python imports).
"""
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"


def main(records=50_000, cutoff_len=512):
    if not (SHARED / "alpaca_en_demo.json").is_file():
        print(f"skipped: {SHARED} is absent (it holds the benchmark data)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        base = json.loads((SHARED / "alpaca_en_demo.json").read_text()) + json.loads((SHARED / "alpaca_zh_demo.json").read_text())
        data = Path(tmp) / "train.json"
        data.write_text(json.dumps((base * (records // len(base) + 1))[:records], ensure_ascii=False))
        from utils.data import cache_key, cached, encode_dialogs, read_dialogs, summary
        from utils.model import builtin_path, load_tokenizer
        from utils.templates import load_template

        tokenizer = load_tokenizer(builtin_path())
        template = load_template("auto", tokenizer)
        settings = {"template": template.to_dict(), "cutoff_len": cutoff_len}
        timings = {}
        for run in ("cold", "cached"):
            t0 = time.perf_counter()
            dialogs = read_dialogs(data)
            t1 = time.perf_counter()
            key = cache_key([data], tokenizer, settings)
            examples, stats, hit = cached(key, lambda: encode_dialogs(dialogs, tokenizer, template, cutoff_len), folder=tmp)
            summary(examples, stats, tokenizer)
            t2 = time.perf_counter()
            timings[run] = (t1 - t0, t2 - t1, t2 - t0, hit)
        print(f"{records} records, {sum(len(e['input_ids']) for e in examples):,} tokens, cutoff {cutoff_len}")
        for run, (read, encode, total, hit) in timings.items():
            print(f"{run:7s} read+validate {read:5.2f} s   tokenize+mask (cache {'hit' if hit else 'miss'}) {encode:5.2f} s   total {total:5.2f} s")
        print(f"targets: cold <= 20 s: {'met' if timings['cold'][2] <= 20 else 'NOT met'};  cached <= 2 s: {'met' if timings['cached'][2] <= 2 else 'NOT met'}")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
