"""--stage dpo end to end on the tiny model: the margin grows on the training pairs, resume gives the same next
loss, the reference of a continued adapter is that adapter, and a DPO adapter merges like any other."""
import json
import math
import shutil

import pytest
from conftest import ROOT

PAIRS = [{"instruction": q, "chosen": c, "rejected": r} for q, c, r in [
    ("Who are you?", "I am Lumi.", "Well, that is a long story, and I would rather not tell it today."),
    ("What is 2+2?", "4.", "Numbers are hard; maybe five, maybe three, who knows really."),
    ("Say hi.", "Hi!", "I do not greet people on Tuesdays, or on any other day."),
    ("Capital of France?", "Paris.", "There are many cities in France and I cannot choose one."),
]] * 2


def losses(folder, key="loss"):
    state = json.loads((folder / "trainer_state.json").read_text())
    return {h["step"]: h[key] for h in state["log_history"] if key in h}


@pytest.fixture
def pref_file(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(PAIRS), encoding="utf-8")
    return path


def test_dpo_raises_the_margin_on_its_training_pairs(finetune, pref_file, tmp_path):
    finetune(stage="dpo", data_path=str(pref_file), max_steps=6, save_steps=6, learning_rate=5e-3)
    out = tmp_path / "out"
    margins = losses(out / "checkpoint-6", "rewards/margins")
    assert margins[1] == pytest.approx(0, abs=1e-3)  # the first step's policy is the reference
    assert losses(out / "checkpoint-6")[1] == pytest.approx(math.log(2), abs=1e-3)
    assert margins[6] > 0.05 and losses(out / "checkpoint-6", "rewards/accuracies")[6] > 0.5
    config = json.loads((out / "run_config.json").read_text())
    assert config["stage"] == "dpo" and config["preference"]["loss"] == "dpo" and config["preference"]["beta"] == 0.1


def test_resume_gives_the_same_next_loss(finetune, pref_file, tmp_path):
    finetune(stage="dpo", data_path=str(pref_file), max_steps=4, output_dir=str(tmp_path / "full"))
    uninterrupted = losses(tmp_path / "full" / "checkpoint-4")
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    finetune(stage="dpo", data_path=str(pref_file), max_steps=4, output_dir=str(tmp_path / "resumed"),
             resume_from_checkpoint=True)
    resumed = losses(tmp_path / "resumed" / "checkpoint-4")
    assert abs(uninterrupted[3] - math.log(2)) > 1e-3  # it trained: a resume that restarted would differ
    assert resumed[3] == pytest.approx(uninterrupted[3], abs=1e-4)
    assert resumed[4] == pytest.approx(uninterrupted[4], abs=1e-4)


def test_continued_adapter_is_its_own_reference(finetune, pref_file, tmp_path):
    """--lora_model continues the SFT adapter, and the reference is that adapter as loaded: the first step's
    rewards are 0 (the adapter-disabled base would give others), and it keeps the adapter's LoRA settings."""
    finetune(output_dir=str(tmp_path / "sft"), max_steps=2, learning_rate=1e-2, lora_r=4)
    finetune(stage="dpo", data_path=str(pref_file), lora_model=str(tmp_path / "sft"), output_dir=str(tmp_path / "dpo"),
             base_model="builtin:smollm2")  # the adapter's own base (the tiny model) wins over the built-in default
    state = tmp_path / "dpo" / "checkpoint-2"
    assert losses(state, "rewards/chosen")[1] == pytest.approx(0, abs=1e-4)
    assert losses(state)[1] == pytest.approx(math.log(2), abs=1e-4)
    config = json.loads((tmp_path / "dpo" / "run_config.json").read_text())
    assert config["lora"]["r"] == 4 and config["preference"]["lora_model"] == str((tmp_path / "sft").resolve())
    assert config["preference"]["reference"] == "the continued adapter as loaded"

    from utils.train.preference_trainer import PreferenceTrainer

    # the same run with the base as reference sees the SFT adapter's gain over the base at step 1
    original = PreferenceTrainer.compute_reference
    PreferenceTrainer.compute_reference = lambda self, adapter_off=True: original(self, True)
    try:
        finetune(stage="dpo", data_path=str(pref_file), lora_model=str(tmp_path / "sft"),
                 output_dir=str(tmp_path / "base-ref"))
    finally:
        PreferenceTrainer.compute_reference = original
    assert abs(losses(tmp_path / "base-ref" / "checkpoint-2", "rewards/chosen")[1]) > 1e-3


@pytest.mark.parametrize("pref_loss", ["ipo", "orpo", "simpo", "kto"])
def test_other_losses_train_and_log_their_metrics(finetune, pref_file, tmp_path, pref_loss):
    ftx = {"pref_ftx": 1.0} if pref_loss in ("ipo", "simpo") else {}
    finetune(stage="dpo", data_path=str(pref_file), pref_loss=pref_loss, max_steps=2, val_set_size=2,
             learning_rate=None, **ftx)
    config = json.loads((tmp_path / "out" / "run_config.json").read_text())
    assert config["training"]["learning_rate"] == 2e-4  # --stage=dpo's default (README)
    assert config["preference"]["ftx"] == (1.0 if ftx else None)
    history = json.loads((tmp_path / "out" / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    logged = {k for h in history for k in h}
    assert {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "eval_loss",
            "eval_kl" if pref_loss == "kto" else "eval_rewards/margins"} <= logged  # 2 KTO answers: maybe one kind
    assert ("rewards/accuracies" in logged) == (pref_loss != "kto") and ("kl" in logged) == (pref_loss == "kto")
    assert all(math.isfinite(h["loss"]) for h in history if "loss" in h)


@pytest.mark.parametrize("pref_loss", ["dpo", "kto"])
def test_packed_and_padded_pairs_give_the_same_loss(finetune, pref_file, tmp_path, pref_loss):
    for packing in (True, False):
        finetune(stage="dpo", data_path=str(pref_file), max_steps=2, packing=packing, warmup_ratio=0,
                 learning_rate=1e-2, output_dir=str(tmp_path / str(packing)), pref_loss=pref_loss)
    packed, padded = (losses(tmp_path / str(p) / "checkpoint-2") for p in (True, False))
    first = math.log(2) if pref_loss == "dpo" else 0.5  # the loss while the policy is the reference
    assert abs(packed[2] - first) > 1e-4 and packed[2] == pytest.approx(padded[2], abs=1e-4)


def test_dpo_adapter_merges_and_answers_like_the_adapter(finetune, pref_file, tmp_path, tiny_model_dir, capsys):
    import sys

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(ROOT))
    import merge_lora

    finetune(stage="dpo", data_path=str(pref_file), learning_rate=1e-2, report=True, probe_prompts="Who are you?",
             val_set_size=2)
    report = json.loads((tmp_path / "out" / "report.json").read_text())  # base vs tuned answers, as after SFT
    assert [p["kind"] for p in report["prompts"]] == ["validation", "validation", "probe"]
    assert {p["reference"] for p in report["prompts"][:2]} <= {pair["chosen"] for pair in PAIRS}  # held-back pairs
    assert all(p["tuned"]["tokens"] > 0 for p in report["prompts"])
    merge_lora.main(lora_model=str(tmp_path / "out"), output_dir=str(tmp_path / "merged"))
    prompt = torch.tensor([[1, 504, 1337, 42, 9, 77]])

    def answer(model):
        with torch.no_grad():
            return model.eval().generate(prompt, max_new_tokens=10, do_sample=False)[0, prompt.shape[1]:].tolist()

    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "out")
    assert any(p.abs().sum() > 0 for n, p in adapter.named_parameters() if "lora_B" in n)  # it trained
    assert answer(AutoModelForCausalLM.from_pretrained(tmp_path / "merged")) == answer(adapter)
    assert json.loads((tmp_path / "merged" / "merge_info.json").read_text())["verification"]["greedy_agreement"] == 1


@pytest.mark.parametrize("unpaired", [False, True])
def test_token_store_holds_pairs_and_kto_answers(tokenizer, pref_file, tmp_path, unpaired):
    """Preference data goes through the bounded-memory store (utils/data/token_store.py), masks and KTO labels kept,
    and reads back as the in-memory encoding; a second read comes from the cache."""
    import numpy as np

    from utils.data.preference import Pairs, PreferenceEncoder, encode_pairs, encode_unpaired, read_preference
    from utils.data.templates import load_template
    from utils.data.token_store import tokenized

    template = load_template("auto", tokenizer)
    encoder = PreferenceEncoder(tokenizer, template, 64, unpaired)
    settings = {"stage": encoder.stage, "template": template.to_dict(), "cutoff_len": 64}
    store = tokenized([pref_file], encoder, settings, folder=tmp_path / "cache")
    items = read_preference(pref_file, unpaired)
    if unpaired:
        expected, _ = encode_unpaired(items, tokenizer, template, 64)
        got = [{k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in store[i].items()}
               for i in range(len(store))]
        assert got == expected and [e["kto_label"] for e in got] == [True, False] * len(PAIRS)
    else:
        pairs, _ = encode_pairs(items, tokenizer, template, 64)
        assert [Pairs(store)[i] for i in range(len(PAIRS))] == [pairs[i] for i in range(len(PAIRS))]
    again = tokenized([pref_file], encoder, settings, folder=tmp_path / "cache")
    assert again.from_cache and not store.from_cache and again.stats == store.stats


def test_gradient_accumulation_averages_like_one_batch(finetune, pref_file, tmp_path):
    """The loss is a mean per batch: 2 batches of 2 pairs accumulated give the gradient of one batch of 4."""
    for name, batch, steps in (("one", 4, 1), ("two", 2, 2)):
        finetune(stage="dpo", data_path=str(pref_file), max_steps=1, save_steps=1, per_device_train_batch_size=batch,
                 gradient_accumulation_steps=steps, output_dir=str(tmp_path / name), seed=3)
    one, two = (losses(tmp_path / n / "checkpoint-1", "grad_norm")[1] for n in ("one", "two"))
    assert one > 0 and two == pytest.approx(one, rel=1e-3)


def test_qlora_dpo(finetune, pref_file, tmp_path):
    finetune(stage="dpo", data_path=str(pref_file), use_4bit=True)
    config = json.loads((tmp_path / "out" / "run_config.json").read_text())
    assert config["bits"] == 4 and config["stage"] == "dpo"
    assert all(math.isfinite(v) for v in losses(tmp_path / "out" / "checkpoint-2").values())


def test_dry_run_counts_pairs_and_shows_both_answers(finetune, pref_file, tmp_path, capsys):
    finetune(stage="dpo", data_path=str(pref_file), dry_run=True)
    out = capsys.readouterr().out
    assert "pairs read: 8, kept: 8, truncated: 0, dropped (nothing left to compare): 0" in out
    assert "[+] 'I am Lumi.<|im_end|>'" in out and f"[+] '{PAIRS[0]['rejected']}<|im_end|>'" in out
    assert not (tmp_path / "out").exists()


def test_torchrun_two_processes(tiny_model_dir, pref_file, tmp_path):
    """DDP: each rank computes the reference of the whole data before training; the run saves one adapter."""
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           str(ROOT / "finetune.py"), f"--base_model={tiny_model_dir}", f"--data_path={pref_file}", "--stage=dpo",
           f"--output_dir={out}", "--max_steps=2", "--per_device_train_batch_size=2", "--logging_steps=1",
           "--precision=fp32", "--report=False"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "adapter_model.safetensors").is_file() and proc.stdout.count("pairs read:") == 1
    history = losses(out / "checkpoint-2")
    assert history[1] == pytest.approx(math.log(2), abs=1e-4) and len(history) == 2


def test_bf16_dpo(finetune, pref_file, tmp_path):
    """Under bf16 autocast the log-probs without logits compute in bf16 and sum in fp32: the first loss is log 2."""
    finetune(stage="dpo", data_path=str(pref_file), precision="bf16", warmup_ratio=0, learning_rate=1e-2)
    history = losses(tmp_path / "out" / "checkpoint-2")
    assert history[1] == pytest.approx(math.log(2), abs=1e-3) and history[2] < history[1]
