"""One writer per run: an OS lock held for as long as a command writes a run's files.

Each command that writes into a run folder (detect, ablate, specificity, rescore, merge) holds an exclusive
`flock` on a hidden file `.NAME.lock` beside the files it writes (NAME: the run's prefix, e.g.
`organism_retrieval`, or `organism_retrieval.shard-0-of-4` for a shard), which holds the writer's pid. A
second writer is refused in one line naming that pid. The kernel drops the lock of a process that dies, even
by SIGKILL, so a lock file left by a killed run is simply taken over. The file is removed on release; a
process that locked a file just removed by its holder sees it is no longer the file at that path and tries
again, so two writers can never both hold "the" lock.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path

from ..errors import HeadscopeError


@contextlib.contextmanager
def writer_lock(folder: str | Path, name: str):
    """Hold the lock of run `name` in `folder` (created if missing; removed again if it is left empty)."""
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f".{name}.lock"
    handle = _acquire(path, name)
    try:
        os.ftruncate(handle, 0)
        os.write(handle, f"{os.getpid()}\n".encode())
        yield path
    finally:
        os.unlink(path)  # while still holding it: see the module's docstring
        os.close(handle)
        if created and not any(folder.iterdir()):  # a refused run leaves no folder behind
            folder.rmdir()


@contextlib.contextmanager
def writer_locks(folder: str | Path, names):
    """The locks of several runs in one folder (one per scorer of a detect)."""
    with contextlib.ExitStack() as stack:
        for name in sorted(set(names)):
            stack.enter_context(writer_lock(folder, name))
        yield


def _acquire(path: Path, name: str) -> int:
    while True:
        try:
            handle = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise HeadscopeError(f"{path} is a symbolic link: headscope does not follow links in a run "
                                     "folder") from None
            raise
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(handle, 32).decode(errors="replace").strip() or "unknown"
            os.close(handle)
            raise HeadscopeError(f"{path.parent} is being written by another headscope process (pid {holder}) "
                                 f"for run {name}: wait for it to finish, or use another --out") from None
        if _still_at(path, handle):
            return handle
        os.close(handle)  # the holder removed it between our open and our lock: lock the current file


def _still_at(path: Path, handle: int) -> bool:
    try:
        here = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(handle)
    return (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)


def holder(folder: str | Path, name: str) -> str | None:
    """The pid of the process writing run `name` in `folder` now, None when no one is: a reader's probe (report),
    which creates no lock file and holds no lock."""
    path = Path(folder) / f".{name}.lock"
    try:
        handle = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:  # no lock file (no writer), or a link: nothing headscope holds
        return None
    try:
        fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.read(handle, 32).decode(errors="replace").strip() or "unknown"
    finally:
        os.close(handle)  # closing drops the probe's shared lock, if it got one
    return None
