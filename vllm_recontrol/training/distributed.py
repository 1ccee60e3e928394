"""Data-parallel ``train`` over several processes (``torchrun``, one per GPU, on one machine
or many): each process reads different shard windows, and every step applies the gradient
of the union of the processes' batches, so all of them hold the same head throughout.

Why not DistributedDataParallel: processes run out of batches at different steps (their
windows hold different numbers of states), and under DDP's uneven-input handling the idle
processes would skip optimizer steps, so their Adam state would drift from the others'.
Here every process takes every step; one with no batch left contributes a zero gradient
with zero weight. A step's gradients, weighted by each process's share of the step's states,
travel in one flat all-reduce together with the step's row count and loss sum (``sum_step``).

Shards, not windows, are dealt to the processes, balanced by training states
(``deal_shards``), and before the first step the processes check that they start from the
same options, data, held-out split, checkpoint and head (``ProcessGroup.agree``).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ..errors import RecontrolError
from ..head_files import weights_id
from .common import DataError, FolderInUse

WORLD_ENV = "WORLD_SIZE"


@contextlib.contextmanager
def _among_processes() -> Iterator[None]:
    """A collective that fails (Gloo's "Connection closed by peer", a bare RuntimeError)
    almost always means another process of the run stopped or its node went away: said as an
    error line, not a traceback on every survivor. NCCL's collectives are asynchronous: their
    errors surface later or end the process by NCCL's watchdog (not measured: no GPU)."""
    try:
        yield
    except torch.OutOfMemoryError:  # a RuntimeError too, but this process's own
        raise
    except RuntimeError as exc:
        raise DataError(f"train: the training processes lost touch ({str(exc)[:300]}): "
                        f"another process of this run stopped (its own output, or the "
                        f"launcher's, says why) or cannot be reached; with --checkpoint the "
                        f"same command resumes from the last finished epoch") from exc


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place among the training processes (rank 0 of 1 when alone)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over the processes (float64)."""
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self._device())
        with _among_processes():
            torch.distributed.all_reduce(tensor)
        return tensor.tolist()

    def max(self, value: int) -> int:
        if not self.distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.int64, device=self._device())
        with _among_processes():
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        return int(tensor.item())

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's 1-D tensor, concatenated in rank order (sizes may differ)."""
        if not self.distributed:
            return tensor
        parts: list[Any] = [None] * self.world
        with _among_processes():
            torch.distributed.all_gather_object(parts, tensor.cpu())
        return torch.cat(parts)

    def sum_step(self, parameters: Sequence[torch.nn.Parameter], rows: int,
                 loss: torch.Tensor | None) -> float:
        """Finish a step's backward pass over the processes: ``parameters``' gradients (of
        this process's mean loss over its ``rows`` states; none when it had no batch) become
        the gradient of the mean loss over every process's states, and the step's mean loss
        is returned.

        Why one all-reduce: a collective per parameter tensor plus one for the loss costs
        a latency each, every step (over machines, milliseconds each); here the gradients,
        each scaled by its process's rows, are flattened into one buffer that also carries
        the rows and the loss sum, and are divided by the total rows afterwards."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        sums = torch.zeros(2, dtype=grads[0].dtype, device=grads[0].device)
        sums[0] = rows
        if loss is not None:
            sums[1] = loss.detach() * rows
        flat = torch.cat([_flatten_dense_tensors(grads) * rows, sums])
        if self.distributed:
            with _among_processes():
                torch.distributed.all_reduce(flat)
        count = flat.numel() - 2
        rows_total, loss_sum = flat[count:].tolist()
        for parameter, grad in zip(parameters, _unflatten_dense_tensors(
                flat[:count] / rows_total, grads)):
            parameter.grad = grad
        return loss_sum / rows_total

    def agree(self, facts: Mapping[str, Any], fixes: Mapping[str, str],
              failure: BaseException | None = None) -> None:
        """Check, before the first training collective, that every process starts from the
        same ``facts`` (name -> a JSON-like value), and that none failed to get there
        (``failure``, e.g. a checkpoint it could not read). Otherwise raise, in every process,
        the same DataError naming what differs, in which ranks, and the fix (``fixes``, by
        fact name).

        Why: each process reads its data, held-out split and checkpoint by itself. One that
        sees other files (a node-local --checkpoint folder, shards that appeared while the
        processes started) would train a different number of epochs or windows, and the
        others would wait in a collective until the launcher's timeout, or worse, reduce
        mismatched tensors. Alone, ``failure`` is raised as it is."""
        if not self.distributed:
            if failure is not None:
                raise failure
            return
        mine = {"failure": None if failure is None else _failure_text(failure),
                "facts": None if failure is not None else dict(facts),
                "in_use": isinstance(failure, FolderInUse)}
        everyone: list[Any] = [None] * self.world
        with _among_processes():
            torch.distributed.all_gather_object(everyone, mine)
        failures = [part["failure"] for part in everyone]
        if any(text is not None for text in failures):
            if failure is not None and all(text == failures[0] for text in failures):
                raise failure  # every process failed alike: the error as one process gives it
            files_hint = any(part["failure"] is not None and not part.get("in_use")
                             for part in everyone)
            raise DataError(failed_start_message(failures, files_hint)) from failure
        message = disagreement_message([part["facts"] for part in everyone], fixes)
        if message:
            raise DataError(message)

    def check_same_parameters(self, module: torch.nn.Module) -> None:
        """Rank 0's parameters must equal everyone's; a mismatch is a bug, never saved."""
        if not self.distributed:
            return
        worst = 0.0
        for parameter in module.parameters():
            reference = parameter.detach().clone()
            with _among_processes():
                torch.distributed.broadcast(reference, src=0)
            worst = max(worst, float((reference - parameter.detach()).abs().max()))
        if self.sum([worst])[0] != 0.0:
            raise RuntimeError(f"train: the processes' value heads differ (largest difference "
                               f"{worst:g} on rank {self.rank}); nothing was saved")

    def raise_main_failure(self, failure: Exception | None, elsewhere: str) -> None:
        """After work only rank 0 does (checking or writing the head): raise its ``failure``
        (None: it succeeded) in every process, the others with ``elsewhere``, so that none
        waits on rank 0 in a later collective. Also a barrier: rank 0's work is done."""
        if self.max(int(failure is not None)):
            raise failure or DataError(elsewhere)

    def close(self) -> None:
        if self.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def _device(self) -> torch.device:
        backend = torch.distributed.get_backend()
        return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" \
            else torch.device("cpu")


def _failure_text(failure: BaseException) -> str:
    if isinstance(failure, RecontrolError):
        return str(failure)
    return f"{type(failure).__name__}: {failure}"


def rank_list(ranks: Sequence[int]) -> str:
    """``rank 3`` or ``ranks 0-2, 5``: ranks in runs, so that 64 processes stay one line."""
    runs: list[list[int]] = []
    for rank in sorted(ranks):
        if runs and rank == runs[-1][-1] + 1:
            runs[-1].append(rank)
        else:
            runs.append([rank])
    text = ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)
    return f"rank{'s' if len(ranks) > 1 else ''} {text}"


def _by_value(values: Sequence[Any]) -> list[tuple[Any, list[int]]]:
    """(value, ranks holding it), in order of the lowest rank."""
    groups: list[tuple[Any, list[int]]] = []
    for rank, value in enumerate(values):
        for seen, ranks in groups:
            if seen == value:
                ranks.append(rank)
                break
        else:
            groups.append((value, [rank]))
    return groups


def _shown(value: Any, keys: Sequence[str] | None, width: int = 100) -> str:
    """A fact's value in a message: a dict by only the ``keys`` that differ, cut short."""
    if isinstance(value, dict) and keys is not None:
        text = ", ".join(f"{k}={value.get(k)!r}" for k in keys)
    else:
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= width else text[:width - 3] + "..."


def disagreement_message(facts: Sequence[Mapping[str, Any]],
                         fixes: Mapping[str, str]) -> str | None:
    """None when every process's facts are equal; otherwise one message naming each fact
    that differs, the ranks that hold each value, and the fixes."""
    lines: list[str] = []
    hints: list[str] = []
    for name in facts[0]:
        groups = _by_value([part.get(name) for part in facts])
        if len(groups) == 1:
            continue
        keys = None
        if all(isinstance(value, dict) for value, _ in groups):
            union = sorted(set().union(*(value for value, _ in groups)))
            keys = [k for k in union if len({json.dumps(v.get(k), sort_keys=True)
                                             for v, _ in groups}) > 1]
        shown = "; ".join(f"{rank_list(ranks)}: {_shown(value, keys)}" for value, ranks in groups)
        lines.append(f"{name} differs ({shown})")
        if name in fixes and fixes[name] not in hints:
            hints.append(fixes[name])
    if not lines:
        return None
    return (f"train: the {len(facts)} processes do not start from the same point, so they "
            f"would not train one head (they would wait on each other until the launcher's "
            f"timeout): " + "; ".join(lines) + ". Fix: " + " ".join(hints))


def failed_start_message(failures: Sequence[str | None], files_hint: bool = True) -> str:
    """The error every process raises when some could not prepare their start; with
    ``files_hint``, a process failing alone is put down to files it sees differently (not
    when it failed on a folder another run holds: only rank 0 takes the locks)."""
    groups = _by_value(failures)
    failed = "; ".join(f"{rank_list(ranks)}: {text}" for text, ranks in groups if text)
    message = f"train: stopped before training, on {failed}"
    if None in failures and files_hint:
        message += (f" ({rank_list(dict(groups)[None])} could start: a process that fails alone "
                    f"usually sees other files; --data, --labels, --init-head and the "
                    f"--checkpoint folder must be on a filesystem every process sees, the "
                    f"same for all)")
    return message


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """A digest of named tensors (names, dtypes, shapes and bytes, in order; a value head's
    save id, ``weights_id``), e.g. a head's state_dict: equal on two processes exactly when
    they hold the same weights."""
    return weights_id({name: tensor.detach().cpu() for name, tensor in tensors.items()})


def deal_shards(order: Sequence[int], states: Sequence[int], world: int) -> list[list[int]]:
    """Each process's shards: the shards of the (seeded) ``order``, largest first by
    training ``states`` (ties: earlier in the order), each to the process with the fewest
    states so far (ties: the lowest rank); each process keeps its shards in ``order``'s
    sequence, and forms its windows from them.

    Why shards and not windows: dealt by window, processes differ by up to a window's
    states (``shuffle_shards`` shards, more when shards differ in size), the others idle
    with zero-weight steps meanwhile; dealt this way they differ by at most one shard's
    states (the last shard given to the busiest process went to the least busy one). It
    depends only on the order and the shard indexes, so it is the same on every process;
    alone, it is the order itself. Sizes decide first, so with unequal shards a process
    keeps much the same shards from epoch to epoch (the order within it still changes);
    every step sums all processes' batches, so the step's rows still span the data."""
    loads = [0] * world
    owner = [0] * len(order)
    for position in sorted(range(len(order)), key=lambda p: -states[order[p]]):  # stable
        rank = min(range(world), key=lambda r: (loads[r], r))
        owner[position] = rank
        loads[rank] += states[order[position]]
    dealt: list[list[int]] = [[] for _ in range(world)]
    for position, shard in enumerate(order):
        dealt[owner[position]].append(shard)
    return dealt


def world_size() -> int:
    """Processes of the launcher's job (``WORLD_SIZE``; 1 outside torchrun)."""
    text = os.environ.get(WORLD_ENV, "1") or "1"
    try:
        return int(text)
    except ValueError:
        raise DataError(f"{WORLD_ENV}={text!r} is not a number of processes") from None


# What torchrun sets beside WORLD_SIZE, which init_process_group's env:// rendezvous reads.
LAUNCHER_ENV = ("RANK", "MASTER_ADDR", "MASTER_PORT")


def _launcher_rank(world: int) -> int:
    """This process's ``RANK``; a clear error where ``WORLD_SIZE`` > 1 comes without the
    rest of a launcher's environment (one left over from another job, say)."""
    missing = [name for name in LAUNCHER_ENV if not os.environ.get(name)]
    if missing:
        raise DataError(f"{WORLD_ENV}={world} is set but {', '.join(missing)} "
                        f"{'is' if len(missing) == 1 else 'are'} not: start train under "
                        f"torchrun (it sets them all), or unset {WORLD_ENV} to train in one "
                        f"process")
    try:
        rank = int(os.environ["RANK"])
    except ValueError:
        raise DataError(f"RANK={os.environ['RANK']!r} is not a process number") from None
    if not 0 <= rank < world:
        raise DataError(f"RANK={rank} is outside the {WORLD_ENV}={world} processes")
    return rank


def _check_local_gpu(device: str, local_rank: int) -> None:
    """Each process takes the GPU of its LOCAL_RANK: said before torch.cuda.set_device,
    whose errors without CUDA (an AttributeError of torch._C) or past the last GPU (invalid
    device ordinal) were tracebacks on every rank."""
    if not torch.cuda.is_available():
        raise DataError(f"device {device} requested but CUDA is not available")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise DataError(f"LOCAL_RANK={local_rank} but this node has {count} GPU"
                        f"{'' if count == 1 else 's'}: each process takes the GPU of its "
                        f"LOCAL_RANK, so start at most {count} a node (torchrun "
                        f"--nproc-per-node {count})")


def join_process_group(device: str) -> ProcessGroup:
    """Join the launcher's process group when ``WORLD_SIZE`` > 1 (torchrun sets it, with
    ``RANK``, ``LOCAL_RANK`` and the rendezvous address): NCCL on CUDA, Gloo on CPU."""
    world = world_size()
    if world <= 1:
        return ProcessGroup()
    if not torch.distributed.is_available():
        raise DataError(f"{WORLD_ENV}={world} but this torch has no torch.distributed")
    if torch.distributed.is_initialized():  # started by the caller: its rank
        rank = torch.distributed.get_rank()
    else:
        rank = _launcher_rank(world)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    on_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if on_cuda:
        _check_local_gpu(device, local_rank)
        torch.cuda.set_device(local_rank)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if on_cuda else "gloo")
    return ProcessGroup(rank=rank, world=world, local_rank=local_rank)
