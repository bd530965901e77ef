"""Keeping libraries' notices off the console: one Python logger quieter for a block, and lines that native code
writes to stderr filtered by their text (TensorFlow's import, LiteRT's delegate)."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile


@contextlib.contextmanager
def logger_level(name: str, level: int):
    """The Python logger `name` at `level` inside the block."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)


@contextlib.contextmanager
def filtered_stderr(noise: tuple[str, ...]):
    """Capture what is written to file descriptor 2 (C++ libraries included) during the block, then write back
    every line that contains none of `noise`: nothing else is lost, only delayed to the block's end."""
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no usable stderr: nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode(errors="replace").splitlines(keepends=True)
            kept = "".join(line for line in lines if not any(text in line for text in noise))
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()
