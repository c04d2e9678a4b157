"""Files shared by every stage: where the cache lives, and a lock that lets one process at a time build it."""
import contextlib
import fcntl
import os
from pathlib import Path


def cache_dir():
    """Where converted models and tokenized data live: $LORA_KIT_CACHE, else $XDG_CACHE_HOME/lora-kit, else ~/.cache/lora-kit."""
    if os.environ.get("LORA_KIT_CACHE"):
        return Path(os.environ["LORA_KIT_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "lora-kit"


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
