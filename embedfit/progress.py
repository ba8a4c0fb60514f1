"""Progress of long work: one event type, one callback name, one sink that shows it.

Every long function (`extract`, `fit`, `train`, `compare`, `sweep`, `build_report`) takes `on_progress`, an
`OnProgress`: a callable that receives `ProgressEvent`s. `Progress` counts the steps of one piece of work (images,
folds, batches of an epoch, report sections) and sends an event per step; `note` sends a milestone ("split 2/3:
linear probe"); `within` prefixes the events of an inner piece of work with where it runs.

`StderrSink` is the one place that shows them (the CLI uses it for every command; `progress=True` in a settings
object means this sink): a live line on a terminal, otherwise each milestone plus a plain line at most every
`interval` seconds, with the time left wherever the total is known. A heartbeat thread repeats the latest state
when nothing was shown for `interval` seconds, so even one long step (a fold, a first epoch's batch) is never
silent for longer. Nothing is shown unless asked: a notebook or script without a callback gets no output.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TextIO

PLAIN_INTERVAL = 10.0  # seconds between plain lines when stderr is not a terminal (EMBEDFIT_PROGRESS_INTERVAL)


@dataclass(frozen=True)
class ProgressEvent:
    """One report on a piece of work.

    Attributes:
        what: The work, with where it runs ("embedding", "fitting logreg", "split 1/3: fine-tune: epoch 2/3").
        done: Steps done so far.
        total: Steps expected (None when unknown).
        unit: Name of one step ("images", "folds", "batches").
        seconds: Seconds since this piece of work started.
        status: A short note beside the count ("12.3 img/s", "refitting on all images").
        kind: "step" (a count moved), "end" (the work finished) or "note" (a milestone: `what` says it all).
    """

    what: str
    done: int = 0
    total: int | None = None
    unit: str = ""
    seconds: float = 0.0
    status: str = ""
    kind: str = "step"

    @property
    def seconds_left(self) -> float | None:
        """Time left at the rate so far, when the total is known and a step is done; else None."""
        if self.total is None or self.done <= 0 or self.kind == "note":
            return None
        return max(0.0, self.seconds / self.done * (self.total - self.done))

    def line(self) -> str:
        """The event as one plain line: "embedding: 40/120 images in 12 s, 3.3 img/s, about 24 s left"."""
        if self.kind == "note":
            return self.what
        of = f"/{self.total}" if self.total is not None else ""
        unit = f" {self.unit}" if self.unit else ""
        status = f", {self.status}" if self.status else ""
        left = self.seconds_left
        eta = f", about {duration(left)} left" if left is not None and self.done < (self.total or 0) else ""
        return f"{self.what}: {self.done}{of}{unit} in {duration(self.seconds)}{status}{eta}"


OnProgress = Callable[[ProgressEvent], None]
"""The one type of a progress callback: every long function takes one as `on_progress`."""


def duration(seconds: float) -> str:
    """Seconds as a person reads them: "42 s", "12 min", "1.5 h"."""
    if seconds < 100:
        return f"{seconds:.0f} s"
    if seconds < 6000:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def note(on_progress: OnProgress | None, what: str) -> None:
    """Send a milestone ("decoding data/", "split 2/3: linear probe") to `on_progress`, if there is one."""
    if on_progress is not None:
        on_progress(ProgressEvent(what, kind="note"))


def within(on_progress: OnProgress | None, where: str) -> OnProgress | None:
    """`on_progress` for an inner piece of work: its events' `what` starts with `where` ("split 1/3: fine-tune")."""
    if on_progress is None:
        return None
    outer = on_progress

    def prefixed(event: ProgressEvent) -> None:
        outer(dataclasses.replace(event, what=f"{where}: {event.what}"))
    return prefixed


class Progress:
    """Counts steps of one piece of work and sends each to `on_progress` (nothing when it is None).

    Args:
        what: What is being done, e.g. "embedding" or "fitting logreg".
        total: Steps expected (None when unknown).
        unit: Name of one step ("images", "folds").
        on_progress: Where the events go.
    """

    def __init__(self, what: str, total: int | None, *, unit: str = "",
                 on_progress: OnProgress | None = None) -> None:
        self.what, self.total, self.unit = what, total, unit
        self.on_progress = on_progress
        self.done = 0
        self.status = ""
        self._start = time.perf_counter()
        self._closed = False
        self._send("step")  # the work started: a sink knows what is running before the first step ends

    def _send(self, kind: str) -> None:
        if self.on_progress is not None:
            self.on_progress(ProgressEvent(self.what, self.done, self.total, self.unit,
                                           time.perf_counter() - self._start, self.status, kind))

    def advance(self, n: int = 1, status: str = "") -> None:
        """`n` more steps done; `status` is a short note shown beside the count (e.g. "12.3 img/s")."""
        self.done += n
        self.status = status or self.status
        self._send("step")

    def close(self) -> None:
        """The work finished (or stopped): one "end" event."""
        if not self._closed:
            self._closed = True
            self._send("end")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def default_interval() -> float:
    """Seconds between plain lines and heartbeats: $EMBEDFIT_PROGRESS_INTERVAL, else `PLAIN_INTERVAL`."""
    return float(os.environ.get("EMBEDFIT_PROGRESS_INTERVAL", PLAIN_INTERVAL))


class StderrSink:
    """Shows progress events on stderr: the one sink of every command.

    On a terminal, a live status line (milestones printed above it); otherwise every milestone, and the latest
    count at most every `interval` seconds with the time left. A heartbeat thread repeats the latest count (its
    time updated) whenever nothing was shown for `interval` seconds, until the sink is closed.

    Args:
        interval: Seconds between plain lines and heartbeats (default: `default_interval()`).
        stream: Where to write (default: sys.stderr at the time of writing).
        live: A live line instead of plain lines (default: whether `stream` is a terminal).
    """

    def __init__(self, *, interval: float | None = None, stream: TextIO | None = None,
                 live: bool | None = None) -> None:
        self.interval = default_interval() if interval is None else interval
        self._stream = stream
        self.live = self.stream.isatty() if live is None else live
        self._lock = threading.Lock()
        self._latest: tuple[ProgressEvent, float] | None = None  # the last count and when it came
        self._last_shown = time.monotonic()  # a quick command says nothing but its milestones
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._status: Any = None
        self._console: Any = None

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stderr

    def __call__(self, event: ProgressEvent) -> None:
        with self._lock:
            now = time.monotonic()
            if self._thread is None and not self._stop.is_set():
                self._start()
            if event.kind == "note":
                self._print(event.line())
                return
            self._latest = None if event.kind == "end" else (event, now)
            if self._status is not None:
                self._status.update(event.line())
            elif event.kind == "step" and now - self._last_shown >= self.interval:
                self._print(event.line())

    def _print(self, line: str) -> None:
        self._last_shown = time.monotonic()
        if self._console is not None:
            self._console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            print(line, file=self.stream, flush=True)

    def _start(self) -> None:
        if self.live:
            from rich.console import Console

            self._console = Console(file=self.stream)
            self._status = self._console.status("")
            self._status.start()
        self._thread = threading.Thread(target=self._heartbeat, name="embedfit-progress", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        """Repeat the latest count, its seconds brought up to now, when nothing was shown for `interval` s."""
        while not self._stop.wait(max(0.01, min(self.interval, 1.0))):
            with self._lock:
                if self._latest is None:
                    continue
                event, at = self._latest
                now = time.monotonic()
                current = dataclasses.replace(event, seconds=event.seconds + now - at)
                if self._status is not None:
                    self._status.update(current.line())
                elif now - self._last_shown >= self.interval:
                    self._print(current.line())

    def close(self) -> None:
        """Stop the heartbeat and the live line (a plain run ends without a line: the command's summary follows)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._status is not None:
            self._status.stop()
            self._status = None

    def __enter__(self) -> StderrSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def progress_sink(on_progress: OnProgress | None, show: bool = False) -> Iterator[OnProgress | None]:
    """The callback a long function reports to: the caller's `on_progress`, else a `StderrSink` (closed at the end)
    when `show` (a settings object's `progress=True`), else None."""
    if on_progress is not None or not show:
        yield on_progress
        return
    with StderrSink() as sink:
        yield sink
