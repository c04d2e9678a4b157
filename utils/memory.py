"""Host memory: what the OS says is free or used, and how glibc's allocator should treat what torch frees.

glibc serves a large allocation with its own mmap and unmaps it when freed, but after the first such free
it raises that threshold (up to 32 MB), so later tensors come from the heap, where freed memory stays
resident. Two phases want opposite things from it:
- loading a quantized model frees a 16-bit copy of every weight once it is quantized: that memory should go
  back to the OS (`returning_freed_memory`, `return_freed_memory`);
- training a 16-bit base frees and reallocates the same activations every step: that memory should be
  kept, not page-faulted and zeroed anew (`reuse_freed_memory`). A 4/8-bit base is chosen to save memory,
  and it dequantizes every weight into a fresh temporary at every use: a heap that kept those grew by
  about one MLP weight per layer, so quantized runs keep returning it, at the price of page faults
  (figures in bench/RESULTS.md, QLoRA memory).
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
    so this holds until reuse_freed_memory (or this process ends). At 1 MB, a QLoRA step's smaller
    activations (the key/value projections, the LoRA states) still fragmented the heap; 256 kB lowered the
    NF4 peak at some cost in speed (bench/RESULTS.md).
    """
    libc = _libc()
    return libc is not None and libc.mallopt(M_MMAP_THRESHOLD, 256 << 10) == 1


@contextlib.contextmanager
def returning_freed_memory():
    """return_freed_memory, and a trimmed heap on leaving: for loading a model that is quantized as it loads.

    Otherwise the heap keeps the freed 16-bit copy of every weight quantized while the model loads; with
    the threshold fixed and the heap trimmed it keeps none (bench/RESULTS.md).
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

    Each training step had page-faulted (and the kernel zeroed) gigabytes of activations anew, a large
    share of a CPU step's time; with mmap off and trimming raised, the heap is reused (bench/RESULTS.md).
    Call it after loading a 16-bit base.
    """
    libc = _libc()
    if libc is None:
        return False
    return all(libc.mallopt(option, value) == 1 for option, value in
               ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1), (M_TOP_PAD, 2**30)))
