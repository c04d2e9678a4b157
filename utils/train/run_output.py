"""What a training run writes: checkpoints (and which one a run resumes from), the final files moved into place
together, run_config.json's record and loss.png.

The Trainer writes a checkpoint's files one after another and trainer_state.json last, so a checkpoint cut
short (a full disk, a kill) lacks it or holds half of it. Such a folder is never resumed from.
"""
import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from utils.core.cli import is_main_process
from utils.core.errors import UserError
from utils.core.flags import recorded_flags
from utils.core.run_folder import write_run_config
from utils.model.distributed import whole_trainable_weights

# what a complete checkpoint holds, each under one of its names: the optimizer's state is one file, FSDP's
# sharded folder, or DeepSpeed's `latest` (naming its global_stepN/ folder)
NEEDED = (("adapter_model.safetensors", "adapter_model.bin"), ("adapter_config.json",),
          ("optimizer.pt", "optimizer_0", "latest"), ("scheduler.pt",), ("trainer_state.json",))


_STEP = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_problem(folder):
    """Why `folder` cannot be resumed from, or None when it is a complete checkpoint."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        return f"{folder} is not a folder"
    missing = [names[0] for names in NEEDED if not any((folder / name).exists() for name in names)]
    if missing:
        return f"{folder} is not a complete checkpoint (it lacks {', '.join(missing)})"
    try:
        json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"{folder}/trainer_state.json is cut short or unreadable"
    return None


def checkpoints(output_dir):
    """The checkpoint-N folders of a run, oldest step first."""
    found = [(int(m.group(1)), p) for p in Path(output_dir).expanduser().glob("checkpoint-*")
             if (m := _STEP.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_complete(output_dir):
    """(the newest complete checkpoint or None, the newer incomplete ones that were passed over)."""
    skipped = []
    for folder in reversed(checkpoints(output_dir)):
        if checkpoint_problem(folder) is None:
            return folder, skipped
        skipped.append(folder)
    return None, skipped


def resume_point(output_dir, resume_from_checkpoint, overwrite, dry_run):
    """finetune's --resume_from_checkpoint against --output_dir: (the checkpoint to resume from or None, the
    newer cut-short checkpoints passed over, a problem sentence or None). A folder holding a run is not
    written over unless the run is resumed or --overwrite_output_dir is given."""
    if not isinstance(output_dir, str):  # --output_dir itself is wrong, and said so
        return None, [], None
    out, resume, skipped = Path(output_dir), resume_from_checkpoint or None, []
    if resume is True:
        resume, skipped = latest_complete(out)
        if resume is None:
            cut = (f" ({', '.join(p.name for p in skipped)} {'was' if len(skipped) == 1 else 'were'} cut short)"
                   if skipped else "")
            return None, skipped, (f"--resume_from_checkpoint=True but {out} holds no complete checkpoint-N folder"
                                   f"{cut}; pass a checkpoint folder, or drop the flag")
    elif resume is not None and not isinstance(resume, str):
        return None, [], f"--resume_from_checkpoint must be a checkpoint folder or True, got {resume!r}"
    elif resume is not None and (problem := checkpoint_problem(resume)):
        return None, [], (f"--resume_from_checkpoint: {problem}; "
                          "pass a checkpoint-N folder finetune.py wrote, or True")
    if (resume is None and overwrite is not True and dry_run is not True
            and (checkpoints(out) or (out / "adapter_config.json").exists())):
        return None, [], (f"{out} already holds a run; pass --resume_from_checkpoint=True to continue it, "
                          "--overwrite_output_dir=True to replace it, or another --output_dir")
    return resume, skipped, None


def remove_incomplete(output_dir):
    """Delete the checkpoint folders a failed write left half-done; returns their names."""
    removed = []
    for folder in checkpoints(output_dir):
        if checkpoint_problem(folder) is not None:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
    return removed


@contextlib.contextmanager
def cleaned_up_on_write_errors(output_dir):
    """Around training: a write error (a full disk) removes the checkpoint it cut short and becomes one
    sentence; the complete checkpoints stay, for --resume_from_checkpoint=True."""
    try:
        yield
    except OSError as e:
        removed = remove_incomplete(output_dir) if is_main_process() else []
        raise UserError(f"writing to {output_dir} failed ({e.strerror or e})"
                        + (f"; removed the cut-short {', '.join(removed)}" if removed else "")
                        + "; free some disk space, then continue with --resume_from_checkpoint=True.") from None


@contextlib.contextmanager
def staged(output_dir):
    """A hidden folder inside output_dir to save the final files into; they are moved into output_dir only once
    all of them are written, so a failed save leaves the folder as it was."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=".saving-", dir=output_dir))
    try:
        yield folder
        for path in sorted(folder.iterdir()):
            os.replace(path, output_dir / path.name)
    except OSError as e:
        raise UserError(f"saving the adapter into {output_dir} failed ({e.strerror or e}); nothing was replaced; "
                        "free some disk space, then continue with --resume_from_checkpoint=True.") from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def save_run(output_dir, model, tokenizer, config, log_history, engine=None):
    """finetune's final files: the adapter, the tokenizer, run_config.json (`config`) and loss.png, moved into
    output_dir together once every one is written. Every process calls it, and global rank 0 writes: under an
    `engine` that shards the weights (utils/model/distributed) all of them take part in gathering the LoRA weights."""
    from utils.model.lora import save_adapter  # late: imports torch (flag checks stay torch-free)

    with whole_trainable_weights(model, engine):
        if not is_main_process():
            return
        with staged(output_dir) as folder:
            save_adapter(model, folder)
            tokenizer.save_pretrained(folder)
            write_run_config(folder, config)
            plot_loss(log_history, folder / "loss.png")


def run_config(base_model, model_path, settings, flags, bits, dtype, trust_remote_code, lora, data, train, val, args,
               training, preference=None):
    """run_config.json's content (what merge, chat, evaluation and --config read back): `settings` the data
    settings (stage, template, cutoff_len, block_size, train_on_inputs), `flags` main's flags (data_path as
    resolved), `data` the whole tokenized set and `train`/`val` its parts, `args` the TrainingArguments,
    `training` the run's figures (epochs, steps, train loss, ...); `preference` the --stage dpo settings."""
    return {
        "base_model": base_model, "base_model_path": model_path, "stage": settings["stage"],
        "template": settings["template"], "cutoff_len": settings["cutoff_len"],
        "block_size": settings["block_size"] if settings["stage"] == "pt" else None,
        "train_on_inputs": settings["train_on_inputs"], "bits": bits, "dtype": str(dtype).replace("torch.", ""),
        "trust_remote_code": trust_remote_code, "lora": lora, "flags": recorded_flags(flags),
        **({"preference": preference} if preference else {}),
        "data": {"path": str(flags["data_path"]), **data.stats, "max_samples": flags["max_samples"],
                 "train_examples": len(train), "validation_examples": len(val or ()),
                 "tokens_min": int(data.lengths().min()), "tokens_max": int(data.lengths().max()),
                 "train_tokens": int(train.lengths().sum())},
        "training": {"learning_rate": args.learning_rate, "seed": args.seed,
                     "per_device_train_batch_size": args.per_device_train_batch_size,
                     "gradient_accumulation_steps": args.gradient_accumulation_steps,
                     "activation_checkpointing": args.gradient_checkpointing, **training},
    }


def plot_loss(log_history, path):
    """loss.png: training and evaluation loss against the step; for preference training (--stage dpo) a second
    panel with the reward margin and accuracy (rewards/margins, rewards/accuracies)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rewards = [key for key in ("rewards/margins", "rewards/accuracies", "eval_rewards/margins",
                               "eval_rewards/accuracies") if any(key in h for h in log_history)]
    fig, axes = plt.subplots(1, 2 if rewards else 1, figsize=(12 if rewards else 7, 4), squeeze=False)
    for ax, keys in zip(axes[0], ((("loss", "train"), ("eval_loss", "eval")), [(k, k) for k in rewards])):
        for key, label in keys:
            points = [(h["step"], h[key]) for h in log_history if key in h]
            if points:
                ax.plot(*zip(*points), marker="o" if key.startswith("eval") else ".", label=label)
        ax.set_xlabel("step")
        ax.set_ylabel("loss" if ax is axes[0][0] else "reward margin, accuracy")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
