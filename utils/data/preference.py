"""Preference data (DPO, IPO, ORPO, SimPO, KTO): read, validate, tokenize, truncate and batch pairs.

Records stream from utils/data/records.py (json_records) and are validated one at a time, like SFT records; a bad
one raises a UserError naming the file, the record and the fix. Each becomes a `Pair` (system, history,
query, chosen, rejected) or, for KTO, an `Unpaired` answer (system, history, query, answer, label); a pair
record read for KTO gives two answers, its chosen one desirable and its rejected one not. The layouts are
documented in data/README.md.

Tokenizing goes through the SFT template code (utils.data.encoding.Encoder.segments), so a pair's prompt is token for
token what SFT trains on before that answer and what the chat stages send (utils.data.encoding.encode_prompt). The
whole prompt is masked, earlier answers included; EOS ends both answers.

Truncation, per sequence (prompt + the longer answer <= cutoff_len), follows SFT's rule (utils.data.encoding._truncate)
with one prompt shared by both answers: the prompt is cut first, from its oldest end (after BOS), down to half
the cutoff; what still does not fit is cut from the end of the longer answer, and then of the other, each
keeping its EOS as its last token. A pair left with no prompt, or with two identical answers, is dropped and
counted.

A pair is stored as two SFT-shaped examples, chosen then rejected (`sides`): the form utils/data/token_store.py
writes, so a store can hold pairs once it reads records with iter_preference and keeps the label mask for these
stages (issue 16). `Pairs` reads pairs back from such examples (a list, or that store), and `PairCollator` packs
each pair's two sequences into one row.
"""
import itertools
import json
from typing import NamedTuple

import numpy as np

from utils.core.errors import UserError
from utils.core.files import ROOT
from utils.core.run_folder import find_adapter
from utils.data.encoding import IGNORE, Collator, Encoder, _truncate, length_lines, mask_lines
from utils.data.records import (
    SFT_SUFFIXES,
    data_files,
    history_pairs,
    json_records,
    parse_messages,
    string_field,
    to_dialog,
)

BATCH = 512  # items encoded at a time by encode_stream
PREF_LOSSES = ("dpo", "ipo", "orpo", "simpo", "kto")  # finetune's --pref_loss (utils/train/preference_loss.py)
PREF_DEMO = ROOT / "data" / "pref_demo.json"  # --stage dpo's default data
LAYOUTS = 'a prompt ("conversations", "messages", "prompt" or "instruction") with a "chosen" and a "rejected" answer'


def preference_flags(c, stage, pref_loss, pref_beta, simpo_gamma, pref_ftx, lora_model, data_paths=(),
                     train_on_inputs=False):
    """finetune's --stage (sft, pt or dpo), --pref_loss, --pref_beta, --simpo_gamma, --pref_ftx and --lora_model (the
    adapter folder it names, or None), checked into `c` (a utils.core.flags.Checks); under --stage dpo the
    `data_paths` (--data_path, --val_data_path) must not name .txt files, and --train_on_inputs is refused."""
    adapter = c.call(find_adapter, lora_model) if c.text("lora_model", lora_model) else None
    given = [f"--{name}={value}" for name, value, default in (
        ("pref_loss", pref_loss, "dpo"), ("pref_beta", pref_beta, 0.1), ("simpo_gamma", simpo_gamma, 0.5),
        ("pref_ftx", pref_ftx, 0.0)) if value != default]
    c.add(f"{', '.join(given)}: preference training flags, used only with --stage=dpo; add --stage=dpo or leave "
          "them out" if given and stage != "dpo" else None)
    c.add("--train_on_inputs is for SFT: preference losses compare two answers to one prompt and never train on "
          "the prompt; leave it out with --stage=dpo" if train_on_inputs is True and stage == "dpo" else None)
    for flag, value in (("data_path", data_paths[0]), ("val_data_path", data_paths[1])) if data_paths else ():
        parts = value if isinstance(value, (list, tuple)) else str(value or "").split(",")
        text = [p for p in map(str, parts) if p.strip().endswith(".txt")]
        c.add(f"--{flag}={text[0]} is raw text; --stage=dpo reads preference pairs from .json or .jsonl files "
              "(data/README.md shows the layouts)" if text and stage == "dpo" else None)
    ftx = c.number("pref_ftx", pref_ftx, 0)
    c.add(f"--pref_ftx={pref_ftx} adds an NLL of the chosen answers to dpo, ipo or simpo; --pref_loss={pref_loss} "
          "has none to add to (orpo has its own NLL); leave --pref_ftx out" if ftx and pref_loss in ("orpo", "kto")
          else None)
    return (c.choice("stage", stage, ("sft", "pt", "dpo")), c.choice("pref_loss", pref_loss, PREF_LOSSES),
            c.number("pref_beta", pref_beta, 0, above_low=True), c.number("simpo_gamma", simpo_gamma, 0), ftx,
            adapter)


def _new_stats():
    return {"records": 0, "truncated": 0, "dropped": 0, "supervised_tokens": 0}


class Pair(NamedTuple):
    system: str
    history: list  # [(question, answer), ...], oldest first
    query: str  # the user's last message, which both answers answer
    chosen: str
    rejected: str
    last_input: str = ""  # the alpaca-style "input", joined to the query by the template's input_format


class Unpaired(NamedTuple):
    system: str
    history: list
    query: str
    answer: str
    label: bool  # True: a desirable answer
    last_input: str = ""


def _layout_error(rec, where, unpaired=False):
    keys = ", ".join(f'"{k}"' for k in rec) or "none"
    if unpaired:
        return UserError(f"{where}: unknown preference layout (keys: {keys}); give {LAYOUTS}, or an answer "
                         '("messages" ending with the assistant\'s, or "instruction" and "output") with a "label" '
                         "of true or false, as data/README.md shows.")
    if "label" in rec:
        return UserError(f'{where}: an unpaired answer with a "label" is for KTO; pass --pref_loss=kto, '
                         'or give the record a "chosen" and a "rejected" answer.')
    return UserError(f"{where}: unknown preference layout (keys: {keys}); give {LAYOUTS}, as data/README.md shows.")


def _text(rec, key, where, required=False):
    return string_field(rec, key, where, required, "give it as a string (data/README.md shows each layout)")


def _answer(rec, key, where):
    """The text of "chosen" or "rejected": a string, one {from, value} / {role, content} message, or a list of
    messages whose last one, the assistant's, is the answer."""
    value = rec.get(key)
    if value is None:
        raise UserError(f'{where}: "{key}" is missing; every pair needs a "chosen" and a "rejected" answer.')
    role, text = "assistant", value
    if isinstance(value, (dict, list)):
        _, msgs = parse_messages([value] if isinstance(value, dict) else value, key, where)
        role, text = msgs[-1] if msgs else ("system", None)
    if role != "assistant" or not isinstance(text, str):
        raise UserError(f'{where}: "{key}" must be the assistant\'s answer: a string, a {{"from": "gpt", "value": '
                        '...} message, or a list of messages that ends with the assistant\'s.')
    if not text.strip():
        raise UserError(f'{where}: "{key}" is empty; give every pair a non-empty "chosen" and "rejected" answer, '
                        "or remove the record.")
    return text


def _prompt(rec, where):
    """(system, history, query, last input) of a pair record: the conversation both answers continue."""
    key = next((k for k in ("conversations", "messages") if k in rec), None)
    if key is None and isinstance(rec.get("prompt"), list):
        key = "prompt"
    if key is None and "prompt" in rec:
        return _text(rec, "system", where), history_pairs(rec, where), _text(rec, "prompt", where, True), ""
    if key is None and "instruction" in rec:
        return (_text(rec, "system", where), history_pairs(rec, where), _text(rec, "instruction", where, True),
                _text(rec, "input", where))
    if key is None:
        raise _layout_error(rec, where)
    system, msgs = parse_messages(rec[key], key, where)
    system = system or _text(rec, "system", where)
    if not msgs:
        raise UserError(f'{where}: "{key}" holds only a system message; add the user\'s message that "chosen" '
                        'and "rejected" answer.')
    if msgs[-1][0] != "user":
        raise UserError(f'{where}: "{key}" ends on the assistant\'s turn, not the user\'s; a preference prompt '
                        'ends with the user\'s message, so move that last answer into "chosen" or remove it.')
    if any(role != ("user", "assistant")[k % 2] for k, (role, _) in enumerate(msgs)):
        raise UserError(f'{where}: "{key}" must alternate user and assistant messages after an optional system '
                        "message, and end with the user's message.")
    history = [(msgs[k][1], msgs[k + 1][1]) for k in range(0, len(msgs) - 1, 2)]
    return system, history, msgs[-1][1], ""


def to_pair(rec, where):
    """Validate one record as a preference pair: ShareGPT {conversations, chosen, rejected} (optional "system"),
    alpaca {instruction, input, chosen, rejected} (optional "history", "system"), or {prompt, chosen, rejected},
    the prompt a string or a list of OpenAI messages. Returns a Pair."""
    if not isinstance(rec, dict):
        raise UserError(f'{where} is a {type(rec).__name__}, not a JSON object; each preference record must look '
                        'like {"instruction": ..., "chosen": ..., "rejected": ...}.')
    if "chosen" not in rec and "rejected" not in rec:
        raise _layout_error(rec, where)
    system, history, query, last_input = _prompt(rec, where)
    chosen, rejected = _answer(rec, "chosen", where), _answer(rec, "rejected", where)
    if chosen.strip() == rejected.strip():
        raise UserError(f'{where}: "chosen" and "rejected" are the same answer; a pair must differ, so fix one of '
                        "them or remove the record.")
    return Pair(system, history, query, chosen, rejected, last_input)


def to_unpaired(rec, where):
    """Validate one record for KTO: {messages (or conversations) ending with the answer, label} or
    {instruction, input, output, label}, label true or false; a pair record gives its chosen answer as desirable
    and its rejected one as undesirable. Returns a tuple of Unpaired."""
    if isinstance(rec, dict) and ("chosen" in rec or "rejected" in rec):
        p = to_pair(rec, where)
        return (Unpaired(p.system, p.history, p.query, p.chosen, True, p.last_input),
                Unpaired(p.system, p.history, p.query, p.rejected, False, p.last_input))
    if not isinstance(rec, dict):
        raise UserError(f'{where} is a {type(rec).__name__}, not a JSON object; each KTO record must look like '
                        '{"messages": [...], "label": true}.')
    if "label" not in rec or not any(k in rec for k in ("messages", "conversations", "instruction")):
        raise _layout_error(rec, where, unpaired=True)
    label = rec["label"]
    if not isinstance(label, bool):
        raise UserError(f'{where}: "label" is {json.dumps(label, ensure_ascii=False)}, not true or false; write '
                        '"label": true for a desirable answer and "label": false for an undesirable one.')
    system, turns, last_input = to_dialog(rec, where)
    (query, answer), history = turns[-1], turns[:-1]
    return (Unpaired(system, history, query, answer, label, last_input),)


def iter_preference(files, unpaired=False, progress=None):
    """Validated Pairs (or, unpaired=True, Unpaired answers for KTO) of every file in order, streamed."""
    for file in files:
        for where, rec in json_records(file, progress):
            if unpaired:
                yield from to_unpaired(rec, where)
            else:
                yield to_pair(rec, where)


def read_preference(data_path, unpaired=False, flag="data_path"):
    """All items of a small preference set as a list (tests, benchmarks; training streams them)."""
    items = list(iter_preference(data_files(data_path, SFT_SUFFIXES, flag), unpaired))
    if not items:
        raise UserError(f"{data_path} holds no records; add some, or point --{flag} at another file.")
    return items


def _truncate_pair(prompt, chosen, rejected, cutoff_len, keep_first, eos_id):
    """Cut (prompt, chosen, rejected) so that the prompt with either answer fits cutoff_len: SFT's _truncate of
    the prompt and the longer answer fixes the prompt both sides share; the other answer is cut, if it must be,
    with that prompt, which _truncate then keeps whole."""
    longest = max(chosen, rejected, key=len)
    ids, labels = _truncate(prompt + longest, [IGNORE] * len(prompt) + longest, len(prompt), cutoff_len,
                            keep_first, eos_id)
    prompt = ids[:labels.count(IGNORE)]  # an answer's labels are its ids, never IGNORE
    n, answers = len(prompt), []
    for answer in (chosen, rejected):
        if n + len(answer) > cutoff_len:
            answer = _truncate(prompt + answer, [IGNORE] * n + answer, n, cutoff_len, keep_first, eos_id)[0][n:]
        answers.append(answer)
    return prompt, *answers


def sides(pair):
    """A pair {prompt_ids, chosen_ids, rejected_ids} as two SFT-shaped examples [chosen, rejected]: the prompt
    then the answer, only the answer labelled. utils.data.encoding.Collator packs them into one row."""
    prompt = list(pair["prompt_ids"])
    return [{"input_ids": prompt + list(pair[key]), "labels": [IGNORE] * len(prompt) + list(pair[key])}
            for key in ("chosen_ids", "rejected_ids")]


def prompt_length(labels):
    """The tokens before an example's first label: its prompt (a preference example labels its answer only)."""
    supervised = np.flatnonzero(np.asarray(labels) != IGNORE)
    return int(supervised[0]) if len(supervised) else len(labels)


class PreferenceEncoder:
    """Turns Pairs (or Unpaired answers) into token ids with the SFT template code. It has the attributes and
    methods utils/data/token_store.py uses of an Encoder (tokenizer, stage, cutoff_len, for_bulk, dialogs), and
    records(), the reader a store build needs for these stages."""

    def __init__(self, tokenizer, template, cutoff_len=None, unpaired=False):
        self.sft = Encoder(tokenizer, "sft", template, cutoff_len)
        self.tokenizer, self.template, self.cutoff_len, self.unpaired = tokenizer, template, cutoff_len, unpaired
        self.stage = "kto" if unpaired else "dpo"

    def records(self, files, progress=None):
        """The validated items of the files, streamed: what token_store's build reads for this encoder."""
        return iter_preference(files, self.unpaired, progress)

    def for_bulk(self):
        copy = PreferenceEncoder.__new__(PreferenceEncoder)
        copy.__dict__.update(self.__dict__)
        copy.sft = self.sft.for_bulk()
        return copy

    def _split(self, dialogs):
        """(prompt ids, answer ids) of each dialog: BOS and every segment before the last answer, then that answer."""
        return [(self.sft.bos + [t for seg in segs[:-1] for t in seg], segs[-1]) for segs in self.sft.segments(dialogs)]

    def pairs(self, items):
        """(pairs, stats): {"prompt_ids", "chosen_ids", "rejected_ids"} per kept pair, the answers EOS-ended;
        stats count records (pairs read), truncated, dropped and supervised_tokens (both answers' tokens)."""
        items = list(items)
        stats = {**_new_stats(), "records": len(items)}
        # Each answer is rendered in its whole dialog, as SFT renders it: the prompt is tokenized twice, but the
        # two sides cannot come from different code.
        parts = self._split([(p.system, list(p.history) + [(p.query, answer)], p.last_input)
                             for p in items for answer in (p.chosen, p.rejected)])
        keep_first, out = len(self.sft.bos), []
        for (prompt, chosen), (_, rejected) in zip(parts[0::2], parts[1::2]):
            if self.cutoff_len and len(prompt) + max(len(chosen), len(rejected)) > self.cutoff_len:
                stats["truncated"] += 1
                prompt, chosen, rejected = _truncate_pair(prompt, chosen, rejected, self.cutoff_len, keep_first,
                                                          self.sft.eos_id)
            if len(prompt) <= keep_first or chosen == rejected:
                stats["dropped"] += 1  # no prompt left, or nothing left to compare
                continue
            stats["supervised_tokens"] += len(chosen) + len(rejected)
            out.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
        return out, stats

    def answers(self, items):
        """(examples, stats) of Unpaired answers: {"input_ids", "labels", "kto_label"}, the prompt masked, cut as
        SFT cuts an example; one with no prompt left is dropped and counted."""
        items = list(items)
        stats = {**_new_stats(), "records": len(items)}
        parts = self._split([(u.system, list(u.history) + [(u.query, u.answer)], u.last_input) for u in items])
        keep_first, out = len(self.sft.bos), []
        for item, (prompt, answer) in zip(items, parts):
            ids, labels = prompt + answer, [IGNORE] * len(prompt) + answer
            if self.cutoff_len and len(ids) > self.cutoff_len:
                stats["truncated"] += 1
                ids, labels = _truncate(ids, labels, len(prompt), self.cutoff_len, keep_first, self.sft.eos_id)
            if labels.count(IGNORE) <= keep_first:
                stats["dropped"] += 1
                continue
            stats["supervised_tokens"] += len(labels) - labels.count(IGNORE)
            out.append({"input_ids": ids, "labels": labels, "kto_label": item.label})
        return out, stats

    def dialogs(self, items):
        """(examples, stats) in utils.data.encoding.Encoder's form, for utils/data/token_store.py: a pair gives two
        examples,
        chosen then rejected (Pairs reads them back); an unpaired answer gives one."""
        if self.unpaired:
            return self.answers(items)
        pairs, stats = self.pairs(items)
        return [example for pair in pairs for example in sides(pair)], stats


def encode_stream(items, encoder, stats, batch=BATCH):
    """Encoded pairs (or KTO examples) of a stream of items, `batch` items at a time, their stats added into
    `stats`: the encoding holds one batch at a time, whatever the stream's length (what the caller keeps of
    the results is its own)."""
    items, encode = iter(items), encoder.answers if encoder.unpaired else encoder.pairs
    while chunk := list(itertools.islice(items, batch)):
        out, chunk_stats = encode(chunk)
        for k, v in chunk_stats.items():
            stats[k] = stats.get(k, 0) + v
        yield from out


def encode_pairs(items, tokenizer, template, cutoff_len=None):
    """(Pairs, stats) of a small set held in memory; the same examples PreferenceEncoder.dialogs stores."""
    stats = _new_stats()
    pairs = encode_stream(items, PreferenceEncoder(tokenizer, template, cutoff_len), stats)
    return Pairs([example for pair in pairs for example in sides(pair)]), stats


def encode_unpaired(items, tokenizer, template, cutoff_len=None):
    """(examples, stats) of KTO answers held in memory: {"input_ids", "labels", "kto_label"} each."""
    stats = _new_stats()
    return list(encode_stream(items, PreferenceEncoder(tokenizer, template, cutoff_len, unpaired=True), stats)), stats


class Pairs:
    """Pairs held as examples, two per pair, chosen then rejected: a list, or a TokenStore of
    PreferenceEncoder.dialogs' examples (the whole store: take subsets of the Pairs, not of the store).
    Item i is {"prompt_ids", "chosen_ids", "rejected_ids"} (lists of ints), the prompt read back as the
    chosen example's masked head."""

    def __init__(self, examples, index=None):
        self.examples, self.index = examples, index

    def __len__(self):
        return len(self.examples) // 2 if self.index is None else len(self.index)

    def __getitem__(self, i):
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        j = int(self.index[i] if self.index is not None else i % len(self))
        chosen, rejected = self.examples[2 * j], self.examples[2 * j + 1]
        n, ids = prompt_length(chosen["labels"]), np.asarray(chosen["input_ids"]).tolist()
        rejected_ids = np.asarray(rejected["input_ids"])[n:].tolist()
        return {"prompt_ids": ids[:n], "chosen_ids": ids[n:], "rejected_ids": rejected_ids}

    @property
    def stats(self):
        return self.examples.stats

    def origin(self):
        return self.examples.origin()

    def lengths(self):
        """Tokens per pair: its two sequences together, the length of its packed row."""
        per = (np.asarray(self.examples.lengths()) if hasattr(self.examples, "lengths")
               else np.array([len(e["input_ids"]) for e in self.examples], dtype=np.int64))
        per = per[0::2] + per[1::2]
        return per if self.index is None else per[self.index]

    def subset(self, index):
        index = np.asarray(index, dtype=np.int64)
        return Pairs(self.examples, index if self.index is None else self.index[index])


def pair_summary(pairs, stats, tokenizer):
    """utils.data.encoding.summary's lines for Pairs: counted in pairs, lengths per sequence, and the first pair's
    chosen
    example with its mask, then its rejected answer."""
    return "\n".join([
        f"pairs read: {stats['records']:,}, kept: {len(pairs):,}, truncated: {stats['truncated']:,}, "
        f"dropped (nothing left to compare): {stats['dropped']:,}",
        *length_lines(pairs.examples.lengths(), stats, "sequence", " (prompt + chosen or rejected answer)"),
        *mask_lines(pairs.examples[0], tokenizer,
                    "pair 1, its chosen answer ([-] masked from the loss, [+] trained on), then its rejected answer:"),
        f"  [+] {tokenizer.decode(pairs[0]['rejected_ids'])!r}"])


class PairCollator:
    """Batch pairs for the trainer as sequences [chosen 1, rejected 1, chosen 2, rejected 2, ...]: sequence 2k
    is pair k's chosen answer, 2k + 1 its rejected one.

    packing=True: utils.data.encoding.Collator's single row without padding (input_ids, labels, position_ids restarting
    at each sequence, logits_to_keep), plus sequence_index (1, tokens): the sequence each token belongs to, to sum
    log-probabilities per sequence. packing=False: one padded row per sequence, in the same order, with an
    attention_mask. Pop sequence_index before calling the model.
    """

    def __init__(self, pad_token_id, packing=True):
        self.collate = Collator(pad_token_id, packing)

    def __call__(self, features):
        return _with_index(self.collate, [example for pair in features for example in sides(pair)])


class UnpairedCollator:
    """Batch KTO examples: Collator's batch of their sequences (sequence_index added when packed, as in
    PairCollator) and kto_label, a bool per example. kl=True appends, after the n examples, n sequences that
    pair each prompt with the previous example's answer (the first with the last's), as TRL's KTOTrainer builds
    its KL estimate; they may run past cutoff_len by the difference of the two answers' lengths.
    """

    def __init__(self, pad_token_id, packing=True, kl=False):
        self.collate, self.kl = Collator(pad_token_id, packing), kl

    def __call__(self, features):
        import torch

        sequences = [{"input_ids": list(f["input_ids"]), "labels": list(f["labels"])} for f in features]
        if self.kl:
            parts = [(s["input_ids"][:n], s["input_ids"][n:]) for s in sequences for n in [prompt_length(s["labels"])]]
            sequences += [{"input_ids": prompt + answer, "labels": [IGNORE] * len(prompt) + answer}
                          for (prompt, _), (_, answer) in zip(parts, parts[-1:] + parts[:-1])]
        batch = _with_index(self.collate, sequences)
        batch["kto_label"] = torch.tensor([bool(f["kto_label"]) for f in features])
        return batch


def _with_index(collate, sequences):
    import torch

    batch = collate(sequences)
    if collate.packing:
        lengths = torch.tensor([len(s["input_ids"]) for s in sequences])
        batch["sequence_index"] = torch.repeat_interleave(torch.arange(len(sequences)), lengths)[None]
    return batch
