"""api_server.py: the official openai client against a live server, on a tiny model with two adapters and on the
built-in model; batched answers equal answers alone (cli_demo.py's); bad requests; the API key; curl -N."""
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import ROOT

from utils.core.errors import UserError

openai = pytest.importorskip("openai", reason="the openai client is needed (requirements-dev.txt)")
sys.path.insert(0, str(ROOT))
import api_server  # noqa: E402
import cli_demo  # noqa: E402

KEY = "secret-key"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # small models gain nothing from threads; on a shared CPU they wait
QUESTIONS = [f"Question {i}: what comes after {i * 7}?" for i in range(8)]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tokenizer, tmp_path_factory):
    """Two LoRA adapters on the tiny model with random weights and different templates (alpaca, the tokenizer's
    chat template), and one whose run config names another base, as finetune.py's run folders hold them."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from utils.core.run_folder import BUILTIN, write_run_config
    from utils.data.templates import load_template

    root, folders = tmp_path_factory.mktemp("adapters"), {}
    for seed, (name, template) in enumerate([("lumi", "alpaca"), ("law", "auto")], 1):
        torch.manual_seed(seed)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                            init_lora_weights=False)  # random B too: the adapter changes the answers
        model = get_peft_model(LlamaForCausalLM.from_pretrained(tiny_model_dir), config)
        folders[name] = root / name
        model.save_pretrained(folders[name])
        tokenizer.save_pretrained(folders[name])
        write_run_config(folders[name], {"base_model": str(tiny_model_dir), "base_model_path": str(tiny_model_dir),
                                         "template": load_template(template, tokenizer).to_dict()})
    folders["foreign"] = root / "foreign"
    shutil.copytree(folders["law"], folders["foreign"])
    write_run_config(folders["foreign"], {"base_model": BUILTIN,
                                          "template": load_template("auto", tokenizer).to_dict()})
    return folders


class Live:
    """An app served by uvicorn in a thread of this process, on a free loopback port."""

    def __init__(self, app):
        import uvicorn

        self.url = f"http://127.0.0.1:{free_port()}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=int(self.url.rsplit(":", 1)[1]),
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.05)

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(tiny_model_dir, adapters):
    """The tiny model with the adapters lumi and law over one copy of it, in fp32, behind an API key."""
    from utils.serve.engine import Engine
    from utils.serve.generation import check_settings, context_length
    from utils.serve.openai_api import build_app

    load = dict(model_path=None, lora_model=None, base_model=None, template="auto", bits=16, num_gpus=1,
                precision="fp32", local_files_only=False, trust_remote_code=None)
    model, tokenizer, served, base = api_server.load_served(
        load, [("lumi", str(adapters["lumi"]), "lora_modules"), ("law", str(adapters["law"]), "lora_modules")], None,
        False)
    engine = Engine(model, max_batch=16, max_queue=64).start()
    app = build_app(engine, served, tokenizer, context_length(model), check_settings(max_new_tokens=64), [KEY], base)
    live = Live(app)
    live.engine, live.tokenizer, live.served, live.base = engine, tokenizer, {s.name: s for s in served}, base
    live.client = openai.OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    yield live
    live.close()
    engine.close()


@pytest.fixture(scope="module")
def alone(server, tiny_model_dir, adapters):
    """Each served model loaded on its own, as cli_demo.py loads it: name -> (model, tokenizer, template)."""
    from utils.model.loading import load_for_inference

    models = {server.base: load_for_inference(model_path=str(tiny_model_dir), precision="fp32")[:3]}
    for name in ("lumi", "law"):
        models[name] = load_for_inference(lora_model=str(adapters[name]), precision="fp32")[:3]
    return models


def greedy(models, name, question, max_new_tokens=24, **chat):
    from utils.serve.generation import chat as answer

    model, tokenizer, template = models[name]
    settings = dict(max_new_tokens=max_new_tokens, temperature=0)
    return answer(model, tokenizer, template, question, settings=settings, **chat).strip()


def ask(client, name, question, max_tokens=24, **kwargs):
    return client.chat.completions.create(model=name, messages=[{"role": "user", "content": question}],
                                          temperature=0, max_tokens=max_tokens, **kwargs)


def streamed(client, name, question, max_tokens=24):
    chunks = list(ask(client, name, question, max_tokens, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def test_flags_and_adapters_on_another_base_are_refused_before_loading(tiny_model_dir, adapters):
    lumi, foreign = adapters["lumi"], adapters["foreign"]
    with pytest.raises(UserError, match="--lora_modules takes name=path pairs"):
        api_server.main(lora_modules="lumi")
    with pytest.raises(UserError, match="adapter names must differ"):
        api_server.main(lora_modules=f"a={lumi},a={lumi}")
    with pytest.raises(UserError, match="--model_path serves a merged model"):
        api_server.main(model_path=str(tiny_model_dir), lora_model=str(lumi))
    with pytest.raises(UserError, match="--port must be from 1 to 65535.*--temperature must be a number"):
        api_server.main(port=70000, temperature="hot")
    with pytest.raises(UserError, match=r"trained on different base models \(lumi on .*; foreign on builtin:smollm2\)"):
        api_server.main(lora_modules=f"lumi={lumi},foreign={foreign}", port=free_port())
    bad = subprocess.run([sys.executable, str(ROOT / "api_server.py"), "--lora_modules=x", "--max_batch=0"],
                         capture_output=True, text=True, timeout=120, env=ENV)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr
    assert bad.stderr.count("\n") == 1 and "--max_batch must be" in bad.stderr


def test_models_health_and_the_api_key(server):
    import httpx

    assert [m.id for m in server.client.models.list()] == ["lumi", "law", server.base]
    assert server.client.models.retrieve("law").parent == server.base
    health = httpx.get(server.url + "/health", timeout=10)  # open to monitoring without a key
    assert health.status_code == 200 and health.json()["status"] == "ok"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        reply = httpx.get(server.url + "/v1/models", headers=headers, timeout=10)
        assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key"
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        ask(wrong, "lumi", "hi")


def test_each_model_answers_as_cli_demo_does(server, tiny_model_dir, adapters, capsys):
    answers = {}
    runs = [(server.base, {"model_path": str(tiny_model_dir)}), ("lumi", {"lora_model": str(adapters["lumi"])}),
            ("law", {"lora_model": str(adapters["law"])})]
    for name, flags in runs:
        cli_demo.main(**flags, precision="fp32", temperature=0, max_new_tokens=24, prompt="who are you?")
        expected = capsys.readouterr().out.strip()
        whole = ask(server.client, name, "who are you?")
        assert whole.choices[0].message.content.strip() == expected, name
        assert whole.choices[0].finish_reason == "length" and whole.model == name and whole.id.startswith("chatcmpl-")
        text, _ = streamed(server.client, name, "who are you?")
        assert text.strip() == expected, name
        answers[name] = expected
    assert len(set(answers.values())) == 3  # the adapters answer differently from each other and from the base


def test_usage_stop_sequences_system_history_and_completions(server, alone):
    from utils.data.encoding import encode_prompt
    from utils.serve.generation import Stream, chat, decode

    lumi = server.served["lumi"]
    whole = ask(server.client, "lumi", "Name a colour.")
    prompt_tokens = len(encode_prompt(server.tokenizer, lumi.template, "", [], "Name a colour."))
    assert whole.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"}) == {
        "prompt_tokens": prompt_tokens, "completion_tokens": 24, "total_tokens": prompt_tokens + 24}
    text, chunks = streamed(server.client, "lumi", "Name a colour.")
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == prompt_tokens + 24
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-2].usage is None

    answer = whole.choices[0].message.content
    stop = answer[len(answer) // 2:len(answer) // 2 + 3]
    cut = ask(server.client, "lumi", "Name a colour.", stop=[stop, "never"])
    assert cut.choices[0].message.content == answer[:answer.index(stop)].lstrip()
    assert cut.choices[0].finish_reason == "stop" and cut.usage.completion_tokens < 24

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "And you?"}]
    for name in ("lumi", "law"):
        reply = server.client.chat.completions.create(model=name, messages=messages, temperature=0, max_tokens=16)
        expected = greedy(alone, name, "And you?", 16, history=[("Hi", "Hello!")], system="Be brief.")
        assert reply.choices[0].message.content.strip() == expected

    sampled = chat(*alone["lumi"], "Name a colour.", settings=dict(max_new_tokens=24, temperature=0.9), seed=7)
    with ThreadPoolExecutor(2) as pool:  # the same seed gives cli_demo.py's --seed answer, also in a batch
        twice = list(pool.map(lambda _: server.client.chat.completions.create(
            model="lumi", messages=said(("user", "Name a colour.")), temperature=0.9, max_tokens=24, seed=7), "ab"))
    assert [r.choices[0].message.content.strip() for r in twice] == [sampled.strip()] * 2

    model, tokenizer, template = alone["law"]
    ids = tokenizer("Once upon a time", return_tensors="pt")["input_ids"]
    settings = dict(max_new_tokens=12, temperature=0.7, top_p=0.9, top_k=40, repetition_penalty=1.1,
                    no_repeat_ngram_size=0, do_sample=False)
    reference = Stream(tokenizer, server.served["law"].stop_ids, template.stop_strings,
                       tokens=decode(model, ids, settings, threading.Event()))
    expected = "".join(reference)
    done = server.client.completions.create(model="law", prompt="Once upon a time", max_tokens=12, temperature=0)
    assert done.choices[0].text == expected and done.usage.prompt_tokens == ids.shape[1]
    pieces = server.client.completions.create(model="law", prompt="Once upon a time", max_tokens=12, temperature=0,
                                              stream=True)
    assert "".join(c.choices[0].text for c in pieces) == expected


CHAT = "/v1/chat/completions"


def said(*turns):
    return [{"role": role, "content": content} for role, content in turns]


BAD = [  # (path, body, status, param)
    (CHAT, b"{not json", 400, None),
    (CHAT, b"[1, 2]", 400, None),
    (CHAT, {"model": "nope", "messages": said(("user", "hi"))}, 404, "model"),
    (CHAT, {"model": "lumi"}, 400, "messages"),
    (CHAT, {"model": "lumi", "messages": []}, 400, "messages"),
    (CHAT, {"model": "lumi", "messages": "hi"}, 400, "messages"),
    (CHAT, {"model": "lumi", "messages": said(("assistant", "hi"))}, 400, "messages[0]"),
    (CHAT, {"model": "lumi", "messages": said(("user", "hi"), ("assistant", "yo"))}, 400, "messages"),
    (CHAT, {"model": "lumi", "messages": said(("tool", "hi"))}, 400, "messages[0].role"),
    (CHAT, {"model": "lumi", "messages": said(("user", [{"type": "image_url"}]))}, 400, "messages[0].content"),
    (CHAT, {"model": "lumi", "messages": said(("user", "hi " * 1500))}, 400, "messages"),  # longer than the context
    (CHAT, {"model": "lumi", "messages": said(("user", "hi")), "max_tokens": 5000}, 400, "messages"),
]
FIELDS = [("temperature", 2.5), ("temperature", "hot"), ("top_p", 1.5), ("max_tokens", 0), ("max_tokens", "10"),
          ("n", 2), ("stop", ["a", "b", "c", "d", "e"]), ("stop", 7), ("presence_penalty", 3),
          ("frequency_penalty", -2.5), ("seed", "x"), ("stream", "yes"), ("stream_options", {"include_usage": True}),
          ("logprobs", True), ("tools", [{"type": "function"}]), ("logit_bias", {"1": 5}), ("top_k", 1.5),
          ("response_format", {"type": "json_object"})]
COMPLETIONS = [5, [], ["one", "two"], [10 ** 9], ""]


def test_every_bad_request_gets_its_4xx_in_openai_shape(server):
    import httpx

    headers = {"Authorization": f"Bearer {KEY}"}
    hi = {"model": "lumi", "messages": said(("user", "hi"))}
    cases = BAD + [(CHAT, {**hi, field: value}, 400, field) for field, value in FIELDS]
    cases += [("/v1/completions", {"model": "law", "prompt": p, "max_tokens": 4}, 400, "prompt") for p in COMPLETIONS]
    for path, body, status, param in cases:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        reply = httpx.post(server.url + path, content=content, headers=headers, timeout=30)
        assert reply.status_code == status, (path, body, reply.text)
        error = reply.json()["error"]
        assert error["message"] and error["type"] == "invalid_request_error", error
        assert error["param"] == param, error
    odd = [None, True, -1, 0.5, 1e308, "x", "", [], {}, [1, "a"], {"a": [1]}, [[[]]]]
    fields = ["model", "messages", "prompt", "temperature", "top_p", "top_k", "max_tokens", "stop", "seed", "n",
              "stream", "stream_options", "presence_penalty", "repetition_penalty", "ignore_eos", "logprobs", "echo",
              "best_of", "suffix", "tools", "response_format", "max_completion_tokens"]
    with httpx.Client(base_url=server.url, headers=headers, timeout=30) as http:
        for path, base in ((CHAT, hi), ("/v1/completions", {"model": "law", "prompt": "hi"})):
            for field, value in ((field, value) for field in fields for value in odd):
                reply = http.post(path, json={**base, "max_tokens": 1, field: value})
                # whatever a client sends, the answer is a 2xx or a 4xx with a message, never a 500
                assert reply.status_code < 300 or (reply.status_code < 500 and reply.json()["error"]["message"]), (
                    path, field, value, reply.text)
    assert httpx.get(server.url + "/v1/chat/completions", headers=headers, timeout=10).status_code == 405
    assert httpx.get(server.url + "/v1/nothing", headers=headers, timeout=10).json()["error"]["message"]
    with pytest.raises(openai.NotFoundError, match="the model 'nope' does not exist") as missing:
        ask(server.client, "nope", "hi")
    with pytest.raises(openai.BadRequestError, match="this model's context is 1024 tokens") as too_long:
        ask(server.client, "lumi", "hi " * 1500)
    assert (missing.value.code, too_long.value.code) == ("model_not_found", "context_length_exceeded")
    assert ask(server.client, "lumi", "still there?", max_tokens=2).usage.completion_tokens == 2


def test_sixteen_streaming_clients_over_two_adapters_get_their_own_answers(server, alone):
    jobs = [("lumi" if i % 2 else "law", QUESTIONS[i // 2]) for i in range(16)]
    expected = [greedy(alone, name, question, 32) for name, question in jobs]
    assert len(set(expected)) == 16
    before = dict(server.engine.stats)
    start = threading.Barrier(16)

    def client(job):
        start.wait()
        return streamed(server.client, *job, max_tokens=32)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(client, jobs))
    for (name, question), answer, (text, chunks) in zip(jobs, expected, results):
        assert text.strip() == answer, (name, question)
        assert {c.model for c in chunks} == {name} and len({c.id for c in chunks}) == 1
        assert chunks[-1].usage.completion_tokens == 32
    assert server.engine.stats["most_rows"] >= 4  # they were decoded together,
    assert server.engine.stats["mixed_steps"] > before["mixed_steps"]  # both adapters in one forward


def test_a_client_that_hangs_up_frees_its_slot_at_once(server):
    import httpx

    body = {"model": "lumi", "messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 900,
            "stream": True, "temperature": 0}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {KEY}"}) as reply:
        events = (line for line in reply.iter_lines() if line)
        assert '"content": ""' in next(events) and '"content": "' in next(events)  # the role, then text
        assert sum(server.engine.load()) == 1
    hung_up, tokens = time.monotonic(), server.engine.stats["tokens"]
    while server.engine.load() != (0, 0):
        assert time.monotonic() - hung_up < 5, "the slot was not freed"
        time.sleep(0.01)
    assert server.engine.stats["tokens"] - tokens < 20  # a step or two, not the 900 tokens asked for


def test_a_full_queue_gets_429(server):
    import httpx

    from utils.serve.engine import Engine
    from utils.serve.generation import check_settings
    from utils.serve.openai_api import build_app

    engine = Engine(server.engine.model, max_batch=1, max_queue=1)  # never started: requests only wait
    live = Live(build_app(engine, list(server.served.values()), server.tokenizer, 1024, check_settings(), []))
    body = {"model": "lumi", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    try:
        with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, timeout=30) as waiting:
            assert waiting.status_code == 200 and engine.load() == (0, 1)
            full = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=30)
            assert full.status_code == 429 and full.json()["error"]["code"] == "rate_limit_exceeded"
        deadline = time.monotonic() + 5
        while engine.load() != (0, 0):  # the client that hung up left the queue
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        live.close()


def test_curl_streams_server_sent_events(server):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    expected = ask(server.client, "law", "Say something.", 16).choices[0].message.content
    body = json.dumps({"model": "law", "messages": [{"role": "user", "content": "Say something."}], "max_tokens": 16,
                       "temperature": 0, "stream": True})
    out = subprocess.run(["curl", "-N", "-sS", "--fail-with-body", server.url + "/v1/chat/completions", "-H",
                          f"Authorization: Bearer {KEY}", "-H", "Content-Type: application/json", "-d", body],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    events = [line for line in out.stdout.split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and chunks[-1]["usage"]["completion_tokens"] == 16


def test_the_built_in_model_served_by_the_script(smollm2_dir, capsys):
    import httpx
    import psutil

    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "api_server.py"), "--precision=fp32", f"--port={port}",
                             "--max_new_tokens=16"], cwd="/", env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        questions = ["who are you?", "What is the capital of France?", "Name a fruit.", "你是谁？"]
        expected = []
        for question in questions:  # meanwhile the server loads
            cli_demo.main(precision="fp32", temperature=0, max_new_tokens=16, prompt=question)
            expected.append(capsys.readouterr().out.strip())
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server did not start within 120 s"
                time.sleep(0.5)
        listening = {c.laddr for c in psutil.Process(proc.pid).net_connections() if c.status == psutil.CONN_LISTEN}
        assert listening == {("127.0.0.1", port)}  # this machine only, by default
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list()] == ["builtin:smollm2"]
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda q: streamed(client, "builtin:smollm2", q, 16)[0], questions))
        assert [a.strip() for a in answers] == expected
        assert ask(client, "builtin:smollm2", questions[0], 16).choices[0].message.content.strip() == expected[0]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
