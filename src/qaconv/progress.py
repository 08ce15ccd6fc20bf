"""Progress of long loops, the same everywhere in the package: :func:`progress_bar`.

* stderr is a terminal (or the code runs in a Jupyter kernel): a tqdm bar.
* stderr is a file or a pipe (a log, a batch job): plain lines, at most one every :data:`INTERVAL` seconds
  (or ``QACONV_PROGRESS_INTERVAL``),
  plus a final line, e.g. ``indexing: 1200/6088 images (19.7%), 156 images/s, 38 s left`` (no carriage
  returns). A bar made with ``leave=False`` (an inner step) writes its final line only when it ran long enough
  to write a progress line.
* Nothing at all with :func:`set_quiet` (``qaconv --quiet``) or the environment variable ``TQDM_DISABLE=1``
  (tqdm's own switch, honoured here for both kinds).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator

INTERVAL = 5.0  # seconds between two plain progress lines (environment: QACONV_PROGRESS_INTERVAL)
UNITS = {"img": "images", "it": "steps"}  # tqdm's short units, spelt out in plain lines

_quiet = False


def set_quiet(quiet: bool = True) -> bool:
    """Turn every progress display of this process off (``quiet=True``) or back on; returns the old setting."""
    global _quiet
    old, _quiet = _quiet, bool(quiet)
    return old


def disabled() -> bool:
    """True when progress is off for this process: :func:`set_quiet`, or ``TQDM_DISABLE`` set to a true value
    (anything but empty, 0, false, no, off)."""
    env = os.environ.get("TQDM_DISABLE", "").strip().lower()
    return _quiet or env not in ("", "0", "false", "no", "off")


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
        disable: bool = False, leave: bool = True):
    """A progress display over ``iterable`` (iterate over the result) or one driven by ``update(n)``; both kinds
    also have ``set_postfix(**values)``, ``close()`` and work as context managers. ``total`` defaults to
    ``len(iterable)`` when it has one; ``unit`` is what is counted (``img`` for images)."""
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if disable or disabled():
        return Lines(iterable, total=total, desc=desc, unit=unit, leave=leave, stream=None)
    if _terminal(sys.stderr):
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave)
    return Lines(iterable, total=total, desc=desc, unit=unit, leave=leave, interval=interval())


def interval() -> float:
    """Seconds between plain progress lines: ``QACONV_PROGRESS_INTERVAL`` when it is a number >= 0, else
    :data:`INTERVAL`."""
    try:
        value = float(os.environ.get("QACONV_PROGRESS_INTERVAL", INTERVAL))
    except ValueError:
        return INTERVAL
    return value if 0 <= value < float("inf") else INTERVAL


def _terminal(stream) -> bool:
    try:
        if stream.isatty():
            return True
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
    ipython = sys.modules.get("IPython")  # a Jupyter kernel: tqdm.auto draws a widget there (as tqdm.autonotebook)
    try:
        return "IPKernelApp" in ipython.get_ipython().config
    except Exception:
        return False


class Lines:
    """Plain progress lines on ``stream`` (default: stderr at creation; ``None``: silent). ``clock`` is for tests."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "",
                 unit: str = "it", leave: bool = True, stream="stderr", interval: float = INTERVAL,
                 clock=time.monotonic):
        self.iterable, self.total, self.desc, self.leave = iterable, total, desc, leave
        self.unit = UNITS.get(unit, unit)
        self.stream = sys.stderr if stream == "stderr" else stream
        self.interval, self.clock = interval, clock
        self.n, self.postfix, self.printed, self.closed = 0, "", 0, False
        self.start = self.last = clock()

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return self.total if self.total is not None else len(self.iterable)

    def __enter__(self) -> Lines:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.stream is not None and not self.closed:
            now = self.clock()
            if now - self.last >= self.interval:
                self._write(now, final=False)

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.stream is not None and (self.printed or (self.leave and self.n)):
            self._write(self.clock(), final=True)

    def line(self, now: float, final: bool = False) -> str:
        """The text of one progress line at time ``now``."""
        elapsed = max(now - self.start, 1e-9)
        rate = self.n / elapsed
        unit, head = self.unit, f"{self.desc}: " if self.desc else ""
        count = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        parts = [f"{head}{count} {unit}"]
        if self.total and not final:
            parts[0] += f" ({100 * self.n / self.total:.1f}%)"
        parts.append(f"{_rate(rate)} {unit}/s")
        if final:
            parts.append(f"done in {_duration(elapsed)}")
        elif self.total and rate > 0 and self.n < self.total:
            parts.append(f"{_duration((self.total - self.n) / rate)} left")
        if self.postfix:
            parts.append(self.postfix)
        return ", ".join(parts)

    def _write(self, now: float, final: bool) -> None:
        self.last = now
        self.printed += 1
        try:
            self.stream.write(self.line(now, final) + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed or broken log must not stop the work
            self.stream = None


def _rate(rate: float) -> str:
    return f"{rate:.0f}" if rate >= 100 else f"{rate:.1f}" if rate >= 1 else f"{rate:.2f}"


def _duration(seconds: float) -> str:
    s = round(seconds)
    if s < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"
