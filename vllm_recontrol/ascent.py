"""Closed-form gradient ascent on an MLP value head (the torch reference and CPU path).

RE-Control edits a state s by u <- u + alpha * grad V(s + u), n times. For a ReLU MLP the
gradient needs only the ReLU masks of one forward pass, so no autograd graph is built: each
step is one forward and one backward chain of matrix products. All arithmetic is float32;
buffers are allocated once per call (``AscentWorkspace``), never inside the step loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

Tensor = torch.Tensor


@dataclass
class MLPWeights:
    """Float32 weights of a ReLU MLP: ``weights[i]`` is ``[out, in]``, the last ``[1, h]``."""

    weights: list[Tensor]
    biases: list[Tensor]

    @property
    def hidden_size(self) -> int:
        return self.weights[0].shape[1]

    @property
    def device(self) -> torch.device:
        return self.weights[0].device


@dataclass
class AscentWorkspace:
    """Buffers for one batch shape, reused by every step of the loop."""

    x: Tensor
    pre: list[Tensor]
    act: list[Tensor]
    mask: list[Tensor]
    back: list[Tensor]
    grad: Tensor
    u: Tensor
    rate: Tensor
    remaining: Tensor
    norm: Tensor

    @classmethod
    def allocate(cls, mlp: MLPWeights, rows: int) -> "AscentWorkspace":
        dev, f32 = mlp.device, torch.float32
        widths = [w.shape[0] for w in mlp.weights[:-1]]
        return cls(
            x=torch.empty(rows, mlp.hidden_size, device=dev, dtype=f32),
            pre=[torch.empty(rows, h, device=dev, dtype=f32) for h in widths],
            act=[torch.empty(rows, h, device=dev, dtype=f32) for h in widths],
            mask=[torch.empty(rows, h, device=dev, dtype=f32) for h in widths],
            back=[torch.empty(rows, h, device=dev, dtype=f32) for h in widths],
            grad=torch.empty(rows, mlp.hidden_size, device=dev, dtype=f32),
            u=torch.zeros(rows, mlp.hidden_size, device=dev, dtype=f32),
            rate=torch.empty(rows, 1, device=dev, dtype=f32),
            remaining=torch.empty(rows, 1, device=dev, dtype=f32),
            norm=torch.empty(rows, 1, device=dev, dtype=f32),
        )

    @property
    def capacity(self) -> int:
        return self.x.shape[0]

    def narrow(self, rows: int) -> "AscentWorkspace":
        """Views of the first ``rows`` rows, so one workspace serves every smaller batch."""
        cut = lambda t: t[:rows]  # noqa: E731 - leading-dim views stay contiguous
        return AscentWorkspace(
            x=cut(self.x), pre=[cut(t) for t in self.pre], act=[cut(t) for t in self.act],
            mask=[cut(t) for t in self.mask], back=[cut(t) for t in self.back],
            grad=cut(self.grad), u=cut(self.u), rate=cut(self.rate), remaining=cut(self.remaining),
            norm=cut(self.norm))


def value_gradient_into(mlp: MLPWeights, ws: AscentWorkspace) -> Tensor:
    """Write grad_x V(x) for ``ws.x`` into ``ws.grad`` (closed form, masks only)."""
    hidden = len(mlp.weights) - 1
    if hidden == 0:  # a linear value function: the gradient is its weight row
        ws.grad.copy_(mlp.weights[0].expand_as(ws.grad))
        return ws.grad
    layer_input = ws.x
    for i in range(hidden):
        torch.addmm(mlp.biases[i], layer_input, mlp.weights[i].t(), out=ws.pre[i])
        torch.clamp_min(ws.pre[i], 0, out=ws.act[i])
        torch.sign(ws.act[i], out=ws.mask[i])  # the ReLU mask as 0/1 floats
        layer_input = ws.act[i]
    # Output layer folded in: dV/da_last = w_out, times the last ReLU mask.
    torch.mul(ws.mask[-1], mlp.weights[-1], out=ws.back[-1])
    for i in range(hidden - 1, 0, -1):
        torch.mm(ws.back[i], mlp.weights[i], out=ws.back[i - 1])
        ws.back[i - 1].mul_(ws.mask[i - 1])
    torch.mm(ws.back[0], mlp.weights[0], out=ws.grad)
    return ws.grad


def ascend_float32(
    mlp: MLPWeights,
    states32: Tensor,
    alpha: Tensor,
    steps: Tensor,
    num_iterations: int,
    max_norm: float | Tensor | None = None,
    workspace: AscentWorkspace | None = None,
) -> Tensor:
    """Return u after ``num_iterations`` steps; row r moves only while ``k < steps[r]``.

    ``states32`` is ``[B, d]`` float32, ``alpha`` ``[B]`` float32, ``steps`` ``[B]`` integer,
    all on the weights' device. ``max_norm`` projects u back onto the ball ||u|| <= max_norm
    after every step (projected gradient ascent); a ``[B]`` tensor gives each row its own
    radius (inf: unprojected, the same bits as no projection). A ``workspace`` of exactly B
    rows is reused (the returned u lives in it); otherwise one is allocated.
    """
    ws = workspace if workspace is not None else AscentWorkspace.allocate(mlp, states32.shape[0])
    ws.u.zero_()
    ws.remaining.copy_(steps.view(-1, 1))
    alpha_col = alpha.view(-1, 1)
    # Tensor constants: a Python scalar in an in-place op allocates a wrapper on every call.
    # torch.full is a fill kernel (torch.tensor would copy from the host: no CUDA graph).
    if isinstance(max_norm, Tensor):
        radius = max_norm.to(torch.float32).view(-1, 1).clamp_min(0.0)
    else:
        radius = (torch.full((1, 1), max_norm, dtype=torch.float32, device=ws.u.device)
                  if max_norm is not None else None)
    for _ in range(num_iterations):
        torch.add(states32, ws.u, out=ws.x)
        value_gradient_into(mlp, ws)
        # 1 while a row has steps left, else 0: rows with fewer steps stop moving.
        torch.clamp(ws.remaining, 0.0, 1.0, out=ws.rate)
        ws.remaining.sub_(ws.rate)
        ws.rate.mul_(alpha_col)
        ws.u.addcmul_(ws.grad, ws.rate)
        if radius is not None:  # u *= min(1, radius / ||u||); inf radius: times exactly 1
            torch.linalg.vector_norm(ws.u, dim=1, keepdim=True, out=ws.norm)
            ws.norm.clamp_min_(1e-30)
            torch.div(radius, ws.norm, out=ws.norm)
            ws.u.mul_(ws.norm.clamp_max_(1.0))
    return ws.u


def as_row_tensor(value: float | int | Sequence | Tensor, rows: int, dtype: torch.dtype,
                  device: torch.device, name: str) -> Tensor:
    """Broadcast a scalar or per-row value to a ``[rows]`` tensor, checking its length."""
    t = torch.as_tensor(value, dtype=dtype, device=device)
    if t.dim() == 0:
        return t.expand(rows).contiguous()
    t = t.reshape(-1)
    if t.shape[0] != rows:
        raise ValueError(f"{name} has {t.shape[0]} entries but states have {rows} rows")
    return t
