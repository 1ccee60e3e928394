"""The plugin's greedy tokens equal an independent transformers + autograd RE-Control oracle.

(The same check on a Qwen2 model runs on the Qwen2 engine of test_vllm_features.py.)
"""

from __future__ import annotations

import pytest

from engine_helpers import PROMPTS, control_keys, greedy
from oracle import OracleGenerator, assert_engine_matches_oracle

MAX_TOKENS = 10
def test_llama_matches_oracle(llama_engine, llama_dir, head_dir):
    assert_engine_matches_oracle(llama_engine, llama_dir, head_dir, PROMPTS[:4])


def test_engine_defaults_apply_without_request_keys(llama_engine, llama_dir, head_dir):
    """A request with no RE-Control keys gets the engine's alpha 1.0 / 4 steps (default_on)."""
    out = llama_engine.generate([PROMPTS[0]], greedy(MAX_TOKENS), use_tqdm=False)[0]
    oracle = OracleGenerator(llama_dir, head_dir)
    assert list(out.outputs[0].token_ids) == oracle.generate(
        list(out.prompt_token_ids), MAX_TOKENS, alpha=1.0, steps=4)


def test_sample_logprobs_are_those_of_the_edited_distribution(llama_engine, llama_dir, head_dir):
    """Returned logprobs describe what was sampled from: log_softmax(lm_head(s + u))."""
    from vllm import SamplingParams

    oracle = OracleGenerator(llama_dir, head_dir)
    settings = [(2.0, 8), (0.0, 0)]
    params = [SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=3,
                             extra_args={"recontrol_alpha": alpha, "recontrol_steps": steps})
              for alpha, steps in settings]
    outputs = llama_engine.generate([PROMPTS[0]] * 2, params, use_tqdm=False)
    first_logprobs = []
    for (alpha, steps), out in zip(settings, outputs):
        ids = list(out.prompt_token_ids)
        for token, logprobs in zip(out.outputs[0].token_ids, out.outputs[0].logprobs):
            expected = oracle.log_probs(ids, alpha, steps)
            assert len(logprobs) >= 3 and token in logprobs
            for candidate, logprob in logprobs.items():
                assert logprob.logprob == pytest.approx(float(expected[candidate]), abs=1e-4)
            ids.append(token)
        first_logprobs.append(out.outputs[0].logprobs[0])
    edited, plain = first_logprobs  # the same first position, edited and not
    assert max(abs(edited[t].logprob - plain[t].logprob) for t in edited if t in plain) > 0.1 \
        or set(edited) != set(plain)


def test_requests_pick_their_value_head(llama_engine, llama_dir, head_dir, head1_dir):
    """The shared engine has two heads (2 and 1 hidden layers): rows naming either, rows
    naming none (the default head) and an uncontrolled row, in one batch, and the rows of one
    head alone, each equal the oracle run with the head the request named."""
    oracles = {"default": OracleGenerator(llama_dir, head_dir),
               "one-layer": OracleGenerator(llama_dir, head1_dir)}
    # (prompt, head, alpha, steps, name the head in the request)
    cases = [(prompt, head, alpha, steps, head != "default" or alpha == 2.0)
             for prompt in PROMPTS[:2] for head in oracles for alpha, steps in ((1.0, 4), (2.0, 8))]
    cases.append((PROMPTS[0], "one-layer", 0.0, 0, True))

    def run(batch) -> dict[tuple, list[int]]:
        params = []
        for _, head, alpha, steps, named in batch:
            params.append(greedy(MAX_TOKENS, **control_keys(alpha, steps),
                                 **({"recontrol_head": head} if named else {})))
        outputs = llama_engine.generate([c[0] for c in batch], params, use_tqdm=False)
        tokens = {}
        for (prompt, head, alpha, steps, _), out in zip(batch, outputs):
            got = list(out.outputs[0].token_ids)
            expected = oracles[head].generate(list(out.prompt_token_ids), MAX_TOKENS, alpha, steps)
            assert got == expected, (prompt, head, alpha, steps)
            tokens[(prompt, head, steps)] = got
        return tokens

    mixed = run(cases)
    run([c for c in cases if c[1] == "one-layer"])
    # the two heads steer differently, else a row edited by the wrong head could pass
    assert any(mixed[(prompt, "default", n)] != mixed[(prompt, "one-layer", n)]
               for prompt in PROMPTS[:2] for n in (4, 8))


def test_a_head_brings_its_own_defaults(llama_engine, llama_dir, head1_dir):
    """"one-layer" is configured with alpha 2 and 8 steps: a request naming only the head
    gets those; the engine's (1.0, 4) stay the default head's."""
    oracle = OracleGenerator(llama_dir, head1_dir)
    named, with_alpha = llama_engine.generate(
        [PROMPTS[1]] * 2, [greedy(MAX_TOKENS, recontrol_head="one-layer"),
                           greedy(MAX_TOKENS, recontrol_head="one-layer", recontrol_alpha=1.0)],
        use_tqdm=False)
    ids = list(named.prompt_token_ids)
    assert list(named.outputs[0].token_ids) == oracle.generate(ids, MAX_TOKENS, 2.0, 8)
    assert list(with_alpha.outputs[0].token_ids) == oracle.generate(ids, MAX_TOKENS, 1.0, 8)
    assert list(named.outputs[0].token_ids) != oracle.generate(ids, MAX_TOKENS, 1.0, 4)


def test_requests_bring_their_own_max_norm(llama_engine, llama_dir, head_dir):
    """Per-request radii in one batch with an uncapped controlled request and an
    uncontrolled one: each equals the oracle projected onto its own radius, and the cap
    changes what a strong control writes."""
    oracle = OracleGenerator(llama_dir, head_dir)
    cases = [(prompt, radius) for prompt in PROMPTS[:2] for radius in (None, 0.02, 0.3)]
    params = [greedy(MAX_TOKENS, recontrol_alpha=2.0, recontrol_steps=8,
                     **({} if radius is None else {"recontrol_max_norm": radius}))
              for _, radius in cases] + [greedy(MAX_TOKENS, recontrol=0)]
    outputs = llama_engine.generate([c[0] for c in cases] + [PROMPTS[0]], params,
                                    use_tqdm=False)
    tokens = {}
    for (prompt, radius), out in zip(cases, outputs):
        got = list(out.outputs[0].token_ids)
        assert got == oracle.generate(list(out.prompt_token_ids), MAX_TOKENS, 2.0, 8,
                                      max_norm=radius), (prompt, radius)
        tokens[prompt, radius] = got
    assert any(tokens[p, 0.02] != tokens[p, None] for p in PROMPTS[:2])
    plain = outputs[-1]
    assert list(plain.outputs[0].token_ids) == oracle.generate(list(plain.prompt_token_ids),
                                                               MAX_TOKENS)


def test_unknown_head_is_refused_at_admission(llama_engine):
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match="'nope' is not one of this engine's value heads "
                                         r"\['default', 'one-layer'\]"):
        llama_engine.generate([PROMPTS[0]], greedy(3, recontrol_head="nope"), use_tqdm=False)
    with pytest.raises(VLLMValidationError, match="recontrol_max_norm must be a finite number > 0"):
        llama_engine.generate([PROMPTS[0]], greedy(3, recontrol_max_norm=0), use_tqdm=False)
    # a NumPy scalar: vLLM's engine process cannot be sent it (msgpack), and refused there,
    # after the request was registered, the request never finished and the next generate
    # call hung; admission refuses it first
    numpy = pytest.importorskip("numpy")
    with pytest.raises(VLLMValidationError, match="recontrol_alpha must be a plain Python "
                                                  "int or float, got numpy.float64"):
        llama_engine.generate([PROMPTS[0]], greedy(3, recontrol_alpha=numpy.float64(0.5)),
                              use_tqdm=False)
    out = llama_engine.generate([PROMPTS[0]], greedy(3), use_tqdm=False)[0]  # still serving
    assert len(out.outputs[0].token_ids) == 3
