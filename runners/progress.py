"""Live progress lines on stderr for long work (count, rate, time left): epochs, photo decoding, embedding.

They are drawn on a terminal only (or when SEARCH_PROGRESS=1, for a log that wants them), so pipes, files and
tests keep clean one-line-per-epoch output; a bar that ends is erased (`leave=False`), the lines above it stay.
Work that takes minutes without an epoch line (decoding photos, embedding them) writes, where no bar is drawn,
a plain line every LOG_EVERY seconds instead (`long_work_bar`): a log is never silent for minutes.
"""
from __future__ import annotations

import os
import sys

from tqdm import tqdm

LOG_EVERY = 60.0  # seconds between plain progress lines of long work where no live bar is drawn
LOG_MIN_ITEMS = 1000  # fewer photos than this take seconds: no plain lines for them


def shown() -> bool:
    """Whether live bars are drawn: stderr is a terminal, or SEARCH_PROGRESS=1 asks for them."""
    wanted = os.environ.get("SEARCH_PROGRESS")
    if wanted is not None:
        return wanted == "1"
    return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


def live_bar(total: int | None, desc: str, unit: str) -> tqdm:
    """A tqdm bar on stderr, redrawn at most once a second, gone when closed; a no-op when not shown()."""
    return tqdm(total=total, desc=desc, unit=unit, leave=False, mininterval=1.0, dynamic_ncols=True,
                file=sys.stderr, disable=not shown())


class _Lines:
    """A stream for tqdm that turns its redraws into whole lines: a log file gets no carriage returns."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def long_work_bar(total: int | None, desc: str, unit: str, enabled: bool = True) -> tqdm:
    """live_bar where bars are shown; elsewhere, for LOG_MIN_ITEMS or more, a plain line (count, rate, time left)
    at the start, every LOG_EVERY seconds and at the end: work of minutes that has no epoch lines of its own."""
    if not enabled:
        return tqdm(total=total, disable=True)
    if shown() or (total or 0) < LOG_MIN_ITEMS:
        return live_bar(total, desc, unit)
    return tqdm(total=total, desc=desc, unit=unit, leave=True, mininterval=LOG_EVERY, maxinterval=LOG_EVERY,
                ncols=100, ascii=True, file=_Lines(sys.stderr))  # leave: the last line says the total time and rate
