"""A float64 autograd reference of the ascent, for the kernel's tests and its GPU check.

Independent of the kernel: plain autograd on the MLP, in float64, optionally rounding where
the kernel's bf16 mode rounds. It also says which rows came close to a ReLU kink, where a
correct reduced-precision result may legitimately take the other side.
"""

from __future__ import annotations

import torch


def _bf16(x: torch.Tensor) -> torch.Tensor:
    """Round float64 values as the kernel does: to fp32, then to nearest-even bf16."""
    return x.float().bfloat16().double()


class _RoundOperand(torch.autograd.Function):
    """Forward: round to bf16. Backward: pass the gradient, rounded too if ``round_grad``.

    Models where the kernel's bf16 mode rounds: the first-layer operand s + u (its gradient,
    the result, stays fp32), the stored activations and the stored backward products.
    """

    @staticmethod
    def forward(ctx, x, round_grad):
        ctx.round_grad = round_grad
        return _bf16(x)

    @staticmethod
    def backward(ctx, grad):
        return (_bf16(grad) if ctx.round_grad else grad), None


def reference_ascent(weights, biases, states, alpha, steps, num_iterations, max_norm=None,
                     emulate_bf16=False, margin=1e-4):
    """u after the ascent in float64 by autograd, and the rows that never came near a kink.

    A row is 'clean' when, at every step where it moves, every hidden pre-activation is at
    least ``margin`` times that layer's RMS away from 0.
    """
    W = [w.double() for w in weights]
    b = [x.double() for x in biases]
    s, alpha, steps = states.double(), alpha.double().to(states.device), steps.long().to(states.device)
    u = torch.zeros_like(s)
    clean = torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
    for k in range(num_iterations):
        moving = (steps > k) & (alpha != 0)
        x = (s + u).detach().requires_grad_(True)
        h = _RoundOperand.apply(x, False) if emulate_bf16 else x
        for Wi, bi in zip(W[:-1], b[:-1]):
            z = h @ Wi.T + bi
            rms = z.detach().pow(2).mean(dim=1, keepdim=True).sqrt()
            near = (z.detach().abs() < margin * rms).any(dim=1)
            clean &= ~(near & moving)
            h = torch.relu(z)
            if emulate_bf16:
                h = _RoundOperand.apply(h, True)
        value = (h @ W[-1].T + b[-1]).sum()
        (grad,) = torch.autograd.grad(value, x)
        u = u + (alpha * (steps > k))[:, None] * grad
        if max_norm is not None:  # a scalar, or one radius per row (inf: unprojected)
            radius = torch.as_tensor(max_norm, dtype=torch.float64, device=s.device)
            norm = u.norm(dim=1, keepdim=True)
            u = u * (radius.reshape(-1, 1) / norm.clamp_min(1e-30)).clamp_max(1.0)
    return u, clean
