"""Where ``eval``'s reward model runs: in the driver, or on Ray actors (``--reward-replicas``).

Why actors: with ``--ray`` the responses come from many engines at once, and one reward
model in the driver then scores every method's samples alone (a 7B model in float32 over
tens of thousands of responses). Each reward actor loads the same reward source once and
scores a contiguous share of every batch of pairs; the shares come back in order, so the
scores are the driver's own up to the reward model's batching (a reward function: exactly).
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import Any, Callable, Sequence

from ..logs import get_logger
from ..training.ray_pool import ray_actors
from ..training.rewards import RewardSource, reward_fn_modules
from .engines import prompt_ranges

Score = Callable[[Sequence[tuple[str, str]]], list[float]]
logger = get_logger(__name__)


class RewardWorker:
    """One Ray actor's reward source (built there: a model loads on the actor's device)."""

    def __init__(self, source_arguments: dict[str, Any]) -> None:
        self.source = RewardSource(**source_arguments)

    def check(self) -> None:
        """The reward model's settings, tokenizer and config, as this actor sees them."""
        self.source.check()

    def score(self, pairs: list[tuple[str, str]], first_row: int = 0) -> list[float]:
        """Rewards of a share of the pairs, whose first is row ``first_row`` of the batch:
        an error names the row the driver's own scoring would (not the row in the share)."""
        return self.source.score(pairs, where=lambda i: f"row {first_row + i}")

    def close(self) -> None:
        self.source.close()


class RewardPool:
    """``score(pairs)`` on ``replicas`` Ray actors, each with its placement; a context
    manager that stops them (and Ray, if it started Ray)."""

    def __init__(self, source_arguments: dict[str, Any], replicas: int, num_cpus: float,
                 num_gpus: float, ray_address: str | None,
                 reserve: dict[str, float] | None = None) -> None:
        placement = SimpleNamespace(replicas=replicas, ray_num_cpus=num_cpus,
                                    ray_num_gpus=num_gpus, ray_address=ray_address,
                                    gpu_flag="--reward-num-gpus", cpu_flag="--reward-num-cpus",
                                    reward_fn=source_arguments.get("reward_fn"))
        self._stack = contextlib.ExitStack()
        self.actors = self._stack.enter_context(ray_actors(
            placement, RewardWorker, replicas, dict(source_arguments),
            ship_modules=reward_fn_modules(source_arguments.get("reward_fn")), reserve=reserve))
        try:  # where the model's files are (maybe on the workers only): before any engine
            # starts and base generates, not at the first score
            import ray

            ray.get([actor.check.remote() for actor in self.actors])
        except BaseException:
            self.close(failing=True)
            raise

    def score(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        import ray

        pairs = list(pairs)
        shares = [(lo, hi) for lo, hi in prompt_ranges(len(pairs), len(self.actors)) if hi > lo]
        parts = ray.get([actor.score.remote(pairs[lo:hi], lo)
                         for actor, (lo, hi) in zip(self.actors, shares)])
        return [score for part in parts for score in part]

    def close(self, failing: bool = False) -> None:
        """Free each actor's model, then stop the actors; an actor that already died (the
        error that ended the run) does not hide that error. ``failing`` (the run is ending
        on an error or Ctrl-C): the actors are killed at once, not asked to close, which
        would wait behind a scoring call still running on them (a whole method's)."""
        import ray

        try:
            if not failing:
                ray.get([actor.close.remote() for actor in self.actors])
        except Exception as exc:
            logger.warning("vllm-recontrol: reward actors did not close cleanly (%s: %s)",
                           type(exc).__name__, str(exc)[:200])
        finally:
            self._stack.close()

    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, kind: Any, *exc_info: Any) -> None:
        self.close(failing=kind is not None)
