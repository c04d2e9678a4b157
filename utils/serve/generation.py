"""Generation for the chat stages: the training prompt, history trimming, streaming, stop tokens, Stop.

The prompt comes from utils.data.encoding.encode_prompt, the code that built the training examples, so a model is
asked in exactly the form it learned. `decode` is a plain KV-cache decode loop that runs in the reader's
own thread (no streamer thread to compete with the model for the cores); `Stream` turns its ids into
text pieces, ends the answer on any stop token or stop string, and before the next token once its
`stop_event` is set (Ctrl-C in the terminal, the Stop button on the page). Base and tuned answers side by side
are utils/serve/compare.py.
"""
import dataclasses
import inspect
import threading

import torch
from transformers import (
    LogitsProcessorList,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from utils.core.errors import UserError
from utils.core.flags import Checks
from utils.data.encoding import encode_prompt
from utils.data.templates import check_template, pick_template

# Sampling with a mild repetition penalty: greedy decoding is what makes small models loop forever.
DEFAULTS = {"max_new_tokens": 512, "temperature": 0.7, "top_p": 0.9, "top_k": 40,
            "repetition_penalty": 1.1, "no_repeat_ngram_size": 0, "do_sample": True}
END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end_of_text|>", "</s>")


def chat_model_flags(c, model_path, lora_model, base_model, template, input_pattern, num_gpus, use_8bit, use_4bit,
                     precision, local_files_only, max_context, trust_remote_code=None):
    """Check the model-choosing flags both chat stages take into `c` (a utils.core.flags.Checks); returns
    (load_for_inference kwargs, max_context)."""
    use_8bit, use_4bit = c.boolean("use_8bit", use_8bit), c.boolean("use_4bit", use_4bit)
    if use_8bit is True and use_4bit is True:
        c.add("--use_8bit and --use_4bit exclude each other; pass only one")
    model_path, lora_model, base_model = (c.text("model_path", model_path), c.text("lora_model", lora_model),
                                          c.text("base_model", base_model))
    if model_path and lora_model:
        c.add("--model_path and --lora_model exclude each other; pass a merged folder or an adapter folder")
    max_context, num_gpus = c.integer("max_context", max_context, 16, none=True), c.integer("num_gpus", num_gpus, 1)
    template = c.call(pick_template, c.text("template", template) or "auto", c.text("input_pattern", input_pattern),
                      default="auto")
    c.call(check_template, template)
    load = dict(model_path=model_path, lora_model=lora_model, base_model=base_model, template=template,
                bits=8 if use_8bit is True else 4 if use_4bit is True else 16, num_gpus=num_gpus,
                precision=c.choice("precision", precision, ("auto", "bf16", "fp16", "fp32")),
                local_files_only=c.boolean("local_files_only", local_files_only),
                trust_remote_code=(None if trust_remote_code is None
                                   else c.boolean("trust_remote_code", trust_remote_code)))
    return load, max_context


def check_settings(max_new_tokens=None, temperature=None, top_p=None, top_k=None, repetition_penalty=None,
                   no_repeat_ngram_size=None, do_sample=None, checks=None):
    """Generation settings with defaults filled in and types converted (fire may pass strings or ints). Bad
    values go into `checks` when given (a script's utils.core.flags.Checks), else raise one UserError listing all."""
    c = checks or Checks()
    given = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                 repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size, do_sample=do_sample)
    value = {name: DEFAULTS[name] if v is None else v for name, v in given.items()}
    settings = {"max_new_tokens": c.integer("max_new_tokens", value["max_new_tokens"], 1),
                "temperature": c.number("temperature", value["temperature"], 0),
                "top_p": c.number("top_p", value["top_p"], 0, 1),
                "top_k": c.integer("top_k", value["top_k"], 0),
                "repetition_penalty": c.number("repetition_penalty", value["repetition_penalty"], 0, above_low=True),
                "no_repeat_ngram_size": c.integer("no_repeat_ngram_size", value["no_repeat_ngram_size"], 0),
                "do_sample": c.boolean("do_sample", value["do_sample"])}
    if checks is None:
        c.done("bad generation settings")
    if settings["temperature"] == 0:  # the usual meaning of temperature 0
        settings["do_sample"] = False
    return settings


def stop_token_ids(tokenizer, model, template):
    """Every id that ends an answer: EOS (tokenizer's and generation config's), the end-of-turn tokens
    the vocabulary has, and the template's stop strings that are single tokens."""
    ids = {tokenizer.eos_token_id}
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(eos) if isinstance(eos, (list, tuple)) else {eos}
    for token in (*END_TOKENS, *template.stop_strings):  # get_vocab() would cost tens of ms per answer
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and tokenizer.convert_ids_to_tokens(token_id) == token:
            ids.add(token_id)
    return {i for i in ids if isinstance(i, int)}


def context_length(model, default=2048):
    """How many tokens the model attends over (prompt plus answer)."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


@dataclasses.dataclass
class Prompt:
    ids: list
    history: list  # the turns that fit, oldest first
    query: str  # the question as sent (its end only, when it alone overflowed)
    max_new_tokens: int
    dropped_turns: int = 0
    query_trimmed: bool = False


def build_prompt(tokenizer, template, system, history, query, context_len, max_new_tokens):
    """The training-identical prompt, trimmed to leave room for the answer within context_len.

    The oldest turns go first; if the question alone is still too long, its beginning is cut, so the
    newest text always reaches the model. The answer gets at most half the context.
    """
    max_new = max(1, min(int(max_new_tokens), context_len // 2))
    budget = context_len - max_new
    history = [tuple(turn) for turn in history]
    dropped = 0
    ids = encode_prompt(tokenizer, template, system, history, query)
    while len(ids) > budget and history:
        history.pop(0)
        dropped += 1
        ids = encode_prompt(tokenizer, template, system, history, query)
    trimmed = False
    if len(ids) > budget:
        tokens = tokenizer(query, add_special_tokens=False)["input_ids"]
        while len(ids) > budget and tokens:
            tokens = tokens[len(ids) - budget:]  # re-tokenizing the cut text can differ slightly: loop
            query, trimmed = tokenizer.decode(tokens), True
            ids = encode_prompt(tokenizer, template, system, history, query)
    if len(ids) > budget:
        raise UserError(f"the system prompt alone takes {len(ids)} tokens, more than the {budget} this model leaves "
                        "for a prompt; shorten the system prompt.")
    return Prompt(ids, history, query, max_new, dropped, trimmed)


class Stream:
    """One answer: iterate it for text pieces as the model writes them, in the calling thread.

    Tokens come from `tokens` (the decode loop of stream_chat, or any iterable of ids). Text is held
    back while it ends in a partial UTF-8 character or could be the start of a stop string, so a reader
    never sees text that is later taken back. After iteration: .text is the whole answer, .reason why
    it ended ("stop token", "stop string", "length", "stopped"), .tokens the ids before any stop token.
    If the reader is interrupted (Ctrl-C), iterating again hands over what was held back.
    """

    def __init__(self, tokenizer, stop_ids, stop_strings=(), stop_event=None, tokens=()):
        self.tokenizer, self.stop_ids = tokenizer, set(stop_ids)
        self.stop_strings = [s for s in stop_strings if s]
        self.stop_event = stop_event or threading.Event()
        self.tokens, self.text, self.sent = [], "", 0
        self._prefix, self._read = 0, 0  # self.tokens[_prefix:_read] is the decoded context of the newest tokens
        self.finished, self.reason = False, None
        self._source, self.prompt = iter(tokens), None

    def add(self, token):
        """Take one generated id; returns the text that became safe to show ("" if none)."""
        if self.finished:
            return ""
        if token in self.stop_ids:
            return self.finish("stop token")
        self.tokens.append(token)
        # Decode only the last few tokens: a token's text can depend on its neighbours (spaces, UTF-8
        # bytes split across tokens), so the newest tokens are decoded with the one before them.
        before = self.tokenizer.decode(self.tokens[self._prefix:self._read], skip_special_tokens=True)
        after = self.tokenizer.decode(self.tokens[self._prefix:], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""  # an incomplete character: wait for the next token
        start = max(0, len(self.text) - max((len(stop) for stop in self.stop_strings), default=0))
        self.text += after[len(before):]
        self._prefix, self._read = self._read, len(self.tokens)
        for stop in self.stop_strings:
            at = self.text.find(stop, start)
            if at >= 0:
                self.text = self.text[:at]
                return self.finish("stop string")
        safe = len(self.text)
        for stop in self.stop_strings:  # hold back what may be the start of a stop string
            for n in range(min(len(stop) - 1, safe), 0, -1):
                if self.text.endswith(stop[:n]):
                    safe = min(safe, len(self.text) - n)
                    break
        if safe <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent:safe], safe
        return piece

    def finish(self, reason):
        """End the answer (the first reason given is kept); returns the text not yet handed over."""
        self.finished, self.reason = True, self.reason or reason
        piece, self.sent = self.text[self.sent:], len(self.text)
        return piece

    def __iter__(self):
        try:
            for token in self._source:
                piece = self.add(token)
                if piece:
                    yield piece
                if self.finished:
                    break
        except BaseException:  # Ctrl-C, or the reader went away: the answer ends here
            self.reason = self.reason or "stopped"
            raise
        finally:
            close = getattr(self._source, "close", None)
            if close is not None:
                close()
        piece = self.finish("stopped" if self.stop_event.is_set() else "length")
        if piece:
            yield piece

    def stop(self):
        """End the answer before the next token (safe to call from any thread, or a signal handler)."""
        self.stop_event.set()


def keep_last_logits(model):
    """{"logits_to_keep": 1} where the model's forward takes it (a peft model's forward takes **kwargs: its base
    model's is read), so a prefill computes the last position's logits only; else {}."""
    base = model.get_base_model() if hasattr(model, "peft_config") else model
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(base.forward).parameters else {}


def logits_processors(settings):
    """The logits processors model.generate builds for these settings, in the same order."""
    processors = LogitsProcessorList()
    if settings["repetition_penalty"] != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(settings["repetition_penalty"]))
    if settings["no_repeat_ngram_size"]:
        processors.append(NoRepeatNGramLogitsProcessor(settings["no_repeat_ngram_size"]))
    if settings["do_sample"]:
        if settings["temperature"] != 1.0:
            processors.append(TemperatureLogitsWarper(settings["temperature"]))
        if settings["top_k"]:
            processors.append(TopKLogitsWarper(settings["top_k"]))
        if settings["top_p"] < 1.0:
            processors.append(TopPLogitsWarper(settings["top_p"]))
    return processors


def decode(model, input_ids, settings, stop_event, seed=None):
    """Yield new token ids one by one: one forward over the prompt, then one per token with the KV cache.

    It runs in the caller's thread, so no second thread competes with the model for the cores, and it
    stops before the next forward once stop_event is set. Tokens equal model.generate's for the same
    settings; sampling draws from a generator of its own, seeded with `seed` (as torch.manual_seed(seed)
    would seed generate), so concurrent answers do not disturb each other's reproducibility.
    """
    processors, generator = logits_processors(settings), None
    keep_one = keep_last_logits(model)
    ids, step_input, cache = input_ids, input_ids, None
    for _ in range(settings["max_new_tokens"]):
        if stop_event.is_set():
            return
        with torch.inference_mode():
            out = model(input_ids=step_input, past_key_values=cache, use_cache=True, **keep_one)
            cache = out.past_key_values
            scores = processors(ids, out.logits[:, -1, :].to(dtype=torch.float32, device=ids.device))
            if settings["do_sample"]:
                if generator is None and seed is not None:
                    generator = torch.Generator(scores.device).manual_seed(int(seed))
                token = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1, generator=generator)
            else:
                token = scores.argmax(dim=-1, keepdim=True)
            ids, step_input = torch.cat([ids, token], dim=1), token
        yield token.item()


def stream_chat(model, tokenizer, template, query, history=(), system="", settings=None, seed=None,
                stop_event=None, context_len=None):
    """Build the prompt and return the answer's Stream; the model runs as the Stream is iterated.

    stream.prompt is the trimmed Prompt that was sent (see build_prompt).
    """
    settings = check_settings(**(settings or {}))
    prompt = build_prompt(tokenizer, template, system, history, query, context_len or context_length(model),
                          settings["max_new_tokens"])
    settings["max_new_tokens"] = prompt.max_new_tokens
    stop_event = stop_event or threading.Event()
    input_ids = torch.tensor([prompt.ids], device=model.get_input_embeddings().weight.device)
    stream = Stream(tokenizer, stop_token_ids(tokenizer, model, template), template.stop_strings, stop_event,
                    decode(model, input_ids, settings, stop_event, seed))
    stream.prompt = prompt
    return stream


def chat(model, tokenizer, template, query, history=(), system="", settings=None, seed=None, stop_event=None,
         context_len=None):
    """The whole answer at once (the same path as streaming, so both give the same text for a seed)."""
    stream = stream_chat(model, tokenizer, template, query, history, system, settings, seed, stop_event, context_len)
    for _ in stream:
        pass
    return stream.text


