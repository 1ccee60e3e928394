"""Requests that arrive while others are mid-generation (AsyncLLM) keep every guarantee."""

from __future__ import annotations

import asyncio
import time

import pytest

from engine_helpers import ENGINE_KWARGS, PROMPTS, greedy, llama_control, token_ids

MAX_TOKENS = 24
ARRIVE_AFTER_TOKENS = 3  # request i is submitted once request i-1 has streamed this many tokens
# (prompt, request keys): controlled and uncontrolled interleaved.
ARRIVALS = [
    (PROMPTS[i % len(PROMPTS)], extra)
    for i, extra in enumerate([
        {}, {"recontrol": 0}, {"recontrol_alpha": 2.0, "recontrol_steps": 8},
        {"recontrol_alpha": 0.5, "recontrol_steps": 1}, {"recontrol": 0}, {},
        {"recontrol_alpha": 1.5, "recontrol_steps": 12}, {"recontrol": 0},
        {"recontrol_steps": 3}, {"recontrol_alpha": 3.0, "recontrol_steps": 5},
    ])
]


async def _serve_staggered(engine):
    """Each request arrives while the previous one is mid-generation (streamed tokens)."""
    from vllm.sampling_params import RequestOutputKind

    under_way = [asyncio.Event() for _ in ARRIVALS]

    async def one(index, prompt, extra):
        if index:
            await under_way[index - 1].wait()
        params = greedy(MAX_TOKENS, **extra)
        params.output_kind = RequestOutputKind.CUMULATIVE
        started, final = time.monotonic(), None
        async for output in engine.generate(prompt, params, f"req-{index}"):
            final = output
            if len(output.outputs[0].token_ids) >= ARRIVE_AFTER_TOKENS:
                under_way[index].set()
        under_way[index].set()
        return list(final.outputs[0].token_ids), started, time.monotonic()

    return await asyncio.gather(*(one(i, *a) for i, a in enumerate(ARRIVALS)))


def test_staggered_arrivals_match_requests_alone(llama_dir, head_dir, llama_engine):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    args = AsyncEngineArgs(
        model=str(llama_dir), model_impl="recontrol",
        additional_config={"recontrol": llama_control(head_dir)},
        **ENGINE_KWARGS)
    engine = AsyncLLM.from_engine_args(args)
    try:
        results = asyncio.run(_serve_staggered(engine))
    finally:
        engine.shutdown()

    arrived_mid_generation = [results[i][1] < results[i - 1][2] for i in range(1, len(results))]
    assert all(arrived_mid_generation), arrived_mid_generation

    alone = [token_ids(llama_engine.generate([p], [greedy(MAX_TOKENS, **e)], use_tqdm=False))[0]
             for p, e in ARRIVALS]
    assert [tokens for tokens, _, _ in results] == alone
