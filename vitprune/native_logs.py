"""Keep torch's native log lines (and its Python loggers' tracebacks) off the user's terminal.

The CUDA build of torch (what ``pip install torch`` gives on x86_64) writes Kineto's log lines to file
descriptor 2 from C++ whenever ``torch.profiler`` runs, even on a machine without a GPU:
``USDT:... profiler_start``, ``STAGE:... Completed Stage``, ``ERROR:... gpuGetDeviceCount failed with code
35``. ``KINETO_LOG_LEVEL`` silences some of them but not the USDT lines, and Python's ``sys.stderr``
never sees any of them. :func:`filtered_native_stderr` sends fd 2 to a temporary file for the duration
of a block and then writes back every line that is not one of Kineto's, so Python warnings and errors
raised inside the block still reach the user.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
from typing import Iterator

#: Kineto / glog-style native lines: ``LEVEL:YYYY-MM-DD HH:MM:SS PID:TID File.cpp:LINE] message``.
NATIVE_LOG_LINE = re.compile(r"^(USDT|STAGE|ERROR|WARNING|INFO):\d{4}-\d\d-\d\d [\d:]+ \d+:\d+ \S+\.(cpp|h):\d+\]")


@contextlib.contextmanager
def filtered_native_stderr() -> Iterator[None]:
    """Within the block, drop Kineto's native log lines from file descriptor 2; keep everything else."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # pytest's capture or an embedded interpreter: no fd to swap
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), fd)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            sink.seek(0)
            kept = [line for line in sink.read().decode("utf-8", "replace").splitlines(keepends=True)
                    if not NATIVE_LOG_LINE.match(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


@contextlib.contextmanager
def quiet_python_loggers(*names: str) -> Iterator[None]:
    """Within the block, the named Python loggers (and their children) print nothing: torch logs a
    multi-line ``W... Traceback`` block when ``torch.export.load`` fails, before raising the error
    vitprune turns into its one line."""
    loggers = [logging.getLogger(name) for name in names]
    saved = [logger.disabled for logger in loggers]
    children = [logging.getLogger(k) for k in list(logging.root.manager.loggerDict)
                if any(k.startswith(name + ".") for name in names)]
    saved_children = [c.disabled for c in children]
    for logger in loggers + children:
        logger.disabled = True
    try:
        yield
    finally:
        for logger, was in zip(loggers + children, saved + saved_children):
            logger.disabled = was
