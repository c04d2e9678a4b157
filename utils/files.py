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
