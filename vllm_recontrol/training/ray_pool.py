"""Ray actors that each take whole shards: ``collect`` and ``label`` with ``--ray --replicas N``.

Why whole shards handed out one at a time: a shard's files then do not depend on which actor
wrote it (each is written by exactly one actor, atomically), and slow and fast replicas
balance. The options object names the placement (``replicas``, ``ray_address``,
``ray_num_cpus``, ``ray_num_gpus``); on a cluster of several machines the output folder must
be on a filesystem every node sees.
"""

from __future__ import annotations

import contextlib
from collections import deque
from typing import Any, Callable, Iterator

from .common import DataError, progress


@contextlib.contextmanager
def ray_actors(opts: Any, worker_class: type, count: int, *args: Any) -> Iterator[list[Any]]:
    """``min(opts.replicas, count)`` actors of ``worker_class(*args)``, each with
    ``opts.ray_num_cpus`` CPUs and ``opts.ray_num_gpus`` GPUs; Ray is started here when it is
    not running yet (``opts.ray_address``, default local) and stopped again after."""
    try:
        import ray
    except ImportError as exc:
        raise DataError("--ray needs Ray: pip install 'ray>=2.9'") from exc
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=opts.ray_address, include_dashboard=False, ignore_reinit_error=True)
    actors: list[Any] = []
    try:
        _check_resources(ray, opts)
        actor_class = ray.remote(num_cpus=opts.ray_num_cpus, num_gpus=opts.ray_num_gpus)(
            worker_class)
        actors = [actor_class.remote(*args) for _ in range(min(opts.replicas, count))]
        yield actors
    finally:
        for actor in actors:
            ray.kill(actor)
        if started_here:
            ray.shutdown()


def _check_resources(ray: Any, opts: Any) -> None:
    """Refuse a request that could never be scheduled instead of waiting forever."""
    total = ray.cluster_resources()
    for key, per_actor in (("CPU", opts.ray_num_cpus), ("GPU", opts.ray_num_gpus)):
        need = per_actor * opts.replicas
        if need > total.get(key, 0.0) + 1e-9:
            raise DataError(f"{opts.replicas} replicas x {per_actor} {key} per actor = {need} "
                            f"{key}, but the Ray cluster has {total.get(key, 0.0)}; lower "
                            f"--replicas or --ray-num-{key.lower()}s")


def dispatch(actors: list[Any], tasks: list[Callable[[Any], Any]], desc: str,
             show_progress: bool) -> None:
    """Run each task once on the first free actor; errors surface at once."""
    import ray

    queue = deque(tasks)
    running: dict[Any, Any] = {}
    bar = progress(total=len(tasks), desc=desc, unit="shard",
                   disable=not show_progress or not tasks)
    idle = list(actors)
    while queue or running:
        while queue and idle:
            actor = idle.pop()
            running[queue.popleft()(actor)] = actor
        ready, _ = ray.wait(list(running), num_returns=1)
        for ref in ready:
            actor = running.pop(ref)
            ray.get(ref)  # re-raises the actor's exception
            idle.append(actor)
            bar.update(1)
    bar.close()


def call_each(actors: list[Any], method: str) -> list[Any]:
    """Call ``method`` on every actor at once and wait for all of them."""
    import ray

    return ray.get([getattr(actor, method).remote() for actor in actors])
