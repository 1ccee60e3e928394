"""The two vLLM engines of collection: one samples responses, one returns their states.

Why two: vLLM 0.32's generate runner does not return hidden states, while the pooling runner
(``task="token_embed"``, no activation) returns the final post-norm state of every position,
the exact tensor RE-Control edits (checked against Hugging Face ``hidden_states[-1]`` to 1e-6)
for every model that applies its final norm in ``forward``; the few vLLM classes that apply
it in ``compute_logits`` are refused.
Feeding it prompt + response minus the last token yields s_0..s_T in one prefill.

The engines are used one after the other (all shards generated, generator freed, then all
states), so only one model copy is alive at a time: on a GPU each may take the whole memory
budget, on a CPU the two start-ups are the only overhead. Only public vLLM APIs are used
(``vllm.LLM``, ``vllm.SamplingParams``, prompt dicts with ``prompt_token_ids``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import torch

from .._vllm_adapter import shutdown_llm
from ..interrupts import interrupt_reaches_main_thread
from .common import DataError, RecontrolError
from ..logs import get_logger
from .prompts import render_chat_prompt

logger = get_logger(__name__)

POOLER_CONFIG = {"task": "token_embed", "use_activation": False}
IN_PROCESS_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"


class EngineStartError(RecontrolError):
    """A vLLM engine did not start; vLLM's reason is in the message (an engine in this
    process) or in its engine process's log (a spawned one only says so)."""


def start_offline_engine(what: str, **llm_args: Any) -> Any:
    """``vllm.LLM(**llm_args)`` for ``what`` (e.g. "collect: generation"). Any failure to
    start is an EngineStartError carrying vLLM's reason, so the command ends with it and the
    memory hint, in process or not; this package's own configuration errors pass as they
    are. On a CPU without a memory setting it warns first: vLLM then sets aside 92 % of the
    machine's free memory for the KV cache, which makes even a tiny run slow and starves
    everything else on the machine."""
    from vllm import LLM

    warn_without_cpu_memory_setting(what, llm_args)
    try:
        with interrupt_reaches_main_thread():  # Ctrl-C during the start: not lost
            return LLM(**llm_args)
    except RecontrolError:
        raise
    except Exception as exc:  # vLLM raises ValueError, RuntimeError, torch's OOM, ...
        reason = " ".join(str(exc).split())
        raise EngineStartError(f"{what}: the vLLM engine did not start ({type(exc).__name__}: "
                               f"{reason[:800]})") from exc


def warn_without_cpu_memory_setting(what: str, llm_args: dict[str, Any]) -> None:
    if ("kv_cache_memory_bytes" in llm_args or "gpu_memory_utilization" in llm_args
            or os.environ.get("VLLM_CPU_KVCACHE_SPACE")):  # vLLM's CPU size, in GiB
        return
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        logger.warning(
            "%s: on a CPU vLLM sets aside gpu_memory_utilization (0.92 by default) of the "
            "machine's free memory for this engine's KV cache; give it a size instead, e.g. "
            "--engine-args '{\"kv_cache_memory_bytes\": 1073741824}' (1 GiB)", what)


def run_engines_in_process(*engine_args: dict[str, Any]) -> None:
    """Engine core in this process: ~2 s start instead of ~30 s on a small CPU.

    Must run before vLLM builds an engine (vLLM caches its environment afterwards) and holds
    for the rest of the process; each ``engine_args`` dict gets the in-process executor.
    """
    os.environ[IN_PROCESS_ENV] = "0"
    for args in engine_args:
        args.setdefault("distributed_executor_backend", "uni")


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    seed: int


@dataclass(frozen=True)
class Generation:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None


class Engines(Protocol):
    """What collection needs from an inference backend (vLLM here, a fake in unit tests)."""

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]: ...

    def states(self, sequences: Sequence[list[int]]) -> list[torch.Tensor]:
        """Final post-norm hidden state of every position of each sequence, [len, d] each."""
        ...

    def release_generator(self) -> None: ...

    def close(self) -> None: ...


class PromptRefused(DataError):
    """vLLM refused a request of a batch; ``request`` is its index there (the longest)."""

    def __init__(self, request: int, message: str) -> None:
        super().__init__(message)
        self.request = request


def refused_request(tokenizer: Any, inputs: Sequence[Any], exc: Exception) -> PromptRefused:
    """Name the batch's longest prompt (vLLM's message names none; length is the usual
    cause: a prompt longer than max_model_len)."""
    lengths = [len(x["prompt_token_ids"]) if isinstance(x, dict) else
               len(tokenizer(x)["input_ids"]) for x in inputs]
    longest = max(range(len(lengths)), key=lengths.__getitem__)
    return PromptRefused(longest, f"vLLM refused a request ({exc}); the longest prompt of the "
                                  f"batch has {lengths[longest]} tokens")


def pooling_limit_refusal(pooled: Any, generated: Any, where: str = "") -> str | None:
    """Why a pooling (states) engine's ``max_model_len`` is refused beside the generator's,
    or None: it would refuse the longest sequences, after the whole generation phase."""
    if isinstance(pooled, int) and isinstance(generated, int) and pooled < generated:
        return (f"--pooling-engine-args max_model_len {pooled} is below the generation "
                f"engine's ({generated}{where}): a prompt and response of that length could "
                "not be read back into states; give the pooling engine at least as much")
    return None


class VllmEngines:
    """Lazily started ``vllm.LLM`` engines: a generator, then a pooling engine."""

    def __init__(self, model: str, sampling: dict[str, Any], chat_template: bool = False,
                 engine_args: dict[str, Any] | None = None,
                 pooling_engine_args: dict[str, Any] | None = None,
                 in_process: bool = False, seed: int = 0) -> None:
        self.model = model
        self.sampling = dict(sampling)
        self.chat_template = chat_template
        # Reproducibility first: the same shard must give the same files on any replica, so
        # no state may carry over between shards (prefix-cache hits can change the numerics
        # of a cached prompt). Override through engine_args if speed matters more.
        base = {"seed": seed, "enable_prefix_caching": False, **(engine_args or {})}
        self.generate_args = base
        self.pooling_args = {**base, **(pooling_engine_args or {}),
                             "runner": "pooling", "pooler_config": dict(POOLER_CONFIG)}
        if in_process:
            run_engines_in_process(self.generate_args, self.pooling_args)
        self._generator: Any = None
        self._pooler: Any = None

    # ------------------------------------------------------------------ generation
    def _generator_llm(self):
        if self._generator is None:
            self._generator = start_offline_engine("collect: generation", model=self.model,
                                                   **self.generate_args)
            self._refuse_unfit_generator(self._generator)
        return self._generator

    def _refuse_unfit_generator(self, generator: Any) -> None:
        """Checks that need the started generator, before anything generates; a refusal
        shuts it down.

        - A pooling ``max_model_len`` below the generator's own (vLLM's default for the
          model where ``--engine-args`` set none): the pooling engine would refuse the
          longest sequences after the generation phase.
        - A model whose vLLM class changes the final states inside compute_logits (MiMo
          applies its final norm there): the pooling runner would return states before that
          change, not those RE-Control edits, and a head trained on them would be applied
          to states it never saw, with no error anywhere."""
        from .._vllm_adapter import llm_max_model_len, states_changed_in_compute_logits

        refusal = pooling_limit_refusal(
            self.pooling_args.get("max_model_len"), llm_max_model_len(generator),
            ", vLLM's default for this model, as --engine-args set none: set max_model_len "
            "there to what the prompts and responses need, at most the pooling engine's")
        changed = None if refusal else states_changed_in_compute_logits(generator)
        if changed:
            refusal = (
                f"collect cannot read the states of {changed} (model {self.model}): vLLM's "
                f"{changed} changes the final states (its final norm) inside compute_logits, "
                "just before the logits layer, so its pooling runner returns the states "
                "before that change, not the ones an engine with --model-impl recontrol "
                "edits; a head trained on them would steer from states it never saw")
        if refusal:
            shutdown_llm(generator)
            self._generator = None
            raise DataError(refusal)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        from vllm import SamplingParams

        llm = self._generator_llm()
        tokenizer = llm.get_tokenizer() if self.chat_template else None
        inputs: list[Any] = []
        params = []
        for request in requests:
            if tokenizer is not None:
                inputs.append({"prompt_token_ids": render_chat_prompt(tokenizer, request.prompt)})
            else:
                inputs.append(request.prompt)
            params.append(SamplingParams(n=1, seed=request.seed, **self.sampling))
        from vllm.exceptions import VLLMValidationError

        try:
            outputs = llm.generate(inputs, params, use_tqdm=False)
        except VLLMValidationError as exc:  # e.g. a prompt longer than max_model_len
            raise refused_request(llm.get_tokenizer(), inputs, exc) from exc
        return [Generation(list(o.prompt_token_ids), list(o.outputs[0].token_ids),
                           o.outputs[0].text, o.outputs[0].finish_reason) for o in outputs]

    def release_generator(self) -> None:
        shutdown_llm(self._generator)
        self._generator = None

    # ------------------------------------------------------------------ states
    def states(self, sequences: Sequence[list[int]]) -> list[torch.Tensor]:
        if self._pooler is None:
            self.release_generator()
            self._pooler = start_offline_engine("collect: states (pooling)", model=self.model,
                                                **self.pooling_args)
        from vllm.exceptions import VLLMValidationError

        try:
            outputs = self._pooler.encode([{"prompt_token_ids": list(s)} for s in sequences],
                                          pooling_task="token_embed", use_tqdm=False)
        except VLLMValidationError as exc:  # e.g. longer than its max_model_len
            raise DataError(f"the pooling engine (states) refused a prompt and response the "
                            f"generation engine produced: {exc}; give it at least the "
                            "generation engine's max_model_len (--pooling-engine-args)") \
                from exc
        return [o.outputs.data for o in outputs]

    def close(self) -> None:
        self.release_generator()
        shutdown_llm(self._pooler)
        self._pooler = None
