"""Progress bars: tqdm's live bar on a terminal; in a log file (stream not a TTY) a plain line now and then.

tqdm redraws its bar with carriage returns, which a log file keeps as one endless line. `progress_bar` gives
the same tqdm object on a terminal; otherwise a tqdm subclass that writes a short line per report, at most
one per `log_seconds` and only after another tenth of the total (tqdm's own `mininterval` / `miniters`), and
a last line when the bar closes (with leave=True). A run shorter than `log_seconds` writes nothing."""
from __future__ import annotations

import math
import sys
from typing import Any, Iterable, Optional, TextIO

from tqdm import tqdm

LOG_SECONDS = 30.0        # at most one line per this many seconds in a log
LOG_FRACTION = 0.1        # and only after another tenth of the total


class _LogBar(tqdm):
    """A tqdm bar that writes whole lines (no carriage returns, no cursor moves)."""

    def __init__(self, *args: Any, **kwargs: Any):
        self._logged_n: Optional[float] = None
        super().__init__(*args, **kwargs)

    def display(self, msg: Optional[str] = None, pos: Optional[int] = None) -> bool:
        if msg == "":
            return False  # tqdm clears a bar with an empty message: a log keeps its lines
        closing = self.disable  # close() sets disable before its last display and ends that line itself
        start = getattr(self, "start_t", None)  # unset in __init__'s first draw (made only when delay <= 0)
        if not closing and (self.n == self._logged_n or (start is not None and self._time() < start + self.delay)):
            return False  # nothing new (e.g. the redraw after tqdm.write), or still inside the quiet start
        if not closing and self.leave and self.total and self.n >= self.total:
            return False  # close() writes the last line
        self._logged_n = self.n
        self.fp.write(self.__str__() + ("" if closing else "\n"))
        self.fp.flush()
        return True

    def clear(self, nolock: bool = False) -> None:
        """Nothing to erase in a log."""

    def moveto(self, n: int) -> None:
        """No cursor in a log."""


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def progress_bar(iterable: Optional[Iterable[Any]] = None, *, total: Optional[float] = None, desc: str = "",
                 unit: str = "it", disable: bool = False, initial: float = 0, leave: bool = True,
                 file: Optional[TextIO] = None, log_seconds: float = LOG_SECONDS) -> tqdm:
    """A tqdm progress bar over `iterable` (or updated by hand up to `total`) on `file` (default stderr).

    On a terminal: tqdm's live bar. Otherwise (a log file, a pipe, a captured stream): a line like
    `desc: 40/200 (20%) 00:12<00:48, 3.31it/s` at most every `log_seconds`, after every further tenth of
    the total, plus a last line on close when `leave`. disable=True: no output at all."""
    stream = sys.stderr if file is None else file
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if disable or _is_tty(stream):
        return tqdm(iterable, total=total, desc=desc or None, unit=unit, disable=disable, initial=initial,
                    leave=leave, file=stream, dynamic_ncols=True)
    head = "{desc}: " if desc else ""
    if total:
        fmt = head + "{n_fmt}/{total_fmt} ({percentage:.0f}%) {elapsed}<{remaining}, {rate_fmt}{postfix}"
        miniters = max(1, math.ceil(total * LOG_FRACTION))
    else:
        fmt, miniters = head + "{n_fmt} {unit} {elapsed}, {rate_fmt}{postfix}", 1
    return _LogBar(iterable, total=total, desc=desc or None, unit=unit, initial=initial, leave=leave, file=stream,
                   bar_format=fmt, mininterval=log_seconds, delay=log_seconds, miniters=miniters,
                   maxinterval=max(10 * log_seconds, 1.0))
