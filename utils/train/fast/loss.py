"""The loss on supervised tokens only, and on a CPU without a logits tensor.

The collator sends `logits_to_keep`, the positions whose next token is supervised, so lm_head and the
cross-entropy run only there. `project_in_loss` goes one step further: the output projection hands its rows
through and `_LinearCrossEntropy` projects them block by block, forming the gradient in the forward.
"""
import types

import torch
import torch.nn.functional as F

from utils.data.encoding import IGNORE
from utils.train.fast.precision import compute_dtype


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
PLAIN_HEAD_MODELS = {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "phi3", "olmo",
                     "olmo2", "starcoder2"}


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


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of hidden @ weight^T against targets, without the (tokens x vocabulary) logits.

    The logits exist one block of rows at a time, BLOCK values each, in a workspace that a training run
    keeps from call to call (BLOCK values of fp32; a memory-first run lets it go). A full-batch
    cross-entropy allocates fp32 logits, log-probabilities and their gradients for every supervised token
    at every step; blocks allocated anew still page-fault, since glibc's aligned allocations rarely reuse a
    freed block of the same size (figures in bench/RESULTS.md). The logits' gradient,
    softmax minus one-hot, turns into the hidden states' gradient while its block exists, in the forward;
    the backward only scales it. The matmuls run in the head's dtype, or autocast's (as lm_head would),
    the softmax in fp32. With `per_row_logps` it returns each row's log-probability of its target instead of
    the summed loss (utils/train/preference_loss.sequence_logps sums them per sequence).
    """
    BLOCK = 2**23

    @staticmethod
    def forward(ctx, hidden, weight, targets, workspace=None, per_row_logps=False):
        device = hidden.device.type
        # the head's dtype, or autocast's, as lm_head would compute: Trainer calls the loss outside autocast,
        # with the hidden states converted to fp32 (accelerate's convert_outputs_to_fp32)
        dtype = compute_dtype(device, weight.dtype)
        rows = max(1, _LinearCrossEntropy.BLOCK // weight.shape[0])
        key = (rows, weight.shape[0], dtype, hidden.device)
        workspace = {} if workspace is None else workspace
        if key not in workspace:
            workspace.clear()
            workspace[key] = [torch.empty(rows, weight.shape[0], dtype=t, device=hidden.device)
                              for t in (dtype, torch.float32, torch.float32)]
        logits, logits32, log_probs = workspace[key]
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        rows_out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device) if per_row_logps else None
        with torch.autocast(device, enabled=False):
            hidden, weight = hidden.to(dtype), weight.to(dtype)
            grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
            for start in range(0, hidden.shape[0], rows):
                block, n = slice(start, start + rows), min(rows, hidden.shape[0] - start)
                torch.mm(hidden[block], weight.t(), out=logits[:n])
                torch.log_softmax(logits32[:n].copy_(logits[:n]), -1, out=log_probs[:n])
                picked = log_probs[:n].gather(1, targets[block, None])
                if per_row_logps:
                    rows_out[block] = picked[:, 0]
                else:
                    loss -= picked.sum()
                if grad is not None:
                    probs = log_probs[:n].exp_()
                    probs.scatter_add_(1, targets[block, None], torch.full_like(picked, -1.0))
                    torch.mm(logits[:n].copy_(probs), weight, out=grad[block])
        ctx.save_for_backward(grad)
        ctx.per_row_logps = per_row_logps
        return rows_out if per_row_logps else loss

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors  # the loss's gradient: a row's log-prob has its negative
        scale = -grad_out[:, None] if ctx.per_row_logps else grad_out
        return grad * scale.to(grad.dtype), None, None, None, None
