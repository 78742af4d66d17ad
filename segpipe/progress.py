"""Progress of a long step (cases ingested, predicted, ensembled; training steps): a tqdm bar with its
rate and ETA on a terminal; elsewhere (a DVC stage's log, a Prefect worker, CI) a log line every
twentieth of the total (at least 5 items; 25 while the total is unknown) and at the end, with the same
rate and ETA, where a bar would write unreadable lines."""
from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

log = logging.getLogger(__name__)

T = TypeVar("T")
LOG_EVERY = 25  # items between log lines when stderr is not a terminal and the total is unknown
LOG_LINES = 20  # log lines over a known total, at most
MIN_LOG_EVERY = 5  # items between log lines, at least


class Progress:
    """Count finished items: `update(n)`, then `close()` (or use it as a context manager)."""

    def __init__(self, desc: str, total: int | None, unit: str = "case", terminal: bool | None = None):
        self.desc, self.unit = desc, unit
        self.done, self.logged = 0, 0
        self.start = time.monotonic()
        terminal = sys.stderr.isatty() if terminal is None else terminal
        self.bar = tqdm(desc=desc, total=total, unit=unit) if terminal else None
        self.set_total(total)

    def set_total(self, total: int | None) -> None:
        """The number of items, where it becomes known only once work has started (training steps)."""
        self.total = total
        self.every = LOG_EVERY if total is None else max(MIN_LOG_EVERY, total // LOG_LINES)
        if self.bar is not None:
            self.bar.total = total

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.done - self.logged >= self.every:
            self.log_line()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.done != self.logged:
            self.log_line()

    def line(self) -> str:
        """`desc: done/total unit (rate/s, ETA)`, as logged."""
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / elapsed
        of = f"/{self.total}" if self.total is not None else ""
        eta = ""
        if self.total is not None and self.done < self.total and rate > 0:
            eta = f", ETA {format_seconds((self.total - self.done) / rate)}"
        return f"{self.desc}: {self.done}{of} {self.unit}s ({rate:.2f}/s{eta})"

    def log_line(self) -> None:
        self.logged = self.done
        log.info("%s", self.line())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def tracked(items: Iterable[T], desc: str, total: int | None = None, unit: str = "case") -> Iterator[T]:
    """`items`, counting each one yielded as finished."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(desc, total, unit) as progress:
        for item in items:
            yield item
            progress.update()


def format_seconds(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
