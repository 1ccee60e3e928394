"""The on-disk layout of collected states: a manifest, then one pair of files per shard.

Why shards: a 7B model's states for HH-RLHF are about 85 GB in 16-bit; no step may hold them
all. Each shard covers a fixed range of prompts, is written atomically, and is read on its own.

``DIR/manifest.json``           what was collected and how (written first, never changed)
``DIR/shard-00000.jsonl``       one row per response: ids, texts, token ids, finish reason
``DIR/shard-00000.safetensors`` ``states`` [S, d] (bfloat16/float16): s_0..s_T of every response,
                                back to back; ``offsets`` [R+1] int64 (response r owns rows
                                offsets[r]:offsets[r+1]); ``response_ids`` [R]; ``prompt_index`` [R]
``DIR/labels/<name>/...``       rewards, written later by ``label`` (see labeler.py)

A shard is done when its ``.safetensors`` file exists. Its ``.jsonl`` is written first (after
generation), so a run killed between the two redoes only the states of that shard.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from .common import DataError, atomic_path, dump_json, read_jsonl, sha256_file, write_jsonl_atomic

MANIFEST_FILE = "manifest.json"
STATES_FORMAT = "vllm-recontrol-states"
STATES_FORMAT_VERSION = 1
STATE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
STATE_DEFINITION = (
    "s_t = final-layer hidden state after the final norm at the position that emits response "
    "token t+1 (s_0 = last prompt token); a response of n tokens has states s_0..s_{n-1}; "
    "the last one (T = n-1) emitted EOS or the last token")


@dataclass(frozen=True)
class ShardPlan:
    """Shard ``name`` covers prompts ``prompt_start`` (inclusive) to ``prompt_end`` (exclusive)."""

    name: str
    prompt_start: int
    prompt_end: int


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def plan_shards(num_prompts: int, shard_size: int) -> list[ShardPlan]:
    """Fixed prompt ranges: the plan depends only on the prompt count and the shard size."""
    if shard_size <= 0:
        raise DataError(f"shard_size must be a positive number of prompts, got {shard_size}")
    return [ShardPlan(shard_name(i), start, min(start + shard_size, num_prompts))
            for i, start in enumerate(range(0, num_prompts, shard_size))]


def rows_path(directory: Path, name: str) -> Path:
    return Path(directory) / f"{name}.jsonl"


def states_path(directory: Path, name: str) -> Path:
    return Path(directory) / f"{name}.safetensors"


def shard_status(directory: Path, name: str) -> str:
    """``done`` (states written), ``generated`` (responses only) or ``pending``."""
    if states_path(directory, name).is_file():
        return "done"
    if rows_path(directory, name).is_file():
        return "generated"
    return "pending"


# ----------------------------------------------------------------------------- manifest
def write_manifest(directory: Path, manifest: dict[str, Any]) -> Path:
    path = Path(directory) / MANIFEST_FILE
    with atomic_path(path) as tmp:
        tmp.write_text(dump_json(manifest), encoding="utf-8")
    return path


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """Read and check ``manifest.json``; errors name the folder and what is wrong."""
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    if directory.exists() and not directory.is_dir():
        raise DataError(f"data folder {directory} is a file; give the folder that "
                        f"`vllm-recontrol collect --out` wrote")
    if not directory.is_dir():
        raise DataError(f"data folder {directory} does not exist")
    if not path.is_file():
        raise DataError(f"{directory} holds no {MANIFEST_FILE}: not a `vllm-recontrol collect` "
                        f"output folder (or the collection never started)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != STATES_FORMAT:
        raise DataError(f"{path} is not a {STATES_FORMAT} manifest")
    if manifest.get("format_version") != STATES_FORMAT_VERSION:
        raise DataError(f"{path}: format_version {manifest.get('format_version')!r} is not "
                        f"supported (this release reads {STATES_FORMAT_VERSION})")
    return manifest


def manifest_sha256(directory: str | Path) -> str:
    return sha256_file(Path(directory) / MANIFEST_FILE)


def manifest_shards(manifest: dict[str, Any]) -> list[ShardPlan]:
    return [ShardPlan(s["name"], s["prompt_start"], s["prompt_end"]) for s in manifest["shards"]]


# ----------------------------------------------------------------------------- shards
def write_rows(directory: Path, name: str, rows: Sequence[dict[str, Any]]) -> Path:
    return write_jsonl_atomic(rows_path(directory, name), rows)


def read_rows(directory: Path, name: str) -> list[dict[str, Any]]:
    path = rows_path(directory, name)
    if not path.is_file():
        raise DataError(f"shard rows {path} are missing; rerun `vllm-recontrol collect`")
    return read_jsonl(path)


def write_states(directory: Path, name: str, states: torch.Tensor, lengths: Sequence[int],
                 response_ids: Sequence[int], prompt_index: Sequence[int],
                 dtype: str = "bfloat16") -> Path:
    """Write a shard whose states are already back to back ([sum of lengths, d] in the
    stored dtype, response r's ``lengths[r]`` rows in order): a caller that fills one
    buffer as it goes (collect) then holds the shard once, not once more for a join."""
    from safetensors.torch import save_file

    if dtype not in STATE_DTYPES:
        raise DataError(f"state dtype must be one of {list(STATE_DTYPES)}, got {dtype!r}")
    if not lengths:
        raise DataError(f"shard {name} has no responses")
    if states.dtype != STATE_DTYPES[dtype] or states.dim() != 2 or \
            states.shape[0] != sum(lengths):
        raise ValueError(f"shard {name}: states must be [{sum(lengths)}, d] {dtype}, got "
                         f"{list(states.shape)} {states.dtype}")
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor(list(lengths), dtype=torch.int64), 0)
    tensors = {
        "states": states.detach().to("cpu").contiguous(),
        "offsets": offsets,
        "response_ids": torch.tensor(list(response_ids), dtype=torch.int64),
        "prompt_index": torch.tensor(list(prompt_index), dtype=torch.int64),
    }
    # One metadata key holding sorted JSON: safetensors writes a metadata map in hash order,
    # which would make equal shards from two processes differ byte for byte.
    metadata = {"recontrol": json.dumps({"format": STATES_FORMAT, "shard": name,
                                         "hidden_size": int(states.shape[1]), "dtype": dtype},
                                        sort_keys=True)}
    path = states_path(directory, name)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


@dataclass
class ShardIndex:
    """Everything about a shard except its states (small: a few numbers per response)."""

    name: str
    offsets: torch.Tensor       # [R+1] int64
    response_ids: torch.Tensor  # [R] int64
    prompt_index: torch.Tensor  # [R] int64
    hidden_size: int
    dtype: str

    @property
    def num_responses(self) -> int:
        return int(self.response_ids.numel())

    @property
    def num_states(self) -> int:
        return int(self.offsets[-1])

    @property
    def lengths(self) -> torch.Tensor:
        """[R] states of each response."""
        return self.offsets[1:] - self.offsets[:-1]


def read_shard_index(directory: Path, name: str) -> ShardIndex:
    """Offsets and ids of a finished shard, without reading its states."""
    from safetensors import safe_open

    path = states_path(directory, name)
    if not path.is_file():
        raise DataError(f"shard {path} is missing; rerun `vllm-recontrol collect` to finish it")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = json.loads((handle.metadata() or {}).get("recontrol", "{}"))
            states = handle.get_slice("states")
            shape, stored = states.get_shape(), states.get_dtype()
            # copies: safetensors maps the file, and a shard file rewritten in place under a
            # running job would change (or, truncated, fault) an index kept for the run
            ids = {key: handle.get_tensor(key).clone() for key in ("offsets", "response_ids",
                                                                   "prompt_index")}
            _check_stored_tensors(path, shape, stored, ids)
            index = ShardIndex(name, ids["offsets"], ids["response_ids"], ids["prompt_index"],
                               int(shape[1]), metadata.get("dtype", "?"))
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"shard {path} cannot be read: {type(exc).__name__}: {exc}") from exc
    if index.num_states != int(shape[0]) or index.offsets.numel() != index.num_responses + 1:
        raise DataError(f"shard {path} is inconsistent: offsets end at {index.num_states} but "
                        f"it holds {shape[0]} states")
    offsets = index.offsets
    if int(offsets[0]) != 0 or bool((offsets[1:] < offsets[:-1]).any()) or \
            index.prompt_index.numel() != index.num_responses:
        raise DataError(f"shard {path} is inconsistent: its offsets must start at 0 and never "
                        f"decrease, with one prompt index per response")
    return index


# safetensors' dtype names of the states collect writes
STORED_STATE_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16}
STORED_STATE_NAMES = [str(dtype).removeprefix("torch.") for dtype in STORED_STATE_DTYPES.values()]


def _check_stored_tensors(path: Path, shape: Sequence[int], stored: str,
                          index: dict[str, torch.Tensor]) -> None:
    """A damaged or hand-made shard is refused here, naming what is wrong: int16 states
    would train on truncated values, float offsets fail later as an index error."""
    if len(shape) != 2:
        raise DataError(f"shard {path} is damaged: its states must be [states, hidden size], "
                        f"got shape {list(shape)}")
    if stored not in STORED_STATE_DTYPES:
        raise DataError(f"shard {path} is damaged: its states are {stored}, not one of "
                        f"{STORED_STATE_NAMES} (what collect writes)")
    for key, tensor in index.items():
        if tensor.dtype != torch.int64 or tensor.dim() != 1:
            raise DataError(f"shard {path} is damaged: {key} must be a 1-D int64 tensor, got "
                            f"{tensor.dtype} {list(tensor.shape)}")


def load_states(directory: Path, name: str) -> torch.Tensor:
    """The shard's states as stored (16-bit), on the CPU, read into memory (not a mapping of
    the file)."""
    layout = states_layout(directory, name)
    states = torch.empty(layout.shape, dtype=layout.dtype)
    read_state_rows(layout, [(0, layout.shape[0])], states)
    return states


@dataclass(frozen=True)
class StatesLayout:
    """Where a shard's ``states`` tensor lies in its safetensors file: rows are contiguous,
    so any row range is one contiguous byte range."""

    path: Path
    dtype: torch.dtype
    shape: tuple[int, int]
    start: int  # byte offset of row 0 in the file

    @property
    def row_bytes(self) -> int:
        return self.shape[1] * torch.empty(0, dtype=self.dtype).element_size()


SAFETENSORS_HEADER_LIMIT = 100_000_000  # bytes, as safetensors itself refuses larger ones


def states_layout(directory: Path, name: str) -> StatesLayout:
    """The ``states`` tensor's dtype, shape and file offset, from the safetensors header.

    Why not safetensors' own reader: ``get_tensor`` maps the whole file (a window of one
    shard stayed a live mapping, and random batch rows page-faulted into it) and
    ``get_slice`` returns a fresh copy; reading the bytes ourselves puts them straight into
    the caller's preallocated tensor, and reads only the rows asked for. The header format
    is safetensors' documented one: an 8-byte little-endian length, then JSON naming each
    tensor's dtype, shape and [begin, end) byte offsets after the header."""
    path = states_path(directory, name)
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            # a damaged length must not become a read of exabytes (safetensors' own bound)
            if not 2 <= size <= min(SAFETENSORS_HEADER_LIMIT, file_size - 8):
                raise ValueError(f"a header of {size} bytes")
            header = json.loads(handle.read(size))
        entry = header["states"]
        begin, end = (int(x) for x in entry["data_offsets"])
        shape = tuple(int(x) for x in entry["shape"])
        stored = entry["dtype"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"shard {path} cannot be read: {type(exc).__name__}: {exc}") from exc
    if stored not in STORED_STATE_DTYPES or len(shape) != 2 or shape[0] < 0 or shape[1] < 1:
        raise DataError(f"shard {path} is damaged: its states are {stored} {list(shape)}, not "
                        f"[states, hidden size] in one of {STORED_STATE_NAMES}")
    layout = StatesLayout(path, STORED_STATE_DTYPES[stored], (shape[0], shape[1]),
                          8 + size + begin)
    # the bytes must be the shape's and lie inside the file (a huge shape would otherwise
    # become a huge allocation before any read fails)
    if not 0 <= begin <= end or end - begin != shape[0] * layout.row_bytes or \
            8 + size + end > file_size:
        raise DataError(f"shard {path} is damaged: its states header gives bytes {begin}..{end} "
                        f"for {list(shape)} {stored} in a file of {file_size} bytes")
    return layout


def read_state_rows(layout: StatesLayout, ranges: Sequence[tuple[int, int]],
                    out: torch.Tensor) -> None:
    """Read rows ``a:b`` of each range, back to back, into ``out`` (contiguous, CPU, as many
    rows as the ranges hold): each range is one seek and one read, straight into its slice,
    so no temporary copy of the shard exists and no row outside the ranges is read."""
    rows = sum(b - a for a, b in ranges)
    if not out.is_contiguous() or tuple(out.shape) != (rows, layout.shape[1]):
        raise ValueError(f"out must be a contiguous [{rows}, {layout.shape[1]}] tensor, "
                         f"got {list(out.shape)}")
    if any(not 0 <= a <= b <= layout.shape[0] for a, b in ranges):
        raise ValueError(f"row ranges {list(ranges)[:3]}... fall outside {layout.path}'s "
                         f"{layout.shape[0]} rows")
    if rows == 0:
        return
    target = out if out.dtype == layout.dtype else torch.empty(out.shape, dtype=layout.dtype)
    buffer = memoryview(target.view(torch.uint8).numpy().reshape(-1))
    position = 0
    with open(layout.path, "rb", buffering=0) as handle:
        for a, b in ranges:
            handle.seek(layout.start + a * layout.row_bytes)
            _read_exactly(handle, buffer[position:position + (b - a) * layout.row_bytes],
                          layout.path)
            position += (b - a) * layout.row_bytes
    if target is not out:  # shards of another 16-bit dtype in the same window
        out.copy_(target)


def _read_exactly(handle: Any, buffer: memoryview, path: Path) -> None:
    """Fill ``buffer`` from the file (a raw read may return fewer bytes than asked)."""
    done = 0
    while done < len(buffer):
        count = handle.readinto(buffer[done:])
        if not count:
            raise DataError(f"shard {path} is truncated: it ends inside its states")
        done += count


def iter_collected(directory: Path, names: Iterable[str]):
    """(name, ShardIndex) for each finished shard among ``names``."""
    for name in names:
        if shard_status(directory, name) == "done":
            yield name, read_shard_index(directory, name)
