"""The API server under load: 1, 4 and 16 concurrent streaming clients against cli_demo.py's own speed.

    flock /tmp/lora-kit-bench.lock python bench/serve_bench.py                  # the built-in model, 64 new tokens
    flock /tmp/lora-kit-bench.lock python bench/serve_bench.py --clients=1,4,16 --precision=fp32
    python bench/serve_bench.py --url=http://127.0.0.1:8000/v1 --model=models/merged --baseline=False  # vllm serve

First the chat stages' own streaming (utils.serve.generation.stream_chat, what cli_demo.py runs) decodes each prompt
alone in this process; then api_server.py starts in a process of its own (unless --url names a running
OpenAI-compatible server) and every client, a thread with the official openai client, streams one chat answer
at the same moment. All answers are greedy, `new_tokens` long (`ignore_eos`), from prompts of `prompt_tokens`
tokens in the chat template. Per number of clients: aggregate generated tokens/s (all answers' tokens over the
wall time from the first request to the last token), time to first token (median, p95), and each client's decode
tokens/s after its first token (median). Targets (issue 18): 16 clients' aggregate >= 5x one client's, one
client's decode >= 0.95x cli_demo.py's, and a median first token within 1 s with 16 clients.
"""
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from utils.core.cli import run_cli  # noqa: E402
from utils.core.errors import UserError  # noqa: E402
from utils.core.flags import Checks  # noqa: E402

TOPICS = ["a dragon who learns to cook", "how a steam engine works", "a walk through a busy market",
          "the history of the printing press", "a robot that wants to paint", "how bees make honey",
          "a journey across the desert", "why the sky is blue", "a city under the sea", "how bridges stay up",
          "a lighthouse keeper's night", "the life of a river", "a chess game between friends", "how bread rises",
          "a snowstorm in the mountains", "the first flight of a balloon"]


def prompt_of(tokenizer, template, topic, length):
    """A question about `topic`, padded with words until the training-format prompt is `length` tokens."""
    from utils.data.encoding import encode_prompt

    words = f"Write a long, detailed story about {topic}".split() + ["and", "please", "be", "thorough"] * 40
    for n in range(1, len(words) + 1):
        if len(encode_prompt(tokenizer, template, "", [], " ".join(words[:n]))) >= length:
            return " ".join(words[:n])
    raise UserError(f"could not build a {length}-token prompt; pass a larger --prompt_tokens.")


def cli_speed(questions, precision, model_path, new_tokens):
    """cli_demo.py's streaming, each question alone: (median decode tokens/s, median first-token seconds)."""
    import gc

    from utils.model.loading import load_for_inference
    from utils.serve.generation import stream_chat

    model, tokenizer, template, _ = load_for_inference(model_path=model_path, precision=precision)
    settings = {"max_new_tokens": new_tokens, "temperature": 0}
    decode, first = [], []
    for question in [questions[0], *questions[:3]]:  # the first is a warm-up
        start = time.perf_counter()
        stream = stream_chat(model, tokenizer, template, question, settings=settings)
        seen = None
        for _ in stream:
            seen = seen or time.perf_counter()
        decode.append((len(stream.tokens) - 1) / (time.perf_counter() - seen))
        first.append(seen - start)
    del model, stream
    gc.collect()
    return statistics.median(decode[1:]), statistics.median(first[1:])


def one_client(url, key, model, question, new_tokens, start, results):
    import openai

    client = openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=600)
    start.wait()
    sent, first, last, usage = time.perf_counter(), None, None, None
    for chunk in client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=new_tokens,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            first, last = first or time.perf_counter(), time.perf_counter()
        usage = chunk.usage or usage
    results.append((sent, first, last, usage.completion_tokens))


def run_clients(url, key, model, questions, new_tokens):
    """Every question streamed by its own client at once: (tokens/s, first-token s per client, decode tok/s each)."""
    start, results = threading.Barrier(len(questions)), []
    threads = [threading.Thread(target=one_client, args=(url, key, model, q, new_tokens, start, results))
               for q in questions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if len(results) < len(questions):
        raise UserError("a client failed; see the error above.")
    began, ended = min(r[0] for r in results), max(r[2] for r in results)
    return (sum(r[3] for r in results) / (ended - began), [r[1] - r[0] for r in results],
            [(r[3] - 1) / (r[2] - r[1]) for r in results])


def p95(values):
    return sorted(values)[min(len(values) - 1, round(0.95 * (len(values) - 1)))]


def main(clients: str = "1,4,16", new_tokens: int = 64, prompt_tokens: int = 50, precision: str = "auto",
         model_path: str = None, url: str = None, model: str = None, baseline: bool = True, port: int = None,
         threads: int = None):
    """Measure the API server with concurrent streaming clients.

    Args:
        clients: Numbers of concurrent clients to measure, joined by commas.
        new_tokens: Tokens each answer decodes.
        prompt_tokens: Length of each prompt in tokens, chat template included.
        precision: auto, bf16, fp16 or fp32, for the server and the cli_demo.py baseline.
        model_path: A merged model folder to serve (default the built-in model).
        url: An OpenAI-compatible server already running (e.g. http://127.0.0.1:8000/v1); none is started.
        model: The model name to ask --url's server for (default: its first).
        baseline: Also time cli_demo.py's streaming in this process (--baseline=False skips it).
        port: The port for the server this starts (default a free one).
        threads: CPU threads for the server and the baseline (OMP_NUM_THREADS; default torch's choice). Two threads
            that spin-wait on two cores another program also uses stall each other: try 1 on a shared CPU.
    """
    c = Checks()
    listed = clients if isinstance(clients, (list, tuple)) else str(clients).split(",")  # fire makes "1,4" a tuple
    counts = [c.integer("clients", n, 1, 256) for n in listed if str(n).strip()]
    new_tokens, prompt_tokens = c.integer("new_tokens", new_tokens, 2), c.integer("prompt_tokens", prompt_tokens, 8)
    precision = c.choice("precision", precision, ("auto", "bf16", "fp16", "fp32"))
    model_path, url, model = c.text("model_path", model_path), c.text("url", url), c.text("model", model)
    port, baseline = c.integer("port", port, 1, 65535, none=True), c.boolean("baseline", baseline)
    threads = c.integer("threads", threads, 1, none=True)
    if not counts:
        c.add("--clients needs at least one number, e.g. --clients=1,4,16")
    c.done()
    if threads:  # before torch starts; the server inherits it
        os.environ["OMP_NUM_THREADS"] = str(threads)
    import httpx

    from utils.data.templates import resolve_template
    from utils.model.loading import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path(model_path or "builtin:smollm2", flag="model_path"))
    template = resolve_template("auto", tokenizer)
    questions = [prompt_of(tokenizer, template, TOPICS[i % len(TOPICS)], prompt_tokens) for i in range(max(counts))]
    cli = cli_speed(questions, precision, model_path, new_tokens) if baseline else None
    server = None
    if url is None:
        if port is None:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        command = [sys.executable, str(ROOT / "api_server.py"), f"--precision={precision}", f"--port={port}",
                   f"--max_batch={max(counts)}", f"--max_queue={max(counts)}"]
        server = subprocess.Popen(command + ([f"--model_path={model_path}"] if model_path else []))
        url = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None:
                raise UserError(f"api_server.py exited with status {server.returncode}; see its error above.")
            try:
                if httpx.get(url.rsplit("/v1", 1)[0] + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise UserError("api_server.py did not start within 300 s.") from None
                time.sleep(0.5)
    key = os.environ.get("OPENAI_API_KEY", "unused")
    try:
        if model is None:
            listed = httpx.get(url + "/models", headers={"Authorization": f"Bearer {key}"}, timeout=30).json()
            model = listed["data"][0]["id"]
        run_clients(url, key, model, questions[:1], 8)  # warm-up
        rows = {n: run_clients(url, key, model, questions[:n], new_tokens) for n in counts}
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)
    print(f"model {model}, precision {precision}, {prompt_tokens}-token prompts, {new_tokens} new tokens each, "
          f"greedy; {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"load average {os.getloadavg()[0]:.2f}")
    print("| clients | aggregate tok/s | first token median | first token p95 | decode tok/s per client |")
    print("|---|---|---|---|---|")
    if cli:
        print(f"| cli_demo.py, alone | {cli[0]:.1f} | {cli[1]:.3f} s | | {cli[0]:.1f} |")
    for n, (rate, firsts, decodes) in rows.items():
        print(f"| {n} | {rate:.1f} | {statistics.median(firsts):.3f} s | {p95(firsts):.3f} s | "
              f"{statistics.median(decodes):.1f} |")
    def verdict(ok):
        return "met" if ok else "NOT met"

    if 1 in rows and 16 in rows:
        ratio, first = rows[16][0] / rows[1][0], statistics.median(rows[16][1])
        print(f"16 clients / 1 client aggregate: {ratio:.2f}x (target >= 5: {verdict(ratio >= 5)})")
        print(f"16 clients' median first token: {first:.2f} s (target <= 1 s: {verdict(first <= 1)})")
    if 1 in rows and cli:
        ratio = statistics.median(rows[1][2]) / cli[0]
        print(f"1 client / cli_demo.py decode: {ratio:.3f} (target >= 0.95: {verdict(ratio >= 0.95)})")


if __name__ == "__main__":
    run_cli(main)
