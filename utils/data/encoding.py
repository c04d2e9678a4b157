"""Data: tokenize and mask validated records with a template, truncate, split, summarise, pack.

Reading and validating records is utils/data/records.py; the tokenized store on disk is utils/data/token_store.py.
The same `Encoder` builds training examples (in worker processes too) and inference prompts, so the two
cannot drift.
"""
from utils.core.errors import UserError

IGNORE = -100


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


class Encoder:
    """Turns validated items into training examples: dialogs through the template (prompts masked, EOS
    ending every answer, truncation that keeps it), or raw texts for --stage pt. It holds only what the
    encoding needs, so worker processes get an identical copy.
    """

    def __init__(self, tokenizer, stage="sft", template=None, cutoff_len=None, train_on_inputs=False, block_size=None):
        self.tokenizer, self.stage, self.template = tokenizer, stage, template
        self.cutoff_len, self.train_on_inputs, self.block_size = cutoff_len, train_on_inputs, block_size
        self.eos_id = tokenizer.eos_token_id
        self.bos = [tokenizer.bos_token_id] if stage == "sft" and adds_bos(tokenizer, template) else []

    backend = None  # set by for_bulk(): the tokenizer's own Rust tokenizer, called directly

    def tokenize(self, texts):
        if not texts:
            return []
        if self.backend is not None:
            return [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def for_bulk(self):
        """A copy for tokenizing a whole data set, faster (bench/RESULTS.md): it calls the fast tokenizer's Rust
        backend the way transformers does (encode_batch without special tokens, no truncation or padding)
        minus its per-text dict building, with a BPE word cache of 200 000 entries instead of 10 000. Any
        tokenizer transformers would treat differently keeps the plain call; tests/test_token_store.py pins
        the equality.
        """
        copy = Encoder.__new__(Encoder)
        copy.__dict__.update(self.__dict__)
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None or getattr(self.tokenizer, "split_special_tokens", False) or backend.encode_special_tokens:
            return copy
        from tokenizers import Tokenizer

        copy.backend = Tokenizer.from_str(backend.to_str())
        copy.backend.no_truncation()
        copy.backend.no_padding()
        if hasattr(copy.backend.model, "_resize_cache"):  # BPE only; a speed setting, never a result
            copy.backend.model._resize_cache(200_000)
        return copy

    def segments(self, dialogs):
        """Per dialog, the token ids of its template segments [prompt, answer, prompt, ...] (Template.render),
        each tokenized on its own in one batched call for all of them, EOS ending every answer. The BOS, when
        the tokenizer adds one, is not included: it is self.bos."""
        eos_id = self.eos_id
        rendered = [self.template.render(*dialog) for dialog in dialogs]
        tokens = self.tokenize([s for segs in rendered for s in segs])
        out, pos = [], 0
        for segs in rendered:
            out.append([seg if j % 2 == 0 or (seg and seg[-1] == eos_id) else seg + [eos_id]
                        for j, seg in enumerate(tokens[pos:pos + len(segs)])])
            pos += len(segs)
        return out

    def dialogs(self, dialogs):
        """(examples, stats) for a list of (system, turns, last input) dialogs.

        Each segment is tokenized on its own (see segments), prompts are masked with
        -100 unless train_on_inputs, EOS ends every answer. With a last answer of None (inference), the
        result is the prompt alone, token for token what training saw before that answer.
        """
        eos_id, bos = self.eos_id, self.bos
        examples, stats = [], {"records": len(dialogs), "truncated": 0, "dropped": 0, "supervised_tokens": 0}
        for segs in self.segments(dialogs):
            ids, labels, answer_start = list(bos), [IGNORE] * len(bos), None
            for j, seg in enumerate(segs):
                if j % 2 == 0:
                    ids += seg
                    labels += seg if self.train_on_inputs else [IGNORE] * len(seg)
                else:
                    answer_start = len(ids)
                    ids += seg
                    labels += seg
            if self.cutoff_len and len(ids) > self.cutoff_len:
                stats["truncated"] += 1
                ids, labels = _truncate(ids, labels, answer_start if answer_start is not None else len(ids),
                                        self.cutoff_len, len(bos), eos_id)
            supervised = len(labels) - 1 - labels[1:].count(IGNORE)
            if len(segs) % 2 == 0 and supervised == 0:
                stats["dropped"] += 1  # nothing left to learn from: feeding it would give a NaN loss
                continue
            stats["supervised_tokens"] += supervised
            examples.append({"input_ids": ids, "labels": labels})
        return examples, stats

    def texts(self, texts):
        """Token ids of each text followed by EOS, for --stage pt (blocks are cut from their stream later)."""
        return [ids + [self.eos_id] for ids in self.tokenize(texts)]


def encode_dialogs(dialogs, tokenizer, template, cutoff_len=None, train_on_inputs=False):
    """Tokenize and mask dialogs; returns (examples, stats). See Encoder.dialogs."""
    return Encoder(tokenizer, "sft", template, cutoff_len, train_on_inputs).dialogs(dialogs)


def encode_prompt(tokenizer, template, system, history, query):
    """Token ids of the prompt for the next answer: the same code path as training."""
    examples, _ = encode_dialogs([(system, list(history) + [(query, None)], "")], tokenizer, template)
    return examples[0]["input_ids"]


def pt_blocks(total_tokens, block_size):
    """Offsets of the blocks --stage pt cuts from its token stream: block_size tokens each, the last may be
    shorter, and a last block of one token (nothing to predict) is left out."""
    import numpy as np

    offsets = np.append(np.arange(0, total_tokens, block_size, dtype=np.int64), np.int64(total_tokens))
    return offsets[:-1] if len(offsets) > 1 and offsets[-1] - offsets[-2] <= 1 else offsets


def encode_texts(texts, tokenizer, block_size):
    """--stage pt: join documents with EOS and cut them into block_size blocks (the last may be shorter)."""
    stream = [t for ids in Encoder(tokenizer, "pt").texts(texts) for t in ids]
    offsets = pt_blocks(len(stream), block_size).tolist()
    blocks = [stream[a:b] for a, b in zip(offsets, offsets[1:])]
    stats = {"records": len(texts), "truncated": 0, "dropped": 0, "supervised_tokens": sum(len(b) - 1 for b in blocks)}
    return [{"input_ids": b, "labels": b[:]} for b in blocks], stats


def split_validation(count, val_set_size, seed):
    """Indices (train, held out) for holding out val_set_size of count examples (a count, or a fraction below 1)."""
    import random

    import numpy as np

    if not val_set_size:
        return np.arange(count), np.arange(0)
    n = int(round(val_set_size * count)) if val_set_size < 1 else int(val_set_size)
    if n <= 0 or n >= count:
        raise UserError(f"--val_set_size={val_set_size} leaves no training or no validation examples out of {count}; "
                        "pass a smaller count or fraction.")
    order = list(range(count))
    random.Random(seed).shuffle(order)
    held = np.sort(np.array(order[:n], dtype=np.int64))
    keep = np.ones(count, dtype=bool)
    keep[held] = False
    return np.flatnonzero(keep), held


def _histogram(lengths):
    """Lines of a length histogram in power-of-two buckets, with counts, shares and bars."""
    import numpy as np

    low, top = int(lengths.min()), int(lengths.max())
    edges = [0] + [2 ** k for k in range(5, max(6, top.bit_length() + 1))]
    edges = [e for e in edges if e < top] + [top]
    edges = edges[max(0, sum(e < low for e in edges) - 1):]  # start at the bucket of the shortest example
    counts = np.histogram(lengths, bins=np.array(edges) + 0.5)[0] if top > 0 else np.array([len(lengths)])
    lines = []
    for lo, hi, n in zip(edges, edges[1:], counts):
        share = n / len(lengths)
        lines.append(f"  {lo + 1:>6}-{hi:<6} {n:>12,}  {share:6.1%}  {'#' * round(share * 40)}")
    return lines


def summary(examples, stats, tokenizer):
    """Lines describing the dataset: counts, a token-length histogram, and one example with its mask shown.
    `examples` is a TokenStore (or anything with lengths() and example(i))."""
    lengths = examples.lengths()
    return "\n".join([
        f"records read: {stats['records']:,}, kept: {len(lengths):,}, truncated: {stats['truncated']:,}, dropped "
        f"(nothing left to train on): {stats['dropped']:,}",
        *length_lines(lengths, stats, "example"),
        *mask_lines(examples[0], tokenizer, "example 1 ([-] masked from the loss, [+] trained on):")])


def length_lines(lengths, stats, unit, what=""):
    """summary's token-length lines: the spread of `lengths` (tokens per `unit`, `what` it holds) and its
    histogram."""
    import numpy as np

    return [f"tokens per {unit}{what}: min {lengths.min()}, median {int(np.median(lengths))}, "
            f"p95 {int(np.percentile(lengths, 95, method='lower'))}, "
            f"max {lengths.max()}; total {int(lengths.sum()):,}; supervised tokens: {stats['supervised_tokens']:,}",
            f"length histogram (tokens per {unit}, count, share):", *_histogram(lengths)]


def mask_lines(example, tokenizer, title):
    """`title`, then the example's text in runs, each marked [-] (masked from the loss) or [+] (trained on)."""
    ids, masked = list(example["input_ids"]), [int(label) == IGNORE for label in example["labels"]]
    lines, run_start = [title], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or masked[i] != masked[run_start]:
            lines.append(f"  [{'-' if masked[run_start] else '+'}] {tokenizer.decode(ids[run_start:i])!r}")
            run_start = i
    return lines


class Collator:
    """Batch examples for the Trainer.

    packing=True (the default) concatenates the batch into one row without padding: position_ids
    restart at each example, which makes the attention block-diagonal (transformers detects this from
    position_ids when no attention_mask is given), and each example's first label is masked so no
    example learns from its neighbour. Loss and gradients equal the padded computation. It also sends
    logits_to_keep, the positions whose next token is supervised (see utils/train/fast/loss.py).
    """

    def __init__(self, pad_token_id, packing=True):
        self.pad_token_id, self.packing = pad_token_id, packing

    def __call__(self, features):
        import numpy as np
        import torch

        ids = [np.asarray(f["input_ids"], dtype=np.int64) for f in features]
        labels = [np.asarray(f["labels"], dtype=np.int64) for f in features]
        if self.packing:
            row_labels = np.concatenate([np.concatenate([[IGNORE], lab[1:]]) for lab in labels])
            positions = np.concatenate([np.arange(len(i)) for i in ids])
            targets = torch.from_numpy(row_labels[1:])
            return {"input_ids": torch.from_numpy(np.concatenate(ids))[None],
                    "labels": torch.from_numpy(row_labels)[None], "position_ids": torch.from_numpy(positions)[None],
                    "logits_to_keep": (targets != IGNORE).nonzero().flatten()}
        width = max(len(i) for i in ids)
        batch = {"input_ids": torch.full((len(ids), width), self.pad_token_id),
                 "labels": torch.full((len(ids), width), IGNORE),
                 "attention_mask": torch.zeros((len(ids), width), dtype=torch.long)}
        for row, (i, lab) in enumerate(zip(ids, labels)):
            batch["input_ids"][row, :len(i)] = torch.from_numpy(i)
            batch["labels"][row, :len(lab)] = torch.from_numpy(lab)
            batch["attention_mask"][row, :len(i)] = 1
        return batch
