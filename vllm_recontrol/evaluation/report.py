"""What ``eval`` writes: the table (eval.md), eval.json, every response (responses.jsonl)
and the plots, for the evaluation and for a tuning run's grid (``OUT/tune``)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..config import DEFAULT_HEAD
from ..files import write_text_atomic
from ..training.common import write_jsonl_atomic
from .llm_judge import JUDGE_TEMPLATE
from .methods import MethodResult
from .metrics import BOOTSTRAP_RESAMPLES, Coherence, word_tokenizer
from .plots import PLOT_FILES, save_plots
from .selection import point_label, selection_line

if TYPE_CHECKING:
    from ..training.rewards import RewardSource
    from .evaluate import EvalOptions

RESPONSES_FILE = "responses.jsonl"  # every returned response, beside eval.json
TUNE_DIR = "tune"  # the grid on the tuning prompts: its report and kept methods


def interval_lines(results: Sequence[MethodResult]) -> list[str]:
    """The intervals under the table, one line per method."""
    lines = ["\n95 % bootstrap intervals over the prompts "
             f"({BOOTSTRAP_RESAMPLES} resamples): mean reward; win rate vs. base; mean reward "
             "gain over base (paired)"]
    for r in results:
        (lo, hi), (wlo, whi), (glo, ghi) = r.reward_ci95, r.win_rate_ci95, r.gain_ci95
        point = f" {r.alpha:g}/{r.steps}" if r.steps else ""
        point += f" ({r.head})" if r.head != DEFAULT_HEAD else ""
        point += f" norm {r.max_norm:g}" if r.max_norm is not None else ""
        lines.append(f"- {r.method}{point}: [{lo:.4f}, {hi:.4f}]; [{wlo:.3f}, {whi:.3f}]; "
                     f"[{glo:+.4f}, {ghi:+.4f}]")
    return lines


def markdown_table(results: Sequence[MethodResult], coherence: Coherence,
                   judge_against: str = "base") -> str:
    """One row per method; a ``head`` column only when some row used a further value head,
    a ``max_norm`` column only when some row had one, a judge column only when an LLM judge
    ran."""
    base = results[0]
    heads = any(r.head != DEFAULT_HEAD for r in results)
    norms = any(r.max_norm is not None for r in results)
    judged = any(r.judge for r in results)
    columns = ["method", *(["head"] if heads else []), "alpha", "steps",
               *(["max_norm"] if norms else []), "N", "reward",
               "win vs. base", *([f"judge win vs. {judge_against}"] if judged else []),
               "diversity", "coherence", "generated tok/s", "delivered tok/s",
               "delivered vs. base"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in results:
        coh = f"{r.coherence:.3f}" if r.coherence is not None else "n/a"
        head = [r.head if r.steps else "-"] if heads else []
        judge = [judge_cell(r.judge)] if judged else []
        norm = [f"{r.max_norm:g}" if r.max_norm is not None else "-"] if norms else []
        marks = (" *" if r.reused else "") + (" +" if r.overlapped else "")
        cells = [r.method + marks, *head, f"{r.alpha:g}", str(r.steps), *norm, str(r.n),
                 f"{r.reward:.4f}",
                 f"{r.win_rate:.3f}", *judge, f"{r.diversity:.3f}", coh, f"{r.tokens_per_s:.1f}",
                 f"{r.delivered_per_s:.1f}", f"{r.delivered_per_s / base.delivered_per_s:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += interval_lines(results)
    if any(r.reused for r in results):
        lines.append("\n* read back from a previous run of this evaluation (OUT/methods), "
                     "or its samples scored again: its tok/s were measured then, perhaps on "
                     "other engines")
    if any(r.overlapped for r in results):
        lines.append("\n+ generated while an earlier method was being scored "
                     "(--overlap-scoring): its tok/s are lower than alone, by how much the "
                     "scoring took from the machine")
    lines.append(f"\ndiversity: word tokens by {word_tokenizer()[1]}")
    if not coherence.available:
        lines.append(f"coherence: unavailable ({coherence.unavailable_reason})")
    return "\n".join(lines)


def judge_cell(judge: dict | None) -> str:
    if judge is None:
        return "n/a"
    notes = [f"{judge['invalid']} invalid"] if judge["invalid"] else []
    if "agrees_with_reward" in judge:
        notes.append(f"agrees {judge['agrees_with_reward']:.2f}")
    return f"{judge['win_rate']:.3f}" + (f" ({', '.join(notes)})" if notes else "")


def finite_or_null(value: Any) -> Any:
    """``value`` with every non-finite float (in dicts, lists, tuples) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def combination_note(results: Sequence[MethodResult]) -> list[str]:
    """Without tuning, the combination rows (RE-Control + Best-of-N, + prompting) use the
    grid point of best reward on the very prompts reported: say so."""
    grid = [r for r in results if r.method == "re-control"]
    combined = [r for r in results if r.method.startswith("re-control +")]
    if not combined or len(grid) < 2:
        return []
    return [f"\nThe re-control + rows use the grid point of highest reward on these same "
            f"prompts ({point_label(combined[0])}): chosen on the numbers reported, so they "
            f"are optimistic; --tune-holdout N or --tune-prompts choose it on other prompts"]


def remove_report(folder: Path) -> None:
    """Remove a report that would read as this run's though an earlier run wrote it: an
    untuned run's ``tune/``, or the evaluated prompts' report when tuning chose no point.
    Kept methods stay, for a later run."""
    for name in ("eval.json", "eval.md", RESPONSES_FILE, *PLOT_FILES):
        (folder / name).unlink(missing_ok=True)


def write_report(opts: EvalOptions, prompts: Sequence[str], results: Sequence[MethodResult],
                 coherence: Coherence, source: RewardSource, judged: bool,
                 numbers: Sequence[int] | None = None,
                 selection: dict[str, Any] | None = None, note: str = "") -> dict[str, Any]:
    """Write eval.json, eval.md, the responses and the plots under ``opts.out``; return the
    report (with the table and the files' paths). ``judged``: the judge's verdicts are in
    ``results`` (before it runs, its prompt is not recorded yet). ``numbers``: the prompts'
    indices in their source (held-out prompts skip some); ``selection``: how the grid point
    was chosen on tuning prompts (``selection_record``); ``note``: lines for under the
    table."""
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    numbers = list(range(len(prompts))) if numbers is None else list(numbers)
    table = markdown_table(results, coherence, opts.judge_against)
    table += selection_line(selection) if selection else "".join(combination_note(results))
    table += note
    report = {
        "options": {k: v for k, v in asdict(opts).items() if k != "reward_fn"} |
                   {"reward_fn": source.describe()},
        "num_prompts": len(prompts),
        **({"prompt_numbers": numbers} if numbers != list(range(len(prompts))) else {}),
        "selection": selection,
        "coherence": {"model": coherence.model_name, "available": coherence.available,
                      "reason": coherence.unavailable_reason},
        "diversity_tokens": word_tokenizer()[1],
        "judge_prompt": JUDGE_TEMPLATE if judged else None,
        "results": [{k: v for k, v in asdict(r).items() if k != "responses"} |
                    {"tokens_per_s": r.tokens_per_s, "delivered_per_s": r.delivered_per_s,
                     "examples": r.responses[:5]}
                    for r in results],
    }
    # strict JSON: NaN (a judge with no valid verdict, a metric of no data) is written null
    write_text_atomic(out / "eval.json", json.dumps(finite_or_null(report), indent=2,
                                                    default=str, allow_nan=False))
    write_text_atomic(out / "eval.md", table + "\n")
    write_responses(out / RESPONSES_FILE, prompts, results, numbers)
    report["responses"] = str(out / RESPONSES_FILE)
    report["plots"] = [str(p) for p in save_plots(results, out)]
    report["table"] = table
    return report


def write_responses(path: Path, prompts: Sequence[str], results: Sequence[MethodResult],
                    numbers: Sequence[int] | None = None) -> None:
    """Every method's returned response to every prompt, as the reward saw it (cut at a
    hallucinated turn), with its reward: one JSON object per line, methods in the table's
    order. eval.json keeps five examples per method; this file is for reading the answers
    themselves, rescoring them with another reward, or a human review. ``prompt_index``
    is the prompt's index in its source (``numbers``; default 0, 1, ...)."""
    numbers = list(range(len(prompts))) if numbers is None else list(numbers)
    rows = []
    for r in results:
        method = {"method": r.method, "alpha": r.alpha, "steps": r.steps, "head": r.head,
                  "n": r.n, "prompting": r.prompting, "max_norm": r.max_norm}
        rows += [finite_or_null(method | {"prompt_index": index, "prompt": prompt,
                                          "response": response, "reward": reward})
                 for index, prompt, response, reward in zip(
                     numbers, prompts, r.responses, r.rewards)]
    write_jsonl_atomic(path, rows)
