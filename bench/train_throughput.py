"""Training throughput: the tutorial recipe vs TRL's packed SFTTrainer vs our finetune.py defaults.

    python bench/train_throughput.py              # built-in SmolLM2, 64 alpaca_en_demo records, cutoff 512, batch 8
    python bench/train_throughput.py --use_4bit   # NF4 vs bf16 LoRA: tokens/s and peak RSS on a random 1B
                                                  # TinyLlama-shaped model

Every arm runs in its own child process on the same tokenized records (one epoch, the same learning rate and
schedule); peak RSS is polled from outside. Tokens/s counts real (non-pad) tokens after the first update.
Eval loss is computed afterwards by one piece of code for every adapter, on 50 held-back records, in fp32.
Needs ../shared/data/alpaca_en_demo.json; skips with a message without it. TRL runs if `trl` is installed.
"""
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "alpaca_en_demo.json"
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tokenized(records, cutoff_len):
    from utils.data.encoding import encode_dialogs
    from utils.data.records import to_dialog
    from utils.data.templates import load_template
    from utils.model.builtin import builtin_path
    from utils.model.loading import load_tokenizer

    tokenizer = load_tokenizer(builtin_path())
    template = load_template("auto", tokenizer)
    dialogs = [to_dialog(r, f"record {i}") for i, r in enumerate(records, 1)]
    return encode_dialogs(dialogs, tokenizer, template, cutoff_len)[0], tokenizer


def run_arm(arm, out, records, cutoff_len, batch, lr, base_model):
    """One arm, in this (child) process; writes {tokens_per_second, ...} to out/result.json."""
    import torch
    from transformers import TrainerCallback

    out = Path(out)
    if arm.startswith("ours"):
        import finetune

        data = out / "train.json"
        data.write_text(json.dumps(records, ensure_ascii=False))
        finetune.main(base_model=base_model, data_path=str(data), output_dir=str(out / "adapter"), num_epochs=1,
                      per_device_train_batch_size=batch, learning_rate=lr, cutoff_len=cutoff_len, lora_dropout=0.0,
                      use_4bit=arm == "ours-4bit", save_steps=10**6, data_cache=False,
                      max_steps=3 if base_model != "builtin:smollm2" else -1,
                      gradient_checkpointing=True if arm == "ours-checkpointed" else "auto")
        speed = json.loads((out / "adapter" / "run_config.json").read_text())["training"]["tokens_per_second"]
        (out / "result.json").write_text(json.dumps({"tokens_per_second": speed}))
        return

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from utils.model.builtin import builtin_path

    examples, tokenizer = tokenized(records, cutoff_len)
    model = AutoModelForCausalLM.from_pretrained(builtin_path(), dtype=torch.float32)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=PROJECTIONS,
                                             task_type="CAUSAL_LM"))

    class Clock(TrainerCallback):  # real tokens per second after the first update, as finetune.py measures it
        rate = None

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                self.t0, self.n0 = time.perf_counter(), state.num_input_tokens_seen
            else:
                self.rate = (state.num_input_tokens_seen - self.n0) / (time.perf_counter() - self.t0)

    clock = Clock()
    common = dict(output_dir=str(out / "adapter"), per_device_train_batch_size=batch, num_train_epochs=1,
                  learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=0.03, logging_steps=1, save_strategy="no",
                  report_to="none", use_cpu=True, seed=42)
    if arm == "baseline":  # the tutorial recipe: padded batches, gradient checkpointing, fp32
        model.enable_input_require_grads()
        pad = DataCollatorForSeq2Seq(tokenizer, padding=True)

        def collate(features):
            return pad([{"input_ids": f["input_ids"], "attention_mask": [1] * len(f["input_ids"]),
                         "labels": f["labels"]} for f in features])

        args = TrainingArguments(**common, gradient_checkpointing=True, remove_unused_columns=False,
                                 include_num_input_tokens_seen="non_padding")
        trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=collate, callbacks=[clock])
    else:  # TRL's SFTTrainer, BFD packing and padding-free batches (no pad tokens at all), fp32
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        dataset = Dataset.from_list([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples])
        args = SFTConfig(**common, packing=True, packing_strategy="bfd", padding_free=True, max_length=cutoff_len,
                         include_num_input_tokens_seen="all")
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                             callbacks=[clock])
    trainer.train()
    model.save_pretrained(out / "adapter")
    (out / "result.json").write_text(json.dumps({"tokens_per_second": clock.rate}))


def child(arm, out, script=__file__, **kw):
    """Run one arm of `script` (a bench taking --arm, --out and flags `kw`, writing out/result.json) in a child
    process, polling its peak RSS; returns (result, peak_rss_bytes, seconds)."""
    import psutil

    cmd = [sys.executable, script, "--arm", arm, "--out", str(out)] + [f"--{k}={v}" for k, v in kw.items()]
    t0, peak = time.time(), 0
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(Path(out) / "stderr.log", "w"))
    ps = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            peak = max(peak, sum(p.memory_info().rss for p in [ps] + ps.children(recursive=True)))
        except psutil.Error:
            pass
        time.sleep(0.1)
    if proc.returncode:
        sys.exit(f"{arm} failed; see {out}/stderr.log:\n" + (Path(out) / "stderr.log").read_text()[-2000:])
    return json.loads((Path(out) / "result.json").read_text()), peak, time.time() - t0


def matmul_peak(dtype, n=1024, seconds=3.0):
    import torch

    a, b = torch.randn(n, 4 * n, dtype=dtype), torch.randn(4 * n, n, dtype=dtype)
    a @ b
    t0, count = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        a @ b
        count += 1
    return 2 * n * 4 * n * n * count / (time.perf_counter() - t0)


def eval_loss(adapter, examples, batch=8):
    """Token-mean loss of base + adapter on examples, fp32, padded batches: the same code for every arm."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from utils.data.encoding import Collator
    from utils.model.builtin import builtin_path

    model = AutoModelForCausalLM.from_pretrained(builtin_path(), dtype=torch.float32)
    if adapter:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch):
            b = Collator(0, packing=False)(examples[i:i + batch])
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
            labels = b["labels"][:, 1:]
            total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                                       reduction="sum").item()
            count += int((labels != -100).sum())
    return total / count


def main(records=64, cutoff_len=512, batch=8, lr=5e-4, use_4bit=False, qlora=False, arm=None, out=None,
         base_model="builtin:smollm2", arms=None):
    """Args: records, cutoff_len, batch, lr: the setting. use_4bit (or qlora): the NF4 vs bf16 LoRA memory bench
    instead.
    arms: comma-separated subset of baseline,trl,ours to run (default all; the targets need all three)."""
    if not DATA.is_file():
        print(f"skipped: {DATA} is absent (it holds the benchmark data)")
        return
    data = json.loads(DATA.read_text())
    if arm:
        return run_arm(arm, out, data[:records], cutoff_len, batch, lr, base_model)
    import importlib.util

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the eval loads would print "Loading weights" bars into the table
    tmp = Path(tempfile.mkdtemp(prefix="train-bench-"))
    peak_bf16, peak_fp32 = matmul_peak(torch.bfloat16), matmul_peak(torch.float32)
    print(f"matmul peak on this machine: bf16 {peak_bf16 / 1e9:.0f} GFLOP/s, fp32 {peak_fp32 / 1e9:.0f} GFLOP/s "
          f"({torch.get_num_threads()} threads)")
    if use_4bit or qlora:
        return qlora_bench(tmp, data, cutoff_len, lr)
    from utils.core.errors import as_list

    chosen = as_list(arms, "arms") or ["baseline", "trl", "ours"]
    arms = [a for a in ["baseline", "trl", "ours"] if a in chosen]
    if "trl" in arms and not importlib.util.find_spec("trl"):
        arms.remove("trl")
        print("TRL is not installed: its arm is skipped (pip install trl==1.16.0 to include it)")
    held, _ = tokenized(data[records:records + 50], cutoff_len)
    results = {}
    for name in arms:
        (tmp / name).mkdir()
        results[name] = child(name, tmp / name, records=records, cutoff_len=cutoff_len, batch=batch, lr=lr)
        print(f"  {name:9s} done in {results[name][2]:.0f} s", flush=True)
    from utils.model.builtin import builtin_path
    from utils.model.loading import load_model

    model = load_model(builtin_path(), torch.float32)
    cfg = model.config
    n_matmul = sum(m.weight.numel() for name, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    flops_per_token = 4 * n_matmul + 6 * cfg.num_hidden_layers * cutoff_len * cfg.hidden_size
    ceiling = peak_bf16 / flops_per_token
    print(f"\n{records} alpaca_en_demo records, cutoff {cutoff_len}, batch {batch}, 1 epoch, lr {lr}, "
          "LoRA r=8 on 7 projections")
    print(f"4·N ceiling: N = {n_matmul / 1e6:.0f}M matmul parameters, {flops_per_token / 1e6:.0f} MFLOP/token "
          f"incl. attention at {cutoff_len}"
          f" -> {ceiling:.0f} tokens/s in bf16, {peak_fp32 / flops_per_token:.0f} in fp32")
    print(f"{'arm':10s} {'tokens/s':>9s} {'vs baseline':>12s} {'of bf16 ceiling':>16s} {'peak RSS':>9s} "
          f"{'eval loss':>10s}")
    base_rate = results["baseline"][0]["tokens_per_second"] if "baseline" in results else float("nan")
    losses = {name: eval_loss(tmp / name / "adapter", held) for name in arms}
    for name in arms:
        rate, rss = results[name][0]["tokens_per_second"], results[name][1]
        print(f"{name:10s} {rate:9.1f} {rate / base_rate:11.2f}x {rate / ceiling:15.0%} {rss / 2**30:7.2f} GB "
              f"{losses[name]:10.4f}")
    print(f"(base model without adapter: eval loss {eval_loss(None, held):.4f})")
    if not {"baseline", "ours"} <= set(results):
        return
    ours = results["ours"][0]["tokens_per_second"]
    print(f"\ntargets: >= 5x baseline: {ours / base_rate:.2f}x {'met' if ours >= 5 * base_rate else 'NOT met'}", end="")
    if "trl" in results:
        trl = results["trl"][0]["tokens_per_second"]
        print(f";  >= 4x TRL: {ours / trl:.2f}x {'met' if ours >= 4 * trl else 'NOT met'}", end="")
    print(f";  >= 40% of bf16 ceiling: {ours / ceiling:.0%} {'met' if ours >= 0.4 * ceiling else 'NOT met'}", end="")
    worse = losses["ours"] / losses["baseline"] - 1
    print(f";  eval loss within 2% of baseline: {worse:+.1%} {'met' if worse <= 0.02 else 'NOT met'}")


def tinyllama_shaped(model_dir, tokenizer_dir=None):
    """A random model of TinyLlama-1.1B's shape with the built-in tokenizer (or the one in tokenizer_dir), saved in
    bf16 in 500 MB shards."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from utils.model.builtin import builtin_path
    from utils.model.loading import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir or builtin_path())
    config = LlamaConfig(hidden_size=2048, num_hidden_layers=22, intermediate_size=5632, num_attention_heads=32,
                         num_key_value_heads=4, vocab_size=len(tokenizer), max_position_embeddings=2048,
                         tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    print(f"random TinyLlama-shaped model: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters "
          f"(vocab {config.vocab_size})")
    model.save_pretrained(model_dir, max_shard_size="500MB")
    tokenizer.save_pretrained(model_dir)
    return model_dir


def qlora_bench(tmp, data, cutoff_len, lr):
    """bf16 LoRA vs NF4 QLoRA on a random model of TinyLlama-1.1B's shape (built here, bf16, 500 MB shards)."""
    model_dir = tinyllama_shaped(tmp / "tinyllama-shape")
    rows = {}
    names = {"ours": "bf16 LoRA", "ours-checkpointed": "  with activation checkpointing", "ours-4bit": "NF4 QLoRA"}
    for name in names:
        (tmp / name).mkdir()
        # one record per update: activations stay small next to the weights, whose footprint is what NF4 changes
        rows[name] = child(name, tmp / name, records=4, cutoff_len=256, batch=1, lr=lr, base_model=str(model_dir))
    print("\n3 updates of 1 alpaca record each (cutoff 256) on the 1B model, finetune.py defaults "
          "(NF4: activation checkpointing on)")
    for name, (result, rss, seconds) in rows.items():
        print(f"{names[name]:31s} {result['tokens_per_second']:5.1f} tokens/s   peak RSS {rss / 2**30:5.2f} GB   "
              f"({seconds:.0f} s)")
    ratio = rows["ours-4bit"][1] / rows["ours"][1]
    print(f"target: NF4 peak RSS <= 0.45x bf16 LoRA: {ratio:.2f}x {'met' if ratio <= 0.45 else 'NOT met'}"
          f"   (against bf16 LoRA with activation checkpointing: "
          f"{rows['ours-4bit'][1] / rows['ours-checkpointed'][1]:.2f}x)")


if __name__ == "__main__":
    import fire

    from utils.core.cli import quiet_dependency_notices

    quiet_dependency_notices()  # as the stage scripts do: the children's logs hold only what concerns the run
    fire.Fire(main)
