"""A value head on disk: ``config.json`` and ``model.safetensors`` in one folder (tensors
``layers.{i}.weight`` / ``layers.{i}.bias``), read and validated. Why apart from the head
itself: a head may come from an untrusted source, so every byte read is checked here (nothing
is unpickled), and both files carry one save id so that a mix of two saves is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import reprlib
import stat
from pathlib import Path
from typing import Any

import torch

from .errors import ValueHeadError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_NAME = "vllm-recontrol-value-head"
FORMAT_VERSION = 1
# config.json's key for the save id (a digest of the weights) that the weights file also holds
SAVE_ID_KEY = "save_id"
SUPPORTED_ACTIVATIONS = ("relu",)
STORED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# The paper's heads have 2 hidden layers, the Triton kernel runs 1 to 3; deeper ones run on
# torch. The bound keeps what checking an untrusted config costs small (a 14 MB config of
# 7 million one-wide layers took 68 s and 3.8 GB to refuse).
MAX_HIDDEN_LAYERS = 64
# Values of an untrusted config in messages: cut short (a config of megabytes made messages
# of megabytes).
_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 60
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = 4
_SHORT.maxlong = 40
_SHORT.maxlevel = 2


def shown(value: Any) -> str:
    """``value`` for a message, in at most a few hundred characters."""
    return _SHORT.repr(value)


def check_provenance(base_model: Any, metadata: Any, source: str) -> None:
    """The types ``read_config`` accepts for ``base_model`` and ``metadata``."""
    if base_model is not None and not isinstance(base_model, str):
        raise ValueHeadError(f"{source}: base_model must be a model name (str) or None, got "
                             f"{base_model!r}")
    if metadata is not None and not isinstance(metadata, dict):
        raise ValueHeadError(f"{source}: metadata must be a dict or None, got "
                             f"{type(metadata).__name__}")


def json_problem(value: Any, where: str) -> str | None:
    """Why ``value`` would not come back from JSON as itself (naming the part, e.g.
    ``metadata["metrics"]["mse"]``), or None: json.dumps writes NaN and inf as non-standard
    JSON, turns non-string keys into strings, and refuses numpy scalars, sets and tensors."""
    if value is None or isinstance(value, (str, bool, int)):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{where} is {value}, which JSON cannot hold"
    if isinstance(value, (list, tuple)):
        return next((p for i, item in enumerate(value)
                     for p in [json_problem(item, f"{where}[{i}]")] if p), None)
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return (f"{where} has the key {key!r} ({type(key).__name__}); JSON keys are "
                        "strings")
            problem = json_problem(item, f"{where}[{json.dumps(key)}]")
            if problem:
                return problem
        return None
    return (f"{where} is a {type(value).__name__} ({reprlib.repr(value)}), not a JSON "
            "value (use a Python number, str, bool, None, list or dict)")


def check_shape_config(hidden_size: Any, widths: Any, source: str) -> None:
    """Positive integers (NumPy's too, as a config computed with it holds; never a bool)."""
    if not is_positive_integer(hidden_size):
        raise ValueHeadError(f"{source}: hidden_size must be a positive integer, got "
                             f"{shown(hidden_size)}")
    if isinstance(widths, (list, tuple)) and len(widths) > MAX_HIDDEN_LAYERS:
        raise ValueHeadError(f"{source}: widths lists {len(widths)} hidden layers, more than a "
                             f"value head has (at most {MAX_HIDDEN_LAYERS}; the paper's has 2)")
    if not isinstance(widths, (list, tuple)) or not all(is_positive_integer(w) for w in widths):
        raise ValueHeadError(f"{source}: widths must be a list of positive integers, got "
                             f"{shown(widths)}")


def is_positive_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0


# A trained head's config with its metadata (history of every epoch included) is a few
# tens of kilobytes; this leaves a wide margin and still bounds what a bad file costs.
MAX_CONFIG_BYTES = 16 * 1024 * 1024


def _no_json_constant(name: str) -> Any:
    """NaN, Infinity and -Infinity are not JSON (Python's json reads them by default): a
    config holding one would load, print as invalid JSON in ``inspect --json`` and refuse
    to save again."""
    raise ValueError(f"{name} is not a JSON value (configs hold finite numbers only)")


def _finite_float(text: str) -> float:
    """A JSON number that fits a float (``1e400`` reads as inf otherwise)."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is beyond a float's range (configs hold finite numbers "
                         f"only)")
    return value


class DuplicateKey(ValueError):
    """A JSON object with a key twice: valid JSON, but read differently by two readers."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all different: with a key twice, which one counts is up
    to the reader (Python's json takes the last), so a reviewer could read another head
    than the one served."""
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise DuplicateKey(f"the key {shown(key)} appears twice")
        found[key] = value
    return found


def read_config(path: Path) -> dict[str, Any]:
    """Read and validate ``config.json`` of a head folder."""
    config_path = path / CONFIG_FILE
    try:  # a folder that cannot be searched, or a name too long, is an OSError here
        found = file_status(path)
        if found is None:
            raise ValueHeadError(f"value head folder {path} does not exist")
        if not stat.S_ISDIR(found.st_mode):
            raise ValueHeadError(f"value head path {path} is not a folder (expected "
                                 f"{CONFIG_FILE} and {WEIGHTS_FILE} inside it)")
        check_regular_file(config_path, f"value head config {config_path}")
        size = config_path.stat().st_size
    except OSError as exc:
        raise ValueHeadError(f"value head {path}: {exc.filename or path} cannot be looked at "
                             f"({exc.strerror or exc})") from None
    if size > MAX_CONFIG_BYTES:  # read whole by every engine process: bounded
        raise ValueHeadError(f"value head config {config_path} is {size} bytes, more than a "
                             f"head's config holds ({MAX_CONFIG_BYTES}); not a value head's")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"),
                            parse_constant=_no_json_constant, parse_float=_finite_float,
                            object_pairs_hook=_unique_keys)
    except DuplicateKey as exc:
        raise ValueHeadError(f"value head config {config_path} is ambiguous JSON: {exc} (which "
                             "one counts is up to the reader); keep one") from None
    # ValueError also covers integers of more than 4300 digits, which json.loads refuses
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ValueHeadError(f"value head config {config_path} is not valid JSON: {exc}") from exc
    except OSError as exc:
        raise ValueHeadError(f"value head config {config_path} cannot be read: {exc}") from exc
    if not isinstance(config, dict):
        raise ValueHeadError(f"value head config {config_path} must hold a JSON object")
    if "widths" not in config and ("model_type" in config or "architectures" in config):
        raise ValueHeadError(f"{config_path} is a model's config (model_type "
                             f"{shown(config.get('model_type'))}), not a value head's: give the "
                             f"value head's folder (config.json with hidden_size and widths)")
    for key in ("hidden_size", "widths"):
        if key not in config:
            raise ValueHeadError(f"value head config {config_path} lacks the key {key!r}")
    check_shape_config(config["hidden_size"], config["widths"], source=str(config_path))
    activation = config.get("activation", "relu")
    if activation not in SUPPORTED_ACTIVATIONS:
        raise ValueHeadError(f"value head config {config_path}: activation "
                             f"{shown(activation)} is "
                             f"not supported (supported: {', '.join(SUPPORTED_ACTIVATIONS)})")
    if config.get("format", FORMAT_NAME) != FORMAT_NAME:
        raise ValueHeadError(f"value head config {config_path}: format "
                             f"{shown(config['format'])} is not a value head's "
                             f"({FORMAT_NAME!r})")
    version = config.get("format_version", FORMAT_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or version != FORMAT_VERSION:
        raise ValueHeadError(f"value head config {config_path}: format_version "
                             f"{shown(version)} is "
                             f"not supported (this release reads {FORMAT_VERSION})")
    # Both are compared and read later (base-model check at engine start, `inspect`).
    if config.get("base_model") is not None and not isinstance(config["base_model"], str):
        raise ValueHeadError(f"value head config {config_path}: base_model must be a model "
                             f"name or null, got {shown(config['base_model'])}")
    if SAVE_ID_KEY in config and not isinstance(config[SAVE_ID_KEY], str):
        raise ValueHeadError(f"value head config {config_path}: {SAVE_ID_KEY} must be a "
                             f"string, got {shown(config[SAVE_ID_KEY])}")
    if config.get("metadata") is not None and not isinstance(config["metadata"], dict):
        raise ValueHeadError(f"value head config {config_path}: metadata must be a JSON "
                             f"object or null, got {type(config['metadata']).__name__}")
    return config


def foreign_config_problem(directory: Path) -> str | None:
    """Why saving a head into ``directory`` would destroy another artifact (a model's
    ``config.json``, and its ``model.safetensors``, which the head's replace), or None."""
    if not (directory / CONFIG_FILE).exists():
        return None
    try:
        read_config(directory)
    except ValueHeadError as exc:
        return (f"holds a {CONFIG_FILE} that is not a value head's, which the head's "
                f"{CONFIG_FILE} and {WEIGHTS_FILE} would replace ({exc})")
    return None


def file_status(path: Path) -> os.stat_result | None:
    """``path``'s status (links followed), None when nothing is there. Why not
    ``Path.exists``: whether it raises or answers False when the lookup itself fails (a
    folder on the way the user may not search, a name too long) depends on the Python
    version, and False would read as "missing". Any other OSError is raised."""
    try:
        return path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None


def check_regular_file(path: Path, what: str, plural: bool = False) -> None:
    """A missing file, or one that is not a regular file (a FIFO would hang the read, a
    device such as /dev/zero never ends), each named for what it is; one that cannot be looked
    at (a folder on the way the user may not search) says why."""
    try:
        found = file_status(path)
        if found is None:
            raise ValueHeadError(f"{what} {'are' if plural else 'is'} missing"
                                 + (f" (a link to {os.readlink(path)} that leads to no file)"
                                    if path.is_symlink() else ""))
        if not stat.S_ISREG(found.st_mode):
            kind = ("a folder" if stat.S_ISDIR(found.st_mode)
                    else "not a regular file (a device, FIFO or socket)")
            raise ValueHeadError(f"{what} {'are' if plural else 'is'} {kind}")
    except OSError as exc:
        raise ValueHeadError(f"{what} cannot be looked at ({exc.strerror or exc})") from None


def read_weights(weights_path: Path, hidden_size: int,
                 widths: list[int]) -> tuple[dict[str, torch.Tensor], str | None]:
    """Read ``model.safetensors`` in one open (a second open could meet another save's file)
    and check names, shapes, dtypes and finiteness; return the tensors and the save id the
    file carries (None: none)."""
    from safetensors import SafetensorError, safe_open

    check_regular_file(weights_path, f"value head weights {weights_path}", plural=True)
    sizes = [hidden_size, *widths, 1]
    expected = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        expected[f"layers.{i}.weight"] = (fan_out, fan_in)
        expected[f"layers.{i}.bias"] = (fan_out,)
    _check_header_size(weights_path, len(expected))
    try:
        with safe_open(str(weights_path), framework="pt") as handle:
            save_id = stored_save_id(handle.metadata() or {})
            # names and shapes from the header first: a file with a huge extra or misshapen
            # tensor is refused before any of it is read into memory
            _check_names_and_shapes(weights_path, handle, expected, hidden_size, widths)
            tensors = {name: handle.get_tensor(name) for name in expected}
    except ValueHeadError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError, MemoryError) as exc:
        raise ValueHeadError(f"value head weights {weights_path} cannot be read as "
                             f"safetensors: {exc}") from exc
    for name, tensor in tensors.items():
        if tensor.dtype not in STORED_DTYPES:
            raise ValueHeadError(f"value head weights {weights_path}: {name} has dtype "
                                 f"{tensor.dtype}, expected one of "
                                 f"{', '.join(str(t) for t in STORED_DTYPES)}")
        try:
            finite = all_finite(tensor)
        except (RuntimeError, MemoryError) as exc:  # out of memory: name the tensor's size
            raise ValueHeadError(f"value head weights {weights_path}: {name} "
                                 f"({tensor.numel()} values) could not be checked: {exc}") from exc
        if not finite:
            raise ValueHeadError(f"value head weights {weights_path}: {name} holds NaN or inf")
    return tensors, save_id


FINITE_CHUNK = 1 << 22  # values per isfinite call: its mask is a byte per value


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or inf, checked a chunk at a time (one mask of the whole tensor is a quarter
    of a float32 head's size more at the peak)."""
    flat = tensor.reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + FINITE_CHUNK]).all())
               for i in range(0, flat.numel(), FINITE_CHUNK))


# A head's safetensors header names 2 (layers + 1) tensors and one metadata key: under a
# kilobyte for the paper's heads. A far larger one is another file (a model's, renamed):
# refused before it is parsed (an 89 MB header took 2.2 GB of memory to parse, and its
# names made a 17 MB message). Room: MAX_CONFIG_BYTES of metadata, and per tensor.
HEADER_BYTES_PER_TENSOR = 256
LISTED_NAMES = 10  # of the missing or unexpected tensors, in a message
LFS_POINTER = b"version https://git-lfs"


def _check_header_size(weights_path: Path, tensors: int) -> None:
    """The file is readable (safetensors says "No such file" for one that is not), is not a
    Git LFS pointer, and its header (the first 8 bytes give its length) is of the size a
    head of ``tensors`` tensors can have."""
    try:
        with open(weights_path, "rb") as handle:
            prefix = handle.read(len(LFS_POINTER))
    except OSError as exc:
        raise ValueHeadError(f"value head weights {weights_path} cannot be read "
                             f"({exc.strerror or exc})") from None
    if prefix == LFS_POINTER:
        raise ValueHeadError(f"value head weights {weights_path} is a Git LFS pointer, not "
                             f"the weights: fetch them (git lfs pull) or download the head "
                             f"again")
    length = int.from_bytes(prefix[:8], "little") if len(prefix) >= 8 else 0
    limit = MAX_CONFIG_BYTES + HEADER_BYTES_PER_TENSOR * tensors
    if length > limit:
        raise ValueHeadError(f"value head weights {weights_path}: a safetensors header of "
                             f"{length} bytes, more than a head of {tensors} tensors holds "
                             f"({limit}); not this head's weights")


def _listed(names: list[Any]) -> str:
    shown = names[:LISTED_NAMES]
    more = f" and {len(names) - len(shown)} more" if len(names) > len(shown) else ""
    return f"{shown}{more}"


def _check_names_and_shapes(weights_path: Path, handle: Any, expected: dict[str, tuple],
                            hidden_size: int, widths: list[int]) -> None:
    names = set(handle.keys())
    missing, extra = sorted(set(expected) - names), sorted(names - set(expected))
    if missing or extra:
        raise ValueHeadError(
            f"value head weights {weights_path} do not match config widths {_listed(widths)} "
            f"(hidden_size {hidden_size}): missing {_listed(missing)}, unexpected "
            f"{_listed(extra)}")
    for name, shape in expected.items():
        found = tuple(handle.get_slice(name).get_shape())
        if found != shape:
            raise ValueHeadError(f"value head weights {weights_path}: {name} has shape "
                                 f"{shown(list(found))}, expected {shown(list(shape))}")


WEIGHTS_METADATA_KEY = "recontrol"


def weights_metadata(save_id: str) -> dict[str, str]:
    """The weights file's metadata: one key holding sorted JSON, because safetensors writes
    a metadata map in hash order, and two keys made two saves of one head differ in bytes."""
    return {WEIGHTS_METADATA_KEY: json.dumps({"format": FORMAT_NAME, SAVE_ID_KEY: save_id},
                                             sort_keys=True)}


def stored_save_id(metadata: dict[str, str]) -> str | None:
    """The save id in a weights file's metadata (None: a head written by hand or before
    save ids; unreadable metadata counts as none, the weights themselves are checked)."""
    try:
        found = json.loads(metadata.get(WEIGHTS_METADATA_KEY, "{}"))
    except ValueError:
        return None
    return found.get(SAVE_ID_KEY) if isinstance(found, dict) else None


def weights_id(tensors: dict[str, torch.Tensor]) -> str:
    """A digest of the saved tensors (names, dtypes, shapes, bytes): the save id both files
    carry, so a config names the weights it was written with. Content, not chance: the same
    weights save to the same bytes (training is reproducible to the byte)."""
    digest = hashlib.sha256()
    for name, tensor in tensors.items():
        digest.update(f"\0{name}\0{tensor.dtype}\0{list(tensor.shape)}\0".encode())
        # the array itself, not a bytes copy of it (a second copy of the head at the peak)
        digest.update(tensor.contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()[:32]


def check_same_save(path: Path, config: dict[str, Any], stored_id: str | None) -> None:
    """Refuse a config and weights written by two different saves (an interrupted save, or
    one file copied over from another head): the shapes may match, so the mix would load.
    ``stored_id`` is the weights file's (``read_weights``). Heads whose files carry no save
    id (written by hand, or before ids) pass."""
    config_id = config.get(SAVE_ID_KEY)
    if stored_id != config_id:
        raise ValueHeadError(
            f"value head {path}: {CONFIG_FILE} and {WEIGHTS_FILE} come from different saves "
            f"(save ids {config_id!r} and {stored_id!r}: a save interrupted between the two "
            "files, or a file copied from another head); save the head again")
