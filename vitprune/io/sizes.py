"""Refuse a tensor that cannot fit before allocating it (an absurd ``input_shape`` in a file's metadata,
``bench --batch 1000000``): torch's allocator would fail with a multi-line error, or the kernel would kill
the process, after minutes of swapping."""

from __future__ import annotations

import math
import os
from typing import Sequence

from vitprune.errors import VitpruneError


def available_bytes() -> int | None:
    """Memory the system can give a new allocation now (``MemAvailable``), or None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(shape: Sequence[object], what: str, bytes_per_element: int = 4) -> tuple[int, ...]:
    """``shape`` as ints if a float32 tensor of it fits in the memory available now, else a one-line error.

    Raises:
        VitpruneError: a size that is not a positive int, or a tensor larger than the available memory
            (the message gives the size it needs).
    """
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape):
        raise VitpruneError(f"{what} has the shape {list(shape)}: every size must be a positive integer")
    need = math.prod(shape) * bytes_per_element
    free = available_bytes()
    if free is not None and need > free:
        raise VitpruneError(f"{what} of shape {list(shape)} needs {_gb(need)} of memory for its input alone; "
                            f"{_gb(free)} is free")
    return tuple(int(v) for v in shape)


def _gb(n: int) -> str:
    return f"{n / 2 ** 30:.3g} GiB" if n < 2 ** 40 else f"{n / 2 ** 40:.3g} TiB"
