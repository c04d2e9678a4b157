"""Models that ship their own code (Baichuan, InternLM, some Qwen and Yi releases): refused without
--trust_remote_code, trained, merged and chatted with when it is on, which the run config records."""
import json
import subprocess
import sys

import pytest
from conftest import RECORDS, ROOT

from utils.core.errors import UserError

sys.path.insert(0, str(ROOT))


def test_refused_without_the_flag_before_any_work(remote_model_dir, tmp_path):
    data = tmp_path / "d.json"
    data.write_text(json.dumps(RECORDS), encoding="utf-8")
    proc = subprocess.run([sys.executable, str(ROOT / "finetune.py"), f"--base_model={remote_model_dir}",
                           f"--data_path={data}", f"--output_dir={tmp_path / 'out'}"],
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {remote_model_dir} ships its own model code "
                                                "(modeling_pack.py); read it, "
                                                "then pass --trust_remote_code=True to run it."]
    assert not (tmp_path / "out").exists()


def test_trained_merged_and_chatted_with_when_trusted(remote_model_dir, tmp_path, capfd):
    import cli_demo
    import finetune
    import merge_lora

    out = tmp_path / "out"
    finetune.main(base_model=str(remote_model_dir), data_path=str(ROOT / "data" / "demo.json"), output_dir=str(out),
                  max_steps=2, save_steps=2, cutoff_len=64, precision="fp32", trust_remote_code=True)
    printed = capfd.readouterr()
    assert (f"warning: --trust_remote_code runs modeling_pack.py from {remote_model_dir} with your permissions."
            in printed.err)
    assert "packing off: the model's own code does not keep packed examples apart" in printed.out
    run_config = json.loads((out / "run_config.json").read_text())
    # Baichuan's fused q/k/v
    assert run_config["trust_remote_code"] is True and "W_pack" in run_config["lora"]["target_modules"]

    merge_lora.main(lora_model=str(out), output_dir=str(tmp_path / "merged"))  # follows the run config
    info = json.loads((tmp_path / "merged" / "merge_info.json").read_text())
    assert (tmp_path / "merged" / "modeling_pack.py").is_file() and info["verification"]["greedy_agreement"] == 1.0
    with pytest.raises(UserError, match="ships its own model code .*pass --trust_remote_code=True"):
        merge_lora.main(lora_model=str(out), output_dir=str(tmp_path / "again"), trust_remote_code=False)

    capfd.readouterr()
    cli_demo.main(lora_model=str(out), prompt="hi", temperature=0, max_new_tokens=4)
    assert capfd.readouterr().out.strip()  # it answered (with the code the run config allowed)
