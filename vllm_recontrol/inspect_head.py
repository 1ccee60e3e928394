"""``vllm-recontrol inspect``: validate value heads and say what they are, before serving them.

Why: an engine refuses a bad head at start-up, and warns about a head trained on another
model, but by then a server is being launched. This runs the same checks (every file, shape
and value; the model's hidden size; the recorded base model) in a second, with no vLLM and no
GPU, and prints what the head's metadata records: how it was trained, on which data, and how
well it predicted the reward on held-out prompts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

from .arguments import join_dash_values
from .errors import RecontrolError
from .training.common import model_state_width, sha256_file, summary_table
from .training.head_quality import quality_warnings
from .head_source import locate_head
from .head_files import WEIGHTS_FILE
from .value_head import ValueHead


def inspect_head(path: str | Path, model: str | None = None,
                 trust_remote_code: bool = False) -> dict[str, Any]:
    """Load ``path`` with every check an engine makes (against ``model`` when given) and
    return a report; a head that an engine would refuse raises ``ValueHeadError``, an
    unreadable model ``RecontrolError``."""
    expected = model_state_width(model, trust_remote_code) if model else None
    folder = locate_head(path)
    head = ValueHead.load(folder, expected_hidden_size=expected)
    meta = head.metadata or {}
    # metadata is free-form (a head may come from anywhere): read only the parts of the
    # shape that `train` writes
    metrics = meta.get("metrics") if isinstance(meta.get("metrics"), dict) else {}
    data = meta.get("data") if isinstance(meta.get("data"), dict) else {}
    report: dict[str, Any] = {
        "path": str(path),
        "hidden_size": head.hidden_size,
        "widths": head.widths,
        "parameters": sum(p.numel() for p in head.parameters()),
        "folder": str(folder),
        "weights_sha256": sha256_file(folder / WEIGHTS_FILE),
        "base_model": head.base_model,
        "trained_by": meta.get("trained_by"),
        "target": meta.get("target"),
        "labels": data.get("labels"),
        "label_source": data.get("label_source"),
        "train_responses": data.get("train_responses"),
        # how the training prompts were written (heads since 2026-12-07): serve alike
        "prompt_format": data.get("prompt_format"),
        "chat_template": data.get("chat_template"),
        "epochs_run": metrics.get("epochs_run"),
        "best_epoch": metrics.get("best_epoch"),
        "kept": metrics.get("kept"),  # how the saved epoch was chosen (heads since 2026-12-06)
        "metrics_split": metrics.get("split"),
        "mse": metrics.get("mse"),
        "trivial_mse": metrics.get("trivial_mse"),
        "pearson_s0": metrics.get("pearson_s0"),
        "metrics_prompts": metrics.get("prompts"),
        "warnings": [],
    }
    if model:
        report["model"] = model
        mismatch = head.base_model_mismatch(model)
        if mismatch:
            report["warnings"].append(mismatch)
    if head.base_model is None:
        report["warnings"].append("no base_model recorded: nothing says which model's states "
                                  "it learned")
    if not metrics:
        report["warnings"].append("no training metrics recorded (not made by "
                                  "`vllm-recontrol train`)")
    report["warnings"] += quality_warnings(metrics)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vllm-recontrol inspect",
        description="Validate value heads as an engine would (files, shapes, values; the "
                    "model's hidden size and recorded base model with --model) and print "
                    "what they record about their training. Exit status 1 if any head would "
                    "be refused.")
    parser.add_argument("heads", nargs="+",
                        help="value head folders or hub repositories (owner/name[@revision])")
    parser.add_argument("--model", help="the model that will serve them (folder or hub id)")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--json", action="store_true", help="one JSON object per head")
    args = parser.parse_args(join_dash_values(parser, argv))
    status = 0
    for path in args.heads:
        try:
            report = inspect_head(path, args.model, args.trust_remote_code)
        except RecontrolError as exc:  # ValueHeadError included
            status = 1
            if args.json:
                print(json.dumps({"path": path, "error": str(exc)}), flush=True)
            else:
                print(f"error: {exc}", flush=True)
            continue
        if args.json:
            print(json.dumps(report), flush=True)
            continue
        rows = [(k, v) for k, v in report.items() if k not in ("path", "warnings")
                and v is not None]
        print(summary_table(f"value head {path}: usable"
                            + (f" with {args.model}" if args.model else ""), rows), flush=True)
        for warning in report["warnings"]:
            print(f"warning: {warning}", flush=True)
    return status
