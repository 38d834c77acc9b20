"""Temporary files of atomic writes, and the clean-up of those a killed writer left behind.

Every file calozoo writes atomically (campaign files, checkpoints and their index) is written to
``.<name>.<host>.<pid>[.r<random>].tmp`` in the same folder and renamed onto ``<name>`` when whole.
A SIGKILL (or a power cut) leaves the temporary file; :func:`remove_stale` removes, on the next run,
those of this host whose process is gone (a writer on another host of a shared file system, or a
live writer here, is never touched). Libraries that write through a file object (libhdf5, ``torch.save``)
write through a :class:`GuardedFile`, which keeps a full disk from them and lets the writer name it.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import socket
from pathlib import Path

__all__ = ["GuardedFile", "remove_stale", "tmp_path"]

log = logging.getLogger("calozoo.showers")

_TMP = re.compile(r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>\d+)(?:\.r[0-9a-f]+)?\.tmp$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", socket.gethostname()) or "localhost"


def tmp_path(path, unique: bool = True) -> Path:
    """The temporary name under which ``path`` is written (same folder: the rename is atomic)."""
    path = Path(path)
    tail = f".r{secrets.token_hex(4)}" if unique else ""
    return path.with_name(f".{path.name}.{_host()}.{os.getpid()}{tail}.tmp")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale(directory, name_glob: str = "*") -> list[Path]:
    """Remove the temporary files in ``directory`` of targets matching ``name_glob`` that a writer
    of this host left when it was killed (its process is gone). Returns what was removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed, host = [], _host()
    for tmp in directory.glob(f".{name_glob}.tmp"):
        m = _TMP.match(tmp.name)
        if m is None or m["host"] != host or _alive(int(m["pid"])):
            continue
        try:
            if tmp.is_dir():
                continue
            tmp.unlink()
            removed.append(tmp)
        except OSError:  # removed meanwhile, or not ours to remove
            continue
    if removed:
        log.warning("removed %d temporary file(s) a killed writer left in %s: %s", len(removed), directory,
                    ", ".join(p.name for p in removed[:5]))
    return removed


class GuardedFile:
    """A binary file for a library that writes through a file object (h5py's ``fileobj`` driver,
    ``torch.save``) and handles the operating system's refusals badly: what the system refuses (a
    full disk, a quota, an I/O error) is recorded in ``error`` and not passed on (the library goes on
    writing into nothing), so the caller can raise it itself, naming the file, once the library
    returns. ``torch.save`` reports a full disk as "[enforce fail at inline_container.cc] unexpected
    pos", without the path or the cause; libhdf5 crashes (see ``showers.formats.CaloChallengeWriter``).

    ``raw``: an unbuffered file (``open(path, mode, buffering=0)``), so that each write reaches the
    system here (a buffered one would report a refusal later, at a seek or a read)."""

    def __init__(self, raw):
        self._raw = raw
        self.error: OSError | None = None

    def _guard(self, op, *args, fallback=None):
        if self.error is None:
            try:
                return op(*args)
            except OSError as exc:
                self.error = exc
        return fallback

    def _write_all(self, data) -> int:
        view = memoryview(data).cast("B")
        total = len(view)
        while view:
            n = self._raw.write(view)
            if not n:
                raise OSError(errno.EIO, "the file system accepted no bytes of a write")
            view = view[n:]
        return total

    def write(self, data) -> int:
        return self._guard(self._write_all, data, fallback=memoryview(data).nbytes)

    def truncate(self, size=None) -> int:
        return self._guard(self._raw.truncate, size, fallback=size)

    def flush(self) -> None:
        self._guard(self._raw.flush)

    def sync(self) -> None:
        """Flush and ``fsync``: a file system that reports a full disk late (NFS, delayed allocation)
        reports it here."""
        self.flush()
        self._guard(os.fsync, self._raw.fileno())

    def read(self, size=-1) -> bytes:
        return self._guard(self._raw.read, size, fallback=b"")

    def readinto(self, buffer) -> int:
        return self._guard(self._raw.readinto, buffer, fallback=0)

    def seek(self, offset, whence=0) -> int:
        return self._guard(self._raw.seek, offset, whence, fallback=offset)

    def tell(self) -> int:
        return self._raw.tell()

    def close(self) -> None:
        try:
            self._raw.close()
        except OSError as exc:
            self.error = self.error or exc
