"""Per-row control state of a running batch, and the edit applied to the sampled states.

vLLM tells a logits processor how its persistent batch changes (rows added, removed, moved)
before every forward pass; ``RowControls`` mirrors that as per-row (alpha, steps) and hands
the logits layer device tensors for exactly the next sampling call. Nothing here imports vLLM.
"""

from __future__ import annotations

import threading
import time

import torch

from .backends import choose_backend, choose_precision
from .config import UNCONTROLLED, EngineSettings, RowControl
from .errors import ConfigError
from .logs import get_logger
from .value_head import ValueHead

logger = get_logger(__name__)

NONFINITE_REPORT_EVERY = 512  # edits between host syncs that report non-finite rows


class RowControls:
    """(alpha, steps) per persistent-batch row, mirrored to the device when the batch changes.

    ``arm()`` is called once before each forward pass; ``take(rows)`` is then valid for the
    first logits call of that pass only. Later calls in the same pass (prompt logprobs) and
    calls with no pass before them (profiling, warm-up) get ``None`` and pass through.
    """

    def __init__(self) -> None:
        self.rows: list[RowControl] = []
        self.batch_size = 0
        self.device: torch.device | None = None
        self._armed = False
        self._dirty = True
        self._alpha: torch.Tensor | None = None
        self._steps: torch.Tensor | None = None
        self._max_steps = 0

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

    def take(self, rows: int) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """(alpha, steps, max steps) for the sampling call of this pass, or None to pass through."""
        if not self._armed:
            return None
        self._armed = False
        if rows != self.batch_size:
            # Not the sampling call of this pass (its row count is the batch size).
            return None
        if self._dirty:
            self._upload()
        if self._max_steps == 0:
            return None
        return self._alpha[:rows], self._steps[:rows], self._max_steps

    def _upload(self) -> None:
        live = self.rows[:self.batch_size] + [UNCONTROLLED] * max(0, self.batch_size - len(self.rows))
        active = [r if r.active else UNCONTROLLED for r in live]
        self._max_steps = max((r.steps for r in active), default=0)
        if self._max_steps:
            alpha = torch.tensor([r.alpha for r in active], dtype=torch.float32)
            steps = torch.tensor([r.steps for r in active], dtype=torch.int64)
            # Fresh host tensors each time: a later batch change cannot race this copy.
            self._alpha = alpha.to(self.device, non_blocking=True)
            self._steps = steps.to(self.device, non_blocking=True)
        self._dirty = False


_ROWS_BY_ENGINE: dict[str, RowControls] = {}
_ROWS_LOCK = threading.Lock()


def rows_for_engine(engine_id: str) -> RowControls:
    """The one ``RowControls`` shared by an engine's logits processor and its logits layer."""
    with _ROWS_LOCK:
        return _ROWS_BY_ENGINE.setdefault(engine_id, RowControls())


def warm_up_rows(device: torch.device, settings: EngineSettings,
                 max_rows: int | None) -> int | None:
    """The batch size to warm up to at engine start, or None. Only CUDA has first-use costs
    (Triton compiles, CUDA-graph captures; ``ValueHead.warm_up`` knows which apply), and only
    when the engine's largest batch and some step count are known."""
    if device.type != "cuda" or not max_rows or max_rows < 1:
        return None
    return max_rows if settings.warm_up_counts else None


class EditController:
    """Applies RE-Control to the rows of a sampling call that asked for it."""

    def __init__(self, head: ValueHead, settings: EngineSettings, rows: RowControls,
                 max_rows: int | None = None, batch_invariant: bool = False) -> None:
        """``max_rows``: the engine's largest batch (max_num_seqs); with it, the first logits
        call that is not a sampling call (vLLM's profiling run) compiles and captures the
        ascent for every row bucket up to it, see ``warm_up``. ``batch_invariant``: the
        resolved setting (the engine key, or vLLM's own when the key is "auto")."""
        self.head = head
        self.settings = settings
        self.rows = rows
        self.batch_invariant = batch_invariant
        self._edits = 0
        # Resolved once: a forced backend that cannot run fails at engine start, not mid-serve.
        device = head.layers[0].weight.device
        try:
            self.backend = choose_backend(settings.backend, device, len(head.widths),
                                          settings.precision)
        except ValueError as exc:
            raise ConfigError(f'additional_config["recontrol"]["backend"]: {exc}') from exc
        try:
            products = choose_precision(settings.precision, self.backend)
        except ValueError as exc:
            raise ConfigError(f'additional_config["recontrol"]["precision"]: {exc}') from exc
        graphs = settings.cuda_graphs and device.type == "cuda"
        logger.info("RE-Control ascent: %s backend, %s products, CUDA graphs %s%s",
                    self.backend, "fp32" if products == "ieee" else products,
                    "on" if graphs else "off", ", batch-invariant" if batch_invariant else "")
        self._warm_rows = warm_up_rows(device, settings, max_rows)

    def warm_up(self) -> int:
        """Compile (and capture) the ascent for every row bucket and warm-up step count now.

        Called from vLLM's memory-profiling logits call, so the graphs' memory is counted
        before the KV cache is sized. A failure only costs the speed-up: it is logged and
        serving captures lazily as before. Returns the number of ascents run."""
        rows, self._warm_rows = self._warm_rows, None
        if rows is None:
            return 0
        start = time.perf_counter()
        try:
            runs = self.head.warm_up(rows, self.settings.warm_up_counts,
                                     max_norm=self.settings.max_norm, backend=self.backend,
                                     precision=self.settings.precision,
                                     cuda_graphs=self.settings.cuda_graphs,
                                     batch_invariant=self.batch_invariant)
        except Exception as exc:  # never take the engine down for a missing speed-up
            logger.warning("RE-Control warm-up failed (%s: %s); kernels compile and graphs are "
                           "captured on first use instead", type(exc).__name__, exc)
            return 0
        if runs:
            logger.info("RE-Control warm-up: %d ascents (batches up to %d rows, steps %s) "
                        "compiled%s in %.1f s", runs, rows, list(self.settings.warm_up_counts),
                        " and captured" if self.settings.cuda_graphs else "",
                        time.perf_counter() - start)
        return runs

    def maybe_edit(self, hidden_states: torch.Tensor) -> torch.Tensor:
        plan = self.rows.take(hidden_states.shape[0])
        if plan is None:
            if self._warm_rows is not None and hidden_states.shape[0] > 0:
                self.warm_up()  # the first pass-through call: vLLM's profiling run
            return hidden_states
        alpha, steps, max_steps = plan
        edited = self.head.ascend(hidden_states, alpha, steps, max_norm=self.settings.max_norm,
                                  num_iterations=max_steps, backend=self.backend,
                                  precision=self.settings.precision,
                                  cuda_graphs=self.settings.cuda_graphs,
                                  batch_invariant=self.batch_invariant)
        self._edits += 1
        if self._edits % NONFINITE_REPORT_EVERY == 0:
            self.head.nonfinite_rows()
        return edited
