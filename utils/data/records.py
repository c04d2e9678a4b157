"""Records: find the data files, read them as a stream, and validate each record.

Nothing here holds a whole file: a JSON list is decoded one element at a time from 1 MiB chunks, JSON Lines
and .txt files one line at a time, so reading a 3 GB file costs the memory of one chunk and one record. A bad
record raises a UserError naming the file, the record (or line) number and the fix. The layouts are
documented in data/README.md.
"""
import codecs
import glob
import json
import re
from pathlib import Path

from utils.core.errors import UserError

SFT_SUFFIXES = (".json", ".jsonl")
PT_SUFFIXES = (".txt", ".json", ".jsonl")
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
         "bot": "assistant", "model": "assistant"}
CHUNK = 1 << 20
_SPACE = re.compile(r"[ \t\n\r]*")


def number(n):
    """1234567 -> "1 234 567": record numbers in messages stay readable in both languages."""
    return f"{n:,}".replace(",", " ")


def data_files(data_path, suffixes, flag="data_path"):
    """The files behind --data_path: a file, a folder (its files in name order), a glob pattern such as
    data/part-*.jsonl, or several of these joined by commas."""
    if isinstance(data_path, Path) or (isinstance(data_path, str) and Path(data_path).expanduser().exists()):
        parts = [data_path]  # a name that holds a comma is still one file
    elif isinstance(data_path, str):
        parts = data_path.split(",")
    elif isinstance(data_path, (list, tuple)) and data_path:
        parts = data_path  # fire turns a,b into a tuple
    else:
        raise UserError(f"--{flag} must name a data file, a folder, or several joined by commas, got {data_path!r}.")
    files = []
    for part in (str(p).strip() for p in parts):
        path = Path(part).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in suffixes and p.is_file())
            if not found:
                raise UserError(f"{path} holds no {'/'.join(suffixes)} files; "
                                f"point --{flag} at a data file or a folder of them.")
            files += found
        elif path.is_file():
            files.append(path)
        elif glob.has_magic(part):
            found = sorted(Path(p) for p in glob.glob(str(path)) if Path(p).suffix in suffixes and Path(p).is_file())
            if not found:
                raise UserError(f"--{flag}={part} matches no {'/'.join(suffixes)} files; check the pattern.")
            files += found
        else:
            raise UserError(f"{path} does not exist; pass --{flag} a {'/'.join(suffixes)} file, a folder of them, "
                            "or several joined by commas.")
    return files


def _chunks(file, progress=None):
    """The file's text in chunks of about 1 MiB, decoded as UTF-8 (a BOM is skipped)."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    lines = 0
    with open(file, "rb") as f:
        while True:
            raw = f.read(CHUNK)
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                line = lines + raw[:max(e.start, 0)].count(b"\n") + 1
                raise UserError(f"{file}: line {number(line)} is not UTF-8 (byte 0x{e.object[e.start]:02x}); "
                                "re-save the file as UTF-8.") from None
            lines += raw.count(b"\n")
            if progress:
                progress(len(raw))
            if text:
                yield text
            if not raw:
                return


def _lines(file, progress=None):
    """(line number, line) for every line of the file, without its newline."""
    rest, n = "", 0
    for text in _chunks(file, progress):
        parts = (rest + text).split("\n")
        rest = parts.pop()
        for line in parts:
            n += 1
            yield n, line.rstrip("\r")
    if rest:
        yield n + 1, rest.rstrip("\r")


def _json_lines(file, progress=None, in_json_file=False):
    first = True
    for i, line in _lines(file, progress):
        if line.strip():
            try:
                yield f"{file}: line {number(i)}", json.loads(line)
            except json.JSONDecodeError as e:
                if first and in_json_file:  # one object over several lines: a pretty-printed object, not records
                    raise UserError(f"{file}: expected a JSON list of records, found an object; "
                                    "wrap the records in [ ... ], "
                                    "or put one object per line in a .jsonl file.") from None
                raise UserError(f"{file}: line {number(i)} is not valid JSON ({e.msg} at column {e.colno}); "
                                "fix it, or remove the line.") from None
            first = False


class _Buffer:
    """Text of a file with a read position; refills from the chunk stream, forgets what was consumed, and
    turns a position into a line and column for error messages."""

    def __init__(self, file, progress):
        self.file, self.chunks, self.text, self.pos, self.eof = file, _chunks(file, progress), "", 0, False
        self.lines_before, self.column_before = 0, 0  # of the text already dropped

    def refill(self):
        self.lines_before, self.column_before = self._line_column(self.pos)
        self.lines_before -= 1
        self.text, self.pos = self.text[self.pos:], 0
        chunk = next(self.chunks, None)
        if chunk is None:
            self.eof = True
        else:
            self.text += chunk

    def skip_space(self):
        """Move past whitespace; the next character, or "" at the end of the file."""
        while True:
            self.pos = _SPACE.match(self.text, self.pos).end()
            if self.pos < len(self.text) or self.eof:
                return self.text[self.pos:self.pos + 1]
            self.refill()

    def _line_column(self, pos):
        """(line, characters before pos on its line) of a position in the current text."""
        newlines = self.text.count("\n", 0, pos)
        column = pos - self.text.rfind("\n", 0, pos) - 1 if newlines else self.column_before + pos
        return self.lines_before + newlines + 1, column

    def error(self, pos, what, fix):
        line, column = self._line_column(pos)
        column += 1
        return UserError(f"{self.file}: invalid JSON at line {number(line)}, column {column} ({what}); {fix}")


def _json_list(file, progress=None):
    """The elements of a top-level JSON list, one at a time, as json.load would give them."""
    buf, decoder, n = _Buffer(file, progress), json.JSONDecoder(), 0
    fix = "fix the syntax, or use one JSON object per line in a .jsonl file."
    buf.skip_space()
    buf.pos += 1  # the "[" the caller saw
    while True:
        char = buf.skip_space()
        if char == "]":
            buf.pos += 1
            if buf.skip_space():
                raise buf.error(buf.pos, "extra data after the list", fix)
            return
        if n:
            if char != ",":
                raise buf.error(buf.pos, "expecting ',' delimiter" if char else "the list is not closed", fix)
            buf.pos += 1
            if buf.skip_space() == "]":
                raise buf.error(buf.pos, "a comma before ']'", fix)
        while True:
            try:
                record, end = decoder.raw_decode(buf.text, buf.pos)
            except json.JSONDecodeError as e:
                # A record cut by the end of the chunk fails near that end (or as a string left open):
                # read on and try again. Any other failure is in the file itself.
                if not buf.eof and (e.pos >= len(buf.text) - 32 or e.msg.startswith("Unterminated string")):
                    buf.refill()
                    continue
                raise buf.error(e.pos, e.msg, fix) from None
            if end >= len(buf.text) and not buf.eof and not isinstance(record, (dict, list)):
                buf.refill()  # a number or literal may go on in the next chunk
                continue
            break
        n += 1
        buf.pos = end
        yield f"{file}: record {number(n)}", record


def json_records(file, progress=None):
    """(where, record) for every record of a .json or .jsonl file, streamed."""
    if file.suffix == ".jsonl":
        yield from _json_lines(file, progress)
        return
    first = _Buffer(file, None).skip_space()
    if first == "[":
        yield from _json_list(file, progress)
        return
    if first != "{":
        kind = {"": "an empty file", '"': "a string"}.get(first, "a single value")
        raise UserError(f"{file}: expected a JSON list of records, found {kind}; wrap the records in [ ... ].")
    # Objects one after another: JSON Lines in a .json file. A lone object is a mistake, not one record.
    held, count = None, 0
    for where, record in _json_lines(file, progress, in_json_file=True):
        count += 1
        if count == 1:
            held = (where, record)
            continue
        if held:
            yield held
            held = None
        yield where, record
    if held:
        raise UserError(f"{file}: expected a JSON list of records, found a {type(held[1]).__name__}; "
                        "wrap the records in [ ... ].")


SFT_STRINGS = 'every record needs "instruction" and "output" strings ("input", "system" and "history" are optional)'


def string_field(rec, key, where, required=True, fix=SFT_STRINGS):
    """rec[key] as a string ("" when absent and not `required`), or a UserError naming the record and `fix`."""
    value = rec.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        problem = "is missing" if value is None else f"is a {type(value).__name__}, not a string"
        raise UserError(f'{where}: "{key}" {problem}; {fix}.')
    return value


def parse_messages(msgs, key, where):
    """(system, [(role, content), ...]) of a list of OpenAI ({role, content}) or ShareGPT ({from, value})
    messages, roles named as ROLES names them; a leading system message becomes the system text."""
    if not isinstance(msgs, list) or not msgs:
        raise UserError(f'{where}: "{key}" must be a non-empty list of messages.')
    parsed = []
    for j, m in enumerate(msgs, 1):
        role = m.get("role", m.get("from")) if isinstance(m, dict) else None
        content = m.get("content", m.get("value")) if isinstance(m, dict) else None
        if ROLES.get(role) is None or not isinstance(content, str):
            raise UserError(f'{where}: message {j} of "{key}" needs a role (system, user or assistant) '
                            'and a string content.')
        parsed.append((ROLES[role], content))
    system = parsed.pop(0)[1] if parsed[0][0] == "system" else ""
    return system, parsed


def _chat(rec, where):
    """OpenAI `messages` ({role, content}) or ShareGPT `conversations` ({from, value}) to (system, turns)."""
    key = "messages" if "messages" in rec else "conversations"
    system, parsed = parse_messages(rec[key], key, where)
    if not parsed:
        raise UserError(f'{where}: "{key}" holds only a system message; '
                        'add a user message and the assistant\'s answer, or remove the record.')
    if len(parsed) % 2 or any(r != ("user", "assistant")[k % 2] for k, (r, _) in enumerate(parsed)):
        raise UserError(f'{where}: "{key}" must alternate user and assistant messages '
                        'after an optional system message, and end with an assistant message.')
    turns = [(parsed[k][1], parsed[k + 1][1]) for k in range(0, len(parsed), 2)]
    if any(not a.strip() for _, a in turns):
        raise UserError(f"{where}: an assistant message is empty; "
                        "give every assistant message some text, or remove the record.")
    return system, turns


def history_pairs(rec, where):
    """The record's optional "history": [(question, answer), ...], oldest first."""
    history = rec.get("history") or []
    if not isinstance(history, list) or not all(isinstance(p, (list, tuple)) and len(p) == 2
                                                and all(isinstance(s, str) for s in p) for p in history):
        raise UserError(f'{where}: "history" must be a list of [question, answer] string pairs, oldest first, '
                        'e.g. [["Hi", "Hello!"]].')
    return [tuple(p) for p in history]


def to_dialog(rec, where):
    """Validate one record and turn it into (system, [(user, answer), ...], input of the last turn)."""
    if not isinstance(rec, dict):
        raise UserError(f'{where} is a {type(rec).__name__}, not a JSON object; each record must look like '
                        f'{{"instruction": ..., "input": ..., "output": ...}}.')
    if "messages" in rec or "conversations" in rec:
        return (*_chat(rec, where), "")
    instruction = string_field(rec, "instruction", where)
    input_text = string_field(rec, "input", where, required=False)
    output = string_field(rec, "output", where)
    system = string_field(rec, "system", where, required=False)
    if not output.strip():
        raise UserError(f'{where}: "output" is empty; give every record a non-empty "output", or remove the record.')
    return system, history_pairs(rec, where) + [(instruction, output)], input_text


def to_text(rec, where):
    """A --stage pt record from JSON: its "text" string."""
    if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
        raise UserError(f'{where}: needs a "text" string for --stage pt; '
                        f'give each record {{"text": "..."}}, or use a .txt file.')
    return rec["text"]


def iter_records(files, stage, progress=None):
    """Validated items of every file in order: dialogs for sft, non-empty texts for pt."""
    for file in files:
        if stage == "pt" and file.suffix == ".txt":
            yield from (line for _, line in _lines(file, progress) if line.strip())
            continue
        for where, rec in json_records(file, progress):
            if stage == "sft":
                yield to_dialog(rec, where)
            else:
                text = to_text(rec, where)
                if text.strip():
                    yield text


def read_dialogs(data_path, flag="data_path"):
    """All dialogs of a small data set as a list (tests and benchmarks; training streams them)."""
    dialogs = list(iter_records(data_files(data_path, SFT_SUFFIXES, flag), "sft"))
    if not dialogs:
        raise UserError(f"{data_path} holds no records; add some, or point --{flag} at another file.")
    return dialogs
