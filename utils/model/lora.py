"""LoRA: target discovery, the PEFT config, and the check that a saved adapter holds LoRA weights."""
import re
from pathlib import Path

import torch

from utils.core.errors import UserError

_DECODER_LAYER = re.compile(r"\.(layers|h|blocks)\.\d+\.")


def find_target_modules(model):
    """Names of every linear projection inside the decoder layers (never lm_head or embeddings)."""
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and _DECODER_LAYER.search(name)}
    if not names:
        raise UserError("found no linear layers inside decoder layers; "
                        "pass --lora_target_modules=q_proj,v_proj (names from the model).")
    return sorted(names)


def lora_config(model, r, alpha, dropout, target_modules, modules_to_save):
    from peft import LoraConfig

    available = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in target_modules + modules_to_save if m not in available]
    if missing:
        raise UserError(f"the model has no module named {', '.join(missing)}; "
                        f"its linear layers are {', '.join(find_target_modules(model))}.")
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                      modules_to_save=modules_to_save or None, bias="none", task_type="CAUSAL_LM")


def save_adapter(model, output_dir):
    """Save the PEFT adapter, refusing one without LoRA weights (alpaca-lora's empty 443-byte adapter)."""
    from peft import get_peft_model_state_dict

    if not any("lora_" in k for k in get_peft_model_state_dict(model)):
        raise RuntimeError("the adapter holds no lora_ weights; refusing to save an empty adapter.")
    model.save_pretrained(output_dir, safe_serialization=True)
    from safetensors import safe_open

    with safe_open(str(Path(output_dir) / "adapter_model.safetensors"), "pt") as f:
        if not any("lora_" in k for k in f.keys()):
            raise RuntimeError(f"{output_dir}/adapter_model.safetensors holds no lora_ weights after saving.")
