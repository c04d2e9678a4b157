"""Flags: unknown ones refused before any work with a suggestion, and every value converted and range-checked,
all problems in one message."""
import json
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT

from utils.core.errors import UserError
from utils.core.flags import Checks, renamed, unknown_flags

TYPOS = {"finetune.py": ("output_dri", "output_dir"), "merge_lora.py": ("dtpye", "precision"),
         "cli_demo.py": ("model_pth", "model_path"), "gradio_ui.py": ("server_prot", "server_port"),
         "evaluate.py": ("data_dri", "data_dir"), "export_gguf.py": ("outtpye", "outtype")}


@pytest.mark.parametrize("script", sorted(TYPOS))
def test_unknown_flag_is_refused_before_any_work(script, tmp_path):
    """A typo costs nothing: exit 2, one line with the suggestion, no model loaded, nothing written."""
    typo, meant = TYPOS[script]
    proc = subprocess.run([sys.executable, str(ROOT / script), f"--{typo}=x", "--frobnicate=4", "--no-such_flag"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [f"error: --{typo} is not a flag of this script (did you mean --{meant}?); "
                     "--frobnicate is not a flag of this script; "
                     "--no_such_flag is not a flag of this script; run with --help for every flag."]
    assert proc.stdout == "" and list(tmp_path.iterdir()) == []


def test_launchers_local_rank_flag_is_passed_over(tmp_path):
    """DeepSpeed's `deepspeed` launcher adds --local_rank=N to the script's flags (LOCAL_RANK says it too)."""
    proc = subprocess.run([sys.executable, str(ROOT / "finetune.py"), "--local_rank=0", "--dry_run",
                           "--data_cache=False"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "dry run: data is valid" in proc.stdout


def test_unknown_flags_accepts_fire_forms():
    def main(alpha: int = 1, use_cache: bool = True):
        return alpha, use_cache

    assert unknown_flags(main, ["--alpha=3", "--alpha", "3", "--nouse_cache", "--use-cache", "--help", "--",
                                "--trace"]) == []
    assert unknown_flags(main, ["--alpah=3"]) == ["--alpah is not a flag of this script (did you mean --alpha?)"]


def test_checks_convert_and_gather_every_problem():
    c = Checks()
    assert c.integer("a", "8", 1) == 8 and c.integer("b", 8.0) == 8 and c.integer("c", None, none=True) is None
    assert (c.number("d", "1e-4", 0, above_low=True) == 1e-4 and c.boolean("e", "false") is False
            and c.text("f", 7) == "7")
    assert c.problems == []
    c.integer("steps", "abc")
    c.integer("count", 8.5)
    c.integer("flag_int", True)
    c.number("rate", 0, 0, above_low=True)
    c.number("dropout", 1.0, 0, 1, below_high=True)
    c.choice("mode", "cosin", ("linear", "cosine"))
    c.boolean("yes", "maybe")
    with pytest.raises(UserError) as info:
        c.done()
    message = str(info.value)
    for part in ("--steps must be an integer, got 'abc'", "--count must be an integer, got 8.5",
                 "--flag_int must be an integer, got True",
                 "--rate must be above 0, got 0", "--dropout must be from 0 to below 1, got 1.0",
                 "--mode must be one of linear, cosine, got 'cosin' (did you mean cosine?)",
                 "--yes must be True or False, got 'maybe'"):
        assert part in message, (part, message)
    assert message.count("; ") == 6 and "\n" not in message


FINETUNE_BAD = [
    (dict(lr_scheduler_type="bogus"), "--lr_scheduler_type must be one of linear, cosine"),
    (dict(max_steps="abc"), "--max_steps must be an integer (at least -1), got 'abc'"),
    (dict(max_steps=0), "--max_steps must be -1"),
    (dict(seed="abc"), "--seed must be an integer"),
    (dict(lora_alpha="abc"), "--lora_alpha must be a number (above 0)"),
    (dict(lora_dropout=1.5), "--lora_dropout must be from 0 to below 1, got 1.5"),
    (dict(num_epochs=-1), "--num_epochs must be above 0, got -1"),
    (dict(warmup_ratio=5), "--warmup_ratio must be from 0 to below 1, got 5"),
    (dict(eval_steps=0), "--eval_steps must be at least 1, got 0"),
    (dict(use_4bit=True, use_8bit=True), "--use_4bit and --use_8bit exclude each other"),
    (dict(bits=3), "--bits must be one of 4, 8, 16, got 3"),
    (dict(precision="fp8"), "--precision must be one of auto, bf16, fp16, fp32"),
    (dict(packing="maybe"), "--packing must be True or False"),
    (dict(block_size=1), "--block_size must be at least 2"),
    (dict(val_set_size=-2), "--val_set_size must be at least 0"),
    (dict(resume_from_checkpoint=3), "--resume_from_checkpoint must be a checkpoint folder or True"),
    (dict(lora_target_modules=3), "--lora_target_modules must be a comma-separated list"),
]


def test_finetune_output_dir_must_be_a_writable_folder(finetune, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=r"--output_dir=.*/file is a file, not a folder"):
        finetune(output_dir=str(tmp_path / "file"))
    with pytest.raises(UserError, match=r"--output_dir=.*/file/sub lies under .*/file, which is a file"):
        finetune(output_dir=str(tmp_path / "file" / "sub"))
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(UserError, match="is not writable"):
            finetune(output_dir=str(locked / "out"))


@pytest.mark.parametrize("flags,message", FINETUNE_BAD, ids=[next(iter(f)) for f, _ in FINETUNE_BAD])
def test_finetune_flags_are_checked_before_any_work(finetune, tmp_path, flags, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        finetune(base_model=str(tmp_path / "no-model-here"), data_path=str(tmp_path / "no-data-here"), **flags)
    assert not (tmp_path / "out").exists()


def test_finetune_reports_all_bad_flags_together(finetune, tmp_path):
    with pytest.raises(UserError) as info:
        finetune(max_steps="abc", seed="x", lora_dropout=2, lr_scheduler_type="cosin")
    assert str(info.value).count(" must be ") == 4 and "did you mean cosine?" in str(info.value)


def test_schedulers_and_optimizers_offered_are_transformers_own():
    from transformers import SchedulerType
    from transformers.training_args import OptimizerNames

    from utils.core.flags import OPTIMIZERS, SCHEDULERS

    assert set(SCHEDULERS) <= {s.value for s in SchedulerType}
    assert set(OPTIMIZERS) <= {o.value for o in OptimizerNames}


def test_cli_demo_with_standard_input_closed(tmp_path):
    proc = subprocess.run(f"{sys.executable} {ROOT / 'cli_demo.py'} <&-", shell=True, capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        'error: standard input is closed; pass the question with --prompt="...", pipe it on stdin, '
        'or run in a terminal.']


def test_gradio_refuses_a_taken_port_before_loading(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, str(ROOT / "gradio_ui.py"), f"--server_port={port}"],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: cannot listen on 127.0.0.1:{port} (Address already in use); "
                                                "pass another --server_port, or leave it out to take the first free "
                                                "port from 7860."]
    assert "Serving" not in proc.stdout


def test_messages_name_the_flags_of_their_script(tmp_path):
    from utils.eval.ceval_cmmlu import subject_files
    from utils.model.loading import resolve_model_path

    with pytest.raises(UserError,
                       match=r"--model_path='nowhere' is not an existing folder .* or --model_path=builtin:smollm2"):
        resolve_model_path("nowhere", flag="model_path")
    (tmp_path / "test").mkdir()
    with pytest.raises(UserError, match=r"few-shot prompts take their examples from dev/ \(--data_dir has: test\); "
                                        r"add it, or pass --few_shot=0"):
        subject_files(tmp_path, "dev")


def test_older_flag_names_are_read_as_the_current_ones():
    from utils.core.flags import renamed

    aliases = {"dtype": "precision", "overwrite": "overwrite_output_dir", "load_4bit": "use_4bit"}
    argv, problems = renamed(["--dtype=bf16", "--overwrite", "--noload_4bit", "pos", "--", "--dtype"], aliases)
    assert (argv == ["--precision=bf16", "--overwrite_output_dir", "--nouse_4bit", "pos", "--", "--dtype"]
            and problems == [])
    assert renamed(["--precision=fp32", "--dtype=bf16"], aliases)[1] == [
        "pass either --precision or its older name --dtype, not both"]
    assert renamed(["--dtype=bf16", "--precision=fp32"], aliases)[1] == [
        "pass either --precision or its older name --dtype, not both"]


@pytest.mark.parametrize("script,flags", [("finetune.py", ["--dry_run", "--load_4bit", "--dtype=fp32",
                                                           "--overwrite=True"]),
                                          ("merge_lora.py", ["--dtype=int4", "--overwrite"]),
                                          ("cli_demo.py", ["--load_8bit", "--load_4bit"])])
def test_older_names_work_on_the_command_line(script, flags, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / script), *flags, f"--data_path={ROOT / 'data' / 'demo.json'}"]
                          if script == "finetune.py" else [sys.executable, str(ROOT / script), *flags],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    if script == "finetune.py":
        assert proc.returncode == 0 and "dry run: data is valid" in proc.stdout, proc.stderr[-2000:]
    elif script == "merge_lora.py":  # read as --precision and --overwrite_output_dir: the error names the current flag
        assert proc.returncode == 2 and "--precision must be one of auto, bf16, fp16, fp32, got 'int4'" in proc.stderr
    else:
        assert proc.returncode == 2 and "--use_8bit and --use_4bit exclude each other" in proc.stderr


def test_older_names_are_renamed_in_every_form_fire_reads():
    def main(use_8bit: bool = False, precision: str = "auto"):
        return use_8bit, precision

    aliases = {"load_8bit": "use_8bit", "dtype": "precision"}
    argv, problems = renamed(["--load-8bit=True", "-dtype=bf16", "--noload_8bit"], aliases)
    assert argv == ["--use_8bit=True", "--precision=bf16", "--nouse_8bit"] and problems == []
    assert unknown_flags(main, argv, aliases) == []
    assert unknown_flags(main, ["--dtpye=x"], aliases) == [
        "--dtpye is not a flag of this script (did you mean --precision?)"]


def _main(learning_rate: float = 5e-4, num_epochs: float = 3, use_8bit: bool = False, output_dir: str = "output",
          overwrite_output_dir: bool = False, config: str = None):
    return locals()


def test_config_file_flags_go_before_the_command_line(tmp_path):
    """A JSON or YAML file of flags, or a run_config.json's "flags", is read as flags; the command line wins,
    per-run flags (--overwrite_output_dir) are not repeated, and dashed or older names are read as the current."""
    from utils.core.flags import config_flags

    (tmp_path / "c.yaml").write_text("learning-rate: 0.001\nnum_epochs: 5\nload_8bit: true\n"
                                     "overwrite_output_dir: true\noutput_dir: runs/a b\n", encoding="utf-8")
    argv, problems = config_flags(_main, [f"--config={tmp_path}/c.yaml", "--num_epochs=2"], {"load_8bit": "use_8bit"})
    assert problems == []
    assert argv == ["--learning_rate=0.001", "--use_8bit=True", "--output_dir='runs/a b'",
                    f"--config={tmp_path}/c.yaml", "--num_epochs=2"]
    import fire  # fire reads the values back exactly

    assert fire.Fire(_main, argv) == dict(learning_rate=0.001, num_epochs=2, use_8bit=True, output_dir="runs/a b",
                                         overwrite_output_dir=False, config=f"{tmp_path}/c.yaml")
    (tmp_path / "run_config.json").write_text(json.dumps({"base_model_path": "/m", "flags": {"num_epochs": 4}}))
    argv, problems = config_flags(_main, ["--config", str(tmp_path / "run_config.json"), "--nouse_8bit"])
    assert problems == [] and argv[0] == "--num_epochs=4"


@pytest.mark.parametrize("content,name,message", [
    ("learning_rat: 0.1\n", "c.yaml", r"c.yaml: key learning_rat is not a flag of this script "
                                      r"\(did you mean learning_rate\?\)"),
    ("a: [1,\n", "c.yaml", r"c.yaml does not parse \(.*Error"),
    ("[1, 2]", "c.json", r"c.json must hold a mapping of flag names to values"),
    ('{"base_model_path": "/m", "lora": {}}', "c.json", r"c.json is a run config from a lora-kit that did not "
                                                          r"record its flags"),
    ("x", "c.txt", r"c.txt is not a .json, .yaml or .yml file that exists"),
    (None, "missing.json", r"missing.json is not a .json, .yaml or .yml file that exists"),
])
def test_bad_config_files_are_refused(tmp_path, content, name, message):
    from utils.core.flags import config_flags

    if content is not None:
        (tmp_path / name).write_text(content, encoding="utf-8")
    argv = [f"--config={tmp_path / name}"]
    got, problems = config_flags(_main, argv)
    assert got == argv and len(problems) == 1 and re.search(message, problems[0]), problems


def test_report_to_names_what_to_install(monkeypatch):
    import importlib.util

    from utils.core.flags import report_to_list

    assert report_to_list("none") == [] and report_to_list(None) == []
    with pytest.raises(UserError, match="--report_to must be none or some of tensorboard, wandb, swanlab, mlflow, "
                                        "got comet"):
        report_to_list("tensorboard,comet")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"--report_to=wandb,mlflow needs its package: pip install wandb mlflow"):
        report_to_list("wandb,mlflow")
