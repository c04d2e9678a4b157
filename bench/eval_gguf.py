"""GGUF export of the built-in model: export time, file size, and llama.cpp's greedy agreement with transformers.

    flock /tmp/lora-kit-bench.lock nice -n 19 python bench/eval_gguf.py

The baseline is transformers' fp32 greedy continuation (16 tokens) of the same 3 prompts as tests/test_gguf.py.
Agreement: tokens equal before the first difference, summed over the prompts, out of 48.
"""
import sys
import time
from pathlib import Path

import fire
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def main(output_dir: str = "/tmp/lora-kit-gguf-bench", types: str = "f32,f16,bf16,q8_0", tokens: int = 16,
         model_path: str = None):
    """Args:
        output_dir: where the GGUF files go. types: the export types to compare. tokens: greedy tokens per prompt.
        model_path: an HF LLaMA folder (e.g. merge_lora.py's output); default the built-in model.
    """
    import export_gguf
    from utils.errors import as_list
    from test_gguf import PROMPTS
    from utils.gguf_export import llama_cpp_greedy
    from utils.model import builtin_path, load_model, load_tokenizer

    folder = Path(model_path).expanduser().resolve() if model_path else builtin_path()
    tokenizer = load_tokenizer(folder)
    model = load_model(folder, torch.float32).eval()
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    with torch.no_grad():
        expected = [model.generate(torch.tensor([ids]), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                   eos_token_id=None, pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
                    for ids in prompts]
    rows = []
    for outtype in as_list(types, "types"):
        path = Path(output_dir) / f"{folder.name}-{outtype}.gguf"
        start = time.perf_counter()
        export_gguf.main(model_path=str(folder), outtype=outtype, output=str(path))
        seconds = time.perf_counter() - start
        try:
            got, _ = llama_cpp_greedy(path, prompts, tokens)
            agree = [next((i for i, (a, b) in enumerate(zip(g, e)) if a != b), tokens) for g, e in zip(got, expected)]
            text = f"{sum(agree)}/{tokens * len(prompts)} ({'identical' if got == expected else agree})"
        except Exception as e:  # noqa: BLE001 - a type llama.cpp cannot load is itself a result
            text = f"llama.cpp failed: {type(e).__name__}: {e}"
        rows.append((outtype, path.stat().st_size / 2**20, seconds, text))
    print("\n| type | size (MiB) | export (s) | greedy tokens equal to transformers |")
    print("|---|---|---|---|")
    for outtype, size, seconds, text in rows:
        print(f"| {outtype} | {size:.1f} | {seconds:.1f} | {text} |")


if __name__ == "__main__":
    fire.Fire(main)
