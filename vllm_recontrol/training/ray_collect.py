"""``collect --ray --replicas N``: the same shards, spread over N vLLM engines in Ray actors.

Why Ray actors and not vLLM's own data parallelism: each actor owns one engine (one GPU on a
cluster, a CPU slice locally) and whole shards, so a shard's files do not depend on which
actor wrote it; the per-request seeds depend only on the prompt's global index (the actor
pool: ``ray_pool``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .collector import CollectOptions, CollectWorker
from .ray_pool import actor_engine_args, actor_path, call_each, dispatch, ray_actors
from .shards import ShardPlan


def run_with_ray(opts: CollectOptions, manifest: dict[str, Any], prompts: Sequence[str],
                 to_generate: Sequence[ShardPlan], to_encode: Sequence[ShardPlan]) -> None:
    """Run both collection phases on ``opts.replicas`` Ray actors."""
    # Actors may start in another working directory: give them absolute paths.
    worker_manifest = {**manifest, "model": actor_path(manifest["model"])}
    out = str(Path(opts.out).resolve())
    with ray_actors(opts, CollectWorker, len(to_encode), out, worker_manifest,
                    actor_engine_args(opts.engine_args),
                    actor_engine_args(opts.pooling_engine_args), opts.in_process) as actors:
        dispatch(actors, [
            (lambda actor, p=plan: actor.generate_shard.remote(
                p, list(prompts[p.prompt_start:p.prompt_end])))
            for plan in to_generate], "collect: generate", opts.progress)
        call_each(actors, "release_generator")
        dispatch(actors, [(lambda actor, p=plan: actor.states_shard.remote(p.name))
                          for plan in to_encode], "collect: states", opts.progress)
        call_each(actors, "close")
