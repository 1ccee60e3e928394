"""Choosing the RE-Control grid point on held-out prompts (``eval --tune-holdout`` or
``--tune-prompts``).

Why: the grid row with the best reward on the evaluation's own prompts was chosen on the
very numbers it reports, so its gain over base is optimistic (the largest of several noisy
means), and so are the combinations (RE-Control + Best-of-N, + prompting) run at that
point. Tuned, the grid runs on prompts the report does not use, one point is chosen there,
and the evaluation runs that point alone: its row is an honest estimate, as the paper's
hyperparameters, like any, are meant to be chosen on data other than the test's.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, NamedTuple, Sequence

from ..config import DEFAULT_HEAD
from ..logs import get_logger
from ..training.common import DataError, RecontrolError
from ..training.prompts import load_prompts
from .engines import PROMPT_SET, PromptOrigin

if TYPE_CHECKING:
    from .methods import MethodResult

logger = get_logger(__name__)
TUNE_SOURCE = "the tuning prompts"  # --tune-prompts' prompts, in messages


class HeldOut(NamedTuple):
    """Indices into the loaded prompts, each list in their order."""

    evaluated: list[int]
    tuning: list[int]


def hold_out(count: int, held: int, seed: int) -> HeldOut:
    """``held`` of ``count`` prompts drawn with ``seed`` to choose the point on, the rest
    evaluated; a prompt's seed in generation follows its index here either way, so an
    evaluated prompt samples as it would in an evaluation of all of them."""
    if isinstance(held, bool) or not isinstance(held, int) or held < 1:
        raise RecontrolError(f"tune_holdout must be a whole number of prompts >= 1, got "
                             f"{held!r}")
    if held >= count:
        raise RecontrolError(f"tune_holdout {held} holds out every one of the {count} "
                             f"prompts, leaving none to evaluate: hold out fewer, or "
                             f"evaluate more prompts")
    tuning = sorted(random.Random(seed).sample(range(count), held))
    chosen = set(tuning)
    return HeldOut([i for i in range(count) if i not in chosen], tuning)


def check_min_diversity(value: Any) -> float | None:
    """``tune_min_diversity``: None, or a finite share > 0 of base's diversity."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value) or value <= 0:
        raise RecontrolError(f"tune_min_diversity must be a finite number > 0 (a share of "
                             f"base's diversity on the tuning prompts, e.g. 0.9), got "
                             f"{value!r}")
    return float(value)


def eligible(row: MethodResult, base: MethodResult, min_diversity: float | None) -> bool:
    """Whether a grid row keeps at least ``min_diversity`` x base's diversity (always, with
    no floor): reward hacking shows as repeated text before it shows in the reward."""
    return min_diversity is None or row.diversity >= min_diversity * base.diversity


def choose_point(base: MethodResult, grid: Sequence[MethodResult],
                 min_diversity: float | None = None) -> MethodResult:
    """The grid row of highest mean reward among the eligible ones (``eligible``); the
    first in grid order among equals."""
    candidates = [row for row in grid if eligible(row, base, min_diversity)
                  and not math.isnan(row.reward)]
    if not candidates and min_diversity is None:
        raise RecontrolError("no grid point has a mean reward on the tuning prompts")
    if not candidates:
        seen = ", ".join(f"{point_label(row)}: {row.diversity:.3f}" for row in grid)
        raise RecontrolError(
            f"no grid point kept diversity >= {min_diversity:g} x base's "
            f"({base.diversity:.3f}) on the tuning prompts ({seen}): lower "
            f"--tune-min-diversity, or add smaller edits (alpha, steps, norm=R) to the grid")
    best = max(row.reward for row in candidates)
    return next(row for row in candidates if row.reward == best)


def point_label(row: Any) -> str:
    """``alpha 1, 30 steps`` with the head and radius when they are not the defaults."""
    label = f"alpha {row.alpha:g}, {row.steps} steps"
    label += f", head {row.head}" if row.head != DEFAULT_HEAD else ""
    label += f", norm {row.max_norm:g}" if row.max_norm is not None else ""
    return label


def grid_entry(row: MethodResult) -> list[Any]:
    """The chosen point as a ``--grid`` entry (``parse_grid``'s list form)."""
    entry: list[Any] = [row.alpha, row.steps, row.head]
    return entry + [row.max_norm] if row.max_norm is not None else entry


def selection_record(base: MethodResult, grid: Sequence[MethodResult], chosen: MethodResult,
                     where: str, prompts: int, overlap: int,
                     min_diversity: float | None) -> dict[str, Any]:
    """What eval.json says about the choice: where and on how many prompts, by what rule,
    every grid row there and which one won."""
    def row(r: MethodResult) -> dict[str, Any]:
        return {"alpha": r.alpha, "steps": r.steps, "head": r.head, "max_norm": r.max_norm,
                "reward": r.reward, "reward_ci95": list(r.reward_ci95),
                "win_rate": r.win_rate, "gain_ci95": list(r.gain_ci95),
                "diversity": r.diversity, "coherence": r.coherence,
                "eligible": eligible(r, base, min_diversity)}

    return {"on": where, "prompts": prompts, "also_evaluated": overlap,
            "rule": "highest mean reward" + (f" among points keeping diversity >= "
                                             f"{min_diversity:g} x base's"
                                             if min_diversity is not None else ""),
            "min_diversity": min_diversity,
            "base": {"reward": base.reward, "diversity": base.diversity},
            "grid": [row(r) for r in grid],
            "chosen": {"alpha": chosen.alpha, "steps": chosen.steps, "head": chosen.head,
                       "max_norm": chosen.max_norm},
            "report": "tune/eval.md"}


def selection_line(record: dict[str, Any]) -> str:
    """The line under the evaluation's table that says where its point came from."""
    overlap = record["also_evaluated"]
    warning = (f" (WARNING: {overlap} of them are also evaluation prompts)" if overlap
               else "")
    chosen = point_label(SimpleNamespace(**record["chosen"]))
    return (f"\nRE-Control's point ({chosen}) was chosen on {record['prompts']} prompts "
            f"{record['on']}{warning}, by {record['rule']}; the grid's rows there: "
            f"{record['report']}")


def chosen_line(record: dict[str, Any]) -> str:
    """The line under the tuning table: which point the evaluation runs (../eval.md)."""
    chosen = point_label(SimpleNamespace(**record["chosen"]))
    return f"\nChosen here by {record['rule']}, and evaluated in ../eval.md: {chosen}"


class PromptPlan(NamedTuple):
    """Which prompts are evaluated and which the grid point is chosen on."""

    prompts: list[str]              # evaluated
    numbers: list[int]              # their indices in --prompts (their seeds follow them)
    tuning: list[str]               # the point is chosen on these ([]: not tuned)
    tuning_origins: list[PromptOrigin]
    where: str                      # where the tuning prompts came from, for the report
    overlap: int                    # tuning prompts that are also evaluated (same text)

    @property
    def tuned(self) -> bool:
        return bool(self.tuning)

    @property
    def tuning_numbers(self) -> list[int]:
        """The tuning prompts' indices in their source (their seeds follow them)."""
        return [origin.number for origin in self.tuning_origins]

    @property
    def origins(self) -> list[PromptOrigin]:
        """Every engine prompt's origin: the evaluated ones, then the tuning ones."""
        return [PromptOrigin(PROMPT_SET, n) for n in self.numbers] + self.tuning_origins


def check_tuning_options(opts: Any) -> None:
    """The tuning options fit together, before anything loads."""
    check_min_diversity(opts.tune_min_diversity)
    held = opts.tune_holdout
    if held is None or isinstance(held, bool) or not isinstance(held, int) or held < 0:
        raise RecontrolError(f"tune_holdout must be a whole number of prompts (0: none held "
                             f"out), got {held!r}")
    if opts.tune_prompts is not None and not str(opts.tune_prompts).strip():
        raise RecontrolError("--tune-prompts is empty: give a datasets name or a prompt file, "
                             "or leave the option out")
    if opts.max_tune_prompts is not None and (
            isinstance(opts.max_tune_prompts, bool) or opts.max_tune_prompts < 1):
        raise RecontrolError(f"--max-tune-prompts must be a positive integer, got "
                             f"{opts.max_tune_prompts!r}")
    if opts.tune_prompts and opts.tune_holdout:
        raise RecontrolError("give --tune-prompts or --tune-holdout, not both: the point is "
                             "chosen on other prompts, or on prompts held out of --prompts")
    if opts.tune_seed is not None and not opts.tune_holdout:
        raise RecontrolError("--tune-seed draws the --tune-holdout prompts: give --tune-holdout "
                             "N too (--tune-prompts are taken as they are)")
    if not opts.tune_prompts and (opts.tune_split or opts.max_tune_prompts is not None):
        raise RecontrolError("--tune-split and --max-tune-prompts are for --tune-prompts")
    if not (opts.tune_prompts or opts.tune_holdout) and opts.tune_min_diversity is not None:
        raise RecontrolError("--tune-min-diversity is a rule for choosing the point on "
                             "held-out prompts: give --tune-holdout N or --tune-prompts too")


def plan_prompts(opts: Any, prompts: list[str]) -> PromptPlan:
    """The evaluated prompts and the tuning ones: ``tune_holdout`` of ``prompts`` drawn with
    ``tune_seed`` (default: the seed), or ``tune_prompts`` loaded as ``--prompts`` is (its
    split defaults to validation), or none."""
    every = list(range(len(prompts)))
    if opts.tune_holdout:
        seed = opts.seed if opts.tune_seed is None else opts.tune_seed
        held = hold_out(len(prompts), opts.tune_holdout, seed)
        tuning = [prompts[i] for i in held.tuning]
        plan = PromptPlan([prompts[i] for i in held.evaluated], held.evaluated, tuning,
                          [PromptOrigin(PROMPT_SET, i) for i in held.tuning],
                          f"held out of --prompts (drawn with seed {seed})", 0)
    elif opts.tune_prompts:
        a_file = Path(opts.tune_prompts).is_file()
        if a_file and opts.tune_split:
            raise RecontrolError(f"--tune-prompts {opts.tune_prompts} is a file: it has no "
                                 f"splits, so --tune-split {opts.tune_split!r} selects "
                                 f"nothing; leave --tune-split out")
        # --data-dir selects within --prompts' data set; a file has none
        try:
            tuning = load_prompts(opts.tune_prompts, opts.tune_split, opts.prompt_column,
                                  opts.prompt_format, None if a_file else opts.data_dir,
                                  opts.max_tune_prompts, default_split="validation")
        except DataError as exc:
            raise DataError(f"--tune-prompts: {exc}") from exc
        split = "" if a_file else f", split {opts.tune_split or 'validation'}"
        plan = PromptPlan(prompts, every, tuning,
                          [PromptOrigin(TUNE_SOURCE, i) for i in range(len(tuning))],
                          f"of --tune-prompts {opts.tune_prompts}{split}", 0)
    else:
        return PromptPlan(prompts, every, [], [], "", 0)
    evaluated = set(plan.prompts)
    overlap = sum(text in evaluated for text in plan.tuning)
    if overlap:
        logger.warning("eval: %d of the %d tuning prompts are also evaluation prompts (the "
                       "same text): the point is not chosen on held-out prompts alone",
                       overlap, len(plan.tuning))
    return plan._replace(overlap=overlap)
