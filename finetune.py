"""LoRA / QLoRA fine-tuning of a LLaMA-family model on instruction data or raw text.

    python finetune.py                                   # built-in SmolLM2-135M on data/demo.json
    python finetune.py --base_model=path/to/llama --data_path=my.json --output_dir=output/
    python finetune.py --use_4bit                                    # QLoRA (memory first: see README)
    python finetune.py --stage=pt --data_path=data/pt_demo.txt      # continued pretraining
    python finetune.py --stage=dpo --lora_model=output/ --output_dir=dpo/  # preference pairs after SFT (README)
    torchrun --nproc_per_node=2 finetune.py ... [--deepspeed=zero3]  # several devices (sharded: README)
    python finetune.py --dry_run                                     # only check and summarise the data

Writes to --output_dir: the adapter, tokenizer, run_config.json (what later stages need), loss.png, report.md/json.
"""
import functools
import math
import os
import time
from pathlib import Path

from utils.core.cli import is_main_process, run_cli
from utils.core.files import output_problem
from utils.core.flags import OPTIMIZERS, SCHEDULERS, Checks, report_to_list
from utils.core.run_folder import BUILTIN, continued_run
from utils.data.encoding import Collator, Encoder, split_validation, summary
from utils.data.preference import PREF_DEMO, Pairs, PreferenceEncoder, pair_summary, preference_flags
from utils.data.records import PT_SUFFIXES, SFT_SUFFIXES, data_files
from utils.data.templates import resolve_template
from utils.data.token_store import tokenized
from utils.model.distributed import adapter_in_checkpoints, deepspeed_config, engine, sharding_problem, training_under
from utils.model.loading import (
    check_remote_code,
    load_tokenizer,
    pick_device,
    pick_dtype,
    resolve_model_path,
    ships_code,
)
from utils.train.report import end_of_run_report, read_probes
from utils.train.run_output import cleaned_up_on_write_errors, resume_point, run_config, save_run

DEMO_DATA = Path(__file__).resolve().parent / "data" / "demo.json"
ALIASES = {"load_8bit": "use_8bit", "load_4bit": "use_4bit", "dtype": "precision", "overwrite": "overwrite_output_dir"}


def main(
    # model
    base_model: str = BUILTIN, lora_model: str = None, local_files_only: bool = False, trust_remote_code: bool = False,
    # data
    data_path: str = str(DEMO_DATA), output_dir: str = "output", stage: str = "sft", template: str = "auto",
    cutoff_len: int = 512, block_size: int = 512, val_set_size: float = 0, val_data_path: str = None,
    train_on_inputs: bool = False, max_samples: int = None, dry_run: bool = False, data_cache: bool = True,
    preprocessing_num_workers: int = None, pref_loss: str = "dpo", pref_beta: float = 0.1, simpo_gamma: float = 0.5,
    pref_ftx: float = 0.0,
    # LoRA
    lora_r: int = 8, lora_alpha: int = 16, lora_dropout: float = 0.0, lora_target_modules="auto", modules_to_save=None,
    use_8bit: bool = False, use_4bit: bool = False, bits: int = 16, precision: str = "auto",  # quantization, precision
    per_device_train_batch_size: int = 8, gradient_accumulation_steps: int = 1, num_epochs="auto",  # training
    max_steps: int = -1, learning_rate: float = None, lr_scheduler_type: str = "cosine", warmup_ratio: float = 0.03,
    weight_decay: float = 0.0, logging_steps: int = 5, save_steps: int = 200, save_total_limit: int = 3,
    eval_steps: int = None, gradient_checkpointing="auto", packing: bool = True, seed: int = 42,
    resume_from_checkpoint=None, overwrite_output_dir: bool = False, report: bool = True, probe_prompts=None,
    report_to="none", config: str = None, optim: str = "adamw_torch", max_grad_norm: float = 1.0, deepspeed: str = None,
):
    """Fine-tune a base model with LoRA (or QLoRA) and save the adapter.

    Args:
        base_model: hub id, local HF model folder, or "builtin:smollm2" (the built-in SmolLM2-135M-Instruct).
        lora_model: an adapter folder (a finetune.py output) to train further, with its own LoRA settings and base.
        local_files_only: never contact the model hub.
        trust_remote_code: run the Python code a model ships (Baichuan, InternLM, ...); recorded for later stages.
        data_path: JSON/JSONL files, folders or globs of them, joined by commas (data/README.md); .txt for pt.
        output_dir: where the adapter, tokenizer, run_config.json, loss.png and checkpoints go.
        stage: "sft" for instruction tuning, "pt" for continued pretraining on raw text, "dpo" for preference pairs.
        template: auto (the tokenizer's chat template, else alpaca), prompt, alpaca, chatml, llama3, vicuna, a .json.
        cutoff_len: maximum tokens per sft example; longer ones lose their oldest context, never their answer's EOS.
        block_size: tokens per block for --stage pt.
        val_set_size: examples held out for evaluation: a count, or a fraction below 1.
        val_data_path: a separate validation file (instead of --val_set_size).
        train_on_inputs: also train on prompt tokens (by default they are masked out of the loss).
        max_samples: use only the first N records of --data_path (in file order).
        dry_run: validate the data, print its summary, and exit without loading the model.
        data_cache: reuse tokenized data from the cache (keyed by a hash of the data, tokenizer and settings).
        preprocessing_num_workers: processes that tokenize (default: the usable CPU cores).
        lora_r: LoRA rank.
        lora_alpha: LoRA alpha (the update is scaled by alpha / r).
        lora_dropout: dropout on the LoRA input (0 by default: on a CPU its random masks cost a fifth of a step).
        lora_target_modules: "auto" (every linear projection in the decoder layers) or names, e.g. q_proj,v_proj.
        modules_to_save: modules trained in full and saved with the adapter, e.g. embed_tokens,lm_head.
        use_8bit: load the base model in 8 bits (bitsandbytes); older name: --load_8bit.
        use_4bit: QLoRA: load the base model in 4-bit NF4 with double quantization; older name: --load_4bit.
        bits: 4, 8 or 16; the same as --use_4bit / --use_8bit.
        precision: auto (bf16 where fast, else fp16 on GPU, fp32 on CPU), bf16, fp16 or fp32 (also --dtype).
        per_device_train_batch_size: examples per device per step.
        gradient_accumulation_steps: steps accumulated per optimizer update.
        num_epochs: passes over the data; auto: 3, more for small data (at least 75 updates, at most 10).
        max_steps: stop after this many optimizer updates (-1: use num_epochs).
        learning_rate: peak learning rate; default 5e-4, or 2e-4 with --stage=dpo (README).
        lr_scheduler_type: linear, cosine, cosine_with_restarts, polynomial, constant[_with_warmup], inverse_sqrt.
        warmup_ratio: fraction of the updates spent warming up.
        weight_decay: AdamW weight decay.
        logging_steps: log the loss every N updates.
        save_steps: save a checkpoint every N updates.
        save_total_limit: keep at most N checkpoints.
        eval_steps: evaluate every N updates (default: --save_steps) when there is validation data.
        gradient_checkpointing: True, False, or auto (on for 4/8-bit, or when the activations would not fit).
        packing: pack each batch into one row without padding (same loss, less compute).
        seed: random seed for LoRA init, shuffling and dropout.
        resume_from_checkpoint: a checkpoint folder, or True for the latest one in --output_dir.
        overwrite_output_dir: allow writing into an --output_dir that holds an earlier run (also --overwrite).
        report: end with report.md/json: base vs tuned answers to validation prompts and probes (greedy).
        probe_prompts: a .json or .txt file of prompts, or prompts (default: data/probes.json, + demo_probes.json).
        report_to: none, or where the Trainer also logs: tensorboard, wandb, swanlab, mlflow (comma-separated).
        config: a run's run_config.json, or a JSON/YAML file of flags, to repeat; flags given here override it.
        optim: the optimizer: adamw_torch, adamw_torch_fused, adamw_8bit, paged_adamw_8bit, adafactor, sgd.
        max_grad_norm: clip the gradients' global norm to this (0: no clipping).
        deepspeed: a DeepSpeed config: zero2, zero3, zero3_offload (configs/deepspeed/) or a .json (README).
        pref_loss: --stage dpo's loss: dpo, ipo, orpo, simpo (no reference model), kto (unpaired, labelled answers).
        pref_beta: the preference loss's beta (orpo: the weight of its odds-ratio term).
        simpo_gamma: SimPO's target reward margin.
        pref_ftx: with dpo, ipo, simpo: the weight of an added NLL of the chosen answers (LLaMA-Factory's name).
    """
    flags = dict(locals())  # recorded in run_config.json, for --config
    # --- check the arguments, all at once ---------------------------------------------------------
    c = Checks()
    base_model, output_dir = c.text("base_model", base_model, True), c.text("output_dir", output_dir, True)
    template, val_data_path = c.text("template", template), c.text("val_data_path", val_data_path)
    data_path = data_path if isinstance(data_path, (list, tuple)) else c.text("data_path", data_path, True)
    (local_files_only, train_on_inputs, dry_run, data_cache, use_8bit, use_4bit, packing, overwrite_output_dir,
     trust_remote_code) = (c.boolean(n, flags[n]) for n in (
        "local_files_only", "train_on_inputs", "dry_run", "data_cache", "use_8bit", "use_4bit", "packing",
        "overwrite_output_dir", "trust_remote_code"))
    stage, pref_loss, pref_beta, simpo_gamma, pref_ftx, adapter = preference_flags(
        c, stage, pref_loss, pref_beta, simpo_gamma, pref_ftx, lora_model, (data_path, val_data_path), train_on_inputs)
    precision = c.choice("precision", precision, ("auto", "bf16", "fp16", "fp32"))
    lr_scheduler_type = c.choice("lr_scheduler_type", lr_scheduler_type, SCHEDULERS)
    cutoff_len, block_size = c.integer("cutoff_len", cutoff_len, 1), c.integer("block_size", block_size, 2)
    per_device_train_batch_size = c.integer("per_device_train_batch_size", per_device_train_batch_size, 1)
    gradient_accumulation_steps = c.integer("gradient_accumulation_steps", gradient_accumulation_steps, 1)
    logging_steps, save_steps = c.integer("logging_steps", logging_steps, 1), c.integer("save_steps", save_steps, 1)
    save_total_limit, eval_steps = (c.integer(n, flags[n], 1, none=True) for n in ("save_total_limit", "eval_steps"))
    max_samples = flags["max_samples"] = c.integer("max_samples", max_samples, 1, none=True)  # as checked
    preprocessing_num_workers = c.integer("preprocessing_num_workers", preprocessing_num_workers, 1, none=True)
    max_steps, seed = c.integer("max_steps", max_steps, -1), c.integer("seed", seed, 0)
    c.add("--max_steps must be -1 (train --num_epochs) or above 0, got 0" if max_steps == 0 else None)
    num_epochs = num_epochs if num_epochs == "auto" else c.number("num_epochs", num_epochs, 0, above_low=True)
    learning_rate = c.number("learning_rate", learning_rate, 0, above_low=True, none=True)
    lora_r, lora_alpha = c.integer("lora_r", lora_r, 1), c.number("lora_alpha", lora_alpha, 0, above_low=True)
    lora_dropout = c.number("lora_dropout", lora_dropout, 0, 1, below_high=True)
    warmup_ratio = c.number("warmup_ratio", warmup_ratio, 0, 1, below_high=True)
    weight_decay, val_set_size = c.number("weight_decay", weight_decay, 0), c.number("val_set_size", val_set_size, 0)
    if gradient_checkpointing != "auto":
        gradient_checkpointing = c.boolean("gradient_checkpointing", gradient_checkpointing)
    bits = 4 if use_4bit is True else 8 if use_8bit is True else c.choice("bits", bits, (4, 8, 16))
    c.add("--use_4bit and --use_8bit exclude each other" if use_4bit is True and use_8bit is True else None)
    c.add("pass either --val_set_size or --val_data_path, not both" if val_set_size and val_data_path else None)
    targets, to_save = c.names("lora_target_modules", lora_target_modules), c.names("modules_to_save", modules_to_save)
    c.add(output_problem(output_dir, "output_dir") if isinstance(output_dir, str) else None)
    resume, skipped, problem = resume_point(output_dir, resume_from_checkpoint, overwrite_output_dir, dry_run)
    c.add(problem)
    report, probes = c.boolean("report", report), c.call(read_probes, probe_prompts, data_path == str(DEMO_DATA))
    data_path = flags["data_path"] = str(PREF_DEMO) if stage == "dpo" and data_path == str(DEMO_DATA) else data_path
    report_to = c.call(report_to_list, report_to, default=[])
    optim, max_grad_norm = c.choice("optim", optim, OPTIMIZERS), c.number("max_grad_norm", max_grad_norm, 0)
    c.add(sharding_problem(deepspeed := c.call(deepspeed_config, deepspeed), bits, stage))
    c.done()
    out, say = Path(output_dir), print if is_main_process() else (lambda *a, **k: None)

    # --- data: validated and tokenized before any model loads -------------------------------------
    t0 = time.time()
    files = data_files(data_path, suffixes := PT_SUFFIXES if stage == "pt" else SFT_SUFFIXES, "data_path")
    val_files = data_files(val_data_path, suffixes, "val_data_path") if val_data_path else []
    base_model, sft_run = continued_run(adapter, base_model)  # a continued adapter keeps its base and template
    model_path = resolve_model_path(base_model, local_files_only)
    check_remote_code(model_path, trust_remote_code)
    tokenizer = load_tokenizer(model_path, local_files_only, trust_remote_code)
    tmpl = resolve_template(template, tokenizer, sft_run)  # pt trains without it, but chat after pt uses it
    encoder = (PreferenceEncoder(tokenizer, tmpl, cutoff_len, pref_loss == "kto") if stage == "dpo"
               else Encoder(tokenizer, stage, tmpl, cutoff_len, train_on_inputs, block_size))
    settings = {"stage": encoder.stage, "template": tmpl.to_dict(), "cutoff_len": cutoff_len,
                "block_size": block_size, "train_on_inputs": train_on_inputs}
    cpus, view = preprocessing_num_workers, Pairs if encoder.stage == "dpo" else (lambda store: store)  # kto: as is
    data = view(tokenized(files, encoder, settings, data_cache, cpus, max_samples, "data_path"))
    val = view(tokenized(val_files, encoder, settings, data_cache, cpus, None, "val_data_path")) if val_files else None
    train_index, held = split_validation(len(data), val_set_size, seed)
    train, val = data.subset(train_index), val if val is not None else data.subset(held) if len(held) else None
    say(f"template: {tmpl.name}   stage: {stage}   data: {data_path}   processes: {os.environ.get('WORLD_SIZE', 1)}")
    say((pair_summary if isinstance(data, Pairs) else summary)(data, data.stats, tokenizer))
    say(f"train examples: {len(train):,}, validation examples: {len(val or ()):,}   (tokenized data: train "
        f"{data.origin()}{f'; validation {val.origin()}' if val_files else ''}; {time.time() - t0:.1f} s in all)")
    if dry_run:
        return say("dry run: data is valid; no model was loaded and nothing was written.")

    # --- the Trainer's arguments, then the model (ZeRO-3 must be set up first, to load the model sharded) ---------
    import torch
    from transformers import Trainer, TrainingArguments, set_seed

    from utils.train.callbacks import run_loss_callback, throughput_callback
    from utils.train.fast import causal_lm_loss
    from utils.train.preference_trainer import preference_trainer
    from utils.train.setup import auto_epochs, auto_learning_rate, lora_for_training

    set_seed(seed)
    dtype = pick_dtype(precision, device := pick_device())
    if packing and ships_code(model_path):
        packing = say("packing off: the model's own code does not keep packed examples apart") or False
    num_epochs = auto_epochs(len(train), per_device_train_batch_size * gradient_accumulation_steps, num_epochs, stage)
    learning_rate = auto_learning_rate(learning_rate, stage)
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=per_device_train_batch_size, optim=optim, seed=seed,
        per_device_eval_batch_size=per_device_train_batch_size, gradient_accumulation_steps=gradient_accumulation_steps,
        num_train_epochs=num_epochs, max_steps=max_steps, learning_rate=learning_rate, weight_decay=weight_decay,
        lr_scheduler_type=lr_scheduler_type, warmup_steps=warmup_ratio, max_grad_norm=max_grad_norm, data_seed=seed,
        deepspeed=deepspeed, logging_steps=logging_steps, logging_first_step=True, save_steps=save_steps,
        save_total_limit=save_total_limit, eval_strategy="steps" if val is not None else "no", use_cpu=device == "cpu",
        eval_steps=eval_steps or save_steps, activation_checkpointing_kwargs={"use_reentrant": False},
        fp16=dtype == torch.float16, bf16=dtype == torch.bfloat16, report_to=report_to or "none",
        remove_unused_columns=False, ddp_find_unused_parameters=False,
        include_num_input_tokens_seen="all" if packing else "non_padding")  # a packed row has no padding
    sharding = engine(args)  # zero3, fsdp2 shard the weights: the fast path steps aside there
    lora = dict(r=lora_r, alpha=lora_alpha, dropout=lora_dropout, target_modules=targets, modules_to_save=to_save)
    length = block_size if stage == "pt" else cutoff_len * (1 + (stage == "dpo"))  # dpo: a pair's row
    model, head, gradient_checkpointing, banner = lora_for_training(
        model_path, dtype, bits, device, lora, gradient_checkpointing, per_device_train_batch_size * length, length,
        local_files_only, trust_remote_code, sharding, adapter)
    args.activation_checkpointing = args.gradient_checkpointing = gradient_checkpointing
    say(f"{banner}   model: {base_model}   epochs: {num_epochs}{' (auto)' if flags['num_epochs'] == 'auto' else ''}")

    # --- train ------------------------------------------------------------------------------------
    hooks = [speed := throughput_callback(), run_loss := run_loss_callback(), adapter_in_checkpoints(model, sharding)]
    if stage == "dpo":  # with its reference log-probs, computed now: before a checkpoint loads (README)
        trainer = preference_trainer((pref_loss, pref_beta, simpo_gamma, pref_ftx, adapter), model, args, train, val,
                                     tokenizer.pad_token_id, packing, head, hooks)
    else:
        loss = functools.partial(causal_lm_loss, head=head, workspace=None if bits < 16 else {})
        trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val, compute_loss_func=loss,
                          data_collator=Collator(tokenizer.pad_token_id, packing), callbacks=hooks)
    if skipped:
        say(f"resuming from {resume.name}; passed over {', '.join(p.name for p in skipped)}, "
            "cut short by an earlier run")
    with cleaned_up_on_write_errors(out), training_under(trainer, sharding):
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    train_loss = run_loss.mean(trainer.state, result.training_loss)  # the whole run's, also after a resume
    eval_loss = trainer.evaluate()["eval_loss"] if val is not None else None

    # --- save: adapter, tokenizer, run config, loss plot; the report (rank 0 only) ----------------
    save_run(out, model, tokenizer, run_config(  # every rank: under ZeRO-3 and FSDP2 all gather the LoRA weights
        base_model, model_path, {**settings, "stage": stage}, flags, bits, dtype, trust_remote_code, lora, data, train,
        val, args, {"epochs": num_epochs, "steps": result.global_step, "engine": sharding, "tokens_per_second":
                    speed.tokens_per_second, "train_loss": train_loss if math.isfinite(train_loss) else None},
        getattr(trainer, "pref", None)), trainer.state.log_history, sharding)
    if trainer.is_world_process_zero():
        say(f"wrote the adapter, tokenizer, run_config.json and loss.png to {out}/ in {time.time() - t0:.0f} s "
            f"({result.global_step} steps, train loss {train_loss:.3f}, {speed.tokens_per_second or 0:.0f} tokens/s)")
        if report:
            end_of_run_report(model, tokenizer, tmpl, out, stage, val, probes, eval_loss, say=say, engine=sharding)


if __name__ == "__main__":
    run_cli(main, aliases=ALIASES)
