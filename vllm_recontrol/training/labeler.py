"""``vllm-recontrol label``: one reward per collected response, stored beside the shards.

Why separate files: collected states are expensive and immutable; labels are cheap and may be
redone with another reward model. ``DIR/labels/<name>/info.json`` says where the rewards came
from; ``DIR/labels/<name>/shard-00000.jsonl`` holds ``{"response_id", "reward", "cut"}`` per
response, in the shard's row order, written atomically: a rerun labels only missing shards.
A reward that is not a finite number stops the command with the shard, row and value: no row
is ever dropped or filled in silently. ``--ray --replicas N`` spreads whole shards over N Ray
actors, each with its own reward model (or function); the files are the same as one
process's.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..folder_lock import exclusive_folder, label_lock_name
from .common import (DataError, build_options, check_engine_args, dump_json, json_argument,
                     parse_command_line, progress, read_jsonl, run_main, summary_table,
                     write_jsonl_atomic, write_text_atomic)
from .engines import run_engines_in_process
from .ray_pool import (actor_reward_arguments, add_ray_arguments, call_each, check_replicas,
                       dispatch, ray_actors)
from .rewards import (DEFAULT_CUT_AT, RM_ENGINES, RewardSource, cut_response,
                      reward_fn_modules)
from .shards import (manifest_sha256, manifest_shards, read_manifest, read_rows, rows_path,
                     shard_status)

LABELS_DIR = "labels"
INFO_FILE = "info.json"
LABELS_FORMAT = "vllm-recontrol-labels"
_NAME = re.compile(r"^(?!\.+$)[A-Za-z0-9_.-]+$")  # not "." or "..": a folder name of its own


LABEL_REPLICAS = "one reward source per Ray actor, each labelling whole shards"


@dataclass
class LabelOptions:
    """Options of ``label``: exactly one of ``reward_fn`` and ``reward_model``."""

    data: str
    reward_fn: Any = None          # "module:function" (or, from Python, the function itself)
    reward_model: str | None = None
    name: str = "reward"
    batch_size: int = 16           # reward model batch; pairs per call of a batched function
    device: str = "cpu"
    rm_dtype: str = "float32"
    max_length: int | None = None
    reward_index: int | None = None
    trust_remote_code: bool = False
    rm_engine: str = "hf"          # "hf" (transformers) or "vllm" (pooling runner, classify)
    engine_args: dict[str, Any] = field(default_factory=dict)  # vllm.LLM keyword arguments
    in_process: bool = False       # vLLM engine core in this process (small CPU runs)
    cut_at: list[str] = field(default_factory=lambda: list(DEFAULT_CUT_AT))
    ray: bool = False              # spread shards over Ray actors
    replicas: int = 1              # actors (each loads the reward model once)
    ray_address: str | None = None
    ray_num_cpus: float = 1.0
    ray_num_gpus: float = 0.0
    overwrite: bool = False
    progress: bool = True

    def check(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise DataError(f"a label set name is a folder name of letters, digits, '_', '.' "
                            f"and '-', not only dots; got {self.name!r}")
        check_replicas(self.replicas, self.ray, LABEL_REPLICAS)
        if not isinstance(self.engine_args, dict):
            raise DataError("engine_args must be a JSON object")
        if self.rm_engine == "vllm":
            check_engine_args(self.engine_args, "--engine-args")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or \
                self.batch_size <= 0:
            raise DataError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        for name in ("max_length", "reward_index"):
            value, low = getattr(self, name), 1 if name == "max_length" else 0
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < low):
                raise DataError(f"{name} must be an integer >= {low} (or omitted), got {value!r}")

    def source_arguments(self) -> dict[str, Any]:
        """``RewardSource`` keyword arguments: what a process (or actor) needs to score."""
        return dict(reward_fn=self.reward_fn, reward_model=self.reward_model,
                    device=self.device, dtype=self.rm_dtype, batch_size=self.batch_size,
                    max_length=self.max_length, reward_index=self.reward_index,
                    trust_remote_code=self.trust_remote_code, engine=self.rm_engine,
                    engine_args=dict(self.engine_args))


class LabelWorker:
    """Labels whole shards with a reward source; runs in this process or as a Ray actor,
    which builds its own source from ``LabelOptions.source_arguments`` (a reward function's
    module that is not installed travels with the actors, see ``ray_pool.local_code``)."""

    def __init__(self, data: str, folder: str, source: RewardSource | dict[str, Any],
                 cut_at: Sequence[str], in_process: bool = False) -> None:
        if not isinstance(source, RewardSource):
            source = _reward_source(source, in_process)
        self.data, self.folder, self.source = Path(data), Path(folder), source
        self.cut_at = list(cut_at)

    def label_shard(self, shard: str) -> str:
        """Score the shard's responses and write its labels file (atomically)."""
        rows = read_rows(self.data, shard)
        pairs, cuts = [], []
        for row in rows:
            response, was_cut = cut_response(row["response"], self.cut_at)
            pairs.append((row["prompt"], response))
            cuts.append(was_cut)
        rewards = self.source.score(pairs, where=lambda i: (
            f"shard {shard} row {i} (response_id {rows[i]['response_id']})"))
        write_jsonl_atomic(self.folder / f"{shard}.jsonl", [
            {"response_id": row["response_id"], "reward": float(r), "cut": c}
            for row, r, c in zip(rows, rewards, cuts)])
        return shard

    def close(self) -> None:
        self.source.close()


def _reward_source(arguments: dict[str, Any], in_process: bool) -> RewardSource:
    arguments = dict(arguments, engine_args=dict(arguments["engine_args"]))
    if in_process and arguments["engine"] == "vllm":
        run_engines_in_process(arguments["engine_args"])
    return RewardSource(**arguments)


def labels_dir(data: str | Path, name: str) -> Path:
    return Path(data) / LABELS_DIR / name


def label_sets(data: str | Path, with_labels: bool = False) -> list[str]:
    """Names of the label sets present under ``DIR/labels`` (``with_labels``: only those
    with at least one labelled shard, not one whose run stopped before its first)."""
    root = Path(data) / LABELS_DIR
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / INFO_FILE).is_file()
                  and (not with_labels or labelled_shards(p)))


def labelled_shards(folder: Path) -> list[str]:
    """The shards a label set folder holds labels for."""
    return sorted(p.stem for p in folder.glob("shard-*.jsonl"))


def read_shard_labels(data: str | Path, name: str, shard: str) -> list[dict[str, Any]]:
    path = labels_dir(data, name) / f"{shard}.jsonl"
    if not path.is_file():
        raise DataError(f"shard {shard} of {data} is not labelled (no {path}); run "
                        f"`vllm-recontrol label --data {data} --name {name} ...`")
    return read_jsonl(path)


def _prepare_info(opts: LabelOptions, source: RewardSource, data: Path) -> Path:
    folder = labels_dir(data, opts.name)
    info = {"format": LABELS_FORMAT, "format_version": 1, "source": source.describe(),
            "cut_at": list(opts.cut_at), "manifest_sha256": manifest_sha256(data)}
    info_path = folder / INFO_FILE
    if info_path.is_file() and opts.overwrite:
        # also when made the same way: the function behind the same module:function name
        # may have changed, and --overwrite must relabel, not skip every finished shard
        shutil.rmtree(folder)
    elif info_path.is_file():
        try:
            old = json.loads(info_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            old = {"source": "unreadable info.json"}
        if old != info and not labelled_shards(folder):
            # an earlier run stopped before its first shard (say, a reward model that did
            # not load): nothing to keep, so this run's options take its place
            print(f"label: label set {folder} holds no labels yet; its info is replaced by "
                  "this run's", file=sys.stderr, flush=True)
            shutil.rmtree(folder)
        elif old != info and not source.stable_name:
            raise DataError(f"label set {folder} holds labels, and reward function "
                            f"{source.spec} has no name that tells it from another reward "
                            f"(an object, a bound method, a lambda, a closure, a factory's "
                            f"wrapper or a partial holding more than plain data), so the set "
                            f"cannot be resumed with it: pass it as module:function, name it "
                            f"(its __recontrol_name__ attribute, e.g. \"rm-v3\"), use --name "
                            f"for a new set or --overwrite to replace this one")
        elif old != info:
            raise DataError(f"label set {folder} was made differently "
                            f"({old.get('source') if isinstance(old, dict) else old}, cut_at "
                            f"{old.get('cut_at') if isinstance(old, dict) else '?'}); use "
                            f"--name for a new set or --overwrite to replace it")
    if not info_path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(info_path, dump_json(info))
    return folder


def label(**options: Any) -> dict[str, Any]:
    """Label every collected response; see :class:`LabelOptions`. Returns the summary."""
    opts = build_options(LabelOptions, options, "label")
    opts.check()
    started = time.perf_counter()
    data = Path(opts.data)
    manifest = read_manifest(data)
    # Built here also with --ray: a bad reward function or option fails before Ray starts
    # (a reward model loads on first use only, so the driver never loads one then).
    source = _reward_source(opts.source_arguments(), opts.in_process)
    try:
        # held in the collection folder: --overwrite removes the label set's own folder
        with exclusive_folder(data, "label", lock_name=label_lock_name(opts.name),
                              what=f"label set {opts.name!r} of --data",
                              instead="use another --name"):
            return _label_all(opts, source, data, manifest, started)
    finally:
        source.close()


def _label_all(opts: LabelOptions, source: RewardSource, data: Path, manifest: dict[str, Any],
               started: float) -> dict[str, Any]:
    folder = _prepare_info(opts, source, data)
    plans = manifest_shards(manifest)
    missing = [p.name for p in plans if shard_status(data, p.name) == "pending"]
    todo = [p.name for p in plans if p.name not in missing
            and not (folder / f"{p.name}.jsonl").is_file()]
    todo += _short_labels(data, folder, [p.name for p in plans
                                         if p.name not in missing and p.name not in todo])
    skipped = len(plans) - len(missing) - len(todo)
    if opts.ray:
        _label_with_ray(opts, data, folder, todo)
    else:
        worker = LabelWorker(str(data), str(folder), source, opts.cut_at)
        for shard in progress(todo, desc="label", unit="shard",
                              disable=not opts.progress or not todo):
            worker.label_shard(shard)
    summary = _summarize(folder, plans, len(todo), skipped, missing, source.spec,
                         time.perf_counter() - started)
    print(summary_table(f"vllm-recontrol label -> {folder}", list(summary.items())), flush=True)
    return summary


def _short_labels(data: Path, folder: Path, labelled: list[str]) -> list[str]:
    """The labelled shards whose label file has not one row per response (written whole,
    so edited by hand or damaged): labelled again, said on stderr, not counted as done."""
    again = []
    for shard in labelled:
        rows_file = rows_path(data, shard)
        if not rows_file.is_file():
            read_rows(data, shard)  # raises its error: the rows are missing, rerun collect
        labels, rows = _line_count(folder / f"{shard}.jsonl"), _line_count(rows_file)
        if labels != rows:
            print(f"label: labels of shard {shard} hold {labels} rows for its {rows} responses "
                  "(the file was edited or damaged): labelling it again", file=sys.stderr,
                  flush=True)
            again.append(shard)
    return again


def _line_count(path: Path) -> int:
    """Non-blank lines of a JSONL file (one per row)."""
    with open(path, "rb") as handle:
        return sum(1 for line in handle if line.strip())


def _label_with_ray(opts: LabelOptions, data: Path, folder: Path, todo: list[str]) -> None:
    """Each shard labelled once, by whichever of ``opts.replicas`` actors is free."""
    arguments = actor_reward_arguments(opts.source_arguments())
    with ray_actors(opts, LabelWorker, len(todo), str(data.resolve()), str(folder.resolve()),
                    arguments, opts.cut_at, opts.in_process,
                    ship_modules=reward_fn_modules(opts.reward_fn)) as actors:
        dispatch(actors, [(lambda actor, shard=shard: actor.label_shard.remote(shard))
                          for shard in todo], "label", opts.progress)
        call_each(actors, "close")


def _summarize(folder: Path, plans: list, labelled: int, skipped: int, missing: list[str],
               spec: str, seconds: float) -> dict[str, Any]:
    rewards: list[float] = []
    cut = 0
    for plan in plans:
        path = folder / f"{plan.name}.jsonl"
        if path.is_file():
            for row in read_jsonl(path):
                rewards.append(row["reward"])
                cut += bool(row.get("cut"))
    return {
        "label set": folder.name,
        "source": spec,
        "shards labelled now": labelled,
        "shards skipped (already labelled)": skipped,
        "shards not collected yet": len(missing),
        "responses labelled": len(rewards),
        "responses cut at a next turn": cut,
        "mean reward": statistics.fmean(rewards) if rewards else float("nan"),
        "std reward": statistics.pstdev(rewards) if rewards else float("nan"),
        "min reward": min(rewards) if rewards else float("nan"),
        "max reward": max(rewards) if rewards else float("nan"),
        "wall time (s)": round(seconds, 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vllm-recontrol label",
        description="Score every collected response with a reward model or a reward function; "
                    "rewards go to DIR/labels/NAME/, beside the (unchanged) shards.")
    parser.add_argument("--data", help="folder written by `vllm-recontrol collect`")
    parser.add_argument("--reward-fn", help="module:function with f(prompt, response) -> float "
                        "(or f(prompts, responses) -> floats, marked @batched_reward)")
    parser.add_argument("--reward-model", help="Hugging Face sequence-classification reward "
                        "model (name or folder)")
    parser.add_argument("--name", help="label set name (default reward)")
    parser.add_argument("--batch-size", type=int, help="reward model batch size, or pairs per "
                        "call of a batched reward function without its own (default 16)")
    parser.add_argument("--device", help="reward model device (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--rm-dtype", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--max-length", type=int, help="reward model input tokens (cut left)")
    parser.add_argument("--reward-index", type=int,
                        help="which output of a multi-output reward model is the reward")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--rm-engine", choices=list(RM_ENGINES),
                        help="run --reward-model with transformers (hf, default) or with "
                             "vLLM's pooling runner (vllm: faster on a GPU, same scores)")
    parser.add_argument("--engine-args", type=json_argument,
                        help="JSON keyword arguments for vllm.LLM with --rm-engine vllm")
    parser.add_argument("--in-process", action="store_true",
                        help="with --rm-engine vllm: engine core in this process (small CPUs)")
    parser.add_argument("--cut-at", nargs="*",
                        help="cut responses at the first of these markers (default Human: User:)")
    add_ray_arguments(parser, LABEL_REPLICAS + " (GPUs: --device cuda --ray-num-gpus 1)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the label set of that name (relabel every shard, "
                        "also when it was made the same way: after a reward function changed)")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    options = parse_command_line(parser, argv, required=("data",))
    return run_main(label, options)
