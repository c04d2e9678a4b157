"""The tokenized data on disk: built once per content, then memory-mapped by every process that trains on it.

A store is a folder under the cache, named by a hash of the data files, the tokenizer and the settings:
- `ids.bin`: every example's token ids, one after another (uint16 when the vocabulary fits, else uint32);
- `mask.bin`: one byte per token, 1 where the token is a label (--stage sft and dpo; in pt every token is one);
- `kto_labels.bin`: one byte per example, 1 for a desirable answer (--stage dpo --pref_loss kto only);
- `offsets.npy`: where each example starts (int64, one more than there are examples);
- `meta.json`: the format, the counts and the data summary; written last.

It is written into a hidden folder and renamed into place, under a file lock: one process builds it while the
others (torchrun ranks, a second terminal) wait, then all of them map the same files. Records stream from
utils/data/records.py through worker processes that tokenize batches, so memory does not grow with the data.
Training reads each example from the map when the data loader asks for it.
"""
import collections
import contextlib
import copy
import hashlib
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
import weakref
from pathlib import Path

import numpy as np

from utils.core.errors import UserError
from utils.core.files import cache_dir, locked
from utils.core.host import cpu_quota
from utils.data.encoding import IGNORE, pt_blocks
from utils.data.records import iter_records, number

STORE_VERSION = 3  # bump when the encoding or the layout changes, so old stores are never reused
BATCH = 512  # records per task sent to a worker
MIN_BYTES_FOR_WORKERS = 1 << 20  # below this, starting workers costs more than they save


class TokenStore:
    """A built store as a sequence of examples {"input_ids", "labels"} (int64 arrays; and "kto_label", a bool,
    in a KTO store), read lazily."""

    def __init__(self, folder, index=None):
        self.folder, self.index = Path(folder), index
        self.meta = json.loads((self.folder / "meta.json").read_text(encoding="utf-8"))
        self.stats, self.from_cache, self.seconds = self.meta["stats"], True, 0.0
        self._open()

    def _open(self):
        def mapped(name, dtype, count):
            return np.memmap(self.folder / name, dtype=dtype, mode="r", shape=(count,)) if count else np.zeros(0, dtype)

        tokens = self.meta["tokens"]
        self.ids = mapped("ids.bin", self.meta["dtype"], tokens)
        self.mask = mapped("mask.bin", np.uint8, tokens) if self.meta["stage"] != "pt" else None
        kto = self.meta["stage"] == "kto"
        self.kto_labels = mapped("kto_labels.bin", np.uint8, self.meta["examples"]) if kto else None
        self.offsets = np.load(self.folder / "offsets.npy", mmap_mode="r")

    def __getstate__(self):  # a pickled copy (data loader workers) maps the files again instead of copying them
        return {k: v for k, v in self.__dict__.items() if k not in ("ids", "mask", "offsets", "kto_labels")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open()

    def __len__(self):
        return len(self.offsets) - 1 if self.index is None else len(self.index)

    def __getitem__(self, i):
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        j = int(self.index[i] if self.index is not None else i % len(self))
        a, b = int(self.offsets[j]), int(self.offsets[j + 1])
        ids = self.ids[a:b].astype(np.int64)
        labels = ids.copy() if self.mask is None else np.where(self.mask[a:b] != 0, ids, IGNORE)
        if self.kto_labels is not None:
            return {"input_ids": ids, "labels": labels, "kto_label": bool(self.kto_labels[j])}
        return {"input_ids": ids, "labels": labels}

    def origin(self):
        """Where this store came from, for the summary: the cache, or built now (how long, how many workers)."""
        if self.from_cache:
            return f"from the cache ({self.meta['examples']:,} examples, {self.seconds:.1f} s)"
        workers = self.meta["workers"]
        return (f"built now from {self.stats['records']:,} records in {self.seconds:.1f} s "
                f"({workers} worker process{'es' if workers > 1 else ''})")

    def lengths(self):
        lengths = np.diff(self.offsets)
        return lengths if self.index is None else lengths[self.index]

    def subset(self, index):
        view = copy.copy(self)
        view.index = np.asarray(index if self.index is None else self.index[index], dtype=np.int64)
        return view


def cache_key(files, tokenizer, settings):
    """A content hash of the data files (read in chunks), the tokenizer and the encoding settings."""
    h = hashlib.sha256(f"v{STORE_VERSION}".encode())
    for file in files:
        h.update(Path(file).name.encode())
        with open(file, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else str(tokenizer.get_vocab())).encode())
    h.update(json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, settings],
                        sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


def default_workers():
    """The CPUs this process may use: its affinity, capped by the cgroup CPU quota (see utils.model.loading)."""
    import math

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cpu_quota()
    return max(1, min(cpus, math.ceil(quota)) if quota else cpus)


def tokenized(files, encoder, settings, cache=True, workers=None, max_samples=None, flag="data_path", folder=None):
    """The TokenStore of these files: from the cache when it holds them, else built now (one process
    builds, the others wait on the lock and map what it wrote). `from_cache` and `seconds` say which.
    Files that leave no example (every record dropped by truncation) are refused.

    cache=False builds a private store in a temporary folder that is removed when the store is dropped.
    """
    store = _stored(files, encoder, settings, cache, workers, max_samples, flag, folder)
    if not len(store) and encoder.stage != "pt":
        raise UserError(f"all {store.stats['records']:,} records of --{flag} were dropped: "
                        f"nothing to train on remained after truncation to --cutoff_len={encoder.cutoff_len}; "
                        "raise --cutoff_len.")
    if not len(store):
        raise UserError(f"the {store.stats['records']:,} texts of --{flag} hold fewer than 2 tokens: "
                        "nothing to train on; add text.")
    return store


def _stored(files, encoder, settings, cache, workers, max_samples, flag, folder):
    root = Path(folder) if folder else _cache_root()
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if not cache:
        tmp = Path(tempfile.mkdtemp(prefix=".uncached-", dir=root))
        try:
            _build(tmp, files, encoder, workers, max_samples, flag)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        store = TokenStore(tmp)
        weakref.finalize(store, shutil.rmtree, tmp, True)
        store.from_cache, store.seconds = False, time.time() - t0
        return store
    key = cache_key(files, encoder.tokenizer, {**settings, "max_samples": max_samples})
    target = root / key
    if not (target / "meta.json").is_file():
        with locked(root / f".{key}.lock"):
            if not (target / "meta.json").is_file():
                tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
                try:
                    _build(tmp, files, encoder, workers, max_samples, flag)
                    os.replace(tmp, target)
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
                store = TokenStore(target)
                store.from_cache, store.seconds = False, time.time() - t0
                if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # say which rank did the work the others wait for
                    print(f"rank {os.environ.get('RANK', '?')}: built the tokenized data "
                          f"({store.stats['records']:,} records, {store.seconds:.1f} s); the other ranks map it",
                          file=sys.stderr, flush=True)
                return store
    store = TokenStore(target)
    store.seconds = time.time() - t0
    return store


def _cache_root():
    return cache_dir() / "data"


_ENCODER = None  # set in each worker process


def _start_worker(encoder):
    global _ENCODER
    _ENCODER = encoder


def _encode_batch(items, encoder=None):
    """One batch of validated items -> (ids, mask, lengths, stats, KTO labels or None) as arrays: what the writer
    appends."""
    encoder = encoder or _ENCODER
    dtype = _ids_dtype(encoder.tokenizer)
    if encoder.stage == "pt":
        docs = encoder.texts(items)
        ids = np.fromiter(itertools.chain.from_iterable(docs), dtype, sum(map(len, docs)))
        return ids, None, None, {"records": len(items), "truncated": 0, "dropped": 0, "supervised_tokens": 0}, None
    examples, stats = encoder.dialogs(items)
    lengths = np.fromiter((len(e["input_ids"]) for e in examples), np.int64, len(examples))
    total = int(lengths.sum())
    ids = np.fromiter(itertools.chain.from_iterable(e["input_ids"] for e in examples), dtype, total)
    labels = np.fromiter(itertools.chain.from_iterable(e["labels"] for e in examples), np.int64, total)
    kto = np.fromiter((e["kto_label"] for e in examples), np.uint8, len(examples)) if encoder.stage == "kto" else None
    return ids, (labels != IGNORE).astype(np.uint8), lengths, stats, kto


def _ids_dtype(tokenizer):
    return np.uint16 if len(tokenizer) <= 1 << 16 else np.uint32


def _batches(items, size):
    while batch := list(itertools.islice(items, size)):
        yield batch


def _in_order(pool, batches, window):
    """pool.imap that keeps at most `window` batches in flight, so a fast reader cannot fill memory."""
    pending = collections.deque()
    for batch in batches:
        pending.append(pool.apply_async(_encode_batch, (batch,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _build(folder, files, encoder, workers, max_samples, flag):
    """Stream, validate, tokenize and write the files into folder; raises UserError on the first bad record."""
    from tqdm import tqdm

    encoder = encoder.for_bulk()
    total_bytes = sum(Path(f).stat().st_size for f in files)
    workers = workers or default_workers()
    use_pool = workers > 1 and total_bytes >= MIN_BYTES_FOR_WORKERS and _can_fork()
    stats = {"records": 0, "truncated": 0, "dropped": 0, "supervised_tokens": 0}
    lengths, tokens, t0 = [], 0, time.time()
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="reading and tokenizing", delay=2,
               mininterval=1 if sys.stderr.isatty() else 30, file=sys.stderr, dynamic_ncols=True)
    records = getattr(encoder, "records", None)  # preference data has its own reader (utils/data/preference.py)
    items = records(files, bar.update) if records else iter_records(files, encoder.stage, progress=bar.update)
    if max_samples:
        items = itertools.islice(items, max_samples)
    pool = _start_pool(encoder, workers) if use_pool else None
    try:
        batches = _batches(items, BATCH)
        results = _in_order(pool, batches, 2 * workers) if pool else (_encode_batch(b, encoder) for b in batches)
        kto_labels = open(folder / "kto_labels.bin", "wb") if encoder.stage == "kto" else contextlib.nullcontext()
        with (open(folder / "ids.bin", "wb") as ids_file, open(folder / "mask.bin", "wb") as mask_file,
              kto_labels as kto_file):
            for ids, mask, batch_lengths, batch_stats, kto in results:
                ids.tofile(ids_file)
                if kto is not None:
                    kto.tofile(kto_file)
                tokens += len(ids)
                if mask is not None:
                    mask.tofile(mask_file)
                    lengths.append(batch_lengths)
                for k in stats:
                    stats[k] += batch_stats[k]
                rate = stats["records"] / max(time.time() - t0, 1e-9)
                bar.set_postfix_str(f"{number(stats['records'])} records, {rate:,.0f} records/s", refresh=False)
    finally:
        if pool is not None:
            pool.terminate()
        bar.close()
    if not stats["records"]:
        names = ", ".join(str(f) for f in files)
        raise UserError(f"{names} holds no records; add some, or point --{flag} at another file.")
    if encoder.stage == "pt":
        offsets = pt_blocks(tokens, encoder.block_size)
        stats["supervised_tokens"] = int(np.diff(offsets).sum() - (len(offsets) - 1))
        (folder / "mask.bin").unlink()
    else:
        offsets = np.concatenate([[0], np.cumsum(np.concatenate(lengths) if lengths
                                                 else np.zeros(0, np.int64))]).astype(np.int64)
    np.save(folder / "offsets.npy", offsets)
    meta = {"version": STORE_VERSION, "stage": encoder.stage, "dtype": np.dtype(_ids_dtype(encoder.tokenizer)).name,
            "tokens": tokens, "examples": len(offsets) - 1, "stats": stats, "files": [str(f) for f in files],
            "workers": workers if pool else 1, "build_seconds": round(time.time() - t0, 2)}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")


def _can_fork():
    import multiprocessing

    return "fork" in multiprocessing.get_all_start_methods()


def _start_pool(encoder, workers):
    """Forked workers that each hold a copy of the encoder. The tokenizer's own thread pool is off in them:
    the processes already fill the cores."""
    import multiprocessing

    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # read by the forked children; restored for this process
    try:
        return multiprocessing.get_context("fork").Pool(workers, initializer=_start_worker, initargs=(encoder,))
    finally:
        if before is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before
