"""GGUF export: per type, file size, export time, llama.cpp's perplexity on a held text, and llama.cpp's greedy
agreement with transformers.

    flock /tmp/lora-kit-bench.lock nice -n 19 python bench/eval_gguf.py                              # built-in model
    flock /tmp/lora-kit-bench.lock nice -n 19 python bench/eval_gguf.py --model_path=models/merged   # the demo's

The baseline is transformers' fp32 greedy continuation (16 tokens) of the same 3 prompts as tests/test_gguf.py,
and f16's perplexity on data/gguf_held.txt (a mixed English/Chinese text no training set holds), in the same run.
Agreement: tokens equal before the first difference, summed over the prompts, out of 48. A k-quant's export time
is the f16 export plus llama.cpp's quantizer (what export_gguf.py runs, without its quality line).
"""
import sys
import time
from pathlib import Path

import fire
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def main(output_dir: str = "/tmp/lora-kit-gguf-bench", types: str = "f32,f16,bf16,q8_0,q6_k,q5_k_m,q4_k_m,q4_0",
         tokens: int = 16, model_path: str = None):
    """Args:
        output_dir: where the GGUF files go. types: the export types to compare. tokens: greedy tokens per prompt.
        model_path: an HF llama/mistral/qwen2 folder (e.g. merge_lora.py's output); default the built-in model.
    """
    from test_gguf import PROMPTS

    import export_gguf
    from utils.core.errors import as_list
    from utils.export.gguf import QUANTS, llama_cpp_greedy, llama_cpp_perplexity, quantize
    from utils.model.builtin import builtin_path
    from utils.model.loading import load_model, load_tokenizer

    folder = Path(model_path).expanduser().resolve() if model_path else builtin_path()
    tokenizer = load_tokenizer(folder)
    model = load_model(folder, torch.float32).eval()
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    with torch.no_grad():
        # the mask is given: generate() would otherwise mask the prompt's pad tokens (SmolLM2 pads with <|im_end|>)
        expected = [model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                   max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, eos_token_id=None,
                                   pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
                    for ids in prompts]
    held = export_gguf.HELD_TEXT.read_text(encoding="utf-8")
    out = Path(output_dir)
    f16, f16_seconds = out / f"{folder.name}-f16.gguf", None
    rows = []
    for outtype in as_list(types, "types"):
        path = out / f"{folder.name}-{outtype}.gguf"
        if outtype in QUANTS:
            if f16_seconds is None:
                f16_seconds = export(export_gguf, folder, "f16", f16)
            start = time.perf_counter()
            quantize(f16, path, outtype)
            seconds = f16_seconds + time.perf_counter() - start
        else:
            seconds = export(export_gguf, folder, outtype, path)
            f16_seconds = seconds if outtype == "f16" else f16_seconds
        try:
            perplexity = f"{llama_cpp_perplexity(path, held)[0]:.2f}"
            got, _ = llama_cpp_greedy(path, prompts, tokens)
            agree = [next((i for i, (a, b) in enumerate(zip(g, e)) if a != b), tokens) for g, e in zip(got, expected)]
            text = f"{sum(agree)}/{tokens * len(prompts)} ({'identical' if got == expected else agree})"
        except Exception as e:  # noqa: BLE001 - a type llama.cpp cannot load is itself a result
            perplexity, text = "-", f"llama.cpp failed: {type(e).__name__}: {e}"
        rows.append((outtype, path.stat().st_size / 2**20, seconds, perplexity, text))
    print(f"\n{folder.name}; perplexity on {export_gguf.HELD_TEXT.name}")
    print("| type | size (MiB) | export (s) | llama.cpp perplexity on a held text "
          "| greedy agreement with transformers |")
    print("|---|---|---|---|---|")
    for outtype, size, seconds, perplexity, text in rows:
        print(f"| {outtype} | {size:.1f} | {seconds:.1f} | {perplexity} | {text} |")


def export(script, folder, outtype, path):
    start = time.perf_counter()
    script.main(model_path=str(folder), outtype=outtype, output=str(path))
    return time.perf_counter() - start


if __name__ == "__main__":
    fire.Fire(main)
