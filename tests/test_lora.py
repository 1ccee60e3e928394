"""Multi-LoRA serving with RE-Control: per-request adapters and per-request control in one batch.

vLLM wraps the logits layer in ``LogitsProcessorWithLoRA`` whenever LoRA is enabled (the
wrapper calls our layer's forward with itself as ``self``), so this once crashed the engine
at the first request. Oracle: the adapter merged into a copy of the model's weights, run by
transformers with the autograd ascent; an adapter on ``lm_head`` must see the edited state.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engine_helpers import (PROMPTS, control_keys, greedy, llama_control, start_llm, stop_llm,
                            token_ids)
from oracle import OracleGenerator

MAX_TOKENS = 10
RANK, LORA_ALPHA = 4, 8
# (alpha, steps) per request; (0, 0) is uncontrolled.
SETTINGS = [(0.0, 0), (1.0, 4), (2.0, 8)]


def write_lora_adapter(model_dir: Path, out: Path, targets: set[str], seed: int) -> Path:
    """A PEFT-format LoRA adapter with random A and B on ``targets``; returns the directory of
    the model with the adapter merged into its weights (W + lora_alpha / r * B @ A)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.split(".")[-1] in targets:
                a = 0.5 * torch.randn(RANK, module.in_features, generator=generator)
                b = 0.5 * torch.randn(module.out_features, RANK, generator=generator)
                tensors[f"base_model.model.{name}.lora_A.weight"] = a
                tensors[f"base_model.model.{name}.lora_B.weight"] = b
                module.weight += (LORA_ALPHA / RANK) * b @ a
    assert {key.split(".")[-3] for key in tensors} == targets
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps(dict(
        peft_type="LORA", task_type="CAUSAL_LM", r=RANK, lora_alpha=LORA_ALPHA,
        target_modules=sorted(targets), bias="none", fan_in_fan_out=False, lora_dropout=0.0,
        base_model_name_or_path=str(model_dir), modules_to_save=None)))
    merged = out.parent / f"{out.name}-merged"
    model.save_pretrained(str(merged), safe_serialization=True)
    return merged


@pytest.fixture(scope="module")
def adapters(workdir, llama_dir) -> dict[str, tuple[Path, Path]]:
    """name -> (adapter dir, merged model dir): one on attention and MLP, one with lm_head."""
    specs = {"blocks": ({"q_proj", "v_proj", "down_proj"}, 3), "lm-head": ({"q_proj", "lm_head"}, 4)}
    return {name: (workdir / f"lora-{name}",
                   write_lora_adapter(llama_dir, workdir / f"lora-{name}", targets, seed))
            for name, (targets, seed) in specs.items()}


@pytest.fixture(scope="module")
def lora_engine(llama_dir, head_dir):
    # One slot more than adapters: on the CPU, vLLM 0.32's LoRA ops index the slots with -1 for
    # rows without an adapter, i.e. apply the last slot's adapter to them (stock vLLM too);
    # an empty last slot holds zeros. GPU kernels skip such rows.
    llm = start_llm(llama_dir, llama_control(head_dir), enable_lora=True, max_lora_rank=8,
                    max_loras=3)
    yield llm
    stop_llm(llm)


def run_against_oracles(llm, loras, oracles) -> dict[tuple, list[int]]:
    """Every (prompt, adapter, control setting) in one batch; each row against its oracle."""
    cases = [(prompt, lora, alpha, steps) for prompt in PROMPTS[:2] for lora in loras
             for alpha, steps in SETTINGS]
    params = [greedy(MAX_TOKENS, **control_keys(alpha, steps)) for _, _, alpha, steps in cases]
    outputs = llm.generate([c[0] for c in cases], params, lora_request=[c[1] for c in cases],
                           use_tqdm=False)
    tokens: dict[tuple, list[int]] = {}
    for (prompt, lora, alpha, steps), out, ids in zip(cases, outputs, token_ids(outputs)):
        name = lora.lora_name if lora else None
        expected = oracles[name].generate(list(out.prompt_token_ids), MAX_TOKENS, alpha, steps)
        assert ids == expected, f"{prompt!r} lora={name} alpha={alpha} steps={steps}"
        tokens[(prompt, name, steps)] = ids
    for prompt, name, steps in list(tokens):  # else the oracle comparison could not fail
        if steps:
            assert tokens[(prompt, name, steps)] != tokens[(prompt, name, 0)], (prompt, name)
    return tokens


def test_adapters_base_rows_and_control_mixed_in_one_batch(lora_engine, adapters, llama_dir,
                                                           head_dir):
    from vllm.lora.request import LoRARequest

    loras = [None] + [LoRARequest(name, i + 1, str(path))
                      for i, (name, (path, _)) in enumerate(sorted(adapters.items()))]
    oracles = {None: OracleGenerator(llama_dir, head_dir)}
    oracles.update({name: OracleGenerator(merged, head_dir)
                    for name, (_, merged) in adapters.items()})
    tokens = run_against_oracles(lora_engine, loras, oracles)
    for prompt in PROMPTS[:2]:  # each adapter really changes the model
        assert len({tuple(tokens[(prompt, name, 0)]) for name in oracles}) == 3, prompt


def test_server_with_lora_modules_controls_adapter_requests(lora_engine, adapters, llama_dir,
                                                            head_dir, tmp_path):
    """`vllm serve --enable-lora --lora-modules ...`: a request names an adapter as its
    model and carries control keys in vllm_xargs; it gets the offline engine's tokens for
    the same adapter and control."""
    from vllm.lora.request import LoRARequest

    from engine_helpers import serving

    modules = [f"{name}={path}" for name, (path, _) in sorted(adapters.items())]
    cases = [("tiny", {"recontrol": 0}), ("lm-head", {"recontrol_alpha": 2.0,
                                                      "recontrol_steps": 8}),
             ("lm-head", {"recontrol": 0}), ("blocks", {})]
    with serving(llama_dir, llama_control(head_dir), tmp_path / "serve-lora.log",
                 "--enable-lora", "--max-lora-rank", "8", "--max-loras", "3",
                 "--lora-modules", *modules) as client:
        texts = [client.completions.create(
            model=model, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0.0,
            extra_body={"ignore_eos": True, "vllm_xargs": xargs}).choices[0].text
            for model, xargs in cases]
    ids = {name: i + 1 for i, name in enumerate(sorted(adapters))}
    offline = lora_engine.generate(
        [PROMPTS[0]] * len(cases), [greedy(MAX_TOKENS, **xargs) for _, xargs in cases],
        lora_request=[None if model == "tiny" else
                      LoRARequest(model, ids[model], str(adapters[model][0]))
                      for model, _ in cases], use_tqdm=False)
    assert texts == [out.outputs[0].text for out in offline]
    assert texts[1] != texts[2] != texts[0]  # control, and the adapter, changed the answer

