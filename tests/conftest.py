"""Shared fixtures: tiny self-made models, value heads, and long-lived vLLM engines.

Engine start-up costs 20-45 s on a 2-core CPU (mostly Python importing vLLM in the engine's
two processes), so each engine is session-scoped and shared by every test that can use it
(under pytest-xdist, once per worker).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from engine_helpers import cpu_cores, shared_control, start_llm, stop_llm, strong_head
from vllm_recontrol.toy import build_tiny_model


MAX_WORKERS = 4
# The slowest files first, as measured (serial seconds on a 2-core CPU): xdist hands files
# to its workers in collection order (pytest.ini turns its own reordering off), so the
# longest start first and the short ones fill the gaps at the end.
SLOW_FILES_FIRST = [
    "test_training_e2e.py", "test_kernel_triton.py", "test_bench_kernel.py", "test_server.py",
    "test_parallel_engines.py", "test_lora.py", "test_readme_examples.py",
    "test_architectures.py",
    "test_vllm_features.py", "test_engine_batching.py", "test_demo.py",
    "test_continuous_batching.py", "test_training_distributed.py", "test_engine_oracle.py",
]


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto`` (pytest.ini): one worker per core, at most four (each worker starts its
    own shared engine, so more workers than that cost more than they save)."""
    return max(1, min(len(cpu_cores()), MAX_WORKERS))


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole


def _unbind_engines_under_xdist() -> None:
    """vLLM's CPU workers bind their threads to cores; on "auto" every engine binds to the
    same first core, so with several xdist workers all engines would share one core while
    the others idle. Let the OS place them instead (tests that start two-worker engines set
    their own binding)."""
    if os.environ.get("PYTEST_XDIST_WORKER") and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"


_unbind_engines_under_xdist()


def _sized_caches_stay_sized() -> None:
    """vLLM's CPU platform replaces every engine's kv_cache_memory_bytes with
    VLLM_CPU_KVCACHE_SPACE when that is set (a legacy setting): the tests' cramped engines
    (a cache of a few blocks, to force preemption) would get gigabytes and preempt nothing.
    Every engine of the tests sizes its own cache."""
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)


_sized_caches_stay_sized()


@pytest.fixture(scope="session", autouse=True)
def _vllm_logging_configured_first():
    """vLLM configures its logging on the first engine configuration of a process, which
    makes the "vllm" logger stop propagating. pytest's log capture hooks onto such loggers
    only when a test starts: a warning logged during the very call that configured logging
    was missed (a test passed in file order, failed alone), and a handler configured inside
    a test that captures stderr kept that test's closed stream. So every test starts with
    it configured, on the session's streams."""
    try:
        from vllm.config.logging import LoggingConfig
        from vllm.logger import configure_logging_if_needed
    except ImportError:  # no vLLM: the tests that need it skip
        return
    configure_logging_if_needed(LoggingConfig())


# Variables the code under test sets for the rest of its process (the demo's log level, an
# engine core in this process, the stock-vLLM guard): each test gets them back as they were.
PROCESS_WIDE_VARIABLES = ("VLLM_LOGGING_LEVEL", "VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_PLUGINS")


@pytest.fixture(autouse=True)
def _process_wide_variables_restored():
    before = {name: os.environ.get(name) for name in PROCESS_WIDE_VARIABLES}
    yield
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("recontrol")


@pytest.fixture(scope="session")
def llama_dir(workdir) -> Path:
    return build_tiny_model(workdir / "tiny-llama", "llama", seed=1)


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
