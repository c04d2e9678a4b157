"""Hard to misuse: every stage script, given each class of bad input, exits with status 2 after printing one line
`error: ...` (no traceback, nothing else), names only its own flags, and leaves no file behind.

One table per script. A row is `row(id, arguments, a pattern the error line must match, setup=...)`: the setup
builds the files the row needs, and the arguments may name {tmp} (the row's folder), {tiny} (a tiny LLaMA), {data}
(good records), {adapter} (a LoRA adapter on the tiny model) and {remote} (a model that ships its own code). A row
runs the way a user runs the script, through `run_cli(main, aliases)` with sys.argv set and tmp as the working
folder, but in-process for speed; the rows named in SUBPROCESS run the script itself. Each failed check raises its
own AssertionError subclass (Crash, NotOneLine, WrongMessage, ForeignFlag, LeftBehind, Printed), which names it.

The classes of bad input (issue 14): 1 unknown or mistyped flags, 2 wrong types or ranges, 3 records that cannot
train, 4 output locations, 5 corrupt inputs, 6 the environment, 7 messages that name the script's own flags and the
fix, 10 models that ship code without --trust_remote_code.
"""
import ast
import gc
import importlib
import inspect
import os
import re
import shutil
import socket
import subprocess
import sys
import warnings

import pytest
from conftest import ROOT, damaged_copy

from utils.core.cli import run_cli

sys.path.insert(0, str(ROOT))

AS_ROOT = os.geteuid() == 0  # root writes into a 0o500 folder anyway
# Rows that run the script in a real process (test_flags.py already runs every script's typo that way).
SUBPROCESS = {"finetune-messages-only-system", "merge-output-not-empty", "cli_demo-stdin-empty",
              "gradio-auth-no-password", "evaluate-few-shot-without-dev", "export-model-path-missing"}


# The checks, in the order they run; a bug row names the one it fails.
class Crash(AssertionError):
    """An exception escaped main, or a traceback was printed."""


class WrongExit(AssertionError):
    """The exit status is not 2, or the script did not stop."""


class NotOneLine(AssertionError):
    """stderr is not exactly one `error: ...` line."""


class WrongMessage(AssertionError):
    """The line does not say what the row expects (what is wrong, where, and the fix)."""


class ForeignFlag(AssertionError):
    """The message names a --flag the script does not take."""


class LeftBehind(AssertionError):
    """A file or folder was created, changed or removed."""


class Printed(AssertionError):
    """Something was printed on stdout besides the error."""


needs_non_root = pytest.mark.skipif(AS_ROOT, reason="root writes into a read-only folder")


# --- how a row runs -------------------------------------------------------------------------------------------------

def cli_aliases(script):
    """The aliases the script's `if __name__ == "__main__":` passes to run_cli (a dict, or a module constant)."""
    tree = ast.parse((ROOT / script).read_text(encoding="utf-8"))
    guard = next(node for node in tree.body if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test))
    call = next(node for node in ast.walk(guard) if isinstance(node, ast.Call) and ast.unparse(node.func) == "run_cli")
    value = next((k.value for k in call.keywords if k.arg == "aliases"), call.args[1] if len(call.args) > 1 else None)
    if isinstance(value, ast.Name):
        return getattr(importlib.import_module(script[:-3]), value.id)
    return ast.literal_eval(value) if value is not None else {}


class Places(dict):
    """The {names} a row's arguments may hold; a fixture is built only when a row names it."""

    FIXTURES = {"tiny": "tiny_model_dir", "data": "data_file", "adapter": "lora_adapter", "remote": "remote_model_dir"}

    def __init__(self, tmp, request):
        super().__init__(tmp=str(tmp))
        self.request = request

    def __missing__(self, key):
        self[key] = str(self.request.getfixturevalue(self.FIXTURES[key]))
        return self[key]


def snapshot(root):
    """Every path under root, with a file's size and modification time; the data cache's own folders and its lock
    files (kept on purpose, see tests/test_records.py) are left out."""
    found = {}
    for path in root.rglob("*"):
        rel = path.relative_to(root).as_posix()
        if (rel in ("cache", "cache/data") and path.is_dir()) or (rel.startswith("cache/") and rel.endswith(".lock")):
            continue
        found[rel] = None if path.is_dir() else (path.lstat().st_size, path.lstat().st_mtime_ns)
    return found


def differences(before, after):
    return sorted(set(before) ^ set(after) | {path for path in set(before) & set(after) if before[path] != after[path]})


def in_process(script, argv, monkeypatch, capfd):
    """(exit status, stdout, stderr) of run_cli(main, aliases) with sys.argv set; a warning counts as a printed line."""
    module = importlib.import_module(script[:-3])
    monkeypatch.setattr(sys, "argv", [script, *argv])
    code = 0  # main returned
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()  # Python's own defaults, as a user's run has them
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", category)
        try:
            run_cli(module.main, cli_aliases(script))
        except SystemExit as e:
            code = e.code
        except Exception as e:
            out, err = capfd.readouterr()
            raise Crash(f"{type(e).__name__}: {e}\nstdout: {out[-1000:]}\nstderr: {err[-1000:]}") from e
    out, err = capfd.readouterr()
    return code, out, err + "".join(f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}\n" for w in caught)


def in_subprocess(script, argv, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / script), *argv], cwd=tmp_path, env=dict(os.environ),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


def check(script, setup, args, message, request, tmp_path, monkeypatch, capfd):
    places = Places(tmp_path, request)
    if setup:
        setup(tmp_path, places)
    argv = [arg.format_map(places) for arg in args]
    capfd.readouterr()  # what building the fixtures printed
    monkeypatch.chdir(tmp_path)  # a default output folder lands in tmp_path, never in the repository
    monkeypatch.setenv("LORA_KIT_CACHE", str(tmp_path / "cache"))  # the tokenized data too
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    module = importlib.import_module(script[:-3])
    if hasattr(module, "ROOT"):  # export's models/ and evaluate's eval_results/ (the defaults) lie under it
        monkeypatch.setattr(module, "ROOT", tmp_path / "toolkit")
    in_repo = {name: (ROOT / name).exists() for name in ("models", "eval_results", "output")}
    before = snapshot(tmp_path)
    if request.node.callspec.id in SUBPROCESS:
        code, out, err = in_subprocess(script, argv, tmp_path)
    else:
        code, out, err = in_process(script, argv, monkeypatch, capfd)
    shown = f"\nexit status: {code}\nstdout: {out[-2000:]}\nstderr: {err[-2000:]}"

    if "Traceback" in out + err:
        raise Crash("a traceback was printed" + shown)
    if code != 2:
        raise WrongExit(f"exit status {code}, not 2" + shown)
    lines = [line for line in err.splitlines() if line.strip()]
    if len(lines) != 1 or not lines[0].startswith("error: "):
        raise NotOneLine("stderr is not one `error: ...` line" + shown)
    if not re.search(message, lines[0]):
        raise WrongMessage(f"the error does not match {message!r}" + shown)
    own = set(inspect.signature(module.main).parameters) | set(cli_aliases(script)) | {"help"}
    typed = {arg.lstrip("-").split("=", 1)[0].replace("-", "_") for arg in argv if arg.startswith("-")}
    told = re.sub(r"python \S+\.py[^);]*", "", lines[0])  # a command line for another script names its flags
    foreign = set(re.findall(r"(?<![\w-])--([a-z][a-z0-9_]*)", told)) - own - typed
    if foreign:
        raise ForeignFlag(f"{script} takes no --{', --'.join(sorted(foreign))}" + shown)
    changed = differences(before, snapshot(tmp_path))
    if any(path.startswith("cache/") for path in changed):  # a private token store goes when its process exits
        gc.collect()
        changed = differences(before, snapshot(tmp_path))
    if changed:
        raise LeftBehind(f"created, changed or removed: {changed}" + shown)
    if {name: (ROOT / name).exists() for name in in_repo} != in_repo:
        raise LeftBehind("wrote into the repository" + shown)
    if out.strip():
        raise Printed("stdout is not empty" + shown)


# --- the files rows are made of ---------------------------------------------------------------------------------------

def files(contents):
    """A setup writing {path under the row's folder: text or bytes}."""
    def setup(tmp, places):
        for name, content in contents.items():
            path = tmp / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content, encoding="utf-8")
    return setup


def also(*setups):
    """One setup running these in turn."""
    def setup(tmp, places):
        for one in filter(None, setups):
            one(tmp, places)
    return setup


def damaged_adapter(name=None, how="truncate"):
    """A copy of the adapter at {tmp}/damaged, with `name` cut to half its size or replaced by the text `how`."""
    def setup(tmp, places):
        if name:
            damaged_copy(places["adapter"], tmp / "damaged", name, how)
        else:
            shutil.copytree(places["adapter"], tmp / "damaged")
    return setup


def copied_model(cut=None, remove=None):
    """A copy of the tiny model at {tmp}/model; cut: a file to keep the first 1000 bytes of; remove: one to delete."""
    def setup(tmp, places):
        shutil.copytree(places["tiny"], tmp / "model")
        if cut:
            (tmp / "model" / cut).write_bytes((tmp / "model" / cut).read_bytes()[:1000])
        if remove:
            (tmp / "model" / remove).unlink()
    return setup


def locked_folder(tmp, places):
    (tmp / "locked").mkdir(mode=0o500)


def checkpoint(folder="out/checkpoint-2", state='{"global_step": 2, "log_hist'):
    """A checkpoint folder with every file a resume needs; its trainer_state.json cut short by default."""
    needed = ("adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt")
    return files({**{f"{folder}/{name}": "{}" for name in needed}, f"{folder}/trainer_state.json": state})


def stdin_closed(tmp, places):
    sys.stdin = None  # as Python sets it when started with stdin closed; the test's monkeypatch restores it


def row(id, args, message, setup=None, marks=()):
    """A table row; its id names the case when it fails."""
    return pytest.param(setup, args, message, id=id, marks=marks)


def with_defaults(defaults):
    """Argument lists for a table: the script's usual good flags, each replaced by a row's flag of the same name."""
    def args(*extra):
        named = {arg.split("=", 1)[0] for arg in extra}
        return [arg for arg in defaults if arg.split("=", 1)[0] not in named] + list(extra)
    return args


# --- fixtures ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_adapter(tmp_path_factory, tiny_model_dir):
    """A PEFT LoRA adapter on the tiny model, as any PEFT user saves one (its base named in adapter_config.json)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    folder = tmp_path_factory.mktemp("adapter") / "run"
    model.save_pretrained(folder)
    return folder


# --- finetune.py ----------------------------------------------------------------------------------------------------

def records(text, name="bad.json"):
    return files({name: text})


ft = with_defaults(["--base_model={tiny}", "--data_path={data}", "--output_dir={tmp}/out"])
bad_data = ft("--data_path={tmp}/bad.json")
FINETUNE = [
    # 1 unknown or mistyped flags
    row("finetune-typo-lora-rank", ft("--lora_rank=16"),
        r"--lora_rank is not a flag of this script \(did you mean --lora_r\?\)"),
    row("finetune-two-typos", ft("--learning_rat=1e-4", "--epochs=2"),
        r"did you mean --learning_rate\?.*--epochs is not a flag"),
    row("finetune-old-and-new-name", ft("--dtype=fp32", "--precision=bf16"),
        r"pass either --precision or its older name --dtype"),
    row("finetune-one-dash-typo", ft("--dry_run", "-lora_rank=16"), r"lora_rank.* not a flag"),
    # 2 wrong types and ranges
    row("finetune-scheduler-bogus", ft("--lr_scheduler_type=bogus"),
        r"--lr_scheduler_type must be one of linear, cosine"),
    row("finetune-scheduler-typo", ft("--lr_scheduler_type=cosin"), r"did you mean cosine\?"),
    row("finetune-max-steps-abc", ft("--max_steps=abc"), r"--max_steps must be an integer \(at least -1\), got 'abc'"),
    row("finetune-max-steps-0", ft("--max_steps=0"), r"--max_steps must be -1"),
    row("finetune-max-steps-fraction", ft("--max_steps=2.5"), r"--max_steps must be an integer"),
    row("finetune-seed-abc", ft("--seed=abc"), r"--seed must be an integer"),
    row("finetune-lora-r-without-value", ft("--lora_r"), r"--lora_r must be an integer .*got True"),
    row("finetune-lora-r-0", ft("--lora_r=0"), r"--lora_r must be at least 1, got 0"),
    row("finetune-lora-alpha-abc", ft("--lora_alpha=abc"), r"--lora_alpha must be a number \(above 0\)"),
    row("finetune-lora-dropout-1.5", ft("--lora_dropout=1.5"), r"--lora_dropout must be from 0 to below 1, got 1.5"),
    row("finetune-epochs-negative", ft("--num_epochs=-1"), r"--num_epochs must be above 0, got -1"),
    row("finetune-warmup-5", ft("--warmup_ratio=5"), r"--warmup_ratio must be from 0 to below 1, got 5"),
    row("finetune-eval-steps-0", ft("--eval_steps=0"), r"--eval_steps must be at least 1, got 0"),
    row("finetune-learning-rate-0", ft("--learning_rate=0"), r"--learning_rate must be above 0"),
    row("finetune-cutoff-0", ft("--cutoff_len=0"), r"--cutoff_len must be at least 1"),
    row("finetune-batch-0", ft("--per_device_train_batch_size=0"), r"--per_device_train_batch_size must be at least 1"),
    row("finetune-max-samples-0", ft("--max_samples=0"), r"--max_samples must be at least 1"),
    row("finetune-stage-bogus", ft("--stage=rlhf"), r"--stage must be one of sft, pt, dpo, got 'rlhf'"),
    row("finetune-pref-loss-bogus", ft("--stage=dpo", "--pref_loss=foo"),
        r"--pref_loss must be one of dpo, ipo, orpo, simpo, kto, got 'foo'"),
    row("finetune-pref-loss-typo", ft("--stage=dpo", "--pref_loss=simp"), r"got 'simp' \(did you mean simpo\?\)"),
    row("finetune-pref-beta-negative", ft("--stage=dpo", "--pref_beta=-1"), r"--pref_beta must be above 0, got -1"),
    row("finetune-pref-beta-and-gamma", ft("--stage=dpo", "--pref_beta=0", "--simpo_gamma=abc"),
        r"--pref_beta must be above 0, got 0; --simpo_gamma must be a number \(at least 0\), got 'abc'"),
    row("finetune-pref-ftx-negative", ft("--stage=dpo", "--pref_ftx=-1"), r"--pref_ftx must be at least 0, got -1"),
    row("finetune-pref-ftx-with-orpo", ft("--stage=dpo", "--pref_loss=orpo", "--pref_ftx=1"),
        r"--pref_loss=orpo has none to add to \(orpo has its own NLL\); leave --pref_ftx out"),
    row("finetune-pref-ftx-without-dpo", ft("--pref_ftx=1"), r"--pref_ftx=1: preference training flags, used only"),
    row("finetune-pref-loss-without-dpo", ft("--pref_loss=kto"),
        r"--pref_loss=kto: preference training flags, used only with --stage=dpo; add --stage=dpo"),
    row("finetune-lora-model-missing", ft("--lora_model={tmp}/nowhere"), r"--lora_model=.*nowhere is not a folder"),
    row("finetune-lora-model-without-adapter", ft("--lora_model={tmp}/empty"), r"empty holds no adapter_config.json",
        setup=files({"empty/notes.txt": "x"})),
    row("finetune-precision", ft("--precision=fp8"), r"--precision must be one of auto, bf16, fp16, fp32"),
    row("finetune-older-name-bad-value", ft("--dtype=int4"),
        r"--precision must be one of auto, bf16, fp16, fp32, got 'int4'"),
    row("finetune-bits-3", ft("--bits=3"), r"--bits must be one of 4, 8, 16, got 3"),
    row("finetune-4bit-and-8bit", ft("--use_4bit", "--use_8bit"), r"--use_4bit and --use_8bit exclude each other"),
    row("finetune-packing-maybe", ft("--packing=maybe"), r"--packing must be True or False, got 'maybe'"),
    row("finetune-report-maybe", ft("--report=maybe"), r"--report must be True or False, got 'maybe'"),
    row("finetune-report-to-bogus", ft("--report_to=comet"),
        r"--report_to must be none or some of tensorboard, wandb, swanlab, mlflow, got comet"),
    row("finetune-report-to-not-installed", ft("--report_to=swanlab"),
        r"--report_to=swanlab needs its package: pip install swanlab"),
    row("finetune-deepspeed-missing", ft("--deepspeed={tmp}/ds.json"),
        r"--deepspeed=.*ds.json does not exist; pass a DeepSpeed JSON config, or one of ours: zero2, zero3, "
        r"zero3_offload \(configs/deepspeed/\)"),
    row("finetune-deepspeed-bad-json", ft("--deepspeed={tmp}/ds.json"),
        r"--deepspeed=.*ds.json is not valid JSON \(.*\); fix it, or start from configs/deepspeed/zero3.json",
        setup=files({"ds.json": '{"zero_optimization": '})),
    row("finetune-deepspeed-bad-stage", ft("--deepspeed={tmp}/ds.json"),
        r"--deepspeed=.*ds.json: zero_optimization.stage must be 0, 1, 2 or 3, got 4",
        setup=files({"ds.json": '{"zero_optimization": {"stage": 4}}'})),
    row("finetune-deepspeed-8bit", ft("--deepspeed=zero3", "--use_8bit"),
        r"--use_8bit cannot be sharded by FSDP or DeepSpeed; use --use_4bit \(QLoRA, sharded in the compute dtype\) "
        r"or a 16-bit base"),
    row("finetune-dpo-zero3", ft("--stage=dpo", "--deepspeed=zero3"),
        r"--stage=dpo does not run under ZeRO-3 yet \(its reference pass reads whole weights before training\); "
        r"use --deepspeed=zero2, or torchrun without --deepspeed"),
    row("finetune-dpo-train-on-inputs", ft("--stage=dpo", "--train_on_inputs"),
        r"--train_on_inputs is for SFT: preference losses compare two answers to one prompt and never train on the "
        r"prompt; leave it out with --stage=dpo"),
    row("finetune-optim-bogus", ft("--optim=lion"), r"--optim must be one of adamw_torch, .*sgd, got 'lion'"),
    row("finetune-max-grad-norm-negative", ft("--max_grad_norm=-1"), r"--max_grad_norm must be at least 0, got -1"),
    row("finetune-config-missing", ft("--config={tmp}/recipe.yaml"),
        r"--config=.*recipe.yaml is not a .json, .yaml or .yml file that exists; pass a run's run_config.json"),
    row("finetune-config-unknown-key", ft("--config={tmp}/recipe.yaml"),
        r"recipe.yaml: key learning_rat is not a flag of this script \(did you mean learning_rate\?\)",
        setup=files({"recipe.yaml": "learning_rat: 0.001\nnum_epochs: 2\n"})),
    row("finetune-config-bad-yaml", ft("--config={tmp}/recipe.yaml"), r"recipe.yaml does not parse \(.*; fix the file",
        setup=files({"recipe.yaml": "lora_r: [8,\n"})),
    row("finetune-config-bad-value", ft("--config={tmp}/recipe.json"), r"--lora_r must be at least 1, got 0",
        setup=files({"recipe.json": '{"lora_r": 0}'})),
    row("finetune-probes-bad-json", ft("--probe_prompts={tmp}/probes.json"),
        r"--probe_prompts=.*probes.json is not a list of prompts", setup=files({"probes.json": '[{"text": "hi"}]'})),
    row("finetune-checkpointing-bogus", ft("--gradient_checkpointing=sometimes"),
        r"--gradient_checkpointing must be True or False"),
    row("finetune-target-modules-number", ft("--lora_target_modules=3"),
        r"--lora_target_modules must be a comma-separated list"),
    row("finetune-validation-both", ft("--val_set_size=0.1", "--val_data_path={data}"),
        r"pass either --val_set_size or --val_data_path"),
    row("finetune-validation-negative", ft("--val_set_size=-2"), r"--val_set_size must be at least 0"),
    row("finetune-validation-too-large", ft("--val_set_size=100", "--data_cache=False"),
        r"--val_set_size=100(\.0)? leaves no training or no validation examples"),
    row("finetune-template-unknown", ft("--template=nope"), r"unknown --template='nope'; use auto, one of"),
    row("finetune-base-model-empty", ft("--base_model="), r"--base_model is required"),
    # 3 records that validate but cannot train, and records that do not validate
    row("finetune-messages-only-system", bad_data,
        r'bad.json: record 1: "messages" holds only a system message; add a user message',
        setup=records('[{"messages": [{"role": "system", "content": "Be brief."}]}]')),
    row("finetune-conversations-only-system", bad_data, r'record 1: "conversations" holds only a system message',
        setup=records('[{"conversations": [{"from": "system", "value": "Be brief."}]}]')),
    row("finetune-messages-no-answer", bad_data, r'record 1: "messages" must alternate user and assistant',
        setup=records('[{"messages": [{"role": "user", "content": "hi"}]}]')),
    row("finetune-output-missing", bad_data, r'bad.json: record 2: "output" is missing',
        setup=records('[{"instruction": "a", "output": "b"}, {"instruction": "a"}]')),
    row("finetune-output-blank", bad_data, r'record 1: "output" is empty',
        setup=records('[{"instruction": "a", "output": " "}]')),
    row("finetune-instruction-number", bad_data, r'"instruction" is a int, not a string',
        setup=records('[{"instruction": 3, "output": "b"}]')),
    row("finetune-empty-file", bad_data, r"found an empty file; wrap the records", setup=records("")),
    row("finetune-empty-list", bad_data, r"holds no records; add some", setup=records("[]")),
    row("finetune-wrong-json", bad_data, r"bad.json: invalid JSON at line 1, column 38",
        setup=records('[{"instruction": "a", "output": "b"},]')),
    row("finetune-wrong-jsonl", ft("--data_path={tmp}/bad.jsonl"), r"bad.jsonl: line 2 is not valid JSON",
        setup=records('{"instruction": "a", "output": "b"}\n{"instruction": ', "bad.jsonl")),
    row("finetune-lone-object", bad_data, r"expected a JSON list of records, found a dict",
        setup=records('{"instruction": "a", "output": "b"}')),
    row("finetune-not-utf8", bad_data, r"bad.json: line 1 is not UTF-8 .*; re-save",
        setup=records(b'[{"instruction": "\xff\xfe", "output": "b"}]')),
    row("finetune-history-half-pair", bad_data, r'"history" must be a list of \[question, answer\]',
        setup=records('[{"instruction": "a", "output": "b", "history": [["one"]]}]')),
    row("finetune-pt-without-text", ft("--data_path={tmp}/bad.json", "--stage=pt"),
        r'record 1: needs a "text" string for --stage pt', setup=records('[{"instruction": "a", "output": "b"}]')),
    row("finetune-dpo-text-file", ft("--stage=dpo", "--data_path={tmp}/pairs.txt"),
        r"--data_path=.*pairs.txt is raw text; --stage=dpo reads preference pairs from .json or .jsonl",
        setup=files({"pairs.txt": "some text"})),
    row("finetune-dpo-sft-record", ft("--stage=dpo", "--data_path={tmp}/bad.json"),
        r'bad.json: record 1: unknown preference layout \(keys: "instruction", "output"\)',
        setup=records('[{"instruction": "a", "output": "b"}]')),
    row("finetune-dpo-labelled-answer", ft("--stage=dpo", "--data_path={tmp}/bad.json"),
        r'record 1: an unpaired answer with a "label" is for KTO; pass --pref_loss=kto',
        setup=records('[{"instruction": "a", "output": "b", "label": true}]')),
    row("finetune-dpo-same-answers", ft("--stage=dpo", "--data_path={tmp}/bad.json"),
        r'record 1: "chosen" and "rejected" are the same answer',
        setup=records('[{"instruction": "a", "chosen": "b", "rejected": "b "}]')),
    row("finetune-kto-label-not-boolean", ft("--stage=dpo", "--pref_loss=kto", "--data_path={tmp}/bad.json"),
        r'record 1: "label" is "yes", not true or false',
        setup=records('[{"instruction": "a", "output": "b", "label": "yes"}]')),
    row("finetune-bad-validation-record", ft("--val_data_path={tmp}/val.json", "--data_cache=False"),
        r'val.json: record 1: "output" is missing', setup=records('[{"instruction": "a"}]', "val.json")),
    row("finetune-data-missing", ft("--data_path={tmp}/missing.json"),
        r"missing.json does not exist; pass --data_path"),
    row("finetune-data-folder-without-data", ft("--data_path={tmp}/shards"), r"shards holds no .json/.jsonl files",
        setup=files({"shards/notes.md": "x"})),
    row("finetune-all-records-truncated", ft("--cutoff_len=1", "--data_cache=False"),
        r"were dropped.*raise --cutoff_len"),
    # 4 output locations
    row("finetune-output-is-a-file", ft(), r"--output_dir=.*/out is a file, not a folder", setup=files({"out": "x"})),
    row("finetune-output-under-a-file", ft("--output_dir={tmp}/out/run"), r"lies under .*/out, which is a file",
        setup=files({"out": "x"})),
    row("finetune-output-unwritable", ft("--output_dir={tmp}/locked/out"), r"locked is not writable",
        setup=locked_folder, marks=needs_non_root),
    row("finetune-output-holds-a-run", ft(), r"already holds a run; pass --resume_from_checkpoint=True",
        setup=files({"out/adapter_config.json": "{}"})),
    row("finetune-output-holds-a-checkpoint", ft(), r"already holds a run.*--overwrite_output_dir=True",
        setup=checkpoint("out/checkpoint-4", "{}")),
    row("finetune-output-empty", ft("--output_dir="), r"--output_dir is required"),
    # 5 corrupt inputs: checkpoints to resume from
    row("finetune-resume-not-a-checkpoint", ft("--resume_from_checkpoint={tmp}/notes"),
        r"notes is not a complete checkpoint \(it lacks adapter_model.safetensors",
        setup=files({"notes/readme.txt": "x"})),
    row("finetune-resume-half-written", ft("--resume_from_checkpoint={tmp}/out/checkpoint-2"),
        r"checkpoint-2/trainer_state.json is cut short or unreadable", setup=checkpoint()),
    row("finetune-resume-missing", ft("--resume_from_checkpoint={tmp}/nowhere"), r"nowhere is not a folder"),
    row("finetune-resume-latest-of-nothing", ft("--resume_from_checkpoint=True"),
        r"holds no complete checkpoint-N folder; pass a checkpoint"),
    row("finetune-resume-latest-cut-short", ft("--resume_from_checkpoint=True"), r"\(checkpoint-2 was cut short\)",
        setup=checkpoint()),
    row("finetune-resume-number", ft("--resume_from_checkpoint=3"),
        r"--resume_from_checkpoint must be a checkpoint folder or True"),
    # 6 the environment
    row("finetune-cache-is-a-file", ft(), r"cache", setup=files({"cache": "x"})),
    # 7 messages name the script's own flags and the fix
    row("finetune-base-model-missing", ft("--base_model=nowhere"),
        r"--base_model='nowhere' is not an existing folder .*--base_model=builtin"),
    row("finetune-base-model-without-config", ft("--base_model={tmp}/empty"),
        r"empty has no config.json; --base_model needs", setup=files({"empty/notes.txt": "x"})),
    row("finetune-base-model-truncated", ft("--base_model={tmp}/model"), r"model.safetensors",
        setup=copied_model(cut="model.safetensors")),
    # 10 a model that ships its own code
    row("finetune-remote-code", ft("--base_model={remote}"),
        r"ships its own model code \(modeling_pack.py\).*--trust_remote_code=True"),
]


@pytest.mark.parametrize("setup,args,message", FINETUNE)
def test_finetune(setup, args, message, request, tmp_path, monkeypatch, capfd):
    check("finetune.py", setup, args, message, request, tmp_path, monkeypatch, capfd)


# --- merge_lora.py --------------------------------------------------------------------------------------------------

mg = with_defaults(["--lora_model={adapter}", "--output_dir={tmp}/merged", "--no_verify"])
damaged = mg("--lora_model={tmp}/damaged")
NO_BASE = '{"peft_type": "LORA", "base_model_name_or_path": "/nowhere/base"}'
MERGE = [
    # 1
    row("merge-typo", mg("--lora_modle={adapter}"),
        r"--lora_modle is not a flag of this script \(did you mean --lora_model\?\)"),
    row("merge-verify-for-no-verify", mg("--verify=False"),
        r"--verify is not a flag of this script \(did you mean --no_verify\?\)"),
    row("merge-old-and-new-name", mg("--overwrite", "--overwrite_output_dir"),
        r"pass either --overwrite_output_dir or its older name"),
    # 2
    row("merge-precision", mg("--precision=int4"), r"--precision must be one of auto, bf16, fp16, fp32, got 'int4'"),
    row("merge-no-verify-maybe", mg("--no_verify=maybe"), r"--no_verify must be True or False, got 'maybe'"),
    row("merge-qlora-base-maybe", mg("--qlora_base=maybe"), r"--qlora_base must be True or False"),
    row("merge-allow-pickle-2", mg("--allow_pickle=2"), r"--allow_pickle must be True or False"),
    row("merge-trust-remote-code-maybe", mg("--trust_remote_code=maybe"), r"--trust_remote_code must be True or False"),
    row("merge-lora-model-missing", ["--output_dir={tmp}/merged"],
        r"--lora_model is required, e.g. --lora_model=output/"),
    row("merge-output-missing", ["--lora_model={adapter}"], r"--output_dir is required"),
    # 4
    row("merge-output-is-a-file", mg(), r"--output_dir=.*/merged is a file", setup=files({"merged": "x"})),
    row("merge-output-under-a-file", mg("--output_dir={tmp}/merged/sub"), r"lies under .*/merged, which is a file",
        setup=files({"merged": "x"})),
    row("merge-output-unwritable", mg("--output_dir={tmp}/locked/merged"), r"locked is not writable",
        setup=locked_folder, marks=needs_non_root),
    row("merge-output-not-empty", mg(), r"merged already exists and is not empty; pass --overwrite_output_dir=True",
        setup=files({"merged/x": "x"})),
    row("merge-output-is-the-adapter",
        mg("--lora_model={tmp}/damaged", "--output_dir={tmp}/damaged", "--overwrite_output_dir"),
        r"would replace --lora_model", setup=damaged_adapter()),
    # 5
    row("merge-adapter-truncated", damaged, r"adapter_model.safetensors is damaged or cut short \(.*\); train again",
        setup=damaged_adapter("adapter_model.safetensors")),
    row("merge-adapter-config-json", damaged,
        r"adapter_config.json is not readable JSON \(.*\); restore it, or train again",
        setup=damaged_adapter("adapter_config.json", '{"r": 8, ')),
    row("merge-adapter-config-list", damaged, r"adapter_config.json holds a list, not a PEFT adapter config",
        setup=damaged_adapter("adapter_config.json", "[1, 2]")),
    row("merge-run-config-json", damaged,
        r"run_config.json is not readable JSON \(.*\); restore it from the run, or delete it",
        setup=damaged_adapter("run_config.json", "{not json")),
    row("merge-run-config-list", damaged, r"run_config.json holds a list, not a run config",
        setup=damaged_adapter("run_config.json", "[]")),
    row("merge-adapter-missing", mg("--lora_model={tmp}/nowhere"),
        r"nowhere is not a folder; pass a finetune.py output folder"),
    row("merge-not-an-adapter", mg("--lora_model={tmp}/empty"), r"holds no adapter_config.json",
        setup=files({"empty/notes.txt": "x"})),
    row("merge-recorded-base-missing", damaged, r"--base_model='/nowhere/base' is not an existing",
        setup=damaged_adapter("adapter_config.json", NO_BASE)),
    row("merge-base-without-config", mg("--base_model={tmp}/empty"), r"empty has no config.json; --base_model needs",
        setup=files({"empty/notes.txt": "x"})),
    row("merge-base-truncated", mg("--base_model={tmp}/model"), r"model.safetensors",
        setup=copied_model(cut="model.safetensors")),
    # 10
    row("merge-remote-code", mg("--base_model={remote}"), r"ships its own model code .*--trust_remote_code=True"),
]


@pytest.mark.parametrize("setup,args,message", MERGE)
def test_merge_lora(setup, args, message, request, tmp_path, monkeypatch, capfd):
    check("merge_lora.py", setup, args, message, request, tmp_path, monkeypatch, capfd)


# --- cli_demo.py ----------------------------------------------------------------------------------------------------

cd = with_defaults(["--model_path={tiny}", "--prompt=hi", "--max_new_tokens=1", "--precision=fp32"])
cd_adapter = with_defaults(["--lora_model={tmp}/damaged", "--prompt=hi", "--max_new_tokens=1", "--precision=fp32"])
CLI_DEMO = [
    # 1
    row("cli_demo-typo", cd("--temprature=0"),
        r"--temprature is not a flag of this script \(did you mean --temperature\?\)"),
    row("cli_demo-old-and-new-name", cd("--load_8bit", "--use_8bit"),
        r"pass either --use_8bit or its older name --load_8bit"),
    row("cli_demo-one-dash-typo", cd("-temprature=0"), r"temprature.* not a flag"),
    # 2
    row("cli_demo-temperature-hot", cd("--temperature=hot"), r"--temperature must be a number"),
    row("cli_demo-top-p", cd("--top_p=1.5"), r"--top_p must be from 0 to 1, got 1.5"),
    row("cli_demo-top-k", cd("--top_k=-1"), r"--top_k must be at least 0"),
    row("cli_demo-max-new-tokens", cd("--max_new_tokens=0"), r"--max_new_tokens must be at least 1"),
    row("cli_demo-penalty", cd("--repetition_penalty=0"), r"--repetition_penalty must be above 0"),
    row("cli_demo-ngram", cd("--no_repeat_ngram_size=-1"), r"--no_repeat_ngram_size must be at least 0"),
    row("cli_demo-do-sample", cd("--do_sample=maybe"), r"--do_sample must be True or False"),
    row("cli_demo-seed", cd("--seed=abc"), r"--seed must be an integer"),
    row("cli_demo-num-gpus", cd("--num_gpus=0"), r"--num_gpus must be at least 1"),
    row("cli_demo-max-context", cd("--max_context=8"), r"--max_context must be at least 16"),
    row("cli_demo-precision", cd("--precision=fp8"), r"--precision must be one of auto, bf16, fp16, fp32"),
    row("cli_demo-8bit-and-4bit", cd("--load_8bit", "--load_4bit"), r"--use_8bit and --use_4bit exclude each other"),
    row("cli_demo-model-and-adapter", cd("--lora_model={adapter}"),
        r"--model_path and --lora_model exclude each other"),
    row("cli_demo-template-disagree", cd("--template=alpaca", "--input_pattern=prompt"), r"disagree; pass only one"),
    row("cli_demo-template-unknown", cd("--template=nope"), r"unknown --template='nope'"),
    row("cli_demo-no-stream", cd("--no_stream=maybe"), r"--no_stream must be True or False"),
    # 3 an empty question
    row("cli_demo-prompt-blank", cd("--prompt=   "), r"the question is empty; pass --prompt="),
    # 5
    row("cli_demo-adapter-truncated", cd_adapter(), r"adapter_model.safetensors is damaged or cut short",
        setup=damaged_adapter("adapter_model.safetensors")),
    row("cli_demo-adapter-config-json", cd_adapter(), r"adapter_config.json is not readable JSON",
        setup=damaged_adapter("adapter_config.json", '{"r": 8, ')),
    row("cli_demo-run-config-json", cd_adapter(), r"run_config.json is not readable JSON",
        setup=damaged_adapter("run_config.json", "{not json")),
    row("cli_demo-adapter-missing", cd_adapter("--lora_model={tmp}/nowhere"),
        r"--lora_model=.*nowhere is not a folder"),
    row("cli_demo-model-truncated", cd("--model_path={tmp}/model"), r"model.safetensors",
        setup=copied_model(cut="model.safetensors")),
    # 6 the environment: no question and no stdin
    row("cli_demo-stdin-closed", ["--model_path={tiny}"], r"standard input is closed; pass the question with --prompt=",
        setup=stdin_closed),
    row("cli_demo-stdin-empty", ["--model_path={tiny}"], r"the question is empty; pass --prompt="),
    row("cli_demo-cache-is-a-file", ["--prompt=hi"], r"cache", setup=files({"cache": "x"})),
    # 7
    row("cli_demo-model-path-missing", cd("--model_path=nowhere"),
        r"--model_path='nowhere' is not an existing folder .*--model_path=builtin"),
    row("cli_demo-recorded-base-missing", cd_adapter(), r"--base_model='/nowhere/base' is not an existing",
        setup=damaged_adapter("adapter_config.json", NO_BASE)),
    # 10
    row("cli_demo-remote-code", cd("--model_path={remote}"), r"ships its own model code .*--trust_remote_code=True"),
]


@pytest.mark.parametrize("setup,args,message", CLI_DEMO)
def test_cli_demo(setup, args, message, request, tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(sys, "stdin", sys.stdin)  # a row closes it
    check("cli_demo.py", setup, args, message, request, tmp_path, monkeypatch, capfd)


# --- gradio_ui.py ---------------------------------------------------------------------------------------------------

def port_taken(tmp, places):
    """{port}: a loopback port another program listens on for the rest of the test."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    places.request.addfinalizer(taken.close)
    places["port"] = str(taken.getsockname()[1])


gr = with_defaults(["--model_path={tiny}", "--precision=fp32"])
gr_adapter = with_defaults(["--lora_model={tmp}/damaged", "--precision=fp32"])
GRADIO = [
    # 1
    row("gradio-typo", gr("--sever_name=0.0.0.0"),
        r"--sever_name is not a flag of this script \(did you mean --server_name\?\)"),
    row("gradio-two-typos", gr("--concurency=4", "--port=8080"), r"did you mean --concurrency\?.*--port is not a flag"),
    row("gradio-old-and-new-name", gr("--dtype=fp32", "--precision=fp32"),
        r"pass either --precision or its older name --dtype"),
    # 2
    row("gradio-port-0", gr("--server_port=0"), r"--server_port must be from 1 to 65535, got 0"),
    row("gradio-port-too-high", gr("--server_port=70000"), r"--server_port must be from 1 to 65535"),
    row("gradio-port-abc", gr("--server_port=abc"), r"--server_port must be an integer"),
    row("gradio-concurrency-0", gr("--concurrency=0"), r"--concurrency must be at least 1"),
    row("gradio-share-maybe", gr("--share=maybe"), r"--share must be True or False"),
    row("gradio-auth-no-password", gr("--auth=alice"), r"--auth must hold user:password entries"),
    row("gradio-auth-no-user", gr("--auth=:secret"), r"--auth must hold user:password entries"),
    row("gradio-auth-file-bad-line", gr("--auth={tmp}/logins.txt"), r"logins.txt must hold user:password entries",
        setup=files({"logins.txt": "alice:secret\nbob\n"})),
    row("gradio-server-name-empty", gr("--server_name="), r"--server_name is required"),
    row("gradio-temperature", gr("--temperature=-1"), r"--temperature must be at least 0"),
    row("gradio-top-k", gr("--top_k=abc"), r"--top_k must be an integer"),
    row("gradio-max-context", gr("--max_context=8"), r"--max_context must be at least 16"),
    row("gradio-8bit-and-4bit", gr("--use_8bit", "--use_4bit"), r"--use_8bit and --use_4bit exclude each other"),
    row("gradio-model-and-adapter", gr("--lora_model={adapter}"), r"--model_path and --lora_model exclude each other"),
    row("gradio-template-unknown", gr("--template=nope"), r"unknown --template='nope'"),
    row("gradio-compare-without-adapter", gr("--compare"), r"--compare .* needs --lora_model \(a finetune.py output"),
    # 5
    row("gradio-model-truncated", gr("--model_path={tmp}/model"), r"model.safetensors",
        setup=copied_model(cut="model.safetensors")),
    row("gradio-adapter-truncated", gr_adapter(), r"adapter_model.safetensors is damaged or cut short",
        setup=damaged_adapter("adapter_model.safetensors")),
    row("gradio-run-config-list", gr_adapter(), r"run_config.json holds a list",
        setup=damaged_adapter("run_config.json", "[]")),
    # 6 the environment: a port in use, an address that does not resolve
    row("gradio-port-in-use", gr("--server_port={port}"),
        r"cannot listen on 127.0.0.1:\d+ \(Address already in use\); pass", setup=port_taken),
    row("gradio-server-name-unknown", gr("--server_name=no-such-host.invalid", "--server_port=7860"),
        r"cannot listen on no-such-host.invalid"),
    row("gradio-server-name-unknown-no-port", gr("--server_name=no-such-host.invalid"), r"no-such-host.invalid"),
    # 7
    row("gradio-model-missing", gr("--model_path=nowhere"), r"--model_path='nowhere' is not an existing folder"),
    # 10
    row("gradio-remote-code", gr("--model_path={remote}"), r"ships its own model code .*--trust_remote_code=True"),
]


@pytest.mark.parametrize("setup,args,message", GRADIO)
def test_gradio_ui(setup, args, message, request, tmp_path, monkeypatch, capfd):
    import gradio_ui

    def no_page(*args, **kwargs):
        raise RuntimeError("main went on to build and serve the page")

    monkeypatch.setattr(gradio_ui, "build_demo", no_page)  # a row that gets this far must not block on a server
    check("gradio_ui.py", setup, args, message, request, tmp_path, monkeypatch, capfd)


# --- evaluate.py ----------------------------------------------------------------------------------------------------

QUESTIONS = ",Question,A,B,C,D,Answer\n0,2 + 3 =,4,6,7,5,D\n1,中国的首都是,上海,广州,北京,深圳,C\n"
cmmlu = files({"cmmlu/dev/anatomy.csv": QUESTIONS, "cmmlu/test/anatomy.csv": QUESTIONS})


def scored_csv(text):
    return files({"cmmlu/test/anatomy.csv": text})


def no_dev(tmp, places):
    shutil.rmtree(tmp / "cmmlu" / "dev")


def empty_dev(tmp, places):
    (tmp / "cmmlu" / "dev" / "anatomy.csv").unlink()


dev_of_another_subject = also(empty_dev, files({"cmmlu/dev/virology.csv": QUESTIONS}))
ev = with_defaults(["--model_path={tiny}", "--data_dir={tmp}/cmmlu", "--output_dir={tmp}/results", "--precision=fp32"])
EVALUATE = [
    # 1
    row("evaluate-typo", ev("--fewshot=5"), r"--fewshot is not a flag of this script \(did you mean --few_shot\?\)"),
    row("evaluate-subject-for-subjects", ev("--subject=anatomy"), r"did you mean --subjects\?"),
    row("evaluate-old-and-new-name", ev("--dtype=fp32", "--precision=fp32"),
        r"pass either --precision or its older name --dtype"),
    # 2
    row("evaluate-limit-negative", ev("--limit=-1"), r"--limit must be at least 1, got -1"),
    row("evaluate-limit-0", ev("--limit=0"), r"--limit must be at least 1, got 0"),
    row("evaluate-few-shot-negative", ev("--few_shot=-1"), r"--few_shot must be at least 0"),
    row("evaluate-few-shot-word", ev("--few_shot=five"), r"--few_shot must be an integer \(at least 0\), got 'five'"),
    row("evaluate-method", ev("--method=mc"), r"--method must be one of letter, cloze, got 'mc'"),
    row("evaluate-batch-size", ev("--batch_size=0"), r"--batch_size must be at least 1"),
    row("evaluate-max-length", ev("--max_length=8"), r"--max_length must be at least 16"),
    row("evaluate-precision", ev("--precision=fp8"), r"--precision must be one of auto"),
    row("evaluate-local-maybe", ev("--local_files_only=maybe"), r"--local_files_only must be True or False"),
    row("evaluate-subjects-3", ev("--subjects=3"), r"--subjects must be a comma-separated list of names, got 3"),
    row("evaluate-model-and-adapter", ev("--lora_model={adapter}"),
        r"--model_path and --lora_model exclude each other"),
    row("evaluate-data-dir-empty", ev("--data_dir="), r"--data_dir is required, e.g. --data_dir=path/to/cmmlu"),
    row("evaluate-data-dir-missing", ev("--data_dir={tmp}/nowhere"),
        r"--data_dir=.*nowhere is not a folder; pass an unpacked"),
    row("evaluate-split-missing", ev("--split=train"), r"cmmlu/train does not exist; .*pass --split="),
    # 3 and 5 data files that cannot be scored
    row("evaluate-csv-not-utf8", ev(), r"anatomy.csv is not UTF-8 \(byte 0x\w\w at offset \d+\); re-save it as UTF-8",
        setup=scored_csv(",Question,A,B,C,D,Answer\n0,测试,a,b,c,d,A\n".encode("gbk"))),
    row("evaluate-csv-empty", ev(), r"anatomy.csv is empty", setup=scored_csv("")),
    row("evaluate-csv-column", ev(), r"lacks the column\(s\) d",
        setup=scored_csv(",Question,A,B,C,Answer\n0,q,a,b,c,A\n")),
    row("evaluate-csv-answer", ev(), r"row 2 has the answer 'E', which is not one of",
        setup=scored_csv(",Question,A,B,C,D,Answer\n0,q,a,b,c,d,E\n")),
    row("evaluate-csv-no-rows", ev(), r"holds a header but no questions",
        setup=scored_csv(",Question,A,B,C,D,Answer\n")),
    row("evaluate-csv-short-row", ev(), r"row 2 has 4 fields but the header has 7",
        setup=scored_csv(",Question,A,B,C,D,Answer\n0,q,a,b\n")),
    row("evaluate-dev-without-answers", ev("--few_shot=1"),
        r"dev/anatomy.csv has no answer column; few-shot examples need answers",
        setup=files({"cmmlu/dev/anatomy.csv": ",Question,A,B,C,D\n0,q,a,b,c,d\n"})),
    row("evaluate-subject-mapping-json", ev(), r"subject_mapping.json is not readable JSON \(.*\); fix it",
        setup=files({"cmmlu/subject_mapping.json": '{"anatomy": ["Anatomy", "解剖学"'})),
    row("evaluate-subject-mapping-list", ev(), r"subject_mapping.json holds a list, not a subject table",
        setup=files({"cmmlu/subject_mapping.json": "[]"})),
    row("evaluate-model-truncated", ev("--model_path={tmp}/model"), r"model.safetensors",
        setup=copied_model(cut="model.safetensors")),
    row("evaluate-adapter-truncated", ["--lora_model={tmp}/damaged", "--data_dir={tmp}/cmmlu"],
        r"adapter_model.safetensors is damaged or cut short", setup=damaged_adapter("adapter_model.safetensors")),
    # 4
    row("evaluate-output-is-a-file", ev(), r"--output_dir=.*/results is a file, not a folder",
        setup=files({"results": "x"})),
    row("evaluate-output-under-a-file", ev("--output_dir={tmp}/results/sub"), r"lies under .*/results, which is a file",
        setup=files({"results": "x"})),
    row("evaluate-output-unwritable", ev("--output_dir={tmp}/locked/results"), r"locked is not writable",
        setup=locked_folder, marks=needs_non_root),
    # 7 the fix names the script's own flags
    row("evaluate-few-shot-without-dev", ev("--few_shot=5"),
        r"cmmlu/dev does not exist: .*; add it, or pass --few_shot=0", setup=no_dev),
    row("evaluate-few-shot-empty-dev", ev("--few_shot=5"), r"--few_shot=0", setup=empty_dev),
    row("evaluate-few-shot-without-dev-file", ev("--few_shot=5"),
        r"has no file for anatomy; --few_shot needs solved dev examples, or pass --few_shot=0",
        setup=dev_of_another_subject),
    row("evaluate-subject-unknown", ev("--subjects=anatomy,virology"),
        r"no test file for subject\(s\) virology .*; it has anatomy"),
    row("evaluate-model-missing", ev("--model_path=nowhere"), r"--model_path='nowhere' is not an existing folder"),
    # 10
    row("evaluate-remote-code", ev("--model_path={remote}"), r"ships its own model code .*--trust_remote_code=True"),
]


@pytest.mark.parametrize("setup,args,message", EVALUATE)
def test_evaluate(setup, args, message, request, tmp_path, monkeypatch, capfd):
    check("evaluate.py", also(cmmlu, setup), args, message, request, tmp_path, monkeypatch, capfd)


# --- export_gguf.py -------------------------------------------------------------------------------------------------

ex = with_defaults(["--model_path={tiny}", "--output={tmp}/exports/tiny.gguf"])


def edited_model(**config):
    """A copy of the tiny model at {tmp}/model, its config.json updated with `config`."""
    def setup(tmp, places):
        import json

        shutil.copytree(places["tiny"], tmp / "model")
        path = tmp / "model" / "config.json"
        path.write_text(json.dumps(json.loads(path.read_text()) | config))
    return setup


def adapter_without_lora(tmp, places):
    """A copy of the adapter at {tmp}/damaged whose (whole) weights file holds no lora_ tensor."""
    import torch
    from safetensors.torch import save_file

    shutil.copytree(places["adapter"], tmp / "damaged")
    weights = tmp / "damaged" / "adapter_model.safetensors"
    save_file({"base_model.model.model.norm.weight": torch.ones(64)}, str(weights))


EXPORT = [
    # 1
    row("export-typo", ex("--out_type=q8_0"), r"--out_type is not a flag of this script \(did you mean --outtype\?\)"),
    row("export-old-and-new-name", ex("--output_dir={tmp}/exports"),
        r"pass either --output or its older name --output_dir"),
    # 2
    row("export-outtype-unknown-quant", ex("--outtype=q3_k_s"),
        r"--outtype='q3_k_s' is not one of f32, f16, bf16, q8_0, q4_k_m, q5_k_m, q6_k, q4_0; pass one of them"),
    row("export-outtype-number", ex("--outtype=3"), r"--outtype='3' is not one of"),
    row("export-modelfile-maybe", ex("--modelfile=maybe"), r"--modelfile must be True or False"),
    row("export-local-maybe", ex("--local_files_only=maybe"), r"--local_files_only must be True or False"),
    row("export-trust-maybe", ex("--trust_remote_code=maybe"), r"--trust_remote_code must be True or False"),
    row("export-lora-kquant", ex("--lora_model={adapter}", "--outtype=q4_k_m"),
        r"--outtype=q4_k_m quantizes a whole model; a GGUF LoRA file is f32, f16, bf16 or q8_0"),
    # 4
    row("export-output-is-a-file", ex("--output={tmp}/exports"), r"--output=.*/exports is a file, not a folder",
        setup=files({"exports": "x"})),
    row("export-output-under-a-file", ex(), r"--output=.*exports is a file", setup=files({"exports": "x"})),
    row("export-output-unwritable", ex("--output={tmp}/locked/tiny.gguf"), r"locked is not writable",
        setup=locked_folder, marks=needs_non_root),
    # 5
    row("export-adapter-folder", ex("--model_path={tmp}/damaged"), r"is a LoRA adapter folder; merge it first",
        setup=damaged_adapter()),
    row("export-adapter-truncated", ex("--model_path={tmp}/damaged"), r"is a LoRA adapter folder; merge it first",
        setup=damaged_adapter("adapter_model.safetensors")),
    row("export-model-truncated", ex("--model_path={tmp}/model"),
        r"model.safetensors is damaged or cut short \(.*\); copy or download --model_path again \(a merged model: "
        r"merge again\)", setup=copied_model(cut="model.safetensors")),
    row("export-default-output-model-truncated", ["--model_path={tmp}/model"], r"model.safetensors is damaged",
        setup=copied_model(cut="model.safetensors")),
    row("export-weights-missing", ex("--model_path={tmp}/model"),
        r"model has no model.safetensors \(or its shards\); export needs safetensors weights",
        setup=copied_model(remove="model.safetensors")),
    row("export-model-without-config", ex("--model_path={tmp}/empty"), r"empty has no config.json; --model_path needs",
        setup=files({"empty/notes.txt": "x"})),
    row("export-unsupported-architecture", ex("--model_path={tmp}/model"),
        r"model/config.json has model_type 'phi3'; this exporter writes llama, mistral, qwen2 models only: use "
        r"llama.cpp's convert_hf_to_gguf.py", setup=edited_model(model_type="phi3", architectures=["Phi3ForCausalLM"])),
    row("export-lora-without-lora-weights", ex("--lora_model={tmp}/damaged"),
        r"adapter_model.safetensors holds no lora_ weights \(an empty adapter\); pass a trained adapter folder",
        setup=adapter_without_lora),
    row("export-lora-truncated", ex("--lora_model={tmp}/damaged"),
        r"adapter_model.safetensors is damaged or cut short \(.*\); train again",
        setup=damaged_adapter("adapter_model.safetensors")),
    # 7 export takes no --base_model: its messages never name one
    row("export-model-path-missing", ex("--model_path=nowhere"),
        r"--model_path='nowhere' is not an existing folder .*--model_path=builtin"),
    # 10
    row("export-remote-code", ex("--model_path={remote}"), r"ships its own model code .*--trust_remote_code=True"),
]


@pytest.mark.parametrize("setup,args,message", EXPORT)
def test_export_gguf(setup, args, message, request, tmp_path, monkeypatch, capfd):
    check("export_gguf.py", setup, args, message, request, tmp_path, monkeypatch, capfd)


def test_every_subprocess_row_exists():
    ids = {param.id for table in (FINETUNE, MERGE, CLI_DEMO, GRADIO, EVALUATE, EXPORT) for param in table}
    assert SUBPROCESS <= ids and {script.split("-")[0] for script in SUBPROCESS} == {
        "finetune", "merge", "cli_demo", "gradio", "evaluate", "export"}


# --- a typo costs nothing: refused before any data is read or any model loads ----------------------------------------

WORK = ("resolve_model_path", "download_model_folder", "load_tokenizer", "load_config", "load_model",
        "load_for_inference", "data_files", "tokenized", "find_adapter", "merge", "subject_files", "read_questions",
        "weight_files")
GOOD = {"finetune.py": ft(), "merge_lora.py": mg(), "cli_demo.py": cd(), "gradio_ui.py": gr(), "evaluate.py": ev(),
        "export_gguf.py": ex()}
TYPO = {"finetune.py": ("--lora_rank=16", "lora_r"), "merge_lora.py": ("--precison=bf16", "precision"),
        "cli_demo.py": ("--temprature=0", "temperature"), "gradio_ui.py": ("--sever_name=0.0.0.0", "server_name"),
        "evaluate.py": ("--fewshot=5", "few_shot"), "export_gguf.py": ("--out_type=q8_0", "outtype")}


@pytest.mark.parametrize("script", sorted(GOOD))
def test_a_typo_is_refused_before_any_work(script, request, tmp_path, monkeypatch, capfd):
    """Every function that reads data or loads a model raises when called. Without the typo main calls one of
    them (so they are what it uses); with the typo none is called, and the run ends with the typo's one line."""
    import utils.core.run_folder
    import utils.data.preference
    import utils.data.records
    import utils.data.token_store
    import utils.eval.ceval_cmmlu
    import utils.export.merge
    import utils.model.loading
    import utils.train.setup

    places = Places(tmp_path, request)
    also(cmmlu)(tmp_path, places)
    argv = [arg.format_map(places) for arg in GOOD[script]]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LORA_KIT_CACHE", str(tmp_path / "cache"))
    called = []

    def refuse(name):
        def work(*args, **kwargs):
            called.append(name)
            raise AssertionError(f"{name} was called")
        return work

    module = importlib.import_module(script[:-3])
    # every module that imports a WORK name at its top holds its own binding, so each is patched
    owners = (module, utils.model.loading, utils.export.merge, utils.data.records, utils.core.run_folder,
              utils.eval.ceval_cmmlu, utils.data.token_store, utils.data.preference, utils.train.setup)
    for owner in owners:
        for name in WORK:
            if callable(getattr(owner, name, None)):
                monkeypatch.setattr(owner, name, refuse(name))

    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(AssertionError, match="was called"):
        run_cli(module.main, cli_aliases(script))
    assert called, "main did no work the test can see"
    called.clear()
    capfd.readouterr()

    typo, meant = TYPO[script]
    monkeypatch.setattr(sys, "argv", [script, *argv, typo])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(module.main, cli_aliases(script))
    out, err = capfd.readouterr()
    assert exit_info.value.code == 2 and called == [] and out == ""
    assert err.splitlines() == [f"error: {typo.split('=')[0]} is not a flag of this script (did you mean --{meant}?); "
                                "run with --help for every flag."]
