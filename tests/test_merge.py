"""merge_lora.py: merged logits equal PeftModel's, atomic writes, every bad input, a real finetune.py adapter."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT

from utils.core.errors import UserError

sys.path.insert(0, str(ROOT))
import merge_lora  # noqa: E402

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = torch.tensor([[1, 17, 400, 9051, 23, 7, 3021, 88, 5, 12000, 640, 31]])


def tiny_llama(path, tokenizer, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(**{**dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id),
                            **overrides})
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory, tokenizer):
    return tiny_llama(tmp_path_factory.mktemp("tied"), tokenizer, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("sharded")
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(path, max_shard_size="2MB")
    assert len(list(path.glob("*.safetensors"))) > 2
    return path


@pytest.fixture(scope="module")
def bin_dir(tmp_path_factory, tiny_model_dir):
    from safetensors.torch import load_file

    # the older layout: pytorch_model.bin (transformers 5 no longer writes it)
    path = tmp_path_factory.mktemp("pickled-base")
    torch.save(load_file(str(tiny_model_dir / "model.safetensors")), path / "pytorch_model.bin")
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, path)
    assert (path / "pytorch_model.bin").is_file() and not list(path.glob("*.safetensors"))
    return path


def make_adapter(base_dir, out, resize=0, safe=True, **lora):
    """A PEFT adapter on base_dir with random (non-zero) B, DoRA magnitudes and modules_to_save weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(2)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    if resize:
        model.resize_token_embeddings(model.config.vocab_size + resize)
    model = get_peft_model(model, LoraConfig(**{"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, **lora}))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name or "modules_to_save" in name or "magnitude" in name:
                param.add_(torch.randn_like(param) * 0.2)
    model.save_pretrained(out, safe_serialization=safe)
    return out


def logits(model):
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def peft_logits(base_dir, adapter, resize=0):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    plain = logits(model)
    if resize:
        model.resize_token_embeddings(model.config.vocab_size + resize)
    return logits(PeftModel.from_pretrained(model, adapter)), plain


def merged_logits(folder):
    from transformers import AutoModelForCausalLM

    return logits(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32))


CASES = {
    "attention": dict(target_modules=["q_proj", "v_proj"]),
    "all_and_modules_to_save": dict(target_modules=ALL, modules_to_save=["embed_tokens", "lm_head"]),
    "rslora": dict(target_modules=ALL, use_rslora=True, r=8, lora_alpha=4),
    "patterns": dict(target_modules=ALL, rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 6},
                     alpha_pattern={"v_proj": 32}),
    "dora": dict(target_modules=["q_proj", "down_proj"], use_dora=True),
    "lora_on_embeddings": dict(target_modules=["embed_tokens", "q_proj"]),
    "tied_lora_on_lm_head": dict(base="tied", target_modules=["q_proj", "lm_head"]),
    "tied_modules_to_save": dict(base="tied", target_modules=["k_proj"], modules_to_save=["lm_head"]),
    "sharded_base": dict(base="sharded", target_modules=ALL),
    "bin_adapter": dict(target_modules=["q_proj", "v_proj"], safe=False),
    "bin_base": dict(base="bin", target_modules=["q_proj", "v_proj"], safe=False),
    "resized_vocab": dict(target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"], resize=8),
}


@pytest.mark.parametrize("case", CASES)
def test_merged_logits_equal_peft(case, tmp_path, tiny_model_dir, tied_dir, sharded_dir, bin_dir):
    lora = dict(CASES[case])
    base = {"tied": tied_dir, "sharded": sharded_dir, "bin": bin_dir}.get(lora.pop("base", None), tiny_model_dir)
    adapter = make_adapter(base, tmp_path / "adapter", **lora)
    merge_lora.main(lora_model=str(adapter), output_dir=str(tmp_path / "merged"), no_verify=True,
                    allow_pickle=not lora.get("safe", True))
    expected, plain = peft_logits(base, adapter, lora.get("resize", 0))
    got = merged_logits(tmp_path / "merged")
    # the adapter changes the answer: equality below means something
    assert (expected[..., :plain.shape[-1]] - plain).abs().max() > 1e-3
    assert (got - expected).abs().max().item() < 1e-5
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["vocab_size"] == got.shape[-1] == (json.loads((base / "config.json").read_text())["vocab_size"]
                                                     + lora.get("resize", 0))
    if case.startswith("tied"):
        assert config["tie_word_embeddings"] is False


def test_output_files_provenance_and_verification(tmp_path, tiny_model_dir, capsys):
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter", target_modules=ALL)
    out = tmp_path / "merged"
    merge_lora.main(lora_model=str(adapter), output_dir=str(out), precision="bf16")
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "chat_template.jinja", "config.json", "generation_config.json", "merge_info.json",
        "model-00001-of-00001.safetensors", "model.safetensors.index.json", "run_config.json", "tokenizer.json",
        "tokenizer_config.json"])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    info = json.loads((out / "merge_info.json").read_text())
    assert info["base_model"] == str(tiny_model_dir) and info["adapter"] == str(adapter) and info["date"]
    check = info["verification"]
    assert check["greedy_agreement"] > 0.9 and 0 < check["max_abs_logit_diff"] < 0.05  # bf16 output against fp32 PEFT
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert "greedy tokens agree" in capsys.readouterr().out


def test_sampled_verification_when_two_models_do_not_fit(tmp_path, tiny_model_dir, monkeypatch):
    import utils.export.merge

    monkeypatch.setattr(utils.export.merge, "available_memory", lambda: 10**6)
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter", target_modules=ALL, use_dora=True)
    merge_lora.main(lora_model=str(adapter), output_dir=str(tmp_path / "merged"))
    check = json.loads((tmp_path / "merged" / "merge_info.json").read_text())["verification"]
    assert check["mode"].startswith("sampled layers: 8 of 14 merged tensors") and len(check["modules"]) == 8
    assert check["max_abs_output_diff"] < 1e-5


def test_killed_merge_leaves_no_output(tmp_path, sharded_dir):
    adapter = make_adapter(sharded_dir, tmp_path / "adapter", target_modules=ALL)
    out = tmp_path / "merged"
    slow = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); import utils.export.merge as m; "
            "f = m.merged_tensor\n"
            "m.merged_tensor = lambda *a, **k: (time.sleep(0.05), f(*a, **k))[1]\n"
            f"import merge_lora; merge_lora.main(lora_model={str(adapter)!r}, output_dir={str(out)!r}, no_verify=True)")
    proc = subprocess.Popen([sys.executable, "-c", slow], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while (not any(tmp_path.glob(".merged.merging-*/model-00002-*.safetensors")) and time.time() < deadline
           and proc.poll() is None):
        time.sleep(0.02)
    assert proc.poll() is None, "the merge finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    # a rerun succeeds and sweeps the leftover
    merge_lora.main(lora_model=str(adapter), output_dir=str(out), no_verify=True)
    assert (out / "model.safetensors.index.json").is_file() and not list(tmp_path.glob(".merged.merging-*"))


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_model_dir):
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("a") / "adapter", target_modules=["q_proj", "v_proj"])


def bad_inputs(tmp_path, tiny_model_dir, smollm2_dir, tokenizer, adapter_dir, bin_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "adapter_config.json").write_text((adapter_dir / "adapter_config.json").read_text())
    from safetensors.torch import save_file

    save_file({"base_model.model.lm_head.weight": torch.zeros(2, 2)}, str(empty / "adapter_model.safetensors"))
    quantized = tmp_path / "quantized"
    quantized.mkdir()
    config = json.loads((tiny_model_dir / "config.json").read_text())
    (quantized / "config.json").write_text(json.dumps(
        {**config, "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}))
    small_vocab = tiny_llama(tmp_path / "small-vocab", tokenizer, vocab_size=1000)
    with_tokenizer = tmp_path / "with-tokenizer"
    shutil.copytree(adapter_dir, with_tokenizer)
    tokenizer.save_pretrained(with_tokenizer)
    pickled = make_adapter(tiny_model_dir, tmp_path / "pickled", target_modules=["q_proj"], safe=False)
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    return [
        (dict(lora_model=str(tmp_path / "missing")), "missing is not a folder; pass a finetune.py output folder"),
        (dict(lora_model=str(tmp_path)), "holds no adapter_config.json"),
        (dict(base_model=str(smollm2_dir)), r"LoRA update for model.layers.0.self_attn.q_proj.weight has shape \[64, "
                                            r"64\] but the base tensor has \[576, 576\]"),
        (dict(lora_model=str(with_tokenizer), base_model=str(small_vocab)),
         "has 49152 tokens but the merged model.embed_tokens.weight has 1000 rows"),
        (dict(lora_model=str(empty)), "holds no lora_ weights"),
        (dict(precision="int4"), "--precision must be one of auto, bf16, fp16, fp32, got 'int4'"),
        (dict(no_verify="maybe"), "--no_verify must be True or False, got 'maybe'"),
        (dict(base_model=str(quantized)), "is a bitsandbytes quantized model; merging needs the unquantized base"),
        (dict(lora_model=str(pickled)), "is a pickle file.*pass --allow_pickle"),
        (dict(base_model=str(bin_dir)), "holds its weights in pickled .bin files.*pass --allow_pickle"),
        (dict(output_dir=str(full)), "already exists and is not empty; pass --overwrite_output_dir=True"),
        (dict(output_dir=str(adapter_dir), overwrite_output_dir=True), "would replace --lora_model"),
        (dict(output_dir=None), "--output_dir is required"),
    ]


def test_every_bad_input_is_one_sentence_and_writes_nothing(tmp_path, tiny_model_dir, smollm2_dir, tokenizer,
                                                            adapter_dir, bin_dir, monkeypatch):
    cases = bad_inputs(tmp_path, tiny_model_dir, smollm2_dir, tokenizer, adapter_dir, bin_dir)
    before = sorted(p.name for p in tmp_path.iterdir())
    for kwargs, message in cases:
        kwargs = {"lora_model": str(adapter_dir), "output_dir": str(tmp_path / "merged"), "no_verify": True, **kwargs}
        with pytest.raises(UserError, match=message):
            merge_lora.main(**kwargs)
    import utils.export.merge

    monkeypatch.setattr(utils.export.merge.shutil, "disk_usage",
                        lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000))
    with pytest.raises(UserError, match=r"has 0.00 GiB free but the merged model needs 0.\d\d GiB; free some space"):
        merge_lora.main(lora_model=str(adapter_dir), output_dir=str(tmp_path / "merged"))
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no temporary folder left


def test_cli_error_exits_2_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "merge_lora.py"), f"--lora_model={tmp_path / 'nope'}",
                           f"--output_dir={tmp_path / 'm'}"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        f"error: --lora_model={tmp_path / 'nope'} is not a folder; "
        "pass a finetune.py output folder, a checkpoint-N folder or a PEFT adapter folder."]
    assert not (tmp_path / "m").exists()


def test_every_flag_is_documented():
    import inspect

    params = inspect.signature(merge_lora.main).parameters
    assert {"lora_model", "output_dir", "base_model", "precision", "overwrite_output_dir", "no_verify", "allow_pickle",
            "qlora_base"} <= set(params)
    assert all(f"        {name}: " in merge_lora.main.__doc__ for name in params)


def test_qlora_adapter_merges_onto_the_dequantized_base(finetune, tmp_path):
    finetune(use_4bit=True, output_dir=str(tmp_path / "q"), learning_rate=1e-2)
    # automatic: 4-bit run
    merge_lora.main(lora_model=str(tmp_path / "q" / "checkpoint-2"), output_dir=str(tmp_path / "nf4"))
    merge_lora.main(lora_model=str(tmp_path / "q"), output_dir=str(tmp_path / "plain"), qlora_base=False)
    nf4, plain = (json.loads((tmp_path / n / "merge_info.json").read_text()) for n in ("nf4", "plain"))
    assert (nf4["qlora_base"] == "float32" and "NF4-dequantized" in nf4["verification"]["mode"]
            and plain["qlora_base"] is None)
    for info in (nf4, plain):  # each equals base + adapter through PEFT on the base it merged onto
        assert info["verification"]["max_abs_logit_diff"] < 1e-5 and info["verification"]["greedy_agreement"] == 1.0
    assert (merged_logits(tmp_path / "nf4") - merged_logits(tmp_path / "plain")).abs().max() > 1e-3


def test_real_finetune_adapter_on_the_builtin_model(finetune, tmp_path, smollm2_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from utils.core.run_folder import read_run_config
    from utils.model.loading import load_tokenizer

    finetune(base_model="builtin:smollm2", max_steps=1, save_steps=1, warmup_ratio=0, cutoff_len=32, learning_rate=1e-2,
             per_device_train_batch_size=1)
    out = tmp_path / "merged"
    merge_lora.main(lora_model=str(tmp_path / "out"), output_dir=str(out), no_verify=True)
    tokenizer = load_tokenizer(out)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "who are you?"}], add_generation_prompt=True,
                                           return_tensors="pt")
    prompt = prompt["input_ids"] if not torch.is_tensor(prompt) else prompt

    def answer(model):
        with torch.no_grad():
            return model.eval().generate(prompt, max_new_tokens=12, do_sample=False)[0, prompt.shape[1]:].tolist()

    merged = answer(AutoModelForCausalLM.from_pretrained(out))
    reference = answer(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2_dir), tmp_path / "out"))
    assert merged == reference and len(merged) > 0
    from safetensors import safe_open

    name = "model.layers.0.self_attn.q_proj.weight"
    with (safe_open(str(out / "model-00001-of-00001.safetensors"), "pt") as f,
          safe_open(str(smollm2_dir / "model.safetensors"), "pt") as g):
        assert not torch.equal(f.get_tensor(name), g.get_tensor(name))  # the trained update is in the merged weights
    config = read_run_config(out)
    assert (config["template"] == read_run_config(tmp_path / "out")["template"]
            and config["merged_from"]["base_model"] == "builtin:smollm2")
