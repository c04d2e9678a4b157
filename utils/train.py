"""The fast training path: block-diagonal attention for packed rows, the loss on supervised tokens only,
fused LoRA layers and RMSNorm.

A packed row holds several examples; position_ids restart at 0 at each one. Rather than build an L x L mask
(quadratic in the row's length), `packed_sdpa` runs causal attention on each example's slice. The collator
also sends `logits_to_keep`, the positions whose next token is supervised, so lm_head and the cross-entropy
run only there: prompt tokens never reach the vocabulary projection. `project_in_loss` goes one step further
and lets the loss project those rows block by block, so no logits tensor exists. `fast_lora` and
`fast_norms` replace the forward of PEFT's LoRA layers and of the model's RMSNorms with fused autograd
functions that compute the same values.
"""
import types

import torch
import torch.nn.functional as F

from utils.data import IGNORE

PACKED_ATTENTION = "lora_kit_packed_sdpa"


def packed_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, position_ids=None, **kwargs):
    """Causal attention per packed example when position_ids mark several in one row; plain sdpa otherwise.

    The row is split into its examples (split's backward is one concatenation, where slicing adds a
    zero-filled full-row gradient per example). On a CPU in bf16, `causal_attention` below runs each example
    (0.65x the time of PyTorch's CPU flash kernel, forward and backward, for 8 alpaca examples on the
    built-in model). Elsewhere it is PyTorch's SDPA, in fp32 on a CPU, where its flash kernel is faster than
    in bf16 or fp16.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if position_ids is None or query.shape[0] != 1 or key.shape[2] != query.shape[2]:  # padded batch, or decoding
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    if starts[:1] != [0]:
        starts = [0] + starts
    lengths = [end - start for start, end in zip(starts, starts[1:] + [query.shape[2]])]
    if query.device.type == "cpu" and query.dtype == torch.bfloat16 and not (dropout and module.training):
        out = causal_attention(query[0], key[0], value[0], lengths, query.shape[-1] ** -0.5 if scaling is None else scaling)
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
        blocks = [(slice(0, q.shape[2]), kept[0], k, v, kept[1])] if kept else _CausalAttention.blocks(q, k, v, _CausalAttention.CHUNK)
        with torch.autocast(q.device.type, enabled=False):
            for rows, q_rows, keys, values, probs in blocks:
                grad_rows = grad_out[:, :, rows].reshape(q_rows.shape)
                grad_v[:, :keys.shape[1]].baddbmm_(probs.transpose(1, 2), grad_rows)
                grad_scores = torch._softmax_backward_data(torch.bmm(grad_rows, values.transpose(1, 2)), probs, -1, probs.dtype)
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


def causal_lm_loss(outputs, labels, num_items_in_batch=None, head=None, workspace=None):
    """Summed next-token cross-entropy over supervised tokens, divided by their count (Trainer's
    num_items_in_batch, which spans gradient accumulation and devices, when given).

    outputs["logits"] covers the supervised positions in order (the collator's logits_to_keep), or all
    positions. With `head` (see `project_in_loss`) it holds their final hidden states instead, and
    `_LinearCrossEntropy` projects them, keeping its blocks in `workspace` (a dict) from one call to the
    next when given.
    """
    logits = outputs["logits"]
    if logits.shape[1] == labels.shape[1]:
        logits, targets = logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten().to(logits.device)
        if head is not None:
            logits, targets = logits[targets != IGNORE], targets[targets != IGNORE]
    else:
        targets = labels[:, 1:][labels[:, 1:] != IGNORE].to(logits.device)
        logits = logits.flatten(0, 1)
    if head is not None:
        loss = _LinearCrossEntropy.apply(logits, head.weight, targets, workspace)
    else:
        loss = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else (targets != IGNORE).sum().clamp(min=1)
    return loss / count


# Architectures whose logits are exactly lm_head(final hidden states): no soft-capping or logit scale.
PLAIN_HEAD_MODELS = {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "phi3", "olmo", "olmo2", "starcoder2"}


def project_in_loss(model):
    """Have the output projection hand its input rows through, for causal_lm_loss to project (returns the
    head), when it is a frozen bias-free nn.Linear on an architecture in PLAIN_HEAD_MODELS; else None,
    and the model computes its logits as usual (lm_head trained or adapted, or an unknown architecture).

    For training only: the model's "logits" are then the final hidden states of the positions asked for.
    """
    head = model.get_output_embeddings()
    if (type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad
            and model.config.model_type in PLAIN_HEAD_MODELS):
        head.forward = types.MethodType(lambda self, hidden_states: hidden_states, head)
        return head
    return None


def _compute_dtype(device, default):
    """The dtype a layer computes in: autocast's when it is on for the device, else `default`."""
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else default


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of hidden @ weight^T against targets, without the (tokens x vocabulary) logits.

    The logits exist one block of rows at a time, BLOCK values each, in a workspace that a training run
    keeps from call to call (80 MB for BLOCK = 2^23; a memory-first run lets it go). A full-batch
    cross-entropy allocates about 1.3 GB of fp32 logits, log-probabilities and their gradients at every
    step; blocks allocated anew still page-fault (glibc's
    aligned allocations rarely reuse a freed block of the same size): 0.30 s per 1000 supervised tokens
    of the built-in model inside a training step here, 0.19 s with the workspace. The logits' gradient,
    softmax minus one-hot, turns into the hidden states' gradient while its block exists, in the forward;
    the backward only scales it. The matmuls run in the head's dtype, or autocast's (as lm_head would),
    the softmax in fp32.
    """

    BLOCK = 2**23

    @staticmethod
    def forward(ctx, hidden, weight, targets, workspace=None):
        device = hidden.device.type
        # the head's dtype, or autocast's, as lm_head would compute: Trainer calls the loss outside autocast,
        # with the hidden states converted to fp32 (accelerate's convert_outputs_to_fp32)
        dtype = _compute_dtype(device, weight.dtype)
        rows = max(1, _LinearCrossEntropy.BLOCK // weight.shape[0])
        key = (rows, weight.shape[0], dtype, hidden.device)
        workspace = {} if workspace is None else workspace
        if key not in workspace:
            workspace.clear()
            workspace[key] = [torch.empty(rows, weight.shape[0], dtype=t, device=hidden.device) for t in (dtype, torch.float32, torch.float32)]
        logits, logits32, log_probs = workspace[key]
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(device, enabled=False):
            hidden, weight = hidden.to(dtype), weight.to(dtype)
            grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
            for start in range(0, hidden.shape[0], rows):
                block, n = slice(start, start + rows), min(rows, hidden.shape[0] - start)
                torch.mm(hidden[block], weight.t(), out=logits[:n])
                torch.log_softmax(logits32[:n].copy_(logits[:n]), -1, out=log_probs[:n])
                picked = log_probs[:n].gather(1, targets[block, None])
                loss -= picked.sum()
                if grad is not None:
                    probs = log_probs[:n].exp_()
                    probs.scatter_add_(1, targets[block, None], torch.full_like(picked, -1.0))
                    torch.mm(logits[:n].copy_(probs), weight, out=grad[block])
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None, None


def fast_lora(model):
    """Run each LoRA layer of a peft model as one fused step where it can, and its LoRA matmuls in the
    autocast dtype everywhere, with LoRA weights and optimizer state in fp32.

    Over a plain nn.Linear base (frozen, no DoRA, one active adapter, no dropout while training), the layer
    runs `_LoraLinear`: the LoRA product accumulates into the base matmul's output, and in the backward into
    the input gradient's, instead of PEFT's separate scale, add and their backward passes over the whole
    activation. For one 576 x 1536 projection of 1900 tokens in bf16, forward and backward take 5.0 ms
    against PEFT's 10.8 ms (the bare frozen matmul: 3.1 ms). Any other layer (a 4/8-bit base, dropout,
    several adapters) keeps PEFT's forward, but without its fp32 copy of every input under autocast.
    """
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False
        if (type(module) is LoraLinear and type(module.base_layer) is torch.nn.Linear and not module.fan_in_fan_out
                and not module.base_layer.weight.requires_grad):
            module.forward = types.MethodType(_fused_lora_forward, module)


def _fused_lora_forward(self, x, *args, **kwargs):
    """peft's lora.Linear.forward, as `_LoraLinear`, in the cases it covers; peft's own otherwise."""
    adapter = self.active_adapters[0] if len(self.active_adapters) == 1 else None
    dropout = self.lora_dropout[adapter] if adapter in self.lora_dropout else None
    if (args or kwargs or self.disable_adapters or self.merged or adapter not in self.lora_A or adapter in self.lora_variant
            or (isinstance(dropout, torch.nn.Dropout) and dropout.training and dropout.p > 0)
            or self.base_layer.weight.requires_grad or (self.base_layer.bias is not None and self.base_layer.bias.requires_grad)):
        return type(self).forward(self, x, *args, **kwargs)
    return _LoraLinear.apply(x, self.base_layer.weight, self.base_layer.bias, self.lora_A[adapter].weight,
                             self.lora_B[adapter].weight, self.scaling[adapter])


class _LoraLinear(torch.autograd.Function):
    """x W^T + bias + scaling (x A^T) B^T for a frozen W and bias, trainable A (r x in) and B (out x r).

    Computes in the autocast dtype when autocast is on (else in x's dtype), like the layers around it;
    the gradients of A and B come back in their own dtype (fp32).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling):
        device = x.device.type
        dtype = _compute_dtype(device, x.dtype)
        with torch.autocast(device, enabled=False):
            rows = x.reshape(-1, x.shape[-1]).to(dtype)
            w, a, b = weight.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
            down = rows @ a.t()
            out = rows @ w.t() if bias is None else torch.addmm(bias.to(dtype), rows, w.t())
            out.addmm_(down, b.t(), alpha=scaling)
        ctx.save_for_backward(rows, w, a, b, down)
        ctx.scaling, ctx.x_shape, ctx.x_dtype, ctx.lora_dtype = scaling, x.shape, x.dtype, lora_a.dtype
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        rows, w, a, b, down = ctx.saved_tensors
        grad_x = grad_a = grad_b = None
        with torch.autocast(rows.device.type, enabled=False):
            grad = grad.reshape(-1, grad.shape[-1]).to(rows.dtype)
            grad_down = grad @ b
            if ctx.needs_input_grad[0]:
                grad_x = (grad @ w).addmm_(grad_down, a, alpha=ctx.scaling).view(ctx.x_shape).to(ctx.x_dtype)
            if ctx.needs_input_grad[3]:
                grad_a = (grad_down.t() @ rows).mul_(ctx.scaling).to(ctx.lora_dtype)
            if ctx.needs_input_grad[4]:
                grad_b = (grad.t() @ down).mul_(ctx.scaling).to(ctx.lora_dtype)
        return grad_x, None, None, grad_a, grad_b, None


# RMSNorm classes whose forward is LlamaRMSNorm's, line for line (a test checks each against it).
LLAMA_RMS_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "MixtralRMSNorm", "Qwen2RMSNorm", "Qwen2MoeRMSNorm", "Qwen3RMSNorm",
                   "Qwen3MoeRMSNorm", "Phi3RMSNorm", "SmolLM3RMSNorm", "GraniteRMSNorm", "MinistralRMSNorm", "GlmRMSNorm"}


def fast_norms(model):
    """Run every LLaMA-style RMSNorm of the model as `_RMSNorm`; returns how many."""
    norms = [m for m in model.modules() if type(m).__name__ in LLAMA_RMS_NORMS]
    for module in norms:
        module.forward = types.MethodType(lambda self, hidden_states: _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon), module)
    return len(norms)


class _RMSNorm(torch.autograd.Function):
    """LlamaRMSNorm, weight * (x / rms(x)).to(x.dtype) with the normalisation in fp32, in fewer passes.

    It keeps x in its own dtype and 1/rms(x) per row for the backward; transformers' version, through
    autograd, keeps two fp32 copies of x as well (a third of a bf16 layer's activation memory), and its
    backward runs op by op in bf16. Forward and backward of one norm over 1955 x 576 bf16 values: 3.2 ms
    against 4.6.
    """

    @staticmethod
    def forward(ctx, x, weight, eps):
        normed = x.to(torch.float32, copy=True)
        rstd = torch.linalg.vector_norm(normed, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps).rsqrt_()
        out = normed.mul_(rstd).to(x.dtype)
        out = out.mul_(weight) if weight.dtype == out.dtype else weight * out
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        normed = x.to(torch.float32, copy=True).mul_(rstd)
        grad_normed = grad.to(torch.float32, copy=True).mul_(weight)
        mean = torch.linalg.vecdot(grad_normed, normed).unsqueeze_(-1).div_(x.shape[-1])
        grad_x = grad_normed.addcmul_(normed, mean, value=-1).mul_(rstd).to(x.dtype)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * normed.to(x.dtype)).flatten(0, -2).sum(0).to(weight.dtype)
        return grad_x, grad_weight, None


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


def run_loss_callback():
    """A TrainerCallback for the whole run's mean training loss, also after a resume, where the Trainer's own
    `training_loss` covers only the steps of the resumed call. It logs at every checkpoint, so the logged
    windows saved with a checkpoint cover every step before it."""
    from transformers import TrainerCallback

    class RunLoss(TrainerCallback):
        first_step = 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.first_step = state.global_step  # the checkpoint's step when resuming

        def on_step_end(self, args, state, control, **kwargs):
            if control.should_save:
                control.should_log = True

        def mean(self, state, training_loss):
            """(steps before the resume: their logged windows' losses, weighted by length) + this call's mean."""
            before, last = 0.0, 0
            for entry in state.log_history:
                if "loss" in entry and entry["step"] <= self.first_step:
                    before += entry["loss"] * (entry["step"] - last)
                    last = entry["step"]
            steps = state.global_step - self.first_step
            return (before + training_loss * steps) / max(state.global_step, 1)

    return RunLoss()


def needs_checkpointing(config, tokens_per_step, sequence_length, dtype_bytes, device, logits=True):
    """Whether the activations of the largest step would not fit in free memory without recomputation.

    The estimate counts what the backward pass keeps per token and layer on the fast path (the inputs of
    the norms, the projections and the MLP, about 6·hidden + 4·intermediate values, plus the attention
    probabilities an example keeps, heads x its length), plus fp32 logits and their gradient when the loss
    runs on logits, against 70% of the memory free once the model is loaded.
    """
    from utils.memory import available_memory

    heads = config.num_attention_heads * min(sequence_length, _CausalAttention.KEEP_UP_TO)
    per_token = config.num_hidden_layers * (6 * config.hidden_size + 4 * config.intermediate_size + heads) * dtype_bytes
    need = tokens_per_step * (per_token + (8 * config.vocab_size if logits else 0))
    if device == "cuda":
        free = torch.cuda.mem_get_info()[0]
    else:
        free = available_memory()
    return need > 0.7 * free
