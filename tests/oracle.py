"""An independent RE-Control implementation: transformers forward + autograd, no plugin code.

It shares nothing with ``vllm_recontrol`` but the on-disk head format: the value head is read
straight from ``model.safetensors`` into an ``nn.Sequential`` and its gradient comes from
``torch.autograd``, so the plugin's closed-form gradient, row bookkeeping and vLLM hooks are
all checked against it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn


def load_head_as_sequential(head_dir: str | Path) -> nn.Sequential:
    config = json.loads((Path(head_dir) / "config.json").read_text())
    tensors = load_file(str(Path(head_dir) / "model.safetensors"))
    sizes = [config["hidden_size"], *config["widths"], 1]
    modules: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        linear = nn.Linear(fan_in, fan_out, dtype=torch.float32)
        with torch.no_grad():
            linear.weight.copy_(tensors[f"layers.{i}.weight"])
            linear.bias.copy_(tensors[f"layers.{i}.bias"])
        modules += [linear, nn.ReLU()]
    return nn.Sequential(*modules[:-1])


def autograd_ascent(value: nn.Module, state: torch.Tensor, alpha: float, steps: int,
                    max_norm: float | None = None) -> torch.Tensor:
    """u = 0; repeat: u += alpha * dV/ds(s + u), via autograd (the reference code's method);
    with ``max_norm``, each row's u is then scaled back onto ||u|| <= max_norm."""
    u = torch.zeros_like(state)
    for _ in range(steps):
        x = (state + u).detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(value(x).sum(), x)
        u = u + alpha * grad
        if max_norm is not None:
            u = u * (max_norm / u.norm(dim=-1, keepdim=True)).clamp(max=1.0)
    return state + u


class OracleGenerator:
    """Greedy generation with the RE-Control edit applied before ``lm_head`` at every step."""

    def __init__(self, model_dir: str | Path, head_dir: str | Path | None) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        self.model.eval()
        self.value = load_head_as_sequential(head_dir) if head_dir is not None else None

    @torch.no_grad()
    def final_state(self, token_ids: list[int]) -> torch.Tensor:
        # the decoder without its head (Llama's .model, GPT-NeoX's .gpt_neox, ...)
        out = self.model.base_model(input_ids=torch.tensor([token_ids]))
        return out.last_hidden_state[0, -1]  # after the final norm, as lm_head sees it

    def edited_logits(self, token_ids: list[int], alpha: float = 0.0,
                      steps: int = 0, max_norm: float | None = None) -> torch.Tensor:
        """lm_head(s + u) at the last position of ``token_ids``."""
        state = self.final_state(token_ids)
        if self.value is not None and steps > 0 and alpha != 0.0:
            with torch.enable_grad():
                state = autograd_ascent(self.value, state[None], alpha, steps,
                                        max_norm)[0].detach()
        with torch.no_grad():
            return self.model.get_output_embeddings()(state)  # lm_head (GPT-NeoX: embed_out)

    def log_probs(self, token_ids: list[int], alpha: float = 0.0,
                  steps: int = 0) -> torch.Tensor:
        return torch.log_softmax(self.edited_logits(token_ids, alpha, steps), -1)

    def generate(self, prompt_ids: list[int], max_tokens: int, alpha: float = 0.0,
                 steps: int = 0, logit_bias: dict[int, float] | None = None,
                 allowed: list[int] | None = None, max_norm: float | None = None) -> list[int]:
        """Greedy decoding of the edited logits, plus ``logit_bias`` and restricted to
        ``allowed`` token ids when given (vLLM's own logits processors, applied after)."""
        ids, generated = list(prompt_ids), []
        for _ in range(max_tokens):
            logits = self.edited_logits(ids, alpha, steps, max_norm).clone()
            for token, bias in (logit_bias or {}).items():
                logits[token] += bias
            if allowed is not None:
                mask = torch.full_like(logits, float("-inf"))
                mask[allowed] = 0.0
                logits += mask
            token = int(logits.argmax())
            generated.append(token)
            ids.append(token)
        return generated

    def generate_matching(self, tokenizer, prompt_ids: list[int], pattern: str,
                          max_tokens: int, alpha: float = 0.0, steps: int = 0) -> list[int]:
        """Greedy decoding constrained to text that fully matches the regex ``pattern``: at
        each step the best edited logit among the tokens that keep the text a prefix of some
        match (EOS once it is a full match), until EOS. ASCII text: a token's piece is its
        own decoding."""
        import regex

        special = set(tokenizer.all_special_ids)
        pieces = [tokenizer.decode([t]) for t in range(len(tokenizer))]
        ids, generated, text = list(prompt_ids), [], ""
        for _ in range(max_tokens):
            allowed = [t for t, piece in enumerate(pieces) if t not in special
                       and regex.fullmatch(pattern, text + piece, partial=True)]
            if regex.fullmatch(pattern, text):
                allowed.append(tokenizer.eos_token_id)
            logits = self.edited_logits(ids, alpha, steps)
            token = allowed[int(logits[allowed].argmax())]
            generated.append(token)
            ids.append(token)
            if token == tokenizer.eos_token_id:
                break
            text += pieces[token]
        return generated


# (alpha, steps) per request, all in one batch; (0, 0) is an uncontrolled request.
ORACLE_SETTINGS = [(0.0, 0), (0.5, 3), (1.0, 4), (2.0, 8)]


def assert_engine_matches_oracle(llm, model_dir: str | Path, head_dir: str | Path,
                                 prompts: list[str], max_tokens: int = 10) -> None:
    """Every prompt under every ORACLE_SETTINGS control, in one batch of ``llm`` (a vLLM
    engine whose default head is ``head_dir``): each row's greedy tokens equal the oracle's,
    and every control setting changes some row (else the comparison could not fail)."""
    from engine_helpers import control_keys, greedy

    cases = [(prompt, alpha, steps) for alpha, steps in ORACLE_SETTINGS for prompt in prompts]
    params = [greedy(max_tokens, **control_keys(alpha, steps)) for _, alpha, steps in cases]
    outputs = llm.generate([prompt for prompt, _, _ in cases], params, use_tqdm=False)
    oracle = OracleGenerator(model_dir, head_dir)
    by_setting: dict[tuple, list[list[int]]] = {}
    for (prompt, alpha, steps), out in zip(cases, outputs):
        expected = oracle.generate(list(out.prompt_token_ids), max_tokens, alpha, steps)
        got = list(out.outputs[0].token_ids)
        assert got == expected, f"{prompt!r} alpha={alpha} steps={steps}"
        by_setting.setdefault((alpha, steps), []).append(got)
    base = by_setting[(0.0, 0)]
    for setting, tokens in by_setting.items():
        if setting[1] > 0:  # the head must really steer, or this check could not fail
            assert tokens != base, f"control {setting} changed nothing"
