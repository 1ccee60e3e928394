"""A deterministic stand-in for the two vLLM engines of collection, for fast unit tests.

Responses depend only on each request's seed; the "hidden state" of a position depends only
on the token prefix, and its first feature says whether the prompt holds the word "good" (so
a value head can learn ``good_reward`` from s_0). Calls can be made to fail, to simulate a
crash in the middle of a run.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from vllm_recontrol.training.engines import Generation

WORDS = ["<pad>", "<s>", "</s>", "good", "bad", "a", "b", "c", "d", "e", "f", "g", "Human:"]
IDS = {w: i for i, w in enumerate(WORDS)}
EOS = IDS["</s>"]
HIDDEN = 8


class FakeEngines:
    def __init__(self, fail_generate_call: int | None = None,
                 fail_states_call: int | None = None) -> None:
        self.fail_generate_call = fail_generate_call
        self.fail_states_call = fail_states_call
        self.generate_calls = 0
        self.states_calls = 0
        self.states_lengths: list[list[int]] = []  # each states call's sequence lengths
        self.generated: list[str] = []
        self.released = 0
        self.closed = False

    def generate(self, requests):
        self.generate_calls += 1
        if self.generate_calls == self.fail_generate_call:
            raise RuntimeError("simulated crash while generating")
        outputs = []
        for request in requests:
            rng = random.Random(request.seed)
            prompt_ids = [IDS["<s>"]] + [IDS.get(w, IDS["g"]) for w in request.prompt.split()]
            tokens = [rng.randrange(IDS["a"], IDS["g"] + 1) for _ in range(rng.randint(1, 6))]
            stopped = rng.random() < 0.7
            if stopped:
                tokens[-1] = EOS
            text = " ".join(WORDS[t] for t in tokens if t != EOS)
            outputs.append(Generation(prompt_ids, tokens, text, "stop" if stopped else "length"))
            self.generated.append(request.prompt)
        return outputs

    def states(self, sequences):
        self.states_calls += 1
        self.states_lengths.append([len(seq) for seq in sequences])
        if self.states_calls == self.fail_states_call:
            raise RuntimeError("simulated crash while computing states")
        return [fake_states(seq) for seq in sequences]

    def release_generator(self):
        self.released += 1

    def close(self):
        self.closed = True


def fake_states(sequence: list[int]) -> torch.Tensor:
    """[len, HIDDEN]: feature 0 = prompt has "good", 1 = position, rest = prefix noise."""
    rows = []
    for position, token in enumerate(sequence):
        generator = torch.Generator().manual_seed(hash(tuple(sequence[:position + 1])) % (2**31))
        noise = torch.randn(HIDDEN - 2, generator=generator) * 0.3
        good = float(IDS["good"] in sequence[:position + 1])
        rows.append(torch.cat([torch.tensor([good, position / 10.0]), noise]))
    return torch.stack(rows)


def good_reward(prompt: str, response: str) -> float:
    """A reward s_0 can predict: 1 when the prompt holds "good", plus a little response noise."""
    return float("good" in prompt.split()) + 0.05 * response.count("a")


def opposite_reward(prompt: str, response: str) -> float:
    """A second objective on the same data: the negated good_reward."""
    return -good_reward(prompt, response)


def write_prompts(path: Path, count: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for i in range(count):
            words = [rng.choice(["good", "bad"])] + [rng.choice("abcdef") for _ in range(3)]
            handle.write(json.dumps({"prompt": " ".join(words), "id": i}) + "\n")
    return path


def model_folder_lookalike(path: Path, hidden_size: int, weights: bytes) -> Path:
    """A folder holding a model's config.json and weights file (not loadable), where a head
    saved by mistake would replace them."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "llama",
                                                  "hidden_size": hidden_size}))
    (path / "model.safetensors").write_bytes(weights)
    return path


def fake_collect(tmp: Path, count: int = 40, shard_size: int = 8, engines=None, **options):
    """A complete fake collection in ``tmp/data``; returns (data dir, engines, summary)."""
    from vllm_recontrol.training.collector import collect

    tmp.mkdir(parents=True, exist_ok=True)
    prompts = tmp / "prompts.jsonl"
    if not prompts.exists():
        write_prompts(prompts, count)
    model = tmp / "fake-model"  # a local config, so the hidden size is read without a hub
    model.mkdir(exist_ok=True)
    config = model / "config.json"
    if not config.exists():  # written again, it would be another model folder to a resume
        config.write_text(json.dumps({
            "model_type": "llama", "hidden_size": HIDDEN, "num_attention_heads": 2,
            "num_key_value_heads": 2, "intermediate_size": 16}))
    engines = engines or FakeEngines()
    settings = dict(model=str(model), prompts=str(prompts), out=str(tmp / "data"),
                    shard_size=shard_size, max_new_tokens=8, progress=False)
    settings.update(options)
    summary = collect(engines=engines, **settings)
    return tmp / "data", engines, summary


class FailingStartWorker:
    """A Ray actor whose constructor fails as a head that does not load does."""

    def __init__(self) -> None:
        from vllm_recontrol.errors import ValueHeadError

        raise ValueHeadError("value head folder heads/missing does not exist")

    def work(self) -> int:
        return 1


class FailingCallWorker:
    """A Ray actor whose method fails as an engine that does not start does."""

    def work(self) -> int:
        from vllm_recontrol.training.engines import EngineStartError

        raise EngineStartError("collect: generation: the vLLM engine did not start "
                               "(ValueError: max_model_len too large)")


class DyingWorker:
    """A Ray actor whose process ends mid-call (killed, out of memory)."""

    def work(self) -> int:
        import os

        os._exit(1)


def closable_actors(closes: list, count: int = 2) -> list:
    """Stand-ins for Ray actor handles whose ``close.remote()`` records the call in
    ``closes`` (with ``ray.get`` patched to return its argument)."""
    class Actor:
        class close:  # noqa: N801  (ray's actor.method.remote())
            @staticmethod
            def remote():
                closes.append(1)
                return "ref"
    return [Actor() for _ in range(count)]
