"""Files shared by every stage: where the cache lives, a lock that lets one process at a time build it, output
folders checked before work, and writes that never leave half a file."""
import contextlib
import fcntl
import json
import os
from pathlib import Path

from utils.core.errors import UserError

ROOT = Path(__file__).resolve().parents[2]  # the toolkit's folder: templates/, data/, configs/


def cache_dir():
    """Where converted models and tokenized data live: $LORA_KIT_CACHE, else $XDG_CACHE_HOME/lora-kit, else
    ~/.cache/lora-kit."""
    if os.environ.get("LORA_KIT_CACHE"):
        path = Path(os.environ["LORA_KIT_CACHE"]).expanduser()
    else:
        path = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lora-kit"
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and (not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK)):
        raise UserError(f"the cache folder {path} cannot be made or written ({existing} is "
                        f"{'a file' if not existing.is_dir() else 'not writable'}); set LORA_KIT_CACHE to a folder "
                        "you can write.")
    return path


def check_safetensors(path, fix):
    """Refuse a safetensors file whose header does not parse or lists bytes the file does not hold (a copy cut
    short): one sentence ending in `fix`. Only the header is read."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy"):
            pass
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} is damaged or cut short ({e}); {fix}.") from None


@contextlib.contextmanager
def locked(path):
    """Hold an exclusive lock on `path` (created if needed); other processes asking for it wait."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def output_problem(path, flag):
    """Why --flag=path cannot become an output folder (it is a file, or the nearest existing folder above it
    is not writable), or None when it can."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        return f"--{flag}={path} is a file, not a folder; pass a folder path"
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        return f"--{flag}={path} lies under {existing}, which is a file; pass a folder path"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"--{flag}={path}: {existing} is not writable; pass a folder you can write to"
    return None


@contextlib.contextmanager
def atomic_path(path, flag):
    """A temporary path beside `path` to write to; renamed onto `path` when the block ends, removed when it
    fails, so a reader never sees half a file. A write error (a full disk) becomes one sentence naming --flag."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"could not write {path} ({e.strerror or e}); "
                        f"free some disk space or pass another --{flag}.") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path, text, flag):
    with atomic_path(path, flag) as tmp:
        tmp.write_text(text, encoding="utf-8")


def read_json(path, what):
    """A JSON file another stage wrote; a damaged one is one sentence naming it and the fix."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path} is not readable JSON ({getattr(e, 'msg', None) or e}); {what}") from None
