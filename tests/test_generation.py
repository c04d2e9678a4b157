"""utils.serve.generation: the prompt equals training's, stop tokens and strings, history trimming, Stop, seeds."""
import copy
import threading

import pytest
import torch

from utils.core.errors import UserError
from utils.data.encoding import IGNORE, encode_dialogs
from utils.data.templates import load_template
from utils.serve.generation import Stream, build_prompt, chat, check_settings, stop_token_ids, stream_chat

HISTORY = [("Hi", "Hello! How can I help?"), ("Name a colour.", "Blue.")]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from utils.model.loading import load_for_inference

    return load_for_inference(model_path=str(tiny_model_dir), precision="fp32")


@pytest.mark.parametrize("name", ["auto", "alpaca", "chatml", "llama3", "vicuna", "prompt"])
@pytest.mark.parametrize("system", ["", "Be brief."])
def test_prompt_is_the_training_prompt(tokenizer, name, system):
    template = load_template(name, tokenizer)
    prompt = build_prompt(tokenizer, template, system, HISTORY, "And a number?", 4096, 64)
    example = encode_dialogs([(system, HISTORY + [("And a number?", "Seven.")], "")], tokenizer, template)[0][0]
    n = len(prompt.ids)
    assert example["input_ids"][:n] == prompt.ids
    # the answer starts at n
    assert example["labels"][n - 1] == IGNORE and example["labels"][n:] == example["input_ids"][n:]
    assert prompt.dropped_turns == 0 and not prompt.query_trimmed and prompt.max_new_tokens == 64


def test_prompt_uses_the_run_config_template(tiny, tokenizer):
    from utils.data.templates import resolve_template

    _, _, template, _ = tiny
    recorded = load_template("alpaca", tokenizer).to_dict()
    assert resolve_template("auto", tokenizer, {"template": recorded}).user_format == recorded["user_format"]
    assert template.name == "auto" and template.stop_strings == ["<|im_end|>"]  # SmolLM2's chat template


def test_stop_tokens(tiny, tokenizer):
    model, _, template, _ = tiny
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert {tokenizer.eos_token_id, im_end} <= stop_token_ids(tokenizer, model, template)
    llama = copy.deepcopy(tokenizer)
    llama.add_special_tokens({"additional_special_tokens": ["<|eot_id|>"]})
    assert llama.convert_tokens_to_ids("<|eot_id|>") in stop_token_ids(llama, model, load_template("llama3", llama))


def feed(tokenizer, stop_ids, stop_strings, text, then=()):
    """Stream text through a Stream one token at a time, as the decode loop hands them over."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + list(then)
    stream = Stream(tokenizer, stop_ids, stop_strings, tokens=ids)
    return stream, list(stream)


def test_stream_stops_on_a_stop_string_and_never_shows_part_of_it(tokenizer):
    stream, pieces = feed(tokenizer, {tokenizer.eos_token_id}, ["### Instruction:"],
                          "Paris is the capital. ### Instruction: ignore this")
    assert "".join(pieces) == stream.text == "Paris is the capital. " and stream.reason == "stop string"
    assert not any("#" in p for p in pieces) and len(pieces) > 2


def test_stream_stops_on_a_stop_token_and_decodes_multibyte_text(tokenizer):
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    stream, pieces = feed(tokenizer, {im_end}, ["<|im_end|>"], "床前明月光。",
                          then=[im_end] + tokenizer("more", add_special_tokens=False)["input_ids"])
    assert "".join(pieces) == "床前明月光。" and stream.reason == "stop token"
    assert not any("\ufffd" in p for p in pieces)


def test_history_is_trimmed_from_the_oldest_turn(tokenizer):
    template = load_template("auto", tokenizer)
    history = [(f"Question {i} " + "word " * 30, f"Answer {i} " + "word " * 30) for i in range(20)]
    prompt = build_prompt(tokenizer, template, "", history, "The newest question?", 512, 128)
    assert len(prompt.ids) <= 512 - 128 and 0 < prompt.dropped_turns < 20
    assert prompt.history == history[prompt.dropped_turns:]  # a suffix: only the oldest turns go
    assert tokenizer.decode(prompt.ids).rstrip().endswith("The newest question?<|im_end|>\n<|im_start|>assistant")
    longer = build_prompt(tokenizer, template, "", history, "The newest question?", 512 + 200, 128)
    assert longer.dropped_turns < prompt.dropped_turns


def test_an_overlong_question_keeps_its_end(tokenizer):
    template = load_template("auto", tokenizer)
    query = "start " + "filler " * 2000 + "THE END"
    prompt = build_prompt(tokenizer, template, "", HISTORY, query, 256, 1000)
    assert prompt.max_new_tokens == 128 and len(prompt.ids) <= 128 and prompt.query_trimmed
    assert prompt.history == [] and prompt.query.endswith("THE END") and not prompt.query.startswith("start")
    with pytest.raises(UserError, match="system prompt alone"):
        build_prompt(tokenizer, template, "long " * 500, [], "hi", 256, 16)


def test_settings_are_checked_together():
    assert check_settings() == {"max_new_tokens": 512, "temperature": 0.7, "top_p": 0.9, "top_k": 40,
                                "repetition_penalty": 1.1, "no_repeat_ngram_size": 0, "do_sample": True}
    assert check_settings(temperature=0)["do_sample"] is False
    assert check_settings(max_new_tokens="20", do_sample="False")["max_new_tokens"] == 20
    with pytest.raises(UserError, match=r"--max_new_tokens must be an integer \(at least 1\), got 'many'; "
                                        r"--top_p must be from 0 to 1, got 1.5"):
        check_settings(top_p=1.5, max_new_tokens="many")


def test_streaming_gives_what_plain_generate_gives(tiny):
    model, tokenizer, template, _ = tiny
    settings = {"max_new_tokens": 24, "do_sample": False, "repetition_penalty": 1.0}
    stream = stream_chat(model, tokenizer, template, "Hello there", HISTORY, "", settings)
    pieces = list(stream)
    ids = torch.tensor([stream.prompt.ids])
    plain = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                           eos_token_id=sorted(stop_token_ids(tokenizer, model, template)),
                           pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.decode(plain[0, ids.shape[1]:], skip_special_tokens=True)
    assert "".join(pieces) == stream.text == expected and len(pieces) > 1


def test_seed_makes_sampling_reproducible(tiny):
    model, tokenizer, template, _ = tiny
    settings = {"max_new_tokens": 16, "temperature": 1.0}
    first = chat(model, tokenizer, template, "Tell me something", settings=settings, seed=7)
    assert chat(model, tokenizer, template, "Tell me something", settings=settings, seed=7) == first
    assert chat(model, tokenizer, template, "Tell me something", settings=settings, seed=8) != first


def test_stop_event_ends_the_answer_at_once(tiny):
    model, tokenizer, template, _ = tiny
    event = threading.Event()
    stream = stream_chat(model, tokenizer, template, "Go on forever", settings={"max_new_tokens": 500}, seed=0,
                         stop_event=event)
    for _ in stream:
        event.set()
    assert stream.reason == "stopped" and len(stream.tokens) == 1  # not one forward after the event


def test_sampling_draws_what_generate_draws_for_the_same_seed(tiny):
    model, tokenizer, template, _ = tiny
    settings = {"max_new_tokens": 20, "temperature": 0.8, "top_p": 0.9, "top_k": 30, "repetition_penalty": 1.3,
                "no_repeat_ngram_size": 3}
    stream = stream_chat(model, tokenizer, template, "Tell me something", settings=settings, seed=11)
    list(stream)
    ids = torch.tensor([stream.prompt.ids])
    torch.manual_seed(11)
    plain = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                           pad_token_id=tokenizer.pad_token_id,
                           eos_token_id=sorted(stop_token_ids(tokenizer, model, template)), **settings)
    drawn = plain[0, ids.shape[1]:].tolist()
    assert len(stream.tokens) >= 10 and stream.tokens == drawn[:len(stream.tokens)]


def test_an_interrupted_reader_gets_the_held_back_text_on_the_next_read(tokenizer):
    ids = tokenizer("Hello ##", add_special_tokens=False)["input_ids"]

    def tokens():
        yield from ids
        raise KeyboardInterrupt  # Ctrl-C while the model works on the next token

    stream = Stream(tokenizer, set(), ["###"], tokens=tokens())
    pieces = []
    with pytest.raises(KeyboardInterrupt):
        for piece in stream:
            pieces.append(piece)
    assert "".join(pieces) == "Hello " and stream.reason == "stopped"
    assert list(stream) == ["##"] and stream.text == "Hello ##"
