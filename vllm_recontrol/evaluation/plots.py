"""Plots of an evaluation: the RE-Control grid, and reward against throughput for every method.

matplotlib is optional (the ``eval`` extra): without it no plot is written and ``evaluate``
says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..config import DEFAULT_HEAD


PLOT_FILES = ("grid.png", "reward_vs_throughput.png")


def save_plots(results: Sequence[Any], out: Path) -> list[Path]:
    """Write ``grid.png`` and ``reward_vs_throughput.png``; return the paths written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    grid, tradeoff = PLOT_FILES
    return [_grid_plot(plt, results, out / grid),
            _tradeoff_plot(plt, results, out / tradeoff)]


def _grid_plot(plt: Any, results: Sequence[Any], path: Path) -> Path:
    base = results[0]
    grid = [r for r in results if r.method == "re-control"]
    labels = ["base"] + [f"a={r.alpha:g}\nn={r.steps}{_suffix(r, chr(10))}" for r in grid]
    rows = [base] + grid
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6, 1.2 * len(rows)), 6), sharex=True)
    top.bar(range(len(rows)), [r.reward for r in rows], color=["grey"] + ["C0"] * len(grid))
    top.set_ylabel("mean reward")
    top.set_title("RE-Control over alpha x steps")
    bottom.plot(range(len(rows)), [r.diversity for r in rows], marker="o", label="diversity")
    if all(r.coherence is not None for r in rows):
        bottom.plot(range(len(rows)), [r.coherence for r in rows], marker="s", label="coherence")
    bottom.set_xticks(range(len(rows)), labels)
    bottom.set_ylabel("quality")
    bottom.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _tradeoff_plot(plt: Any, results: Sequence[Any], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        ax.scatter(r.delivered_per_s, r.reward, s=40)
        label = (r.method if r.method != "re-control" else
                 f"re-control a={r.alpha:g} n={r.steps}{_suffix(r, ' ')}")
        ax.annotate(label, (r.delivered_per_s, r.reward), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    ax.set_xlabel("delivered response tokens / s (same engine, same prompts)")
    ax.set_ylabel("mean reward")
    ax.set_title("reward vs. throughput")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _suffix(result: Any, separator: str) -> str:
    """What tells a RE-Control row from another of the same alpha and steps: its value head
    when it is not the default one, its radius when it has one."""
    head = getattr(result, "head", DEFAULT_HEAD)
    radius = getattr(result, "max_norm", None)
    return ((f"{separator}{head}" if head != DEFAULT_HEAD else "")
            + (f"{separator}|u|<={radius:g}" if radius is not None else ""))
