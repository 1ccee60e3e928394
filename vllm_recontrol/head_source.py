"""Where a value head comes from: a local folder, or a Hugging Face Hub repository.

Why: a head is a small artifact that teams share as they share models, so an engine takes
``owner/name`` (optionally ``owner/name@revision``) where vLLM takes a model id. Only
``config.json`` and ``model.safetensors`` are fetched (nothing else in the repository,
nothing pickled), through the hub cache, so ``HF_HUB_OFFLINE`` and a cache filled in advance
work as they do for models. A path that exists locally always wins; ``owner/name`` whose
``owner`` is a local folder is a mistyped path, not a hub id (else a typo of ``heads/x``
would load whatever a hub repository of that name holds): ``hf://owner/name`` says hub.
"""

from __future__ import annotations

import difflib
import re
import stat
from pathlib import Path

from .errors import ValueHeadError
from .head_files import file_status
from .logs import get_logger

logger = get_logger(__name__)

HEAD_FILES = ("config.json", "model.safetensors")
HUB_REPO = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name, no leading ./ or /
COMMIT = re.compile(r"[0-9a-f]{40}")
HUB_PREFIX = "hf://"


def locate_head(source: str | Path) -> Path:
    """The local folder of a head: ``source`` itself when it exists (or is not a hub id),
    else the hub cache's snapshot of that repository (fetched if needed and allowed)."""
    reference = _hub_reference(source)
    if reference is None:
        return Path(source)
    repo, revision = reference
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo, revision=revision or None,
                                        allow_patterns=list(HEAD_FILES)))
    except Exception as exc:  # the hub client raises many types; keep its message
        raise ValueHeadError(
            f"value head {source!r} is not a local folder, and fetching it from the Hugging "
            f"Face Hub failed ({type(exc).__name__}: {str(exc)[:300]}); give a folder, or a "
            f"repository id that exists (owner/name[@revision]) with the hub reachable or "
            f"the head in its cache") from None
    logger.info("value head %s: Hugging Face Hub snapshot %s", source, folder.name)
    return folder


def pin_head(source: str) -> str:
    """``source`` as every process of an engine must load it: a hub head pinned to the
    commit this process resolved (``hf://owner/name@<commit>``), so that the engine's
    workers (every tensor-parallel rank) load the files the front-end checked even when the
    repository moves on meanwhile; anything else as given."""
    reference = _hub_reference(source)
    if reference is None:
        return source
    commit = locate_head(source).name  # the hub cache's snapshots/<commit>
    if not COMMIT.fullmatch(commit):
        return source  # not the hub cache's layout: nothing to pin it to
    return f"{HUB_PREFIX}{reference[0]}@{commit}"


def _hub_reference(source: str | Path) -> tuple[str, str] | None:
    """(repository, revision) when ``source`` names a head on the hub, None for a local one
    (also a missing path, which the head loader reports); a mistyped local path whose first
    part is a local folder is an error, not a hub id."""
    explicit = isinstance(source, str) and source.startswith(HUB_PREFIX)
    if explicit:
        source = source[len(HUB_PREFIX):]
    if not explicit and (isinstance(source, Path) or _exists(Path(source))):
        return None
    repo, _, revision = str(source).partition("@")
    if not HUB_REPO.fullmatch(repo):
        if explicit:
            raise ValueHeadError(f"value head {HUB_PREFIX}{source}: not a Hugging Face Hub "
                                 "repository id (hf://owner/name[@revision])")
        return None
    if not explicit and _exists(Path(repo).parent, folder=True):
        raise ValueHeadError(
            f"value head {source!r} does not exist{_local_hint(Path(repo))}. Read as a path, "
            f"not as a Hugging Face Hub repository, because {Path(repo).parent}/ is a local "
            f"folder; for the hub repository of that name write {HUB_PREFIX}{source}")
    return repo, revision


def _exists(path: Path, folder: bool = False) -> bool:
    """``path.exists()`` (``is_dir()`` for ``folder``), where a path that cannot be looked
    at (a folder this user may not enter, a name too long) is a ValueHeadError naming it,
    not a bare OSError."""
    try:
        found = file_status(path)
    except OSError as exc:
        raise ValueHeadError(f"value head {str(path)[:300]!r} cannot be looked at "
                             f"({exc.strerror or exc})") from None
    return found is not None and (not folder or stat.S_ISDIR(found.st_mode))


def _local_hint(path: Path) -> str:
    """The nearest names to a mistyped ``path`` in its (existing) folder."""
    names = sorted(child.name for child in path.parent.iterdir() if child.is_dir())
    close = difflib.get_close_matches(path.name, names, n=3, cutoff=0.6)
    return f" (nearest in {path.parent}/: {', '.join(close)})" if close else ""
