"""cli_demo.py: flags, one-shot mode, and the interactive chat driven in a pseudo-terminal."""
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT

from utils.core.errors import UserError
from utils.data.templates import pick_template

pexpect = pytest.importorskip("pexpect",
                              reason="pexpect is needed to drive the chat in a pseudo-terminal (requirements-dev.txt)")
sys.path.insert(0, str(ROOT))
import cli_demo  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_flag_errors_are_one_line_user_errors(tiny_model_dir):
    with pytest.raises(UserError, match="--use_8bit and --use_4bit exclude each other"):
        cli_demo.main(model_path=str(tiny_model_dir), use_8bit=True, use_4bit=True, prompt="hi")
    with pytest.raises(UserError, match="disagree; pass only one"):
        cli_demo.main(model_path=str(tiny_model_dir), template="alpaca", input_pattern="prompt", prompt="hi")
    with pytest.raises(UserError, match="--temperature must be a number"):
        cli_demo.main(model_path=str(tiny_model_dir), temperature="hot", prompt="hi")
    assert pick_template("auto", "prompt") == "prompt"  # the older project's --input_pattern


def test_one_shot_from_prompt_and_from_piped_stdin(tiny_model_dir, capsys):
    flags = ["--model_path", str(tiny_model_dir), "--precision=fp32", "--do_sample=False", "--max_new_tokens=12",
             "--input_pattern=alpaca"]
    cli_demo.main(model_path=str(tiny_model_dir), precision="fp32", do_sample=False, max_new_tokens=12,
                  input_pattern="alpaca", prompt="Say hello")
    in_process = capsys.readouterr().out
    piped = subprocess.run([sys.executable, str(ROOT / "cli_demo.py"), *flags], input="Say hello\n",
                           capture_output=True, text=True, timeout=120, cwd="/", env={**os.environ, **ENV})
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == in_process and in_process.strip()
    bad = subprocess.run([sys.executable, str(ROOT / "cli_demo.py"), *flags, "--load_4bit", "--load_8bit"],
                         input="hi", capture_output=True, text=True, timeout=120, env={**os.environ, **ENV})
    assert (bad.returncode == 2 and bad.stderr.startswith("error: --use_8bit and --use_4bit")
            and "Traceback" not in bad.stderr)


# One thread: these models are small, and on a shared CPU extra threads only wait for each other.
ENV = {"OMP_NUM_THREADS": "1"}


def models(tiny_model_dir):
    return {"tiny": ["--model_path", str(tiny_model_dir), "--precision=fp32", "--max_new_tokens=300"],
            "builtin": ["--precision=fp32", "--max_new_tokens=48"]}


@pytest.mark.parametrize("which", ["tiny", "builtin"])
def test_interactive_chat_in_a_terminal(which, tiny_model_dir, smollm2_dir):
    args = [str(ROOT / "cli_demo.py"), *models(tiny_model_dir)[which], "--seed=0"]
    # Ctrl-C live, as in a user's terminal, also when the suite itself was started in the background, where SIGINT
    # is ignored and a child would inherit that
    child = pexpect.spawn(sys.executable, args, encoding="utf-8", timeout=60, cwd="/", dimensions=(40, 200),
                          env={**os.environ, **ENV}, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        child.expect("User: ")
        child.sendline("Tell me a long story about a dragon.")
        child.expect("Assistant: ")
        # streamed: the answer's first text arrives long before the answer ends
        child.expect(r"\S", timeout=30)
        first_text = time.monotonic()
        child.expect("User: ", timeout=120)
        assert "Traceback" not in child.before
        assert time.monotonic() - first_text > 0.2, child.before

        child.sendline("Go on, and make it longer.")
        child.expect("Assistant: ")
        child.expect(r"\S", timeout=30)
        child.sendintr()  # Ctrl-C mid-answer: stop the answer, back to the prompt
        child.expect(r"\[stopped\]", timeout=15)
        child.expect("User: ", timeout=15)
        assert "Traceback" not in child.before and child.isalive()

        child.sendline("clear")
        child.expect(r"\(conversation cleared\)")
        child.expect("User: ")
        if which == "tiny":
            child.sendline("exit")
        else:
            child.sendeof()  # Ctrl-D
        child.expect("Bye.")
        child.expect(pexpect.EOF, timeout=30)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, child.before
