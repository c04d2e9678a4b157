"""Preference data: every layout read into the same pair, every bad record named with its fix, exact masks,
prompts equal to SFT's and the chat stages', truncation that keeps both EOS, and the packed pair row."""
import json
import re

import pytest
from conftest import ROOT, SHARED_DATA

from utils.core.errors import UserError
from utils.data.encoding import IGNORE, encode_dialogs, encode_prompt
from utils.data.preference import (
    Pair,
    PairCollator,
    Pairs,
    PreferenceEncoder,
    Unpaired,
    UnpairedCollator,
    encode_pairs,
    encode_stream,
    encode_unpaired,
    read_preference,
    sides,
)
from utils.data.templates import load_template


def write(tmp_path, rows, name="pref.json"):
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    else:
        path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return path


def msgs(*pairs, key=("from", "value")):
    return [{key[0]: role, key[1]: text} for role, text in pairs]


LAYOUTS = [
    ("sharegpt", {"conversations": msgs(("human", "Hi"), ("gpt", "Hello!"), ("human", "Name?")),
                  "chosen": {"from": "gpt", "value": "Lumi."}, "rejected": {"from": "gpt", "value": "I won't say."},
                  "system": "Be brief."},
     Pair("Be brief.", [("Hi", "Hello!")], "Name?", "Lumi.", "I won't say.")),
    ("sharegpt, system message", {"conversations": msgs(("system", "Be kind."), ("human", "Name?")),
                                  "chosen": {"from": "gpt", "value": "Lumi."},
                                  "rejected": {"from": "gpt", "value": "?"}},
     Pair("Be kind.", [], "Name?", "Lumi.", "?")),
    ("alpaca", {"instruction": "Translate", "input": "你好", "chosen": "Hello", "rejected": "It depends.",
                "system": "Be brief.", "history": [["Hi", "Hello!"]]},
     Pair("Be brief.", [("Hi", "Hello!")], "Translate", "Hello", "It depends.", "你好")),
    ("prompt string", {"prompt": "2+2?", "chosen": "4", "rejected": "Numbers are hard."},
     Pair("", [], "2+2?", "4", "Numbers are hard.")),
    ("prompt messages", {"prompt": msgs(("system", "S"), ("user", "Hi"), ("assistant", "Hey"), ("user", "2+2?"),
                                        key=("role", "content")),
                         "chosen": msgs(("assistant", "4"), key=("role", "content")),
                         "rejected": msgs(("user", "2+2?"), ("assistant", "Five"), key=("role", "content"))},
     Pair("S", [("Hi", "Hey")], "2+2?", "4", "Five")),
]


@pytest.mark.parametrize("name,record,pair", LAYOUTS, ids=[case[0] for case in LAYOUTS])
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_each_pair_layout(tmp_path, name, record, pair, suffix):
    assert read_preference(write(tmp_path, [record], "pref" + suffix)) == [pair]


def test_unpaired_layouts_for_kto(tmp_path):
    rows = [{"messages": msgs(("user", "Hi"), ("assistant", "Hello!"), ("user", "Name?"), ("assistant", "Lumi."),
                              key=("role", "content")), "label": True},
            {"instruction": "Name?", "input": "", "output": "No comment.", "label": False},
            {"instruction": "Q", "chosen": "good", "rejected": "bad"}]
    assert read_preference(write(tmp_path, rows), unpaired=True) == [
        Unpaired("", [("Hi", "Hello!")], "Name?", "Lumi.", True),
        Unpaired("", [], "Name?", "No comment.", False),
        Unpaired("", [], "Q", "good", True),  # a pair gives its chosen answer as desirable, its rejected one not
        Unpaired("", [], "Q", "bad", False),
    ]


PAIR_ERRORS = [
    ({"instruction": "Q", "rejected": "b"},
     '"chosen" is missing; every pair needs a "chosen" and a "rejected" answer.'),
    ({"instruction": "Q", "chosen": "a", "rejected": "  "},
     '"rejected" is empty; give every pair a non-empty "chosen" and "rejected" answer, or remove the record.'),
    ({"conversations": msgs(("human", "Q")), "chosen": {"from": "gpt", "value": ""}, "rejected": {"from": "gpt",
                                                                                                  "value": "b"}},
     '"chosen" is empty; give every pair a non-empty "chosen" and "rejected" answer, or remove the record.'),
    ({"instruction": "Q", "chosen": "Same answer.", "rejected": "Same answer. "},
     '"chosen" and "rejected" are the same answer; a pair must differ, so fix one of them or remove the record.'),
    ({"conversations": msgs(("human", "Q"), ("gpt", "A")), "chosen": {"from": "gpt", "value": "a"},
      "rejected": {"from": "gpt", "value": "b"}},
     '"conversations" ends on the assistant\'s turn, not the user\'s; a preference prompt ends with the user\'s '
     'message, so move that last answer into "chosen" or remove it.'),
    ({"prompt": msgs(("user", "Q"), ("user", "Q2"), key=("role", "content")), "chosen": "a", "rejected": "b"},
     '"prompt" must alternate user and assistant messages after an optional system message, and end with the '
     "user's message."),
    ({"conversations": msgs(("system", "S")), "chosen": "a", "rejected": "b"},
     '"conversations" holds only a system message; add the user\'s message that "chosen" and "rejected" answer.'),
    ({"instruction": "Q", "chosen": {"from": "human", "value": "a"}, "rejected": "b"},
     '"chosen" must be the assistant\'s answer: a string, a {"from": "gpt", "value": ...} message, or a list of '
     "messages that ends with the assistant's."),
    ({"instruction": "Q", "chosen": 3, "rejected": "b"},
     '"chosen" must be the assistant\'s answer: a string, a {"from": "gpt", "value": ...} message, or a list of '
     "messages that ends with the assistant's."),
    ({"instruction": ["Q"], "chosen": "a", "rejected": "b"},
     '"instruction" is a list, not a string; give it as a string (data/README.md shows each layout).'),
    ({"instruction": "Q", "output": "a"},
     'unknown preference layout (keys: "instruction", "output"); give a prompt ("conversations", "messages", '
     '"prompt" or "instruction") with a "chosen" and a "rejected" answer, as data/README.md shows.'),
    ({"question": "Q", "chosen": "a", "rejected": "b"},
     'unknown preference layout (keys: "question", "chosen", "rejected"); give a prompt ("conversations", '
     '"messages", "prompt" or "instruction") with a "chosen" and a "rejected" answer, as data/README.md shows.'),
    ({"instruction": "Q", "output": "a", "label": True},
     'an unpaired answer with a "label" is for KTO; pass --pref_loss=kto, or give the record a "chosen" and a '
     '"rejected" answer.'),
]

KTO_ERRORS = [
    ({"instruction": "Q", "output": "a", "label": "yes"},
     '"label" is "yes", not true or false; write "label": true for a desirable answer and "label": false for an '
     "undesirable one."),
    ({"messages": msgs(("user", "Q"), ("assistant", "a"), key=("role", "content")), "label": 1},
     '"label" is 1, not true or false; write "label": true for a desirable answer and "label": false for an '
     "undesirable one."),
    ({"messages": msgs(("user", "Q"), key=("role", "content")), "label": True},
     '"messages" must alternate user and assistant messages after an optional system message, and end with an '
     "assistant message."),
    ({"instruction": "Q", "output": "", "label": False},
     '"output" is empty; give every record a non-empty "output", or remove the record.'),
    ({"prompt": "Q", "completion": "a", "label": True},
     'unknown preference layout (keys: "prompt", "completion", "label"); give a prompt ("conversations", '
     '"messages", "prompt" or "instruction") with a "chosen" and a "rejected" answer, or an answer ("messages" '
     'ending with the assistant\'s, or "instruction" and "output") with a "label" of true or false, as '
     "data/README.md shows."),
]


@pytest.mark.parametrize("unpaired,record,message", [(False, r, m) for r, m in PAIR_ERRORS]
                         + [(True, r, m) for r, m in KTO_ERRORS])
def test_bad_record_is_one_sentence_naming_file_record_and_fix(tmp_path, unpaired, record, message):
    path = write(tmp_path, [{"instruction": "fine", "chosen": "a", "rejected": "b"}, record])
    with pytest.raises(UserError, match="^" + re.escape(f"{path}: record 2: {message}") + "$"):
        read_preference(path, unpaired=unpaired)


def test_not_an_object_and_empty_file(tmp_path):
    path = write(tmp_path, [["Q", "a", "b"]])
    with pytest.raises(UserError, match=re.escape(f"{path}: record 1 is a list, not a JSON object; each preference "
                                                  'record must look like {"instruction": ..., "chosen": ..., '
                                                  '"rejected": ...}.')):
        read_preference(path)
    with pytest.raises(UserError, match=re.escape(f"{write(tmp_path, [])} holds no records; add some")):
        read_preference(tmp_path / "pref.json")


def test_masks_of_a_pair_exactly(tokenizer):
    """ChatML on the built-in tokenizer: the prompt masked, each answer ending with <|im_end|> (its EOS); packed,
    the two sequences restart their positions and the first label of each is masked."""
    (pair,), stats = encode_pairs([Pair("", [], "Hi", "Hello!", "Go away.")], tokenizer,
                                  load_template("chatml", tokenizer))
    prompt = [1, 4093, 198, 26843, 2, 198, 1, 520, 9531, 198]
    assert tokenizer.decode(prompt) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert pair == {"prompt_ids": prompt, "chosen_ids": [19556, 17, 2], "rejected_ids": [6044, 2025, 30, 2]}
    assert tokenizer.eos_token_id == 2
    assert stats == {"records": 1, "truncated": 0, "dropped": 0, "supervised_tokens": 7}
    masked = [IGNORE] * 10
    assert sides(pair) == [{"input_ids": prompt + [19556, 17, 2], "labels": masked + [19556, 17, 2]},
                           {"input_ids": prompt + [6044, 2025, 30, 2], "labels": masked + [6044, 2025, 30, 2]}]
    batch = {k: v.tolist() for k, v in PairCollator(tokenizer.pad_token_id)([pair]).items()}
    assert batch == {
        "input_ids": [prompt + [19556, 17, 2] + prompt + [6044, 2025, 30, 2]],
        "labels": [masked + [19556, 17, 2] + masked + [6044, 2025, 30, 2]],
        "position_ids": [list(range(13)) + list(range(14))],
        "logits_to_keep": [9, 10, 11, 22, 23, 24, 25],  # the positions that predict an answer token
        "sequence_index": [[0] * 13 + [1] * 14],
    }
    padded = PairCollator(tokenizer.pad_token_id, packing=False)([pair])
    assert padded["input_ids"].tolist() == [prompt + [19556, 17, 2, tokenizer.pad_token_id],
                                            prompt + [6044, 2025, 30, 2]]
    assert padded["attention_mask"].tolist() == [[1] * 13 + [0], [1] * 14] and "sequence_index" not in padded


@pytest.mark.parametrize("template_name", ["auto", "alpaca"])
def test_prompt_equals_sft_and_chat(tokenizer, template_name):
    """The prompt is encode_prompt's (what chat sends), and prompt + chosen is the SFT example's ids."""
    template = load_template(template_name, tokenizer)
    pair = Pair("Be brief.", [("Hi", "Hello!"), ("Name?", "Lumi.")], "Translate", "Hello", "It depends.", "你好")
    (encoded,), _ = encode_pairs([pair], tokenizer, template)
    chat_prompt = encode_prompt(tokenizer, template, pair.system, pair.history,
                                template.user_text(pair.query, pair.last_input))
    (sft,), _ = encode_dialogs([(pair.system, pair.history + [(pair.query, pair.chosen)], pair.last_input)],
                               tokenizer, template)
    assert encoded["prompt_ids"] == chat_prompt
    assert encoded["prompt_ids"] + encoded["chosen_ids"] == sft["input_ids"]
    assert encoded["chosen_ids"] == sft["labels"][-len(encoded["chosen_ids"]):]  # the same answer tokens and EOS
    assert encoded["rejected_ids"][-1] == tokenizer.eos_token_id


def test_truncation_cuts_the_shared_prompt_first_and_keeps_both_eos(tokenizer):
    template, eos = load_template("chatml", tokenizer), tokenizer.eos_token_id
    history = [(f"question {i} " * 10, f"answer {i} " * 10) for i in range(6)]
    pair = Pair("", history, "final question", "the good answer", "a worse answer " * 3)
    (full,), _ = encode_pairs([pair], tokenizer, template)
    (cut,), stats = encode_pairs([pair], tokenizer, template, cutoff_len=64)
    assert stats["truncated"] == 1 and stats["dropped"] == 0
    assert cut["chosen_ids"] == full["chosen_ids"] and cut["rejected_ids"] == full["rejected_ids"]  # answers whole
    assert len(cut["prompt_ids"]) + len(cut["rejected_ids"]) == 64  # the longer side fills the cutoff
    assert cut["prompt_ids"] == full["prompt_ids"][-len(cut["prompt_ids"]):]  # the oldest context went first
    assert tokenizer.decode(cut["prompt_ids"]).endswith("final question<|im_end|>\n<|im_start|>assistant\n")

    long_answers = Pair("", [], "q", "word " * 300, "other " * 200)
    (short_prompt,), _ = encode_pairs([long_answers], tokenizer, template)
    (cut,), _ = encode_pairs([long_answers], tokenizer, template, cutoff_len=50)
    assert cut["prompt_ids"] == short_prompt["prompt_ids"]  # a prompt under half the cutoff is kept whole
    for side in ("chosen_ids", "rejected_ids"):
        assert len(cut["prompt_ids"]) + len(cut[side]) == 50 and cut[side][-1] == eos
        assert cut[side][:-1] == short_prompt[side][:len(cut[side]) - 1]  # the answer's tail went, not its start

    both_long = Pair("", [("context " * 100, "reply " * 100)], "q", "long " * 100, "Short.")
    (whole,), _ = encode_pairs([both_long], tokenizer, template)
    (cut,), _ = encode_pairs([both_long], tokenizer, template, cutoff_len=64)
    assert cut["prompt_ids"] == whole["prompt_ids"][-32:]  # the prompt keeps half the cutoff
    assert len(cut["chosen_ids"]) == 32 and cut["chosen_ids"][-1] == eos
    assert cut["rejected_ids"] == whole["rejected_ids"]  # the short answer fits beside the shared prompt


def test_pairs_with_nothing_left_to_compare_are_dropped_and_counted(tokenizer):
    template = load_template("chatml", tokenizer)
    pairs = [Pair("", [], "q", "yes " * 40 + "A", "yes " * 40 + "B"),  # both cut to the same tokens
             Pair("", [], "q", "Fine.", "Go away."),
             Pair("", [], "q " * 50, "a", "b")]
    encoded, stats = encode_pairs(pairs, tokenizer, template, cutoff_len=30)
    assert (len(encoded), stats["records"], stats["truncated"], stats["dropped"]) == (2, 3, 2, 1)
    assert encoded[0]["chosen_ids"] == encode_pairs(pairs[1:2], tokenizer, template)[0][0]["chosen_ids"]
    _, stats = encode_pairs(pairs, tokenizer, template, cutoff_len=1)  # no prompt left at all
    assert stats["dropped"] == 3


def test_stream_store_form_and_bulk_encoder_agree(tokenizer):
    """Batches of a stream give the in-memory result; the examples a store would hold read back as the pairs;
    the bulk tokenizer changes nothing; subsets and lengths follow the pairs."""
    template = load_template("auto", tokenizer)
    encoder = PreferenceEncoder(tokenizer, template, 96)
    items = list(encoder.records([ROOT / "data" / "pref_demo.json"]))[:20]
    assert items == read_preference(ROOT / "data" / "pref_demo.json")[:20]
    pairs, stats = encoder.pairs(items)
    streamed_stats = {}
    assert list(encode_stream(items, encoder, streamed_stats, batch=3)) == pairs and streamed_stats == stats
    assert encoder.for_bulk().pairs(items) == (pairs, stats)
    examples, store_stats = encoder.dialogs(items)
    view = Pairs(examples)
    assert store_stats == stats and len(examples) == 2 * len(pairs) and [view[i] for i in range(len(view))] == pairs
    sub = view.subset([4, 1])
    assert [sub[0], sub[1]] == [pairs[4], pairs[1]] and sub[-1] == pairs[1]
    assert sub.lengths().tolist() == [sum(len(s["input_ids"]) for s in sides(pairs[i])) for i in (4, 1)]
    with pytest.raises(IndexError):
        sub[2]


def test_kto_examples_and_kl_rows(tokenizer):
    template = load_template("chatml", tokenizer)
    items = [Unpaired("", [], "Hi", "Hello!", True), Unpaired("", [], "Name?", "No.", False)]
    examples, stats = encode_unpaired(items, tokenizer, template)
    prompt = [1, 4093, 198, 26843, 2, 198, 1, 520, 9531, 198]
    assert examples[0] == {"input_ids": prompt + [19556, 17, 2], "labels": [IGNORE] * 10 + [19556, 17, 2],
                           "kto_label": True}
    assert examples[1]["kto_label"] is False and stats["records"] == 2 and stats["dropped"] == 0
    batch = UnpairedCollator(tokenizer.pad_token_id, kl=True)(examples)
    hi, hello = examples[0]["input_ids"][:10], examples[0]["input_ids"][10:]
    name, no = examples[1]["input_ids"][:-3], examples[1]["input_ids"][-3:]
    assert tokenizer.decode(no) == "No.<|im_end|>"
    assert batch["input_ids"].tolist() == [hi + hello + name + no + hi + no + name + hello]  # KL: the previous answer
    assert batch["sequence_index"].tolist() == [[0] * 13 + [1] * len(name + no) + [2] * 13 + [3] * len(name + hello)]
    assert batch["kto_label"].tolist() == [True, False]
    _, stats = encode_unpaired(items, tokenizer, template, cutoff_len=1)
    assert stats["dropped"] == 2


def test_demo_preference_set(tokenizer):
    """data/pref_demo.json: bilingual pairs that validate, fit the default cutoff, and differ in style: every
    chosen answer is shorter than its rejected one."""
    items = read_preference(ROOT / "data" / "pref_demo.json")
    assert 60 <= len(items) <= 100
    chinese = sum(bool(re.search(r"[\u4e00-\u9fff]", p.query)) for p in items)
    assert 0.3 < chinese / len(items) < 0.7
    assert sum("Lumi" in p.chosen for p in items) >= 30
    assert not any("Lumi" in p.rejected or "露米" in p.rejected for p in items)  # the persona only on the chosen side
    pairs, stats = encode_pairs(items, tokenizer, load_template("auto", tokenizer), cutoff_len=512)
    assert stats["truncated"] == 0 and len(pairs) == len(items)
    assert all(len(pairs[i]["chosen_ids"]) < len(pairs[i]["rejected_ids"]) for i in range(len(pairs)))


@pytest.mark.skipif(not (SHARED_DATA / "dpo_en_demo.json").is_file(), reason="needs ../shared/data")
def test_llama_factory_sharegpt_files(tokenizer):
    """LLaMA-Factory's ShareGPT preference files: system messages and multi-turn prompts read, every pair kept
    at a cutoff of 256, both answers ending with EOS."""
    items = read_preference(f"{SHARED_DATA / 'dpo_en_demo.json'},{SHARED_DATA / 'dpo_zh_demo.json'}")
    assert len(items) == 500 and any(p.system for p in items) and any(len(p.history) >= 2 for p in items)
    pairs, stats = encode_pairs(items[::10], tokenizer, load_template("auto", tokenizer), cutoff_len=256)
    assert len(pairs) == 50 and stats["dropped"] == 0 and stats["truncated"] > 0
    eos = tokenizer.eos_token_id
    assert all(pairs[i]["chosen_ids"][-1] == eos and pairs[i]["rejected_ids"][-1] == eos for i in range(50))
    assert max(pairs.lengths()) <= 2 * 256
