"""``vllm-recontrol train``: fit the value head V(s) on labelled states, streamed from disk.

Defaults are the paper's (arXiv 2406.05954): Adam, lr 1e-4, batch 512, 100 epochs, no weight
decay, one hidden layer as wide as the model (widths = [d]; Vicuna-7B on HH-RLHF used two,
``--widths 4096 4096``), Bellman targets. Unlike the reference code it trains in float32, uses
the correct terminal index, stops the gradient through the bootstrap, and never holds all
states in memory. A prompt-level held-out split drives early stopping for MC and TD(lambda)
targets (held-out MSE of V(s_t) against the reward, the fixed point of every target type when
each prompt has one response; Bellman targets approach it too slowly to stop on it) and
measures the correlation of V(s_0) with the reward against a constant predictor. Under
``torchrun`` it trains data-parallel (``distributed``): each process streams its own windows.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from ..folder_lock import exclusive_folder
from ..errors import ValueHeadError
from ..head_files import (CONFIG_FILE, MAX_HIDDEN_LAYERS, WEIGHTS_FILE,
                          foreign_config_problem)
from ..value_head import ValueHead
from . import checkpoint
from ..package_versions import package_versions
from .collector import MODEL_FOLDER, SOFTWARE, model_folder
from .common import (DataError, build_options, failure_reason, json_digest, parse_command_line,
                     progress, run_main, summary_table)
from .dataset import LabelledData, Window
from .distributed import (ProcessGroup, deal_shards, join_process_group, tensors_digest,
                          world_size)
from .head_quality import quality_warnings
from .shards import manifest_sha256
from .targets import TARGETS, bootstrap_targets, lambda_returns, mc_targets, value_loss

EVAL_CHUNK = 8192


@dataclass
class TrainOptions:
    """Options of ``train`` (paper defaults where the paper gives one).

    Target choice, measured on the toy world (600 sampled responses, d = 64, README table):
    Monte Carlo and TD(0.9) heads steered greedy generation from reward 0.42 to 1.00 at
    alpha 1 after 60 epochs. Bellman targets carry the terminal reward back one bootstrap at a
    time: early-stopped after 35 epochs the head did not steer at any alpha; trained 300 epochs
    it steered at alpha 2 (not 1): right direction, smaller gradient.
    """

    data: str
    out: str
    labels: str | None = None
    target: str = "bellman"
    td_lambda: float = 0.9
    target_sync_steps: int = 1
    widths: list[int] | None = None
    init_head: str | None = None
    lr: float = 1e-4
    batch_size: int = 512
    epochs: int = 100
    weight_decay: float = 0.0
    heldout_fraction: float = 0.1
    patience: int | None = None  # None: 10 for mc and td-lambda, none for bellman (below)
    min_delta: float = 0.0
    shuffle_shards: int = 4
    device: str = "auto"
    seed: int = 0
    allow_partial: bool = False
    checkpoint: str | None = None  # folder: save every epoch, resume from it when present
    progress: bool = True

    def check(self) -> None:
        if self.target not in TARGETS:
            raise DataError(f"target must be one of {list(TARGETS)}, got {self.target!r}")
        if not 0.0 <= self.td_lambda <= 1.0:
            raise DataError(f"td_lambda must be in [0, 1], got {self.td_lambda}")
        for name in ("batch_size", "epochs", "shuffle_shards", "target_sync_steps", "patience"):
            value = getattr(self, name)
            if name == "patience" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise DataError(f"{name} must be a positive integer, got {value!r}")
        # torch generators take 64 bits; each process adds 7919 (rank + 1) to the seed
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or \
                not 0 <= self.seed < MAX_SEED:
            raise DataError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if not 0 < self.lr < math.inf:
            raise DataError(f"lr must be a finite number > 0, got {self.lr}")
        for name in ("weight_decay", "min_delta"):
            if not 0.0 <= getattr(self, name) < math.inf:
                raise DataError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise DataError(f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
        if self.widths is not None and (not isinstance(self.widths, (list, tuple)) or not all(
                isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in self.widths)):
            raise DataError(f"--widths must be positive integers (the hidden layers' widths), "
                            f"got {self.widths!r}")
        if self.widths is not None and not self.widths:  # `"widths": []` in a config file
            raise DataError("widths is empty: give the hidden layers' widths (at least one), "
                            "or leave widths out for one layer of the model's width")
        if self.widths is not None and len(self.widths) > MAX_HIDDEN_LAYERS:
            raise DataError(f"--widths lists {len(self.widths)} hidden layers, more than a "
                            f"value head has (at most {MAX_HIDDEN_LAYERS}; the paper's has 2)")
        for name in ("out", "checkpoint"):  # found before training, not after it
            folder = getattr(self, name)
            if folder and Path(folder).exists() and not Path(folder).is_dir():
                raise DataError(f"--{name} {folder} is a file; it must be a folder (or not "
                                f"exist yet)")


DEFAULT_PATIENCE = 10


def new_head(hidden: int, widths: list[int], seed: int, base_model: str | None,
             copies: int = 1) -> ValueHead:
    """A fresh head, or an error giving its size when it cannot fit (a width typed with
    extra zeros ended in the allocator's traceback). ``copies``: of the head's size that
    training keeps in this machine's memory."""
    sizes = [hidden, *widths, 1]
    parameters = sum((a + 1) * b for a, b in zip(sizes[:-1], sizes[1:]))
    gigabytes = 4 * parameters / 1e9
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    advice = (f"--widths {widths}: a head of {parameters:,} parameters ({gigabytes:.1f} GB "
              f"in float32)")
    if copies * 4 * parameters > memory:
        kept = (f"training on the CPU keeps {copies} copies: weights, gradients, Adam's two"
                if copies > 1 else "one copy")
        raise DataError(f"{advice} does not fit this machine's {memory / 1e9:.1f} GB of memory "
                        f"({kept})")
    try:
        return ValueHead(hidden, widths, seed=seed, base_model=base_model)
    except (RuntimeError, MemoryError) as exc:
        raise DataError(f"{advice} could not be allocated: {str(exc)[:200]}") from exc


MAX_SEED = 2 ** 63


KEPT_BEST = "best held-out MSE"   # with early stopping: the epoch saved
KEPT_LAST = "last epoch"         # without (patience None, Bellman's default)


def early_stopping_patience(target: str, patience: int | None) -> int | None:
    """Epochs without a better held-out MSE before stopping; None: train every epoch.

    The held-out MSE is against the reward. MC (and TD(lambda)) regress on it directly, so a
    plateau means done; Bellman targets carry the reward back one bootstrap at a time, so the
    MSE plateaus long before the head steers (measured on the toy world: stopped at 35 of 60
    epochs, it steered at no alpha; README, "Training"). So Bellman trains all its epochs,
    as in the paper, and keeps the last, unless a patience is given."""
    if patience is not None:
        return patience
    return None if target == "bellman" else DEFAULT_PATIENCE


def recorded_model_name(manifest: dict[str, Any]) -> str | None:
    """The base model a head records: a hub id as given, a local folder as its absolute path
    as collect resolved it (collect's ``--model .`` or ``../tiny`` would name nothing once
    the head moves, "." would never match the served model's name, and resolved from where
    ``train`` runs it would name another folder). A manifest of an earlier release holds
    only the path as given: resolved here, as those releases did."""
    model = manifest.get("model")
    folder = manifest[MODEL_FOLDER] if MODEL_FOLDER in manifest else (
        model_folder(model) if isinstance(model, str) else None)
    return folder or model


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation; 0.0 when either side is constant (a constant predicts nothing)."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denominator = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    return float((x * y).sum()) / denominator if denominator > 0 else 0.0


def _device(name: str, group: ProcessGroup) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise DataError(f"device {name!r} is not a torch device (auto, cpu, cuda, cuda:1, "
                        f"...): {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DataError(f"device {name} requested but CUDA is not available")
    if group.distributed and device.type == "cuda":
        if device.index is not None:
            raise DataError(f"device {name}: with several processes use --device cuda (each "
                            f"process takes the GPU of its LOCAL_RANK)")
        device = torch.device("cuda", group.local_rank)
    return device


def _to_float(states: torch.Tensor, device: torch.device) -> torch.Tensor:
    """16-bit states as float32 on ``device``, converted there. Why not
    ``.to(device, torch.float32)``: a CPU->GPU copy that changes dtype converts on the CPU
    first and then copies twice the bytes from pageable memory. On the CPU it is the same."""
    return states.to(device).float()


class Trainer:
    """One training run: head, optimiser, streaming epochs, evaluation, early stopping."""

    def __init__(self, opts: TrainOptions, data: LabelledData,
                 group: ProcessGroup | None = None) -> None:
        self.opts, self.data = opts, data
        self.group = group or ProcessGroup()
        self.device = _device(opts.device, self.group)
        try:
            self.head = self._initial_head().to(self.device)
        except torch.OutOfMemoryError as exc:  # a GPU's: the host check cannot know it
            raise DataError(f"the value head does not fit {self.device}'s memory: "
                            f"{str(exc)[:200]}; give smaller --widths or another --device") \
                from exc
        self.target_head = copy.deepcopy(self.head) if opts.target_sync_steps > 1 else self.head
        self.optimizer = torch.optim.Adam(self.head.parameters(), lr=opts.lr,
                                          weight_decay=opts.weight_decay)
        self.generator = torch.Generator().manual_seed(opts.seed)
        self.order_generator = self.generator  # shard order: the same in every process
        if self.group.distributed:  # row shuffles: each process its own
            self.order_generator = torch.Generator().manual_seed(opts.seed)
            self.generator = torch.Generator().manual_seed(opts.seed + 7919 * (self.group.rank + 1))
        self.batch_size = opts.batch_size // self.group.world  # a step's states per process
        self.heldout = data.heldout_prompts(opts.heldout_fraction, opts.seed)
        self.has_heldout = bool(self.heldout.any())
        self.train_states = data.train_states_per_shard(self.heldout)  # how shards are dealt
        self.train_mean, self.train_state_mean = data.train_reward_means(self.heldout)
        self.steps = 0

    def _initial_head(self) -> ValueHead:
        opts, hidden = self.opts, self.data.hidden_size
        base_model = recorded_model_name(self.data.manifest)
        if opts.init_head:
            head = ValueHead.load(opts.init_head)
            if head.hidden_size != hidden:
                raise DataError(f"--init-head {opts.init_head} has hidden size {head.hidden_size} "
                                f"but the states in {self.data.path} are {hidden} wide")
            if opts.widths and list(opts.widths) != head.widths:
                raise DataError(f"--widths {opts.widths} differ from --init-head's {head.widths}")
            if base_model and head.base_model_mismatch(base_model) and self.group.is_main:
                # same width, another model (Llama-2-7B and Vicuna-7B): likely a wrong path
                print(f"warning: --init-head {opts.init_head} was trained on the states of "
                      f"{head.base_model!r}, but {self.data.path} holds states of "
                      f"{base_model!r}; training goes on from its weights, and the new head "
                      f"records {base_model!r}", file=sys.stderr, flush=True)
            head.base_model = base_model
            return head
        widths = list(opts.widths) if opts.widths else [hidden]
        # on the CPU it trains where it is made: weights, gradients and Adam's two moments
        copies = 4 if self.device.type == "cpu" else 1
        return new_head(hidden, widths, opts.seed, base_model, copies)

    # ------------------------------------------------------------------ training
    def epoch(self) -> float:
        """One pass over the training states; returns the mean training loss.

        Alone: every batch of every window is one step. With several processes, each
        streams its own windows and a step applies the gradient of the union of their
        batches; a process with none left takes the step with a zero gradient."""
        self.head.train()
        order = torch.randperm(len(self.data.shards), generator=self.order_generator).tolist()
        groups = self._my_windows(order)
        batches = self._batches(groups)
        if not self.group.distributed:
            # map, not a loop variable: no name holds the last batch (and so its window)
            # while the generator loads the next window
            losses = list(map(self._step, batches))
        else:  # as many steps as the process with the most batches has
            steps = self.group.max(self._count_batches(groups))
            losses = [self._step(next(batches, None)) for _ in range(steps)]
            if next(batches, None) is not None:
                raise RuntimeError("train: a process has batches left after the last step")
        return sum(losses) / max(len(losses), 1)

    def _step(self, item: tuple[Window, torch.Tensor | None, torch.Tensor] | None) -> float:
        """One optimizer step on this process's batch (or none); returns the step's loss."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = None
        if item is not None:
            window, fixed, batch = item
            states = _to_float(window.states[batch], self.device)
            if fixed is None:
                targets = self._bellman_batch_targets(window, batch)
            else:
                targets = fixed[batch].to(self.device)
            loss = value_loss(self.head, states, targets)
        rows = 0 if item is None else item[2].numel()
        if self.group.distributed:
            if loss is not None:
                loss.backward()
            step_loss = self.group.sum_step(list(self.head.parameters()), rows, loss)
        else:
            loss.backward()
            step_loss = loss.item()
        self.optimizer.step()
        self.steps += 1
        if self.target_head is not self.head and self.steps % self.opts.target_sync_steps == 0:
            self.target_head.load_state_dict(self.head.state_dict())
        return step_loss

    def _my_windows(self, order: list[int]) -> list[list[int]]:
        """This process's windows: groups of ``shuffle_shards`` of its own shards, which are
        dealt by training states (``deal_shards``: the processes' epochs then differ by at
        most one shard's states). Alone: the shard order, ``shuffle_shards`` at a time."""
        mine = deal_shards(order, self.train_states, self.group.world)[self.group.rank]
        size = self.opts.shuffle_shards
        return [mine[i:i + size] for i in range(0, len(mine), size)]

    def _batches(self, groups: list[list[int]]
                 ) -> Iterator[tuple[Window, torch.Tensor | None, torch.Tensor]]:
        """(window, its fixed targets or None, rows) per training batch, window by window."""
        for shards in groups:
            # only the training side is read: the held-out tenth would be masked out
            for window in self.data.windows(shards, len(shards), self.heldout, "train"):
                yield from self._window_batches(window)
                # Why: a name bound here would keep this window (its targets and rows live
                # in the finished _window_batches, freed with it) alive while the next one
                # loads, holding two windows at the peak instead of one.
                del window

    def _window_batches(self, window: Window
                        ) -> Iterator[tuple[Window, torch.Tensor | None, torch.Tensor]]:
        """One window's training rows, shuffled, in batches with the window's fixed targets."""
        rows = torch.nonzero(~window.state_heldout).squeeze(1)
        if rows.numel() == 0:
            return
        rows = rows[torch.randperm(rows.numel(), generator=self.generator)]
        fixed = self._window_targets(window)
        for start in range(0, rows.numel(), self.batch_size):
            yield window, fixed, rows[start:start + self.batch_size]

    def _count_batches(self, groups: list[list[int]]) -> int:
        """How many batches ``_batches`` yields, from the shard indexes (nothing loaded)."""
        return sum(math.ceil(sum(self.train_states[i] for i in shards) / self.batch_size)
                   for shards in groups)

    def _bellman_batch_targets(self, window: Window, batch: torch.Tensor) -> torch.Tensor:
        """y = r at a terminal row, else stopgrad V(s_{t+1}) (the next row of the window)."""
        return bootstrap_targets(
            lambda x: self.target_head(_to_float(x, self.device)), window.states, batch,
            window.terminal, window.state_rewards)

    def _window_targets(self, window: Window) -> torch.Tensor | None:
        """Targets fixed for a whole window (MC, TD(lambda)); None for per-batch Bellman."""
        if self.opts.target == "mc":
            return mc_targets(window.offsets, window.rewards)
        if self.opts.target == "td-lambda":
            # Bootstrap values from the weights at the window's start: a target network
            # refreshed every window, without gradient.
            values = self._values(window.states)
            return lambda_returns(values, window.offsets, window.rewards, self.opts.td_lambda)
        return None

    @torch.no_grad()
    def _values(self, states: torch.Tensor) -> torch.Tensor:
        out = [self.target_head(_to_float(states[i:i + EVAL_CHUNK], self.device)).cpu()
               for i in range(0, states.shape[0], EVAL_CHUNK)]
        return torch.cat(out) if out else torch.zeros(0)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """MSE of V(s_t) vs r over held-out states, and V(s_0) vs r, against the train mean.

        Without a held-out split the same numbers are computed on the training data. Each
        window holds only the responses scored (read as row ranges from the shards), not the
        whole shards: the held-out tenth of the states, not all of them, every epoch.
        """
        self.head.eval()
        squared = trivial_squared = 0.0
        count = 0
        first_values, first_rewards = [], []
        scored = "heldout" if self.has_heldout else "train"
        for shards in self._my_windows(list(range(len(self.data.shards)))):
            windows = self.data.windows(shards, len(shards), self.heldout, scored)
            # map: no name keeps a scored window alive while the next one loads
            for part in map(self._score, windows):
                if part is None:
                    continue
                squared += part[0]
                trivial_squared += part[1]
                count += part[2]
                first_values.append(part[3])
                first_rewards.append(part[4])
        squared, trivial_squared, count = self.group.sum([squared, trivial_squared, count])
        v0 = self.group.gather(torch.cat(first_values) if first_values else torch.zeros(0))
        r = self.group.gather(torch.cat(first_rewards) if first_rewards else torch.zeros(0))
        return {
            "mse": squared / count,
            "mse_s0": float(((v0 - r) ** 2).mean()),
            "pearson_s0": pearson(v0, r),
            "trivial_mse": trivial_squared / count,
            "trivial_mse_s0": float(((self.train_mean - r) ** 2).mean()),
            "trivial_pearson_s0": 0.0,  # a constant has no correlation with anything
            "responses": int(r.numel()),
        }

    def _score(self, window: Window
               ) -> tuple[float, float, int, torch.Tensor, torch.Tensor] | None:
        """Sums over every state of a window of scored responses: squared error of V and of
        the train states' mean reward, the state count; and V(s_0) and r of its responses
        (None if empty)."""
        states = window.states
        if states.shape[0] == 0:
            return None
        values = torch.cat([self.head(_to_float(states[i:i + EVAL_CHUNK], self.device)).cpu()
                            for i in range(0, states.shape[0], EVAL_CHUNK)])
        rewards = window.state_rewards
        first_values = self.head(_to_float(states[window.first_rows], self.device)).cpu()
        return (float(((values - rewards) ** 2).sum()),
                float(((self.train_state_mean - rewards) ** 2).sum()), states.shape[0],
                first_values, window.rewards)


def train(**options: Any) -> dict[str, Any]:
    """Train and save a value head; see :class:`TrainOptions`. Returns the summary.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every process runs this; they train one head
    together and rank 0 saves it."""
    opts = build_options(TrainOptions, options, "train")
    opts.check()
    group = join_process_group(opts.device)
    try:
        if opts.batch_size % group.world:
            raise DataError(f"batch_size {opts.batch_size} must be a multiple of the "
                            f"{group.world} processes (each takes an equal part of a step)")
        with contextlib.ExitStack() as held:  # what the run holds until it ends (its lock)
            return _train(opts, group, held)
    finally:
        group.close()


# What every process must share before training (ProcessGroup.agree), and the fix when not.
START_FIXES = {
    "options": "start every process with the same options (flags and --config file).",
    "data": "every process must read the same --data folder and label set, on a filesystem "
            "every process sees; with --allow-partial, processes started while collect or "
            "label still writes may see different shards: start once those shards are done.",
    "held-out split": "every process must read the same --data folder and label set, on a "
                      "filesystem every process sees.",
    "checkpoint": "the --checkpoint folder must be on a filesystem every process sees (not a "
                  "node-local disk such as /tmp or /scratch), the same folder for all.",
    "initial head": "--init-head must name the same head for every process, on a filesystem "
                    "every process sees.",
}
# Options that may differ between processes: where things are (checked by content instead).
LOCAL_OPTIONS = ("data", "out", "checkpoint", "device", "progress")


def _start_facts(opts: TrainOptions, data: LabelledData, trainer: Trainer,
                 run: dict[str, Any], state: checkpoint.Progress | None,
                 initial_head: str) -> dict[str, Any]:
    """What a process starts training from, short enough to gather: options, data identity
    (shards used with their response counts, rewards, label set), held-out split, the
    checkpoint loaded (which covers the weights it restores) and the head's weights before
    it (seeded or --init-head), as values and digests."""
    shards = run["data"]["shards"]
    heldout = trainer.heldout
    return {
        "options": {k: v for k, v in asdict(opts).items() if k not in LOCAL_OPTIONS},
        "data": {"manifest": run["data"]["manifest_sha256"][:12], "labels": data.labels,
                 "label info": data.label_info_sha256[:12],
                 "rewards": data.rewards_sha256[:12],
                 "shards": f"{len(shards)} shards, {sum(n for _, n in shards)} responses "
                           f"({json_digest(shards)[:12]})"},
        "held-out split": f"{int(heldout.sum())} of {heldout.numel()} prompts "
                          f"({tensors_digest({'heldout': heldout})[:12]})",
        # a fresh --checkpoint on some processes only would have rank 0 gather at each
        # save while the others went on: a hang
        "checkpoint": state.identity if state else ("none yet" if opts.checkpoint else
                                                    "none (no --checkpoint)"),
        "initial head": initial_head[:12],
    }


def _prepare(opts: TrainOptions, group: ProcessGroup, held: contextlib.ExitStack
             ) -> tuple[LabelledData, Trainer, dict[str, int], dict[str, Any],
                        checkpoint.Progress | None, str]:
    """Read the data, build the trainer and load the checkpoint (each process by itself);
    the last item is the digest of the head's weights before the checkpoint."""
    if opts.checkpoint and group.is_main:  # rank 0 writes it: one run at a time
        held.enter_context(exclusive_folder(opts.checkpoint, "train", what="--checkpoint",
                                            instead="use another --checkpoint"))
    data = LabelledData(opts.data, opts.labels, opts.allow_partial)
    trainer = Trainer(opts, data, group)
    counts = data.count(trainer.heldout)
    if counts["train_states"] == 0:
        raise DataError(f"{opts.data}: no training states after the held-out split")
    # With --allow-partial the held-out prompts may all be in shards not collected yet:
    # then there is no held-out split to stop on (the numbers are the training data's).
    trainer.has_heldout = trainer.has_heldout and counts["heldout_states"] > 0
    # The label set as resolved (--labels omitted or naming the only set: the same run),
    # and the shards used, which --allow-partial lets grow between a run and its resumption.
    run = checkpoint.fingerprint({**asdict(opts), "labels": data.labels}, {
        "manifest_sha256": manifest_sha256(data.path), "labels": data.labels,
        "labels_info_sha256": data.label_info_sha256, "rewards_sha256": data.rewards_sha256,
        "shards": [[s.name, s.index.num_responses] for s in data.shards]}, group.world)
    initial_head = tensors_digest(trainer.head.state_dict())
    state = checkpoint.load(opts.checkpoint, trainer, run) if opts.checkpoint else None
    return data, trainer, counts, run, state, initial_head


def _claim_out(opts: TrainOptions, group: ProcessGroup, held: contextlib.ExitStack) -> None:
    """Rank 0, which writes the head, checks ``--out`` (``_claim_out_folder``); every process
    stops when it fails (the others with a pointer to rank 0's error)."""
    failure: DataError | None = None
    if group.is_main:
        try:
            _claim_out_folder(opts, held)
        except DataError as exc:
            failure = exc
    # rank 0's --out, which this process may name otherwise (a relative path, another cwd)
    group.raise_main_failure(failure, "train: rank 0 cannot write the head to its --out (its "
                                      "error says why)")


def _claim_out_folder(opts: TrainOptions, held: contextlib.ExitStack) -> None:
    """``--out`` checked before training, not after it (the head is written only once every
    epoch has run): a folder that can be made and written into, and not another artifact's,
    whose ``config.json`` (and a model's ``model.safetensors``) the head's would replace. A
    folder made here and still empty when the run ends (it failed) is removed again."""
    out = Path(opts.out)
    foreign = foreign_config_problem(out)
    if foreign:
        raise DataError(f"--out {out} {foreign}; give another --out")
    if out.exists() and out.resolve() == Path(opts.data).resolve():
        raise DataError(f"--out {out} is the --data folder; give the head a folder of its own")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise DataError(f"--out {out} cannot be {'created' if created else 'written'} "
                        f"({exc.strerror or exc})") from None
    if created:
        held.callback(_remove_if_empty, out)


def _prompts_section(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest's ``prompts`` section ({} where a hand-made manifest has none)."""
    section = manifest.get("prompts")
    return section if isinstance(section, dict) else {}


def _save_head(head: ValueHead, opts: TrainOptions, group: ProcessGroup) -> None:
    """Rank 0 saves; every process returns once the head is on disk, or raises when the
    save failed (no process is left waiting for rank 0)."""
    failure: Exception | None = None
    if group.is_main:
        try:
            head.save(opts.out)
        except ValueHeadError as exc:  # weights or metadata a head cannot hold: says why
            failure = exc
        except Exception as exc:  # the disk: OSError, or safetensors' SafetensorError
            kept = (f"the checkpoint in {opts.checkpoint} holds the trained head: rerun with "
                    f"the same --checkpoint and a writable --out to save it" if opts.checkpoint
                    else "the trained head is lost")
            reason = failure_reason(exc)
            failure = DataError(f"train: cannot save the value head to {opts.out} "
                                f"({reason}); {kept}")
    group.raise_main_failure(failure, "train: rank 0 could not save the value head to its "
                                      "--out (its error says why)")


UNEVEN_SHARE = 0.9  # a process with fewer training states than this share of the most


def uneven_deal(train_states: Sequence[int], world: int, per_process: int) -> str | None:
    """Why the global batch shrinks, when it does: shards are dealt whole (``deal_shards``)
    and a step takes ``per_process`` rows from each process while it has any, so once the
    process with the fewest states runs out, steps carry fewer than --batch-size rows (with
    fewer shards than processes, every step does). None when the deal is about even."""
    if world <= 1:
        return None
    loads = [0] * world
    for rank, shards in enumerate(deal_shards(range(len(train_states)), train_states, world)):
        loads[rank] = sum(train_states[i] for i in shards)
    if not max(loads) or min(loads) >= UNEVEN_SHARE * max(loads):
        return None
    steps = max(math.ceil(load / per_process) for load in loads)
    # a step is short when any process has fewer than its share left (windows aside): every
    # step after the least loaded process's full ones
    short = steps - min(loads) // per_process
    return (f"the {len(train_states)} training shards spread unevenly over {world} processes "
            f"({', '.join(map(str, loads))} training states), and shards are dealt whole: "
            f"about {short} of each epoch's {steps} steps take fewer than "
            f"--batch-size rows (processes without rows left idle meanwhile); collect with a "
            f"smaller --shard-size for more, smaller shards, or train on fewer processes")


def _out_of_memory(exc: torch.OutOfMemoryError, opts: TrainOptions, trainer: Trainer,
                   done_epochs: int) -> DataError:
    """The device ran out of memory during an epoch (the head fitted when it was moved, but
    Adam's two moments, the gradients and a batch's activations come later): what to change,
    and what a rerun keeps."""
    kept = (f"the checkpoint in {opts.checkpoint} holds epoch {done_epochs}: the same "
            f"command goes on from it once the device has room, or with --device cpu (another "
            f"--batch-size or --widths starts afresh in another --checkpoint folder)"
            if opts.checkpoint and done_epochs else "nothing was saved")
    return DataError(f"train: {trainer.device} ran out of memory in epoch {done_epochs + 1} "
                     f"(head widths {trainer.head.widths}, {trainer.batch_size} states a step"
                     f"{' per process' if trainer.group.distributed else ''}): "
                     f"{str(exc)[:200]}; free the device (an engine on it holds its "
                     f"--gpu-memory-utilization share), give a smaller --batch-size or "
                     f"--widths, or train with --device cpu; {kept}")


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):
        folder.rmdir()  # fails unless empty


def _train(opts: TrainOptions, group: ProcessGroup, held: contextlib.ExitStack
           ) -> dict[str, Any]:
    started = time.perf_counter()
    _claim_out(opts, group, held)
    # Before the first collective, every process must have got this far and agree on where
    # it starts; otherwise all of them stop with the same error (no process left waiting).
    try:
        data, trainer, counts, run, state, initial_head = _prepare(opts, group, held)
    except Exception as exc:  # any failure (also out of memory, a bug): no rank left waiting
        group.agree({}, START_FIXES, exc)
        raise  # (agree raises it, alone or not)
    group.agree(_start_facts(opts, data, trainer, run, state, initial_head), START_FIXES)
    uneven = uneven_deal(trainer.train_states, group.world, trainer.batch_size)
    if uneven and group.is_main:
        print(f"warning: {uneven}", file=sys.stderr, flush=True)
    resumed_from = state.epoch if state else None
    patience = early_stopping_patience(opts.target, opts.patience)
    if not trainer.has_heldout:  # nothing to stop on: every epoch runs and the last is kept
        patience = None
    if state is None:
        state = checkpoint.Progress(0, [], math.inf, 0, copy.deepcopy(trainer.head.state_dict()))
    elif state.epoch > opts.epochs:  # its head may come from an epoch past --epochs
        raise DataError(f"train: the checkpoint in {opts.checkpoint} is at epoch {state.epoch}, "
                        f"past --epochs {opts.epochs}, and keeps only its latest epoch; use "
                        f"--epochs {state.epoch} or more to save its head, or a new "
                        f"--checkpoint folder to train {opts.epochs} epochs afresh")
    elif group.is_main:
        print(f"train: resuming from the checkpoint of epoch {state.epoch} in {opts.checkpoint}",
              flush=True)
    epochs = [] if state.stopped_early else range(state.epoch + 1, opts.epochs + 1)
    bar = progress(epochs, desc=f"train ({opts.target})", unit="epoch",
                   disable=not opts.progress or not group.is_main)
    for epoch in bar:
        try:
            loss = trainer.epoch()
            metrics = trainer.evaluate()
        except torch.OutOfMemoryError as exc:  # a GPU's (Adam's moments, a batch): no traceback
            raise _out_of_memory(exc, opts, trainer, state.epoch) from exc
        if not (math.isfinite(loss) and math.isfinite(metrics["mse"])):
            # NaN compares false with everything: early stopping would keep the first
            # weights and save them as if trained. Nothing is saved.
            raise DataError(f"train: the loss is not finite at epoch {epoch} (training loss "
                            f"{loss}, evaluation MSE {metrics['mse']}); lower --lr, or check "
                            f"the rewards and states for NaN/inf; nothing was saved")
        state.epoch = epoch
        state.history.append({"epoch": epoch, "train_loss": loss, **{k: metrics[k] for k in
                              ("mse", "mse_s0", "pearson_s0")}})
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{loss:.4g}", heldout_mse=f"{metrics['mse']:.4g}")
        # Without early stopping (Bellman's default) the last epoch is kept: the held-out MSE
        # against the reward is not what those targets minimise, so it must not pick the head.
        if patience is None or metrics["mse"] < state.best_mse - opts.min_delta:
            state.best_mse, state.best_epoch = metrics["mse"], epoch
            state.best_state = copy.deepcopy(trainer.head.state_dict())
        elif epoch - state.best_epoch >= patience:
            state.stopped_early = True
        if opts.checkpoint:
            checkpoint.save(opts.checkpoint, trainer, state, run)
        if state.stopped_early:
            break
    history, best_epoch = state.history, state.best_epoch
    kept = KEPT_LAST if patience is None else KEPT_BEST
    trainer.head.load_state_dict(state.best_state)
    final = trainer.evaluate()
    final["prompts"] = counts["heldout_prompts" if trainer.has_heldout else "train_prompts"]
    group.check_same_parameters(trainer.head)
    head = trainer.head.to("cpu")
    head.metadata = {
        "trained_by": "vllm-recontrol train",
        "base_model": head.base_model,
        "hidden_size": data.hidden_size,
        "target": opts.target,
        "td_lambda": opts.td_lambda if opts.target == "td-lambda" else None,
        "data": {"path": str(Path(opts.data).resolve()),
                 "manifest_sha256": manifest_sha256(data.path),
                 "labels": data.labels, "labels_info_sha256": data.label_info_sha256,
                 "rewards_sha256": data.rewards_sha256,
                 "label_source": data.label_info.get("source"),
                 # how the prompts were written when the states were collected: a server
                 # should send them alike (a chat template or not) for the states to match
                 "prompt_format": _prompts_section(data.manifest).get("prompt_format"),
                 "chat_template": data.manifest.get("chat_template"),
                 "collected_with": data.manifest.get(SOFTWARE), **counts},
        "trained_with": package_versions(),
        "hyperparameters": {**{k: v for k, v in asdict(opts).items()
                               if k not in ("data", "out", "progress")},
                            "patience": patience},  # as applied (None: every epoch ran)
        "processes": group.world,
        "resumed_from_epoch": resumed_from,
        "metrics": {"split": "heldout" if trainer.has_heldout else "train (no held-out split)",
                    # the epoch whose head is saved, and how it was chosen
                    "best_epoch": best_epoch, "kept": kept,
                    "epochs_run": len(history),
                    "train_reward_mean": trainer.train_mean,
                    "train_state_reward_mean": trainer.train_state_mean, **final},
        "history": history,
    }
    _save_head(head, opts, group)
    split = "held-out" if trainer.has_heldout else "train (no held-out)"
    summary = {
        "target": opts.target + (f" (lambda {opts.td_lambda})" if opts.target == "td-lambda" else ""),
        "widths": head.widths,
        "device": str(trainer.device) + (f" x {group.world} processes" if group.distributed
                                         else ""),
        "train prompts / responses / states": f"{counts['train_prompts']} / "
        f"{counts['train_responses']} / {counts['train_states']}",
        "held-out prompts / responses / states": f"{counts['heldout_prompts']} / "
        f"{counts['heldout_responses']} / {counts['heldout_states']}",
        "epochs run (kept)": f"{len(history)} ({best_epoch}: {kept})",
        f"{split} MSE V(s_t) vs r": final["mse"],
        f"{split} MSE train states' mean vs r (trivial)": final["trivial_mse"],
        f"{split} MSE V(s_0) vs r": final["mse_s0"],
        f"{split} MSE train responses' mean vs r at s_0 (trivial)": final["trivial_mse_s0"],
        f"{split} Pearson V(s_0), r": final["pearson_s0"],
        f"{split} Pearson constant, r (trivial)": final["trivial_pearson_s0"],
        "wall time (s)": round(time.perf_counter() - started, 1),
        "value head": str(opts.out),
    }
    warnings = quality_warnings(head.metadata["metrics"])
    if group.is_main:
        print(summary_table(f"vllm-recontrol train -> {opts.out}", list(summary.items())),
              flush=True)
        for warning in warnings:
            print(f"warning: {warning}", flush=True)
    return {**summary, "metrics": head.metadata["metrics"], "warnings": warnings}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vllm-recontrol train",
        description="Train a RE-Control value head on labelled states (streamed from disk) and "
                    "save it for `--model-impl recontrol`. Data-parallel over several "
                    "processes (GPUs, machines) under torchrun: `torchrun --nproc-per-node N "
                    "-m vllm_recontrol.cli train ...`.")
    parser.add_argument("--data", help="folder written by collect and labelled by label")
    parser.add_argument("--out", help="value head folder to write")
    parser.add_argument("--labels", help="label set name (default: the only one)")
    parser.add_argument("--target", choices=TARGETS,
                        help="bellman (paper, default): V(s_t) -> stopgrad V(s_{t+1}), "
                             "V(s_T) -> r; mc: every V(s_t) -> r (the same fixed point with one "
                             "response per prompt; fitted small data better in our tests); "
                             "td-lambda: lambda-returns, bootstrapped per shard window")
    parser.add_argument("--td-lambda", type=float, help="lambda of td-lambda (default 0.9)")
    parser.add_argument("--target-sync-steps", type=int,
                        help="Bellman: refresh the bootstrap (target) network every N steps "
                             "(default 1: stop-gradient through the current weights)")
    parser.add_argument("--widths", type=int, nargs="+",
                        help="hidden layer widths (default: one layer of the model's width)")
    parser.add_argument("--init-head", help="start from this value head")
    parser.add_argument("--lr", type=float, help="Adam learning rate (paper 1e-4)")
    parser.add_argument("--batch-size", type=int, help="states per step (paper 512)")
    parser.add_argument("--epochs", type=int, help="maximum epochs (paper 100)")
    parser.add_argument("--weight-decay", type=float, help="(paper 0)")
    parser.add_argument("--heldout-fraction", type=float, help="prompts held out (default 0.1)")
    parser.add_argument("--patience", type=int,
                        help="early-stopping patience in epochs; the epoch of the best "
                             "held-out MSE is saved (default 10; with the bellman target none: "
                             "it trains every epoch and saves the last)")
    parser.add_argument("--min-delta", type=float,
                        help="minimum held-out MSE improvement (with a patience)")
    parser.add_argument("--shuffle-shards", type=int,
                        help="shards loaded and shuffled together (memory vs. mixing; 4)")
    parser.add_argument("--device", help="auto (default), cpu, cuda, cuda:1, ...")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--allow-partial", action="store_true",
                        help="train on the shards collected and labelled so far")
    parser.add_argument("--checkpoint",
                        help="folder for the training state after every epoch; a run started "
                             "with the same options and folder resumes where it stopped. Under "
                             "torchrun it must be on a filesystem every process sees (not a "
                             "node-local disk): rank 0 writes it and every process reads it")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    options = parse_command_line(parser, argv, required=("data", "out"))
    code = run_main(train, options)
    try:
        launched = world_size() > 1
    except DataError:  # a WORLD_SIZE that is no number: run_main has said so
        launched = False
    if launched:
        # One process of a torchrun job, its process group destroyed and the head saved:
        # leave without Python's and C++'s finalisers, where Gloo's worker threads now and
        # then abort a finished process ("terminate called without an active exception",
        # seen once under CI load) and torchrun then reports the whole job as failed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
