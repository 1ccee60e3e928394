"""The ascent replayed as CUDA graphs, one graph per (row bucket, iteration count).

vLLM runs ``compute_logits`` eagerly (only the model forward is graph-captured), and an eager
ascent is 2 x layers x steps kernel launches from Python: on an H100 host about 0.1 ms each,
12.7 ms for a 2-layer, 30-step ascent whose kernels take 1.5 ms (benchmarks/results/
kernel-h100.md). Replaying a captured graph issues them all at once. The torch closed form
(the exact-fp32 path on CUDA) is replayed the same way.

Rows are padded to a bucket (16, 32, 64, then multiples of 64) so that a few graphs serve
every batch size; padded rows have steps 0 and never move. Inputs are copied into static
buffers, outputs come back from one; every bucket's graph reads leading rows of the same
buffers (graphs replay one at a time), so they cost the largest bucket's memory, not the sum.
Growing them past the largest bucket drops the graphs, which point at the old ones; the
engine's warm-up reserves the largest bucket first. Each graph keeps the weights it reads
alive. The warm-up's graphs are kept for good; of those captured while serving (other step
counts, rounded by ``controller.graph_iterations``) the least recently used is dropped past
``max_graphs``. A graph that cannot be captured is logged once and its key runs eagerly from then on.
After the engine's warm-up (``warm``), a capture stalls a live batch, so each is logged.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch

from .ascent import MLPWeights, ascend_float32, ascend_gram_float32
from .logs import get_logger

logger = get_logger(__name__)

SMALL_BUCKETS = (16, 32, 64)  # one weight-streaming row tile each: padding is free
BUCKET_STEP = 64              # larger batches: the kernel's row tiles are 64 or 128 rows
DEFAULT_MAX_GRAPHS = 64  # captured while serving, least recently used dropped first; the
#                          warm-up's graphs (every row bucket x warmup_steps) come on top


def capture_graph(fn: Callable[[], object], device: torch.device, pool=None,
                  stream: torch.cuda.Stream | None = None):
    """Run ``fn`` twice on a side stream (Triton compiles, the allocator settles), then
    capture one call in a CUDA graph; the benchmark times graphs made here too. ``stream``:
    the side stream to use (its attributes, e.g. an L2 access-policy window, go with the
    captured kernels); a fresh one by default."""
    stream = stream if stream is not None else torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
        fn()
    return graph


def buckets_up_to(max_rows: int) -> list[int]:
    """Every bucket a batch of 1 to ``max_rows`` rows can land in, smallest first."""
    last = bucket_rows(max_rows)
    small = [b for b in SMALL_BUCKETS if b <= last]
    return small + list(range(SMALL_BUCKETS[-1] + BUCKET_STEP, last + 1, BUCKET_STEP))


def bucket_rows(rows: int) -> int:
    """Rows a batch of ``rows`` is padded to."""
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    for bucket in SMALL_BUCKETS:
        if rows <= bucket:
            return bucket
    return -(-rows // BUCKET_STEP) * BUCKET_STEP


@dataclass
class _Static:
    """Inputs and output of the graphs of one (width, device); a bucket uses leading rows."""

    states: torch.Tensor
    alpha: torch.Tensor
    steps: torch.Tensor
    radius: torch.Tensor  # per-row max_norm (inf: unprojected), read only by projected graphs
    out: torch.Tensor

    @classmethod
    def allocate(cls, rows: int, dim: int, device: torch.device) -> "_Static":
        """Made outside inference mode even when called inside it (vLLM runs the engine's
        warm-up and edits there): an inference tensor cannot be written in place outside
        that mode, and a head used there may later be called directly (a script, a
        benchmark). Normal tensors can be written in place in both modes."""
        f32 = torch.float32  # explicit: vLLM changes the default dtype while it builds models
        with torch.inference_mode(False):
            return cls(states=torch.zeros(rows, dim, device=device, dtype=f32),
                       alpha=torch.zeros(rows, device=device, dtype=f32),
                       steps=torch.zeros(rows, device=device, dtype=torch.int64),
                       radius=torch.full((rows,), float("inf"), device=device, dtype=f32),
                       out=torch.zeros(rows, dim, device=device, dtype=f32))


class AscentGraphs:
    """Run the ascent through cached CUDA graphs (see the module doc).

    ``capture=False`` runs the same padding and buffers without graphs (CPU tests of the
    bookkeeping; the kernels then run under Triton's interpreter).
    """

    def __init__(self, max_graphs: int = DEFAULT_MAX_GRAPHS, capture: bool = True) -> None:
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        self.max_graphs = max_graphs
        self.capture = capture
        self._static: dict[tuple, _Static] = {}  # (dim, device) -> buffers of the largest bucket
        self._graphs: OrderedDict[tuple, tuple[object, MLPWeights]] = OrderedDict()
        self._pinned: set[tuple] = set()  # captured by the warm-up: never evicted
        self._pool = None
        self.captures = 0
        self.warm = False  # set by the warm-up: later captures happen while serving
        self.pinning = False  # set during the warm-up: what it captures is kept for good

    def run(self, mlp: MLPWeights, states32: torch.Tensor, alpha: torch.Tensor,
            steps: torch.Tensor, num_iterations: int, max_norm: float | torch.Tensor | None,
            precision: str, batch_invariant: bool = False,
            backend: str = "triton", form: str = "direct") -> torch.Tensor:
        """u for ``states32`` (``[B, d]`` float32); valid until the next call. ``backend``
        "torch" replays the closed form (``ascend_float32``, fp32 weights) instead; ``form``
        "gram" runs either backend's Gram form (``mlp.first_gram`` set).
        ``max_norm`` (one radius, or one per row) goes through a buffer too, so every radius
        shares the projected graph of its shape."""

        rows, dim = states32.shape
        bucket = bucket_rows(rows)
        device = states32.device
        static = self.reserve(bucket, dim, device)
        states_in, alpha_in, steps_in, radius_in, out = (t[:bucket] for t in (
            static.states, static.alpha, static.steps, static.radius, static.out))
        states_in[:rows].copy_(states32)
        alpha_in[:rows].copy_(alpha)
        alpha_in[rows:].zero_()
        steps_in[:rows].copy_(steps)
        steps_in[rows:].zero_()
        project = max_norm is not None
        if project:
            if isinstance(max_norm, torch.Tensor):
                radius_in[:rows].copy_(max_norm)
            else:
                radius_in[:rows].fill_(max_norm)
            radius_in[rows:].fill_(float("inf"))
        radius = radius_in if project else None

        if backend == "torch":
            closed_form = ascend_gram_float32 if form == "gram" else ascend_float32

            def ascent() -> None:  # its scratch comes from the graph pool, like the kernel's
                out.copy_(closed_form(mlp, states_in, alpha_in, steps_in, num_iterations,
                                      radius, batch_invariant=batch_invariant))
        elif form == "gram":
            from .kernels.value_ascent import triton_ascend_gram

            def ascent() -> None:
                triton_ascend_gram(mlp, states_in, alpha_in, steps_in, num_iterations, radius,
                                   precision=precision, out=out,
                                   batch_invariant=batch_invariant)
        else:
            from .kernels.value_ascent import triton_ascend

            def ascent() -> None:
                triton_ascend(mlp, states_in, alpha_in, steps_in, num_iterations, radius,
                              precision=precision, out=out, batch_invariant=batch_invariant)

        gram = () if mlp.first_gram is None else (mlp.first_gram,)
        key = (bucket, dim, device, num_iterations, project, backend, precision,
               batch_invariant, form,
               tuple(t.data_ptr() for t in (*mlp.weights, *mlp.biases, *gram)))
        graph = self._graph(key, ascent, mlp, device) if self.capture else None
        if graph is None:
            ascent()
        else:
            graph.replay()
        return out[:rows]

    def reserve(self, rows: int, dim: int, device: torch.device) -> _Static:
        """Static buffers for at least ``rows`` rows of width ``dim`` (grown, never shrunk)."""
        static = self._static.get((dim, device))
        if static is None or static.states.shape[0] < rows:
            if static is not None:  # their graphs read the old buffers
                self._graphs = OrderedDict((k, v) for k, v in self._graphs.items()
                                           if k[1:3] != (dim, device))
                self._pinned &= set(self._graphs)
            static = self._static[(dim, device)] = _Static.allocate(rows, dim, device)
        return static

    def _graph(self, key: tuple, ascent: Callable[[], None], mlp: MLPWeights,
               device: torch.device):
        """The cached graph of ``key`` (captured now if new), or None to run eagerly."""
        if key in self._graphs:
            self._graphs.move_to_end(key)
            return self._graphs[key][0]
        try:
            if self._pool is None:  # scratch is dead between replays: one pool serves all graphs
                self._pool = torch.cuda.graph_pool_handle()
            graph = capture_graph(ascent, device, self._pool)
            self.captures += 1
            if self.warm:
                logger.info("RE-Control: captured the ascent for %d-row batches with %d steps "
                            "while serving (a one-off stall; the engine's warm-up captures the "
                            "step counts in warmup_steps)", key[0], key[3])
        except Exception as exc:  # never take the engine down for a missing speed-up
            logger.warning("RE-Control: CUDA graph capture of the ascent failed (%s: %s); "
                           "this batch shape runs eagerly", type(exc).__name__, exc)
            graph = None
        self._graphs[key] = (graph, mlp)  # the graph reads these weights: keep them alive
        if self.pinning:
            self._pinned.add(key)
        elif len(self._graphs) - len(self._pinned) > self.max_graphs:
            # the least recently used of those captured while serving; the warm-up's stay,
            # or a burst of unusual batches would evict the graphs most batches use
            oldest = next(k for k in self._graphs if k not in self._pinned)
            del self._graphs[oldest]
        return graph

    def __len__(self) -> int:
        return len(self._graphs)
