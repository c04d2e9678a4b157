"""The end-of-run report: its figures on hand-made answers, its probes, and a run that writes it, where the base
column really is the base model (the adapter switched off) decoding greedily."""
import json

import pytest

from utils.errors import UserError
from utils.report import figures, loops, read_probes, warnings


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

    from utils.data import encode_prompt
    from utils.model import load_tokenizer
    from utils.templates import load_template

    finetune(report=True, probe_prompts=["who are you?", "写一句诗"], val_set_size=2, max_steps=2)
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert set(report) == {"max_new_tokens", "loop_rule", "figures", "validation", "warnings", "prompts"}
    assert [r["kind"] for r in report["prompts"]] == ["validation", "validation", "probe", "probe"]
    assert set(report["figures"]["tuned"]) == {"answers", "stop", "loop", "mean_tokens"}
    assert report["validation"]["answered"] == 2 and report["validation"]["loss"] > 0
    assert (out / "report.md").read_text(encoding="utf-8").startswith("# What the run changed")
    printed = capsys.readouterr().out
    assert "--- report (greedy" in printed and "\ntuned  stops" in printed

    tokenizer = load_tokenizer(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = encode_prompt(tokenizer, load_template("auto", tokenizer), "", [], "who are you?")
    with torch.no_grad():
        new = base.generate(torch.tensor([ids]), max_new_tokens=report["max_new_tokens"], do_sample=False,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)[0, len(ids):]
    row = report["prompts"][2]
    expected = tokenizer.decode([t for t in new.tolist() if t != tokenizer.eos_token_id], skip_special_tokens=True)
    assert row["base"]["text"] == expected.strip()
