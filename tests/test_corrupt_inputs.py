"""Damaged hand-off files: every stage that reads them says which file and what to do, before any model loads."""
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, damaged_copy


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory, tiny_model_dir, smollm2_dir):
    """A short finetune.py run on the tiny model (adapter, run_config.json, checkpoint-2/)."""
    out = tmp_path_factory.mktemp("run") / "out"
    data = ROOT / "data" / "demo.json"
    subprocess.run([sys.executable, str(ROOT / "finetune.py"), f"--base_model={tiny_model_dir}", f"--data_path={data}",
                    f"--output_dir={out}", "--max_steps=2", "--save_steps=2", "--precision=fp32", "--cutoff_len=64"],
                   check=True, capture_output=True, timeout=300)
    return out



CASES = [
    ("adapter_model.safetensors", "truncate",
     r"adapter_model.safetensors is damaged or cut short \(.*\); train again, or pass a checkpoint-N folder"),
    ("adapter_config.json", '{"r": 8, ',
     r"adapter_config.json is not readable JSON \(.*\); restore it, or train again"),
    ("adapter_config.json", "[1, 2]", r"adapter_config.json holds a list, not a PEFT adapter config"),
    ("run_config.json", "{not json",
     r"run_config.json is not readable JSON \(.*\); restore it from the run, or delete it"),
]


@pytest.mark.parametrize("script", ["merge_lora.py", "cli_demo.py"])
@pytest.mark.parametrize("name,how,message", CASES, ids=[f"{n}:{h[:8]}" for n, h, _ in CASES])
def test_damaged_adapter_folder_is_one_sentence(run_folder, tmp_path, script, name, how, message):
    import re

    folder = damaged_copy(run_folder, tmp_path / "damaged", name, how)
    extra = [f"--output_dir={tmp_path / 'merged'}"] if script == "merge_lora.py" else ["--prompt=hi"]
    proc = subprocess.run([sys.executable, str(ROOT / script), f"--lora_model={folder}", *extra], capture_output=True,
                          text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "Loading weights" not in line]
    assert proc.returncode == 2 and len(lines) == 1 and re.search(message, lines[0]), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "merged").exists()


def test_export_refuses_a_cut_short_shard_before_writing(tmp_path, tiny_model_dir):
    folder = tmp_path / "merged"
    shutil.copytree(tiny_model_dir, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    out = tmp_path / "out.gguf"
    proc = subprocess.run([sys.executable, str(ROOT / "export_gguf.py"), f"--model_path={folder}", f"--output={out}"],
                          capture_output=True, text=True, timeout=300)
    assert (proc.returncode == 2
            and proc.stderr.strip().splitlines()[-1].startswith(f"error: {weights} is damaged or cut short ("))
    assert "Traceback" not in proc.stderr and list(tmp_path.iterdir()) == [folder]
