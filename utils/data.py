"""Data: read and validate records, tokenize and mask them with a template, truncate, pack.

Every record is validated before any model loads; a bad one raises a UserError naming the file, the
record number and the fix. Supported layouts are documented in data/README.md.
"""
import hashlib
import json
import os
import statistics
import tempfile
from pathlib import Path

from utils.errors import UserError

IGNORE = -100
SFT_SUFFIXES = (".json", ".jsonl")
PT_SUFFIXES = (".txt", ".json", ".jsonl")
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant"}


def _files(path, suffixes, flag):
    path = Path(path).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in suffixes and p.is_file())
        if not files:
            raise UserError(f"{path} holds no {'/'.join(suffixes)} files; point --{flag} at a data file or a folder of them.")
        return files
    if not path.is_file():
        raise UserError(f"{path} does not exist; pass --{flag} a {'/'.join(suffixes)} file or a folder of them.")
    return [path]


def _read_text(file):
    raw = file.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise UserError(f"{file}: line {line} is not UTF-8 (byte 0x{raw[e.start]:02x}); re-save the file as UTF-8.") from None


def _parse_json(file, text):
    """A JSON list of records, or JSON Lines; returns [(where, record)]."""
    if file.suffix != ".jsonl":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # several objects one after another: read it as JSON Lines below
                raise UserError(f"{file}: invalid JSON at line {e.lineno}, column {e.colno} ({e.msg}); fix the syntax, or use one JSON object per line in a .jsonl file.") from None
        else:
            if not isinstance(data, list):
                raise UserError(f"{file}: expected a JSON list of records, found a {type(data).__name__}; wrap the records in [ ... ].")
            return [(f"{file}: record {i}", r) for i, r in enumerate(data, 1)]
    records = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append((f"{file}: line {i}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise UserError(f"{file}: line {i} is not valid JSON ({e.msg} at column {e.colno}); fix it, or remove the line.") from None
    return records


def _string(rec, key, where, required=True):
    value = rec.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        problem = "is missing" if value is None else f"is a {type(value).__name__}, not a string"
        raise UserError(f'{where}: "{key}" {problem}; every record needs "instruction" and "output" strings ("input", "system" and "history" are optional).')
    return value


def _chat(rec, where):
    """OpenAI `messages` ({role, content}) or ShareGPT `conversations` ({from, value}) to (system, turns)."""
    key = "messages" if "messages" in rec else "conversations"
    msgs = rec[key]
    if not isinstance(msgs, list) or not msgs:
        raise UserError(f'{where}: "{key}" must be a non-empty list of messages.')
    parsed = []
    for j, m in enumerate(msgs, 1):
        role = m.get("role", m.get("from")) if isinstance(m, dict) else None
        content = m.get("content", m.get("value")) if isinstance(m, dict) else None
        if ROLES.get(role) is None or not isinstance(content, str):
            raise UserError(f'{where}: message {j} of "{key}" needs a role (system, user or assistant) and a string content.')
        parsed.append((ROLES[role], content))
    system = parsed.pop(0)[1] if parsed[0][0] == "system" else ""
    if len(parsed) % 2 or any(r != ("user", "assistant")[k % 2] for k, (r, _) in enumerate(parsed)):
        raise UserError(f'{where}: "{key}" must alternate user and assistant messages after an optional system message, and end with an assistant message.')
    turns = [(parsed[k][1], parsed[k + 1][1]) for k in range(0, len(parsed), 2)]
    if any(not a.strip() for _, a in turns):
        raise UserError(f"{where}: an assistant message is empty; give every assistant message some text, or remove the record.")
    return system, turns


def to_dialog(rec, where):
    """Validate one record and turn it into (system, [(user, answer), ...], input of the last turn)."""
    if not isinstance(rec, dict):
        raise UserError(f'{where} is a {type(rec).__name__}, not a JSON object; each record must look like {{"instruction": ..., "input": ..., "output": ...}}.')
    if "messages" in rec or "conversations" in rec:
        return (*_chat(rec, where), "")
    instruction = _string(rec, "instruction", where)
    input_text = _string(rec, "input", where, required=False)
    output = _string(rec, "output", where)
    system = _string(rec, "system", where, required=False)
    if not output.strip():
        raise UserError(f'{where}: "output" is empty; give every record a non-empty "output", or remove the record.')
    history = rec.get("history") or []
    if not isinstance(history, list) or not all(isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(s, str) for s in p) for p in history):
        raise UserError(f'{where}: "history" must be a list of [question, answer] string pairs, oldest first, e.g. [["Hi", "Hello!"]].')
    return system, [tuple(p) for p in history] + [(instruction, output)], input_text


def _no_gc(fn):
    """Run fn with the cyclic garbage collector paused: loading builds millions of small, acyclic objects,
    and each full collection would walk all of them again (about a third of the time on 50 000 records)."""
    import functools
    import gc

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        enabled = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if enabled:
                gc.enable()

    return wrapper


@_no_gc
def read_dialogs(data_path, flag="data_path"):
    """All records of --data_path as validated dialogs; needs no tokenizer, so it runs before any load."""
    dialogs = []
    for file in _files(data_path, SFT_SUFFIXES, flag):
        dialogs += [to_dialog(rec, where) for where, rec in _parse_json(file, _read_text(file))]
    if not dialogs:
        raise UserError(f"{data_path} holds no records; add some, or point --{flag} at another file.")
    return dialogs


def read_texts(data_path, flag="data_path"):
    """Documents for --stage pt: non-empty lines of .txt files, or `text` fields of JSON/JSONL records."""
    texts = []
    for file in _files(data_path, PT_SUFFIXES, flag):
        text = _read_text(file)
        if file.suffix == ".txt":
            texts += [line for line in text.splitlines() if line.strip()]
            continue
        for where, rec in _parse_json(file, text):
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise UserError(f'{where}: needs a "text" string for --stage pt; give each record {{"text": "..."}}, or use a .txt file.')
            if rec["text"].strip():
                texts.append(rec["text"])
    if not texts:
        raise UserError(f"{data_path} holds no text; add some, or point --{flag} at another file.")
    return texts


def adds_bos(tokenizer, template):
    if template.add_bos != "auto":
        return bool(template.add_bos) and tokenizer.bos_token_id is not None
    ids = tokenizer("a").input_ids
    return tokenizer.bos_token_id is not None and len(ids) > 0 and ids[0] == tokenizer.bos_token_id


def _truncate(ids, labels, answer_start, cutoff_len, keep_first, eos_id):
    """Cut the context (oldest history, then the start of the prompt) before the last answer.

    The context keeps at least half the cutoff (or all of itself); the answer gets the rest, and if it
    must be cut too, its last kept token is EOS, so EOS is never lost.
    """
    ctx_ids, ctx_labels = ids[:answer_start], labels[:answer_start]
    ans_ids, ans_labels = ids[answer_start:], labels[answer_start:]
    keep = min(len(ctx_ids), max(cutoff_len - len(ans_ids), min(len(ctx_ids), cutoff_len // 2)))
    first = keep_first if keep > 0 else 0
    tail = keep - first
    ctx_ids = ctx_ids[:first] + (ctx_ids[len(ctx_ids) - tail:] if tail > 0 else [])
    ctx_labels = ctx_labels[:first] + (ctx_labels[len(ctx_labels) - tail:] if tail > 0 else [])
    room = cutoff_len - len(ctx_ids)
    if len(ans_ids) > room:
        ans_ids = ans_ids[:max(room - 1, 0)] + [eos_id] if room > 0 else []
        ans_labels = ans_ids[:]
    return ctx_ids + ans_ids, ctx_labels + ans_labels


@_no_gc
def encode_dialogs(dialogs, tokenizer, template, cutoff_len=None, train_on_inputs=False):
    """Tokenize and mask dialogs; returns (examples, stats).

    Each segment is tokenized on its own (one batched call for all of them), prompts are masked with
    -100 unless train_on_inputs, EOS ends every answer. With a last answer of None (inference), the
    result is the prompt alone, token for token what training saw before that answer.
    """
    eos_id = tokenizer.eos_token_id
    bos = [tokenizer.bos_token_id] if adds_bos(tokenizer, template) else []
    rendered = [template.render(*dialog) for dialog in dialogs]
    flat = [s for segs in rendered for s in segs]
    tokens = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
    examples, stats, pos = [], {"records": len(dialogs), "truncated": 0, "dropped": 0, "supervised_tokens": 0}, 0
    for segs in rendered:
        ids, labels, answer_start = list(bos), [IGNORE] * len(bos), None
        for j in range(len(segs)):
            seg = tokens[pos + j]
            if j % 2 == 0:
                ids += seg
                labels += seg if train_on_inputs else [IGNORE] * len(seg)
            else:
                seg = seg if seg and seg[-1] == eos_id else seg + [eos_id]
                answer_start = len(ids)
                ids += seg
                labels += seg
        pos += len(segs)
        if cutoff_len and len(ids) > cutoff_len:
            stats["truncated"] += 1
            ids, labels = _truncate(ids, labels, answer_start if answer_start is not None else len(ids), cutoff_len, len(bos), eos_id)
        supervised = len(labels) - 1 - labels[1:].count(IGNORE)
        if len(segs) % 2 == 0 and supervised == 0:
            stats["dropped"] += 1  # nothing left to learn from: feeding it would give a NaN loss
            continue
        stats["supervised_tokens"] += supervised
        examples.append({"input_ids": ids, "labels": labels})
    return examples, stats


def encode_prompt(tokenizer, template, system, history, query):
    """Token ids of the prompt for the next answer: the same code path as training."""
    examples, _ = encode_dialogs([(system, list(history) + [(query, None)], "")], tokenizer, template)
    return examples[0]["input_ids"]


def encode_texts(texts, tokenizer, block_size):
    """--stage pt: join documents with EOS and cut them into block_size blocks (the last may be shorter)."""
    eos = [tokenizer.eos_token_id]
    stream = [t for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] for t in ids + eos]
    blocks = [stream[i:i + block_size] for i in range(0, len(stream), block_size)]
    blocks = [b for b in blocks if len(b) > 1]
    stats = {"records": len(texts), "truncated": 0, "dropped": 0, "supervised_tokens": sum(len(b) - 1 for b in blocks)}
    return [{"input_ids": b, "labels": b[:]} for b in blocks], stats


def split_validation(examples, val_set_size, seed):
    """Hold out val_set_size examples (an int count, or a fraction below 1)."""
    import random

    if not val_set_size:
        return examples, []
    n = int(round(val_set_size * len(examples))) if val_set_size < 1 else int(val_set_size)
    if n <= 0 or n >= len(examples):
        raise UserError(f"--val_set_size={val_set_size} leaves no training or no validation examples out of {len(examples)}; pass a smaller count or fraction.")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:n])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def summary(examples, stats, tokenizer):
    """Lines describing the dataset: counts, token lengths, and one example with its mask shown."""
    lengths = sorted(len(e["input_ids"]) for e in examples)
    p95 = lengths[min(len(lengths) - 1, int(0.95 * len(lengths)))]
    lines = [
        f"records read: {stats['records']}, kept: {len(examples)}, truncated: {stats['truncated']}, dropped (nothing left to train on): {stats['dropped']}",
        f"tokens per example: min {lengths[0]}, median {int(statistics.median(lengths))}, p95 {p95}, max {lengths[-1]}; supervised tokens: {stats['supervised_tokens']}",
        "example 1 ([-] masked from the loss, [+] trained on):",
    ]
    ex = examples[0]
    run_start = 0
    for i in range(1, len(ex["input_ids"]) + 1):
        if i == len(ex["input_ids"]) or (ex["labels"][i] == IGNORE) != (ex["labels"][run_start] == IGNORE):
            mark = "-" if ex["labels"][run_start] == IGNORE else "+"
            lines.append(f"  [{mark}] {tokenizer.decode(list(ex['input_ids'][run_start:i]))!r}")
            run_start = i
    return "\n".join(lines)


CACHE_VERSION = 2  # bump when the encoding changes, so old cache entries are never reused


def cache_key(data_paths, tokenizer, settings):
    """A content hash of the data files, the tokenizer and the encoding settings."""
    h = hashlib.sha256(f"v{CACHE_VERSION}".encode())
    for data_path in data_paths:
        for file in _files(data_path, PT_SUFFIXES, "data_path"):
            h.update(file.name.encode() + file.read_bytes())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else str(tokenizer.get_vocab())).encode())
    h.update(json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, settings], sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


@_no_gc
def cached(key, build, folder=None):
    """build() -> (examples, stats), stored under key in folder (default: the cache's data/); returns
    (examples, stats, hit)."""
    import numpy as np

    from utils.model import cache_dir

    path = Path(folder or cache_dir() / "data") / f"{key}.npz"
    if path.is_file():
        with np.load(path) as f:
            ids, labels, offsets = f["input_ids"], f["labels"], f["offsets"].tolist()
            stats = json.loads(str(f["stats"]))
        examples = [{"input_ids": ids[a:b], "labels": labels[a:b]} for a, b in zip(offsets, offsets[1:])]  # views
        return examples, stats, True
    examples, stats = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    offsets = np.cumsum([0] + [len(e["input_ids"]) for e in examples])
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")  # written aside, then renamed: never half-read
    with os.fdopen(fd, "wb") as f:
        np.savez(f, input_ids=np.fromiter((t for e in examples for t in e["input_ids"]), np.int32, offsets[-1]),
                 labels=np.fromiter((t for e in examples for t in e["labels"]), np.int32, offsets[-1]),
                 offsets=offsets, stats=json.dumps(stats))
    os.replace(tmp, path)
    return examples, stats, False


class Collator:
    """Batch examples for the Trainer.

    packing=True (the default) concatenates the batch into one row without padding: position_ids
    restart at each example, which makes the attention block-diagonal (transformers detects this from
    position_ids when no attention_mask is given), and each example's first label is masked so no
    example learns from its neighbour. Loss and gradients equal the padded computation. It also sends
    logits_to_keep, the positions whose next token is supervised (see utils/train.py).
    """

    def __init__(self, pad_token_id, packing=True):
        self.pad_token_id, self.packing = pad_token_id, packing

    def __call__(self, features):
        import numpy as np
        import torch

        ids = [np.asarray(f["input_ids"], dtype=np.int64) for f in features]
        labels = [np.asarray(f["labels"], dtype=np.int64) for f in features]
        if self.packing:
            row_labels = np.concatenate([np.concatenate([[IGNORE], l[1:]]) for l in labels])
            positions = np.concatenate([np.arange(len(i)) for i in ids])
            targets = torch.from_numpy(row_labels[1:])
            return {"input_ids": torch.from_numpy(np.concatenate(ids))[None], "labels": torch.from_numpy(row_labels)[None],
                    "position_ids": torch.from_numpy(positions)[None], "logits_to_keep": (targets != IGNORE).nonzero().flatten()}
        width = max(len(i) for i in ids)
        batch = {"input_ids": torch.full((len(ids), width), self.pad_token_id), "labels": torch.full((len(ids), width), IGNORE),
                 "attention_mask": torch.zeros((len(ids), width), dtype=torch.long)}
        for row, (i, l) in enumerate(zip(ids, labels)):
            batch["input_ids"][row, :len(i)] = torch.from_numpy(i)
            batch["labels"][row, :len(l)] = torch.from_numpy(l)
            batch["attention_mask"][row, :len(i)] = 1
        return batch
