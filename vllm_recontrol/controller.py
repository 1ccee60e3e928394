"""Per-row control state of a running batch, and the edit applied to the sampled states.

vLLM tells a logits processor how its persistent batch changes (rows added, removed, moved)
before every forward pass; ``RowControls`` mirrors that as per-row (alpha, steps) and hands
the logits layer device tensors for exactly the next sampling call. Nothing here imports vLLM.
"""

from __future__ import annotations

import math
import threading
import time
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from .backends import check_form, choose_backend, choose_form, choose_precision
from .config import DEFAULT_HEAD, UNCONTROLLED, EngineSettings, RowControl
from .errors import ConfigError
from .logs import get_logger
from .value_head import ValueHead

logger = get_logger(__name__)

NONFINITE_REPORT_EVERY = 512  # edits between host syncs that report non-finite rows


@dataclass(frozen=True)
class HeadGroup:
    """The controlled rows of one sampling call that use one value head."""

    head: str
    rows: torch.Tensor | None  # their batch indices on the device; None: the whole batch
    alpha: torch.Tensor
    steps: torch.Tensor  # 0 for uncontrolled rows when ``rows`` is None
    max_steps: int
    controlled: int = 0  # rows this head edits in the call
    radius: torch.Tensor | None = None  # per-row max_norm (inf: none); None: no row capped


@dataclass
class EditStats:
    """What the edit did since the last stats line (counted on the host: no device sync)."""

    since: float = field(default_factory=time.monotonic)
    calls: int = 0
    rows: Counter = field(default_factory=Counter)  # controlled rows per head


class RowControls:
    """(alpha, steps, head, max_norm) per persistent-batch row, mirrored to the device when
    the batch changes.

    ``arm()`` is called once before each forward pass; ``take(rows)`` is then valid for the
    first logits call of that pass only. Later calls in the same pass (prompt logprobs) and
    calls with no pass before them (profiling, warm-up) get ``None`` and pass through.

    Under speculative decoding a request has one sampled row per draft token plus one
    (vLLM verifies every draft with the target's logits): ``expect_rows_per_request`` tells
    the pass's counts after ``arm()``, and every row of a request gets the request's control.
    """

    def __init__(self) -> None:
        self.rows: list[RowControl] = []
        self.batch_size = 0
        self.device: torch.device | None = None
        self._armed = False
        self._dirty = True
        self._groups: list[HeadGroup] = []
        self._rows_per_request: list[int] | None = None  # this pass's, under speculation
        self._uploaded_rows_per_request: list[int] | None = None

    # -- batch bookkeeping, in vLLM's order: removed, added, moved ----------------------------
    def reset(self, device: torch.device) -> None:
        self.rows, self.batch_size, self.device = [], 0, device
        self._armed, self._dirty = False, True

    def _grow(self, index: int) -> None:
        if index >= len(self.rows):
            self.rows.extend([UNCONTROLLED] * (index + 1 - len(self.rows)))

    def set(self, index: int, control: RowControl) -> None:
        self._grow(index)
        self.rows[index] = control
        self._dirty = True

    def clear(self, index: int) -> None:
        self.set(index, UNCONTROLLED)

    def swap(self, a: int, b: int) -> None:
        self._grow(max(a, b))
        self.rows[a], self.rows[b] = self.rows[b], self.rows[a]
        self._dirty = True

    def move(self, src: int, dst: int) -> None:
        """One-way move: ``dst`` takes ``src``'s request, ``src`` becomes empty."""
        self._grow(max(src, dst))
        self.rows[dst], self.rows[src] = self.rows[src], UNCONTROLLED
        self._dirty = True

    def resize(self, batch_size: int) -> None:
        if batch_size != self.batch_size:
            self.batch_size = batch_size
            self._dirty = True

    # -- per forward pass -------------------------------------------------------------------
    def arm(self) -> None:
        self._armed = True
        self._rows_per_request = None

    def expect_rows_per_request(self, counts: Sequence[int]) -> None:
        """This pass's sampling call has ``counts[i]`` rows for request ``i`` (speculative
        decoding: its draft tokens plus one), in batch order. Call after ``arm()``."""
        self._rows_per_request = [int(c) for c in counts]

    def _expected_rows(self) -> int:
        if self._rows_per_request is None:
            return self.batch_size
        return sum(self._rows_per_request[:self.batch_size])

    def take(self, rows: int) -> list[HeadGroup] | None:
        """The controlled rows of this pass's sampling call, one group per value head in use
        (sorted by name), or None to pass through."""
        if not self._armed:
            return None
        self._armed = False
        if rows != self._expected_rows():
            # Not the sampling call of this pass (its row count is the batch size, or under
            # speculative decoding the requests' draft tokens plus one each).
            return None
        if self._dirty or self._rows_per_request != self._uploaded_rows_per_request:
            self._upload()
        return self._groups or None

    def _upload(self) -> None:
        live = self.rows[:self.batch_size] + [UNCONTROLLED] * max(0, self.batch_size - len(self.rows))
        counts = self._rows_per_request
        if counts is not None:  # each request's control on each of its rows
            live = [control for control, count in zip(live, counts) for _ in range(count)]
        self._uploaded_rows_per_request = counts
        active = [r if r.active else UNCONTROLLED for r in live]
        heads = sorted({r.head for r in active if r.active})
        if len(heads) == 1:  # the common case: the whole batch, no gather
            self._groups = [self._group(heads[0], None, active)]
        else:
            self._groups = [self._group(head, [i for i, r in enumerate(active)
                                               if r.active and r.head == head], active)
                            for head in heads]
        self._dirty = False

    def _group(self, head: str, indices: list[int] | None, active: list[RowControl]) -> HeadGroup:
        chosen = active if indices is None else [active[i] for i in indices]
        # Fresh host tensors each time: a later batch change cannot race these copies.
        def upload(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

        return HeadGroup(
            head=head, rows=None if indices is None else upload(indices, torch.int64),
            alpha=upload([r.alpha for r in chosen], torch.float32),
            steps=upload([r.steps for r in chosen], torch.int64),
            max_steps=max(r.steps for r in chosen),
            controlled=sum(r.active for r in chosen),
            radius=(upload([math.inf if r.max_norm is None else r.max_norm for r in chosen],
                           torch.float32)
                    if any(r.max_norm is not None for r in chosen) else None))


def resolve_ascent(settings: EngineSettings, head: ValueHead, device: torch.device,
                   name: str | None = None) -> tuple[str, str]:
    """(backend, product precision) of ``head`` on ``device`` under the engine keys; a
    combination that cannot run is a ``ConfigError`` naming the key (and ``name``, the
    head's, where the form is one this head cannot run)."""
    try:
        backend = choose_backend(settings.backend, device, len(head.widths), settings.precision)
    except ValueError as exc:
        raise ConfigError(f'additional_config["recontrol"]["backend"]: {exc}') from exc
    try:
        products = choose_precision(settings.precision, backend)
    except ValueError as exc:
        raise ConfigError(f'additional_config["recontrol"]["precision"]: {exc}') from exc
    check_ascent_form(settings, head, name)
    return backend, products


def check_ascent_form(settings: EngineSettings, head: ValueHead,
                      name: str | None = None) -> None:
    """The engine's ``ascent_form`` for ``head`` (no device decides it); ``name``: the
    head's, said in the error (one of several heads may be the only one it cannot run)."""
    try:
        check_form(settings.ascent_form, head.widths)
    except ValueError as exc:
        which = f" (value head {name!r})" if name else ""
        raise ConfigError(f'additional_config["recontrol"]["ascent_form"]: {exc}{which}') \
            from exc


_ROWS_BY_ENGINE: dict[str, RowControls] = {}
_ROWS_LOCK = threading.RLock()  # re-entrant: a finalizer may drop rows during a GC under it


def rows_for_engine(engine_id: str, owner: object | None = None) -> RowControls:
    """The one ``RowControls`` shared by an engine's logits processor and its logits layer;
    dropped when ``owner`` (an object that lives as long as the engine) is freed, so
    in-process engines started one after another do not each leave theirs behind."""
    with _ROWS_LOCK:
        rows = _ROWS_BY_ENGINE.get(engine_id)
        if rows is None:
            rows = _ROWS_BY_ENGINE[engine_id] = RowControls()
            if owner is not None:
                weakref.finalize(owner, _drop_rows, engine_id, rows)
        return rows


def _drop_rows(engine_id: str, rows: RowControls) -> None:
    with _ROWS_LOCK:
        if _ROWS_BY_ENGINE.get(engine_id) is rows:
            del _ROWS_BY_ENGINE[engine_id]


def warm_up_rows(device: torch.device, settings: EngineSettings,
                 max_rows: int | None) -> int | None:
    """The batch size to warm up to at engine start, or None. Only CUDA has first-use costs
    (Triton compiles, CUDA-graph captures; ``ValueHead.warm_up`` knows which apply), and only
    when the engine's largest batch and some step count are known."""
    if device.type != "cuda" or not max_rows or max_rows < 1:
        return None
    return max_rows if settings.warm_up_counts else None


def graph_iterations(max_steps: int, warmed: Sequence[int], limit: int) -> int:
    """The loop count of a batch whose largest ``steps`` is ``max_steps``, where CUDA graphs
    replay the ascent: the smallest of the warmed-up counts, the powers of two and ``limit``
    (the engine's max_steps) that is at least ``max_steps``.

    Why: each loop count is its own graph per row bucket, so requests asking for many step
    counts would each capture one (a stall of a live batch) and thrash the graph cache. Rows
    with fewer steps than the loop stop changing (same bits: tested), so rounding up changes
    no edit; it costs at most twice the iterations the batch needs, and a server then holds
    about log2(max_steps) graphs per bucket beyond the warmed counts."""
    if max_steps <= 0:
        return max_steps
    power = 1 << (max_steps - 1).bit_length()
    return min(c for c in (*warmed, power, limit) if c >= max_steps)


class EditController:
    """Applies RE-Control to the rows of a sampling call that asked for it, each row with the
    value head it named."""

    def __init__(self, heads: ValueHead | Mapping[str, ValueHead], settings: EngineSettings,
                 rows: RowControls, max_rows: int | None = None,
                 batch_invariant: bool = False, stats_interval: float = 10.0) -> None:
        """``heads``: by name (``settings.head_names``); one head is the engine's default.
        ``max_rows``: the engine's largest sampling call (max_num_seqs rows, times drafts
        plus one under speculative decoding, at most a step's tokens); with it, the first logits
        call that is not a sampling call (vLLM's profiling run) compiles and captures the
        ascent for every row bucket up to it, see ``warm_up``. ``batch_invariant``: the
        resolved setting (the engine key, or vLLM's own when the key is "auto").
        ``stats_interval``: seconds between edit-statistics log lines (the adapter passes
        vLLM's ``VLLM_LOG_STATS_INTERVAL``)."""
        self.heads = dict(heads) if isinstance(heads, Mapping) else {DEFAULT_HEAD: heads}
        self.settings = settings
        self.rows = rows
        self.batch_invariant = batch_invariant
        self._edits = 0
        self._stats = EditStats()
        self._stats_interval = stats_interval
        # Resolved once: a forced backend that cannot run fails at engine start, not mid-serve.
        resolved = {name: self._resolve(head) for name, head in self.heads.items()}
        self.backends = {name: backend for name, (backend, _) in resolved.items()}
        products = resolved[DEFAULT_HEAD][1]
        device = next(iter(self.heads.values())).layers[0].weight.device
        graphs = settings.cuda_graphs and device.type == "cuda"
        logger.info("RE-Control ascent: %s backend, %s products, %s form, CUDA graphs %s%s%s",
                    self.backends[DEFAULT_HEAD], "fp32" if products == "ieee" else products,
                    settings.ascent_form, "on" if graphs else "off",
                    ", batch-invariant" if batch_invariant else "",
                    f", value heads {list(self.heads)}" if len(self.heads) > 1 else "")
        self._warm_rows = warm_up_rows(device, settings, max_rows)
        # Under CUDA graphs a batch's loop count picks a graph: round it (graph_iterations)
        self.rounds_iterations = graphs

    def _resolve(self, head: ValueHead) -> tuple[str, str]:
        """(backend, product precision) of ``head`` under the engine keys."""
        return resolve_ascent(self.settings, head, head.layers[0].weight.device)

    def warm_up(self) -> int:
        """Compile (and capture) the ascent for every row bucket and warm-up step count now.

        Called from vLLM's memory-profiling logits call, so the graphs' memory is counted
        before the KV cache is sized. A CUDA-graph capture that fails while the eager ascent
        works only costs the speed-up: ``AscentGraphs`` logs it and that shape runs eagerly.
        A failure of the ascent itself fails engine start (a ``ConfigError`` naming the head,
        backend, precision and form): the first controlled request would fail the same way,
        and there it would take the running engine and every request in it down. Returns
        the number of ascents run."""
        rows, self._warm_rows = self._warm_rows, None
        if rows is None:
            return 0
        start = time.perf_counter()
        runs = sum(self._warm_up_head(name, head, rows) for name, head in self.heads.items())
        if runs:
            logger.info("RE-Control warm-up: %d ascents (batches up to %d rows, steps %s) "
                        "compiled%s in %.1f s", runs, rows, list(self.settings.warm_up_counts),
                        " and captured" if self.settings.cuda_graphs else "",
                        time.perf_counter() - start)
        return runs

    def _warm_up_head(self, name: str, head: ValueHead, rows: int) -> int:
        """``head.warm_up`` under the engine's settings; its failure as a ``ConfigError``."""
        try:
            return head.warm_up(rows, self.settings.warm_up_counts_for(name),
                                max_norm=self.settings.max_norm_for(name),
                                backend=self.backends[name], precision=self.settings.precision,
                                cuda_graphs=self.settings.cuda_graphs,
                                batch_invariant=self.batch_invariant,
                                also_projected=self.settings.warmup_projected,
                                form=self.settings.ascent_form)
        except Exception as exc:
            raise ConfigError(self._warm_up_failure(name, head, exc)) from exc

    def _warm_up_failure(self, name: str, head: ValueHead, exc: Exception) -> str:
        """What failed at warm-up, with the resolved backend, precision and form, and what
        to change."""
        backend = self.backends[name]
        try:
            products = choose_precision(self.settings.precision, backend)
            form = choose_form(self.settings.ascent_form, backend, head.widths,
                               head.hidden_size)
        except ValueError:  # checked at construction; keep the original error in view
            products, form = self.settings.precision, self.settings.ascent_form
        if isinstance(exc, torch.OutOfMemoryError):
            remedy = ("the ascents of a full batch (max_num_seqs rows, times drafts + 1 under "
                      "speculative decoding) and their graphs do not "
                      "fit beside the model: lower --max-num-seqs or --gpu-memory-utilization, "
                      "or warm fewer step counts (warmup_steps)")
        else:
            remedy = ("choose another backend, precision or ascent_form in "
                      'additional_config["recontrol"] (e.g. "backend": "torch")')
        return (f"RE-Control warm-up: the ascent of value head {name!r} failed at engine start "
                f"({backend} backend, {'fp32' if products == 'ieee' else products} products, "
                f"{form} form): {type(exc).__name__}: {exc}. Every controlled request would "
                f"fail the same way; {remedy}")

    def maybe_edit(self, hidden_states: torch.Tensor) -> torch.Tensor:
        groups = self.rows.take(hidden_states.shape[0])
        if groups is None:
            if self._warm_rows is not None and hidden_states.shape[0] > 0:
                self.warm_up()  # the first pass-through call: vLLM's profiling run
            return hidden_states
        if len(groups) == 1 and groups[0].rows is None:
            edited = self._ascend(groups[0], hidden_states)
        else:  # rows of several heads: each head edits its own rows, the rest stay as they are
            edited = hidden_states.clone()
            for group in groups:
                edited.index_copy_(0, group.rows, self._ascend(
                    group, hidden_states.index_select(0, group.rows)))
        self._edits += 1
        if self._edits % NONFINITE_REPORT_EVERY == 0:
            for head in self.heads.values():
                head.nonfinite_rows()
        self._count(groups)
        return edited

    def _count(self, groups: list[HeadGroup]) -> None:
        """Tally the call; every ``stats_interval`` seconds (vLLM's own stats period),
        log what the edit did, so an operator sees control at work and how much of it."""
        stats = self._stats
        stats.calls += 1
        for group in groups:
            stats.rows[group.head] += group.controlled
        elapsed = time.monotonic() - stats.since
        if elapsed < self._stats_interval:
            return
        fallbacks = sum(head.nonfinite_rows() for head in self.heads.values())
        per_head = ""
        if len(self.heads) > 1:
            per_head = " (" + ", ".join(f"{name} {count}"
                                        for name, count in sorted(stats.rows.items())) + ")"
        logger.info("RE-Control: %d sampling calls edited in the last %.1f s, %d controlled "
                    "rows%s; %d non-finite edits fell back unedited since start",
                    stats.calls, elapsed, sum(stats.rows.values()), per_head, fallbacks)
        self._stats = EditStats()

    def iterations_for(self, group: HeadGroup) -> int:
        """The ascent's loop count for ``group``: its largest steps, rounded up where CUDA
        graphs replay the ascent (``graph_iterations``)."""
        if not self.rounds_iterations:
            return group.max_steps
        return graph_iterations(group.max_steps, self.settings.warm_up_counts_for(group.head),
                                self.settings.max_steps)

    def _ascend(self, group: HeadGroup, states: torch.Tensor) -> torch.Tensor:
        return self.heads[group.head].ascend(
            states, group.alpha, group.steps, max_norm=group.radius,
            num_iterations=self.iterations_for(group), backend=self.backends[group.head],
            precision=self.settings.precision, cuda_graphs=self.settings.cuda_graphs,
            batch_invariant=self.batch_invariant, form=self.settings.ascent_form)
