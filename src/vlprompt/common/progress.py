"""Progress of long steps (feature extraction, training epochs, evaluation, bench runs), readable in a log file.

One helper, :class:`Progress`, used by every long step:

* on a terminal it shows a tqdm bar on stderr, as before (``bar=True``);
* whatever the terminal, it writes a progress line with counts, rate and ETA, e.g.
  ``image features: 1,280/3,264 img (39%), 5.2 img/s, ETA 6m21s``, at a steady interval: every ``interval_s``
  seconds (30), and at each further ``step_fraction`` (10 %) of the work when at least ``min_gap_s`` (5 s) have
  passed since the last line; and a last line when the step ends (``image features: 3,264/3,264 img in 10m24s,
  5.2 img/s``). Lines go to the ``vlprompt.progress`` logger at INFO (hence into a run's ``log.txt`` and, under the
  command line, to stderr), or to the ``emit`` callable given.

While a bar is shown, lines are marked with the record attribute :data:`BESIDE_BAR`, so the command line's console
handler leaves them out (the bar says the same) while ``log.txt`` still gets them. ``clock`` is injectable (tests).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("vlprompt.progress")

BESIDE_BAR = "vlprompt_beside_bar"
"""Log-record attribute set on progress lines written while a terminal bar shows the same progress."""

INTERVAL_S = 30.0
STEP_FRACTION = 0.1
MIN_GAP_S = 5.0


def stderr_is_terminal() -> bool:
    """Whether stderr is an interactive terminal (where bars are shown by default)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def format_duration(seconds: float) -> str:
    """``42s``, ``6m21s``, ``2h05m`` (``?`` when unknown)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def format_rate(count: float, seconds: float, unit: str) -> str:
    """``5.2 img/s``, or ``12.3 s/epoch`` when slower than one per second."""
    if count <= 0 or seconds <= 0:
        return f"? {unit}/s"
    rate = count / seconds
    if rate >= 1.0:
        return f"{rate:,.1f} {unit}/s"
    return f"{seconds / count:,.1f} s/{unit}"


class Progress:
    """Progress of one step of ``total`` units (see the module docstring). Use as a context manager.

    ``initial``: units already done before this call (a resumed training); the rate and ETA count only the units
    done here. ``lines=False`` writes no lines (ranks other than 0).
    """

    def __init__(self, total: int, what: str, unit: str, *, bar: bool = False, lines: bool = True, initial: int = 0,
                 interval_s: float = INTERVAL_S, step_fraction: float = STEP_FRACTION, min_gap_s: float = MIN_GAP_S,
                 clock: Callable[[], float] = time.monotonic, emit: Callable[[str], None] | None = None) -> None:
        self.total = max(0, int(total))
        self.what, self.unit = what, unit
        self.done = self.initial = int(initial)
        self.lines = lines
        self.interval_s, self.step_fraction, self.min_gap_s = interval_s, step_fraction, min_gap_s
        self.clock = clock
        self.emit = emit
        self.postfix: dict[str, Any] = {}
        self.started = self.last_line = clock()
        self.next_mark = self._mark_after(self.done)
        self.closed = False
        self._bar: Any = None
        if bar:
            from tqdm.auto import tqdm  # ~100 ms, only for a bar on a terminal (the CLI parser imports this module)

            self._bar = tqdm(total=self.total, initial=self.initial, desc=what, unit=unit, leave=False)

    # -- reporting ----------------------------------------------------------------------------------------------------
    def _mark_after(self, done: int) -> float:
        if self.total <= 0 or self.step_fraction <= 0:
            return math.inf
        step = self.step_fraction * self.total
        return (math.floor(done / step) + 1) * step

    def _write(self, text: str) -> None:
        if not self.lines:
            return
        if self.emit is not None:
            self.emit(text)
        else:
            logger.info("%s", text, extra={BESIDE_BAR: self._bar is not None})

    def _suffix(self) -> str:
        return "".join(f", {key} {value}" for key, value in self.postfix.items())

    def line(self) -> str:
        """The current progress line."""
        elapsed = self.clock() - self.started
        here = self.done - self.initial
        percent = f" ({100.0 * self.done / self.total:.0f}%)" if self.total else ""
        eta = (self.total - self.done) * elapsed / here if here > 0 else math.inf
        return (f"{self.what}: {self.done:,}/{self.total:,} {self.unit}{percent}, "
                f"{format_rate(here, elapsed, self.unit)}, ETA {format_duration(eta)}{self._suffix()}")

    def update(self, count: int = 1) -> None:
        """``count`` more units done; writes a line when one is due."""
        self.done += int(count)
        if self._bar is not None:
            self._bar.update(count)
        if self.done >= self.total:
            return  # the last line comes with close()
        now = self.clock()
        since = now - self.last_line
        if since >= self.interval_s or (self.done >= self.next_mark and since >= self.min_gap_s):
            self._write(self.line())
            self.last_line = now
            self.next_mark = self._mark_after(self.done)

    def set_postfix(self, **values: Any) -> None:
        """Values shown after the counts (on the bar and in the lines), e.g. ``loss="0.4132"``."""
        self.postfix = dict(values)
        if self._bar is not None:
            self._bar.set_postfix(refresh=False, **values)

    def close(self) -> None:
        """End the step: the bar goes, the last line is written (when any unit was done here). Idempotent."""
        if self.closed:
            return
        self.closed = True
        if self._bar is not None:
            self._bar.close()
        here = self.done - self.initial
        if here > 0:
            elapsed = self.clock() - self.started
            self._write(f"{self.what}: {self.done:,}/{self.total:,} {self.unit} in {format_duration(elapsed)}, "
                        f"{format_rate(here, elapsed, self.unit)}{self._suffix()}")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def progress(total: int, what: str, unit: str, *, show: bool | None = None, lines: bool = True, initial: int = 0,
             clock: Callable[[], float] = time.monotonic, emit: Callable[[str], None] | None = None) -> Progress:
    """A :class:`Progress` whose bar is shown when ``show`` is True, or (``show=None``) when stderr is a terminal."""
    bar = stderr_is_terminal() if show is None else bool(show)
    return Progress(total, what, unit, bar=bar, lines=lines, initial=initial, clock=clock, emit=emit)
