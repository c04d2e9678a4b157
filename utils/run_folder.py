"""The run folder finetune.py writes: its checkpoint-N/ folders, which a resume reads back, and the final files,
saved so that a failed write leaves nothing half-done.

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

from utils.errors import UserError, is_main_process

NEEDED = ("adapter_config.json", "optimizer.pt", "scheduler.pt", "trainer_state.json")
_STEP = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_problem(folder):
    """Why `folder` cannot be resumed from, or None when it is a complete checkpoint."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        return f"{folder} is not a folder"
    missing = [name for name in NEEDED if not (folder / name).is_file()]
    if not any((folder / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin")):
        missing.insert(0, "adapter_model.safetensors")
    if missing:
        return f"{folder} is not a complete checkpoint (it lacks {', '.join(missing)})"
    try:
        json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"{folder}/trainer_state.json is cut short or unreadable"
    return None


def checkpoints(output_dir):
    """The checkpoint-N folders of a run, oldest step first."""
    found = [(int(m.group(1)), p) for p in Path(output_dir).expanduser().glob("checkpoint-*") if (m := _STEP.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_complete(output_dir):
    """(the newest complete checkpoint or None, the newer incomplete ones that were passed over)."""
    skipped = []
    for folder in reversed(checkpoints(output_dir)):
        if checkpoint_problem(folder) is None:
            return folder, skipped
        skipped.append(folder)
    return None, skipped


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
        raise UserError(f"writing to {output_dir} failed ({e.strerror or e})" + (f"; removed the cut-short {', '.join(removed)}" if removed else "")
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
        raise UserError(f"saving the adapter into {output_dir} failed ({e.strerror or e}); nothing was replaced; free some disk space, "
                        "then continue with --resume_from_checkpoint=True.") from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)
