"""The tokenized store: what it maps back equals fresh encoding, worker processes change nothing, one process
builds while another waits, and the key follows the content."""
import json
import multiprocessing

import numpy as np
import pytest
from conftest import RECORDS

from utils.core.errors import UserError
from utils.data import token_store
from utils.data.encoding import Encoder, encode_dialogs, encode_texts
from utils.data.records import data_files, read_dialogs
from utils.data.templates import load_template
from utils.data.token_store import TokenStore, cache_key, tokenized

SUFFIXES = (".json", ".jsonl")


def varied_records(n):
    """Records of every layout, some long enough to be truncated at 96 tokens."""
    rows = []
    for i in range(n):
        rec = dict(RECORDS[i % len(RECORDS)])
        rec = json.loads(json.dumps(rec).replace("Lumi", f"Lumi {i}"))
        if i % 7 == 0:
            rec = {"instruction": "long " * (20 + i % 50), "output": f"answer {i} " * (i % 40 + 1)}
        rows.append(rec)
    return rows


@pytest.fixture
def varied_file(tmp_path):
    path = tmp_path / "varied.json"
    path.write_text(json.dumps(varied_records(600), ensure_ascii=False), encoding="utf-8")
    return path


def as_lists(store):
    return [(e["input_ids"].tolist(), e["labels"].tolist()) for e in (store[i] for i in range(len(store)))]


@pytest.mark.parametrize("workers", [1, 2])
def test_store_equals_fresh_encoding(tmp_path, tokenizer, varied_file, monkeypatch, workers):
    """Mapped examples equal encode_dialogs on the whole list: ids, labels, truncation and drop counts, also
    when worker processes encode small batches and the store is read back from the cache."""
    monkeypatch.setattr(token_store, "MIN_BYTES_FOR_WORKERS", 0)
    monkeypatch.setattr(token_store, "BATCH", 37)
    template = load_template("auto", tokenizer)
    expected, stats = encode_dialogs(read_dialogs(varied_file), tokenizer, template, cutoff_len=96)
    assert stats["truncated"] > 50
    encoder = Encoder(tokenizer, "sft", template, 96)
    files = data_files(varied_file, SUFFIXES)
    built = tokenized(files, encoder, {"cutoff_len": 96}, workers=workers, folder=tmp_path / "cache")
    again = tokenized(files, encoder, {"cutoff_len": 96}, workers=workers, folder=tmp_path / "cache")
    assert (built.from_cache, again.from_cache, built.meta["workers"]) == (False, True, workers)
    for store in (built, again):
        assert store.stats == stats
        assert as_lists(store) == [(e["input_ids"], e["labels"]) for e in expected]
        assert store.lengths().tolist() == [len(e["input_ids"]) for e in expected]
    assert built.meta["dtype"] == "uint16"  # SmolLM2's 49k vocabulary fits in two bytes a token
    one = Encoder(tokenizer, "sft", template, 1)
    nothing_left = token_store._stored(files, one, {"cutoff_len": 1}, True, workers, None, "data_path",
                                       tmp_path / "cache")
    assert (len(nothing_left) == 0
            and nothing_left.stats == encode_dialogs(read_dialogs(varied_file), tokenizer, template, 1)[1])
    assert nothing_left.stats["dropped"] == 600
    with pytest.raises(UserError, match="all 600 records of --data_path were dropped"):
        tokenized(files, one, {"cutoff_len": 1}, workers=workers, folder=tmp_path / "cache")


@pytest.mark.parametrize("workers", [1, 2])
def test_pt_store_equals_encode_texts(tmp_path, tokenizer, monkeypatch, workers):
    """--stage pt: blocks cut from the stream of all documents, across batches and workers, as encode_texts cuts
    them."""
    monkeypatch.setattr(token_store, "MIN_BYTES_FOR_WORKERS", 0)
    monkeypatch.setattr(token_store, "BATCH", 23)
    texts = [f"paragraph {i} " + "words " * (i % 30) for i in range(200)]
    path = tmp_path / "pt.txt"
    path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    expected, stats = encode_texts(texts, tokenizer, block_size=64)
    store = tokenized(data_files(path, (".txt",)), Encoder(tokenizer, "pt", block_size=64), {"block_size": 64},
                      cache=False, workers=workers)
    assert store.stats == stats and as_lists(store) == [(e["input_ids"], e["labels"]) for e in expected]
    folder = store.folder
    del store
    assert not folder.exists()  # an uncached store is removed with its last reference


def test_max_samples_takes_the_first_records_and_keys_the_cache(tmp_path, tokenizer, varied_file):
    template = load_template("auto", tokenizer)
    encoder = Encoder(tokenizer, "sft", template, 96)
    files = data_files(varied_file, SUFFIXES)
    subset = tokenized(files, encoder, {}, max_samples=50, folder=tmp_path)
    whole = tokenized(files, encoder, {}, folder=tmp_path)
    expected, _ = encode_dialogs(read_dialogs(varied_file)[:50], tokenizer, template, 96)
    assert subset.stats["records"] == 50 and not whole.from_cache and whole.stats["records"] == 600
    assert as_lists(subset) == [(e["input_ids"], e["labels"]) for e in expected]


def test_subset_and_pickle_map_the_same_files(tmp_path, tokenizer, varied_file):
    import pickle

    store = tokenized(data_files(varied_file, SUFFIXES),
                      Encoder(tokenizer, "sft", load_template("auto", tokenizer), 96), {}, folder=tmp_path)
    view = store.subset(np.array([5, 2, 9]))
    assert as_lists(view) == [as_lists(store)[i] for i in (5, 2, 9)]
    copy = pickle.loads(pickle.dumps(view))
    assert as_lists(copy) == as_lists(view) and len(pickle.dumps(view)) < 10_000  # the token arrays are not pickled
    assert isinstance(copy.ids, np.memmap)


def test_cache_key_follows_data_tokenizer_and_settings(tmp_path, tokenizer, data_file):
    settings = {"cutoff_len": 128}
    key = cache_key([data_file], tokenizer, settings)
    assert key == cache_key([data_file], tokenizer, dict(settings))
    assert key != cache_key([data_file], tokenizer, {"cutoff_len": 64})
    other = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    other.add_special_tokens({"additional_special_tokens": ["<|new|>"]})
    assert key != cache_key([data_file], other, settings)
    changed = tmp_path / "changed" / data_file.name
    changed.parent.mkdir()
    changed.write_bytes(data_file.read_bytes().replace(b"Lumi", b"Lumo"))
    assert key != cache_key([changed], tokenizer, settings)


def _open_in_process(folder, files, model_dir, queue):
    from utils.model.loading import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    encoder = Encoder(tokenizer, "sft", load_template("auto", tokenizer), 96)
    store = tokenized(files, encoder, {}, workers=1, folder=folder)
    queue.put((store.from_cache, store.folder.name, len(store)))


def test_two_processes_build_once(tmp_path, smollm2_dir, varied_file):
    """Two processes ask for the same store at once: one builds it under the lock, the other waits and maps it."""
    files = data_files(varied_file, SUFFIXES)
    ctx = multiprocessing.get_context("spawn")
    queues = [ctx.Queue() for _ in range(2)]
    procs = [ctx.Process(target=_open_in_process, args=(tmp_path / "cache", files, str(smollm2_dir), q))
             for q in queues]
    for p in procs:
        p.start()
    results = [q.get(timeout=240) for q in queues]
    for p in procs:
        p.join(timeout=60)
    assert sorted(r[0] for r in results) == [False, True]  # exactly one built
    assert len({r[1:] for r in results}) == 1
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")] == [results[0][1]]


def test_store_reads_the_layout_it_documents(tmp_path, tokenizer, varied_file):
    store = tokenized(data_files(varied_file, SUFFIXES),
                      Encoder(tokenizer, "sft", load_template("auto", tokenizer), 96), {}, folder=tmp_path)
    files = sorted(p.name for p in store.folder.iterdir())
    assert files == ["ids.bin", "mask.bin", "meta.json", "offsets.npy"]
    assert (store.folder / "ids.bin").stat().st_size == 2 * store.meta["tokens"]
    assert (store.folder / "mask.bin").stat().st_size == store.meta["tokens"]
    assert TokenStore(store.folder).stats == store.stats


def test_bulk_tokenizing_equals_the_tokenizer_call(tokenizer):
    """Encoder.for_bulk calls the Rust backend directly; it must give exactly what the transformers call gives,
    special tokens, whitespace runs, Chinese and emoji included, and step aside for split_special_tokens."""
    texts = ["<|im_start|>user\nHi<|im_end|>\n", "  two  spaces\n\n\nthree newlines\t", "你好，世界！🌍 café 12345", "",
             "x" * 5000, "<|endoftext|>inside<|im_end|>text"]
    bulk = Encoder(tokenizer, "sft", load_template("auto", tokenizer)).for_bulk()
    assert bulk.backend is not None
    assert bulk.tokenize(texts) == tokenizer(texts, add_special_tokens=False)["input_ids"]
    split = tokenizer.__class__.from_pretrained(tokenizer.name_or_path, split_special_tokens=True)
    assert Encoder(split, "sft", load_template("auto", split)).for_bulk().backend is None
