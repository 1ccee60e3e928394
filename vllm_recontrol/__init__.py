"""vllm-recontrol: RE-Control (test-time alignment by representation editing) inside vLLM.

Importing this package does not import vLLM; the plugin entry point is
``vllm_recontrol.plugin:register``. ``batched_reward`` marks a reward function for
``label`` / ``eval`` that scores a list of pairs per call.
"""

from typing import Any

from .errors import (ConfigError, RecontrolError, RequestParamsError, ValueHeadError,
                     VersionError)
from .value_head import ValueHead

__version__ = "0.1.0"

__all__ = ["ValueHead", "batched_reward", "RecontrolError", "ConfigError", "RequestParamsError",
           "ValueHeadError", "VersionError", "__version__"]


def __getattr__(name: str) -> Any:
    """``batched_reward`` on first use: the plugin imports this package in every vLLM
    process, which need none of the training modules it lives among."""
    if name == "batched_reward":
        from .training.rewards import batched_reward

        return batched_reward
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
