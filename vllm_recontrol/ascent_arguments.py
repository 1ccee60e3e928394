"""The arguments ``ValueHead.ascend`` takes, checked before any work: per-row alpha, steps
and radius, and the loop count. Why a module of its own: the checks are the contract every
caller meets (the engine's per-request values, tests, users' scripts), apart from the math.
"""

from __future__ import annotations

import math
import numbers
import reprlib
from typing import Any

import torch

from .config import FLOAT32_MAX, STEPS_LIMIT, as_float32


def checked_radius(max_norm: Any, rows: int) -> float | torch.Tensor | None:
    """``max_norm`` as a float or a ``[rows]`` tensor, refused when it is not positive (or,
    per row, inf for no projection); a CUDA tensor's values are left unchecked (no sync)."""
    if max_norm is None:
        return None
    if isinstance(max_norm, (numbers.Real, str)):  # one radius (NumPy's scalars too)
        if isinstance(max_norm, bool) or not isinstance(max_norm, numbers.Real) or not (
                0 < float(max_norm) <= FLOAT32_MAX):
            raise ValueError(f"max_norm must be a positive finite number, got {max_norm!r}")
        if as_float32(float(max_norm)) == 0.0:
            raise ValueError(f"max_norm {max_norm!r} is 0 in float32, the ascent's precision "
                             "(the edit would vanish)")
        return float(max_norm)
    if isinstance(max_norm, (list, tuple)):  # None: this row is not projected, as in RowControl
        if any(isinstance(value, bool) for value in max_norm):
            raise ValueError(f"per-row max_norm must be numbers, not bools, got {max_norm!r}")
        max_norm = [math.inf if value is None else value for value in max_norm]
    try:
        radius = torch.as_tensor(max_norm, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"per-row max_norm must be numbers (None or inf: unprojected), got "
                         f"{max_norm!r}: {exc}") from exc
    if radius.dim() > 1:
        raise ValueError(f"max_norm must be one radius or one per row, got shape "
                         f"{list(radius.shape)}")
    radius = radius.expand(rows) if radius.dim() == 0 else radius
    if radius.shape[0] != rows:
        raise ValueError(f"max_norm has {radius.shape[0]} entries but states have {rows} rows")
    if radius.device.type == "cpu" and not bool(((radius > 0) & ~radius.isnan()).all()):
        raise ValueError(f"per-row max_norm values must be > 0 (inf: unprojected), got "
                         f"{radius.tolist()}")
    return radius


def host_max_steps(steps: Any) -> int | None:
    """The largest of ``steps`` (checked by ``check_row_controls``) when it is known on the
    host, else None: a CUDA tensor's values would cost a device sync to read."""
    if isinstance(steps, torch.Tensor):
        if steps.device.type != "cpu":
            return None
        values = steps.detach()
    else:
        values = torch.as_tensor(steps, dtype=torch.float64)
    return int(values.max()) if values.numel() else 0


def iteration_count(num_iterations: Any, steps: Any, steps_rows: torch.Tensor) -> int:
    """The ascent's loop count: ``num_iterations`` when it covers every row's steps (a
    smaller count would cut rows short without a word), else counted from the steps."""
    largest = host_max_steps(steps)
    if num_iterations is None:
        if largest is not None:
            return largest
        num_iterations = int(steps_rows.max()) if steps_rows.numel() else 0
    if isinstance(num_iterations, bool) or not isinstance(num_iterations, numbers.Integral) \
            or num_iterations < 0:
        raise ValueError(f"num_iterations must be an integer >= 0 (at least the largest "
                         f"steps), got {num_iterations!r} ({type(num_iterations).__name__})")
    if num_iterations > STEPS_LIMIT:  # a loop that long would hang the caller
        raise ValueError(f"num_iterations must be at most {STEPS_LIMIT} (STEPS_LIMIT), got "
                         f"{num_iterations}")
    if largest is not None and num_iterations < largest:
        raise ValueError(f"num_iterations = {num_iterations} is below the largest steps = "
                         f"{largest}: rows would stop short; pass at least {largest}, or None")
    return int(num_iterations)


def check_row_controls(alpha: Any, steps: Any) -> None:
    """Refuse alpha < 0, non-finite or past float32, and fractional, negative or more than
    ``STEPS_LIMIT`` steps, for Python values and CPU tensors (a CUDA tensor's values are
    left unchecked: no sync; the engine's per-request values are checked when the request
    arrives)."""
    def values(value: Any, name: str) -> torch.Tensor:
        if isinstance(value, bool) or (isinstance(value, torch.Tensor)
                                       and value.dtype == torch.bool):
            raise ValueError(f"{name} must be a number, not a bool ({value!r})")
        if isinstance(value, torch.Tensor):
            return value.detach()
        if isinstance(value, (list, tuple)) and any(isinstance(v, bool) for v in value):
            raise ValueError(f"{name} must be numbers, not bools, got {value!r}")
        try:
            return torch.as_tensor(value, dtype=torch.float64)
        except (TypeError, ValueError, OverflowError, RuntimeError) as exc:
            raise ValueError(f"{name} must be a number or a sequence of numbers, got "
                             f"{value!r}: {exc}") from exc

    alpha_values, steps_values = values(alpha, "alpha"), values(steps, "steps")
    if alpha_values.device.type == "cpu":
        a = alpha_values.double()
        if not bool((torch.isfinite(a) & (a >= 0) & (a <= FLOAT32_MAX)).all()):
            raise ValueError(f"alpha must be finite and >= 0 (a float32), got {alpha!r}")
    if steps_values.device.type == "cpu":
        n = steps_values.double()
        if not bool((torch.isfinite(n) & (n >= 0) & (n == n.round())).all()):
            raise ValueError(f"steps must be whole numbers >= 0, got {steps!r}")
        if not bool((n <= STEPS_LIMIT).all()):
            raise ValueError(f"steps must be at most {STEPS_LIMIT} (STEPS_LIMIT), got "
                             f"{reprlib.repr(steps)}")
