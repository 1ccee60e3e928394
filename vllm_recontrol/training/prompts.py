"""Training prompts: where they come from and how they are cut out of dialogues.

Sources: a local JSONL/JSON-lines or Parquet file with a prompt column, a local folder that
``datasets`` can load, or a ``datasets`` hub name (for example ``Anthropic/hh-rlhf``).
HH-RLHF rows hold whole dialogues (``chosen``/``rejected``); the paper's prompt is the dialogue
up to and including its last ``Assistant:``, so the model writes the final answer itself.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

from .common import DataError

HH_ASSISTANT = "Assistant:"
PROMPT_FORMATS = ("auto", "plain", "hh-rlhf")
DIALOGUE_COLUMNS = ("chosen", "rejected")  # HH-RLHF: full dialogues, answer included
LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")


def extract_hh_prompt(dialogue: str) -> str:
    """The dialogue up to and including its last ``Assistant:`` (the paper's extraction)."""
    cut = dialogue.rfind(HH_ASSISTANT)
    if cut < 0:
        raise ValueError("no 'Assistant:' turn in the dialogue")
    return dialogue[:cut + len(HH_ASSISTANT)]


def hh_to_messages(prompt: str) -> list[dict[str, str]] | None:
    """Chat messages of an HH-RLHF prompt (``\\n\\nHuman: ...\\n\\nAssistant:``), or None.

    The trailing empty ``Assistant:`` turn is dropped: a chat template's generation prompt
    takes its place.
    """
    if not _TURN.search(prompt) or not prompt.lstrip().startswith("Human:"):
        return None
    parts = _TURN.split(prompt)  # ['', 'Human', text, 'Assistant', text, ...]
    messages = []
    for role, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": "user" if role == "Human" else "assistant",
                         "content": content.strip()})
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    if not messages or messages[-1]["role"] != "user":
        return None
    return messages


def prompt_messages(prompt: str) -> list[dict[str, str]]:
    """Chat messages for a prompt: HH-RLHF dialogues turn by turn, anything else as one user turn."""
    return hh_to_messages(prompt) or [{"role": "user", "content": prompt}]


def render_chat_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of ``prompt`` through the tokenizer's chat template (generation prompt added).

    The template's text already holds any BOS token, so it is tokenised without adding
    special tokens again (as Hugging Face and vLLM's chat entry points do).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("chat_template is on but the model's tokenizer has no chat template")
    text = tokenizer.apply_chat_template(prompt_messages(prompt), tokenize=False,
                                         add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# ----------------------------------------------------------------------------- loading
def load_prompts(
    source: str,
    split: str | None = None,
    prompt_column: str | None = None,
    prompt_format: str = "auto",
    data_dir: str | None = None,
    max_prompts: int | None = None,
    default_split: str = "train",
) -> list[str]:
    """All prompts of ``source`` in order (texts only; the states are what must stream).

    ``split`` and ``data_dir`` select within a data set (a name or a folder), ``split``
    defaulting to ``default_split``; a single file has neither, so naming one is an error
    rather than silently reading the whole file.

    ``prompt_column`` defaults to ``prompt``, or ``chosen`` when only that exists.
    ``prompt_format`` ``auto`` applies the HH-RLHF extraction to dialogue columns
    (``chosen``/``rejected``) and takes any other column as is.
    """
    if prompt_format not in PROMPT_FORMATS:
        raise DataError(f"prompt_format must be one of {list(PROMPT_FORMATS)}, got "
                        f"{prompt_format!r}")
    if max_prompts is not None and max_prompts <= 0:
        raise DataError(f"max_prompts must be a positive integer, got {max_prompts}")
    columns, read, where = _open_source(source, split, data_dir, default_split)
    column = _choose_column(columns, prompt_column, where)
    use_hh = prompt_format == "hh-rlhf" or (prompt_format == "auto" and column in DIALOGUE_COLUMNS)
    prompts: list[str] = []
    for place, value in _string_rows(read, column, where, max_prompts):
        if use_hh:
            try:
                value = extract_hh_prompt(value)
            except ValueError as exc:
                raise DataError(f"{where}: {place} column {column!r}: {exc} "
                                f"(HH-RLHF format expected): {value[:80]!r}") from exc
        if not value.strip():
            raise DataError(f"{where}: {place} column {column!r} is an empty prompt")
        prompts.append(value)
    if not prompts:
        raise DataError(f"{where} holds no prompts (empty data set)")
    return prompts


def _open_source(source: str, split: str | None, data_dir: str | None, default_split: str):
    """Columns, a column reader and a name for messages, for a file, folder or hub name."""
    path = Path(source)
    if path.is_file():
        if split is not None or data_dir is not None:
            given = " and ".join(f"{flag} {value!r}" for flag, value in
                                 (("--split", split), ("--data-dir", data_dir))
                                 if value is not None)
            raise DataError(f"prompt file {path}: {given} select(s) within a data set, and a "
                            "single file has no splits or data folders; drop the option, or "
                            "give --prompts a datasets name or a folder of split files")
        kind = LOCAL_SUFFIXES.get(path.suffix.lower())
        if kind is None:
            raise DataError(f"prompt file {path}: unsupported suffix {path.suffix!r} (use "
                            f"{', '.join(LOCAL_SUFFIXES)}, or a datasets name or folder)")
        try:
            columns, read = (_json_lines(path) if kind == "json" else _parquet(path))
        except UnicodeDecodeError as exc:
            raise DataError(f"prompt file {path} is not UTF-8 text: {exc}") from exc
        except (OSError, ValueError) as exc:  # not DataError (a ValueError): see below
            if isinstance(exc, DataError):
                raise
            raise DataError(f"prompt file {path} cannot be read: {type(exc).__name__}: "
                            f"{exc}") from exc
        return columns, read, f"prompt file {path}"
    if not path.exists() and (source.startswith((".", "/")) or
                              Path(source).suffix.lower() in LOCAL_SUFFIXES):
        raise DataError(f"prompt file {source} does not exist")
    split = default_split if split is None else split
    columns, read = _hf_dataset(source, split, data_dir)
    return columns, read, f"data set {source!r} (split {split!r})"


def load_references(
    source: str,
    split: str | None = None,
    reference_column: str | None = None,
    prompt_column: str | None = None,
    data_dir: str | None = None,
    max_prompts: int | None = None,
    default_split: str = "train",
) -> list[str]:
    """The data set's own answer to each prompt of ``load_prompts`` (same rows, same order):
    the column ``reference_column``, or else the final reply of the HH-RLHF dialogue the
    prompt was cut from (``chosen``: the preferred answer)."""
    columns, read, where = _open_source(source, split, data_dir, default_split)
    if reference_column is None:
        column = _choose_column(columns, prompt_column, where)
        if column not in DIALOGUE_COLUMNS:
            raise DataError(f"{where}: prompts come from column {column!r}, which holds no "
                            "answers; name the column of reference answers "
                            "(--reference-column)")
    else:
        column = _choose_column(columns, reference_column, where)
    references = []
    for place, value in _string_rows(read, column, where, max_prompts):
        if reference_column is None:
            cut = value.rfind(HH_ASSISTANT)
            if cut < 0:
                raise DataError(f"{where}: {place} column {column!r} has no 'Assistant:' "
                                f"turn (HH-RLHF format expected): {value[:80]!r}")
            value = value[cut + len(HH_ASSISTANT):].strip()
        references.append(value)
    return references


def _string_rows(read, column: str, where: str, limit: int | None):
    """(place, text) of the first ``limit`` rows of a column that must hold strings; the
    place is what the reader calls the row ("line 7" in JSON lines, else "row 7", from 1)."""
    rows = enumerate(read(column))
    while True:
        try:
            row, (place, value) = next(rows)
        except StopIteration:
            return
        except DataError:
            raise
        except UnicodeDecodeError as exc:
            raise DataError(f"{where} is not UTF-8 text: {exc}") from exc
        except (OSError, ValueError) as exc:  # pyarrow's errors derive from these
            raise DataError(f"{where} cannot be read: {type(exc).__name__}: {exc}") from exc
        if limit is not None and row >= limit:
            return
        if not isinstance(value, str):
            raise DataError(f"{where}: {place} column {column!r} is {type(value).__name__} "
                            f"{value!r:.80}, expected a string")
        yield place, value


def _choose_column(columns: Sequence[str], wanted: str | None, where: str) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise DataError(f"{where} has no column {wanted!r}; columns found: {list(columns)}")
        return wanted
    for candidate in ("prompt", *DIALOGUE_COLUMNS):
        if candidate in columns:
            return candidate
    raise DataError(f"{where} has no 'prompt' column (nor an HH-RLHF 'chosen' column); "
                    f"columns found: {list(columns)}. Name one with --prompt-column")


def _json_lines(path: Path):
    """Columns (from the first record) and a reader; plain JSON arrays are accepted too."""
    with open(path, encoding="utf-8-sig") as handle:
        text_start = handle.read(4096).lstrip()[:1]
    records: list | None = None
    if text_start == "[":  # one JSON array (small files); JSON lines stream
        try:
            records = list(json.loads(path.read_text(encoding="utf-8-sig")))
        except json.JSONDecodeError as exc:
            raise DataError(f"prompt file {path} is not valid JSON: {exc}") from exc
    first = None
    if records is not None:
        first = records[0] if records else None
    else:
        with open(path, encoding="utf-8-sig") as handle:
            for line in handle:
                if line.strip():
                    first = _parse_record(line, path, 1)
                    break
    if first is None:
        raise DataError(f"prompt file {path} is empty (no records)")
    if not isinstance(first, dict):
        raise DataError(f"prompt file {path}: records must be JSON objects, got "
                        f"{type(first).__name__}")

    def read(column: str):
        """(place, value): a JSON lines record by its line, an array's by its position."""
        placed = (((f"record {number}", record) for number, record in enumerate(records, 1))
                  if records is not None else _iter_json_lines(path))
        for place, record in placed:
            if not isinstance(record, dict) or column not in record:
                keys = list(record) if isinstance(record, dict) else type(record).__name__
                raise DataError(f"prompt file {path}: {place} has no column "
                                f"{column!r}; columns found: {keys}")
            yield place, record[column]

    return list(first), read


def _iter_json_lines(path: Path):
    with open(path, encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                yield f"line {number}", _parse_record(line, path, number)


def _parse_record(line: str, path: Path, number: int):
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"prompt file {path}: line {number} is not valid JSON: {exc}") from exc


def _parquet(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise DataError(f"reading {path} needs pyarrow (pip install pyarrow)") from exc
    parquet = pq.ParquetFile(path)
    columns = list(parquet.schema_arrow.names)

    def read(column: str):
        rows = (value for batch in parquet.iter_batches(columns=[column], batch_size=4096)
                for value in batch.column(0).to_pylist())
        yield from _counted_rows(rows)

    return columns, read


def _hf_dataset(name: str, split: str, data_dir: str | None):
    try:
        import datasets
    except ImportError as exc:
        raise DataError(f"{name!r} is not a local file, and loading a data set by name needs "
                        f"the datasets package (pip install datasets)") from exc
    try:
        dataset = datasets.load_dataset(name, data_dir=data_dir, split=split)
    except Exception as exc:  # datasets raises many types; keep the message, name the source
        raise DataError(f"cannot load data set {name!r} (split {split!r}): "
                        f"{type(exc).__name__}: {exc}") from exc
    columns = list(dataset.column_names)

    def read(column: str):
        yield from _counted_rows(dataset[column])

    return columns, read


def _counted_rows(values):
    """(place, value) with rows counted from 1, as a person counts them."""
    for number, value in enumerate(values, 1):
        yield f"row {number}", value
