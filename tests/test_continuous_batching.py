"""Requests that arrive while others are mid-generation (continuous batching, and async
scheduling) keep every guarantee."""

from __future__ import annotations

from engine_helpers import PROMPTS, greedy, llama_control, token_ids

MAX_TOKENS = 24
ARRIVE_AFTER_TOKENS = 3  # request i is added once request i-1 has this many tokens
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


def _serve_staggered(engine) -> tuple[list[list[int]], list[int], list[set[int]]]:
    """Drive vLLM's engine step by step, as ``LLM.generate`` does, adding request i once
    request i-1 has ARRIVE_AFTER_TOKENS tokens: rows join a running batch, run beside
    others and leave it at different steps. Returns each request's tokens, the step it
    joined at, and the requests that were running at each step."""
    from vllm.sampling_params import RequestOutputKind

    index_of: dict[str, int] = {}  # vLLM's outputs name a request by its id or by the
    tokens: list[list[int]] = []     # internal id that add_request returns
    finished: set[int] = set()
    joined_at: list[int] = []
    running: list[set[int]] = []

    def add(index: int) -> None:
        prompt, extra = ARRIVALS[index]
        params = greedy(MAX_TOKENS, **extra)
        params.output_kind = RequestOutputKind.CUMULATIVE
        request_id = f"staggered-{index}"
        index_of[request_id] = index_of[engine.add_request(request_id, prompt, params)] = index
        tokens.append([])
        joined_at.append(len(running))

    try:
        add(0)
        while engine.has_unfinished_requests():
            running.append(set(range(len(tokens))) - finished)
            for output in engine.step():
                index = index_of[output.request_id]
                tokens[index] = list(output.outputs[0].token_ids)
                if output.finished:
                    finished.add(index)
            if len(tokens) < len(ARRIVALS) and len(tokens[-1]) >= ARRIVE_AFTER_TOKENS:
                add(len(tokens))
    except BaseException:  # leave the shared engine empty for the next tests
        engine.abort_request([f"staggered-{i}" for i in range(len(tokens)) if i not in finished])
        raise
    return tokens, joined_at, running


def test_staggered_arrivals_match_requests_alone(llama_engine):
    """Ten requests join the shared engine's batch one after another while the earlier ones
    are mid-generation (its scheduler admits each at the next step): each gets the tokens it
    gets alone."""
    results, joined_at, running = _serve_staggered(llama_engine.llm_engine)

    assert len(results) == len(ARRIVALS) and joined_at == sorted(joined_at)
    # each request joined while its predecessor was still generating, so batches changed
    # under running rows; at the busiest step most of the requests ran together
    assert all(i - 1 in running[joined_at[i]] for i in range(1, len(ARRIVALS))), running
    assert max(len(rows) for rows in running) >= 6, running
    alone = [token_ids(llama_engine.generate([p], [greedy(MAX_TOKENS, **e)], use_tqdm=False))[0]
             for p, e in ARRIVALS]
    assert results == alone
    assert len({tuple(t) for t in alone}) > 4  # the requests really differ


# Run in a child process: an in-process engine (the patch below must reach the engine core,
# which a spawned engine process would not import) and vLLM's cached environment kept away
# from the other tests' engines.
_ASYNC_SCHEDULING_RUN = r"""
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
sys.path.insert(0, sys.argv[1])
from vllm.platforms import current_platform

platform = type(current_platform)
original = platform.check_and_update_config.__func__

def keep_async_scheduling(cls, vllm_config):
    # vLLM's CPU platform turns async scheduling off; on GPUs it is vLLM 0.32's default
    original(cls, vllm_config)
    vllm_config.scheduler_config.async_scheduling = True

platform.check_and_update_config = classmethod(keep_async_scheduling)
from vllm import SamplingParams
from engine_helpers import start_llm, token_ids

llm = start_llm(sys.argv[2], json.loads(sys.argv[3]), max_num_seqs=3,
                distributed_executor_backend="uni")
core = llm.llm_engine.engine_core.engine_core  # in process: the EngineCore itself
assert llm.llm_engine.vllm_config.scheduler_config.async_scheduling
assert core.batch_queue is not None, "no batch queue: not scheduling asynchronously"
fetches_ids = llm.collective_rpc(
    lambda worker: worker.model_runner.input_batch.logitsprocs_need_output_token_ids)
requests = json.loads(sys.argv[4])
outputs = llm.generate([p for p, _, _, _ in requests],
                       [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True,
                                       extra_args=extra or None, **options)
                        for _, n, extra, options in requests], use_tqdm=False)
print("RESULT " + json.dumps({"tokens": token_ids(outputs), "fetches_ids": fetches_ids}))
"""


def test_async_scheduling_keeps_each_rows_control(llama_dir, head_dir, llama_engine):
    """Under async scheduling (vLLM's GPU default; the scheduler plans step N+1 while step N
    runs, with a batch queue), 8 requests of different lengths through 3 batch slots, so rows
    join, finish and move every few steps: each gets the tokens it gets alone in the
    (synchronous) shared engine, also those with penalties, which read the output token ids
    that the batch no longer fetches for the tracker's sake."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    penalties = {"presence_penalty": 2.0, "repetition_penalty": 2.0}  # read output token ids
    requests = [(PROMPTS[i % len(PROMPTS)], 5 + 3 * (i % 4), extra, options)
                for i, (extra, options) in enumerate([
                    ({}, {}), ({"recontrol": 0}, {}),
                    ({"recontrol_alpha": 2.0, "recontrol_steps": 8}, penalties),
                    ({"recontrol_alpha": 0.5, "recontrol_steps": 1}, {}),
                    ({"recontrol": 0}, penalties), ({"recontrol_alpha": 1.5,
                                                     "recontrol_steps": 12}, {}),
                    ({"recontrol_steps": 3}, {}), ({}, penalties)])]
    tests = Path(__file__).parent
    proc = subprocess.run([sys.executable, "-c", _ASYNC_SCHEDULING_RUN, str(tests),
                           str(llama_dir), json.dumps(llama_control(head_dir)),
                           json.dumps(requests)],
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    # the tracker alone does not make vLLM fetch output ids (penalty rows still get them)
    assert result["fetches_ids"] == [False]
    from vllm import SamplingParams

    def params(n, extra, options):
        return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True,
                              extra_args=extra or None, **options)

    alone = [token_ids(llama_engine.generate([p], [params(n, e, o)], use_tqdm=False))[0]
             for p, n, e, o in requests]
    assert result["tokens"] == alone
    assert len({tuple(t) for t in alone}) > 4  # the requests really differ
    penalised = [i for i, (_, _, _, options) in enumerate(requests) if options]
    unpenalised = token_ids(llama_engine.generate(
        [requests[i][0] for i in penalised],
        [params(requests[i][1], requests[i][2], {}) for i in penalised], use_tqdm=False))
    assert [alone[i] for i in penalised] != unpenalised  # penalties had output ids to use
