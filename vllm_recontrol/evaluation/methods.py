"""What one evaluated method is: its settings (``MethodResult``'s first fields, the grid's
points), its numbers, and the intervals that tell a gain from prompt-sampling noise."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Sequence

from ..config import DEFAULT_HEAD, FLOAT32_MAX, STEPS_LIMIT
from ..training.common import RecontrolError
from .metrics import bootstrap_interval, win_outcomes


@dataclass
class MethodResult:
    method: str
    alpha: float = 0.0
    steps: int = 0
    head: str = DEFAULT_HEAD
    n: int = 1
    prompting: bool = False
    max_norm: float | None = None         # recontrol_max_norm of the controlled requests
    reward: float = math.nan
    win_rate: float = math.nan            # vs. base, per prompt, by the same reward
    reward_ci95: tuple[float, float] = (math.nan, math.nan)    # bootstrap over prompts
    win_rate_ci95: tuple[float, float] = (math.nan, math.nan)  # paired with base's
    # the mean reward gain over base, per prompt (paired): whether a gain is noise
    gain_ci95: tuple[float, float] = (math.nan, math.nan)
    diversity: float = math.nan
    coherence: float | None = None
    generated_tokens: int = 0             # every sample, Best-of-N's discarded ones included
    delivered_tokens: int = 0             # the returned responses only (as generated:
    #                                       a cut-off hallucinated turn still counts)
    seconds: float = 0.0
    responses: list[str] = field(default_factory=list, repr=False)
    rewards: list[float] = field(default_factory=list, repr=False)  # one per prompt
    judge: dict | None = None             # the LLM judge's win rate, counts and verdicts
    reused: bool = False                  # read back from a previous run (its timing too)
    overlapped: bool = False              # generated while an earlier method was scored

    @property
    def key(self) -> str:
        """Names the method uniquely within one evaluation (the judge's order coin)."""
        return (f"{self.method}:{self.alpha!r}:{self.steps}:{self.head}:{self.n}:"
                f"{self.max_norm!r}")  # repr: two grid points 1e-7 apart stay apart

    @property
    def controlled(self) -> bool:
        """Whether the method edits the states (alpha and steps both above 0)."""
        return self.alpha > 0 and self.steps > 0

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds else math.nan

    @property
    def delivered_per_s(self) -> float:
        """Tokens of returned responses per second: what a user gets for the compute."""
        return self.delivered_tokens / self.seconds if self.seconds else math.nan


class GridPoint(NamedTuple):
    alpha: float
    steps: int
    head: str = DEFAULT_HEAD
    max_norm: float | None = None


NORM_FIELD = "norm="


def parse_grid(grid: Any, heads: Sequence[str] = (DEFAULT_HEAD,)) -> list[GridPoint]:
    """``"0.5:10,1:20:mc,2:30:norm=0.5"`` or ``[[0.5, 10], [1, 20, "mc"], [2, 30, None, 0.5]]``
    to GridPoints: after alpha and steps, optionally one of ``heads`` (the default head when
    absent or None) and a ``norm=R`` radius for the requests' ``recontrol_max_norm``."""
    if not isinstance(grid, (str, list, tuple)):
        raise RecontrolError(f"the grid must be a string (alpha:steps,...) or a list of "
                             f"[alpha, steps, ...] entries, got {grid!r}")
    items = grid.split(",") if isinstance(grid, str) else list(grid)
    points = []
    for item in items:
        try:
            if isinstance(item, str):
                parts = [p.strip() for p in item.split(":")]
                norms = [p for p in parts[2:] if p.startswith(NORM_FIELD)]
                names = [p for p in parts[2:] if not p.startswith(NORM_FIELD)]
                if len(norms) > 1 or len(names) > 1:
                    raise ValueError
                head = names[0] if names else DEFAULT_HEAD
                max_norm = float(norms[0][len(NORM_FIELD):]) if norms else None
            else:
                parts = list(item)
                if len(parts) > 4:
                    raise ValueError
                head = parts[2] if len(parts) > 2 and parts[2] is not None else DEFAULT_HEAD
                max_norm = float(parts[3]) if len(parts) > 3 else None
            alpha, steps = float(parts[0]), parts[1]
            if isinstance(steps, float) and steps.is_integer():
                steps = int(steps)  # [1, 20.0] from a JSON grid; [1, 2.5] stays refused
            steps = int(steps) if isinstance(steps, str) else steps
            # what a request may carry (config._as_float): finite, float32 for the ascent
            if isinstance(steps, bool) or not isinstance(steps, int) or \
                    not 1 <= steps <= STEPS_LIMIT or \
                    not 0 <= alpha <= FLOAT32_MAX or (max_norm is not None and
                                                      not 0 < max_norm <= FLOAT32_MAX):
                raise ValueError
        except (ValueError, IndexError, TypeError, OverflowError):
            raise RecontrolError(f"grid entry {item!r} must be alpha:steps[:head][:norm=R] "
                                 f"with finite alpha >= 0, whole steps from 1 to {STEPS_LIMIT} "
                                 "and finite R > 0") \
                from None
        if head not in heads:
            raise RecontrolError(f"grid entry {item!r} names the value head {head!r}; this "
                                 f"evaluation has {list(heads)} (add heads with --value-heads)")
        point = GridPoint(alpha, steps, head, max_norm)
        if point in points:  # it would be reported twice, the copy as read back
            raise RecontrolError(f"grid entry {item!r} repeats an earlier point of the grid")
        points.append(point)
    if not points:
        raise RecontrolError("the RE-Control grid is empty")
    return points


def restore_method(saved: dict[str, Any] | None, prompts: int) -> MethodResult | None:
    """A finished method read back (``FinishedMethods``), or None when there is none or it
    does not fit this release's fields or the prompt count (then the method runs again)."""
    if not saved:
        return None
    try:
        restored = MethodResult(**{**saved, **{name: tuple(saved[name]) for name in
                                               ("reward_ci95", "win_rate_ci95", "gain_ci95")
                                               if name in saved}})
    except (TypeError, KeyError, ValueError):
        return None
    if len(restored.responses) != prompts or len(restored.rewards) != prompts:
        return None
    restored.reused = True
    return restored


def add_intervals(result: MethodResult, base: MethodResult, seed: int) -> None:
    """95 % bootstrap intervals of the mean reward, and, against base, of the win rate and
    of the mean reward gain (paired: one resample of the prompts serves both sides, so a
    gain that holds prompt by prompt is told from noise even where the two methods' reward
    intervals overlap, both moving with how hard the drawn prompts are)."""
    result.reward_ci95 = bootstrap_interval(result.rewards, seed=seed)
    result.win_rate_ci95 = bootstrap_interval(win_outcomes(result.rewards, base.rewards),
                                              seed=seed)
    result.gain_ci95 = bootstrap_interval(reward_gains(result.rewards, base.rewards),
                                          seed=seed)


def reward_gains(rewards: Sequence[float], base: Sequence[float]) -> list[float]:
    """Per prompt: the method's reward minus base's."""
    if len(rewards) != len(base):
        raise ValueError(f"a reward gain needs one reward per prompt on both sides, got "
                         f"{len(rewards)} and {len(base)}")
    return [mine - theirs for mine, theirs in zip(rewards, base)]
