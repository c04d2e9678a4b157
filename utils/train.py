"""The fast training path: block-diagonal attention for packed rows, and the loss on supervised tokens only.

A packed row holds several examples; position_ids restart at 0 at each one. Rather than build an L x L mask
(quadratic in the row's length), `packed_sdpa` runs causal SDPA on each example's slice. The collator also
sends `logits_to_keep`, the positions whose next token is supervised, so lm_head and the cross-entropy run
only there: prompt tokens never reach the vocabulary projection.
"""
import torch
import torch.nn.functional as F

from utils.data import IGNORE

PACKED_ATTENTION = "lora_kit_packed_sdpa"


def packed_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, position_ids=None, **kwargs):
    """Causal SDPA per packed example when position_ids mark several in one row; plain sdpa otherwise.

    The row is split into its examples (split's backward is one concatenation, where slicing adds a
    zero-filled full-row gradient per example). On a CPU the attention itself runs in fp32: PyTorch's
    CPU flash-attention kernel is faster in fp32 than in bf16, backward included (79 vs 106 ms per layer
    for 8 alpaca examples on the built-in model), and its softmax is then exact to fp32.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if position_ids is None or query.shape[0] != 1 or key.shape[2] != query.shape[2]:  # padded batch, or decoding
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    if starts[:1] != [0]:
        starts = [0] + starts
    lengths = [end - start for start, end in zip(starts, starts[1:] + [query.shape[2]])]
    dtype = query.dtype
    if query.device.type == "cpu":
        query, key, value = query.float(), key.float(), value.float()
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: share each key/value head among its query heads
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    parts = [F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, scale=scaling)
             for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2))]
    return torch.cat(parts, dim=2).transpose(1, 2).to(dtype).contiguous(), None


def register_packed_attention():
    """Make PACKED_ATTENTION a valid attn_implementation (masks as for sdpa, used only for padded batches)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(PACKED_ATTENTION, packed_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_ATTENTION, sdpa_mask)


def causal_lm_loss(outputs, labels, num_items_in_batch=None):
    """Summed next-token cross-entropy over supervised tokens, divided by their count (Trainer's
    num_items_in_batch, which spans gradient accumulation and devices, when given).

    With logits_to_keep the logits cover only supervised positions, in order; otherwise all positions.
    """
    logits = outputs["logits"]
    if logits.shape[1] == labels.shape[1]:
        logits, targets = logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
    else:
        targets = labels[:, 1:][labels[:, 1:] != IGNORE]
        logits = logits.flatten(0, 1)
    loss = F.cross_entropy(logits.float(), targets.to(logits.device), ignore_index=IGNORE, reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else (targets != IGNORE).sum().clamp(min=1)
    return loss / count


def lora_under_autocast(model):
    """Let autocast run the LoRA matmuls in bf16 (or fp16) while their weights and optimizer state stay fp32.

    PEFT casts each LoRA layer's input to its fp32 weights' dtype, so every projection of every layer paid
    for an fp32 copy of its input and fp32 matmuls: turning that off took the built-in model's packed step
    from 173 to 216 tokens/s. Only for forwards under autocast (Trainer's bf16=True or fp16=True).
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False


def attention_for(device):
    """FlashAttention-2 (varlen over the packed examples) on a GPU where it is installed, else ours."""
    import importlib.util

    if device == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return PACKED_ATTENTION


def throughput_callback():
    """A TrainerCallback that measures real (non-pad) tokens per second after the first update (warm-up)."""
    import time

    from transformers import TrainerCallback

    class Throughput(TrainerCallback):
        start = None
        tokens_per_second = None

        def on_step_end(self, args, state, control, **kwargs):
            if self.start is None:
                self.start = (time.perf_counter(), state.num_input_tokens_seen, state.global_step)
            else:
                seconds = time.perf_counter() - self.start[0]
                self.tokens_per_second = (state.num_input_tokens_seen - self.start[1]) / max(seconds, 1e-9)

    return Throughput()


def needs_checkpointing(config, tokens_per_step, dtype_bytes, device):
    """Whether the activations of the largest step would not fit in free memory without recomputation.

    The estimate counts what the backward pass keeps per token and layer (the inputs of the norms, the
    projections and the MLP, about (10·hidden + 4·intermediate) values) plus fp32 logits and their gradient,
    against 70% of the memory free once the model is loaded.
    """
    from utils.memory import available_memory

    per_token = config.num_hidden_layers * (10 * config.hidden_size + 4 * config.intermediate_size) * dtype_bytes
    need = tokens_per_step * (per_token + 8 * config.vocab_size)
    if device == "cuda":
        free = torch.cuda.mem_get_info()[0]
    else:
        free = available_memory()
    return need > 0.7 * free
