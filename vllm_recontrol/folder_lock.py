"""One run at a time per output folder: a second run into a folder in use is refused by name.

Why: every command resumes what its folder holds and writes each file atomically, yet two runs
at once still tread on each other: a `collect --overwrite` deletes the shards the other run is
writing, two `eval`s race on `eval.json` and interleave their judge answers, two `label`s of
one set score every shard twice. A scheduler that retries a job whose first attempt is still
running, or a second terminal, makes this easy. The lock is ``flock`` on a hidden file in the
folder: the kernel releases it when its process ends, however it ends, so a run that was
killed leaves a file that is no longer a lock, never a folder that needs cleaning by hand.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from .files import default_file_mode
from .logs import get_logger
from .training.common import DataError, FolderInUse

LOCK_PREFIX = ".vllm-recontrol"
LOCK_FILE = LOCK_PREFIX + ".lock"
LABEL_LOCK_PREFIX = LOCK_PREFIX + "-label-"
logger = get_logger(__name__)

# File systems that do not lock (some NFS and FUSE mounts) say so with these; a run there goes
# on unguarded, with a warning, rather than not at all.
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


@contextlib.contextmanager
def exclusive_folder(folder: str | Path, command: str, lock_name: str = LOCK_FILE,
                     what: str = "--out", instead: str = "use another --out") -> Iterator[Path]:
    """Hold ``folder`` (created) for this run; a folder held by a live run is a DataError
    naming that run. ``lock_name`` lets runs of several kinds share a folder (label sets).
    A folder this call created and that holds nothing but lock files at the end (a run that
    stopped before writing anything) is removed again."""
    folder = Path(folder)
    if not lock_name.startswith(LOCK_PREFIX) or not lock_name.endswith(".lock"):
        raise ValueError(f"lock files are named {LOCK_PREFIX}*.lock, got {lock_name!r}")
    fd, named, created = _acquire(folder, folder / lock_name, command, what, instead)
    try:
        if named:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"command": command, "pid": os.getpid(),
                                      "host": socket.gethostname(),
                                      "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
        yield folder
    finally:
        if named:  # emptied while still held: a free lock file names no run
            os.ftruncate(fd, 0)
            if created:
                _remove_if_only_locks(folder)
        if fd is not None:
            os.close(fd)  # releases the lock


# A lock file can be removed under a run that opened it (its holder made the folder and
# ended without writing): the run then takes the file on disk instead, a few times at most.
_ACQUIRE_ATTEMPTS = 20


def _acquire(folder: Path, path: Path, command: str, what: str,
             instead: str) -> tuple[int | None, bool, bool]:
    """(descriptor holding the lock or None, whether it may name its run, whether this call
    made the folder)."""
    for _ in range(_ACQUIRE_ATTEMPTS):
        created = _make_folder(folder, what)
        if created is None:
            continue  # the folder went away as it was looked at
        try:
            fd, writable = _open_lock_file(path)
        except FileNotFoundError:
            continue  # ... or between its making and the lock file's
        if fd is None:  # a folder this process cannot write: nothing to lock with
            logger.warning("%s: cannot create the lock file %s; nothing stops a second run "
                           "into %s meanwhile", command, path, folder)
            return None, False, False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise FolderInUse(f"{what} {folder} is in use by another run ({holder}); wait for "
                            f"it to end, stop it, or {instead}") from None
        except OSError as exc:
            if exc.errno not in _NO_LOCKS:
                os.close(fd)
                raise
            logger.warning("%s: the file system of %s cannot lock files (%s); nothing stops "
                           "a second run into it meanwhile", command, folder, exc.strerror)
            return fd, False, False
        if _is_on_disk(fd, path):
            return fd, writable, created
        os.close(fd)  # locked a file its holder had removed: take the one on disk now
    raise DataError(f"{what} {folder}: its lock file kept being removed while this run took "
                    f"it ({_ACQUIRE_ATTEMPTS} tries); {instead}")


def _make_folder(folder: Path, what: str) -> bool | None:
    """Make ``folder``: True if this call made it, False if it was there, None if it was
    there and went away as it was looked at (try again)."""
    try:
        folder.mkdir(parents=True)
        return True
    except FileExistsError:
        if folder.is_dir():
            return False
        if not folder.exists():
            return None
        raise DataError(f"{what} {folder} exists and is not a folder") from None
    except OSError as exc:
        raise DataError(f"{what} {folder} cannot be created ({exc.strerror or exc})") from None


def _is_on_disk(fd: int, path: Path) -> bool:
    """Whether the open lock file is still the one at ``path``."""
    held = os.fstat(fd)
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return False
    return (held.st_dev, held.st_ino) == (found.st_dev, found.st_ino)


def _open_lock_file(path: Path) -> tuple[int | None, bool]:
    """(descriptor, writable); None where the lock file can be neither made nor read."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, default_file_mode()), True
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
    try:  # another user's lock file in a shared folder: flock needs no write access
        return os.open(path, os.O_RDONLY), False
    except OSError:
        return None, False


def _remove_if_only_locks(folder: Path) -> None:
    """Remove ``folder`` if it holds lock files only, while the caller still holds its lock
    (a run that opened the file meanwhile and locks it after the caller ends finds it is no
    longer on disk, and takes the one on disk instead: ``_acquire``)."""
    with contextlib.suppress(OSError):
        entries = list(folder.iterdir())
        if all(is_lock_file(entry) for entry in entries):
            for entry in entries:
                entry.unlink()
            folder.rmdir()


def _holder(fd: int) -> str:
    """Who holds the lock, as its holder wrote it (it may not have written yet)."""
    try:
        facts = json.loads(os.pread(fd, 4096, 0).decode())
        return (f"`vllm-recontrol {facts['command']}`, process {facts['pid']} on "
                f"{facts['host']}, since {facts['started']}")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "a run that has not said which yet"


def label_lock_name(label_set: str) -> str:
    """The lock file of one label set, in its collection's folder (``--overwrite`` of the set
    removes the set's own folder; collect's ``--overwrite`` takes these before it deletes)."""
    return f"{LABEL_LOCK_PREFIX}{label_set}.lock"


def label_set_of(lock: Path) -> str:
    """The label set whose lock file ``lock`` is (``label_lock_name``'s inverse)."""
    return lock.name[len(LABEL_LOCK_PREFIX):-len(".lock")]


def is_lock_file(path: Path) -> bool:
    """Whether ``path`` is one of these lock files (a folder holding only one is empty)."""
    return path.name.startswith(LOCK_PREFIX) and path.name.endswith(".lock")
