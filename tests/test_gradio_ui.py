"""gradio_ui.py: the page in a real headless browser, 8 sessions at once, trimming, and the server flags."""
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import ROOT
from utils.errors import UserError

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


def text_of(message):
    content = message["content"]
    return content if isinstance(content, str) else "".join(part.get("text", "") for part in content)


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    """The page for the tiny model, served in-process on a free loopback port."""
    import torch

    from utils.generation import check_settings
    from utils.model import load_for_inference

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

    from utils.generation import chat

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
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright for Python is not installed (pip install playwright)")
    url = server[0]
    bot, user = "#chatbot [data-testid='bot']", "#chatbot [data-testid='user']"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
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
        finally:
            browser.close()
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
