"""The vLLM engines of ``eval``: one in this process, or one per Ray actor (``--ray``).

Why several: generating every method's responses for every prompt is what takes an
evaluation's time, and a large prompt set outgrows one GPU. Each engine takes a contiguous
range of the prompts, and every request's seed follows its prompt's number in its source
(``PromptOrigin``), so the responses do not depend on how the prompts are split, nor on
whether some were held out to choose the grid point on; scoring stays with the caller, on
one reward source for every method.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

from ..config import DEFAULT_HEAD
from ..logs import get_logger
from ..training.common import DataError
from ..training.engines import refused_request
from ..training.prompts import prompt_messages

logger = get_logger(__name__)

Samples = list[list[tuple[str, int]]]  # per prompt, (text, generated tokens) of each sample
PROMPT_SET = "the prompt set"  # where --prompts' prompts come from, in messages


class PromptOrigin(NamedTuple):
    """Where an engine's prompt came from: its source as messages name it and its index
    there, which also picks its seed, so a prompt samples alike wherever it runs."""

    source: str
    number: int


class PromptPart(NamedTuple):
    """A range of the engines' prompts that one evaluation runs its methods on (a tuning
    run's held-out prompts, the evaluation's)."""

    start: int
    end: int
    prompting: bool = True  # its prompting rows run: its prompts must fit the system prompt


@dataclass(frozen=True)
class Method:
    """What an engine needs to generate one method's samples."""

    alpha: float = 0.0
    steps: int = 0          # 0: uncontrolled
    head: str = DEFAULT_HEAD
    n: int = 1              # samples per prompt (Best-of-N)
    prompting: bool = False  # with the system prompt
    max_norm: float | None = None  # the controlled requests' recontrol_max_norm


@dataclass(frozen=True)
class EngineSettings:
    """The generation side of ``EvalOptions`` (what every engine, local or remote, shares)."""

    model: str
    value_head: str
    value_heads: dict
    max_steps: int
    engine_args: dict
    seed: int
    max_tokens: int
    temperature: float
    bon_temperature: float
    system_prompt: str | None
    chat_template: bool
    in_process: bool = False
    # the grid's step counts, and whether a point has a radius: warmed up (compiled and
    # CUDA-graph captured) at engine start, so that no method's timed run pays for it
    warmup_steps: tuple[int, ...] = ()
    warmup_projected: bool = False


# additional_config["recontrol"] keys that eval sets itself, and from what
EVAL_RECONTROL_KEYS = {"value_head": "--value-head", "value_heads": "--value-heads",
                       "default_on": "eval (each method says whether it is controlled)",
                       "steps": "--grid", "max_steps": "--grid",
                       # an engine radius would bound every grid point, unreported
                       "max_norm": "--grid (a point's norm=R)"}


def generation_engine_arguments(settings: EngineSettings) -> dict[str, Any]:
    """``--engine-args`` with eval's RE-Control engine merged in: the heads, control off
    unless a request asks (base and Best-of-N are uncontrolled rows), steps up to the grid's
    and every grid step count warmed up. A user's ``additional_config["recontrol"]`` adds
    engine keys (``backend``, ``precision``, ``warmup_steps`` to warm fewer, ...); the keys
    eval sets itself, or another ``model_impl``, are refused naming the option that sets
    them (they used to end eval with a bare TypeError)."""
    arguments = dict(settings.engine_args)
    impl = arguments.pop("model_impl", "recontrol")
    if impl != "recontrol":
        raise DataError(f"--engine-args model_impl {impl!r}: eval runs every method in one "
                        "RE-Control engine (model_impl recontrol); leave model_impl out")
    additional = arguments.pop("additional_config", None) or {}
    section = additional.get("recontrol", {}) if isinstance(additional, dict) else None
    if not isinstance(section, dict):
        raise DataError(f'--engine-args additional_config must be an object whose "recontrol" '
                        f"entry is an object of RE-Control engine keys, got {additional!r}")
    owned = sorted(set(section) & set(EVAL_RECONTROL_KEYS))
    if owned:
        raise DataError(f'--engine-args additional_config["recontrol"]: eval sets '
                        + "; ".join(f"{key} from {EVAL_RECONTROL_KEYS[key]}" for key in owned))
    ours: dict[str, Any] = {"value_head": settings.value_head, "default_on": False,
                            "steps": settings.max_steps, "max_steps": settings.max_steps}
    if settings.warmup_steps:
        ours["warmup_steps"] = list(settings.warmup_steps)
    if settings.warmup_projected:
        ours["warmup_projected"] = True
    if settings.value_heads:
        ours["value_heads"] = settings.value_heads
    return {**arguments, "model_impl": "recontrol",
            "additional_config": {**additional, "recontrol": {**ours, **section}}}


class EvalEngine:
    """One RE-Control engine with control off by default: per-request keys switch it on, so
    all methods share the model, the prompts, the seeds and the machine."""

    def __init__(self, settings: EngineSettings, prompts: Sequence[str],
                 origins: Sequence[PromptOrigin] | None = None) -> None:
        from ..training.engines import run_engines_in_process, start_offline_engine

        # Prefix caching off unless engine_args turn it on: methods run one after another on
        # the same prompts, so every method after base would skip the prefill base paid for
        # (tokens/s no longer comparable), and a cached prefix can change the numerics.
        engine = {"dtype": "auto", "seed": settings.seed, "enable_prefix_caching": False,
                  **generation_engine_arguments(settings)}
        if settings.in_process:
            run_engines_in_process(engine)
        self.settings, self.prompts = settings, list(prompts)
        self.origins = list(origins) if origins is not None else \
            [PromptOrigin(PROMPT_SET, i) for i in range(len(self.prompts))]
        if len(self.origins) != len(self.prompts):
            raise ValueError(f"{len(self.origins)} origins for {len(self.prompts)} prompts")
        self.llm = start_offline_engine("eval", model=settings.model, **engine)
        self.tokenizer = self.llm.get_tokenizer()

    def _input(self, prompt: str, system_prompt: str | None) -> Any:
        """Token ids (chat template) or text, with the system prompt when given."""
        from vllm.inputs import TokensPrompt

        if not self.settings.chat_template:
            return f"{system_prompt}\n\n{prompt}" if system_prompt else prompt
        messages = prompt_messages(prompt)
        if system_prompt:
            messages = [{"role": "system", "content": system_prompt}] + messages
        text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=True)
        return TokensPrompt(prompt_token_ids=self.tokenizer(
            text, add_special_tokens=False)["input_ids"])

    def generate(self, method: Method, start: int, end: int,
                 progress: bool = False, max_tokens: int | None = None) -> Samples:
        """``method``'s samples for prompts ``start`` to ``end`` (indices into this
        engine's prompts; the prompt numbered i in its source is sampled with seed
        ``seed + n i`` wherever it runs; vLLM seeds a request's n samples ``seed + j``, so
        prompts' sample streams never overlap); ``max_tokens`` shortens the responses
        (warm-up)."""
        from vllm import SamplingParams

        s = self.settings
        extra: dict[str, Any] = ({"recontrol_alpha": method.alpha,
                                  "recontrol_steps": method.steps}
                                 if method.steps else {"recontrol": 0})
        if method.steps and method.head != DEFAULT_HEAD:
            extra["recontrol_head"] = method.head
        if method.steps and method.max_norm is not None:
            extra["recontrol_max_norm"] = method.max_norm
        temperature = s.bon_temperature if method.n > 1 else s.temperature
        system_prompt = s.system_prompt if method.prompting else None
        params = [SamplingParams(n=method.n, temperature=temperature,
                                 max_tokens=max_tokens or s.max_tokens,
                                 seed=s.seed + method.n * self.origins[i].number,
                                 extra_args=extra)
                  for i in range(start, end)]
        inputs = [self._input(p, system_prompt) for p in self.prompts[start:end]]
        from vllm.exceptions import VLLMValidationError

        try:
            outputs = self.llm.generate(inputs, params, use_tqdm=progress)
        except VLLMValidationError as exc:  # check_prompts missed a reason vLLM has
            refused = refused_request(self.tokenizer, inputs, exc)
            origin = self.origins[start + refused.request]
            raise DataError(f"prompt {origin.number} of {origin.source} (counted from "
                            f"0{', with the system prompt' if system_prompt else ''}): "
                            f"{refused}") from exc
        return [[(c.text, len(c.token_ids)) for c in out.outputs] for out in outputs]

    def check_prompts(self, start: int, end: int, prompting: bool = True) -> None:
        """Refuse, before any method generates, a prompt of ``start`` to ``end`` that leaves
        no room for a response in the engine's ``max_model_len``, alone or (``prompting``:
        the prompting rows run on them) with the system prompt of the prompting rows (vLLM
        would refuse it only when its method's batch arrives, maybe hours in, with a
        traceback that names no prompt)."""
        from .._vllm_adapter import llm_max_model_len

        limit = llm_max_model_len(self.llm)
        system = self.settings.system_prompt if prompting else None
        for index in range(start, end):
            for system_prompt in (None, system) if system else (None,):
                length = self._length(self._input(self.prompts[index], system_prompt))
                if length < limit:
                    continue
                where, also = "", ""
                if system_prompt:
                    where = " with the system prompt of the prompting rows"
                    also = (" (or shorten --system-prompt, or give --system-prompt '' to "
                            "skip the prompting rows)")
                origin = self.origins[index]
                raise DataError(
                    f"prompt {origin.number} of {origin.source} (counted from 0) has {length} "
                    f"tokens"
                    f"{where}, and the engine's max_model_len is {limit}, which leaves no "
                    f"room for a response: shorten or remove that prompt, or raise "
                    f"max_model_len in --engine-args{also}")

    def _length(self, engine_input: Any) -> int:
        """Tokens of ``engine_input`` as the engine counts them (text: with special tokens)."""
        if isinstance(engine_input, str):
            return len(self.tokenizer(engine_input)["input_ids"])
        return len(engine_input["prompt_token_ids"])

    def close(self) -> None:
        from .._vllm_adapter import shutdown_llm

        shutdown_llm(self.llm)


def prompt_ranges(count: int, parts: int) -> list[tuple[int, int]]:
    """``count`` prompts in ``parts`` contiguous ranges whose sizes differ by at most one."""
    parts = max(1, min(parts, count))
    size, extra = divmod(count, parts)
    ranges, start = [], 0
    for i in range(parts):
        end = start + size + (i < extra)
        ranges.append((start, end))
        start = end
    return ranges


# Tokens per response of the untimed full-size pass before an engine's first timed method.
FIRST_BATCH_WARMUP_TOKENS = 16


class EnginePool:
    """Every prompt through one local engine, or through Ray actors (``opts.ray``) that each
    take a range; ``run`` times a method's generation after a warm-up of every engine.

    Warm-up, untimed: before the first method of each ``PromptPart``, every prompt of it
    with short responses (an engine's first batch of a size pays a fixed first-use cost, on
    CPU some 10-15 ms, a quarter of a 16-token toy run, which would land on base, always
    first, and flatter every ratio to it); before each method, one prompt (its own path:
    the ascent of its step count)."""

    def __init__(self, opts: Any, settings: EngineSettings, prompts: Sequence[str],
                 origins: Sequence[PromptOrigin] | None = None,
                 parts: Sequence[PromptPart] | None = None) -> None:
        self.count = len(prompts)
        self.parts = list(parts) if parts is not None else [PromptPart(0, self.count)]
        self._stack = contextlib.ExitStack()
        self.actors: list[Any] = []
        self.local: EvalEngine | None = None
        if opts.ray:
            from ..training.ray_pool import ray_actors

            self.actors = self._stack.enter_context(
                ray_actors(opts, EvalEngine, self.count, settings, list(prompts),
                           None if origins is None else list(origins)))
        else:
            self.local = EvalEngine(settings, prompts, origins)
        self.progress = opts.progress and not opts.quiet
        self._warmed_parts: set[PromptPart] = set()
        try:
            for part in self.parts:
                self._check_prompts(part)
        except BaseException:
            self.close(failing=True)
            raise

    def _ranges(self, part: PromptPart) -> list[tuple[int, int]]:
        """``part``'s prompts in one contiguous range per actor."""
        return [(part.start + lo, part.start + hi)
                for lo, hi in prompt_ranges(part.end - part.start, len(self.actors))]

    def _check_prompts(self, part: PromptPart) -> None:
        """Every engine checks its range of ``part`` (``EvalEngine.check_prompts``)."""
        if self.local is not None:
            self.local.check_prompts(part.start, part.end, part.prompting)
            return
        import ray

        ray.get([actor.check_prompts.remote(lo, hi, part.prompting)
                 for actor, (lo, hi) in zip(self.actors, self._ranges(part))])

    def run(self, method: Method, part: PromptPart | None = None) -> tuple[Samples, float]:
        """(samples of every prompt of ``part`` (default: all), in order; wall-clock seconds
        of the generation)."""
        part = part or PromptPart(0, self.count)
        count = part.end - part.start
        warm_up = [] if part in self._warmed_parts else [(count, FIRST_BATCH_WARMUP_TOKENS)]
        warm_up.append((min(1, count), None))  # compile this method's own path
        self._warmed_parts.add(part)
        if self.local is not None:
            for size, tokens in warm_up:
                self.local.generate(method, part.start, part.start + size, max_tokens=tokens)
            start = time.perf_counter()
            samples = self.local.generate(method, part.start, part.end, self.progress)
            return samples, time.perf_counter() - start
        import ray

        ranges = self._ranges(part)
        for size, tokens in warm_up:
            ray.get([actor.generate.remote(method, lo, min(hi, lo + size), False, tokens)
                     for actor, (lo, hi) in zip(self.actors, ranges)])
        start = time.perf_counter()
        parts = ray.get([actor.generate.remote(method, lo, hi)
                         for actor, (lo, hi) in zip(self.actors, ranges)])
        seconds = time.perf_counter() - start
        return [prompt for piece in parts for prompt in piece], seconds

    def close(self, failing: bool = False) -> None:
        """Stop the engines. ``failing`` (the run ends on an error or Ctrl-C): actors are
        killed at once, not asked to close, which would wait behind the generation still
        running on them (the rest of a method's); an actor that died does not hide the
        error that ended the run."""
        try:
            if self.local is not None:
                self.local.close()
            elif self.actors and not failing:
                import ray

                ray.get([actor.close.remote() for actor in self.actors])
        except Exception as exc:
            if not failing:
                raise
            logger.warning("vllm-recontrol: eval engines did not close cleanly (%s: %s)",
                           type(exc).__name__, str(exc)[:200])
        finally:
            self._stack.close()
