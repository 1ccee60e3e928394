"""RE-Control under vLLM's own tensor and pipeline parallelism.

With tensor parallelism every rank edits the same replicated hidden states before its slice
of the vocabulary-parallel lm_head, so the ranks must agree bit for bit; with pipeline
parallelism only the last stage computes logits (and holds the value head's work). Either
way a request must get the tokens a single-worker engine gives it, whichever value head it
names. CPU: two workers, one core each (vLLM's CPU backend wants threads bound by hand when
one NUMA node hosts both).
"""

from __future__ import annotations

import pytest

from engine_helpers import (PROMPTS, greedy, shared_control, start_llm, stop_llm, token_ids,
                            two_cores)

# vLLM's CPU worker allocates pipeline buffers only in its compile warm-up, which
# enforce_eager skips (stock vLLM 0.32 fails the same way), hence compiled mode there
PARALLEL = {"tensor": dict(tensor_parallel_size=2),
            "pipeline": dict(pipeline_parallel_size=2, enforce_eager=False)}


@pytest.mark.parametrize("kind", sorted(PARALLEL))
def test_parallel_engine_gives_the_single_worker_tokens(kind, llama_dir, head_dir, head1_dir,
                                                        llama_engine, monkeypatch):
    prompts = [PROMPTS[0]] * 3 + PROMPTS[1:3] + [PROMPTS[0]]
    params = [greedy(10), greedy(10, recontrol=0),
              greedy(10, recontrol_alpha=2.0, recontrol_steps=8), greedy(10),
              greedy(10, recontrol=0), greedy(10, recontrol_head="one-layer")]
    want = token_ids(llama_engine.generate(prompts, params, use_tqdm=False))
    assert want[0] != want[1] and want[2] not in (want[0], want[1])  # control moves tokens
    assert want[5] not in (want[0], want[1], want[2])  # and the second head steers its own way

    first, second = two_cores("workers")
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", f"{first}|{second}")
    llm = start_llm(llama_dir, shared_control(head_dir, head1_dir),
                    distributed_executor_backend="mp", **PARALLEL[kind])
    try:
        got = token_ids(llm.generate(prompts, params, use_tqdm=False))
        # the batch again, in another order: rows stay independent across workers too
        order = [4, 2, 5, 0, 3, 1]
        reordered = token_ids(llm.generate([prompts[i] for i in order],
                                           [params[i] for i in order], use_tqdm=False))
    finally:
        stop_llm(llm)
    assert got == want
    assert reordered == [want[i] for i in order]
