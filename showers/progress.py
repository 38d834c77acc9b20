"""Progress of long work, the same for every command: a bar on a terminal, plain lines in a log.

On a terminal, :func:`progress` is a tqdm bar. When its stream (stderr) is not a terminal (output
to a file, ``nohup``, a batch system, ``ray job submit``'s logs), a bar's carriage-return frames
would fill the log (11 000 frames in a 41-minute training) and a job that updates nothing for
minutes would say nothing: there it prints a plain line instead, each time the work has advanced by
another ``step`` (5 %), and every ``every`` seconds (30) also while nothing advances, with what is
done, the rate and the time left, e.g.::

    train par04_vae: 4,000/20,000 it (20 %), 8.2 it/s, 8 min 5 s elapsed, ETA 32 min 31 s
"""

from __future__ import annotations

import sys
import threading
import time
import weakref

__all__ = ["LogProgress", "progress", "track"]


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h} h {m} min"
    return f"{m} min {s} s" if m else f"{s} s"


class LogProgress:
    """tqdm's interface (``update``, ``n``, ``set_postfix``, ``close``, a context manager) as plain
    lines at a modest interval: see the module docstring."""

    def __init__(self, total: int | None, desc: str = "", unit: str = "it", initial: int = 0, stream=None,
                 every: float = 30.0, step: float = 0.05, min_gap: float = 1.0):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self.start = initial
        self.stream = stream if stream is not None else sys.stderr
        self.every, self.step, self.min_gap = every, step, min_gap
        self.t0 = self.last = time.monotonic()
        self.mark = self._fraction()
        self.postfix = ""
        self.closed = False
        # a line every `every` seconds even while nothing advances (one long region, one slow step); the
        # thread holds the display weakly, so one left unclosed by an exception stops with it
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=_tick, args=(weakref.ref(self), self._stop, every / 2),
                                        name="calozoo-progress", daemon=True)
        self._ticker.start()

    def _fraction(self) -> float:
        return self.n / self.total if self.total else 0.0

    def _line(self, now: float, done: bool = False) -> str:
        elapsed = now - self.t0
        rate = (self.n - self.start) / elapsed if elapsed > 0 else 0.0
        head = f"{self.desc}: " if self.desc else ""
        if self.total:
            what = f"{self.n:,}/{self.total:,} {self.unit} ({100 * self._fraction():.0f} %)"
        else:
            what = f"{self.n:,} {self.unit}"
        text = f"{head}{what}, {rate:.3g} {self.unit}/s, {_duration(elapsed)} elapsed"
        if done:
            text += ", done"
        elif self.total and rate > 0:
            text += f", ETA {_duration((self.total - self.n) / rate)}"
        return text + (f" ({self.postfix})" if self.postfix else "")

    def _say(self, text: str) -> None:
        try:
            print(text, file=self.stream, flush=True)
        except (OSError, ValueError):  # a closed or full log: progress is a courtesy
            pass

    def refresh(self) -> None:
        """Print a line if the work has advanced by ``step`` since the last one, or ``every`` seconds
        have passed."""
        if self.closed:
            return
        now = time.monotonic()
        if now - self.last < self.min_gap:
            return
        if now - self.last >= self.every or (self.total and self._fraction() >= self.mark + self.step):
            self.last, self.mark = now, self._fraction()
            self._say(self._line(now))

    def update(self, k: int = 1) -> None:
        self.n += k
        self.refresh()

    def set_postfix(self, values=None, refresh: bool = True, **kw) -> None:
        values = {**(values or {}), **kw}
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._stop.set()
            if self.n > self.start:
                self._say(self._line(time.monotonic(), done=self.total is not None and self.n >= self.total))

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False


def _tick(ref, stop: threading.Event, period: float) -> None:
    while not stop.wait(period):
        display = ref()
        if display is None:
            return
        display.refresh()
        del display


class _Silent:
    n = 0

    def update(self, k: int = 1) -> None:
        self.n += k

    def set_postfix(self, *a, **kw) -> None:
        pass

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return False


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def progress(total: int | None, desc: str = "", unit: str = "it", *, initial: int = 0, disable: bool = False,
             stream=None, every: float = 30.0, step: float = 0.05):
    """A progress display of ``total`` units: a tqdm bar when ``stream`` (default stderr) is a terminal,
    else a :class:`LogProgress` (plain lines every ``step`` of the work and at least every ``every``
    seconds); nothing with ``disable``. Use it as a context manager, or ``close()`` it."""
    stream = stream if stream is not None else sys.stderr
    if disable:
        return _Silent()
    if _is_terminal(stream):
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=stream)
    return LogProgress(total, desc, unit, initial=initial, stream=stream, every=every, step=step)


def track(iterable, total: int | None = None, desc: str = "", unit: str = "it", *, disable: bool = False, stream=None):
    """The items of ``iterable``, with :func:`progress` over them (``total``: its length by default)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    with progress(total, desc, unit, disable=disable, stream=stream) as bar:
        for item in iterable:
            yield item
            bar.update(1)
