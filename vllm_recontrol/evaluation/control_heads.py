"""Random value heads as strong as a trained one: the control an evaluation of steering needs.

Why: any edit of the states changes the text, and on a small world a push in any direction
may move a coarse reward as far as a trained head does (a reviewer found a random head that
matched the demo's greedy table exactly). A random head whose gradients are as large as the
trained head's, on the states it was trained on, asks for the same edit size in a direction
that knows nothing of the reward: what the trained head gains over it is what training bought.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence

import torch

from ..value_head import ValueHead


def mean_gradient_norm(head: ValueHead, states: torch.Tensor) -> float:
    """The mean over ``states`` of ||grad_s V(s)||, in float32 (plain autograd: an
    independent check of the ascent's closed form, not a use of it). ``head`` is left as it
    is (``Module.to`` converts in place: a 16-bit head is measured on a float32 copy)."""
    float32 = all(p.dtype == torch.float32 for p in head.parameters())
    reference = head if float32 else copy.deepcopy(head).to(torch.float32)
    points = states.detach().to(torch.float32).requires_grad_(True)
    (gradient,) = torch.autograd.grad(reference(points).sum(), points)
    return float(gradient.norm(dim=1).mean())


def matched_random_head(head: ValueHead, states: torch.Tensor, seed: int) -> ValueHead:
    """A head of ``head``'s shape drawn from ``seed``, its output layer scaled so that its
    mean gradient norm over ``states`` equals ``head``'s (V is linear in that layer, so the
    scale is exact)."""
    target = mean_gradient_norm(head, states)
    random = ValueHead(head.hidden_size, head.widths, seed=seed,
                       metadata={"control": f"random, seed {seed}, gradient norm matched to "
                                            f"{target:.4g} on {states.shape[0]} states"})
    drawn = mean_gradient_norm(random, states)
    if drawn == 0.0:  # every ReLU dead on these states: no direction to scale
        raise ValueError(f"the random head of seed {seed} has no gradient on these states")
    with torch.no_grad():
        random.layers[-1].weight.mul_(target / drawn)
    return random


def save_random_controls(head: ValueHead, states: torch.Tensor, seeds: Sequence[int],
                         folder: Path) -> dict[str, str]:
    """Save one matched random head per seed under ``folder``; their paths by name
    (``random-<seed>``), as ``eval``'s ``value_heads`` takes them."""
    paths = {}
    for seed in seeds:
        name = f"random-{seed}"
        paths[name] = str(matched_random_head(head, states, seed).save(folder / name))
    return paths
