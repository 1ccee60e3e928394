"""Atomic file writes with the permissions a user expects.

Why atomic: every command is resumable and engines load value heads that training may be
rewriting, so "a file exists" must mean "the file is complete". Each file is written to a
temporary name in the same folder, flushed, then renamed (``os.replace`` is atomic on one
file system), so a killed run leaves either the old file or the new one, never half a file.

Why the mode: ``mkstemp`` and safetensors' ``save_file`` create files readable by their owner
only, so a head trained by one user could not be served by another (a shared ``/heads``
folder); files get what ``open`` would give them, 0666 less the process's umask.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


def default_file_mode() -> int:
    """0666 less the umask: the mode a plain ``open(path, "w")`` creates."""
    return 0o666 & ~current_umask()


def current_umask() -> int:
    """The process's umask, read without changing it where Linux says it (``/proc``): the
    only other way, setting it and back, leaves a window in which another thread's new
    files and folders would be world-writable."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0)  # elsewhere: set it and straight back
    os.umask(umask)
    return umask


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; rename it onto ``final`` if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp_path, default_file_mode())
        os.replace(tmp_path, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
