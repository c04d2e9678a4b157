"""The fast training path, behind one entry point: `prepare_for_training`.

Each kernel copies behaviour that peft or transformers owns, keeps a test that pins it, and falls back to the
library for any case it does not implement. It is applied only where bench/RESULTS.md shows it pays:
- attention.py: causal attention per packed example (CPU and GPU; FlashAttention-2 varlen where installed);
- loss.py: the loss on supervised positions only (everywhere), projected without a logits tensor (CPU);
- lora.py: PEFT's LoRA layer as one fused step (CPU);
- norm.py: RMSNorm in fewer passes (CPU).
On CUDA nothing of ours has been measured yet, so the fused LoRA layer, the norm and the logits-free loss stay
off there and PEFT's and transformers' own layers run, until a GPU A/B in bench/ says otherwise.
"""
from utils.train.fast.attention import PACKED_ATTENTION, attention_for, register_packed_attention
from utils.train.fast.lora import fast_lora
from utils.train.fast.loss import causal_lm_loss, project_in_loss
from utils.train.fast.norm import fast_norms

__all__ = ["PACKED_ATTENTION", "attention_for", "causal_lm_loss", "for_inference", "prepare_for_training",
           "register_packed_attention"]


def prepare_for_training(model, device, sharding=None):
    """Apply the measured kernels to a peft model for `device`; returns (the head the loss projects with, or
    None for the usual logits, the names of the pieces that are on, for the run's banner).

    Under an engine that shards the weights (`sharding` "zero3", "fsdp2": utils/model/distributed), a weight is whole
    only inside its own module's forward, where the engine's hooks gather it. The fused LoRA layer reads its
    base layer's weight from the parent's forward and the loss reads lm_head's after the model's: both step
    aside, and the banner says so. The packed attention and the norms read no weight of another module.
    """
    attention = getattr(model.config, "_attn_implementation", None)
    on = ["packed attention" + (" (FlashAttention-2)" if attention == "flash_attention_2" else "")] if attention in (
        PACKED_ATTENTION, "flash_attention_2") else []
    on.append("loss on supervised tokens")
    if device != "cpu":
        return None, on
    sharded = sharding in ("zero3", "fsdp1", "fsdp2")
    if not sharded and fast_lora(model):
        on.append("fused LoRA")
    if fast_norms(model):
        on.append("fused RMSNorm")
    head = None if sharded else project_in_loss(model)
    if head is not None:
        on.append("loss without logits")
    if sharded:
        on.append(f"off under {sharding} (they read weights it shards): fused LoRA, loss without logits")
    return head, on


def for_inference(model):
    """Undo prepare_for_training, for decoding with the trained model: the library's own forwards again (lm_head's
    logits among them), peft's casting of each LoRA input to the LoRA weights' dtype (autocast did it in training),
    sdpa attention in place of the packed kind, the KV cache on, eval mode."""
    for module in model.modules():
        forward = module.__dict__.get("forward")
        if getattr(getattr(forward, "__func__", None), "__module__", "").startswith("utils.train.fast"):
            del module.forward
        if hasattr(module, "cast_input_dtype_enabled"):  # fast_lora turned it off
            module.cast_input_dtype_enabled = True
    if getattr(model.config, "_attn_implementation", None) == PACKED_ATTENTION:
        model.set_attn_implementation("sdpa")
    model.config.use_cache = True
    model.eval()
