"""Reading records as a stream: the same records json.load gives, at any chunk boundary, and every bad input
named by its file, record or line, and fix."""
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from utils.core.errors import UserError
from utils.data import records
from utils.data.records import data_files, iter_records, json_records, read_dialogs

TRICKY = [
    {"instruction": "brackets ] [ } { and \"quotes\", commas, and a \\ backslash", "input": "",
     "output": "[{\"x\": 1}]"},
    {"instruction": "unicode 你好，世界 🌍 café", "output": "\u00e9\u4e2d\U0001F600 escapes \\u0041 \n\t\r"},
    {"instruction": "numbers", "output": "ok", "n": [1, -2.5e-3, 1e308, 0, 123456789012345678901234567890],
     "flags": [True, False, None]},
    {"messages": [{"role": "user", "content": "nested {\"a\": [1, {\"b\": \"]\"}]}"},
                  {"role": "assistant", "content": "fine"}]},
    {"instruction": "x" * 3000, "output": "long " * 500},
]


def read_all(path, chunk, monkeypatch):
    monkeypatch.setattr(records, "CHUNK", chunk)
    return [rec for _, rec in json_records(path)]


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 20])
@pytest.mark.parametrize("layout", ["compact", "indented", "bom", "crlf"])
def test_streamed_list_equals_json_load(tmp_path, monkeypatch, chunk, layout):
    """Chunks as small as one byte cut strings, escapes, numbers and multi-byte characters at every place."""
    compact = layout == "compact"  # written with \uXXXX escapes (surrogate pairs too), the others as UTF-8
    text = json.dumps(TRICKY * 3, ensure_ascii=compact, indent=None if compact else 2)
    if layout == "crlf":
        text = text.replace("\n", "\r\n")
    path = tmp_path / "data.json"
    path.write_bytes((b"\xef\xbb\xbf" if layout == "bom" else b"") + text.encode("utf-8"))
    assert read_all(path, chunk, monkeypatch) == json.loads(text)


@pytest.mark.parametrize("chunk", [5, 1 << 20])
def test_json_lines_with_blank_lines(tmp_path, monkeypatch, chunk):
    path = tmp_path / "data.jsonl"
    lines = [json.dumps(r, ensure_ascii=False) for r in TRICKY]
    path.write_text("\n\n".join(lines) + "\n\n   \n", encoding="utf-8")
    assert read_all(path, chunk, monkeypatch) == TRICKY
    json_file = tmp_path / "lines.json"  # JSON Lines under a .json name, as people write them
    json_file.write_text("\n".join(lines), encoding="utf-8")
    assert read_all(json_file, chunk, monkeypatch) == TRICKY


def test_folder_glob_and_comma_separated_paths(tmp_path):
    shards = tmp_path / "data"
    shards.mkdir()
    for i in range(3):
        (shards / f"part-{i:05d}.jsonl").write_text(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n")
    (shards / "notes.md").write_text("not data")
    single = tmp_path / "one.json"
    single.write_text(json.dumps([{"instruction": "q", "output": "a"}]))
    answers = lambda path: [d[1][-1][1] for d in read_dialogs(path)]  # noqa: E731
    assert answers(shards) == ["a0", "a1", "a2"]
    assert answers(f"{shards}/part-*.jsonl") == ["a0", "a1", "a2"]
    assert answers(f"{single},{shards}/part-00002.jsonl") == ["a", "a2"]
    assert answers((str(single), str(shards))) == ["a", "a0", "a1", "a2"]  # fire turns a,b into a tuple
    with pytest.raises(UserError, match="matches no .json/.jsonl files"):
        data_files(f"{shards}/nothing-*.jsonl", (".json", ".jsonl"))
    with pytest.raises(UserError, match=r"missing.json does not exist; pass --data_path a .json/.jsonl file, a folder"):
        data_files(f"{single},{tmp_path}/missing.json", (".json", ".jsonl"))


def test_pt_texts_from_txt_and_json(tmp_path):
    (tmp_path / "a.txt").write_text("first line\n\n  \nsecond line\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text('{"text": "third"}\n{"text": ""}\n', encoding="utf-8")
    files = data_files(tmp_path, (".txt", ".jsonl"))
    assert list(iter_records(files, "pt")) == ["first line", "second line", "third"]


BAD_INPUTS = [
    ("missing.json", None, "does not exist"),
    ("bad.json", '[{"instruction": "a", "output": "b"},',
     r"bad.json: invalid JSON at line 1, column 38 \(Expecting value\)"),
    ("bad.json", '[{"instruction": "a", "output": "b"}',
     r"bad.json: invalid JSON at line 1, column 37 \(the list is not closed\)"),
    ("bad.json", '[{"instruction": "a", "output": "b"},]',
     r"bad.json: invalid JSON at line 1, column 38 \(a comma before '\]'\)"),
    ("bad.json", '[{"instruction": "a", "output": "b"}] x',
     r"bad.json: invalid JSON at line 1, column 39 \(extra data after the list\)"),
    ("bad.json", '[\n{"instruction": "a",\n "output": "b" "x"}]',
     r"bad.json: invalid JSON at line 3, column 16 \(Expecting ',' delimiter\)"),
    ("bad.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": ', r"bad.jsonl: line 2 is not valid JSON"),
    ("bad.json", '[{"instruction": "a", "output": "b"}, {"instruction": "a"}]', r'record 2: "output" is missing'),
    ("bad.json", '[{"instruction": 3, "output": "b"}]', r'record 1: "instruction" is a int, not a string'),
    ("bad.json", "[]", "holds no records"),
    ("bad.json", "", "expected a JSON list of records, found an empty file"),
    ("bad.json", '"text"', "expected a JSON list of records, found a string"),
    ("bad.json", '[{"instruction": "a", "output": "  "}]', r'record 1: "output" is empty'),
    ("bad.json", '[{"instruction": "a", "output": "b", "history": [["only one"]]}]',
     r'record 1: "history" must be a list of \[question, answer\]'),
    ("bad.json", '[{"messages": [{"role": "user", "content": "a"}]}]', r'record 1: "messages" must alternate'),
    ("bad.json", '[{"messages": [{"role": "system", "content": "a"}]}]',
     r'record 1: "messages" holds only a system message; add a user message'),
    ("bad.json", '{"instruction": "a", "output": "b"}', "expected a JSON list of records, found a dict"),
    ("bad.json", '{\n  "instruction": "a",\n  "output": "b"\n}',
     "expected a JSON list of records, found an object; wrap the records"),
    ("bad.json", b'[{"instruction": "\xff\xfe", "output": "b"}]', r"bad.json: line 1 is not UTF-8"),
]


@pytest.mark.parametrize("name,content,message", BAD_INPUTS)
def test_bad_input_is_one_clear_error(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=message):
        read_dialogs(path)


def test_bad_record_deep_in_a_large_file_is_named_and_nothing_is_written(tmp_path):
    """Record 19 876 of 20 000 is bad: the run stops with its number, leaves no cache entry or temporary
    folder, and writes no output, though it read and tokenized the records before it."""
    rows = [{"instruction": f"question {i}", "input": "", "output": f"answer {i}"} for i in range(20_000)]
    rows[19_875]["output"] = ""
    bad = tmp_path / "big.json"
    bad.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    out, cache = tmp_path / "out", tmp_path / "cache"
    from utils.model.builtin import builtin_path

    env = {**os.environ, "LORA_KIT_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, str(ROOT / "finetune.py"), f"--base_model={builtin_path()}",
                           f"--data_path={bad}", f"--output_dir={out}", "--preprocessing_num_workers=2"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [f'error: {bad}: record 19 876: "output" is empty; '
                     'give every record a non-empty "output", or remove the record.']
    assert not out.exists()
    assert [p.name for p in (cache / "data").iterdir() if not p.name.endswith(".lock")] == []


def test_cli_bad_input_exits_2_without_traceback_or_output(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "a", "output": ""}]', encoding="utf-8")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "finetune.py"), f"--data_path={bad}", f"--output_dir={out}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [f'error: {bad}: record 1: "output" is empty; '
                     'give every record a non-empty "output", or remove the record.']
    assert not out.exists()
