"""The value-head artifact: a ReLU MLP V(s) on post-norm hidden states, and its control step.

On disk a head is a folder with ``config.json`` and ``model.safetensors`` (``head_files``
reads and validates both: nothing is ever unpickled, so a head from an untrusted source
fails with a message instead of running code); ``ascent_arguments`` checks what ``ascend``
is given.
"""

from __future__ import annotations

import functools
import json
import math
import numbers
import threading
import weakref
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .ascent import (AscentWorkspace, MLPWeights, as_row_tensor, ascend_float32,
                     ascend_gram_float32, product_rows, with_first_gram)
from .backends import choose_backend, choose_form, choose_precision
from .ascent_arguments import check_row_controls, checked_radius, iteration_count
from .errors import ValueHeadError
from .files import atomic_path, write_text_atomic
from .head_files import (CONFIG_FILE, FORMAT_NAME, FORMAT_VERSION, SAVE_ID_KEY, STORED_DTYPES,
                         WEIGHTS_FILE, check_provenance, check_same_save, check_shape_config,
                         foreign_config_problem, is_positive_integer, json_problem,
                         read_config, read_weights, weights_id, weights_metadata)
from .head_source import locate_head
from .logs import get_logger

logger = get_logger(__name__)

# One lock per head (made on first use; gone with the head): see _one_thread_per_head.
_HEAD_LOCKS: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = \
    weakref.WeakKeyDictionary()
_HEAD_LOCKS_GUARD = threading.Lock()


def _one_thread_per_head(method: Any) -> Any:
    """Run ``method`` for one thread at a time per head. Why: the buffers an ascent writes
    (its workspace, the kernel's output, CUDA graphs, the weight cache) are the head's own
    and reused, so two threads ascending with one head would overwrite each other's edits
    (seen: up to the whole edit wrong, without an error). Heads of their own run apart."""
    @functools.wraps(method)
    def one_at_a_time(self: Any, *args: Any, **kwargs: Any) -> Any:
        with _HEAD_LOCKS_GUARD:
            lock = _HEAD_LOCKS.setdefault(self, threading.RLock())
        with lock:
            return method(self, *args, **kwargs)
    return one_at_a_time


# ``seed`` that ``load`` passes: parameters allocated and left unset (it overwrites them all)
_UNSET: Any = object()


class ValueHead(nn.Module):
    """V(s) = Linear(h_L, 1)(relu(... relu(Linear(d, h_1)(s)))) with biases, no input norm.

    ``widths`` lists the hidden layer sizes (the paper uses one or two layers of width d).
    """

    def __init__(
        self,
        hidden_size: int,
        widths: Sequence[int],
        seed: int | None = None,
        base_model: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        check_shape_config(hidden_size, widths, source="ValueHead()")
        self.hidden_size = int(hidden_size)
        self.widths = [int(w) for w in widths]
        check_provenance(base_model, metadata, source="ValueHead()")
        self.base_model = base_model
        self.metadata = dict(metadata or {})
        # the digest of the weights as loaded (``load``); None for a head built in memory
        self.loaded_weights_id: str | None = None
        sizes = [self.hidden_size, *self.widths, 1]
        unset = seed is _UNSET
        if not (seed is None or unset or isinstance(seed, numbers.Integral)) or \
                isinstance(seed, bool):
            raise ValueHeadError(f"ValueHead(): seed must be an integer or None, got {seed!r}")
        generator = torch.Generator().manual_seed(int(seed)) if seed is not None and not unset \
            else None
        self.layers = nn.ModuleList()
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            # Explicit device/dtype: vLLM builds models under a default device and dtype.
            layer = nn.utils.skip_init(nn.Linear, fan_in, fan_out, device="cpu",
                                       dtype=torch.float32)
            if unset:  # ``load`` overwrites every value: drawing them first is wasted time
                pass
            elif generator is not None:  # same seed, same head, and the global RNG untouched
                bound = 1.0 / math.sqrt(fan_in)
                with torch.no_grad():
                    layer.weight.uniform_(-bound, bound, generator=generator)
                    layer.bias.uniform_(-bound, bound, generator=generator)
            else:
                layer.reset_parameters()  # torch's own initialisation, from the global RNG
            self.layers.append(layer)
        self._nonfinite_total = 0
        self._nonfinite_pending: torch.Tensor | None = None
        self._mlp_cache: dict[tuple[torch.dtype, bool], tuple[tuple, MLPWeights]] = {}
        self._workspace: AscentWorkspace | None = None
        self._kernel_out: torch.Tensor | None = None  # u of eager Triton launches (grow-only)
        self._graphs = None  # AscentGraphs, made on the first CUDA-graph ascent

    # ------------------------------------------------------------------ value and gradient
    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """V(states) as a ``[B]`` float32 tensor."""
        x = states.to(self.layers[0].weight.dtype)
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        return self.layers[-1](x).squeeze(-1).float()

    def float32_weights(self) -> MLPWeights:
        """Float32 copies of the weights (cached until a parameter changes in place or moves)."""
        return self._weights_as(torch.float32)

    def _adopt_inference_parameters(self) -> None:
        """Parameters made (or moved) under ``torch.inference_mode()`` as normal tensors:
        an inference tensor has no version counter, which the weight cache reads (ascend
        failed with "Inference tensors do not track version counter"), and cannot be
        changed in place outside that mode."""
        if not any(p.is_inference() for p in self.parameters()):
            return
        with torch.inference_mode(False):
            for layer in self.layers:
                for name in ("weight", "bias"):
                    old = getattr(layer, name)
                    if old.is_inference():
                        setattr(layer, name, nn.Parameter(old.detach().clone(),
                                                          requires_grad=old.requires_grad))

    def _weights_as(self, dtype: torch.dtype, gram: bool = False) -> MLPWeights:
        """Contiguous copies in ``dtype`` (with W1 W1^T for the Gram form when ``gram``),
        cached until a parameter changes in place or moves. A change through ``.data`` is
        not tracked (it does not count as a version of the parameter): float32 weights are
        read in place (no copy), but W1 W1^T stays stale; change weights under
        ``torch.no_grad()`` instead, as ``load_state_dict`` does."""
        self._adopt_inference_parameters()
        key = tuple((p.data_ptr(), p._version, p.device, p.dtype) for p in self.parameters())
        cached = self._mlp_cache.get((dtype, gram))
        if cached is None or cached[0] != key:
            with torch.no_grad():
                if gram:
                    mlp = with_first_gram(self._weights_as(dtype))
                else:
                    mlp = MLPWeights(
                        weights=[l.weight.detach().to(dtype).contiguous() for l in self.layers],
                        biases=[l.bias.detach().to(dtype).contiguous() for l in self.layers],
                    )
            cached = self._mlp_cache[(dtype, gram)] = (key, mlp)
        return cached[1]

    # ------------------------------------------------------------------ control step
    # An inference edit, never differentiated: inputs that require grad would otherwise
    # fail in the out= products and leave the reused buffers attached to autograd.
    @_one_thread_per_head
    @torch.no_grad()
    def ascend(
        self,
        states: torch.Tensor,
        alpha: float | torch.Tensor,
        steps: int | torch.Tensor,
        max_norm: float | Sequence[float] | torch.Tensor | None = None,
        num_iterations: int | None = None,
        backend: str = "auto",
        precision: str = "auto",
        cuda_graphs: bool = True,
        batch_invariant: bool = False,
        form: str = "auto",
    ) -> torch.Tensor:
        """RE-Control: u = 0; ``steps`` times u += alpha * grad V(s + u); return s + u.

        ``states`` is ``[B, d]`` in any float dtype; ``alpha``/``steps`` are scalars or per-row.
        ``max_norm`` projects u onto ||u|| <= max_norm after every step: one radius, or one
        per row (inf: that row unprojected; a CUDA tensor's values are not checked, which
        would cost a host sync: 0 or less leaves a row unedited).
        Rows with ``steps == 0`` or ``alpha == 0``, and rows whose edit is not finite, come back
        bit-identical. ``num_iterations``: the loop count, at least the largest ``steps``
        (refused below it when the steps are Python values or a CPU tensor); passing it
        spares reading CUDA steps back (a device sync), and there, unread, it bounds the
        steps: a row with more takes only ``num_iterations``.
        ``backend``: "torch" (closed form), "triton" (fused kernel) or "auto" (Triton on CUDA;
        the ``VLLM_RECONTROL_BACKEND`` environment variable can force either). ``precision`` of
        the products: "fp32" (exact), "tf32" or "bf16" (Triton only: weights read as bf16, fp32
        accumulation and u), "auto" = bf16 on Triton, fp32 on torch. ``cuda_graphs``: on CUDA,
        replay the Triton ascent as a CUDA graph per row bucket instead of launching its
        2 x layers x steps kernels from Python (the result is the same; the torch closed form
        is replayed the same way, and with "auto" it is what runs exact "fp32" products on
        CUDA, where cuBLAS beat the kernel's fp32 path). ``batch_invariant``:
        on the Triton backend, kernel plans that do not depend on the batch size, so a row's
        edit is the same bits alone or in any batch (slower at large batch); on the torch
        backend, products in slabs of 64 rows on CUDA (the batch padded to whole slabs, so each
        row meets the same shape of product) and one product per row on CPU (where BLAS also
        rounds a row by its position in a product). ``form``: "direct" (products
        with every layer, each step), "gram" (the same ascent on the first layer's
        coefficients, one product fewer per step) or "auto" (the Gram form on the torch
        backend where it moves fewer weights, the direct form on Triton:
        ``backends.choose_form``). Runs under ``torch.no_grad()``: inputs that require grad
        are read as values, and the result carries no graph.
        """
        if states.dim() != 2 or states.shape[1] != self.hidden_size:
            raise ValueError(
                f"states must be [B, {self.hidden_size}], got {list(states.shape)}")
        if not states.is_floating_point():
            raise ValueError(f"states must be floating point, got {states.dtype}")
        max_norm = checked_radius(max_norm, states.shape[0])
        check_row_controls(alpha, steps)
        resolved = choose_backend(backend, self.layers[0].weight.device, len(self.widths),
                                  precision)
        product_precision = choose_precision(precision, resolved)
        rows, device = states.shape[0], self.layers[0].weight.device
        alpha_rows = as_row_tensor(alpha, rows, torch.float32, device, "alpha")
        steps_rows = as_row_tensor(steps, rows, torch.int64, device, "steps")
        num_iterations = iteration_count(num_iterations, steps, steps_rows)
        resolved_form = choose_form(form, resolved, self.widths, self.hidden_size)
        if rows == 0 or num_iterations <= 0:
            return states.clone()
        mlp = self._weights_as(torch.bfloat16 if product_precision == "bf16" else torch.float32,
                               gram=resolved_form == "gram")
        states32 = states.to(device=device, dtype=torch.float32)
        if isinstance(max_norm, torch.Tensor):
            max_norm = max_norm.to(device=device, dtype=torch.float32)
        if cuda_graphs and device.type == "cuda":
            u = self._graph_cache().run(mlp, states32, alpha_rows, steps_rows, num_iterations,
                                 max_norm, product_precision, batch_invariant, resolved,
                                 resolved_form)
        elif resolved == "triton" and resolved_form == "gram":
            from .kernels.value_ascent import triton_ascend_gram

            u = triton_ascend_gram(mlp, states32, alpha_rows, steps_rows, num_iterations,
                                   max_norm, precision=product_precision,
                                   batch_invariant=batch_invariant,
                                   out=self._kernel_out_for(rows, device))
        elif resolved == "triton":
            from .kernels.value_ascent import triton_ascend

            u = triton_ascend(mlp, states32, alpha_rows, steps_rows, num_iterations, max_norm,
                              precision=product_precision, batch_invariant=batch_invariant,
                              out=self._kernel_out_for(rows, device))
        else:
            run_form = ascend_gram_float32 if resolved_form == "gram" else ascend_float32
            work_rows = product_rows(rows, device, batch_invariant)
            u = run_form(mlp, states32, alpha_rows, steps_rows, num_iterations, max_norm,
                         workspace=self._workspace_for(mlp, work_rows),
                         batch_invariant=batch_invariant)
        # One rounding, to the states' dtype; float64 states keep their own precision.
        base = states.to(device) if states.dtype == torch.float64 else states32
        edited = (base + u.to(base.dtype)).to(states.dtype)
        moved = (steps_rows > 0) & (alpha_rows != 0)
        finite = torch.isfinite(edited).all(dim=1)
        self._count_nonfinite(moved & ~finite)
        keep_edit = (moved & finite).to(states.device).view(-1, 1)
        return torch.where(keep_edit, edited.to(states.device), states)

    @_one_thread_per_head
    def warm_up(
        self,
        max_rows: int,
        iteration_counts: Sequence[int],
        max_norm: float | None = None,
        backend: str = "auto",
        precision: str = "auto",
        cuda_graphs: bool = True,
        batch_invariant: bool = False,
        also_projected: bool = False,
        form: str = "auto",
    ) -> int:
        """Compile the Triton kernels and capture the CUDA graphs that batches of 1 to
        ``max_rows`` rows with these iteration counts will use, so that serving never stalls
        on a first capture. Runs one ascent per (row bucket, count) with alpha 0 (nothing is
        edited, nothing counted). There is something to do for the Triton backend (kernels
        to compile; on CPU, under the interpreter, this runs the same ascents: it is how the
        tests see the loop) and for CUDA graphs of either backend; returns the number of
        ascents run. ``also_projected`` (without ``max_norm``): warm the projected ascent
        too, which requests with their own radius run (with an infinite radius per row, so
        again nothing moves)."""
        from .ascent_graphs import buckets_up_to

        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        device = self.layers[0].weight.device
        resolved = choose_backend(backend, device, len(self.widths), precision)
        graphs = cuda_graphs and device.type == "cuda"
        if resolved != "triton" and not graphs:
            return 0
        buckets = buckets_up_to(max_rows)
        counts = sorted({int(n) for n in iteration_counts if int(n) > 0})
        projections = [max_norm] + (["per-row"] if also_projected and max_norm is None else [])
        if graphs:  # the graphs captured here are kept for good (never evicted)
            self._graph_cache().reserve(buckets[-1], self.hidden_size, device)  # no regrowth
            self._graphs.pinning = True
        runs = 0
        try:
            for rows in buckets:
                states = torch.zeros(rows, self.hidden_size, device=device, dtype=torch.float32)
                for count in counts:
                    for radius in projections:
                        if radius == "per-row":
                            radius = torch.full((rows,), math.inf, device=device,
                                                dtype=torch.float32)
                        self.ascend(states, 0.0, count, max_norm=radius, num_iterations=count,
                                    backend=resolved, precision=precision,
                                    cuda_graphs=cuda_graphs, batch_invariant=batch_invariant,
                                    form=form)
                        runs += 1
        finally:
            if graphs:
                self._graphs.pinning, self._graphs.warm = False, True
        return runs

    def _graph_cache(self):
        """The head's AscentGraphs, made on first use (CUDA only)."""
        if self._graphs is None:
            from .ascent_graphs import AscentGraphs

            self._graphs = AscentGraphs()
        return self._graphs

    def _kernel_out_for(self, rows: int, device: torch.device) -> torch.Tensor:
        """A grow-only float32 [rows, d] buffer for the kernel's u (the torch workspace would
        also hold fp32 copies of the weights and every activation, which the kernel does not
        use)."""
        out = self._kernel_out
        if out is None or out.shape[0] < rows or out.device != device:
            out = self._kernel_out = torch.empty(rows, self.hidden_size, device=device,
                                                 dtype=torch.float32)
        return out[:rows]

    def _workspace_for(self, mlp: MLPWeights, rows: int) -> AscentWorkspace:
        """A grow-only workspace: a serving engine allocates once, then only takes views. Its
        Gram-form buffers come with the first Gram-form call and stay."""
        ws = self._workspace
        gram = mlp.first_gram is not None
        # Buffers made under torch.inference_mode() (as vLLM runs) cannot be written outside
        # it: a direct call without that mode gets new ones.
        stale_mode = ws is not None and ws.x.is_inference() and \
            not torch.is_inference_mode_enabled()
        if ws is None or stale_mode or ws.capacity < rows or ws.x.device != mlp.device or \
                [t.shape[1] for t in ws.pre] != [w.shape[0] for w in mlp.weights[:-1]] or \
                (gram and not ws.has_gram_buffers):
            gram = gram or (ws is not None and ws.has_gram_buffers)
            ws = self._workspace = AscentWorkspace.allocate(mlp, rows, gram=gram)
        return ws.narrow(rows)

    def _count_nonfinite(self, bad_rows: torch.Tensor) -> None:
        # Accumulated on the device: counting must not force a host sync every decode step.
        count = bad_rows.sum()
        if self._nonfinite_pending is None or self._nonfinite_pending.device != count.device:
            self.nonfinite_rows()
            self._nonfinite_pending = count
        else:  # out of place: the tally may be an inference tensor (made under vLLM)
            self._nonfinite_pending = self._nonfinite_pending + count
        if count.device.type == "cpu" and self._nonfinite_total == 0:
            # no sync to spare on a CPU: the first fallback is logged at once (a direct
            # caller may never read nonfinite_rows); later ones when it is read
            self.nonfinite_rows()

    def nonfinite_rows(self) -> int:
        """Rows so far whose edit was not finite and fell back unedited (logs new ones)."""
        if self._nonfinite_pending is not None:
            new = int(self._nonfinite_pending)
            self._nonfinite_pending = None
            if new:
                self._nonfinite_total += new
                logger.warning("RE-Control edit was not finite for %d row(s) (total %d); those "
                               "rows were left unedited. Lower alpha or steps.",
                               new, self._nonfinite_total)
        return self._nonfinite_total

    def base_model_mismatch(self, served_model: str) -> str | None:
        """Why this head may not fit ``served_model`` (its recorded ``base_model`` names
        another model), or None. Names are compared by their last path part, so a hub id and
        a local copy of it ("lmsys/vicuna-7b-v1.5", "/models/vicuna-7b-v1.5") agree; a head
        with no recorded base model is not judged. Same-width models (Llama-2-7B and
        Vicuna-7B) pass the hidden-size check, so this is the only hint a head is foreign."""
        def short(name: str) -> str:
            if Path(name).is_dir():  # a local folder, also "." or "..": its own name
                name = str(Path(name).resolve())
            parts = name.rstrip("/\\").replace("\\", "/").split("/")
            # the hub cache's .../models--org--name/snapshots/<commit>: the repository's name
            if len(parts) >= 3 and parts[-2] == "snapshots" and \
                    parts[-3].startswith("models--"):
                return parts[-3].rsplit("--", 1)[-1].lower()
            return parts[-1].lower()

        if not self.base_model or short(self.base_model) == short(served_model):
            return None
        return (f"it was trained on the states of {self.base_model!r} (base_model in its "
                f"config.json), but this engine serves {served_model!r}; a value head steers "
                f"only the model whose states it learned")

    # ------------------------------------------------------------------ persistence
    def config_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "hidden_size": self.hidden_size,
            "widths": self.widths,
            "activation": "relu",
            "base_model": self.base_model,
            "metadata": self.metadata,
        }

    def config_json(self, directory: str | Path, save_id: str | None = None) -> str:
        """``config.json``'s text, checked so that ``load`` reads back what was saved:
        metadata only of JSON values (finite numbers, string keys), ``base_model`` a name or
        None. ``directory`` only names the save in the message; ``save_id`` ties the config
        to the weights written with it (``load`` refuses a pair from two saves)."""
        where = f"cannot save the value head to {directory}"
        check_provenance(self.base_model, self.metadata, source=where)
        try:
            problem = json_problem(self.metadata, "metadata")
        except RecursionError:
            problem = "metadata is nested too deeply to save as JSON"
        if problem:
            raise ValueHeadError(f"{where}: {problem}")
        config = self.config_dict()
        if save_id is not None:
            config[SAVE_ID_KEY] = save_id
        return json.dumps(config, indent=2, allow_nan=False) + "\n"

    def save(self, directory: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (created).
        Weights with NaN or inf, and a config JSON cannot hold, are refused before anything
        is written: ``load`` (and every engine) would refuse the head. Each file is replaced
        atomically, but not both at once: a save killed between them leaves new weights
        beside the old config, so both carry one save id (a digest of the weights: the same
        weights save to the same bytes) and ``load`` refuses a pair whose ids differ instead
        of serving the mix."""
        from safetensors.torch import save_file

        tensors = {}
        for i, layer in enumerate(self.layers):
            tensors[f"layers.{i}.weight"] = layer.weight.detach().cpu().contiguous()
            tensors[f"layers.{i}.bias"] = layer.bias.detach().cpu().contiguous()
        for name, tensor in tensors.items():
            if not bool(torch.isfinite(tensor).all()):
                raise ValueHeadError(f"cannot save the value head to {directory}: {name} "
                                     "holds NaN or inf")
        save_id = weights_id(tensors)
        config_text = self.config_json(directory, save_id)  # checked: before any write
        path = Path(directory)
        foreign = foreign_config_problem(path)
        if foreign:  # a slip like head.save(model_dir) would destroy the model
            raise ValueHeadError(f"cannot save the value head to {directory}: the folder "
                                 f"{foreign}; save it into a folder of its own")
        with atomic_path(path / WEIGHTS_FILE) as tmp:  # readable as any file the user writes
            save_file(tensors, str(tmp), metadata=weights_metadata(save_id))
        write_text_atomic(path / CONFIG_FILE, config_text)
        return path

    @classmethod
    def load(
        cls,
        directory: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        expected_hidden_size: int | None = None,
    ) -> "ValueHead":
        """Load and validate a head from a folder or a hub repository id (``owner/name``);
        ``expected_hidden_size`` is the served model's width."""
        if expected_hidden_size is not None and not is_positive_integer(expected_hidden_size):
            raise ValueHeadError(f"expected_hidden_size must be a positive integer, got "
                                 f"{expected_hidden_size!r}")
        device, dtype = _load_target(device, dtype)
        path = locate_head(directory)
        config = read_config(path)
        hidden_size, widths = config["hidden_size"], config["widths"]
        if expected_hidden_size is not None and hidden_size != expected_hidden_size:
            raise ValueHeadError(
                f"value head {path / CONFIG_FILE} has hidden_size {hidden_size} but the model's "
                f"states are {expected_hidden_size} wide (what its lm_head reads: its hidden "
                "size, or OPT's word_embed_proj_dim); train a head on this model's states")
        tensors, stored_id = read_weights(path / WEIGHTS_FILE, hidden_size, widths)
        check_same_save(path, config, stored_id)
        loaded_id = weights_id(tensors)
        if stored_id is not None and loaded_id != stored_id:
            # the id is the weights' digest: a flipped bit, or tensors rewritten by a tool
            # that kept the metadata (0.15 s for a 4096 x [4096, 4096] head)
            raise ValueHeadError(f"value head weights {path / WEIGHTS_FILE} do not match "
                                 f"their save id (a digest of the weights): the file is "
                                 "corrupted or was edited; save the head again")
        # parameters left unset (every value is overwritten at once; none is drawn, from
        # the global generator either: a seeded script's later random numbers would depend
        # on the load); in the dtype asked for before the copy (float64 weights passed
        # through float32)
        head = cls(hidden_size, widths, seed=_UNSET, base_model=config.get("base_model"),
                   metadata=config.get("metadata") or {}).to(dtype=dtype)
        head.loaded_weights_id = loaded_id
        with torch.no_grad():
            for i, layer in enumerate(head.layers):
                layer.weight.copy_(tensors[f"layers.{i}.weight"])
                layer.bias.copy_(tensors[f"layers.{i}.bias"])
        head = head.to(device=device)
        # Finite on disk (read_weights checked) is not enough: float64 values past float32's
        # range (or float32 past float16's) become inf here, and every edit would silently
        # fall back. Only a narrowing copy can overflow.
        for name, parameter in head.named_parameters():
            narrowed = torch.finfo(parameter.dtype).max < torch.finfo(tensors[name].dtype).max
            if narrowed and not bool(torch.isfinite(parameter).all()):
                raise ValueHeadError(
                    f"value head weights {path / WEIGHTS_FILE}: {name} has values that do not "
                    f"fit {parameter.dtype} (they overflow to inf)")
        return head


def _load_target(device: Any, dtype: Any) -> tuple[torch.device, torch.dtype]:
    """``load``'s device and dtype, refused by name before any file is read (torch's own
    errors were an assertion, a meta tensor's ``.item()``, or a complex head that loaded)."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), dtype)
    if dtype not in STORED_DTYPES:
        raise ValueHeadError(f"load: dtype must be one of "
                             f"{', '.join(str(t) for t in STORED_DTYPES)}, got {dtype!r}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueHeadError(f"load: device {device!r} is not a torch device: {exc}") from exc
    if device.type == "meta":
        raise ValueHeadError("load: device 'meta' holds no values; load on a real device")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueHeadError(f"load: device {str(device)!r} asked for, but torch sees no "
                             "CUDA device here")
    return device, dtype
