"""Prompt templates: data in templates/*.json, or derived from the tokenizer's own chat_template.

A template turns (system, [(user, answer), ...]) into alternating text segments
[prompt_1, answer_1, prompt_2, answer_2, ...]. Training tokenizes each segment on its own and masks the
prompts; inference tokenizes the same prompt segments with the same code, so the two cannot drift.
"""
import dataclasses
import json
import re
from pathlib import Path

from utils.core.errors import UserError
from utils.core.files import ROOT

TEMPLATE_DIR = ROOT / "templates"
_FIELD = re.compile(r"\{(content|instruction|input)\}")


def fill(fmt, **values):
    """Substitute {content}/{instruction}/{input} without rescanning the inserted text (it may hold braces)."""
    return _FIELD.sub(lambda m: values[m.group(1)], fmt)


@dataclasses.dataclass
class Template:
    name: str
    user_format: str
    assistant_format: str = "{content}"
    system_format: str | None = "{content}\n\n"  # None: the template has no system role
    system: str = ""  # default system text, used when a record brings none
    no_system: str = ""  # literal head used when there is no system text at all
    prefix: str = ""
    separator: str = ""
    input_format: str = "{instruction}\n{input}"
    stop_strings: list = dataclasses.field(default_factory=list)
    add_bos: bool | str = "auto"  # "auto": prepend BOS when the tokenizer adds one by default
    description: str = ""

    def user_text(self, instruction, input_text=""):
        """The user turn of an alpaca-style record: the instruction, then the input when there is one."""
        return fill(self.input_format, instruction=instruction, input=input_text) if input_text else instruction

    def render(self, system, turns, last_input=""):
        """Segments [prompt, answer, prompt, answer, ...]; a last answer of None leaves a trailing prompt.

        last_input is the alpaca-style `input` of the last turn, joined to its instruction by input_format.
        """
        system = system or self.system
        if system and self.system_format is None:
            raise UserError(f"template {self.name!r} has no system role; "
                            "drop the system prompt or pass another --template.")
        head = self.prefix + (fill(self.system_format, content=system) if system else self.no_system)
        segments = []
        for i, (user, answer) in enumerate(turns):
            user = self.user_text(user, last_input) if i == len(turns) - 1 else user
            segments.append((head if i == 0 else self.separator) + fill(self.user_format, content=user))
            if answer is not None:
                segments.append(fill(self.assistant_format, content=answer))
        return segments

    def to_dict(self):
        return dataclasses.asdict(self)


def builtin_names():
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.json"))


def _from_file(path, name):
    try:
        spec = json.loads(Path(path).read_text(encoding="utf-8"))
        return Template(name=name, **{k: v for k, v in spec.items() if k != "name"})
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"template file {path} is not a valid template ({e}); "
                        "see templates/alpaca.json for the fields.") from None


def _common_suffix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[len(a) - 1 - n] == b[len(b) - 1 - n]:
        n += 1
    return a[len(a) - n:] if n else ""


def from_chat_template(tokenizer, name="auto"):
    """Derive a data template from tokenizer.chat_template by rendering placeholder conversations.

    The result is checked against apply_chat_template on probe conversations; a template that cannot be
    split into prompt and answer parts is refused rather than approximated.
    """
    S, U1, A1, U2, A2 = "@@SYSTEM@@", "@@USER1@@", "@@ANSWER1@@", "@@USER2@@", "@@ANSWER2@@"

    def render(msgs, gen=False):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    def conv(*texts):
        return [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(texts)]

    fail = UserError(
        f"the tokenizer's chat template cannot be split into prompt and answer parts; "
        f"pass --template= one of {', '.join(builtin_names())}."
    )
    try:
        full, gen = render(conv(U1, A1, U2, A2)), render(conv(U1), gen=True)
    except Exception:
        raise fail from None
    if not all(t in full for t in (U1, A1, U2, A2)) or U1 not in gen:
        raise fail
    after_answer = full[full.index(A1) + len(A1):]
    specials = {tokenizer.eos_token, *tokenizer.all_special_tokens, *tokenizer.get_added_vocab()} - {None, ""}
    stop = max((t for t in specials if after_answer.startswith(t)), key=len, default="")
    user_tail = gen[gen.index(U1) + len(U1):]
    head = full[:full.index(U1)]
    between = full[full.index(A1) + len(A1) + len(stop):full.index(U2)]
    user_head = _common_suffix(head, between)
    system_format = None
    try:
        with_system = render([{"role": "system", "content": S}] + conv(U1, A1))
        system_head = with_system[:with_system.index(U1)]
        if S in system_head and system_head.endswith(user_head):
            system_format = system_head[:len(system_head) - len(user_head)].replace(S, "{content}")
    except Exception:
        pass  # templates such as Gemma's refuse a system role
    template = Template(
        name=name, system_format=system_format, no_system=head[:len(head) - len(user_head)],
        user_format=user_head + "{content}" + user_tail, assistant_format="{content}" + stop,
        separator=between[:len(between) - len(user_head)], stop_strings=[stop] if stop else [], add_bos=False,
        description="derived from the tokenizer's chat_template",
    )
    probes = [(None, [("Hi", "Hello!"), ("2+2?", None)]), ("Be brief.", [("Hi", "Hello!"), ("And you?", "Fine.")])]
    for system, turns in probes:
        if system and system_format is None:
            continue
        msgs = (([{"role": "system", "content": system}] if system else [])
                + conv(*[t for pair in turns for t in pair if t is not None]))
        expected = render(msgs, gen=turns[-1][1] is None)
        if not expected.startswith("".join(template.render(system, turns))):
            raise fail
    return template


def _template_file(name):
    """(file, name) of a built-in template or a template .json path; anything else is refused."""
    if name in builtin_names():
        return TEMPLATE_DIR / f"{name}.json", name
    if str(name).endswith(".json") and Path(name).is_file():
        return name, Path(name).stem
    raise UserError(f"unknown --template={name!r}; use auto, one of {', '.join(builtin_names())}, "
                    "or a path to a template .json file.")


def check_template(name):
    """Refuse a --template that names no template before any model loads; its file is read and checked."""
    if name != "auto":
        _from_file(*_template_file(name))


def load_template(name, tokenizer):
    """--template: auto (the tokenizer's chat_template, else alpaca), a built-in name, or a .json file."""
    if name == "auto":
        if getattr(tokenizer, "chat_template", None):
            return from_chat_template(tokenizer)
        name = "alpaca"
    return _from_file(*_template_file(name))


def resolve_template(name, tokenizer, run_config=None):
    """The template a later stage must use: an explicit --template wins, else the one training recorded
    in run_config.json (so inference prompts equal training prompts), else auto."""
    if name and name != "auto":
        return load_template(name, tokenizer)
    if run_config and isinstance(run_config.get("template"), dict):
        return Template(**run_config["template"])
    return load_template("auto", tokenizer)


def pick_template(template, input_pattern):
    """--input_pattern is the older project's name for --template; both at once must agree."""
    if input_pattern is None:
        return str(template)
    if template not in ("auto", input_pattern):
        raise UserError(f"--template={template!r} and --input_pattern={input_pattern!r} disagree; "
                        "pass only one of them.")
    return str(input_pattern)
