"""A real ``vllm serve --model-impl recontrol`` driven by the ``openai`` client (two
data-parallel engine cores where there are two CPU cores; the single-engine server runs in
test_lora.py)."""

from __future__ import annotations

import pytest

from engine_helpers import PROMPTS, cpu_cores, greedy, serving, shared_control

openai = pytest.importorskip("openai")

MAX_TOKENS = 10


@pytest.fixture(scope="module")
def server(llama_dir, head_dir, head1_dir, tmp_path_factory):
    """The module's one `vllm serve`, with the shared engine's settings. Where the machine
    has two cores, it runs `--data-parallel-size 2`: two engine cores behind two API servers
    (vLLM's own scale-out on one machine, one core each), so every answer below must equal
    the offline single engine's whichever core served it. Yields (client, log path, number
    of engine cores)."""
    log_path = tmp_path_factory.mktemp("server") / "serve.log"
    cores = cpu_cores()[:2]
    extra, env = ["--enable-scale-out"], None  # also /inference/v1/generate
    if len(cores) == 2:
        extra += ["--data-parallel-size", "2"]
        env = {"VLLM_CPU_OMP_THREADS_BIND": f"{cores[0]}|{cores[1]}"}
    with serving(llama_dir, shared_control(head_dir, head1_dir), log_path, *extra,
                 env=env) as client:
        yield client, log_path, max(len(cores), 1)


def complete(client, prompt: str, **xargs) -> str:
    response = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0,
        extra_body={"ignore_eos": True, **({"vllm_xargs": xargs} if xargs else {})})
    return response.choices[0].text


def test_completions_follow_request_keys(server, llama_engine):
    client, _, _ = server
    cases = [{"recontrol": 0}, {}, {"recontrol_alpha": 2.0, "recontrol_steps": 8},
             {"recontrol_alpha": 2.0, "recontrol_steps": 8, "recontrol_head": "one-layer"},
             {"recontrol_alpha": 2.0, "recontrol_steps": 8, "recontrol_max_norm": 0.02}]
    texts = [complete(client, PROMPTS[3], **xargs) for xargs in cases]
    offline = [o.outputs[0].text for o in llama_engine.generate(
        [PROMPTS[3]] * len(cases), [greedy(MAX_TOKENS, **x) for x in cases], use_tqdm=False)]
    assert texts == offline
    assert texts[0] != texts[2] and texts[2] != texts[3] and texts[2] != texts[4]


def test_streamed_completion_equals_unstreamed(server):
    """Streaming (server-sent events) carries the same controlled tokens."""
    client, _, _ = server
    xargs = {"recontrol_alpha": 2.0, "recontrol_steps": 8}
    chunks = client.completions.create(
        model="tiny", prompt=PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0.0, stream=True,
        extra_body={"ignore_eos": True, "vllm_xargs": xargs})
    streamed = [chunk.choices[0].text for chunk in chunks if chunk.choices]
    assert len(streamed) > 1  # really streamed, token by token
    assert "".join(streamed) == complete(client, PROMPTS[1], **xargs)
    assert "".join(streamed) != complete(client, PROMPTS[1], recontrol=0)


def test_chat_is_controlled(server, llama_engine):
    client, _, _ = server
    messages = [{"role": "user", "content": "the good kan"}]

    def chat(**xargs) -> str:
        response = client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=MAX_TOKENS, temperature=0.0,
            extra_body={"ignore_eos": True, "vllm_xargs": xargs})
        return response.choices[0].message.content

    off, on = chat(recontrol=0), chat(recontrol_alpha=2.0, recontrol_steps=8)
    offline = llama_engine.chat(messages, greedy(MAX_TOKENS, recontrol_alpha=2.0,
                                                 recontrol_steps=8), use_tqdm=False)
    assert on == offline[0].outputs[0].text
    assert on != off


@pytest.mark.parametrize("xargs, words", [
    ({"recontrol_alpha": -1.0}, "recontrol_alpha"),
    ({"recontrol_alpha": "strong"}, "recontrol_alpha"),
    ({"recontrol_steps": 51}, "max_steps"),
    ({"recontrol_steps": 2.5}, "recontrol_steps"),
    ({"recontrol": 7}, "recontrol"),
    ({"recontrol_step": 3}, "unknown"),
    ({"recontrol_head": "nope"}, "value heads ['default', 'one-layer']"),
    ({"recontrol_max_norm": -0.5}, "recontrol_max_norm"),
])
def test_invalid_values_get_400_and_server_keeps_serving(server, xargs, words):
    """Also when streamed: the engine's admission check runs after a stream's HTTP 200, so
    the front-end checks the values before the stream starts (completions, chat)."""
    client, _, _ = server
    with pytest.raises(openai.BadRequestError) as caught:
        complete(client, PROMPTS[0], **xargs)
    assert caught.value.status_code == 400
    assert words in str(caught.value)
    streams = (lambda: client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=2,
                                                 stream=True, extra_body={"vllm_xargs": xargs}),
               lambda: client.chat.completions.create(
                   model="tiny", max_tokens=2, stream=True, extra_body={"vllm_xargs": xargs},
                   messages=[{"role": "user", "content": "the good kan"}]))
    for stream in streams:
        with pytest.raises(openai.BadRequestError) as caught:
            list(stream())
        assert caught.value.status_code == 400 and words in str(caught.value)
    assert complete(client, PROMPTS[0], recontrol_steps=2)  # still answering


def test_control_keys_outside_vllm_xargs_get_400(server):
    """vLLM keeps unknown top-level fields but passes only vllm_xargs to the engine: a
    request with its keys at the top level (extra_body={"recontrol_alpha": ...}) would be
    answered uncontrolled, so it is refused, on completions and chat, naming the key."""
    client, _, _ = server
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=2,
                                  extra_body={"recontrol_alpha": 2.0, "recontrol_steps": 8})
    assert caught.value.status_code == 400
    assert "recontrol_alpha, recontrol_steps must be inside vllm_xargs" in str(caught.value)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", max_tokens=2,
                                       messages=[{"role": "user", "content": "the good kan"}],
                                       extra_body={"Recontrol": 0})
    assert caught.value.status_code == 400 and "Recontrol must be inside" in str(caught.value)
    # other unknown top-level fields stay vLLM's business; the server keeps serving
    assert complete(client, PROMPTS[0], recontrol_steps=2)
    assert client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=2,
                                     extra_body={"some_other_field": 1}).choices[0].text


def test_endpoints_that_would_drop_control_keys_refuse_them(server):
    """/v1/messages (Anthropic) keeps only vllm_xargs, so its top-level keys were ignored;
    /generative_scoring passes no vllm_xargs at all, so it scored with the engine's control
    whatever the request said (also an invalid value, with 200). Both answer 400 naming the
    key; what each does carry still works."""
    import httpx

    client, _, _ = server
    root = str(client.base_url).rstrip("/").removesuffix("/v1")
    message = {"model": "tiny", "max_tokens": 2,
               "messages": [{"role": "user", "content": "the good kan"}]}
    refused = httpx.post(f"{root}/v1/messages", timeout=60,
                         json={**message, "recontrol_alpha": 2.0, "recontrol_steps": 8})
    assert refused.status_code == 400
    assert "recontrol_alpha, recontrol_steps cannot be used here: /v1/messages passes only " \
           "vllm_xargs" in refused.text
    answered = httpx.post(f"{root}/v1/messages", timeout=60,
                          json={**message, "vllm_xargs": {"recontrol_steps": 2}})
    assert answered.status_code == 200, answered.text
    scoring = {"query": "the good", "items": [" kan"], "label_token_ids": [5, 6]}
    for extra, key in (({"vllm_xargs": {"recontrol": 0}}, "vllm_xargs.recontrol"),
                       ({"recontrol_alpha": "bad"}, "recontrol_alpha")):
        refused = httpx.post(f"{root}/generative_scoring", json={**scoring, **extra},
                             timeout=60)
        assert refused.status_code == 400
        assert f"{key} cannot be used here: /generative_scoring builds its own sampling " \
               "parameters" in refused.text
        # the whole advice: vLLM refuses logprob_token_ids without logprobs
        assert "logprob_token_ids (the label tokens), logprobs (their number) and " \
               "vllm_xargs" in refused.text
    scored = httpx.post(f"{root}/generative_scoring", json=scoring, timeout=60)
    assert scored.status_code == 200, scored.text


def test_the_readme_s_way_to_score_labels_under_a_chosen_control(server):
    """/generative_scoring scores with the engine's control only; the README's way to
    choose one: a one-token completion with the label tokens' logprobs and vllm_xargs. With
    no keys it gives /generative_scoring's score (softmax over the labels); with keys,
    another."""
    import math

    import httpx

    client, _, _ = server
    root = str(client.base_url).rstrip("/").removesuffix("/v1")
    query, item, labels = [3, 4], [7], [5, 6]
    scored = httpx.post(f"{root}/generative_scoring", timeout=60, json={
        "query": query, "items": [item], "label_token_ids": labels})
    assert scored.status_code == 200, scored.text
    engine_score = scored.json()["data"][0]["score"]

    def first_label_share(xargs: dict) -> float:
        body = {"model": "tiny", "prompt": query + item, "max_tokens": 1, "temperature": 0,
                "logprobs": len(labels), "logprob_token_ids": labels,
                "return_tokens_as_token_ids": True, "vllm_xargs": xargs}
        answer = httpx.post(f"{root}/v1/completions", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        top = answer.json()["choices"][0]["logprobs"]["top_logprobs"][0]
        first, second = (top[f"token_id:{label}"] for label in labels)
        return 1.0 / (1.0 + math.exp(second - first))

    assert first_label_share({}) == pytest.approx(engine_score, abs=1e-6)
    assert abs(first_label_share({"recontrol_alpha": 4.0, "recontrol_steps": 8})
               - engine_score) > 1e-4


def test_the_token_generate_endpoint_takes_control_in_extra_args_only(server):
    """/inference/v1/generate (--enable-scale-out) passes sampling_params.extra_args on: a
    control there gives the tokens /v1/completions gives with the same vllm_xargs; keys
    anywhere else, which vLLM dropped (answering with the engine's control), and a bad value,
    which a stream answered with 200 and an error event, are 400s naming the key."""
    import httpx

    client, _, _ = server
    root = str(client.base_url).rstrip("/").removesuffix("/v1")
    control = {"recontrol_alpha": 2.0, "recontrol_steps": 8}
    prompt = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=1,
                                       extra_body={"echo": True, "return_token_ids": True})
    tokens = prompt.choices[0].prompt_token_ids

    def generate(params: dict, stream: bool = False, **top) -> httpx.Response:
        body = {"model": "tiny", "token_ids": tokens, "stream": stream, **top,
                "sampling_params": {"max_tokens": MAX_TOKENS, "temperature": 0.0,
                                    "ignore_eos": True, **params}}
        return httpx.post(f"{root}/inference/v1/generate", json=body, timeout=60)

    def completion_tokens(**xargs) -> list[int]:
        return client.completions.create(
            model="tiny", prompt=tokens, max_tokens=MAX_TOKENS, temperature=0.0,
            extra_body={"ignore_eos": True, "return_token_ids": True,
                        **({"vllm_xargs": xargs} if xargs else {})}).choices[0].token_ids

    answered = generate({"extra_args": control})
    assert answered.status_code == 200, answered.text
    steered = answered.json()["choices"][0]["token_ids"]
    assert steered == completion_tokens(**control)
    assert steered != completion_tokens()  # the control changed the answer
    for top, params, key in (({}, control, "sampling_params.recontrol_alpha"),
                             ({}, {"recontrol": 0}, "sampling_params.recontrol"),
                             (control, {}, "recontrol_alpha"),
                             ({"vllm_xargs": control}, {}, "vllm_xargs.recontrol_alpha")):
        for stream in (False, True):
            refused = generate(params, stream, **top)
            assert refused.status_code == 400, (top, params, refused.text)
            assert f"{key}" in refused.text and "would be ignored here" in refused.text
    for stream in (False, True):
        refused = generate({"extra_args": {"recontrol_steps": 10 ** 6}}, stream)
        assert refused.status_code == 400 and "max_steps" in refused.text, refused.text


def test_beam_search_refuses_request_keys_and_uses_engine_defaults(server, llama_engine):
    """vLLM's beam search drops vllm_xargs, so a beam-search request with recontrol keys is
    refused with 400 (completions and chat) instead of silently ignoring them; without keys
    it runs with the engine's defaults, as offline ``LLM.beam_search`` does."""
    from vllm.sampling_params import BeamSearchParams

    client, _, _ = server
    beam = {"use_beam_search": True, "ignore_eos": True}
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="tiny", prompt=PROMPTS[3], n=2, max_tokens=MAX_TOKENS,
                                  temperature=0.0,
                                  extra_body={**beam, "vllm_xargs": {"recontrol": 0}})
    assert caught.value.status_code == 400 and "use_beam_search" in str(caught.value)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "the good kan"}], n=2,
            max_tokens=MAX_TOKENS, temperature=0.0,
            extra_body={**beam, "vllm_xargs": {"recontrol_steps": 2, "recontrol_alpha": 1.0}})
    assert caught.value.status_code == 400
    assert "recontrol_alpha, recontrol_steps" in str(caught.value)

    response = client.completions.create(model="tiny", prompt=PROMPTS[3], n=2,
                                         max_tokens=MAX_TOKENS, temperature=0.0,
                                         extra_body=beam)
    offline = llama_engine.beam_search([{"prompt": PROMPTS[3]}], BeamSearchParams(
        beam_width=2, max_tokens=MAX_TOKENS, ignore_eos=True))[0]
    tokenizer = llama_engine.get_tokenizer()
    prompt_length = len(tokenizer(PROMPTS[3]).input_ids)
    assert [c.text for c in response.choices] == [
        tokenizer.decode(beam.tokens[prompt_length:]) for beam in offline.sequences]


def test_data_parallel_server_gives_the_single_engine_answers(server, llama_engine):
    """Requests sent at once (vLLM's coordinator balances them over the module server's two
    engine cores) get the single engine's tokens; both API servers reject a bad value with
    400. vLLM's Ray data-parallel backend is GPU-only (on CPU it finds no devices in Ray)."""
    from concurrent.futures import ThreadPoolExecutor

    client, log_path, engines = server
    if engines < 2:
        pytest.skip("needs two CPU cores for two engines")
    cases = [({}, PROMPTS[0]), ({"recontrol": 0}, PROMPTS[0]),
             ({"recontrol_alpha": 2.0, "recontrol_steps": 8}, PROMPTS[0]),
             ({}, PROMPTS[1]), ({"recontrol_steps": 2}, PROMPTS[2]),
             ({"recontrol_head": "one-layer", "recontrol_steps": 8}, PROMPTS[1])] * 2
    offline = [o.outputs[0].text for o in llama_engine.generate(
        [p for _, p in cases], [greedy(MAX_TOKENS, **x) for x, _ in cases], use_tqdm=False)]
    with ThreadPoolExecutor(len(cases)) as pool:
        texts = list(pool.map(lambda case: complete(client, case[1], **case[0]), cases))
    rejected = []
    for bad in [{"recontrol_steps": 51}, {"recontrol_head": "nope"}] * 2:
        # the API servers share the port: several tries reach both; each knows the heads
        with pytest.raises(openai.BadRequestError) as caught:
            complete(client, PROMPTS[0], **bad)
        rejected.append(caught.value.status_code)
    assert texts == offline
    assert rejected == [400] * 4
    assert "EngineCore_DP1" in log_path.read_text()  # the second engine really ran
