"""A PEFT LoRA adapter -> a GGUF LoRA file that llama.cpp applies over its base model's GGUF (`--lora`, or
llama-cpp-python's `lora_path`), so one base file serves many small adapters.

llama.cpp's format (its src/llama-adapter.cpp): general.type "adapter", adapter.type "lora", adapter.lora.alpha, the
base's architecture, and for each adapted weight W two tensors named for W's GGUF tensor, `<name>.lora_a` (PEFT's
lora_A, rank x in) and `<name>.lora_b` (lora_B, out x rank). llama.cpp adds scale * B(Ax) with scale = alpha / rank.
Everything the GGUF writer does to W must be done to the product BA: for the `llama` architecture the rows of q and k
are permuted, and those are B's rows. A scale that alpha / rank does not express (rsLoRA's alpha / sqrt(rank), a
per-module alpha_pattern) is folded into B.
"""
import numpy as np

from utils.core.errors import UserError
from utils.export.gguf import PERMUTED, TYPES, convert, gguf_name, permute_qk


def lora_tensors(adapter_dir, config, arch):
    """(alpha, [(gguf name, A, B)]) from the adapter folder, or one sentence on what llama.cpp cannot apply."""
    from utils.export.merge import load_adapter  # late: imports torch (flag checks stay torch-free)

    weights = adapter_dir / "adapter_model.safetensors"
    lora_config, modules, replace = load_adapter(adapter_dir, allow_pickle=False)
    if replace:
        raise UserError(f"{weights} holds full weights ({', '.join(sorted(replace)[:2])}: modules_to_save or a resized "
                        "embedding), which a GGUF LoRA file cannot carry; merge it (merge_lora.py) and export the "
                        "merged folder.")
    if lora_config.get("fan_in_fan_out"):
        raise UserError(f"{adapter_dir}/adapter_config.json sets fan_in_fan_out, which LLaMA-family layers never "
                        "use; pass an adapter trained on this base.")
    alpha = float(lora_config.get("lora_alpha", 8))
    tied = getattr(config, "tie_word_embeddings", False)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    out = []
    for module, slot in sorted(modules.items()):
        name = gguf_name(f"{module}.weight")
        if slot["magnitude"] is not None or slot["embedding"] or name in (None, "token_embd.weight") or (
                name == "output.weight" and tied):
            what = ("a DoRA magnitude" if slot["magnitude"] is not None else
                    "an embedding LoRA" if slot["embedding"] or name == "token_embd.weight" else
                    "a LoRA on the tied output projection" if name else "a LoRA on a module the GGUF has no tensor for")
            raise UserError(f"{weights} has {what} ({module}), which llama.cpp cannot apply as a LoRA; merge it "
                            "(merge_lora.py) and export the merged folder.")
        a = slot["A"].float().numpy()
        b = slot["B"].float().numpy() * (slot["scale"] / (alpha / a.shape[0]))  # 1 unless rsLoRA or alpha_pattern
        if arch in PERMUTED and name.endswith("attn_q.weight"):
            b = permute_qk(b, heads)
        elif arch in PERMUTED and name.endswith("attn_k.weight"):
            b = permute_qk(b, kv_heads)
        out.append((name, a, b))
    return alpha, out


def write_lora_gguf(path, outtype, arch, alpha, tensors, name):
    """Write lora_tensors' (alpha, tensors) as a GGUF LoRA file for a base of llama.cpp architecture `arch`;
    returns the number of tensors written."""
    import gguf

    if outtype not in TYPES:
        raise UserError(f"--outtype={outtype!r} is not one of {', '.join(TYPES)}, the types of a GGUF LoRA file; "
                        "pass one of them.")
    w = gguf.GGUFWriter(str(path), arch)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    w.add_name(name)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for target, a, b in tensors:
        for suffix, array in (("lora_a", a), ("lora_b", b)):
            data, kind = convert(np.ascontiguousarray(array), outtype)
            w.add_tensor(f"{target}.{suffix}", data, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return 2 * len(tensors)

