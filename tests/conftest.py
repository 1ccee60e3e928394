"""Shared fixtures: tiny self-made models, value heads, and long-lived vLLM engines.

Engine start-up costs about 20 s on a 2-core CPU, so each engine is session-scoped and
shared by every test that can use it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from engine_helpers import shared_control, start_llm, stop_llm, strong_head
from vllm_recontrol.toy import build_tiny_model


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("recontrol")


@pytest.fixture(scope="session")
def llama_dir(workdir) -> Path:
    return build_tiny_model(workdir / "tiny-llama", "llama", seed=1)


@pytest.fixture(scope="session")
def qwen2_dir(workdir) -> Path:
    return build_tiny_model(workdir / "tiny-qwen2", "qwen2", seed=2)


@pytest.fixture(scope="session")
def head_dir(workdir) -> Path:
    """Two hidden layers of different widths (not the paper's d x d), to catch shape slips."""
    return strong_head(seed=11, widths=[48, 32]).save(workdir / "head-2layer")


@pytest.fixture(scope="session")
def head1_dir(workdir) -> Path:
    return strong_head(seed=12, widths=[80]).save(workdir / "head-1layer")


@pytest.fixture(scope="session")
def llama_engine(llama_dir, head_dir, head1_dir):
    """The shared RE-Control engine on the tiny Llama (alpha 1.0, 4 steps by default), with
    a second head, "one-layer", that requests pick with recontrol_head."""
    llm = start_llm(llama_dir, shared_control(head_dir, head1_dir))
    yield llm
    stop_llm(llm)
