"""Engine-wide and per-request RE-Control settings: parsing and validation (no vLLM import).

Engine keys live under ``additional_config["recontrol"]``; per-request keys are flat entries
of ``SamplingParams.extra_args`` (over HTTP: ``vllm_xargs``), because vLLM's HTTP layer
passes only flat ``str | int | float | list`` values.
"""

from __future__ import annotations

import difflib
import math
import numbers
import re
import struct
import unicodedata
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from .backends import BACKENDS, FORMS, PRECISIONS, choose_precision
from .errors import ConfigError, RequestParamsError

ADDITIONAL_CONFIG_KEY = "recontrol"
MODEL_IMPL = "recontrol"

# Paper defaults (HH-RLHF, Vicuna-7B): alpha 0.5, 30 steps. max_steps protects a server from
# one request asking for an unbounded amount of work per token.
DEFAULT_ALPHA = 0.5
DEFAULT_STEPS = 30
DEFAULT_MAX_STEPS = 200
FLOAT32_MAX = 3.4028234663852886e38  # alpha and max_norm run in float32
# The most steps anything takes (max_steps, so every request's and head's steps, and a
# direct ascend's steps and loop count). A step is a product with every layer of the head,
# so a million is already hours per token; the bound keeps counts exact where they are
# packed downstream (int64 row tensors; the torch ascent counts down in float32, exact to
# 2**24) and an absurd count a clear error, not an overflow inside the engine.
STEPS_LIMIT = 1_000_000


def as_float32(value: float) -> float:
    """``value`` rounded to float32, the ascent's precision (e.g. 1e-46 becomes 0)."""
    return struct.unpack("f", struct.pack("f", value))[0]


REQUEST_SWITCH = "recontrol"
REQUEST_ALPHA = "recontrol_alpha"
REQUEST_STEPS = "recontrol_steps"
REQUEST_HEAD = "recontrol_head"
REQUEST_MAX_NORM = "recontrol_max_norm"
REQUEST_KEYS = (REQUEST_SWITCH, REQUEST_ALPHA, REQUEST_STEPS, REQUEST_HEAD, REQUEST_MAX_NORM)

ENGINE_KEYS = ("value_head", "value_heads", "alpha", "steps", "default_on", "max_steps",
               "max_norm", "backend", "precision", "cuda_graphs", "warmup_steps",
               "warmup_projected", "batch_invariant", "ascent_form")

# The head a request gets without recontrol_head: the engine's "value_head". Names of further
# heads ("value_heads") travel comma-joined in a class name (see _vllm_adapter), so no commas;
# the narrow alphabet also keeps them readable in logs and JSON.
DEFAULT_HEAD = "default"
HEAD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


@dataclass(frozen=True)
class HeadSpec:
    """A further value head: its folder and, when set, its own default alpha and steps and
    its own max_norm (a head trained with another target or reward may need another
    strength, and its gradients another scale)."""

    path: str
    alpha: float | None = None
    steps: int | None = None
    max_norm: float | None = None


@dataclass(frozen=True)
class EngineSettings:
    """Validated ``additional_config["recontrol"]``."""

    value_head: str
    value_heads: tuple[tuple[str, HeadSpec], ...] = ()  # further heads by name
    alpha: float = DEFAULT_ALPHA
    steps: int = DEFAULT_STEPS
    default_on: bool = True
    max_steps: int = DEFAULT_MAX_STEPS
    max_norm: float | None = None
    backend: str = "auto"
    precision: str = "auto"
    cuda_graphs: bool = True
    warmup_steps: tuple[int, ...] | None = None  # None: each head's own default steps
    warmup_projected: bool = False  # also warm the projected ascent of heads without max_norm
    batch_invariant: bool | None = None  # None ("auto"): follow vLLM's VLLM_BATCH_INVARIANT
    ascent_form: str = "auto"  # "direct" / "gram" / "auto" (backends.choose_form)

    @property
    def head_paths(self) -> dict[str, str]:
        """Every head a request may name, the default first."""
        return {DEFAULT_HEAD: self.value_head,
                **{name: spec.path for name, spec in self.value_heads}}

    @property
    def head_names(self) -> tuple[str, ...]:
        return tuple(self.head_paths)

    def defaults_for(self, head: str) -> tuple[float, int]:
        """(alpha, steps) of a request to ``head`` that sets neither."""
        spec = dict(self.value_heads).get(head)
        alpha = spec.alpha if spec is not None and spec.alpha is not None else self.alpha
        steps = spec.steps if spec is not None and spec.steps is not None else self.steps
        return alpha, steps

    def max_norm_for(self, head: str) -> float | None:
        """The radius u of ``head``'s rows is projected onto: its own, else the engine's."""
        spec = dict(self.value_heads).get(head)
        return spec.max_norm if spec is not None and spec.max_norm is not None else self.max_norm

    def warm_up_counts_for(self, head: str) -> tuple[int, ...]:
        """Iteration counts compiled and graph-captured for ``head`` at engine start (on
        CUDA): ``warmup_steps`` when given, else the steps its requests get by default (other
        counts are captured when they first arrive)."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        steps = self.defaults_for(head)[1]
        return (steps,) if steps > 0 else ()

    @property
    def warm_up_counts(self) -> tuple[int, ...]:
        """Every count some head warms up (empty: no warm-up at all)."""
        counts = {n for head in self.head_names for n in self.warm_up_counts_for(head)}
        return tuple(sorted(counts))

    @classmethod
    def from_additional_config(cls, additional_config: Mapping[str, Any] | None) -> "EngineSettings":
        """Parse ``additional_config``; every problem is a ``ConfigError`` naming the key."""
        where = f'additional_config["{ADDITIONAL_CONFIG_KEY}"]'
        if additional_config is not None and not isinstance(additional_config, Mapping):
            raise ConfigError(f"additional_config must be a JSON object, got "
                              f"{type(additional_config).__name__}")
        section = (additional_config or {}).get(ADDITIONAL_CONFIG_KEY)
        if section is None and ADDITIONAL_CONFIG_KEY in (additional_config or {}):
            raise ConfigError(f"{where} is null; it must be a JSON object with at least a "
                              f'value head, e.g. {{"value_head": "/path/to/head"}}')
        if section is None:
            found = sorted(map(str, additional_config or {}))
            near = difflib.get_close_matches(ADDITIONAL_CONFIG_KEY, found, n=1)
            seen = (f" (it has {found}" + (f"; did you mean {ADDITIONAL_CONFIG_KEY!r} for "
                                          f"{near[0]!r}?)" if near else ")")) if found else ""
            raise ConfigError(
                f"--model-impl {MODEL_IMPL} needs {where} with at least a value head, e.g. "
                f"--additional-config '{{\"{ADDITIONAL_CONFIG_KEY}\": "
                f"{{\"value_head\": \"/path/to/head\"}}}}'{seen}")
        if not isinstance(section, Mapping):
            raise ConfigError(f"{where} must be a JSON object, got {type(section).__name__}")
        unknown = _unknown_keys(section, ENGINE_KEYS)
        if unknown:
            raise ConfigError(f"{where} has unknown key(s) {unknown}; known keys: "
                              f"{list(ENGINE_KEYS)}")
        value_head = section.get("value_head")
        if not isinstance(value_head, str) or not value_head.strip():
            raise ConfigError(f'{where}["value_head"] is required: the folder of a value head '
                              f"(config.json + model.safetensors), got {value_head!r}")
        max_steps = _as_int(section.get("max_steps", DEFAULT_MAX_STEPS), f'{where}["max_steps"]',
                            ConfigError, low=0, high=STEPS_LIMIT)
        steps = _as_int(section.get("steps", DEFAULT_STEPS), f'{where}["steps"]', ConfigError,
                        low=0)
        if steps > max_steps:
            default = "" if "steps" in section else " (the default; set steps too)"
            raise _steps_over_max(f'{where}["steps"] = {steps}{default}', max_steps)
        max_norm = _as_radius(section.get("max_norm"), f'{where}["max_norm"]')
        backend = section.get("backend", "auto")
        if backend not in BACKENDS:
            raise ConfigError(f'{where}["backend"] must be one of {list(BACKENDS)}, got {backend!r}')
        precision = section.get("precision", "auto")
        if precision not in PRECISIONS:
            raise ConfigError(f'{where}["precision"] must be one of {list(PRECISIONS)}, '
                              f"got {precision!r}")
        if backend == "torch":  # "auto" resolves on the worker (EditController)
            try:
                choose_precision(precision, backend)
            except ValueError as exc:
                raise ConfigError(f'{where}["precision"]: {exc}') from exc
        ascent_form = section.get("ascent_form", "auto")
        if ascent_form not in FORMS:
            raise ConfigError(f'{where}["ascent_form"] must be one of {list(FORMS)}, '
                              f"got {ascent_form!r}")
        return cls(
            value_head=value_head,
            value_heads=_as_head_specs(section.get("value_heads"), f'{where}["value_heads"]',
                                       max_steps),
            alpha=_as_float(section.get("alpha", DEFAULT_ALPHA), f'{where}["alpha"]', ConfigError),
            steps=steps,
            default_on=_as_switch(section.get("default_on", True), f'{where}["default_on"]',
                                  ConfigError),
            max_steps=max_steps,
            max_norm=max_norm,
            backend=backend,
            precision=precision,
            cuda_graphs=_as_switch(section.get("cuda_graphs", True), f'{where}["cuda_graphs"]',
                                   ConfigError),
            warmup_steps=_as_step_list(section.get("warmup_steps"), f'{where}["warmup_steps"]',
                                       max_steps),
            warmup_projected=_as_switch(section.get("warmup_projected", False),
                                        f'{where}["warmup_projected"]', ConfigError),
            batch_invariant=_as_auto_switch(section.get("batch_invariant", "auto"),
                                            f'{where}["batch_invariant"]'),
            ascent_form=ascent_form,
        )


@dataclass(frozen=True)
class RowControl:
    """What one request asks for: ``steps == 0`` means uncontrolled; ``max_norm`` is the
    radius its u is projected onto (None: none)."""

    alpha: float
    steps: int
    head: str = DEFAULT_HEAD
    max_norm: float | None = None

    @property
    def active(self) -> bool:
        return self.steps > 0 and self.alpha != 0.0


UNCONTROLLED = RowControl(alpha=0.0, steps=0)


def state_width(model_config: Any) -> int | None:
    """The width of the states ``lm_head`` reads, which RE-Control edits and a value head
    takes, from a model's (text) configuration: its ``hidden_size``, except where the
    decoder projects its output first (OPT's ``word_embed_proj_dim``: opt-350m's 1024-wide
    decoder hands ``lm_head`` 512-wide states). None when the configuration has neither."""
    for key in ("word_embed_proj_dim", "hidden_size"):
        width = getattr(model_config, key, None)
        if isinstance(width, int) and not isinstance(width, bool) and width > 0:
            return width
    return None


def refuse_section_without_model_impl(additional_config: Any, model_impl: Any) -> None:
    """An engine with a ``recontrol`` section but another ``model_impl`` would run stock vLLM
    and ignore every request's control keys without a word: its user meant RE-Control, so it
    is refused, naming the missing flag."""
    if (model_impl != MODEL_IMPL and isinstance(additional_config, Mapping)
            and ADDITIONAL_CONFIG_KEY in additional_config):
        raise ConfigError(
            f'additional_config has a "{ADDITIONAL_CONFIG_KEY}" section, but this engine\'s '
            f"model_impl is {model_impl!r}, so RE-Control would be off and requests' "
            f"recontrol_* keys ignored: start it with --model-impl {MODEL_IMPL} (Python: "
            f'model_impl="{MODEL_IMPL}"), or drop the section to run stock vLLM')


def check_request_args(extra_args: Mapping[str, Any] | None, max_steps: int,
                       heads: Sequence[str] = (DEFAULT_HEAD,)) -> None:
    """Reject malformed per-request keys (run at admission, so a bad request gets HTTP 400).
    ``heads``: the names this engine's requests may pick with ``recontrol_head``."""
    if extra_args is None:
        return
    if not isinstance(extra_args, Mapping):
        raise RequestParamsError(f"extra_args must be a JSON object of keys, got "
                                 f"{type(extra_args).__name__}")
    # any case: "Recontrol_Alpha" is a typo of ours, not another plugin's key, and ignoring
    # it would run the request on the engine's defaults; so are " recontrol_alpha" (a stray
    # space) and near misses ("recontol_alpha")
    suspicious = [k for k in extra_args if k not in REQUEST_KEYS and looks_like_request_key(k)]
    unknown = sorted(k for k in suspicious if _has_switch_prefix(k))
    if unknown:
        # ours but for case, spaces or dashes: say which
        meant = {k: SQUEEZED_REQUEST_KEYS[_squeezed(k)] for k in unknown
                 if _squeezed(k) in SQUEEZED_REQUEST_KEYS}
        hint = "".join(f" ({k!r}: did you mean {known!r}?)" for k, known in meant.items())
        raise RequestParamsError(f"unknown RE-Control request key(s) {unknown}{hint}; known "
                                 f"keys: {list(REQUEST_KEYS)}")
    misspelt = {k: _near_request_key(k) for k in suspicious}
    if misspelt:
        named = ", ".join(f"{k!r} (did you mean {near!r}?)" for k, near in misspelt.items())
        raise RequestParamsError(f"request key(s) {named} look like RE-Control's, and would "
                                 f"be ignored; known keys: {list(REQUEST_KEYS)}")
    for key in REQUEST_KEYS:
        if key in extra_args:
            _plain_value(extra_args[key], key)
    if REQUEST_SWITCH in extra_args:
        _as_switch(extra_args[REQUEST_SWITCH], REQUEST_SWITCH, RequestParamsError)
    if REQUEST_ALPHA in extra_args:
        _as_float(extra_args[REQUEST_ALPHA], REQUEST_ALPHA, RequestParamsError)
    if REQUEST_STEPS in extra_args:
        given = extra_args[REQUEST_STEPS]
        steps = _as_int(given, REQUEST_STEPS, RequestParamsError, low=0)
        if steps > max_steps:
            raise RequestParamsError(f"{REQUEST_STEPS} = {shown_number(given)} exceeds this "
                                     f"engine's max_steps = {max_steps}")
    if REQUEST_MAX_NORM in extra_args:
        _as_float(extra_args[REQUEST_MAX_NORM], REQUEST_MAX_NORM, RequestParamsError,
                  positive=True)
    if REQUEST_HEAD in extra_args and extra_args[REQUEST_HEAD] not in heads:
        raise RequestParamsError(f"{REQUEST_HEAD} = {extra_args[REQUEST_HEAD]!r} is not one of "
                                 f"this engine's value heads {list(heads)}")


# per request key: the plain types it takes, and the conversion to suggest
PLAIN_TYPES = {REQUEST_SWITCH: ("bool, int or str", "bool"), REQUEST_STEPS: ("int", "int"),
               REQUEST_HEAD: ("str", "str")}


def _plain_value(value: Any, name: str) -> None:
    """Refuse a value of a type that is not Python's own (a NumPy scalar, a Fraction, a
    tensor): vLLM cannot send it to its engine process (msgpack), and fails only after it
    has registered the request, which then never finishes and hangs the next generate
    call. Over HTTP, JSON gives only Python's own types; those of the wrong kind (a list)
    are refused by each key's own check."""
    if type(value).__module__ != "builtins":
        kind = f"{type(value).__module__}.{type(value).__qualname__}"
        expected, convert = PLAIN_TYPES.get(name, ("int or float", "float"))
        raise RequestParamsError(
            f"{name} must be a plain Python {expected}, got {kind} {value!r:.80}: vLLM "
            f"cannot send it to its engine process; convert it first with {convert}(x)")


def _canonical(key: str) -> str:
    """``key`` as it reads: compatibility forms folded (fullwidth letters) and invisible
    format characters (zero-width space, byte-order mark) dropped, so that a key pasted with
    them is still seen as ours."""
    return "".join(c for c in unicodedata.normalize("NFKC", key)
                   if unicodedata.category(c) != "Cf")


def _squeezed(key: str) -> str:
    """``key`` without case, spaces, dashes and underscores (how near misses are compared)."""
    return re.sub(r"[\s_\-]", "", _canonical(key).lower())


SQUEEZED_REQUEST_KEYS = {_squeezed(k): k for k in REQUEST_KEYS}


def looks_like_request_key(key: Any) -> bool:
    """Whether ``key`` is, or misspells, a RE-Control request key (any case, stray spaces,
    near misses): what the admission check refuses when unknown, and what the OpenAI guards
    look for where vLLM would drop a key without a word."""
    return isinstance(key, str) and (_has_switch_prefix(key)
                                     or _near_request_key(key) is not None)


def _has_switch_prefix(key: str) -> bool:
    """``recontrol...`` in any case, with stray spaces or invisible characters."""
    return _canonical(key).strip().lower().startswith(REQUEST_SWITCH)


def _near_request_key(key: str) -> str | None:
    """The RE-Control key that ``key`` misspells ("recontol_alpha", "re-control-steps");
    None for other plugins' keys: a bare "alpha" (too short to be told from theirs), and a
    key that does not start as ours ("control_alpha" is another steering plugin's name, a
    word away, not a slip of the fingers)."""
    squeezed = _squeezed(key)
    if not squeezed.startswith(REQUEST_SWITCH[:1]):
        return None
    near = difflib.get_close_matches(squeezed, list(SQUEEZED_REQUEST_KEYS), n=1, cutoff=0.9)
    return SQUEEZED_REQUEST_KEYS[near[0]] if near else None


def resolve_request(extra_args: Mapping[str, Any] | None, engine: EngineSettings) -> RowControl:
    """The control a request gets: its own keys over the engine defaults.

    Without a ``recontrol`` key a request is controlled when the engine's ``default_on`` is set
    or when it names its own alpha, steps, value head or max_norm. Its ``max_norm`` can only
    tighten the radius its head has (the head's own, else the engine's): the server's bound
    stays a bound. Values were checked at admission; they are checked again here so that
    nothing unchecked reaches the kernel.
    """
    args = extra_args or {}
    check_request_args(args, engine.max_steps, engine.head_names)
    if REQUEST_SWITCH in args:
        on = _as_switch(args[REQUEST_SWITCH], REQUEST_SWITCH, RequestParamsError)
    else:
        on = engine.default_on or any(k in args for k in (REQUEST_ALPHA, REQUEST_STEPS,
                                                          REQUEST_HEAD, REQUEST_MAX_NORM))
    if not on:
        return UNCONTROLLED
    head = args.get(REQUEST_HEAD, DEFAULT_HEAD)
    alpha, steps = engine.defaults_for(head)
    alpha = _as_float(args.get(REQUEST_ALPHA, alpha), REQUEST_ALPHA, RequestParamsError)
    steps = _as_int(args.get(REQUEST_STEPS, steps), REQUEST_STEPS, RequestParamsError, low=0)
    radius = engine.max_norm_for(head)
    if REQUEST_MAX_NORM in args:
        own = _as_float(args[REQUEST_MAX_NORM], REQUEST_MAX_NORM, RequestParamsError,
                        positive=True)
        radius = own if radius is None else min(own, radius)
    return RowControl(alpha=alpha, steps=min(steps, engine.max_steps), head=head,
                      max_norm=radius)


def _as_auto_switch(value: Any, name: str) -> bool | None:
    """A switch that may also be "auto" (None: decided where vLLM's setting is known)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None
    try:
        return _as_switch(value, name, ConfigError)
    except ConfigError:
        raise ConfigError(f'{name} must be "auto", 0 or 1 (or true/false), got {value!r}') from None


HEAD_SPEC_KEYS = ("path", "alpha", "steps", "max_norm")


def _steps_over_max(setting: str, max_steps: int) -> ConfigError:
    """The error for an engine's step count (``setting``, as written) above its max_steps."""
    return ConfigError(f"{setting} exceeds max_steps = {max_steps}; raise max_steps (up to "
                       f"{STEPS_LIMIT}) or lower steps")


def map_head_paths(additional_config: Mapping[str, Any],
                   change: Callable[[str, str], str]) -> dict[str, Any]:
    """A copy of a valid ``additional_config`` with every head path (``value_head`` and each
    ``value_heads`` entry) replaced by ``change(head name, path)``."""
    section = dict(additional_config[ADDITIONAL_CONFIG_KEY])
    section["value_head"] = change(DEFAULT_HEAD, section["value_head"])
    if section.get("value_heads"):
        section["value_heads"] = {
            name: ({**entry, "path": change(name, entry["path"])}
                   if isinstance(entry, Mapping) else change(name, entry))
            for name, entry in section["value_heads"].items()}
    return {**additional_config, ADDITIONAL_CONFIG_KEY: section}


def _as_head_specs(value: Any, name: str, max_steps: int) -> tuple[tuple[str, HeadSpec], ...]:
    """``value_heads``: omitted, or {name: folder or {"path", "alpha", "steps", "max_norm"}}
    of heads that requests pick by name."""
    if value is None:
        return ()
    if not isinstance(value, Mapping):
        raise ConfigError(f'{name} must be a JSON object {{"name": "/path/to/head", ...}}, got '
                          f"{value!r}")
    specs = []
    for head, entry in value.items():
        if not isinstance(head, str) or not HEAD_NAME.fullmatch(head) or head == DEFAULT_HEAD:
            raise ConfigError(f"{name} has the head name {head!r}: names are 1-64 letters, digits, "
                              f"'_' or '-' (not starting with '_' or '-'), and "
                              f"{DEFAULT_HEAD!r} is the engine's value_head")
        where = f"{name}[{head!r}]"
        if isinstance(entry, Mapping):
            unknown = _unknown_keys(entry, HEAD_SPEC_KEYS)
            if unknown:
                raise ConfigError(f"{where} has unknown key(s) {unknown}; known keys: "
                                  f"{list(HEAD_SPEC_KEYS)}")
            path = entry.get("path")
            alpha = (None if entry.get("alpha") is None else
                     _as_float(entry["alpha"], f'{where}["alpha"]', ConfigError))
            steps = (None if entry.get("steps") is None else
                     _as_int(entry["steps"], f'{where}["steps"]', ConfigError, low=0))
            if steps is not None and steps > max_steps:
                raise _steps_over_max(f'{where}["steps"] = {steps}', max_steps)
            max_norm = _as_radius(entry.get("max_norm"), f'{where}["max_norm"]')
        else:
            path, alpha, steps, max_norm = entry, None, None, None
        if not isinstance(path, str) or not path.strip():
            raise ConfigError(f"{where} must be the folder of a value head (or an object with "
                              f'"path"), got {entry!r}')
        specs.append((head, HeadSpec(path, alpha, steps, max_norm)))
    return tuple(sorted(specs))


def _unknown_keys(section: Mapping[Any, Any], known: Sequence[str]) -> list[Any]:
    """The keys not in ``known``, in a stable order even when some are not strings (JSON
    keys always are; a Python dict's need not be, and sorting them mixed would crash)."""
    return sorted((key for key in section if key not in known), key=repr)


def _as_radius(value: Any, name: str) -> float | None:
    """``max_norm``: omitted (None), or a finite number > 0."""
    if value is None:
        return None
    return _as_float(value, name, ConfigError, positive=True)


def _as_step_list(value: Any, name: str, max_steps: int) -> tuple[int, ...] | None:
    """``warmup_steps``: omitted (None), or a list of step counts 1..max_steps ([] = no warm-up)."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{name} must be a list of step counts (e.g. [30]; [] turns the "
                          f"warm-up off), got {value!r}")
    counts = tuple(_as_int(v, f"{name}[{i}]", ConfigError, low=1) for i, v in enumerate(value))
    too_many = [n for n in counts if n > max_steps]
    if too_many:
        raise ConfigError(f"{name} has {too_many}, above max_steps = {max_steps}")
    return tuple(sorted(set(counts)))


def _as_float(value: Any, name: str, error: type[Exception], positive: bool = False) -> float:
    """A finite float32-range number >= 0 (``positive``: > 0, as a radius must be)."""
    bound = "> 0" if positive else ">= 0"
    # numbers.Real: NumPy's scalars too (np.float32(0.5)), as np.float64 always passed
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise error(f"{name} must be a number {bound}, got {value!r} ({type(value).__name__})")
    try:
        value = float(value)
    except OverflowError:  # an int past float's range
        raise error(f"{name} must be a finite number {bound}, got an integer of "
                    f"{len(str(abs(value)))} digits") from None
    # The ascent runs in float32: a larger value would be inf there and leave rows unedited.
    if (not math.isfinite(value) or value < 0 or (positive and value == 0)
            or value > FLOAT32_MAX):
        raise error(f"{name} must be a finite number {bound} (at most {FLOAT32_MAX:.4g}, "
                    f"float32's largest), got {value}")
    if positive and as_float32(value) == 0.0:
        raise error(f"{name} must be > 0 in float32, the ascent's precision, got {value} "
                    f"(it rounds to 0 there)")
    return value


def _as_int(value: Any, name: str, error: type[Exception], low: int,
            high: int | None = None) -> int:
    """An integer >= ``low`` (a whole float counts) and, when given, <= ``high``."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = int(value)  # NumPy's integer scalars too (np.int64(5))
    given = value
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise error(f"{name} must be an integer >= {low}, got {value!r} ({type(value).__name__})")
    if value < low:
        raise error(f"{name} must be an integer >= {low}, got {shown_number(given)}")
    if high is not None and value > high:
        limit = " (STEPS_LIMIT)" if high == STEPS_LIMIT else ""
        raise error(f"{name} must be at most {high}{limit}, got {shown_number(given)}")
    return value


def shown_number(value: Any) -> str:
    """A whole number as the user wrote it: a float as a float (1e+300, not its 997-bit
    integer), an integer by ``shown_int``."""
    return repr(value) if isinstance(value, float) else shown_int(int(value))


def shown_int(value: int) -> str:
    """``value`` for a message; past 256 bits its size instead (Python refuses to print
    integers of more than 4300 digits, and nobody reads them)."""
    return str(value) if value.bit_length() <= 256 else f"an integer of {value.bit_length()} bits"


def _as_switch(value: Any, name: str, error: type[Exception]) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("0", "1", "true", "false"):
        return value.strip().lower() in ("1", "true")
    raise error(f"{name} must be 0 or 1 (or true/false), got {value!r}")
