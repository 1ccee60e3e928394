"""vLLM features a controlled request meets, each checked against the independent oracle or
against the same request alone (and, first, the Qwen2 architecture against the oracle):
preemption under a full KV cache, chunked prefill, prefix caching, parallel sampling (n > 1),
beam search, structured outputs (regex, choice, JSON schema), vLLM's own logits
processors (logit_bias, allowed_token_ids) and prompts given as embeddings.

One deliberately cramped engine: a KV cache of 6 blocks of 32 tokens for 8 concurrent
requests of 40 new tokens (the scheduler must preempt), and 16 scheduled tokens per step
(prompts longer than that are prefilled in chunks). The model is a tiny Qwen2 with a
byte-level BPE tokenizer, which grammar engines need (they match token strings). Prompt
embeddings get an engine of their own, as cramped: with them enabled vLLM feeds every
request through the model's `inputs_embeds` path, and the other tests here keep the
token-id path real deployments use.
"""

from __future__ import annotations

import re

import pytest

from engine_helpers import (PROMPTS, control_keys, counter, greedy, llama_control, start_llm,
                            stop_llm, token_ids)
from oracle import OracleGenerator, assert_engine_matches_oracle

TOKENS = 40
TOKEN_BUDGET = 16  # max_num_batched_tokens
LONG_PROMPT = " ".join(["the good kan a bad ba bon"] * 5)
ENGINE_ALPHA, ENGINE_STEPS = 1.0, 4  # llama_control's defaults
CRAMPED = dict(block_size=32, kv_cache_memory_bytes=6 * 32 * 1024, max_model_len=128,
               max_num_seqs=8, max_num_batched_tokens=TOKEN_BUDGET,
               enable_prefix_caching=True, disable_log_stats=False,
               # compact JSON (no free whitespace), which a random tiny LM would pile up
               structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True})
# (prompt, request keys): controlled and uncontrolled, short and chunked prompts.
BATCH = [
    (LONG_PROMPT, {}), ("the good kan", {"recontrol": 0}),
    ("a bad ba bon", {"recontrol_alpha": 2.0, "recontrol_steps": 8}),
    ("zo ze zi zu", {"recontrol_steps": 3}),
    ("and the", {"recontrol_alpha": 0.5, "recontrol_steps": 1}), ("bal", {}),
    (LONG_PROMPT + " zo", {"recontrol_alpha": 1.5, "recontrol_steps": 12}),
    ("user: the is good", {"recontrol": 0}),
]


def control_of(extra: dict) -> tuple[float, int]:
    """The (alpha, steps) the engine applies to a request with these keys."""
    if extra.get("recontrol") == 0:
        return 0.0, 0
    return extra.get("recontrol_alpha", ENGINE_ALPHA), extra.get("recontrol_steps", ENGINE_STEPS)


@pytest.fixture(scope="module")
def model_dir(workdir):
    from vllm_recontrol.toy import build_tiny_model

    return build_tiny_model(workdir / "tiny-qwen2-bpe", "qwen2", seed=3,
                            tokenizer_kind="byte-bpe")


@pytest.fixture(scope="module")
def engine(model_dir, head_dir):
    llm = start_llm(model_dir, llama_control(head_dir), **CRAMPED)
    yield llm
    stop_llm(llm)


@pytest.fixture(scope="module")
def oracle(model_dir, head_dir):
    return OracleGenerator(model_dir, head_dir)


def test_qwen2_matches_oracle(engine, model_dir, head_dir):
    """Every control setting on four prompts, in one batch (16 rows: preempted too)."""
    assert_engine_matches_oracle(engine, model_dir, head_dir, PROMPTS[:4])


def test_preempted_and_chunked_requests_match_the_oracle(engine, oracle):
    preempted_before = counter(engine, "vllm:num_preemptions")
    outputs = engine.generate([p for p, _ in BATCH], [greedy(TOKENS, **e) for _, e in BATCH],
                              use_tqdm=False)
    assert counter(engine, "vllm:num_preemptions") > preempted_before, "nothing was preempted"
    assert max(len(o.prompt_token_ids) for o in outputs) > TOKEN_BUDGET, "no chunked prefill"
    steered = 0
    for (_, extra), out in zip(BATCH, outputs):
        ids = list(out.prompt_token_ids)
        expected = oracle.generate(ids, TOKENS, *control_of(extra))
        assert list(out.outputs[0].token_ids) == expected, extra
        steered += control_of(extra)[1] > 0 and expected != oracle.generate(ids, TOKENS)
    assert steered >= 3, "the head hardly steers: this test could not tell edited from plain"


def test_prefix_cache_hits_keep_the_edit(engine, oracle):
    params = greedy(TOKENS, recontrol_alpha=2.0, recontrol_steps=8)
    first = engine.generate([LONG_PROMPT], [params], use_tqdm=False)
    hits_before = counter(engine, "vllm:prefix_cache_hits")
    second = engine.generate([LONG_PROMPT], [params], use_tqdm=False)
    assert counter(engine, "vllm:prefix_cache_hits") > hits_before, "no prefix-cache hit"
    expected = oracle.generate(list(first[0].prompt_token_ids), TOKENS, 2.0, 8)
    assert token_ids(first) == token_ids(second) == [expected]


@pytest.fixture
def embeds_engine(model_dir, head_dir):
    llm = start_llm(model_dir, llama_control(head_dir), enable_prompt_embeds=True, **CRAMPED)
    yield llm
    stop_llm(llm)


def test_prompt_embeds_requests_are_controlled_as_their_tokens_are(embeds_engine, oracle,
                                                                   model_dir):
    """A prompt given as embeddings (`enable_prompt_embeds`): the model's own embeddings of
    a prompt's tokens, controlled or not and beside token prompts in one batch, give the
    oracle's tokens for those ids (the edit acts on the final state, however the prompt
    came in)."""
    import torch
    from transformers import AutoModelForCausalLM

    engine = embeds_engine

    embed = AutoModelForCausalLM.from_pretrained(str(model_dir)).get_input_embeddings()
    prompts = ["the good kan", LONG_PROMPT]  # the second is prefilled in chunks
    ids = [list(o.prompt_token_ids) for o in engine.generate(prompts, [greedy(1)] * 2,
                                                             use_tqdm=False)]
    with torch.no_grad():
        embedded = [{"prompt_embeds": embed(torch.tensor(i)).float()} for i in ids]
    cases = [(0, {}), (0, {"recontrol": 0}), (1, {"recontrol_alpha": 2.0, "recontrol_steps": 8})]
    requests = [embedded[i] for i, _ in cases] + prompts
    params = [greedy(TOKENS, **extra) for _, extra in cases] + [greedy(TOKENS)] * 2
    got = token_ids(engine.generate(requests, params, use_tqdm=False))
    for (i, extra), tokens in zip(cases, got):
        assert tokens == oracle.generate(ids[i], TOKENS, *control_of(extra)), extra
    assert got[3:] == [oracle.generate(i, TOKENS, *control_of({})) for i in ids]
    assert got[0] != got[1], "the control changed nothing: this test could not tell"


def test_parallel_samples_are_each_the_request_alone(engine):
    """n = 3 with seed s: vLLM gives child i the seed s + i; each child must equal a single
    request with that seed, and carry the parent's control. (The three children's prompts
    fit the token budget: a seeded request whose prefill is chunked crashes vLLM 0.32's CPU
    worker, stock vLLM too - "CPU Generator does not use offset".)"""
    from vllm import SamplingParams

    def sampled(n: int, seed: int, **extra):
        return SamplingParams(n=n, max_tokens=TOKENS, temperature=1.0, seed=seed,
                              ignore_eos=True, extra_args=extra)

    keys = {"recontrol_alpha": 2.0, "recontrol_steps": 8}
    parent = engine.generate(["a bad ba bon"], [sampled(3, 5, **keys)], use_tqdm=False)[0]
    children = [list(child.token_ids) for child in parent.outputs]
    alone = [token_ids(engine.generate(["a bad ba bon"], [sampled(1, 5 + i, **keys)],
                                       use_tqdm=False))[0] for i in range(3)]
    plain = [token_ids(engine.generate(["a bad ba bon"], [sampled(1, 5 + i, recontrol=0)],
                                       use_tqdm=False))[0] for i in range(3)]
    assert children == alone
    assert all(a != p for a, p in zip(alone, plain)), "the children were not controlled"


def test_beam_search_scores_beams_with_the_edited_distribution(engine, oracle):
    """Beam search (vLLM's BeamSearchParams carry no extra_args, so its requests get the
    engine's defaults): every returned beam's cumulative log-probability is the oracle's
    edited one, not the plain model's."""
    from vllm.sampling_params import BeamSearchParams

    new_tokens = 6
    result = engine.beam_search([{"prompt": "the good kan"}],
                                BeamSearchParams(beam_width=2, max_tokens=new_tokens,
                                                 ignore_eos=True))[0]
    assert len(result.sequences) == 2
    for beam in result.sequences:
        start = len(beam.tokens) - new_tokens
        edited = plain = 0.0
        for i in range(start, len(beam.tokens)):
            edited += float(oracle.log_probs(beam.tokens[:i], ENGINE_ALPHA,
                                             ENGINE_STEPS)[beam.tokens[i]])
            plain += float(oracle.log_probs(beam.tokens[:i])[beam.tokens[i]])
        assert beam.cum_logprob == pytest.approx(edited, abs=1e-3)
        assert abs(edited - plain) > 0.05, "control did not change this beam's score"


def test_logit_bias_and_allowed_tokens_apply_to_the_edited_logits(engine, oracle):
    """vLLM's built-in logits processors run on the logits our edit produced: a biased and a
    restricted request, controlled or not, in one batch, each equal the oracle's decoding of
    the edited logits plus the bias (or within the allowed set)."""
    from vllm import SamplingParams

    prompt, steps = "the good kan", (2.0, 8)
    base = oracle.generate(list(engine.generate([prompt], [greedy(1)], use_tqdm=False)[0]
                                .prompt_token_ids), 12)
    bias = {base[1]: -4.0, base[3]: -4.0, 300: 3.0}  # push away from base's own tokens
    allowed = sorted(set(base[:6]) | {300, 301, 302, 303})
    cases = [({"logit_bias": bias}, (0.0, 0)), ({"logit_bias": bias}, steps),
             ({"allowed_token_ids": allowed}, (0.0, 0)), ({"allowed_token_ids": allowed}, steps)]
    params = [SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, **options,
                             extra_args=control_keys(a, s))
              for options, (a, s) in cases]
    outputs = engine.generate([prompt] * len(cases), params, use_tqdm=False)
    got = token_ids(outputs)
    ids = list(outputs[0].prompt_token_ids)
    for (options, control), tokens in zip(cases, got):
        expected = oracle.generate(ids, 12, *control, logit_bias=options.get("logit_bias"),
                                   allowed=options.get("allowed_token_ids"))
        assert tokens == expected, (options, control)
    assert got[0] != base and got[0] != got[1] and got[2] != got[3]  # each knob mattered
    assert set(got[2]) <= set(allowed) and set(got[3]) <= set(allowed)


CHOICES = ["good kan", "bad bon", "zo ze"]
WORDS_REGEX = "(good|bad|zo)( (kan|bon|ze)){1,3}"
SO_PROMPTS = ["the good kan", "a bad ba bon", "zo ze zi zu"]
SO_CONTROLS = [{}, {"recontrol": 0}, {"recontrol_alpha": 3.0, "recontrol_steps": 10}]


def test_structured_outputs_decode_the_edited_logits(engine, oracle, model_dir):
    """Grammar-constrained greedy requests (choice and regex), at three control settings, in
    one batch with unconstrained ones: each is the oracle's constrained greedy decoding of
    the edited logits (the grammar masks what the edit produced)."""
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    constraints = [(StructuredOutputsParams(choice=CHOICES), "|".join(map(re.escape, CHOICES))),
                   (StructuredOutputsParams(regex=WORDS_REGEX), WORDS_REGEX)]
    cases = [(prompt, pattern, so, extra) for prompt in SO_PROMPTS
             for so, pattern in constraints for extra in SO_CONTROLS]
    params = [SamplingParams(max_tokens=30, temperature=0.0, structured_outputs=so,
                             extra_args=extra or None) for _, _, so, extra in cases]
    outputs = engine.generate([c[0] for c in cases] + SO_PROMPTS[:2],
                              params + [greedy(TOKENS)] * 2, use_tqdm=False)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    texts: dict[tuple, str] = {}
    for (prompt, pattern, _, extra), out in zip(cases, outputs):
        completion = out.outputs[0]
        assert completion.finish_reason == "stop" and re.fullmatch(pattern, completion.text)
        expected = oracle.generate_matching(tokenizer, list(out.prompt_token_ids), pattern, 30,
                                            *control_of(extra))
        assert list(completion.token_ids) == expected, (prompt, pattern, extra)
        texts[(prompt, pattern, control_of(extra))] = completion.text
    changed = sum(text != texts[(prompt, pattern, (0.0, 0))]
                  for (prompt, pattern, control), text in texts.items() if control[1])
    assert changed >= 3, "control changed too few constrained outputs for this test to bite"


WORD_ENUM = ["good", "bad", "kan", "bon", "zo", "ze"]
WORDS_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["words"],
                "properties": {"words": {"type": "array", "items": {"enum": WORD_ENUM},
                                         "minItems": 1, "maxItems": 4}}}
_WORD = '"(' + "|".join(WORD_ENUM) + ')"'
WORDS_JSON = r'\{"words":\[' + _WORD + "(," + _WORD + r'){0,3}\]\}'  # compact JSON it admits


def test_json_schema_outputs_decode_the_edited_logits(engine, oracle, model_dir):
    """JSON-schema-constrained greedy requests at three control settings: each is the
    oracle's greedy decoding of the edited logits under the (compact) JSON the schema admits,
    and parses to what the schema describes; the control changes what is written."""
    import json

    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    cases = [(prompt, extra) for prompt in SO_PROMPTS for extra in SO_CONTROLS]
    params = [SamplingParams(max_tokens=40, temperature=0.0, extra_args=extra or None,
                             structured_outputs=StructuredOutputsParams(json=WORDS_SCHEMA))
              for _, extra in cases]
    outputs = engine.generate([c[0] for c in cases], params, use_tqdm=False)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    texts = {}
    for (prompt, extra), out in zip(cases, outputs):
        completion = out.outputs[0]
        assert completion.finish_reason == "stop", completion.text
        words = json.loads(completion.text)["words"]
        assert 1 <= len(words) <= 4 and set(words) <= set(WORD_ENUM)
        expected = oracle.generate_matching(tokenizer, list(out.prompt_token_ids), WORDS_JSON,
                                            40, *control_of(extra))
        assert list(completion.token_ids) == expected, (prompt, extra, completion.text)
        texts[prompt, control_of(extra)] = completion.text
    changed = sum(text != texts[prompt, (0.0, 0)]
                  for (prompt, control), text in texts.items() if control[1])
    assert changed >= 2, f"control changed too few JSON outputs for this test to bite: {texts}"
