"""A data template (utils/data/templates.Template) as the chat templates other runtimes read.

- `jinja_chat_template`: the GGUF's `tokenizer.chat_template`, which transformers, llama-cpp-python and
  llama.cpp (`--jinja`) render;
- `go_template` and `modelfile`: an Ollama Modelfile, TEMPLATE in Go's text/template syntax.

Both are built from the template's fields, never written per template name, and both render the text that
training tokenized: the system part (or the template's default system text), each user turn with the
assistant header the template puts in it, and each answer followed by EOS where training appended it
(utils/data/encoding.Encoder ends every answer with EOS). Because the assistant header belongs to the user turn,
a conversation that ends with a user message is already a generation prompt (add_generation_prompt is
implied, as in training).
"""
from utils.core.errors import UserError
from utils.data.templates import fill

# Ollama's sampling defaults from ours (utils/serve/generation.DEFAULTS), so `ollama run` answers as cli_demo.py does.
OLLAMA_PARAMETERS = (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"),
                     ("repeat_penalty", "repetition_penalty"), ("num_predict", "max_new_tokens"))


def answer_end(template, eos_token):
    """What follows an answer beyond assistant_format: EOS, unless the format already ends with it."""
    return "" if not eos_token or template.assistant_format.endswith(eos_token) else eos_token


def _jinja_literal(text):
    """A double-quoted Jinja string, with only the escapes every Jinja implementation reads (Python's jinja2
    and llama.cpp's minja); other characters, Chinese included, stay as they are."""
    return '"' + (text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
                  .replace("\t", "\\t")) + '"'


def _jinja_text(text):
    return "{{- " + _jinja_literal(text) + " -}}" if text else ""


def _jinja_format(fmt, expr, tail=""):
    return ("{{- " + expr + " -}}").join(_jinja_text(p) for p in (fmt + tail).split("{content}"))


def jinja_chat_template(template, eos_token, bos=False):
    """The template as a Jinja chat template (messages: an optional system message, then user and assistant
    in turn). bos: begin with {{ bos_token }}, for a tokenizer or template that prepends BOS (the Hugging
    Face convention: llama.cpp strips it again when it adds BOS itself)."""
    lines = [
        "{%- if messages and messages[0]['role'] == 'system' -%}",
        "{%- set system = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}",
        "{%- else -%}{%- set system = '' -%}{%- set loop_messages = messages -%}{%- endif -%}",
    ]
    if template.system:
        lines.append("{%- if not system -%}{%- set system = " + _jinja_literal(template.system) + " -%}{%- endif -%}")
    lines.append(("{{- bos_token -}}" if bos else "") + _jinja_text(template.prefix))
    if template.system_format is None:
        no_role = f"template {template.name!r} has no system role; drop the system message"
        lines.append("{%- if system -%}{{- raise_exception(" + _jinja_literal(no_role) + ") -}}{%- endif -%}")
        lines.append(_jinja_text(template.no_system))
    else:
        lines.append("{%- if system -%}" + _jinja_format(template.system_format, "system")
                     + ("{%- else -%}" + _jinja_text(template.no_system) if template.no_system else "")
                     + "{%- endif -%}")
    lines += [
        "{%- for message in loop_messages -%}",
        "{%- if message['role'] == 'user' -%}",
        "{%- if not loop.first -%}" + _jinja_text(template.separator) + "{%- endif -%}" if template.separator else "",
        _jinja_format(template.user_format, "message['content']"),
        "{%- elif message['role'] == 'assistant' -%}",
        _jinja_format(template.assistant_format, "message['content']", answer_end(template, eos_token)),
        "{%- else -%}",
        "{{- raise_exception(\"only system, user and assistant messages are supported\") -}}",
        "{%- endif -%}",
        "{%- endfor -%}",
    ]
    return "\n".join(line for line in lines if line)


def _go_text(text):
    """Literal text for a Go template: only `{{` would start an action, so it is printed as a string."""
    return text.replace("{{", '{{ "{{" }}')


def _go_format(fmt, expr, tail=""):
    return ("{{ " + expr + " }}").join(_go_text(p) for p in (fmt + tail).split("{content}"))


def go_template(template, eos_token):
    """The template in Ollama's Go text/template syntax, over .System and .Messages (so multi-turn works).

    Ollama gives .System (its system messages, else the Modelfile's SYSTEM) and keeps the system messages in
    .Messages too, so the loop skips them. The default system text is part of the template, as it is of ours.
    A template without a system role ignores .System: Go templates cannot raise.
    """
    head = _go_text(template.prefix)
    if template.system_format is None:
        head += _go_text(template.no_system)
    else:
        fallback = fill(template.system_format, content=template.system) if template.system else template.no_system
        head += ("{{ if .System }}" + _go_format(template.system_format, ".System")
                 + ("{{ else }}" + _go_text(fallback) if fallback else "") + "{{ end }}")
    # the separator goes before every user turn but the first (as Template.render puts it)
    separator, started = ("{{ if $started }}" + _go_text(template.separator) + "{{ end }}",
                          "{{ $started = true }}") if template.separator else ("", "")
    return (head + ("{{ $started := false }}" if separator else "") + "{{ range .Messages }}"
            + '{{ if eq .Role "user" }}' + separator + _go_format(template.user_format, ".Content") + started
            + '{{ else if eq .Role "assistant" }}'
            + _go_format(template.assistant_format, ".Content", answer_end(template, eos_token))
            + "{{ end }}{{ end }}")


def _quoted(value, what):
    """A Modelfile value: Ollama's parser takes "..." and \"\"\"...\"\"\" verbatim (no escapes, newlines kept)."""
    if '"""' in value:
        raise UserError(f"the template's {what} ({value[:40]!r}) cannot be quoted in an Ollama Modelfile; "
                        "pass another --template.")
    return f'"""{value}"""' if '"' in value or "\n" in value else f'"{value}"'


def modelfile(gguf_name, template, eos_token, context_length=None, settings=None):
    """An Ollama Modelfile for the GGUF file `gguf_name` beside it: FROM, TEMPLATE, a stop for each of the
    template's stop strings and EOS, and our sampling defaults (settings: utils/serve/generation.DEFAULTS)."""
    lines = [f"# Written by lora-kit's export_gguf.py: the prompt format {template.name!r} the model was tuned with.",
             f"FROM ./{gguf_name}", f"TEMPLATE {_quoted(go_template(template, eos_token), 'text')}"]
    if template.system_format is None:
        lines.insert(1, "# This template has no system role: a system prompt is ignored.")
    stops = list(dict.fromkeys([*template.stop_strings, *([eos_token] if eos_token else [])]))
    lines += [f"PARAMETER stop {_quoted(s, 'stop string')}" for s in stops if s]
    for name, ours in OLLAMA_PARAMETERS:
        if settings and ours in settings:
            lines.append(f"PARAMETER {name} {settings[ours]}")
    if context_length:
        lines.append(f"PARAMETER num_ctx {context_length}")
    return "\n".join(lines) + "\n"
