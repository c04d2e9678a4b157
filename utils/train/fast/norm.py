"""LLaMA-style RMSNorm in fewer passes, keeping less for the backward."""
import types

import torch

# RMSNorm classes whose forward is LlamaRMSNorm's, line for line (a test checks each against it).
LLAMA_RMS_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "MixtralRMSNorm", "Qwen2RMSNorm", "Qwen2MoeRMSNorm",
                   "Qwen3RMSNorm", "Qwen3MoeRMSNorm", "Phi3RMSNorm", "SmolLM3RMSNorm", "GraniteRMSNorm",
                   "MinistralRMSNorm", "GlmRMSNorm"}


def fast_norms(model):
    """Run every LLaMA-style RMSNorm of the model as `_RMSNorm`; returns how many."""
    norms = [m for m in model.modules() if type(m).__name__ in LLAMA_RMS_NORMS]
    for module in norms:
        module.forward = types.MethodType(
            lambda self, hidden_states: _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon), module)
    return len(norms)


class _RMSNorm(torch.autograd.Function):
    """LlamaRMSNorm, weight * (x / rms(x)).to(x.dtype) with the normalisation in fp32, in fewer passes.

    It keeps x in its own dtype and 1/rms(x) per row for the backward; transformers' version, through
    autograd, keeps two fp32 copies of x as well (a third of a bf16 layer's activation memory), and its
    backward runs op by op in bf16 (timings in bench/RESULTS.md).
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
