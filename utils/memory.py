"""Host memory: what the OS says is free or used, and how glibc's allocator should treat what torch frees.

glibc serves a large allocation with its own mmap and unmaps it when freed, but after the first such free
it raises that threshold (up to 32 MB), so later tensors come from the heap, where freed memory stays
resident. Two phases want opposite things from it:
- loading a quantized model frees a 16-bit copy of every weight once it is quantized: that memory should go
  back to the OS (`returning_freed_memory`, `return_freed_memory`);
- training a 16-bit base frees and reallocates the same activations every step: that memory should be
  kept, not page-faulted and zeroed anew (`reuse_freed_memory`). A 4/8-bit base is chosen to save memory,
  and it dequantizes every weight into a fresh temporary at every use: a heap that kept those grew by
  about one MLP weight per layer (1.46 -> 1.89 GB on a 1.1B model), so quantized runs keep returning it,
  at the price of page faults (a QLoRA step on 2 cores: 7.5 s with the heap, 12.5 s without).
Every function is a no-op where there is no glibc or no /proc.
"""
import contextlib
import ctypes
from pathlib import Path

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -2, -3, -4


def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def proc_bytes(path, key):
    """A "Key:   N kB" figure of a /proc file in bytes, or None where /proc is not there."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_memory():
    """Bytes the OS can give this process without swapping (MemAvailable: free plus reclaimable cache)."""
    available = proc_bytes("/proc/meminfo", "MemAvailable")
    if available is not None:
        return available
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def peak_rss():
    """This process's peak resident memory in bytes: VmHWM, which starts afresh at exec (ru_maxrss is inherited)."""
    peak = proc_bytes("/proc/self/status", "VmHWM")
    if peak is not None:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def return_freed_memory():
    """Have glibc serve every allocation over 256 kB with its own mapping, unmapped when freed.

    A fixed threshold also stops glibc from raising it after the first large free, which is what had
    large temporaries land in the heap and stay resident. glibc cannot go back to its dynamic threshold,
    so this holds until reuse_freed_memory (or this process ends). Below 1 MB, a QLoRA step's smaller
    activations (the key/value projections, the LoRA states) still fragmented the heap: on a 1.1B model,
    256 kB took the NF4 peak from 1.63 to 1.58 GB, at 15% of its speed on a CPU (56 -> 47 tokens/s).
    """
    libc = _libc()
    return libc is not None and libc.mallopt(M_MMAP_THRESHOLD, 256 << 10) == 1


@contextlib.contextmanager
def returning_freed_memory():
    """return_freed_memory, and a trimmed heap on leaving: for loading a model that is quantized as it loads.

    Quantizing a 1.1B model while it loads held 0.4 GB of freed 16-bit copies in the heap (1.79 GB of
    RSS after loading); with the threshold fixed and the heap trimmed it holds none (1.28 GB).
    """
    return_freed_memory()
    try:
        yield
    finally:
        libc = _libc()
        if libc is not None:
            libc.malloc_trim(0)


def reuse_freed_memory():
    """Have glibc keep the memory torch frees for the next step instead of handing it back to the OS.

    Each training step had page-faulted (and the kernel zeroed) gigabytes of activations anew: on the
    2-core test machine that was a third of the wall time (26.6 s of system time in an 84 s run). With
    mmap off and trimming raised, the heap is reused: 206 -> 231 tokens/s. Call it after loading a 16-bit base.
    """
    libc = _libc()
    if libc is None:
        return False
    return all(libc.mallopt(option, value) == 1 for option, value in
               ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1), (M_TOP_PAD, 2**30)))
