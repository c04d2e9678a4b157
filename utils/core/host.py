"""The host machine: memory the OS says is free or used, how glibc's allocator should treat what torch frees, and
the CPUs the cgroup quota allows (`cpu_quota`).

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
- ZeRO-3 and FSDP2 gather every weight at each use and free it after: a heap that kept those grew to several
  times the model's size a rank, so sharded runs return freed memory from before loading on
  (utils/train/setup.lora_for_training; bench/RESULTS.md, scale-out).
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


MADV_DONTNEED = 4


def file_mappings():
    """[(start, end, path)] of this process's mappings of files, from /proc/self/maps; [] where there is none."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    mappings = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            mappings.append((start, end, fields[5]))
    return mappings


def _only_file_pages(start, end, page):
    """Whether no page of [start, end) is a private copy (/proc/self/pagemap: in memory or swapped out, and not a
    file page)."""
    import numpy as np

    try:
        with open("/proc/self/pagemap", "rb") as pagemap:
            pagemap.seek(start // page * 8)
            entries = np.frombuffer(pagemap.read((end - start) // page * 8), dtype=np.uint64)
    except OSError:
        return False
    present, swapped, file_page = ((entries >> np.uint64(n)) & np.uint64(1) for n in (63, 62, 61))
    return len(entries) == (end - start) // page and not np.any((present | swapped) & (file_page ^ np.uint64(1)))


def drop_file_pages(tensor, mappings, suffix=".safetensors"):
    """Take the pages of a tensor that lies in one of `mappings` (file_mappings), of a file named *suffix, out of
    this process's RSS (madvise MADV_DONTNEED), when every page of it is still the file's (none written to, which
    would have made it a private copy). Such pages are clean: should the tensor be read again, the kernel maps
    them again from the page cache, so no value changes. Returns the bytes dropped: 0 for a tensor in anonymous
    memory or with a written page, or where madvise or /proc/self/pagemap is missing."""
    import mmap

    libc = _libc()
    if libc is None or not hasattr(libc, "madvise") or tensor.device.type != "cpu" or not tensor.is_contiguous():
        return 0
    page, first, size = mmap.PAGESIZE, tensor.data_ptr(), tensor.numel() * tensor.element_size()
    start, end = first // page * page, -(-(first + size) // page) * page
    for low, high, path in mappings:  # mappings start and end on page boundaries
        if low <= start and end <= high and path.endswith(suffix):
            if not _only_file_pages(start, end, page):
                return 0
            done = libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED) == 0
            return end - start if done else 0
    return 0


def cpu_quota(root="/sys/fs/cgroup", own=None):
    """CPUs this process's cgroup quota allows (0.5 for "50000 100000"), None when unlimited or unknown.

    cgroup v2: the smallest cpu.max from the process's own group (`own`, from /proc/self/cgroup) up to
    the root; cgroup v1: cpu/cpu.cfs_quota_us over cpu/cpu.cfs_period_us.
    """
    root, quotas = Path(root), []
    try:
        if own is None:
            own = next((line[3:] for line in Path("/proc/self/cgroup").read_text().splitlines()
                        if line.startswith("0::")), "/")
        folder = root / own.strip().lstrip("/")
        for group in [folder, *folder.parents]:
            if (group / "cpu.max").is_file():
                limit, period = (group / "cpu.max").read_text().split()[:2]
                quotas += [] if limit == "max" else [int(limit) / int(period)]
            if group == root:
                break
        if (root / "cpu" / "cpu.cfs_quota_us").is_file():
            limit = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
            quotas += [limit / int((root / "cpu" / "cpu.cfs_period_us").read_text())] if limit > 0 else []
    except (OSError, ValueError):
        return None
    return min(quotas, default=None)
