"""Live progress lines on stderr for long work (count, rate, time left): epochs, photo decoding, embedding.

They are drawn on a terminal only (or when SEARCH_PROGRESS=1, for a log that wants them), so pipes, files and
tests keep clean one-line-per-epoch output; a bar that ends is erased (`leave=False`), the lines above it stay.
"""
from __future__ import annotations

import os
import sys

from tqdm import tqdm


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
