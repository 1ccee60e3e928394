"""``collect --ray --replicas N``: the same shards, spread over N vLLM engines in Ray actors.

Why Ray actors and not vLLM's own data parallelism: each actor owns one engine (one GPU on a
cluster, a CPU slice locally) and whole shards, so a shard's files do not depend on which
actor wrote it; the per-request seeds depend only on the prompt's global index. Shards are
handed out one at a time to whichever actor is free, so slow and fast replicas balance, and
each shard is written by exactly one actor (the driver assigns it once).
"""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any, Callable, Sequence

from .collector import CollectOptions, CollectWorker
from .common import DataError, progress
from .shards import ShardPlan


def run_with_ray(opts: CollectOptions, manifest: dict[str, Any], prompts: Sequence[str],
                 to_generate: Sequence[ShardPlan], to_encode: Sequence[ShardPlan]) -> None:
    """Run both collection phases on ``opts.replicas`` Ray actors."""
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
        # Actors may start in another working directory: give them absolute paths.
        worker_manifest = dict(manifest)
        if Path(manifest["model"]).exists():
            worker_manifest["model"] = str(Path(manifest["model"]).resolve())
        out = str(Path(opts.out).resolve())
        actor_class = ray.remote(num_cpus=opts.ray_num_cpus, num_gpus=opts.ray_num_gpus)(
            CollectWorker)
        actors = [actor_class.remote(out, worker_manifest, opts.engine_args,
                                     opts.pooling_engine_args, opts.in_process)
                  for _ in range(min(opts.replicas, len(to_encode)))]
        _dispatch(ray, actors, [
            (lambda actor, p=plan: actor.generate_shard.remote(
                p, list(prompts[p.prompt_start:p.prompt_end])))
            for plan in to_generate], "collect: generate", opts.progress)
        ray.get([actor.release_generator.remote() for actor in actors])
        _dispatch(ray, actors, [(lambda actor, p=plan: actor.states_shard.remote(p.name))
                                for plan in to_encode], "collect: states", opts.progress)
        ray.get([actor.close.remote() for actor in actors])
    finally:
        for actor in actors:
            ray.kill(actor)
        if started_here:
            ray.shutdown()


def _check_resources(ray: Any, opts: CollectOptions) -> None:
    """Refuse a request that could never be scheduled instead of waiting forever."""
    total = ray.cluster_resources()
    for key, per_actor in (("CPU", opts.ray_num_cpus), ("GPU", opts.ray_num_gpus)):
        need = per_actor * opts.replicas
        if need > total.get(key, 0.0) + 1e-9:
            raise DataError(f"{opts.replicas} replicas x {per_actor} {key} per actor = {need} "
                            f"{key}, but the Ray cluster has {total.get(key, 0.0)}; lower "
                            f"--replicas or --ray-num-{key.lower()}s")


def _dispatch(ray: Any, actors: list[Any], tasks: list[Callable[[Any], Any]], desc: str,
              show_progress: bool) -> None:
    """Run each task once on the first free actor; errors surface at once."""
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
