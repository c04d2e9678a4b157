"""Preference training: our finetune.py --stage=dpo against TRL's DPOTrainer, on this CPU, in one run.

    python bench/pref_bench.py                 # built-in SmolLM2, 200 pairs of dpo_en_demo.json, 50 held back
    python bench/pref_bench.py --seeds=42,1,7,2,3,4   # each arm once per seed; targets on the means (RESULTS)
    python bench/pref_bench.py --max_steps=2 --held=4 --arms=ours   # a smoke run: no figures to quote
    python bench/pref_bench.py --arms=trl,ours,ours_kept --seeds=42,1,7   # also ours on the pairs TRL keeps

Both arms train the same LoRA (r=8, alpha 16, no dropout, the 7 projections) with DPO (sigmoid, beta 0.1) for
one epoch at the same learning rate, batch and schedule, each in its own child process; peak RSS is polled from
outside. TRL runs at its defaults otherwise: padded batches, activation checkpointing on (DPOConfig's default),
bf16 autocast (its default, also on CPUs), and with a PEFT model the reference is the adapter-disabled model, a
forward per step. Ours runs at its own default precision (bf16 weights on a CPU with AVX512-BF16 or AMX, else
fp32), packs each batch into
one row, computes the reference log-probs once before training, and recomputes activations only where they would
not fit (--gradient_checkpointing=auto; --ours_checkpointing=True matches TRL's).

Both arms get the same first 200 records, and each keeps what its own rules keep: TRL drops a pair whose prompt
alone fills max_length (= our cutoff_len) and cuts prompt + answer at max_length; ours keeps every pair, cutting the
shared prompt first. So each arm reports the pairs it trained on, and its tokens/s counts its own real tokens (prompt
+ chosen, prompt + rejected, after its truncation) over the time from the first step to the last, our reference
pass included. The arm ours_kept is ours given only the pairs TRL keeps (a prompt, as our template renders it,
shorter than the cutoff): the same training pairs as TRL, to tell our trainer from our truncation rule. The
held-back reward accuracy is
computed afterwards by one piece of code for both adapters (fp32, padded): the share of held-back pairs whose
chosen answer gains more log-probability over the base model than the rejected one.
Needs ../shared/data/dpo_en_demo.json and TRL (requirements-dev.txt); skips with a message without either.
"""
import json
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
DATA = ROOT.parent / "shared" / "data" / "dpo_en_demo.json"

from train_throughput import PROJECTIONS, child  # noqa: E402


def encoded(records, cutoff_len):
    """(pairs as {prompt_ids, chosen_ids, rejected_ids}, tokenizer) with our template code."""
    from utils.data.preference import encode_pairs, to_pair
    from utils.data.templates import load_template
    from utils.model.builtin import builtin_path
    from utils.model.loading import load_tokenizer

    tokenizer = load_tokenizer(builtin_path())
    pairs, _ = encode_pairs([to_pair(r, f"record {i}") for i, r in enumerate(records, 1)], tokenizer,
                            load_template("auto", tokenizer), cutoff_len)
    return [pairs[i] for i in range(len(pairs))], tokenizer


def trl_rows(records):
    """TRL's conversational preference layout: prompt (messages), chosen and rejected (one assistant message)."""
    from utils.data.preference import to_pair

    rows = []
    for i, record in enumerate(records, 1):
        pair = to_pair(record, f"record {i}")
        prompt = [{"role": "system", "content": pair.system}] if pair.system else []
        for question, answer in pair.history:
            prompt += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        prompt.append({"role": "user", "content": pair.query})
        rows.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": pair.chosen}],
                     "rejected": [{"role": "assistant", "content": pair.rejected}]})
    return rows


def run_arm(arm, out, records, cutoff_len, batch, lr, max_steps, ours_checkpointing, seed):
    """One arm, in this (child) process; writes {seconds, losses} to out/result.json and the adapter to
    out/adapter."""
    import torch

    out = Path(out)
    if arm in ("ours", "ours_kept"):
        import finetune

        if arm == "ours_kept":  # TRL's rule: a pair whose prompt alone fills max_length is dropped
            records = [r for r, p in zip(records, encoded(records, None)[0]) if len(p["prompt_ids"]) < cutoff_len]
        data = out / "train.json"
        data.write_text(json.dumps(records, ensure_ascii=False))
        steps = max_steps if max_steps > 0 else math.ceil(len(records) / batch)
        finetune.main(stage="dpo", data_path=str(data), output_dir=str(out / "adapter"), num_epochs=1,
                      max_steps=max_steps, per_device_train_batch_size=batch, learning_rate=lr, cutoff_len=cutoff_len,
                      lora_dropout=0.0, pref_beta=0.1, save_steps=steps, logging_steps=1, data_cache=False,
                      report=False, gradient_checkpointing=ours_checkpointing, seed=seed)
        config = json.loads((out / "adapter" / "run_config.json").read_text())
        history = json.loads((out / "adapter" / f"checkpoint-{steps}" / "trainer_state.json").read_text())
        history = history["log_history"]
        seconds = [h["train_runtime"] for h in history if "train_runtime" in h][-1]  # ours logs it every step
        seconds += config["preference"]["reference_seconds"]
        # what our encoder trained on (every pair, the prompt cut first): prompt + chosen, prompt + rejected tokens
        trained, tokens = config["data"]["train_examples"], config["data"]["train_tokens"]
    else:
        from datasets import Dataset
        from peft import LoraConfig
        from transformers import AutoModelForCausalLM
        from trl import DPOConfig, DPOTrainer

        from utils.model.builtin import builtin_path
        from utils.model.loading import load_tokenizer

        tokenizer = load_tokenizer(builtin_path())
        model = AutoModelForCausalLM.from_pretrained(builtin_path(), dtype=torch.float32)
        args = DPOConfig(output_dir=str(out / "adapter"), per_device_train_batch_size=batch, num_train_epochs=1,
                         max_steps=max_steps, learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=0.03,
                         logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=seed, beta=0.1,
                         max_length=cutoff_len)
        trainer = DPOTrainer(model=model, args=args, processing_class=tokenizer,
                             train_dataset=Dataset.from_list(trl_rows(records)),
                             peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=PROJECTIONS,
                                                    task_type="CAUSAL_LM"))
        # what TRL trains on: it drops a pair whose prompt alone fills max_length, and cuts prompt + answer there
        kept = trainer.train_dataset
        trained, tokens = len(kept), sum(min(len(p) + len(a), cutoff_len) for p, c, r in zip(
            kept["prompt_ids"], kept["chosen_ids"], kept["rejected_ids"]) for a in (c, r))
        trainer.train()
        trainer.model.save_pretrained(out / "adapter")
        history = trainer.state.log_history
        seconds = next(h["train_runtime"] for h in history if "train_runtime" in h)
    losses = [h["loss"] for h in history if "loss" in h]
    steps = sum(1 for h in history if "loss" in h)
    tokens = round(tokens * min(1.0, steps * batch / trained))  # a smoke run's share of the epoch
    (out / "result.json").write_text(json.dumps({"seconds": seconds, "losses": losses, "tokens": tokens,
                                                 "pairs": trained, "steps": steps}))


def reward_accuracy(adapter, pairs, pad_token_id, batch=8):
    """The share of pairs whose chosen answer gains more log-probability over the base model (the adapter
    disabled) than the rejected one: the same code for every arm, fp32, padded rows."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from utils.data.preference import PairCollator
    from utils.model.builtin import builtin_path
    from utils.train.preference_loss import sequence_logps

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(builtin_path(), dtype=torch.float32),
                                      adapter).eval()
    right = 0
    with torch.no_grad():
        for i in range(0, len(pairs), batch):
            b = PairCollator(pad_token_id, packing=False)(pairs[i:i + batch])
            labels = b.pop("labels")
            policy = sequence_logps(model(**b).logits, labels)[0]
            with model.disable_adapter():
                base = sequence_logps(model(**b).logits, labels)[0]
            gain = policy - base
            right += int((gain[0::2] > gain[1::2]).sum())
    return right / len(pairs)


def plot(curves, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, losses in curves.items():
        ax.plot(range(1, len(losses) + 1), losses, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("DPO loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(pairs=200, held=50, cutoff_len=512, batch=8, lr=5e-5, max_steps=-1, arms="trl,ours",
         ours_checkpointing="auto", seeds="42", arm=None, out=None, seed=42):
    """Args: pairs (trained on), held (held back for the reward accuracy), cutoff_len, batch, lr: the setting.
    max_steps: stop each arm after this many steps (a smoke run; -1: one epoch). arms: trl, ours, ours_kept (the
    targets need trl and ours). ours_checkpointing: our --gradient_checkpointing (auto, True, False). seeds: one run of
    each arm per seed (LoRA init, shuffling), e.g. 42,1,7; with several, the targets compare the arms' means.
    arm, out, seed: internal (a child)."""
    import importlib.util
    import statistics

    if not DATA.is_file():
        print(f"skipped: {DATA} is absent (it holds the benchmark data)")
        return
    from utils.core.errors import as_list

    arms = [a for a in ("trl", "ours", "ours_kept") if a in as_list(arms, "arms")]
    seeds = [int(s) for s in (seeds if isinstance(seeds, (list, tuple)) else str(seeds).split(","))]  # fire: a tuple
    if "trl" in arms and not importlib.util.find_spec("trl"):
        print("skipped: TRL is not installed (pip install -r requirements-dev.txt)")
        return
    data = json.loads(DATA.read_text(encoding="utf-8"))
    if arm:
        return run_arm(arm, out, data[:pairs], cutoff_len, batch, lr, max_steps, ours_checkpointing, seed)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tmp = Path(tempfile.mkdtemp(prefix="pref-bench-"))
    held_pairs, tokenizer = encoded(data[pairs:pairs + held], cutoff_len)
    runs = {}  # (arm, seed) -> (result, peak RSS, held-back accuracy)
    for seed in seeds:
        for name in arms:
            where = tmp / f"{name}-{seed}"
            where.mkdir()
            t0 = time.time()
            result, rss = child(name, where, __file__, pairs=pairs, cutoff_len=cutoff_len, batch=batch, lr=lr,
                                max_steps=max_steps, ours_checkpointing=ours_checkpointing, seed=seed)[:2]
            accuracy = reward_accuracy(where / "adapter", held_pairs, tokenizer.pad_token_id)
            runs[name, seed] = result, rss, accuracy
            print(f"  {name:5s} seed {seed}: done in {time.time() - t0:.0f} s, held-back reward accuracy "
                  f"{accuracy:.1%}", flush=True)
    plot({f"{name} seed {seed}": r[0]["losses"] for (name, seed), r in runs.items()}, tmp / "loss_curves.png")
    print(f"\nthe first {pairs} dpo_en_demo pairs, {len(held_pairs)} held back, cutoff {cutoff_len}, batch {batch}, "
          f"lr {lr}, DPO beta 0.1, LoRA r=8 on 7 projections, built-in SmolLM2-135M, each arm's default precision")
    print(f"{'arm':9s} {'seed':>4s} {'pairs':>5s} {'steps':>5s} {'tokens':>7s} {'tokens/s':>9s} {'peak RSS':>9s} "
          f"{'held-back reward acc.':>22s}  loss: first, last 5 mean")
    for (name, seed), (result, rss, accuracy) in runs.items():
        losses = result["losses"]
        print(f"{name:9s} {seed:4d} {result['pairs']:5d} {result['steps']:5d} {result['tokens']:7d} "
              f"{result['tokens'] / result['seconds']:9.1f} {rss / 2**30:7.2f} GB {accuracy:21.1%}   "
              f"{losses[0]:.4f}, {sum(losses[-5:]) / len(losses[-5:]):.4f}")
    print(f"loss curves: {tmp / 'loss_curves.png'}; per-step losses in {tmp}/*/result.json")

    def mean(name, of):
        return statistics.mean(of(*runs[name, seed]) for seed in seeds)

    for name in arms:
        accuracies = [runs[name, seed][2] for seed in seeds]
        print(f"{name}: over {len(seeds)} seed(s): held-back reward accuracy mean {statistics.mean(accuracies):.1%}"
              f" (min {min(accuracies):.1%}, max {max(accuracies):.1%})")
    over = f" (means over {len(seeds)} seeds)" if len(seeds) > 1 else ""
    if {"trl", "ours_kept"} <= set(arms):
        kept = mean("trl", lambda r, rss, a: a) - mean("ours_kept", lambda r, rss, a: a)
        print(f"on the same training pairs{over}: ours_kept's held-back reward accuracy against TRL's: "
              f"{-kept * 100:+.1f} points")
    if not {"trl", "ours"} <= set(arms):
        return
    speed = mean("ours", lambda r, rss, a: r["tokens"] / r["seconds"]) / mean(
        "trl", lambda r, rss, a: r["tokens"] / r["seconds"])
    memory = mean("ours", lambda r, rss, a: rss) / mean("trl", lambda r, rss, a: rss)
    gap = mean("trl", lambda r, rss, a: a) - mean("ours", lambda r, rss, a: a)
    print(f"\ntargets{over}: peak RSS <= 0.7x TRL's: {memory:.2f}x {'met' if memory <= 0.7 else 'NOT met'};  "
          f"throughput >= 1.5x TRL's: {speed:.2f}x {'met' if speed >= 1.5 else 'NOT met'};  "
          f"held-back reward accuracy within 3 points of TRL's: {-gap * 100:+.1f} points "
          f"{'met' if gap <= 0.03 else 'NOT met'}")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
