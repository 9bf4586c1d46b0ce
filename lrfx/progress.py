"""Progress for long work: bars on a terminal, periodic lines elsewhere, INFO logs always.

Every step of a call that can take more than a second (capture, shape propagation, calibration
statistics, spectra, allocation, the rewrite, BN recalibration, export) runs inside :func:`step`
and, when it loops, :func:`progress_bar`:

* with ``progress=True`` on a terminal, a transient bar (rich) per loop and one line per finished
  step on stderr;
* with ``progress=True`` off a terminal (CI logs, ``nohup``, notebooks' captured stderr), plain
  lines: ``lrfx: spectra 12/53 (4.1 s)`` at most every :data:`INTERVAL` seconds and when a loop
  ends, and ``lrfx: spectra done in 9.8 s`` per step;
* always, INFO records on the ``lrfx`` loggers (``logging.basicConfig(level=logging.INFO)`` or
  ``lrfx -v`` shows them), whatever ``progress`` says.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterator

__all__ = ["INTERVAL", "QUIET", "progress_bar", "step"]

log = logging.getLogger("lrfx.progress")


class _Stderr(logging.Handler):
    """Writes records to the stderr of the moment (tests and notebooks swap ``sys.stderr``)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # a closed stream must not break the work
            self.handleError(record)


#: The progress lines asked for with ``progress=True`` off a terminal: a logger of their own,
#: shown on stderr whatever the logging configuration (the INFO records of ``log`` are the
#: configurable channel); ``logging.getLogger("lrfx.progress.display").disabled = True``
#: silences them.
display = logging.getLogger("lrfx.progress.display")
display.propagate = False
display.setLevel(logging.INFO)
_handler = _Stderr()
_handler.setFormatter(logging.Formatter("lrfx: %(message)s"))
display.addHandler(_handler)

#: Seconds between two progress lines when stderr is not a terminal.
INTERVAL = 5.0

#: Steps quicker than this (seconds) print no line (they are still logged at INFO).
QUIET = 0.5


def _tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _line(text: str) -> None:
    display.info("%s", text)


@contextlib.contextmanager
def step(label: str, progress: bool = False, enabled: bool = True) -> Iterator[None]:
    """Time one step: an INFO record when it starts and ends, a line on stderr at the end when
    ``progress`` is on and it took :data:`QUIET` seconds or more (nothing at all when
    ``enabled`` is false).

    Example:
        >>> with step("allocation"):
        ...     pass
    """
    if not enabled:
        yield
        return
    log.info("%s ...", label)
    t0 = time.perf_counter()
    yield
    seconds = time.perf_counter() - t0
    log.info("%s done in %.2f s", label, seconds)
    if progress and seconds >= QUIET:
        _line(f"{label} done in {seconds:.1f} s")


@contextlib.contextmanager
def progress_bar(label: str, total: int, enabled: bool = True) -> Iterator[Callable[[], None]]:
    """Yield an ``advance()`` callable; shows progress on stderr when enabled (a bar on a
    terminal, periodic lines elsewhere).

    Example:
        >>> with progress_bar("work", total=2, enabled=False) as advance:
        ...     advance(); advance()
    """
    if not enabled or total <= 0:
        yield lambda: None
        return
    if not _tty():
        t0 = last = time.perf_counter()
        done = 0

        def advance() -> None:
            nonlocal done, last
            done += 1
            now = time.perf_counter()
            if now - last >= INTERVAL and done < total:
                last = now
                _line(f"{label} {done}/{total} ({now - t0:.1f} s)")

        yield advance
        seconds = time.perf_counter() - t0
        if seconds >= QUIET:
            _line(f"{label} {done}/{total} ({seconds:.1f} s)")
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=total)
        yield lambda: bar.advance(task)
