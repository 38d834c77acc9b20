"""Temporary files of atomic writes, and the clean-up of those a killed writer left behind.

Every file calozoo writes atomically (campaign files, checkpoints and their index) is written to
``.<name>.<host>.<pid>[.r<random>].tmp`` in the same folder and renamed onto ``<name>`` when whole.
A SIGKILL (or a power cut) leaves the temporary file; :func:`remove_stale` removes, on the next run,
those of this host whose process is gone (a writer on another host of a shared file system, or a
live writer here, is never touched).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import socket
from pathlib import Path

__all__ = ["remove_stale", "tmp_path"]

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
