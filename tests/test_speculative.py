"""Speculative decoding under RE-Control: vLLM verifies a request's draft tokens with the
target's logits, one sampled row per draft plus one, so every row of a request must get the
request's edit; then greedy decoding equals the oracle's, whatever was drafted.

Three engines on the tiny Llama: n-gram drafts (no draft model: vLLM names the target's
config as the draft's) in a cramped engine (a KV cache of 6 blocks of 32 tokens, 16
scheduled tokens per step: requests are preempted, long prompts prefilled in chunks, shared
prompt blocks hit the prefix cache), a draft model (the tiny Llama itself, so drafts of
uncontrolled requests are all accepted, which they are only if the drafter's logits stay
unedited) and a random one-layer EAGLE head (built with the target's engine config, where
the drafter's logits layer must stay vLLM's own).
"""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch

from engine_helpers import (PROMPTS, counter, greedy, llama_control, shared_control, start_llm,
                            stop_llm)
from oracle import OracleGenerator, assert_engine_matches_oracle

SPEC_TOKENS = 3
NGRAM = {"method": "ngram", "num_speculative_tokens": SPEC_TOKENS, "prompt_lookup_max": 3,
         "prompt_lookup_min": 1}
TOKENS = 24  # long enough for the tiny model to repeat itself, which n-grams draft from
TOKEN_BUDGET = 16  # max_num_batched_tokens of the cramped engine
CRAMPED = dict(block_size=32, kv_cache_memory_bytes=6 * 32 * 1024, max_model_len=128,
               max_num_seqs=8, max_num_batched_tokens=TOKEN_BUDGET, enable_prefix_caching=True)
LONG_PROMPT = " ".join(["the good kan a bad ba bon"] * 5)  # 35 words: prefilled in chunks
ACCEPTED = "vllm:spec_decode_num_accepted_tokens"
DRAFTED = "vllm:spec_decode_num_draft_tokens"
# (request keys, head, alpha, steps, max_norm as the engine resolves them): two heads (the
# second, "one-layer", with its own alpha 2 and 8 steps), a radius, other steps, all controlled
MIXED_HEADS = [({}, "default", 1.0, 4, None),
               ({"recontrol_head": "one-layer"}, "one-layer", 2.0, 8, None),
               ({"recontrol_alpha": 2.0, "recontrol_steps": 8, "recontrol_max_norm": 0.05},
                "default", 2.0, 8, 0.05),
               ({"recontrol_head": "one-layer", "recontrol_steps": 3}, "one-layer", 2.0, 3,
                None)]


def assert_mixed_heads_match_the_oracle(llm, prompts: list[str], llama_dir, head_dir,
                                        head1_dir, tokens: int = TOKENS) -> None:
    """Every prompt under every MIXED_HEADS control, in one batch: each row equals the
    oracle of its head, and drafts were accepted, which can only be controlled requests'
    drafts verified with their edited logits."""
    oracles = {"default": OracleGenerator(llama_dir, head_dir),
               "one-layer": OracleGenerator(llama_dir, head1_dir)}
    cases = [(prompt, *case) for prompt in prompts for case in MIXED_HEADS]
    drafted, accepted = counter(llm, DRAFTED), counter(llm, ACCEPTED)
    outputs = llm.generate([c[0] for c in cases], [greedy(tokens, **c[1]) for c in cases],
                           use_tqdm=False)
    assert counter(llm, DRAFTED) > drafted
    assert counter(llm, ACCEPTED) > accepted, "no controlled request's draft accepted"
    steered = 0
    for out, (_, keys, head, alpha, steps, radius) in zip(outputs, cases):
        ids = list(out.prompt_token_ids)
        expected = oracles[head].generate(ids, tokens, alpha, steps, max_norm=radius)
        assert list(out.outputs[0].token_ids) == expected, keys
        steered += expected != oracles[head].generate(ids, tokens)
    assert steered >= 2 * len(prompts), "the heads hardly steer: this test could not tell"


@pytest.fixture(scope="module")
def ngram_engine(llama_dir, head_dir, head1_dir):
    llm = start_llm(llama_dir, shared_control(head_dir, head1_dir), speculative_config=NGRAM,
                    disable_log_stats=False, **CRAMPED)
    yield llm
    stop_llm(llm)


def test_ngram_speculation_matches_the_oracle(ngram_engine, llama_dir, head_dir):
    accepted = counter(ngram_engine, ACCEPTED)
    assert_engine_matches_oracle(ngram_engine, llama_dir, head_dir, PROMPTS[:3], TOKENS)
    assert counter(ngram_engine, ACCEPTED) > accepted, "no draft was accepted: not speculating"


def test_preempted_chunked_and_cached_requests_of_several_heads_verify_drafts(
        ngram_engine, llama_dir, head_dir, head1_dir):
    preempted = counter(ngram_engine, "vllm:num_preemptions")
    hits = counter(ngram_engine, "vllm:prefix_cache_hits")
    # 40 new tokens: every request outgrows its first block, 8 at a time in 6 blocks
    assert_mixed_heads_match_the_oracle(ngram_engine, [PROMPTS[0], LONG_PROMPT, PROMPTS[3]],
                                        llama_dir, head_dir, head1_dir, tokens=40)
    assert counter(ngram_engine, "vllm:num_preemptions") > preempted, "nothing was preempted"
    assert counter(ngram_engine, "vllm:prefix_cache_hits") > hits, "no prefix-cache hit"
    prompt_tokens = len(ngram_engine.get_tokenizer()(LONG_PROMPT)["input_ids"])
    assert prompt_tokens > TOKEN_BUDGET, "the long prompt was not prefilled in chunks"


def test_bad_request_is_refused_at_admission_with_speculation(ngram_engine):
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match="recontrol_steps"):
        ngram_engine.generate([PROMPTS[0]], greedy(3, recontrol_steps=10_000), use_tqdm=False)
    out = ngram_engine.generate([PROMPTS[0]], greedy(3), use_tqdm=False)[0]  # still serving
    assert len(out.outputs[0].token_ids) == 3


def test_a_draft_model_proposes_unedited_and_the_target_decides(llama_dir, head_dir,
                                                                 head1_dir):
    draft = {"method": "draft_model", "model": str(llama_dir),
             "num_speculative_tokens": SPEC_TOKENS}
    llm = start_llm(llama_dir, shared_control(head_dir, head1_dir), speculative_config=draft,
                    disable_log_stats=False)
    try:
        drafted, accepted = counter(llm, DRAFTED), counter(llm, ACCEPTED)
        llm.generate(PROMPTS[:3], greedy(TOKENS, recontrol=0), use_tqdm=False)
        # the drafter is the target's own model: unedited drafts of uncontrolled requests
        # are the target's own greedy tokens, every one accepted
        assert counter(llm, DRAFTED) - drafted > 0
        assert counter(llm, ACCEPTED) - accepted == counter(llm, DRAFTED) - drafted
        assert_engine_matches_oracle(llm, llama_dir, head_dir, PROMPTS[:3], TOKENS)
        assert_mixed_heads_match_the_oracle(llm, PROMPTS[:2], llama_dir, head_dir, head1_dir)
    finally:
        stop_llm(llm)


def build_tiny_eagle(directory: Path) -> Path:
    """A random EAGLE (v1) head for the tiny Llama, laid out as EAGLE checkpoints are: one
    decoder layer without its input norm, the token embedding and ``fc`` (state and
    embedding in, state out)."""
    from safetensors.torch import load_file, save_file

    from engine_helpers import HIDDEN
    from vllm_recontrol.toy import build_tiny_model

    folder = build_tiny_model(directory, "llama", num_layers=1, seed=7)
    weights = load_file(str(folder / "model.safetensors"))
    kept = {name[len("model."):]: tensor for name, tensor in weights.items()
            if name.startswith(("model.layers.0.", "model.embed_tokens."))
            and "input_layernorm" not in name}
    kept["fc.weight"] = torch.randn(HIDDEN, 2 * HIDDEN, generator=torch.Generator().manual_seed(8)) * 0.1
    save_file(kept, str(folder / "model.safetensors"))
    return folder


def logits_layers(worker) -> tuple[list[str], list[str]]:
    """The logits layer classes of a worker's target model and of its drafter."""
    def names(model) -> list[str]:
        return sorted({type(m).__name__ for m in model.modules()
                       if type(m).__name__.endswith("LogitsProcessor")})

    runner = worker.model_runner
    return names(runner.model), names(runner.drafter.model)


def test_an_eagle_drafter_keeps_vllm_s_logits_layer(llama_dir, head_dir, tmp_path, monkeypatch):
    """EAGLE builds its drafter under the target's engine config: only the target's layer
    edits (one set of heads in memory), and greedy tokens are the oracle's."""
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc of a function
    eagle = {"method": "eagle", "model": str(build_tiny_eagle(tmp_path / "eagle")),
             "num_speculative_tokens": SPEC_TOKENS}
    llm = start_llm(llama_dir, llama_control(head_dir), speculative_config=eagle,
                    disable_log_stats=False)
    try:
        assert llm.collective_rpc(logits_layers) == [(["RecontrolLogitsProcessor"],
                                                      ["LogitsProcessor"])]
        drafted = counter(llm, DRAFTED)
        assert_engine_matches_oracle(llm, llama_dir, head_dir, PROMPTS[:2], TOKENS)
        assert counter(llm, DRAFTED) > drafted  # (a random head's drafts are all rejected)
    finally:
        stop_llm(llm)


def test_only_a_separate_draft_model_counts_as_the_drafter():
    from vllm_recontrol._vllm_adapter import _is_drafter

    target, draft = object(), object()
    with_draft = types.SimpleNamespace(speculative_config=types.SimpleNamespace(
        draft_model_config=draft, target_model_config=target))
    ngram = types.SimpleNamespace(speculative_config=types.SimpleNamespace(
        draft_model_config=target, target_model_config=target))
    plain = types.SimpleNamespace(speculative_config=None)
    assert _is_drafter(with_draft, draft) and not _is_drafter(with_draft, target)
    assert not _is_drafter(ngram, target)  # n-gram drafts: the target's config is the draft's
    assert not _is_drafter(plain, target) and not _is_drafter(with_draft, None)


def test_speculation_builds_the_row_tracker_but_still_refuses_other_processors(llama_dir,
                                                                              head_dir):
    """vLLM refuses custom logits processors with speculative decoding (its rejection
    sampler applies none); the row tracker, which changes no logits, is built anyway, and
    any other custom processor is still refused as in stock vLLM."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor
    from vllm.v1.worker import gpu_model_runner

    from engine_helpers import ENGINE_KWARGS

    class Foreign(V1LogitsProcessor):
        def __init__(self, vllm_config, device, is_pin_memory):
            pass

        def is_argmax_invariant(self):
            return False

        def apply(self, logits):
            return logits

        def update_state(self, batch_update):
            pass

    config = EngineArgs(model=str(llama_dir), model_impl="recontrol", speculative_config=NGRAM,
                        additional_config={"recontrol": llama_control(head_dir)},
                        **ENGINE_KWARGS).create_engine_config()
    ours = list(config.model_config.logits_processors)
    built = gpu_model_runner.build_logitsprocs(config, torch.device("cpu"), False, False, ours)
    kinds = [type(p).__name__ for p in built.all]
    assert any(k.startswith("RecontrolRowTracker") for k in kinds)
    assert "MinTokensLogitsProcessor" in kinds  # vLLM's own speculative default is kept
    with pytest.raises(ValueError, match="not supported when speculative decoding"):
        gpu_model_runner.build_logitsprocs(config, torch.device("cpu"), False, False,
                                           [*ours, Foreign])


def test_warm_up_covers_the_largest_sampling_call():
    from vllm_recontrol._vllm_adapter import most_sampled_rows

    def config(seqs: int, budget: int | None, drafts: int | None):
        return types.SimpleNamespace(
            scheduler_config=types.SimpleNamespace(max_num_seqs=seqs,
                                                   max_num_batched_tokens=budget),
            speculative_config=None if drafts is None else types.SimpleNamespace(
                num_speculative_tokens=drafts))

    assert most_sampled_rows(config(256, 8192, None)) == 256
    assert most_sampled_rows(config(256, 8192, 3)) == 1024  # drafts plus one per request
    assert most_sampled_rows(config(256, 512, 3)) == 512  # no more rows than tokens a step
    assert most_sampled_rows(config(8, None, 2)) == 24
