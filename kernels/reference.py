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
            scale = (radius.reshape(-1, 1) / norm.clamp_min(1e-30)).clamp_max(1.0)
            u = u * torch.where((steps > k)[:, None], scale, 1.0)  # rows that took the step
    return u, clean


def gram_reference_ascent(weights, biases, gram, states, alpha, steps, num_iterations,
                          max_norm=None, emulate_bf16=False, margin=1e-4):
    """The Gram form's ascent (``vllm_recontrol.ascent``) in float64, rounding where the
    kernel's bf16 mode rounds when ``emulate_bf16``: the state operand, c's operand copy,
    the stored activations and backward products (``gram`` is used as given: the kernel's
    G). ``max_norm`` (a scalar, or one radius per row) projects as the kernel does: each
    step's factor from c' (c G)^T of the unprojected c' while the row has steps left, its
    last step's from ||c' W1||. Returns
    (u, clean) like ``reference_ascent``; clean rows never came near a kink."""
    rnd = _bf16 if emulate_bf16 else (lambda t: t)
    W = [w.double() for w in weights]
    b = [x.double() for x in biases]
    G = gram.double()
    s = states.double()
    alpha, steps = alpha.double().to(s.device), steps.long().to(s.device)
    radius = (None if max_norm is None else
              torch.as_tensor(max_norm, dtype=torch.float64, device=s.device).reshape(-1, 1))

    def factor(squared):  # min(1, radius / norm), as the kernel computes it
        norm = squared.clamp_min(0.0).sqrt().clamp_min(1e-30)
        return (radius.clamp_min(0.0) / norm).clamp_max(1.0)

    base = rnd(s) @ W[0].T + b[0]
    c = torch.zeros_like(base)
    clean = torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
    for k in range(num_iterations):
        moving = (steps > k) & (alpha != 0)
        image = rnd(c) @ G
        if radius is not None:  # c holds c' here: scale it and its image alike, for the
            # rows with step k to take (a row's last step is projected on u at the end)
            scale = factor((c * image).sum(dim=1, keepdim=True))
            scale = torch.where((steps > k)[:, None], scale, 1.0)
            c, image = scale * c, scale * image
        zs = [base + image]
        acts = [rnd(torch.relu(zs[0]))]
        for Wi, bi in zip(W[1:-1], b[1:-1]):
            zs.append(acts[-1] @ Wi.T + bi)
            acts.append(rnd(torch.relu(zs[-1])))
        for z in zs:
            rms = z.pow(2).mean(dim=1, keepdim=True).sqrt()
            clean &= ~((z.abs() < margin * rms).any(dim=1) & moving)
        g = rnd((zs[-1] > 0).double() * W[-1])  # dV/dz of the last hidden layer
        for i in range(len(zs) - 1, 0, -1):
            g = g @ W[i] * (zs[i - 1] > 0).double()
            if i > 1:
                g = rnd(g)  # the kernel stores backward products, not the one that ends a step
        c = c + (alpha * moving)[:, None] * g
    u = rnd(c) @ W[0]
    if radius is not None:
        u = u * factor(u.pow(2).sum(dim=1, keepdim=True))
    return u, clean
