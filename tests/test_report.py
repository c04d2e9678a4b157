"""The end-of-run report: its figures on hand-made answers, its probes, and a run that writes it, where the base
column really is the base model (the adapter switched off) decoding greedily."""
import json
import re

import pytest

from utils.core.errors import UserError
from utils.train.report import figures, loops, read_probes, warnings


def answer(ids, stopped, text=""):
    return {"text": text, "stopped": stopped, "loops": loops(ids), "tokens": len(ids)}


def test_figures_of_looping_runaway_and_clean_answers():
    looping = answer([5, 6, 7, 8, 9] * 3 + [1], stopped=True, text="I am Lumi. I am Lumi. I am Lumi.")
    runaway = answer(list(range(40)), stopped=False, text="and so on and on")
    clean = answer([11, 12, 13, 14], stopped=True, text="Paris.")
    assert [looping["loops"], runaway["loops"], clean["loops"]] == [True, False, False]
    assert not loops([5, 6, 7, 8, 9] * 2 + [5, 6, 7, 8])  # the 5-gram twice and a part: no loop yet
    got = figures([looping, runaway, clean], expects=["Lumi", None, "London"])
    assert got == pytest.approx({"answers": 3, "stop": 2 / 3, "loop": 1 / 3, "mean_tokens": (16 + 40 + 4) / 3,
                                 "expected": 1 / 2})


def test_warnings_name_the_causes_only_when_the_tuned_model_got_worse():
    base = {"stop": 0.8, "loop": 0.1}
    assert warnings(base, {"stop": 0.9, "loop": 0.0}) == []
    said = warnings(base, {"stop": 0.5, "loop": 0.4})
    assert said[0] == "the tuned model ends 50% of its answers by itself, the base 80%"
    assert said[1] == "40% of the tuned model's answers loop, the base's 10%"
    assert "--learning_rate" in said[2] and "--num_epochs" in said[2]


def test_probes_from_files_strings_and_the_shipped_sets(tmp_path):
    (tmp_path / "p.txt").write_text("first\n\nsecond\n", encoding="utf-8")
    (tmp_path / "p.json").write_text(json.dumps(["a", {"prompt": "b", "expect": "Lumi|露米"}]), encoding="utf-8")
    assert [p["prompt"] for p in read_probes(str(tmp_path / "p.txt"))] == ["first", "second"]
    assert read_probes(str(tmp_path / "p.json"))[1] == {"prompt": "b", "expect": "Lumi|露米"}
    assert read_probes(("who are you?", "hi")) == [{"prompt": "who are you?", "expect": None},
                                                   {"prompt": "hi", "expect": None}]
    general, demo = read_probes(None), read_probes(None, demo=True)
    assert len(general) == 8 and len(demo) == 24 and all(p["expect"] for p in demo[8:])
    (tmp_path / "bad.json").write_text(json.dumps([{"prompt": "x", "expect": "("}]), encoding="utf-8")
    with pytest.raises(UserError, match=r"--probe_prompts=.*bad.json is not a list of prompts"):
        read_probes(str(tmp_path / "bad.json"))


def test_a_run_writes_the_report_and_its_base_column_is_the_base_model(finetune, tmp_path, tiny_model_dir, capsys):
    import torch
    from transformers import AutoModelForCausalLM

    from utils.data.encoding import encode_prompt
    from utils.data.templates import load_template
    from utils.model.loading import load_tokenizer

    finetune(report=True, probe_prompts=["who are you?", "写一句诗"], val_set_size=2, max_steps=2)
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert set(report) == {"max_new_tokens", "loop_rule", "base_answers_from_cache", "seconds", "figures",
                           "validation", "warnings", "prompts"}
    assert [r["kind"] for r in report["prompts"]] == ["validation", "validation", "probe", "probe"]
    assert set(report["figures"]["tuned"]) == {"answers", "stop", "loop", "mean_tokens"}
    assert report["validation"]["answered"] == 2 and report["validation"]["loss"] > 0
    assert (out / "report.md").read_text(encoding="utf-8").startswith("# What the run changed")
    printed = capsys.readouterr().out
    assert re.search(r"--- report \([\d.]+ s; greedy", printed) and "\ntuned  stops" in printed

    tokenizer = load_tokenizer(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = encode_prompt(tokenizer, load_template("auto", tokenizer), "", [], "who are you?")
    with torch.no_grad():
        new = base.generate(torch.tensor([ids]), max_new_tokens=report["max_new_tokens"], do_sample=False,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)[0, len(ids):]
    row = report["prompts"][2]
    expected = tokenizer.decode([t for t in new.tolist() if t != tokenizer.eos_token_id], skip_special_tokens=True)
    assert row["base"]["text"] == expected.strip()


def test_stage_pt_report_continues_held_text_and_probes_as_raw_text(finetune, tmp_path, tiny_model_dir):
    """--stage pt: the models continue the head of each held block and each probe as raw text, no template."""
    import torch
    from transformers import AutoModelForCausalLM

    from utils.data.templates import load_template
    from utils.model.loading import load_tokenizer
    from utils.serve.generation import stop_token_ids

    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(f"Paragraph {i} about rivers and mountains." for i in range(40)), encoding="utf-8")
    finetune(stage="pt", data_path=str(text), block_size=32, val_set_size=2, report=True,
             probe_prompts=["Rivers and mountains"])
    report = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    assert [r["kind"] for r in report["prompts"]] == ["validation", "validation", "probe"]
    assert report["validation"]["loss"] > 0 and all(r["reference"] is None for r in report["prompts"])

    tokenizer = load_tokenizer(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids, stops = tokenizer("Rivers and mountains", add_special_tokens=False)["input_ids"], \
        stop_token_ids(tokenizer, base, load_template("auto", tokenizer))
    with torch.no_grad():
        new = base.generate(torch.tensor([ids]), max_new_tokens=report["max_new_tokens"], do_sample=False,
                            eos_token_id=sorted(stops), pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
    expected = tokenizer.decode(new[:next((i for i, t in enumerate(new) if t in stops), len(new))],
                                skip_special_tokens=True)
    assert report["prompts"][2]["base"]["text"] == expected.strip()


def test_base_answers_are_kept_for_the_next_run_on_the_same_base(finetune, tmp_path, tiny_model_dir, monkeypatch):
    """A second run on the same base decodes only the tuned model; other weights, or a damaged cache file, are
    answered afresh, and a cache that cannot be written costs nothing but time."""
    import os
    import shutil

    monkeypatch.setenv("LORA_KIT_CACHE", str(tmp_path / "cache"))
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)

    def report(name, **flags):
        finetune(base_model=str(base), output_dir=str(tmp_path / name), report=True, max_steps=1,
                 probe_prompts=["who are you?", "写一句诗", "who are you?"], **flags)
        return json.loads((tmp_path / name / "report.json").read_text(encoding="utf-8"))

    first, second = report("a"), report("b", learning_rate=5e-3)
    assert first["base_answers_from_cache"] == 0 and second["base_answers_from_cache"] == 3
    assert [r["base"] for r in first["prompts"]] == [r["base"] for r in second["prompts"]]
    (cached,) = (tmp_path / "cache" / "report").iterdir()
    cached.write_text("{not json", encoding="utf-8")
    assert report("c")["base_answers_from_cache"] == 0
    weights = base / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert report("d")["base_answers_from_cache"] == 0 and len(list((tmp_path / "cache" / "report").iterdir())) == 2
    for f in (tmp_path / "cache" / "report").iterdir():
        f.unlink()
    (tmp_path / "cache" / "report").rmdir()
    (tmp_path / "cache" / "report").write_text("a file where the folder should be")
    assert report("e")["base_answers_from_cache"] == 0


def _documented_fields():
    """The report.json fields the README's report section lists (first cells of its field table), with
    `{base,tuned}` spelled out."""
    from conftest import ROOT

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("### The end-of-run report", 1)[1].split("\n#", 1)[0]
    table = section.split("| `report.json` field | meaning |\n|---|---|\n", 1)[1].split("\n\n", 1)[0]
    names = set()
    for line in table.splitlines():
        if line.startswith("| `"):
            for name in re.findall(r"`([^`]+)`", line.split("|")[1]):
                names |= {name.replace("{base,tuned}", who) for who in ("base", "tuned")}
    return names


def _fields(value, prefix=""):
    if isinstance(value, dict):
        return {f for key, v in value.items() for f in _fields(v, f"{prefix}.{key}" if prefix else key)}
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return {f for v in value for f in _fields(v, prefix + "[]")}
    return {prefix}


def test_report_json_has_the_fields_the_readme_documents(finetune, tmp_path):
    probes = tmp_path / "probes.json"
    probes.write_text(json.dumps([{"prompt": "who are you?", "expect": "Lumi"}, "写一句诗"]), encoding="utf-8")
    finetune(report=True, probe_prompts=str(probes), val_set_size=2, max_steps=1)
    report = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    assert _fields(report) == _documented_fields()
