"""PEFT's LoRA layer as one fused step: the frozen matmul, then the LoRA product added into the same output.

The fused forward copies peft's lora.Linear for the cases it covers and hands every other case back to
peft's own forward (tests/test_finetune.py pins the equality and the fallbacks).
"""
import types

import torch

from utils.train.fast.precision import compute_dtype


def fast_lora(model):
    """Run each LoRA layer of a peft model as one fused step where it can, and its LoRA matmuls in the
    autocast dtype everywhere, with LoRA weights and optimizer state in fp32.

    Over a plain nn.Linear base (frozen, no DoRA, one active adapter, no dropout while training), the layer
    runs `_LoraLinear`: the LoRA product accumulates into the base matmul's output, and in the backward into
    the input gradient's, instead of PEFT's separate scale, add and their backward passes over the whole
    activation: about half of PEFT's time (bench/RESULTS.md). Any other layer (a 4/8-bit base, dropout,
    several adapters, a bias on lora_B) keeps PEFT's forward, but without its fp32 copy of every input under
    autocast. Returns how many layers were fused.
    """
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.tuners_utils import BaseTunerLayer

    fused = 0
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False
        if (type(module) is LoraLinear and type(module.base_layer) is torch.nn.Linear and not module.fan_in_fan_out
                and not module.base_layer.weight.requires_grad):
            module.forward = types.MethodType(_fused_lora_forward, module)
            fused += 1
    return fused


def _fused_lora_forward(self, x, *args, **kwargs):
    """peft's lora.Linear.forward, as `_LoraLinear`, in the cases it covers; peft's own otherwise."""
    adapter = self.active_adapters[0] if len(self.active_adapters) == 1 else None
    dropout = self.lora_dropout[adapter] if adapter in self.lora_dropout else None
    if (args or kwargs or self.disable_adapters or self.merged or adapter not in self.lora_A
            or adapter in self.lora_variant
            or (isinstance(dropout, torch.nn.Dropout) and dropout.training and dropout.p > 0)
            or self.lora_B[adapter].bias is not None or self.base_layer.weight.requires_grad
            or (self.base_layer.bias is not None and self.base_layer.bias.requires_grad)):
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
        dtype = compute_dtype(device, x.dtype)
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
