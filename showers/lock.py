"""One writer per run folder: an exclusive lock on ``FOLDER/calozoo.lock``.

Two processes writing into one run folder (two ``calozoo train -o SAME``, a fleet and a train into
one region's folder, two sweeps into one sweep folder) would mix their checkpoints, their index and
their logs. So every writer of a folder holds :func:`writer_lock` on it for as long as it writes, and
a second one is refused at once with :class:`FolderBusyError`, one line naming the folder and the
holder's pid and host.

The lock is ``fcntl.flock`` on the lock file: the kernel releases it when its holder exits, however
it exits, so a lock left by a killed process is simply taken by the next writer (the file stays, with
the dead holder's pid in it, until then). A holder removes the file when it lets go. Within one
process the lock is re-entrant (the CLI takes it before it starts tracking a run, the training loop
again inside), and it is never inherited by the processes it starts (``O_CLOEXEC``).

On a shared file system the lock is only as good as the file system's ``flock`` (NFS v4 and Lustre
honour it across hosts; some FUSE systems do not): the pid and host in the file say who holds it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import threading
from pathlib import Path

__all__ = ["LOCK_FILE", "FolderBusyError", "holds_lock", "writer_lock"]

LOCK_FILE = "calozoo.lock"

_HELD: dict[str, list] = {}  # realpath of the folder -> [fd, depth]
_MUTEX = threading.Lock()


class FolderBusyError(RuntimeError):
    """Another process is writing into the folder (its pid and host are in the message)."""


def _key(folder: Path) -> str:
    return os.path.realpath(folder)


def holds_lock(folder) -> bool:
    """True if this process holds the writer lock of ``folder``."""
    with _MUTEX:
        return _key(Path(folder)) in _HELD


def _holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        words = os.read(fd, 200).decode(errors="replace").split()
    except OSError:
        words = []
    if len(words) >= 2 and words[0].isdigit():
        return f"pid {words[0]} on {words[1]}"
    return "a process that has not written its pid yet"


def _acquire(folder: Path, what: str) -> int:
    path = folder / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _holder(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise FolderBusyError(f"{folder} is in use: another calozoo process ({holder}) is writing into it "
                                  f"({path}); one writer per {what}: wait for it to end, or write elsewhere "
                                  "(-o)") from None
        try:  # the holder before us may have removed the file between our open and our lock: lock the new one
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
    return fd


@contextlib.contextmanager
def writer_lock(folder, what: str = "run folder"):
    """Hold the writer lock of ``folder`` (created if missing) for the ``with`` block; raise
    :class:`FolderBusyError` at once if another process holds it. Re-entrant within a process."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = _key(folder)
    with _MUTEX:
        entry = _HELD.get(key)
        if entry is not None:
            entry[1] += 1
        else:
            _HELD[key] = [_acquire(folder, what), 1]
    try:
        yield folder
    finally:
        with _MUTEX:
            entry = _HELD[key]
            entry[1] -= 1
            if entry[1] == 0:
                del _HELD[key]
                with contextlib.suppress(OSError):
                    os.unlink(folder / LOCK_FILE)  # while still holding it: see _acquire
                os.close(entry[0])
