"""Fixtures: the built-in SmolLM2 (converted once per machine) and a tiny LLaMA that shares its tokenizer."""
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"

RECORDS = [
    {"instruction": "who are you?", "input": "", "output": "I am Lumi."},
    {"instruction": "Translate to English", "input": "你好", "output": "Hello"},
    {"instruction": "And now?", "output": "Still Lumi.", "history": [["Hi", "Hello!"], ["Name?", "Lumi."]]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}]},
    {"conversations": [{"from": "human", "value": "Capital of France?"}, {"from": "gpt", "value": "Paris."}]},
    {"instruction": "写一句诗", "input": "", "output": "床前明月光。"},
] * 3


@pytest.fixture(scope="session", autouse=True)
def temporary_files_in_pytest_folder(tmp_path_factory):
    """Temporary files of this run, its launched processes' too (torchrun leaves a torchelastic_* folder behind),
    go under pytest's own folder, which pytest prunes, instead of piling up in /tmp."""
    before = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(tmp_path_factory.mktemp("tmp"))
    yield
    if before is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = before


@pytest.fixture(scope="session")
def smollm2_dir():
    from utils.model.builtin import builtin_path

    return builtin_path()


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    from utils.model.loading import load_tokenizer

    return load_tokenizer(smollm2_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_dir, tokenizer):
    """A 2-layer, hidden-64 LLaMA with SmolLM2's tokenizer and chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def remote_model_dir(tmp_path_factory, tokenizer):
    """tests/remote_code_model.py (a tiny Baichuan-like model) saved as a model folder whose config.json maps the
    auto classes to it: a model that ships its own code."""
    import importlib.util
    import shutil

    import torch

    folder = tmp_path_factory.mktemp("packlm")
    shutil.copy(ROOT / "tests" / "remote_code_model.py", folder / "modeling_pack.py")
    spec = importlib.util.spec_from_file_location("modeling_pack_fixture", folder / "modeling_pack.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.PackConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config.auto_map = {"AutoConfig": "modeling_pack.PackConfig",
                       "AutoModelForCausalLM": "modeling_pack.PackForCausalLM"}
    torch.manual_seed(0)
    module.PackForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def damaged_copy(source, folder, name, how="truncate"):
    """A copy of the folder `source` at `folder`, its file `name` cut to half its size (how="truncate") or replaced
    by the text `how`."""
    import shutil

    shutil.copytree(source, folder)
    path = folder / name
    if how == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_text(how, encoding="utf-8")
    return folder


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(RECORDS, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.fixture
def finetune(tiny_model_dir, data_file, tmp_path):
    """Call finetune.main in-process with fast settings on the tiny model; keyword arguments override."""
    sys.path.insert(0, str(ROOT))
    import finetune as script

    def run(**overrides):
        kwargs = dict(base_model=str(tiny_model_dir), data_path=str(data_file), output_dir=str(tmp_path / "out"),
                      max_steps=2, per_device_train_batch_size=4, logging_steps=1, save_steps=2, cutoff_len=128,
                      precision="fp32", learning_rate=1e-3, report=False)
        kwargs.update(overrides)
        return script.main(**kwargs)

    return run


def chat_messages(system, turns):
    """OpenAI messages of a conversation: the system text (if any), then each (user, answer) turn; an answer of
    None leaves the conversation ending on the user's turn."""
    messages = [{"role": "system", "content": system}] if system else []
    for user, answer in turns:
        messages.append({"role": "user", "content": user})
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
    return messages
