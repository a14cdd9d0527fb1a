"""What differs between the torch / transformers / ONNX releases vitprune admits (README "Versions"), in one place.

Each shim names the release that needs it. Code elsewhere calls these instead of testing versions itself.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def cpu_profile(**kwargs) -> Iterator[torch.profiler.profile]:
    """``torch.profiler.profile(activities=[CPU], **kwargs)``, without torch 2.11's one-time ``UserWarning``
    "Profiler clears events at the end of each cycle" (raised on entering a profiler that holds one cycle, which
    is how vitprune uses it; torch 2.14 no longer warns). Everything else the profiler says is kept."""
    from torch.profiler import ProfilerActivity, profile

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Warning: Profiler clears events", category=UserWarning)
        with profile(activities=[ProfilerActivity.CPU], **kwargs) as prof:
            yield prof
