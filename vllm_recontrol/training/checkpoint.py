"""Resumable ``train``: the whole training state after every epoch, in safetensors and JSON.

Why: the paper's recipe is 100 epochs over ~170 GB of states, so a killed run should lose at
most one epoch. A resumed run continues bit for bit as if it had never stopped: weights, the
bootstrap (target) network, Adam's moments, every process's random generators, the step
counter and the best epoch so far are all restored. Nothing is pickled.

Layout of the folder: ``state.json`` (the run's fingerprint, epoch, history, best epoch, and
which tensor file holds the rest) and ``epoch-NNNN.safetensors``. Each epoch writes its
tensor file first and ``state.json`` last, both atomically, then removes older tensor files,
so a kill at any moment leaves a consistent checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .common import (DataError, atomic_path, dump_json, failure_reason, sha256_bytes, sha256_file,
                     write_text_atomic)

FORMAT = "vllm-recontrol-train-checkpoint"
STATE_FILE = "state.json"
STATE_KEYS = ("run", "epoch", "steps", "history", "best_mse", "best_epoch", "stopped_early",
              "tensors", "tensors_sha256")
# Options that may change between a run and its resumption (where things are, how long to
# go on; another device continues the same state, though not bit for bit). Not the patience
# or min_delta: without early stopping a checkpoint's "best" epoch is its last, not the best.
RESUMABLE_CHANGES = ("data", "out", "epochs", "device", "progress", "checkpoint")


@dataclass
class Progress:
    """Where a run stands after an epoch (what ``train`` keeps besides the trainer)."""

    epoch: int
    history: list[dict[str, float]]
    best_mse: float
    best_epoch: int
    best_state: dict[str, torch.Tensor]
    stopped_early: bool = False
    # the checkpoint it was loaded from: epoch, tensors and state.json digests (None: fresh),
    # which every process must share (``ProcessGroup.agree``)
    identity: str | None = None


def fingerprint(options: dict[str, Any], data_identity: dict[str, Any],
                processes: int) -> dict[str, Any]:
    """What must be equal for a checkpoint to continue this run."""
    kept = {k: v for k, v in options.items() if k not in RESUMABLE_CHANGES}
    return {"options": kept, "data": data_identity, "processes": processes}


def save(folder: str | Path, trainer: Any, progress: Progress,
         run: dict[str, Any]) -> None:
    """Write the checkpoint of ``progress.epoch`` (rank 0 writes; every rank must call this,
    since the other ranks' random generators are gathered here)."""
    rows_states = trainer.group.gather(trainer.generator.get_state())
    failure: Exception | None = None
    if trainer.group.is_main:
        try:
            _write(Path(folder), trainer, progress, run, rows_states)
        except Exception as exc:  # the disk (OSError, safetensors' SafetensorError): no traceback
            reason = failure_reason(exc)
            kept = (f"it still holds epoch {progress.epoch - 1}: mend that and rerun the same "
                    f"command to go on from there" if progress.epoch > 1
                    else "nothing was saved")
            failure = DataError(f"train: cannot write the checkpoint of epoch {progress.epoch} "
                                f"to {folder} ({reason}); {kept}")
    # every rank stops with it (none left waiting for rank 0 in the next epoch's collectives)
    trainer.group.raise_main_failure(failure, "train: rank 0 could not write the checkpoint "
                                              "to its --checkpoint (its error says why)")


def _write(folder: Path, trainer: Any, progress: Progress, run: dict[str, Any],
           rows_states: torch.Tensor) -> None:
    """Rank 0's part of :func:`save`: the tensors, then the state naming them (both atomic,
    so a failure leaves the previous epoch's checkpoint whole), then the older tensors go
    (when one cannot, it stays: the state names the tensors it reads)."""
    tensors = {f"head.{k}": v for k, v in trainer.head.state_dict().items()}
    tensors.update({f"best.{k}": v for k, v in progress.best_state.items()})
    if trainer.target_head is not trainer.head:
        tensors.update({f"target.{k}": v for k, v in trainer.target_head.state_dict().items()})
    for index, parameter in enumerate(trainer.head.parameters()):
        for key, value in trainer.optimizer.state.get(parameter, {}).items():
            tensors[f"adam.{index}.{key}"] = value
    tensors["rng.rows"] = rows_states.view(trainer.group.world, -1)
    tensors["rng.order"] = trainer.order_generator.get_state()
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    name = f"epoch-{progress.epoch:04d}.safetensors"
    with atomic_path(folder / name) as tmp:
        save_file(tensors, str(tmp))
    state = {"format": FORMAT, "format_version": 1, "run": run, "epoch": progress.epoch,
             "steps": trainer.steps, "history": progress.history,
             "best_mse": progress.best_mse, "best_epoch": progress.best_epoch,
             "stopped_early": progress.stopped_early,
             "tensors": name, "tensors_sha256": sha256_file(folder / name)}
    write_text_atomic(folder / STATE_FILE, dump_json(state))
    for old in folder.glob("epoch-*.safetensors"):
        if old.name != name:
            with contextlib.suppress(OSError):
                old.unlink()


# Options that checkpoints began to record later (they used to be resumable changes), with
# train's defaults: a checkpoint without them is read as made with those, so the same
# command resumes it, and one that adds early stopping to it is refused.
OPTIONS_ADDED_SINCE = {"patience": None, "min_delta": 0.0}


def _with_options_added_since(stored: Any) -> Any:
    """``stored`` with the defaults of options it could not record yet."""
    if not isinstance(stored, dict) or not isinstance(stored.get("options"), dict):
        return stored
    return {**stored, "options": {**OPTIONS_ADDED_SINCE, **stored["options"]}}


def load(folder: str | Path, trainer: Any, run: dict[str, Any]) -> Progress | None:
    """Restore ``trainer`` from the checkpoint in ``folder`` (None when there is none yet);
    a checkpoint of another run is an error naming what differs.

    Every process reads the folder by itself, so under torchrun it must be on a filesystem
    every process sees; ``train`` then checks that all of them loaded the same checkpoint
    (``Progress.identity``), or failed, before training."""
    folder = Path(folder)
    state_path = folder / STATE_FILE
    if not state_path.is_file():
        return None
    try:
        text = state_path.read_bytes()
        state = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{state_path} is not valid JSON ({exc}): the checkpoint is damaged; "
                        f"use another --checkpoint folder") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise DataError(f"{state_path} is not a vllm-recontrol training checkpoint")
    missing = [key for key in STATE_KEYS if key not in state]
    if missing:
        raise DataError(f"{state_path} lacks {missing}: the checkpoint is damaged; use another "
                        f"--checkpoint folder")
    stored = _with_options_added_since(state["run"])
    if stored != run:
        processes = stored.get("processes") if isinstance(stored, dict) else None
        advice = ("the same options" if not isinstance(processes, int)
                  or processes == run["processes"] else
                  f"the same options on {processes} process{'es' if processes != 1 else ''} "
                  f"in all (each process's rows are dealt and shuffled by its rank, so a "
                  f"checkpoint resumes only on as many)")
        raise DataError(f"checkpoint {folder} belongs to another run "
                        f"({_differences(stored, run)}); use another --checkpoint "
                        f"folder, or {advice}")
    if not isinstance(state["tensors"], str) or not re.fullmatch(r"epoch-\d+\.safetensors",
                                                                state["tensors"]):
        raise DataError(f"{state_path}: tensors {state['tensors']!r} is not one of this "
                        f"folder's epoch-NNNN.safetensors; the checkpoint is damaged")
    tensor_path = folder / state["tensors"]
    if not tensor_path.is_file() or sha256_file(tensor_path) != state["tensors_sha256"]:
        raise DataError(f"checkpoint {folder}: {state['tensors']} is missing or damaged")
    try:
        progress = _restore(state, load_file(str(tensor_path)), trainer)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:
        raise DataError(f"checkpoint {folder} does not fit this run's trainer "
                        f"({type(exc).__name__}: {exc}); use another --checkpoint folder") from exc
    progress.identity = (f"epoch {progress.epoch}, tensors {state['tensors_sha256'][:12]}, "
                         f"state.json {sha256_bytes(text)[:12]}")
    return progress


def _restore(state: dict[str, Any], tensors: dict[str, torch.Tensor], trainer: Any) -> Progress:
    device = next(trainer.head.parameters()).device

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    trainer.head.load_state_dict(part("head."))
    if trainer.target_head is not trainer.head:
        trainer.target_head.load_state_dict(part("target."))
    for index, parameter in enumerate(trainer.head.parameters()):
        saved = part(f"adam.{index}.")
        if saved:  # Adam keeps its step count on the CPU, the moments beside the weights
            trainer.optimizer.state[parameter] = {
                k: v if k == "step" else v.to(device) for k, v in saved.items()}
    trainer.generator.set_state(tensors["rng.rows"][trainer.group.rank].clone())
    if trainer.order_generator is not trainer.generator:
        trainer.order_generator.set_state(tensors["rng.order"])
    trainer.steps = int(state["steps"])
    return Progress(epoch=int(state["epoch"]), history=list(state["history"]),
                    best_mse=float(state["best_mse"]), best_epoch=int(state["best_epoch"]),
                    best_state=part("best."), stopped_early=bool(state["stopped_early"]))


def _differences(saved: dict[str, Any], wanted: dict[str, Any], prefix: str = "") -> str:
    keys = sorted(set(saved) | set(wanted))
    parts = []
    for key in keys:
        a, b = saved.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = _differences(a, b, f"{prefix}{key}.")
            if inner:
                parts.append(inner)
        elif a != b:
            parts.append(f"{prefix}{key}: checkpoint {a!r}, now {b!r}")
    return "; ".join(parts)
