"""Batch invariance: each request's tokens do not depend on what else is in the batch."""

from __future__ import annotations

import pytest
from vllm import SamplingParams

from engine_helpers import PROMPTS, greedy, start_llm, stop_llm, token_ids

MAX_TOKENS = 12
# Uncontrolled requests (explicit opt-out) mixed with controlled ones of different strength.
MIXED = [
    (PROMPTS[0], {"recontrol": 0}),
    (PROMPTS[1], {"recontrol_alpha": 0.5, "recontrol_steps": 2}),
    (PROMPTS[2], {"recontrol": 0}),
    (PROMPTS[3], {"recontrol_alpha": 2.0, "recontrol_steps": 8}),
    (PROMPTS[4], {}),  # engine defaults
    (PROMPTS[5], {"recontrol": 0}),
    (PROMPTS[0], {"recontrol_alpha": 1.5, "recontrol_steps": 12}),
    (PROMPTS[2], {"recontrol": 1, "recontrol_steps": 0}),  # on, but zero steps: unedited
]


def sampled(extra: dict, seed: int) -> SamplingParams:
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=seed, ignore_eos=True,
                          extra_args=extra or None)


@pytest.fixture(scope="module")
def mixed_results(llama_engine):
    batch = token_ids(llama_engine.generate([p for p, _ in MIXED],
                                            [greedy(MAX_TOKENS, **e) for _, e in MIXED],
                                            use_tqdm=False))
    alone = [token_ids(llama_engine.generate([p], [greedy(MAX_TOKENS, **e)], use_tqdm=False))[0]
             for p, e in MIXED]
    return batch, alone


def test_each_request_equals_itself_alone(mixed_results):
    batch, alone = mixed_results
    assert batch == alone


def test_controlled_requests_differ_from_uncontrolled(llama_engine, mixed_results):
    batch, _ = mixed_results
    off = token_ids(llama_engine.generate([PROMPTS[3], PROMPTS[0]],
                                          [greedy(MAX_TOKENS, recontrol=0)] * 2, use_tqdm=False))
    assert batch[3] != off[0] and batch[6] != off[1]


def test_zero_steps_equals_opt_out(mixed_results):
    batch, _ = mixed_results
    assert batch[7] == batch[2]


def test_seeded_sampling_is_batch_invariant(llama_engine):
    requests = [(PROMPTS[i % len(PROMPTS)], {"recontrol_steps": i % 3 * 3}, 100 + i)
                for i in range(6)]
    batch = token_ids(llama_engine.generate([p for p, _, _ in requests],
                                            [sampled(e, s) for _, e, s in requests],
                                            use_tqdm=False))
    alone = [token_ids(llama_engine.generate([p], [sampled(e, s)], use_tqdm=False))[0]
             for p, e, s in requests]
    assert batch == alone


@pytest.fixture(scope="module")
def stock_engine(llama_dir):
    """vLLM with this plugin not loaded at all (VLLM_PLUGINS excludes it)."""
    llm = start_llm(llama_dir, recontrol=None, plugin_loaded=False)
    yield llm
    stop_llm(llm)


def test_uncontrolled_requests_equal_stock_vllm(stock_engine, mixed_results):
    batch, _ = mixed_results
    uncontrolled = [i for i, (_, e) in enumerate(MIXED) if e.get("recontrol") == 0]
    stock = token_ids(stock_engine.generate([MIXED[i][0] for i in uncontrolled],
                                            greedy(MAX_TOKENS), use_tqdm=False))
    assert [batch[i] for i in uncontrolled] == stock


def test_stock_engine_ignores_request_keys(stock_engine):
    """RE-Control keys mean nothing to an engine started without --model-impl recontrol."""
    plain = token_ids(stock_engine.generate([PROMPTS[3]], greedy(MAX_TOKENS), use_tqdm=False))
    keyed = token_ids(stock_engine.generate(
        [PROMPTS[3]], greedy(MAX_TOKENS, recontrol_alpha=2.0, recontrol_steps=8), use_tqdm=False))
    assert plain == keyed


def _prompt_logprobs(output) -> list:
    return [None if p is None else {t: lp.logprob for t, lp in p.items()}
            for p in output.prompt_logprobs]


def test_prompt_logprobs_pass_through_unedited(llama_engine, stock_engine):
    """Prompt logprobs are computed from unedited states; the sampled tokens are still edited."""
    from vllm import SamplingParams

    strong = {"recontrol_alpha": 2.0, "recontrol_steps": 8}

    def params(prompt_logprobs, **extra):
        return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True,
                              prompt_logprobs=prompt_logprobs, extra_args=extra or None)

    prompt = PROMPTS[2]
    with_logprobs, plain, off = llama_engine.generate(
        [prompt] * 3, [params(3, **strong), params(None, **strong), params(3, recontrol=0)],
        use_tqdm=False)
    stock = stock_engine.generate([prompt], params(3), use_tqdm=False)[0]
    assert list(with_logprobs.outputs[0].token_ids) == list(plain.outputs[0].token_ids)
    assert list(with_logprobs.outputs[0].token_ids) != list(off.outputs[0].token_ids)
    assert _prompt_logprobs(with_logprobs) == _prompt_logprobs(off) == _prompt_logprobs(stock)
