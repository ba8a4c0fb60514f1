"""Progress of long work, for people watching a terminal and for logs.

`Progress` shows a rich bar (with rate and ETA) when stderr is a terminal, and plain lines at most every
`interval` seconds when it is not (a redirected or CI run is never silent for minutes), or nothing when disabled.
The library creates one only when asked (`progress=True` in its settings, which the CLI sets); a notebook or
script that wants none gets none.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

PLAIN_INTERVAL = 10.0  # seconds between plain lines when stderr is not a terminal (EMBEDFIT_PROGRESS_INTERVAL)


class Progress:
    """Counts steps of one piece of work and shows them.

    Args:
        description: What is being done, e.g. "embedding" or "fitting logreg".
        total: Steps expected (None when unknown).
        enabled: Show anything at all.
        unit: Name of one step in plain lines ("images", "folds").
        interval: Seconds between plain lines (default: $EMBEDFIT_PROGRESS_INTERVAL, else `PLAIN_INTERVAL`).
        stream: Where to write (default: sys.stderr at the time of writing).
    """

    def __init__(self, description: str, total: int | None, *, enabled: bool = True, unit: str = "",
                 interval: float | None = None, stream: TextIO | None = None) -> None:
        self.description, self.total, self.unit = description, total, unit
        self.enabled = enabled and (total is None or total > 0)
        self.interval = float(os.environ.get("EMBEDFIT_PROGRESS_INTERVAL", PLAIN_INTERVAL)) if interval is None \
            else interval
        self._stream = stream
        self.done = 0
        self.status = ""
        self._start = self._last = time.perf_counter()
        self._bar: Any = None
        if self.enabled and self.stream.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TaskProgressColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import (
                Progress as RichProgress,
            )

            self._bar = RichProgress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TaskProgressColumn(), TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                                     TextColumn("eta"), TimeRemainingColumn(), transient=True,
                                     console=Console(file=self.stream))
            self._task = self._bar.add_task(description, total=total, status="")
            self._bar.start()

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stderr

    def advance(self, n: int = 1, status: str = "") -> None:
        """`n` more steps done; `status` is a short note shown beside the count (e.g. "12.3 img/s")."""
        self.done += n
        self.status = status or self.status
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, advance=n, status=self.status)
            return
        now = time.perf_counter()
        if now - self._last >= self.interval:
            self._last = now
            self._line(now)

    def _line(self, now: float) -> None:
        of = f"/{self.total}" if self.total is not None else ""
        unit = f" {self.unit}" if self.unit else ""
        status = f", {self.status}" if self.status else ""
        print(f"{self.description}: {self.done}{of}{unit} in {now - self._start:.0f} s{status}", file=self.stream,
              flush=True)

    def close(self) -> None:
        """Stop the bar (a plain run ends without a line: the command prints its summary next)."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        self.enabled = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
