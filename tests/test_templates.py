"""Templates: every built-in renders, the auto template equals the tokenizer's chat template, and the
prompt built for inference is token for token the prompt that training saw."""
import json

import pytest
from conftest import chat_messages

from utils.core.errors import UserError
from utils.data.encoding import encode_dialogs, encode_prompt
from utils.data.templates import builtin_names, fill, from_chat_template, load_template

LLAMA3_JINJA = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


@pytest.mark.parametrize("system", [None, "You are terse."])
def test_auto_template_equals_chat_template(tokenizer, system):
    template = load_template("auto", tokenizer)
    assert template.stop_strings == ["<|im_end|>"]
    turns = [("Hi {there}", "Hello!"), ("Who are you?", "Lumi."), ("你好", None)]
    expected = tokenizer.apply_chat_template(chat_messages(system, turns), tokenize=False, add_generation_prompt=True)
    assert "".join(template.render(system, turns)) == expected
    full = tokenizer.apply_chat_template(chat_messages(system, turns[:2]), tokenize=False)
    segments = template.render(system, turns[:2])
    assert full.startswith("".join(segments)) and segments[1] == "Hello!<|im_end|>"


def test_derives_other_chat_template_families(tokenizer):
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    tok.chat_template = LLAMA3_JINJA
    template = from_chat_template(tok)
    assert template.assistant_format == "{content}<|eot_id|>"
    turns = [("a", "b"), ("c", None)]
    expected = tok.apply_chat_template(chat_messages("sys", turns), tokenize=False, add_generation_prompt=True)
    assert "".join(template.render("sys", turns)) == expected


def test_refuses_a_template_it_cannot_split(tokenizer):
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = "{{ messages[-1]['content'] }}"  # drops earlier turns: training and inference would differ
    with pytest.raises(UserError, match="cannot be split"):
        from_chat_template(tok)


@pytest.mark.parametrize("name", ["auto"] + builtin_names())
def test_inference_prompt_equals_training_prefix(tokenizer, name):
    template = load_template(name, tokenizer)
    history = [("Hi", "Hello!")]
    dialog = (None, history + [("Who are you?", "I am Lumi.")], "")
    (train,), _ = encode_dialogs([dialog], tokenizer, template)
    prompt = encode_prompt(tokenizer, template, None, history, "Who are you?")
    assert train["input_ids"][:len(prompt)] == prompt
    answer = train["input_ids"][len(prompt):]
    assert train["labels"][len(prompt):] == answer and answer[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(answer[:-1]).startswith("I am Lumi.")


def test_builtin_templates_are_data(tokenizer):
    assert {"prompt", "alpaca", "chatml", "llama3", "vicuna"} <= set(builtin_names())
    alpaca = load_template("alpaca", tokenizer)
    prompt = "".join(alpaca.render(None, [("Translate", None)], "你好"))
    assert prompt.endswith("### Instruction:\nTranslate\n\n### Input:\n你好\n\n### Response:\n")
    assert fill("{content}!", content="{input} {content}") == "{input} {content}!"  # inserted braces stay literal


def test_custom_template_file_and_unknown_name(tokenizer, tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"user_format": "Q: {content}\nA: ", "separator": "\n"}))
    template = load_template(str(path), tokenizer)
    assert template.render(None, [("x", "y"), ("z", None)]) == ["Q: x\nA: ", "y", "\nQ: z\nA: "]
    with pytest.raises(UserError, match="unknown --template='nope'"):
        load_template("nope", tokenizer)
