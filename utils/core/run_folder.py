"""The run folder the stages hand each other, as later stages read it: run_config.json, the adapter, its base.

finetune.py writes a run folder: the PEFT adapter, run_config.json (what later stages need: the base model,
template, cutoff, quantization), loss.png and checkpoint-N/ folders. merge, chat, evaluation and export accept
that folder, a checkpoint-N/ inside it (whose run_config.json is its parent's), an older folder with an
adapter_model/ subfolder, or any PEFT adapter folder, by the same rules: `find_adapter`, `read_run_config`,
`adapter_base`. BUILTIN names the built-in base model everywhere.

What training writes into it (checkpoints, resume, the final files together) is utils/train/run_output.py.
"""
import json
from pathlib import Path

from utils.core.errors import UserError
from utils.core.files import check_safetensors, read_json

BUILTIN = "builtin:smollm2"
RUN_CONFIG = "run_config.json"


def write_run_config(output_dir, config):
    path = Path(output_dir) / RUN_CONFIG
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    return path


def read_run_config(folder):
    """The run config of an adapter folder, or of the run a checkpoint-N/ belongs to; None if there is none."""
    for candidate in (Path(folder) / RUN_CONFIG, Path(folder).parent / RUN_CONFIG):
        if candidate.is_file():
            config = read_json(candidate, "restore it from the run, or delete it to fall back on adapter_config.json")
            if not isinstance(config, dict):
                raise UserError(f"{candidate} holds a {type(config).__name__}, not a run config; "
                                "delete it to fall back on adapter_config.json.")
            return config
    return None


def find_adapter(lora_model, flag="lora_model"):
    """The folder holding the adapter: --lora_model itself (a run or checkpoint-N/) or its older adapter_model/;
    its adapter_config.json must parse and its weights must be whole."""
    folder = Path(lora_model).expanduser().resolve()
    if not folder.is_dir():
        raise UserError(f"--{flag}={lora_model} is not a folder; "
                        "pass a finetune.py output folder, a checkpoint-N folder or a PEFT adapter folder.")
    adapter = next((c for c in (folder, folder / "adapter_model") if (c / "adapter_config.json").is_file()), None)
    if adapter is None:
        raise UserError(f"{folder} holds no adapter_config.json; "
                        f"--{flag} needs a folder with adapter_config.json and adapter_model.safetensors (or .bin).")
    config = read_json(adapter / "adapter_config.json", "restore it, or train again")
    if not isinstance(config, dict):
        raise UserError(f"{adapter}/adapter_config.json holds a {type(config).__name__}, not a PEFT adapter config; "
                        "restore it, or train again.")
    weights = adapter / "adapter_model.safetensors"
    if weights.is_file():
        check_safetensors(weights, "train again, or pass a checkpoint-N folder of the run")
    return adapter


def continued_run(adapter, base_model):
    """(base model, run config) of a run that continues `adapter` (finetune --lora_model; None: a new adapter):
    the adapter's own base unless --base_model names another than the built-in, and its run config."""
    if not adapter:
        return base_model, None
    config = read_run_config(adapter)
    return (adapter_base(adapter, config) if base_model == BUILTIN else base_model), config


def adapter_base(folder, run_config=None):
    """The base model an adapter was trained on: the run config's (its resolved path while that exists),
    else the base_model_name_or_path PEFT recorded in adapter_config.json."""
    run_config = run_config or {}
    if run_config.get("base_model") == BUILTIN:
        return BUILTIN
    if run_config.get("base_model_path") and Path(run_config["base_model_path"]).exists():
        return run_config["base_model_path"]
    if run_config.get("base_model"):
        return run_config["base_model"]
    return read_json(Path(folder) / "adapter_config.json", "restore it, or train again").get("base_model_name_or_path")


