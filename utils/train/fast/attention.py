"""Attention for packed rows: each example attends causally to itself only, without an L x L mask.

A packed row holds several examples; position_ids restart at 0 at each one. `packed_sdpa`, registered with
transformers as PACKED_ATTENTION, runs causal attention on each example's slice: PyTorch's SDPA, or on a CPU
in bf16 `causal_attention`, which keeps short examples' probabilities for the backward (measured in
bench/RESULTS.md). On a GPU with flash-attn installed, FlashAttention-2 varlen is used instead.
"""
import importlib.util

import torch
import torch.nn.functional as F

PACKED_ATTENTION = "lora_kit_packed_sdpa"


def packed_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, position_ids=None, **kwargs):
    """Causal attention per packed example when position_ids mark several in one row; plain sdpa otherwise.

    The row is split into its examples (split's backward is one concatenation, where slicing adds a
    zero-filled full-row gradient per example). On a CPU in bf16, `causal_attention` below runs each example,
    faster there than PyTorch's CPU flash kernel (bench/RESULTS.md). Elsewhere it is PyTorch's SDPA, in fp32
    on a CPU, where its flash kernel is faster than in bf16 or fp16.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if position_ids is None or query.shape[0] != 1 or key.shape[2] != query.shape[2]:  # padded batch, or decoding
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    if starts[:1] != [0]:
        starts = [0] + starts
    lengths = [end - start for start, end in zip(starts, starts[1:] + [query.shape[2]])]
    if query.device.type == "cpu" and query.dtype == torch.bfloat16 and not (dropout and module.training):
        out = causal_attention(query[0], key[0], value[0], lengths,
                               query.shape[-1] ** -0.5 if scaling is None else scaling)
        return out.transpose(0, 1).unsqueeze(0), None
    dtype = query.dtype
    if query.device.type == "cpu":
        query, key, value = query.float(), key.float(), value.float()
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: share each key/value head among its query heads
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    parts = [F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, scale=scaling)
             for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2))]
    return torch.cat(parts, dim=2).transpose(1, 2).to(dtype).contiguous(), None


def causal_attention(query, key, value, lengths, scale):
    """Causal attention over consecutive examples of the given lengths: (heads, tokens, head_dim) query,
    (kv_heads, tokens, head_dim) key and value, grouped-query when there are fewer key/value heads.

    Each example runs as batched matmuls over its key/value heads. Matmuls run in the inputs' dtype with
    fp32 accumulation; the softmax and its backward compute in fp32 internally.
    """
    heads, kv_heads, dim = query.shape[0], key.shape[0], query.shape[-1]
    groups = heads // kv_heads
    with torch.autocast(query.device.type, enabled=False):
        outs = [_CausalAttention.apply((q * scale).view(kv_heads, groups, n, dim), k, v)
                for q, k, v, n in zip(query.split(lengths, 1), key.split(lengths, 1), value.split(lengths, 1), lengths)]
    return torch.cat([o.view(heads, n, dim) for o, n in zip(outs, lengths)], 1)


class _CausalAttention(torch.autograd.Function):
    """One example: query (kv_heads, groups, n, dim), already scaled; key, value (kv_heads, n, dim).

    An example of up to KEEP_UP_TO tokens keeps its softmax probabilities for the backward (heads x n^2
    values, at most 18 kB per token and layer for the built-in model's 9 heads): recomputing them cost
    a third of attention's time. A longer one runs CHUNK query rows at a time: a block's scores cover only
    the keys up to its last row, only the current block's scores exist at any moment, and the backward
    recomputes them, as FlashAttention does, so memory stays linear in the length.
    """

    CHUNK = 128
    KEEP_UP_TO = 1024

    @staticmethod
    def blocks(q, k, v, rows):
        """Yield (row slice, query block, keys so far, values so far, softmax probabilities) per block."""
        kv_heads, groups, n, dim = q.shape
        for start in range(0, n, rows):
            end = min(start + rows, n)
            q_rows = q[:, :, start:end].reshape(kv_heads, groups * (end - start), dim)
            scores = torch.bmm(q_rows, k[:, :end].transpose(1, 2)).view(kv_heads, groups, end - start, end)
            scores[..., start:].add_(_future_mask(end - start, q.dtype, q.device))  # the diagonal block
            probs = torch.softmax(scores.view(kv_heads, groups * (end - start), end), -1)
            yield slice(start, end), q_rows, k[:, :end], v[:, :end], probs

    @staticmethod
    def forward(ctx, q, k, v):
        n = q.shape[2]
        keep = n <= _CausalAttention.KEEP_UP_TO
        out, kept = torch.empty_like(q), []
        for rows, q_rows, _, values, probs in _CausalAttention.blocks(q, k, v, n if keep else _CausalAttention.CHUNK):
            out[:, :, rows] = torch.bmm(probs, values).view(out[:, :, rows].shape)
            if keep:
                kept = [q_rows, probs]
        ctx.save_for_backward(q, k, v, *kept)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, *kept = ctx.saved_tensors
        grad_q, grad_k, grad_v = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        blocks = ([(slice(0, q.shape[2]), kept[0], k, v, kept[1])] if kept
                  else _CausalAttention.blocks(q, k, v, _CausalAttention.CHUNK))
        with torch.autocast(q.device.type, enabled=False):
            for rows, q_rows, keys, values, probs in blocks:
                grad_rows = grad_out[:, :, rows].reshape(q_rows.shape)
                grad_v[:, :keys.shape[1]].baddbmm_(probs.transpose(1, 2), grad_rows)
                grad_scores = torch._softmax_backward_data(torch.bmm(grad_rows, values.transpose(1, 2)), probs, -1,
                                                           probs.dtype)
                grad_q[:, :, rows] = torch.bmm(grad_scores, keys).view(grad_q[:, :, rows].shape)
                grad_k[:, :keys.shape[1]].baddbmm_(grad_scores.transpose(1, 2), q_rows)
        return grad_q, grad_k, grad_v


_MASKS = {}


def _future_mask(n, dtype, device):
    """(n, n) additive mask: -inf above the diagonal (a query row's future keys), 0 elsewhere."""
    if (n, dtype, device) not in _MASKS:
        _MASKS[n, dtype, device] = torch.full((n, n), float("-inf"), dtype=dtype, device=device).triu(1)
    return _MASKS[n, dtype, device]


def register_packed_attention():
    """Make PACKED_ATTENTION a valid attn_implementation (masks as for sdpa, used only for padded batches)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(PACKED_ATTENTION, packed_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_ATTENTION, sdpa_mask)


def attention_for(device):
    """FlashAttention-2 (varlen over the packed examples) on a GPU where it is installed, else ours."""
    if device == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return PACKED_ATTENTION
