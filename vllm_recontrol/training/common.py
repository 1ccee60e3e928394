"""Helpers shared by collect, label and train: errors, atomic files (``..files``: every
command is resumable, so "a file exists" must mean "the file is complete"), config files,
tables."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import json
import numbers
import os
import re
import sys
import traceback
import types
import typing
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..arguments import join_dash_values
from ..errors import RecontrolError
from ..files import atomic_path, write_text_atomic  # noqa: F401  (re-exported)


class DataError(RecontrolError):
    """Bad training input: a missing column, an empty data set, unlabelled or mismatched data."""


class FolderInUse(DataError):
    """Another run holds the folder: a failure of where this process stands, not of what it
    reads (under torchrun only rank 0 takes a lock, so it fails alone by design)."""


class RewardError(RecontrolError):
    """A reward function or reward model failed or returned something that is not a number."""


def failure_reason(exc: BaseException) -> str | BaseException:
    """What a failed write says in a message: an OSError's own words (No space left on
    device), without its errno and path; anything else (safetensors' SafetensorError) as it
    is."""
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else exc


# ----------------------------------------------------------------------------- files
def write_jsonl_atomic(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return Path(path)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}: line {number} is not valid JSON: {exc}") from exc
    return rows


def dump_json(data: Any) -> str:
    """Deterministic JSON (sorted keys), so equal content gives equal bytes and hashes."""
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def json_digest(value: Any) -> str:
    """sha256 of a value as JSON with sorted keys; what JSON cannot write is taken by its
    repr. Equal values give equal digests in any process (run identities, resume keys)."""
    return sha256_bytes(json.dumps(value, sort_keys=True, default=repr).encode())


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_fingerprint(source: str) -> str | None:
    """Names, sizes and modification times of a local model folder's files (hashing the
    weights would take minutes for a 7B model; a model saved again at the same path changes
    these), or None when ``source`` is no folder here (a hub id, or a folder that only
    remote workers hold). Here, not in eval: eval's resume digests and the reward model's
    description (which label sets compare) both read it. Hidden files and folders are left
    out: ``hf download --local-dir`` rewrites its ``.cache/`` metadata on every run, and
    the model's files are what decides the outputs."""
    folder = Path(source)
    if not folder.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        stat = path.stat()
        digest.update(f"{relative}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return digest.hexdigest()


# ----------------------------------------------------------------------------- options
def build_options(cls: type, options: Mapping[str, Any], command: str) -> Any:
    """A dataclass of options from a mapping (a config file or keyword arguments).

    Keys may use ``-`` or ``_``; unknown keys are an error naming the known ones, so a typo
    in a config file is never silently ignored.
    """
    fields = {f.name for f in dataclasses.fields(cls)}
    normalised = {str(k).replace("-", "_"): v for k, v in options.items()}
    unknown = sorted(set(normalised) - fields)
    if unknown:
        raise RecontrolError(f"{command}: unknown option(s) {unknown}; known options: "
                             f"{sorted(fields)}")
    hints = typing.get_type_hints(cls)
    return cls(**{name: _typed_option(value, hints[name], f"{command}: option {name}")
                  for name, value in normalised.items()})


def _typed_option(value: Any, annotation: Any, where: str) -> Any:
    """``value`` checked against its field's annotation (config files are untyped JSON):
    a clear error instead of a traceback deep in the command, or a string "no" taken as
    true. Paths pass as strings, integers as floats, whole floats as integers."""
    options = typing.get_args(annotation) if typing.get_origin(annotation) in (
        typing.Union, types.UnionType) else (annotation,)
    if value is None and type(None) in options:
        return None
    kinds = [o for o in options if o is not type(None)]
    if len(kinds) != 1:
        return value  # a union of types: the command checks it
    kind = kinds[0]
    origin, args = typing.get_origin(kind) or kind, typing.get_args(kind)
    if kind is Any or origin not in (bool, int, float, str, list, dict):
        return value  # a callable or anything else: the command checks it
    if origin is dict:
        if not isinstance(value, Mapping):
            raise RecontrolError(f"{where} must be a JSON object, got {value!r}")
        return dict(value)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise RecontrolError(f"{where} must be a list, got {value!r}")
        item = args[0] if args else Any
        return [_typed_option(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is str:
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if isinstance(value, str):
            return value
        raise RecontrolError(f"{where} must be a string, got {value!r}")
    if origin is bool:
        if isinstance(value, bool):
            return value
        raise RecontrolError(f"{where} must be true or false, got {value!r}")
    if origin is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise RecontrolError(f"{where} must be an integer, got {value!r}")
    if isinstance(value, numbers.Real) and not isinstance(value, bool):  # float
        try:
            return float(value)
        except OverflowError:
            raise RecontrolError(f"{where} is too large for a float") from None
    raise RecontrolError(f"{where} must be a number, got {value!r}")


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Options from a JSON file, or YAML (``.yaml``/``.yml``) when PyYAML is installed."""
    path = Path(path)
    if not path.is_file():
        raise RecontrolError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8-sig")  # a Windows editor's byte-order mark too
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as exc:
            raise RecontrolError(f"config file {path} is YAML but PyYAML is not installed "
                                 f"(pip install pyyaml), or use a .json file") from exc
        data = yaml.safe_load(text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RecontrolError(f"config file {path} is not valid JSON: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecontrolError(f"config file {path} must hold a mapping of option names to "
                             f"values, got {type(data).__name__}")
    return data


def parse_command_line(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
                       required: Sequence[str] = ()) -> dict[str, Any]:
    """Parse flags, with ``--config FILE`` supplying any option that no flag sets.

    Flags win over the file. Options nobody set are left out, so the Python function's own
    defaults apply. ``required`` options must come from a flag or the file.
    """
    parser.allow_abbrev = False  # "--epoch" must not pass for --epochs (or a later flag)
    parser.add_argument("--config", type=Path, default=None,
                        help="JSON (or YAML with PyYAML) file of options; flags override it")
    for action in parser._actions:  # absent flags must not hide config-file values
        if action.dest not in ("help", "config"):
            action.default = argparse.SUPPRESS
    args = vars(parser.parse_args(join_dash_values(parser, argv)))
    config_path = args.pop("config", None)
    try:
        options = load_config_file(config_path) if config_path else {}
    except RecontrolError as exc:  # a usage error: the parser's one line, exit code 2
        parser.error(str(exc))
    options = {str(k).replace("-", "_"): v for k, v in options.items()}
    options.update(args)
    missing = [name for name in required if options.get(name) in (None, "")]
    if missing:
        flags = ", ".join("--" + name.replace("_", "-") for name in missing)
        parser.error(f"missing required option(s): {flags} (as flags or in --config)")
    return options


def json_argument(text: str) -> Any:
    """argparse type for a JSON value (``--engine-args '{"dtype": "float32"}'``)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from exc


def check_engine_args(arguments: Mapping[str, Any], flag: str) -> None:
    """Refuse keys that ``vllm.LLM`` does not take, and ``model`` (the command's own
    --model), before anything starts, naming close matches."""
    from .._vllm_adapter import engine_argument_names

    if "model" in arguments:
        raise DataError(f"{flag}: give the model with --model, not as an engine argument")
    if "seed" in arguments:  # it overrides --seed there, and vLLM checks it only at start
        check_engine_seed(arguments["seed"], f"{flag} seed")
    known = engine_argument_names()
    unknown = sorted(k for k in arguments if k not in known)
    if unknown:
        hints = {k: difflib.get_close_matches(str(k), known, n=2) for k in unknown}
        said = ", ".join(f"{k!r}" + (f" (did you mean {' or '.join(hints[k])}?)" if hints[k]
                                     else "") for k in unknown)
        raise DataError(f"{flag}: vLLM's LLM(...) takes no argument {said}")


def check_model_path(model: str, flag: str = "--model") -> None:
    """A model given as a path (``/``, ``.``, ``~``) must exist: vLLM would take a missing
    one for a hub id and fail inside the engine with a traceback."""
    text = str(model)
    if text.startswith(("/", ".", "~")) and not Path(text).expanduser().exists():
        raise DataError(f"{flag} {text}: no such folder (a local model is a folder with "
                        "config.json; a hub id looks like org/name)")


# vLLM seeds numpy's global generator with its engine seed, which takes [0, 2**32).
MAX_ENGINE_SEED = 2 ** 32


def check_engine_seed(seed: Any, flag: str = "--seed") -> None:
    """A DataError when ``seed`` cannot seed a vLLM engine: checked before any engine
    starts, where vLLM would refuse it only inside its engine core process, with a
    traceback."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < MAX_ENGINE_SEED:
        raise DataError(f"{flag} must be an integer in [0, 2**32) (vLLM seeds numpy with it), "
                        f"got {seed!r}")


def sampling_refusal(params: Mapping[str, Any]) -> str | None:
    """vLLM's own objection to ``SamplingParams(**params)`` (temperature <= 2, top_k,
    max_tokens >= 1, ...), or None: checked before any engine starts, where vLLM would raise
    it only at the first request. None too without vLLM (the engines will say so; fake
    engines in tests need none)."""
    try:
        from vllm import SamplingParams
        from vllm.exceptions import VLLMValidationError
    except ImportError:
        return None
    try:
        SamplingParams(**params)
    except (VLLMValidationError, ValueError, TypeError) as exc:
        return str(exc)
    return None


ENGINE_START_HINT = (
    "hint: where vLLM's reason is not on the line above, it is in the log above it (the "
    "first ERROR lines of its engine process). On a CPU machine a common one is memory: vLLM "
    "wants a share of the machine's free memory for its KV cache unless told a size, e.g. "
    "--engine-args '{\"kv_cache_memory_bytes\": 1073741824}' (1 GiB)")


# a shell's status for a command ended by SIGINT: a script can tell Ctrl-C from a failure
INTERRUPTED_STATUS = 130


def run_main(function: Callable[..., Any], options: Mapping[str, Any]) -> int:
    """Run a command function for the CLI: a clear one-line error instead of a traceback.
    An engine that failed to start is reported by vLLM in its own process's log, far above
    the traceback the CLI gets (which only says so): the last line says where to look.
    Ctrl-C ends it with one line and status 130 (it printed 30-130 lines of traceback, and
    status 1 for collect and eval)."""
    from .engines import EngineStartError

    try:
        function(**options)
    except KeyboardInterrupt:  # Ctrl-C: the command's own cleanup has run on the way here
        print("interrupted", file=sys.stderr, flush=True)
        return INTERRUPTED_STATUS
    except Exception as raised:
        exc = raised_in_actor(raised)
        if isinstance(exc, EngineStartError):
            print(f"error: {exc}\n{ENGINE_START_HINT}", file=sys.stderr, flush=True)
        elif isinstance(exc, RecontrolError):
            print(f"error: {exc}", file=sys.stderr, flush=True)
        elif isinstance(exc, RuntimeError) and "engine core initialization" in str(exc).lower():
            traceback.print_exc()
            print(f"error: the vLLM engine did not start\n{ENGINE_START_HINT}",
                  file=sys.stderr, flush=True)
        elif _is_dead_actor(exc):
            print(f"error: {_dead_actor_message(exc)}", file=sys.stderr, flush=True)
        else:
            raise
        return 1
    return 0


def raised_in_actor(exc: BaseException) -> BaseException:
    """The error a Ray actor's method raised, out of Ray's wrappers (whose text is the
    remote traceback), or ``exc`` itself."""
    errors = sys.modules.get("ray.exceptions")
    while errors is not None and isinstance(exc, errors.RayTaskError) and \
            isinstance(getattr(exc, "cause", None), BaseException) and exc.cause is not exc:
        exc = exc.cause
    return exc


def _is_dead_actor(exc: BaseException) -> bool:
    errors = sys.modules.get("ray.exceptions")
    return errors is not None and isinstance(exc, errors.RayActorError)


def _dead_actor_message(exc: BaseException) -> str:
    """One line for a Ray actor that died. One that could not even be created (Ray could not
    import its class or arguments on a node: a package missing or of another version
    there) says Ray's reason, the last line of its text; a rerun would fail alike. Any
    other (killed, out of memory) says what Ray knows, and that a rerun goes on."""
    lines = _lines(exc)
    if getattr(exc, "_actor_init_failed", False) or (lines and "creation task" in lines[0]):
        return (f"a Ray actor could not be created: {lines[-1] if lines else exc}; check that "
                f"every node has the packages the driver has (vllm-recontrol, vLLM, torch) "
                f"at the same versions")
    text = "; ".join(lines)
    if len(text) > 600:  # what died and why come first, Ray's general advice after
        text = text[:600] + " ..."
    return f"a Ray actor died ({text}); what finished is kept: run the command again to go on"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _lines(exc: BaseException) -> list[str]:
    """The text's lines, without colour codes, Ray's ids and traceback markers (``^^^``),
    which tell a person nothing."""
    lines = (_ANSI.sub("", line).strip() for line in str(exc).splitlines())
    return [line for line in lines if line and set(line) - set("^~ ")
            and not line.startswith(("actor_id:", "namespace:"))]


# ----------------------------------------------------------------------------- models
def model_state_width(model: str, trust_remote_code: bool = False) -> int:
    """The width of the states vLLM collects and edits for ``model`` (a folder or a hub id),
    from its config alone, no weights: its language model's hidden size (a multimodal
    model's text config first, as vLLM reads it), or OPT's projected width."""
    from transformers import AutoConfig

    from huggingface_hub.errors import StrictDataclassError

    try:
        config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, StrictDataclassError) as exc:
        # StrictDataclassError: a config.json field of the wrong type (transformers 5)
        raise RecontrolError(f"cannot read the configuration of model {model!r}: {exc}") from exc
    from ..config import state_width

    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for candidate in (text_config, config):
        size = state_width(candidate)  # OPT: its projected width, which lm_head reads
        if size is not None:
            return size
    raise RecontrolError(f"model {model!r} has no hidden_size in its configuration")


# ----------------------------------------------------------------------------- output
def summary_table(title: str, rows: Sequence[tuple[str, Any]]) -> str:
    """A two-column Markdown table, printed once at the end of each command."""
    def fmt(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    cells = [(str(key), fmt(value)) for key, value in rows]
    width = max([len(k) for k, _ in cells] + [len("quantity")])
    value_width = max([len(v) for _, v in cells] + [len("value")])
    lines = [f"\n{title}", f"| {'quantity':<{width}} | {'value':<{value_width}} |",
             f"|{'-' * (width + 2)}|{'-' * (value_width + 2)}|"]
    lines += [f"| {key:<{width}} | {value:<{value_width}} |" for key, value in cells]
    return "\n".join(lines)


def progress(iterable: Any = None, **kwargs: Any):
    """tqdm (installed with vLLM) when available, else the plain iterable."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm ships with vLLM and transformers
        return iterable
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)
