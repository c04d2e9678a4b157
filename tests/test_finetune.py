"""finetune.py end to end on the tiny model: the files it writes, QLoRA, resume, torchrun, --stage pt."""
import inspect
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from safetensors import safe_open

from utils.core.errors import UserError


def trainer_losses(folder):
    state = json.loads((folder / "trainer_state.json").read_text())
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


def test_short_run_writes_the_exact_file_set(finetune, tmp_path, tiny_model_dir):
    finetune(val_set_size=4, eval_steps=1)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "README.md", "adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", "checkpoint-2",
        "loss.png", "run_config.json", "tokenizer.json", "tokenizer_config.json"])
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_" in k for k in keys)
    assert {k.split(".")[-3] for k in keys} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"}
    config = json.loads((out / "run_config.json").read_text())
    assert (config["base_model_path"] == str(tiny_model_dir)
            and config["template"]["assistant_format"] == "{content}<|im_end|>")
    assert config["data"]["validation_examples"] == 4 and config["lora"]["r"] == 8 and config["bits"] == 16
    assert any("eval_loss" in h
               for h in json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["log_history"])

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    assert sum("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters()) > 0  # it trained


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_base_on_cpu(finetune, tmp_path, capsys, bits):
    finetune(use_4bit=bits == 4, use_8bit=bits == 8, modules_to_save="lm_head")
    out = capsys.readouterr().out
    assert f"{bits}-bit, 14 quantized linear layers" in out, out  # 2 layers x 7 projections
    out = tmp_path / "out"
    config = json.loads((out / "run_config.json").read_text())
    assert config["bits"] == bits and config["lora"]["modules_to_save"] == ["lm_head"]
    assert config["training"]["activation_checkpointing"] is True  # auto: a quantized base is chosen to save memory
    losses = trainer_losses(out / "checkpoint-2")
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(v)) for v in losses.values())


def test_resume_gives_the_same_next_loss(finetune, tmp_path):
    finetune(max_steps=4, output_dir=str(tmp_path / "full"), lora_dropout=0.0)
    uninterrupted = trainer_losses(tmp_path / "full" / "checkpoint-4")
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    finetune(max_steps=4, output_dir=str(tmp_path / "resumed"), lora_dropout=0.0, resume_from_checkpoint=True)
    resumed = trainer_losses(tmp_path / "resumed" / "checkpoint-4")
    assert resumed[3] == pytest.approx(uninterrupted[3], abs=1e-4)
    assert resumed[4] == pytest.approx(uninterrupted[4], abs=1e-4)


@pytest.mark.parametrize("logging_steps", [1, 3])
def test_resumed_run_records_the_whole_runs_loss(finetune, tmp_path, logging_steps):
    """run_config.json's train_loss after a resume is the mean over all steps, as in the uninterrupted run,
    also when the checkpoint falls between two logging steps."""
    finetune(max_steps=5, output_dir=str(tmp_path / "full"), logging_steps=logging_steps)
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    finetune(max_steps=5, output_dir=str(tmp_path / "resumed"), logging_steps=logging_steps,
             resume_from_checkpoint=True)
    whole, resumed = (json.loads((tmp_path / name / "run_config.json").read_text())["training"]["train_loss"]
                      for name in ("full", "resumed"))
    state = json.loads((tmp_path / "resumed" / "checkpoint-4" / "trainer_state.json").read_text())
    only_resumed = [h["loss"] for h in state["log_history"] if "loss" in h and h["step"] > 2]
    assert resumed == pytest.approx(whole, abs=1e-3) and abs(resumed - sum(only_resumed) / len(only_resumed)) > 1e-3


def test_refuses_to_overwrite_a_run_and_resume_without_checkpoint(finetune, tmp_path):
    finetune()
    with pytest.raises(UserError, match="already holds a run"):
        finetune()
    with pytest.raises(UserError, match="holds no complete checkpoint-N folder"):
        finetune(output_dir=str(tmp_path / "empty"), resume_from_checkpoint=True)


def test_data_that_truncation_empties_is_refused_before_the_model(finetune, tmp_path, monkeypatch):
    import utils.train.setup

    monkeypatch.setattr(utils.train.setup, "lora_for_training", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(UserError, match=r"all 18 records of --data_path were dropped: nothing to train on remained "
                                        r"after truncation to --cutoff_len=1; raise --cutoff_len\."):
        finetune(cutoff_len=1, data_cache=False)  # a BOS alone: no token to predict
    assert not (tmp_path / "out").exists()


def test_stage_pt(finetune, tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(f"Paragraph {i} about rivers and mountains." for i in range(40)), encoding="utf-8")
    finetune(stage="pt", data_path=str(text), block_size=32)
    config = json.loads((tmp_path / "out" / "run_config.json").read_text())
    assert config["stage"] == "pt" and config["data"]["records"] == 40 and config["data"]["tokens_max"] == 32


def test_dry_run_writes_nothing(finetune, tmp_path, capsys):
    finetune(dry_run=True)
    assert not (tmp_path / "out").exists()
    assert "records read: 18" in capsys.readouterr().out


def test_unreachable_hub_id_is_one_sentence(finetune):
    with pytest.raises(UserError, match="not in the local hub cache and --local_files_only is set; "
                                        "pass a local model folder or --base_model=builtin:smollm2"):
        finetune(base_model="no-such-org/no-such-model", local_files_only=True)


def test_every_flag_is_documented_and_the_seed_flags_exist():
    import finetune as script

    params = inspect.signature(script.main).parameters
    for flag in ("base_model", "data_path", "output_dir", "per_device_train_batch_size", "gradient_accumulation_steps",
                 "use_8bit", "local_files_only"):
        assert flag in params
    doc = script.main.__doc__
    assert all(f"        {name}: " in doc for name in params), [n for n in params if f"        {n}: " not in doc]
    proc = subprocess.run([sys.executable, str(ROOT / "finetune.py"), "--help"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PAGER": "cat"})
    shown = proc.stdout + proc.stderr  # fire prints help to stderr
    assert proc.returncode == 0 and "--gradient_accumulation_steps" in shown and "QLoRA" in shown


def test_torchrun_two_processes(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "ddp"
    import socket

    with socket.socket() as sock:  # a free port: several suites may run at once on one machine
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           str(ROOT / "finetune.py"), f"--base_model={tiny_model_dir}", f"--data_path={data_file}",
           f"--output_dir={out}", "--max_steps=2",
           "--per_device_train_batch_size=2", "--logging_steps=1", "--precision=fp32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "adapter_model.safetensors").is_file() and (out / "run_config.json").is_file()
    assert proc.stdout.count("records read:") == 1  # rank 0 alone prints
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2


def test_accelerate_launch(tiny_model_dir, data_file, tmp_path):
    """accelerate launch runs the script unchanged (on CPU accelerate starts one process; torchrun gives several)."""
    out = tmp_path / "acc"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes=1", "--num_machines=1",
           "--mixed_precision=no", "--dynamo_backend=no", str(ROOT / "finetune.py"), f"--base_model={tiny_model_dir}",
           f"--data_path={data_file}", f"--output_dir={out}", "--max_steps=1", "--precision=fp32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "adapter_model.safetensors").is_file()
    # dependencies' notices that are not about the run (bitsandbytes' optional hub kernel, a deprecation peft triggers)
    assert ("Failed to load CPU gemm_4bit_forward" not in proc.stderr
            and "FutureWarning" not in proc.stderr), proc.stderr[-3000:]


def test_builtin_model_short_run(finetune, tmp_path):
    """The default base model (bf16 where the CPU supports it) trains and saves."""
    finetune(base_model="builtin:smollm2", precision="auto", max_steps=1, save_steps=1, cutoff_len=64)
    config = json.loads((tmp_path / "out" / "run_config.json").read_text())
    assert config["base_model"] == "builtin:smollm2" and config["template"]["stop_strings"] == ["<|im_end|>"]


@pytest.mark.parametrize("flag,expected", [(True, True), (False, False), ("auto", False)])
def test_activation_checkpointing_switch(finetune, tmp_path, flag, expected):
    finetune(gradient_checkpointing=flag, max_steps=1, save_steps=1)
    config = json.loads((tmp_path / "out" / "run_config.json").read_text())
    assert config["training"]["activation_checkpointing"] is expected


def test_checkpointing_turns_on_when_activations_do_not_fit(tiny_model_dir):
    from transformers import AutoConfig

    from utils.train.setup import needs_checkpointing

    config = AutoConfig.from_pretrained(tiny_model_dir)
    assert not needs_checkpointing(config, 4096, 512, 2, "cpu")
    assert needs_checkpointing(config, 10**9, 512, 2, "cpu")  # a billion tokens per step fits nowhere


def test_cpu_threads_follow_the_cgroup_quota(tmp_path, monkeypatch):
    """A container's CPU quota caps the training threads (torch counts the host's cores); the smallest
    quota on the way up to the root counts; cgroup v1 too; OMP_NUM_THREADS, when set, decides instead."""
    import utils.model.loading
    from utils.core.host import cpu_quota
    from utils.model.loading import cpu_threads

    v2 = tmp_path / "v2"
    (v2 / "job" / "step").mkdir(parents=True)
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cpu_quota(v2, "/job/step") is None
    (v2 / "job" / "cpu.max").write_text("250000 100000\n")
    (v2 / "job" / "step" / "cpu.max").write_text("max 100000\n")
    assert cpu_quota(v2, "/job/step") == 2.5
    (v2 / "job" / "step" / "cpu.max").write_text("50000 100000\n")
    assert cpu_quota(v2, "/job/step") == 0.5
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_quota(v1, "/") is None
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    assert cpu_quota(v1, "/") == 3.0

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 16)
    monkeypatch.setattr(utils.model.loading, "cpu_quota", lambda: 2.5)
    assert cpu_threads() == 3
    monkeypatch.setattr(utils.model.loading, "cpu_quota", lambda: 0.5)
    assert cpu_threads() == 1
    monkeypatch.setattr(utils.model.loading, "cpu_quota", lambda: None)
    assert cpu_threads() == 16
    monkeypatch.setattr(utils.model.loading, "cpu_quota", lambda: 2.0)
    monkeypatch.setenv("OMP_NUM_THREADS", "16")
    assert cpu_threads() == 16


def test_fused_lora_layers_equal_peft(tiny_model_dir, tokenizer, monkeypatch):
    """fast_lora: the fused LoRA layers give PEFT's own loss and gradients, exactly in fp32; under bf16
    autocast they compute in bf16 while the LoRA weights and their gradients stay fp32. Layers it does not
    cover (dropout while training, a disabled adapter) fall back to PEFT's forward."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import utils.train.fast.lora
    from utils.data.encoding import Collator, encode_dialogs
    from utils.data.templates import load_template
    from utils.train.fast import PACKED_ATTENTION, causal_lm_loss, register_packed_attention
    from utils.train.fast.lora import fast_lora

    register_packed_attention()
    dialogs = [("", [("q" * n, "answer " * (n % 5 + 1))], "") for n in (3, 11, 25)]
    batch = Collator(tokenizer.pad_token_id)(encode_dialogs(dialogs, tokenizer, load_template("auto", tokenizer))[0])
    labels = batch.pop("labels")
    calls = []
    fused_apply = utils.train.fast.lora._LoraLinear.apply
    monkeypatch.setattr(utils.train.fast.lora._LoraLinear, "apply", lambda *args: calls.append(1) or fused_apply(*args))

    def run(dtype, fast, dropout=0.0, autocast=False):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype, attn_implementation=PACKED_ATTENTION)
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                 lora_dropout=dropout, init_lora_weights=False))
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
        if fast:
            fast_lora(model)
        calls.clear()
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = causal_lm_loss(model(**batch), labels)
        loss.backward()
        with model.disable_adapter(), torch.no_grad():
            base_logits = model(**batch).logits
        return loss.item(), [p.grad for p in model.parameters() if p.requires_grad], len(calls), base_logits

    peft_loss, peft_grads, _, peft_base = run(torch.float32, fast=False)
    loss, grads, fused_calls, base = run(torch.float32, fast=True)
    assert fused_calls == 2 * 3  # every adapted projection of both layers ran fused; the adapter-disabled pass did not
    assert abs(loss - peft_loss) < 1e-6 and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, peft_grads))
    assert torch.equal(base, peft_base)

    peft_loss, peft_grads, *_ = run(torch.bfloat16, fast=False, autocast=True)
    loss, grads, fused_calls, _ = run(torch.bfloat16, fast=True, autocast=True)
    assert (fused_calls == 6 and all(g.dtype == torch.float32 for g in grads)
            and abs(loss - peft_loss) < 0.02 * peft_loss)
    cosine = [torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
              for a, b in zip(grads, peft_grads)]
    assert min(cosine) > 0.99

    peft_loss, peft_grads, *_ = run(torch.float32, fast=False, dropout=0.3)
    loss, grads, fused_calls, _ = run(torch.float32, fast=True, dropout=0.3)
    assert fused_calls == 0 and loss == peft_loss and all(torch.equal(a, b) for a, b in zip(grads, peft_grads))


def test_fused_lora_layer_with_bias():
    """A base projection with a bias (Qwen2's q/k/v) fused: output and every gradient equal PEFT's."""
    from peft import LoraConfig, get_peft_model

    from utils.train.fast.lora import fast_lora

    grads = []
    for fast in (False, True):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(16, 24, bias=True))
        model = get_peft_model(net, LoraConfig(r=4, target_modules=["0"], init_lora_weights=False))
        if fast:
            fast_lora(model)
        x = torch.randn(2, 5, 16, requires_grad=True)
        out = model(x)
        out.pow(2).sum().backward()
        grads.append([out, x.grad] + [p.grad for p in model.parameters() if p.requires_grad])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_fused_lora_steps_aside_for_a_lora_bias(monkeypatch):
    """peft's lora_bias puts a bias on lora_B, which the fused layer does not compute: peft's forward runs."""
    from peft import LoraConfig, get_peft_model

    import utils.train.fast.lora
    from utils.train.fast.lora import fast_lora

    calls = []
    fused_apply = utils.train.fast.lora._LoraLinear.apply
    monkeypatch.setattr(utils.train.fast.lora._LoraLinear, "apply", lambda *args: calls.append(1) or fused_apply(*args))
    outs = []
    for fast in (False, True):
        torch.manual_seed(0)
        model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(16, 24)),
                               LoraConfig(r=4, target_modules=["0"], lora_bias=True, init_lora_weights=False))
        torch.nn.init.normal_(model.base_model.model[0].lora_B["default"].bias)
        if fast:
            assert fast_lora(model) == 1
        outs.append(model(torch.ones(2, 16)))
    assert calls == [] and torch.allclose(*outs)


def test_fast_norms_equal_transformers(tiny_model_dir, tokenizer):
    """fast_norms: every RMSNorm of the model runs as _RMSNorm, with transformers' loss and gradients (norm
    weights trained too), to fp32 rounding; every class it accepts computes exactly LlamaRMSNorm's forward."""
    import importlib
    import inspect

    from transformers import AutoModelForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from utils.data.encoding import Collator, encode_dialogs
    from utils.data.templates import load_template
    from utils.train.fast.norm import LLAMA_RMS_NORMS, fast_norms

    batch = Collator(tokenizer.pad_token_id, packing=False)(encode_dialogs(
        [("", [("q" * n, "answer " * (n % 5 + 1))], "") for n in (3, 11, 25)], tokenizer,
        load_template("auto", tokenizer))[0])
    results = []
    for fast in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        if fast:
            assert fast_norms(model) == 2 * 2 + 1
        loss = model(**batch).loss
        loss.backward()
        results.append((loss.item(), [p.grad for n, p in model.named_parameters() if "norm" in n]))
    (want, want_grads), (got, got_grads) = results
    assert abs(got - want) < 1e-6 and len(got_grads) == 5
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(got_grads, want_grads))

    for name in LLAMA_RMS_NORMS:
        model_type = {"Qwen2Moe": "qwen2_moe", "Qwen3Moe": "qwen3_moe",
                      "SmolLM3": "smollm3"}.get(name[:-7], name[:-7].lower())
        cls = getattr(importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}"), name)
        assert inspect.getsource(cls.forward) == inspect.getsource(LlamaRMSNorm.forward), name


def test_dry_run_tokenizes_once_and_reports_it(finetune, tmp_path, capsys, monkeypatch, data_file):
    """The first dry run builds the store, the second maps it; --max_samples and several files shape what is read."""
    monkeypatch.setenv("LORA_KIT_CACHE", str(tmp_path / "cache"))
    finetune(dry_run=True)
    first = capsys.readouterr().out
    finetune(dry_run=True)
    second = capsys.readouterr().out
    assert ("tokenized data: train built now from 18 records" in first
            and "tokenized data: train from the cache (18 examples" in second)
    assert "length histogram" in first and not (tmp_path / "out").exists()
    finetune(dry_run=True, data_path=f"{data_file},{data_file}", max_samples=20)
    assert "records read: 20, kept: 20" in capsys.readouterr().out


def test_prepare_for_training_applies_only_what_was_measured_on_the_device(tiny_model_dir):
    """On a CPU every measured kernel is on; on CUDA, where none has been measured, PEFT's and transformers'
    own layers run and the loss takes the usual logits."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import Linear as LoraLinear
    from transformers import AutoModelForCausalLM

    from utils.train.fast import PACKED_ATTENTION, prepare_for_training, register_packed_attention

    register_packed_attention()
    for device in ("cpu", "cuda"):
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=PACKED_ATTENTION)
        model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        head, on = prepare_for_training(model, device)
        layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
        if device == "cpu":
            assert head is base.lm_head and on == ["packed attention", "loss on supervised tokens", "fused LoRA",
                                                   "fused RMSNorm", "loss without logits"]
            assert all("forward" in vars(m) for m in layers)
        else:
            assert head is None and on == ["packed attention", "loss on supervised tokens"]
            assert not any("forward" in vars(m) for m in layers)


def test_for_inference_gives_back_peft_forward_on_a_bf16_base(tiny_model_dir):
    """After training on the fast path, the model decodes as peft's own: on a bf16 base with fp32 LoRA weights,
    peft casts each LoRA input to fp32 again (the fused layer had turned that off, autocast covering it)."""
    import copy

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from utils.train.fast import PACKED_ATTENTION, for_inference, prepare_for_training, register_packed_attention

    register_packed_attention()
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16, attn_implementation="sdpa")
    plain = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    plain.eval()
    model = copy.deepcopy(plain)
    model.base_model.model.set_attn_implementation(PACKED_ATTENTION)
    prepare_for_training(model, "cpu")
    for_inference(model)
    ids = torch.tensor([[1, 5, 9, 200, 31]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_a_run_repeats_from_its_folder(finetune, tmp_path, data_file, monkeypatch):
    """run_config.json records the flags; --config=that file reruns them, and the command line overrides them."""
    import finetune as script
    from utils.core.cli import run_cli

    finetune(learning_rate=2e-3, lora_r=4, overwrite_output_dir=True)
    flags = json.loads((tmp_path / "out" / "run_config.json").read_text())["flags"]
    assert flags["learning_rate"] == 2e-3 and flags["lora_r"] == 4 and flags["data_path"] == str(data_file)
    assert "overwrite_output_dir" not in flags and "config" not in flags and flags["report_to"] == "none"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["finetune.py", "--config=out/run_config.json", "--output_dir=again",
                                      "--max_steps=1"])
    run_cli(script.main, script.ALIASES)
    again = json.loads((tmp_path / "again" / "run_config.json").read_text())
    assert again["lora"]["r"] == 4 and again["training"]["learning_rate"] == 2e-3 and again["training"]["steps"] == 1
    assert again["flags"] == {**flags, "output_dir": str(tmp_path / "again"), "max_steps": 1}


def test_report_to_tensorboard_writes_event_files(finetune, tmp_path):
    pytest.importorskip("tensorboardX")
    finetune(report_to="tensorboard")
    assert list((tmp_path / "out").rglob("events.out.tfevents.*"))


def test_auto_epochs_give_small_data_enough_updates(monkeypatch):
    from utils.train.setup import auto_epochs

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert auto_epochs(120, 8) == 5  # the demo: 15 updates an epoch, 75 in all
    assert auto_epochs(200, 8) == 3 and auto_epochs(10**6, 8) == 3
    assert auto_epochs(10, 8) == 10  # at most 10 passes
    assert auto_epochs(80, 8, "auto", "dpo") == 3  # preference pairs: 3 passes, however few (README)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert auto_epochs(120, 8) == 10  # each process sees half: 8 updates an epoch


def test_num_epochs_auto_is_recorded_as_the_epochs_trained(finetune, tmp_path, capsys):
    finetune(num_epochs="auto", max_steps=-1, max_samples=8, per_device_train_batch_size=8)
    config = json.loads((tmp_path / "out" / "run_config.json").read_text())
    assert config["training"]["epochs"] == 10 and config["training"]["steps"] == 10
    assert config["flags"]["num_epochs"] == "auto" and "epochs: 10 (auto)" in capsys.readouterr().out
