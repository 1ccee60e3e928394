"""Entry point of the ``vllm.general_plugins`` group.

vLLM calls ``register()`` in every process it starts (front-end, engine core, each worker,
the model-inspection subprocess), so it must be idempotent and cheap, and it must not break
vLLM for engines that do not use RE-Control.
"""

from __future__ import annotations

_registered = False


def register() -> None:
    """Install the RE-Control hooks into vLLM (once per process)."""
    global _registered
    if _registered:
        return
    _registered = True
    from . import _vllm_adapter

    _vllm_adapter.install()
