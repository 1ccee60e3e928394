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
from pathlib import Path

from .errors import ValueHeadError
from .logs import get_logger

logger = get_logger(__name__)

HEAD_FILES = ("config.json", "model.safetensors")
HUB_REPO = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name, no leading ./ or /


HUB_PREFIX = "hf://"


def locate_head(source: str | Path) -> Path:
    """The local folder of a head: ``source`` itself when it exists (or is not a hub id),
    else the hub cache's snapshot of that repository (fetched if needed and allowed)."""
    explicit = isinstance(source, str) and source.startswith(HUB_PREFIX)
    if explicit:
        source = source[len(HUB_PREFIX):]
    path = Path(source)
    if not explicit and (path.exists() or isinstance(source, Path)):
        return path
    repo, _, revision = str(source).partition("@")
    if not HUB_REPO.fullmatch(repo):
        if explicit:
            raise ValueHeadError(f"value head {HUB_PREFIX}{source}: not a Hugging Face Hub "
                                 "repository id (hf://owner/name[@revision])")
        return path  # a missing local path: the head loader says so
    if not explicit and Path(repo).parent.is_dir():
        raise ValueHeadError(
            f"value head {source!r} does not exist{_local_hint(Path(repo))}. Read as a path, "
            f"not as a Hugging Face Hub repository, because {Path(repo).parent}/ is a local "
            f"folder; for the hub repository of that name write {HUB_PREFIX}{source}")
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


def _local_hint(path: Path) -> str:
    """The nearest names to a mistyped ``path`` in its (existing) folder."""
    names = sorted(child.name for child in path.parent.iterdir() if child.is_dir())
    close = difflib.get_close_matches(path.name, names, n=3, cutoff=0.6)
    return f" (nearest in {path.parent}/: {', '.join(close)})" if close else ""
