"""Chat streaming vs plain generate on the built-in model: decode tokens/s and time to first token.

    flock /tmp/lora-kit-bench.lock python bench/chat_bench.py
    flock /tmp/lora-kit-bench.lock python bench/chat_bench.py --precision=fp32 --max_new_tokens=128 --threads=1

Both paths decode greedily from the same 50-token prompts to the same length, so they produce the same
tokens; runs alternate between the two paths to share any drift in machine load. The streamed path is
the chat stages' own: utils.serve.generation.stream_chat, iterated for text pieces, with the time to first token
counted from the call (prompt building and tokenizing included) to the first piece of text. Targets:
streamed decode at least 0.95x plain, and a first streamed token within 150 ms.
"""
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.core.cli import run_cli  # noqa: E402
from utils.core.errors import UserError  # noqa: E402

QUESTIONS = ["Write a long story about a dragon who learns to cook", "Explain in detail how a steam engine works",
             "Describe a walk through a busy market in the morning"]


def fifty_token_prompt(tokenizer, template, question, length):
    """The question, padded with words until the whole training-format prompt is `length` tokens."""
    from utils.data.encoding import encode_prompt

    words = question.split() + ["and", "please", "be", "thorough"] * 20
    for n in range(1, len(words) + 1):
        ids = encode_prompt(tokenizer, template, "", [], " ".join(words[:n]))
        if len(ids) >= length:
            return " ".join(words[:n]), ids
    raise UserError(f"could not build a {length}-token prompt; pass a larger --prompt_tokens.")


def main(precision: str = "auto", max_new_tokens: int = 64, prompt_tokens: int = 50, repeats: int = 4,
         threads: int = None):
    """Time streaming (utils.serve.generation) against plain model.generate on the built-in model.

    Args:
        precision: auto, bf16, fp16 or fp32, as the chat stages take it.
        max_new_tokens: Tokens decoded per answer, the same for both paths.
        prompt_tokens: Length of each prompt in tokens, template included.
        repeats: Runs per prompt and path; medians are reported.
        threads: torch CPU threads (default torch's choice); 1 is steadier on a CPU other work shares.
    """
    import torch

    if threads:
        torch.set_num_threads(int(threads))
    from utils.model.loading import load_for_inference
    from utils.serve.generation import stop_token_ids, stream_chat

    model, tokenizer, template, _ = load_for_inference(precision=str(precision))
    settings = {"max_new_tokens": int(max_new_tokens), "do_sample": False, "repetition_penalty": 1.0}
    stop_ids = sorted(stop_token_ids(tokenizer, model, template))

    def plain(ids, n):
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                 repetition_penalty=1.0, eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id)
        return time.perf_counter() - start, out.shape[1] - ids.shape[1]

    def streamed(question):
        start = time.perf_counter()
        stream = stream_chat(model, tokenizer, template, question, settings=settings)
        first = None
        for _ in stream:
            first = first or time.perf_counter()
        return first - start, time.perf_counter() - first, len(stream.tokens) + (stream.reason == "stop token")

    rows = {"plain_ttft": [], "plain_decode": [], "stream_ttft": [], "stream_decode": []}
    cases = [fifty_token_prompt(tokenizer, template, q, int(prompt_tokens)) for q in QUESTIONS]
    streamed(cases[0][0]), plain(torch.tensor([cases[0][1]]), 4)  # warm-up
    for _ in range(int(repeats)):
        for question, ids in cases:
            ids = torch.tensor([ids])
            ttft, _ = plain(ids, 1)
            total, n = plain(ids, int(max_new_tokens))
            rows["plain_ttft"].append(ttft)
            rows["plain_decode"].append((n - 1) / (total - ttft))
            ttft, rest, m = streamed(question)
            if m != n:
                raise RuntimeError(f"streamed {m} tokens but plain generate gave {n} for the same prompt")
            rows["stream_ttft"].append(ttft)
            rows["stream_decode"].append((m - 1) / rest)
    med = {k: statistics.median(v) for k, v in rows.items()}
    ratio = med["stream_decode"] / med["plain_decode"]
    print(f"model: built-in SmolLM2-135M-Instruct, dtype {next(model.parameters()).dtype}, "
          f"torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"{len(cases)} prompts of {len(cases[0][1])} tokens, {max_new_tokens} new tokens, greedy, "
          f"{repeats} runs each; medians")
    print(f"{'path':<22}{'decode tok/s':>14}{'first token ms':>16}")
    print(f"{'plain generate':<22}{med['plain_decode']:>14.1f}{med['plain_ttft'] * 1000:>16.1f}")
    print(f"{'streamed (ours)':<22}{med['stream_decode']:>14.1f}{med['stream_ttft'] * 1000:>16.1f}")
    print(f"streamed/plain decode: {ratio:.3f} (target >= 0.95: {'met' if ratio >= 0.95 else 'NOT met'}); "
          f"streamed first token {med['stream_ttft'] * 1000:.0f} ms "
          f"(target <= 150 ms: {'met' if med['stream_ttft'] <= 0.15 else 'NOT met'})")


if __name__ == "__main__":
    run_cli(main)
