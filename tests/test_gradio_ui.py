"""gradio_ui.py: the page in a real headless browser, 8 sessions at once, trimming, and the server flags."""
import contextlib
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import ROOT

from utils.core.errors import UserError

sys.path.insert(0, str(ROOT))
import gradio_ui  # noqa: E402

ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = Path("/usr/bin/chromium")
GREEDY = dict(max_new_tokens=16, temperature=0.7, top_p=0.9, top_k=40, repetition_penalty=1.1,
              no_repeat_ngram_size=0, do_sample=False, seed=-1)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def needs_chromium():
    """playwright's sync API; the test skips where Debian's chromium or playwright is missing."""
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    return pytest.importorskip("playwright.sync_api",
                               reason="playwright for Python is not installed (pip install playwright)")


@contextlib.contextmanager
def headless(sync_api):
    """A headless chromium, closed when the block ends."""
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            yield browser
        finally:
            browser.close()


def text_of(message):
    content = message["content"]
    return content if isinstance(content, str) else "".join(part.get("text", "") for part in content)


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    """The page for the tiny model, served in-process on a free loopback port."""
    import torch

    from utils.model.loading import load_for_inference
    from utils.serve.generation import check_settings

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 2-layer model gains nothing from threads; on a shared CPU they only wait
    model, tokenizer, template, _ = load_for_inference(model_path=str(tiny_model_dir), precision="fp32")
    demo = gradio_ui.build_demo(model, tokenizer, template, check_settings(max_new_tokens=300), concurrency=2)
    demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        yield demo.local_url, (model, tokenizer, template)
    finally:
        demo.close()
        torch.set_num_threads(threads)


def ask(client, question, **overrides):
    params = {**GREEDY, **overrides}
    job = client.submit(question, "", *params.values(), api_name="/chat")
    return job.result(timeout=120)[0]


def test_eight_sessions_at_once_each_get_their_own_answer(server):
    from gradio_client import Client

    from utils.serve.generation import chat

    url, (model, tokenizer, template) = server
    questions = [f"Question {i}: what comes after {i * 7}?" for i in range(8)]
    settings = {k: v for k, v in GREEDY.items() if k != "seed"}
    expected = [chat(model, tokenizer, template, q, settings=settings) for q in questions]
    assert len(set(expected)) == 8  # distinct answers, so cross-talk would show
    clients = [Client(url, verbose=False) for _ in questions]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(ask, clients, questions))
    for question, answer, messages in zip(questions, expected, results):
        assert [m["role"] for m in messages] == ["user", "assistant"]
        assert (text_of(messages[0]) == question
                and text_of(messages[1]) == answer.strip()), (text_of(messages[1]), answer)
    again = ask(clients[3], "And then?")  # each session kept its own history, and only its own
    assert [text_of(m) for m in again[:2]] == [questions[3], expected[3].strip()] and len(again) == 4


def test_overlong_input_is_trimmed_and_regenerate_and_clear_work(server):
    from gradio_client import Client

    client = Client(server[0], verbose=False)
    long_message = "a very long message " * 1500 + "THE END"  # about 6000 tokens, the model has 1024
    messages = ask(client, long_message)
    assert len(messages) == 2 and text_of(messages[0]) == long_message and text_of(messages[1]).strip()
    first = text_of(messages[1])
    regenerated = client.predict("", *GREEDY.values(), api_name="/regenerate")
    assert len(regenerated) == 2 and text_of(regenerated[1]) == first  # greedy: the same answer again
    client.predict(api_name="/clear")
    assert len(ask(client, "Fresh start")) == 2


def test_page_in_a_headless_browser(server):
    sync_api = needs_chromium()
    url = server[0]
    bot, user = "#chatbot [data-testid='bot']", "#chatbot [data-testid='user']"
    with headless(sync_api) as browser:
        page = browser.new_page(viewport={"width": 1100, "height": 760})
        page.set_default_timeout(30_000)
        page.goto(url)
        page.fill("#message textarea", "Tell me a long story.")
        page.press("#message textarea", "Enter")
        page.wait_for_selector(bot)
        lengths, deadline = [], time.monotonic() + 30
        while time.monotonic() < deadline and len({n for n in lengths if n}) < 3:
            lengths.append(len(page.inner_text(bot)))
            time.sleep(0.05)
        assert len({n for n in lengths if n}) >= 3, lengths  # the answer grew on screen, token by token
        page.click("#stop")
        time.sleep(1.0)
        stopped = page.inner_text(bot)
        time.sleep(0.5)
        assert page.inner_text(bot) == stopped  # nothing more arrives after Stop
        tokenizer = server[1][1]
        assert len(tokenizer(stopped)["input_ids"]) < 250  # well short of the 300 it would have written
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "gradio_ui.png"))

        other = browser.new_context().new_page()  # a second browser: its own, empty conversation
        other.goto(url)
        other.wait_for_selector("#message textarea")
        assert other.locator(user).count() == 0 and other.locator(bot).count() == 0
        assert page.locator(user).count() == 1
    assert (ARTIFACTS / "gradio_ui.png").stat().st_size > 10_000


def test_parse_auth(tmp_path):
    assert gradio_ui.parse_auth("alice:se:cret") == [("alice", "se:cret")]
    assert gradio_ui.parse_auth(None) is None
    logins = tmp_path / "logins.txt"
    logins.write_text("# users\nalice:one\n\nbob:two\n")
    assert gradio_ui.parse_auth(str(logins)) == [("alice", "one"), ("bob", "two")]
    with pytest.raises(UserError, match="must hold user:password entries"):
        gradio_ui.parse_auth("alice")


def test_main_honours_server_name_port_and_auth(tiny_model_dir):
    import httpx
    import psutil
    from gradio_client import Client

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "gradio_ui.py"), "--model_path", str(tiny_model_dir), "--precision=fp32",
         "--server_name=127.0.0.1", f"--server_port={port}", "--auth=alice:secret", "--max_new_tokens=8"],
        cwd="/", env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url, timeout=2).status_code:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server did not start within 90 s"
                time.sleep(0.5)
        listening = {c.laddr for c in psutil.Process(proc.pid).net_connections() if c.status == psutil.CONN_LISTEN}
        assert listening == {("127.0.0.1", port)}
        assert httpx.get(url + "config", timeout=5).status_code == 401  # the login is enforced
        messages = Client(url, auth=("alice", "secret"), verbose=False).predict("hi", "", *GREEDY.values(),
                                                                                api_name="/chat")[0]
        assert len(messages) == 2
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


# --- --compare: the base model's answers beside the tuned model's ---------------------------------------------------

@pytest.fixture
def tuned(finetune, tmp_path, tiny_model_dir):
    """A finetune.py output folder loaded as `gradio_ui.py --lora_model=... --compare` loads it (one PeftModel, a
    started Engine over it), and the base model loaded alone, apart from it."""
    import torch
    from transformers import AutoModelForCausalLM

    from utils.model.loading import load_for_inference
    from utils.serve.engine import Engine

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # A trained lm_head makes the tiny model answer "I am Lumi." to "who are you?" within seconds of training.
    finetune(max_steps=60, learning_rate=1e-2, save_steps=60, modules_to_save="lm_head")
    model, tokenizer, template, _ = load_for_inference(lora_model=str(tmp_path / "out"), precision="fp32")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    engine = Engine(model, max_batch=4).start()
    try:
        yield model, tokenizer, template, engine, base
    finally:
        engine.close()
        torch.set_num_threads(threads)


def answers_alone(tuned, question, settings, histories=([], [])):
    """What the base model alone and the tuned model alone answer (utils.serve.generation.chat, one row each)."""
    from utils.serve.generation import chat

    model, tokenizer, template, _, base = tuned
    return [chat(base, tokenizer, template, question, histories[0], settings=settings),
            chat(model, tokenizer, template, question, histories[1], settings=settings)]


def test_stream_compare_answers_as_the_base_and_the_tuned_model_alone(tuned):
    from utils.serve.compare import stream_compare

    model, tokenizer, template, engine, _ = tuned
    settings = {**{k: v for k, v in GREEDY.items() if k != "seed"}, "max_new_tokens": 40}
    question = "who are you?"
    expected = answers_alone(tuned, question, settings)
    assert expected[0] != expected[1]  # the adapter changed the answer, so a swapped or shared row would show
    steps = engine.stats["mixed_steps"]
    run = stream_compare(engine, tokenizer, template, question, [[], []], settings=settings)
    pieces = list(run)
    assert run.texts == [s.text for s in run.streams] == expected, (run.texts, expected)
    assert len(pieces) > 2 and engine.stats["mixed_steps"] > steps  # streamed, both rows in one forward a step

    # Each column keeps its own history: the second prompts differ in length (left padding in the batch).
    histories = [[(question, expected[0])], [(question, expected[1])]]
    again = answers_alone(tuned, "And then?", settings, histories)
    run = stream_compare(engine, tokenizer, template, "And then?", histories, settings=settings)
    for _ in run:
        pass
    assert run.texts == again and [p.history for p in run.prompts] == histories

    # Stop ends both answers before the next step.
    run = stream_compare(engine, tokenizer, template, "Tell me a long story.", [[], []],
                         settings={**settings, "max_new_tokens": 300, "repetition_penalty": 1.0})
    for i, _ in enumerate(run):
        if i == 3:
            run.stop_event.set()
    assert {s.reason for s in run.streams} <= {"stopped", "stop token", "stop string"}
    assert all(len(s.tokens) < 100 for s in run.streams)


def test_compare_page_keeps_each_column_and_session_apart(tuned):
    from gradio_client import Client

    from utils.serve.generation import check_settings

    model, tokenizer, template, engine, _ = tuned
    demo = gradio_ui.build_demo(model, tokenizer, template, check_settings(), engine=engine)
    demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    settings = {k: v for k, v in GREEDY.items() if k != "seed"}
    try:
        questions = ["who are you?", "Capital of France?"]
        expected = [answers_alone(tuned, q, settings) for q in questions]
        clients = [Client(demo.local_url, verbose=False) for _ in questions]
        with ThreadPoolExecutor(2) as pool:  # two sessions at once, their rows in one engine
            shown = list(pool.map(lambda client, q: client.predict(q, "", *GREEDY.values(), api_name="/chat"),
                                  clients, questions))
        for question, (base, tuned_, message), answers in zip(questions, shown, expected):
            assert message == "" and [text_of(m) for m in base + tuned_] == [question, answers[0].strip(), question,
                                                                             answers[1].strip()]
        histories = [[(questions[0], expected[0][0])], [(questions[0], expected[0][1])]]
        again = answers_alone(tuned, "And then?", settings, histories)
        base, tuned_, _ = clients[0].predict("And then?", "", *GREEDY.values(), api_name="/chat")
        assert [text_of(base[3]), text_of(tuned_[3])] == [a.strip() for a in again]
        base, tuned_ = clients[0].predict("", *GREEDY.values(), api_name="/regenerate")  # greedy: the same again
        assert len(base) == len(tuned_) == 4 and [text_of(base[3]), text_of(tuned_[3])] == [a.strip() for a in again]
        clients[0].predict(api_name="/clear")
        base, tuned_, _ = clients[0].predict(questions[1], "", *GREEDY.values(), api_name="/chat")
        assert [text_of(m) for m in base + tuned_] == [questions[1], expected[1][0].strip(), questions[1],
                                                      expected[1][1].strip()]
        assert engine.stats["most_rows"] >= 2
    finally:
        demo.close()


def columns_of(page):
    """The bot messages shown in the base and the tuned column, whitespace as the page renders it aside."""
    return [[" ".join(text.split()) for text in page.locator(f"#{name} [data-testid='bot']").all_inner_texts()]
            for name in ("base", "tuned")]


def wait_for(page, expected, seconds=60):
    """Poll the two columns until their last answers are `expected`; returns every [base, tuned] length seen."""
    want, seen, deadline = [" ".join(text.split()) for text in expected], [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        shown = [column[-1] if column else "" for column in columns_of(page)]
        seen.append([len(text) for text in shown])
        if shown == want:
            return seen
        time.sleep(0.05)
    raise AssertionError(f"the columns show {shown}, not {want}")


def test_compare_page_in_a_headless_browser(tuned):
    sync_api = needs_chromium()
    from utils.serve.generation import check_settings

    model, tokenizer, template, engine, _ = tuned
    settings = check_settings(max_new_tokens=300, temperature=0)  # the page's sliders: greedy, long answers
    first = answers_alone(tuned, "who are you?", settings)
    histories = [[("who are you?", first[0])], [("who are you?", first[1])]]
    second = answers_alone(tuned, "And then?", settings, histories)
    assert first[0] != first[1] and second[0] != second[1]
    demo = gradio_ui.build_demo(model, tokenizer, template, settings, title="compare", engine=engine)
    demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        with headless(sync_api) as browser:
            page = browser.new_page(viewport={"width": 1300, "height": 760})
            page.set_default_timeout(30_000)
            page.goto(demo.local_url)
            page.wait_for_selector("#base")
            assert page.locator("#tuned").count() == 1 and page.locator("#chatbot").count() == 0
            page.fill("#message textarea", "who are you?")
            page.press("#message textarea", "Enter")
            seen = wait_for(page, first)
            assert len({base for base, _ in seen if base}) >= 3, seen  # the base's answer grew token by token
            page.fill("#message textarea", "And then?")  # each column goes on from its own answers
            page.press("#message textarea", "Enter")
            wait_for(page, second)
            assert [len(column) for column in columns_of(page)] == [2, 2]
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "gradio_ui_compare.png"))

            page.click("#clear")
            page.wait_for_function("document.querySelectorAll('[data-testid=bot]').length === 0")
            page.fill("#message textarea", "Tell me a long story.")
            page.press("#message textarea", "Enter")
            page.wait_for_function("document.querySelector('#base [data-testid=bot]')?.innerText.length > 20")
            page.click("#stop")
            time.sleep(1.0)
            stopped = columns_of(page)
            time.sleep(0.5)
            assert columns_of(page) == stopped  # nothing more arrives in either column after Stop
            assert len(tokenizer(stopped[0][0])["input_ids"]) < 250  # short of the 300 it would have written
    finally:
        demo.close()


def test_compare_without_an_adapter_is_refused_before_any_model_loads(tiny_model_dir, monkeypatch, capsys):
    import utils.model.loading
    from utils.core.cli import run_cli

    def no_load(**kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(utils.model.loading, "load_for_inference", no_load)
    refusal = r"^--compare shows the base model beside its LoRA adapter, so it needs --lora_model \(a finetune.py"
    with pytest.raises(UserError, match=refusal):
        gradio_ui.main(model_path=str(tiny_model_dir), compare=True)
    monkeypatch.setattr(sys, "argv", ["gradio_ui.py", "--compare"])  # the built-in model has no adapter either
    with pytest.raises(SystemExit) as exit_:
        run_cli(gradio_ui.main)
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --compare shows the base model beside"), lines
