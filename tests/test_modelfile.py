"""The Ollama Modelfile export writes: for every template, Ollama renders our training prompt.

Neither Go nor Ollama is installable here, so the Modelfile is read by a port of Ollama's parser (parser.go's
ParseFile state machine) and its TEMPLATE executed by a small Go text/template renderer below. The renderer
implements only what our templates use (text, {{ .X }}, $variables with := and =, if / else if / else / end,
range, eq, string and bool literals, {{- -}} trimming) and raises on anything else, so an unimplemented
construct fails the test instead of rendering as something else.
"""
import re

import pytest
from conftest import chat_messages

from utils.data.templates import Template, builtin_names, from_chat_template, load_template
from utils.export.runtime_templates import go_template, modelfile

SYSTEM = "You are Lumi, a helpful assistant. 请用中文或英文回答。"
TURNS = [("Hi there!", "Hello! How can I help?"), ("写一句诗，带 {braces} 和 {{ go }}", "床前明月光。"),
         ("And one more: 2+2?", None)]

# ---- a port of Ollama's Modelfile parser (parser/parser.go, ParseFile): values are taken verbatim ----


def _unquote(s):
    if s[:3] == '"""':
        return (s[3:-3], True) if len(s) >= 6 and s[-3:] == '"""' else ("", False)
    if s[:1] == '"':
        return (s[1:-1], True) if len(s) >= 2 and s[-1] == '"' else ("", False)
    return s, True


def _next_state(r, state):
    """parseRuneForState: (next state, the rune to keep or "")."""
    space, newline = r in " \t", r in "\r\n"
    if state == "nil":
        return ("comment", "") if r == "#" else ("nil", "") if space or newline else ("name", r)
    if state == "name":
        if r.isascii() and r.isalpha():
            return "name", r
        if space:
            return "value", ""
    elif state == "parameter":
        if r.isascii() and (r.isalnum() or r == "_"):
            return "parameter", r
        if space:
            return "value", ""
    elif state == "comment":
        return ("nil" if newline else "comment"), ""
    else:
        return ("nil" if space or newline else "value"), r
    raise ValueError(f"the Modelfile does not parse at {r!r} ({state})")


def parse_modelfile(text):
    """[(command, value)] as ParseFile reads them (FROM is named model there)."""
    commands, state, buf, name = [], "nil", "", None
    for r in text:
        nxt, r = _next_state(r, state)
        if nxt != state:
            if state == "name":
                word = buf.lower()
                if word not in ("from", "license", "template", "system", "adapter", "parameter", "message"):
                    raise ValueError(f"unknown Modelfile command {buf!r}")
                nxt, name = ("parameter", None) if word == "parameter" else (nxt, "model" if word == "from" else word)
            elif state == "parameter":
                name = buf
            elif state == "value":
                value, ok = _unquote(buf.strip())
                if not ok or r in " \t":  # inside quotes, or a space within the value
                    buf += r
                    continue
                commands.append((name, value))
            buf, state = "", nxt
        if r and r.isprintable():
            buf += r
    if state == "value":
        value, ok = _unquote(buf.strip())
        if not ok:
            raise ValueError("the Modelfile ends inside a quoted value")
        commands.append((name, value))
    elif state not in ("nil", "comment"):
        raise ValueError("the Modelfile ends inside a command")
    return commands


# ---- a Go text/template renderer for the subset our templates use ----

_ACTION = re.compile(r"\{\{(- )?(.*?)( -)?\}\}", re.S)
_TOKEN = re.compile(r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<var>\$\w*)(?P<vfield>(?:\.\w+)*)|(?P<field>(?:\.\w+)+|\.)'
                    r"|(?P<op>:=|=|,)|(?P<word>[A-Za-z_]\w*))")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\"}


def _tokens(source):
    out, pos = [], 0
    while pos < len(source.rstrip()):
        m = _TOKEN.match(source, pos)
        if not m or m.end() == pos:
            raise NotImplementedError(f"Go template syntax not implemented here: {source[pos:]!r}")
        kind = m.lastgroup if m.lastgroup != "vfield" else "var"
        if kind == "str":
            body = m.group("str")[1:-1]
            if re.search(r"\\[^nrt\"\\]", body):
                raise NotImplementedError(f"string escape not implemented here: {body!r}")
            out.append(("str", re.sub(r"\\(.)", lambda e: _ESCAPES[e.group(1)], body)))
        elif kind == "var":
            out.append(("var", (m.group("var"), [f for f in (m.group("vfield") or "").split(".") if f])))
        elif kind == "field":
            out.append(("field", [f for f in m.group("field").split(".") if f]))
        else:
            out.append((kind, m.group(kind)))
        pos = m.end()
    return out


def _parse(source):
    """Nested nodes: ('text', s), ('out', expr), ('set', name, expr, declare), ('if', [(cond, body)], else),
    ('range', names, expr, body)."""
    items, pos = [], 0
    for m in _ACTION.finditer(source):
        text = source[pos:m.start()]
        items.append(("text", text.rstrip(" \t\r\n") if m.group(1) else text))
        items.append(("action", _tokens(m.group(2))))
        pos = m.end()
        if m.group(3):  # " -}}": trim the whitespace after it
            while pos < len(source) and source[pos] in " \t\r\n":
                pos += 1
    items.append(("text", source[pos:]))
    if "{{" in "".join(t for kind, t in items if kind == "text"):
        raise NotImplementedError("an action this renderer does not read (a comment, or a missing '}}')")
    return _block(items, 0, top=True)[0]


def _expr(tokens):
    if len(tokens) == 3 and tokens[0] == ("word", "eq"):
        return ("eq", _expr(tokens[1:2]), _expr(tokens[2:]))
    if len(tokens) == 1 and tokens[0][0] in ("str", "var", "field"):
        return tokens[0]
    if len(tokens) == 1 and tokens[0] in (("word", "true"), ("word", "false")):
        return ("bool", tokens[0][1] == "true")
    raise NotImplementedError(f"expression not implemented here: {tokens}")


def _block(items, i, top=False):
    """Parse nodes until {{ end }} or {{ else ... }}; returns (nodes, index of that action)."""
    nodes = []
    while i < len(items):
        kind, value = items[i]
        if kind == "text":
            nodes.append(("text", value))
            i += 1
            continue
        head = value[0] if value else None
        if head in (("word", "end"), ("word", "else")):
            if top:
                raise ValueError(f"unexpected {head[1]}")
            return nodes, i
        if head == ("word", "if"):
            branches, otherwise = [], []
            cond = _expr(value[1:])
            while True:
                body, i = _block(items, i + 1)
                branches.append((cond, body))
                stop = items[i][1]
                if stop[:2] == [("word", "else"), ("word", "if")]:
                    cond = _expr(stop[2:])
                    continue
                if stop == [("word", "else")]:
                    otherwise, i = _block(items, i + 1)
                    stop = items[i][1]
                if stop != [("word", "end")]:
                    raise ValueError(f"if closed by {stop}")
                break
            nodes.append(("if", branches, otherwise))
        elif head == ("word", "range"):
            names, rest = [], value[1:]
            if ("op", ":=") in rest:
                at = rest.index(("op", ":="))
                names = [t[1][0] for t in rest[:at] if t[0] == "var"]
                rest = rest[at + 1:]
            body, i = _block(items, i + 1)
            if items[i][1] != [("word", "end")]:
                raise NotImplementedError("range with else is not implemented here")
            nodes.append(("range", names, _expr(rest), body))
        elif len(value) >= 3 and value[0][0] == "var" and value[1][0] == "op" and value[1][1] in (":=", "="):
            nodes.append(("set", value[0][1][0], _expr(value[2:]), value[1][1] == ":="))
        elif head and head[0] == "word" and head[1] not in ("eq", "true", "false"):
            raise NotImplementedError(f"action {head[1]!r} is not implemented here")
        else:
            nodes.append(("out", _expr(value)))
        i += 1
    if not top:
        raise ValueError("missing {{ end }}")
    return nodes, i


def _lookup(value, fields):
    for f in fields:
        if not isinstance(value, dict) or f not in value:
            raise KeyError(f"no field {f} in {value!r}")
        value = value[f]
    return value


def _eval(expr, dot, scopes):
    kind = expr[0]
    if kind == "eq":
        return _eval(expr[1], dot, scopes) == _eval(expr[2], dot, scopes)
    if kind in ("str", "bool"):
        return expr[1]
    if kind == "field":
        return _lookup(dot, expr[1])
    name, fields = expr[1]
    scope = next((s for s in reversed(scopes) if name in s), None)
    if scope is None:
        raise NameError(f"undefined variable {name}")
    return _lookup(scope[name], fields)


def _run(nodes, dot, scopes, out):
    scopes = scopes + [{}]  # variables declared in a block end with it, as in Go
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "out":
            value = _eval(node[1], dot, scopes)
            if not isinstance(value, str):
                raise NotImplementedError(f"printing {type(value).__name__} is not implemented here")
            out.append(value)
        elif node[0] == "set":
            _, name, expr, declare = node
            target = scopes[-1] if declare else next((s for s in reversed(scopes) if name in s), None)
            if target is None:
                raise NameError(f"assignment to undeclared {name}")
            target[name] = _eval(expr, dot, scopes)
        elif node[0] == "if":
            body = next((b for cond, b in node[1] if _eval(cond, dot, scopes)), node[2])
            _run(body, dot, scopes, out)
        else:
            _, names, expr, body = node
            for i, item in enumerate(_eval(expr, dot, scopes)):
                _run(body, item, scopes + [dict(zip(names, [i, item][-len(names):] if names else []))], out)


def render_go(source, data):
    out = []
    _run(_parse(source), data, [{"$": data}], out)
    return "".join(out)


def ollama_values(messages):
    """What Ollama's Template.Execute passes a .Messages template: collate() joins the system messages into
    .System (keeping them in .Messages) and merges consecutive messages of one role."""
    system, collated = [], []
    for m in messages:
        if m["role"] == "system":
            system.append(m["content"])
        if collated and collated[-1]["Role"] == m["role"]:
            collated[-1]["Content"] += "\n\n" + m["content"]
        else:
            collated.append({"Role": m["role"], "Content": m["content"]})
    return {"System": "\n\n".join(system), "Messages": collated, "Tools": None, "Response": "", "Think": False,
            "IsThinkSet": False}


# ---- the renderer itself, against behaviour of Go's text/template ----

def test_go_renderer_reads_what_go_reads_and_refuses_the_rest():
    data = {"System": "", "Messages": [{"Role": "user", "Content": "a"}, {"Role": "assistant", "Content": "b"}]}
    assert render_go('{{ if .System }}S{{ else if eq "x" "x" }}X{{ end }}', data) == "X"
    assert render_go("{{ $n := false }}{{ range .Messages }}{{ if $n }},{{ end }}{{ .Content }}{{ $n = true }}"
                     "{{ end }}", data) == "a,b"
    assert render_go("x \n {{- .System -}} \n y{{ $.System }}", data) == "xy"
    assert render_go('{{ "{{" }}{{ range $i, $m := .Messages }}{{ $m.Role }}{{ end }}', data) == "{{userassistant"
    for bad in ["{{ .System | len }}", "{{/* c */}}", "{{ len .Messages }}", "{{ with .System }}x{{ end }}",
                "{{ range .Messages }}x{{ else }}y{{ end }}", "{{ if .System }}x", "{{ .Nope }}", "{{ $x = 1 }}"]:
        with pytest.raises((NotImplementedError, ValueError, KeyError, NameError)):
            render_go(bad, data)


def test_modelfile_parser_port_keeps_values_verbatim():
    text = 'FROM ./m.gguf\n# comment\nTEMPLATE """a "b"\n c """\nPARAMETER stop "\nHuman:"\nPARAMETER top_k 40\n'
    assert parse_modelfile(text) == [("model", "./m.gguf"), ("template", 'a "b"\n c '), ("stop", "\nHuman:"),
                                     ("top_k", "40")]


# ---- every template, through the Modelfile, renders our training prompt ----

def training_text(template, system, turns, eos):
    """Template.render's segments with EOS after each answer that lacks it, as utils/data/encoding.Encoder
    appends it."""
    segments = template.render(system, turns)
    return "".join(s + eos if i % 2 and not s.endswith(eos) else s for i, s in enumerate(segments))


def every_template(tokenizer, tmp_path):
    """Every built-in template, the one derived from the tokenizer's chat_template, and .json template files
    that use every field (prefix, no_system, separator, no system role) with characters that need quoting."""
    odd = tmp_path / "odd.json"
    odd.write_text('{"prefix": "<s>", "system_format": "[SYS]\\t{content} \\"q\\" {{x}}\\n", "no_system": "[NOSYS]\\n",'
                   ' "user_format": "U: {content}\\nA: ", "assistant_format": "{content}", "separator": "\\n---\\n",'
                   ' "stop_strings": ["\\nU:"]}', encoding="utf-8")
    plain = tmp_path / "nosystem.json"
    plain.write_text('{"system_format": null, "user_format": "<user>{content}</user><bot>",'
                     ' "assistant_format": "{content}</bot>", "separator": "\\n"}', encoding="utf-8")
    return ([load_template(name, tokenizer) for name in builtin_names()] + [from_chat_template(tokenizer)]
            + [load_template(str(odd), tokenizer), load_template(str(plain), tokenizer)])


def test_every_template_modelfile_renders_the_training_prompt(tokenizer, tmp_path):
    eos = tokenizer.eos_token
    templates = every_template(tokenizer, tmp_path)
    assert len(templates) == len(builtin_names()) + 3
    for template in templates:
        text = modelfile("model-f16.gguf", template, eos, 4096, {"temperature": 0.7, "top_p": 0.9})
        commands = parse_modelfile(text)
        assert commands[0] == ("model", "./model-f16.gguf")
        source = dict(commands)["template"]
        assert source == go_template(template, eos)
        assert ".Messages" in source  # Ollama renders the whole conversation through it, not turn by turn
        stops = [v for k, v in commands if k == "stop"]
        assert stops == list(dict.fromkeys([*template.stop_strings, eos])), template.name
        assert ("temperature", "0.7") in commands and ("num_ctx", "4096") in commands
        has_system = template.system_format is not None
        for system in ([SYSTEM, ""] if has_system else [""]):
            for turns in (TURNS, TURNS[:1], [(TURNS[0][0], None)]):
                expected = training_text(template, system, turns, eos)
                got = render_go(source, ollama_values(chat_messages(system, turns)))
                assert got == expected, (template.name, system, turns)


def test_modelfile_refuses_what_ollama_cannot_quote(tokenizer):
    from utils.core.errors import UserError

    template = Template(name="q", user_format='say """{content}"""')
    with pytest.raises(UserError, match="cannot be quoted in an Ollama Modelfile; pass another --template"):
        modelfile("m.gguf", template, tokenizer.eos_token)
