"""Making a value head from your own model, prompts and reward: collect -> label -> train.

Each step is a Python function and a ``vllm-recontrol`` subcommand with the same options::

    from vllm_recontrol.training import collect, label, train

    collect(model="my-model", prompts="prompts.jsonl", out="data")   # vLLM: responses + states
    label(data="data", reward_fn="my_rewards:score")                 # or reward_model="RM"
    train(data="data", out="my-head")                                 # value head artifact

Modules: ``prompts`` (sources, HH-RLHF extraction), ``shards`` (file layout), ``engines``
(vLLM generate + pooling), ``collector`` / ``ray_collect``, ``rewards`` / ``labeler``,
``targets`` (Bellman, MC, TD(lambda)), ``dataset`` (streaming), ``trainer``.
"""

from __future__ import annotations

from typing import Any

from .common import DataError, RewardError

__all__ = ["collect", "label", "train", "DataError", "RewardError"]


def collect(**options: Any) -> dict[str, Any]:
    """Sample responses with vLLM and store their states (see ``collector.CollectOptions``)."""
    from .collector import collect as run

    return run(**options)


def label(**options: Any) -> dict[str, Any]:
    """Score collected responses (see ``labeler.LabelOptions``)."""
    from .labeler import label as run

    return run(**options)


def train(**options: Any) -> dict[str, Any]:
    """Train a value head on labelled states (see ``trainer.TrainOptions``)."""
    from .trainer import train as run

    return run(**options)
