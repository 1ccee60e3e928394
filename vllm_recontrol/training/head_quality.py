"""Warnings about a trained value head's recorded metrics, shared by ``train`` and ``inspect``.

Why: a head saves and loads whatever it learned, and an engine steers with it either way. A
head that predicts the reward no better than a constant, or whose V(s_0) falls as the reward
rises, has a gradient that points nowhere useful (or the wrong way), and a metric taken over a
handful of prompts says little either way. Nothing is refused: the numbers come from the
user's own split, and a weak head can still be worth trying, but it should not pass unnoticed.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

FEW_PROMPTS = 20  # below this, V(s_0)'s correlation (one value per prompt) is mostly noise


def quality_warnings(metrics: Mapping[str, Any]) -> list[str]:
    """One sentence per problem found in ``train``'s recorded metrics (absent ones, and
    values of another type than ``train`` writes: none, since a head's metadata is free-form
    and may be hand-written)."""
    warnings = []
    split = _split_name(metrics.get("split"))
    mse, trivial = _number(metrics.get("mse")), _number(metrics.get("trivial_mse"))
    if mse is not None and trivial is not None and mse >= trivial:
        warnings.append(
            f"the head predicts the reward no better than a constant ({split} MSE of V(s_t) "
            f"{mse:.4g} >= {trivial:.4g}, the training states' mean reward's): its gradient "
            "is unlikely to steer toward higher reward; more prompts, more epochs or another "
            "--target may help")
    pearson = _number(metrics.get("pearson_s0"))
    if pearson is not None and pearson <= 0:
        warnings.append(
            f"V(s_0) does not rise with the reward ({split} Pearson r = {pearson:.3g}): "
            "steering by this head may lower the reward")
    prompts = metrics.get("prompts")
    if isinstance(prompts, int) and not isinstance(prompts, bool) and prompts < FEW_PROMPTS:
        warnings.append(
            f"the {split} metrics rest on {prompts} prompt(s) (V(s_0) takes one value per "
            f"prompt): hold out more (--heldout-fraction) or collect more prompts to trust them")
    return warnings


def _split_name(split: Any) -> str:
    """How the warnings name the metrics' split: ``train`` writes "heldout" or a sentence;
    anything else is not a name."""
    if split is None or split == "heldout":
        return "held-out"
    return split if isinstance(split, str) else "recorded"


def _number(value: Any) -> float | None:
    """``value`` as a finite float, or None (not a number, or past float's range)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer of more than 308 digits
        return None
    return number if math.isfinite(number) else None
