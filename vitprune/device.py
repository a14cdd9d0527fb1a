"""Where and in which precision a model runs: ``--device`` / ``--dtype`` for every command and API function.

Rewrite and verification always run in float32 on the CPU (keep-all exactness is checked there); a
rewritten model then runs on any device in any of :data:`DTYPES`, its token ops included (their scores
and rankings are computed in float32 where a 16-bit type would tie or underflow; token counts are Python
ints, so no dtype changes a shape).

- ``bench`` and ``search`` *cast* the model and its input (``module.to(device, dtype)``: what a GPU
  deployment runs; ``bench`` casts the models it is given, ``search`` moved copies);
- ``eval`` and ``show`` run a model they hand back, so they move it but keep its float32 weights and run
  the forward under ``torch.autocast``;
- ``finetune`` keeps float32 master weights and runs the forward under ``torch.autocast`` (with a
  ``GradScaler`` for float16 on CUDA, whose gradients would underflow otherwise).
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager

import torch

from vitprune.errors import VitpruneError

#: ``--dtype`` names and the torch dtypes they mean.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device``, or ``cuda`` when a GPU is available, else ``cpu``.

    Raises:
        VitpruneError: a device string torch does not parse, or CUDA asked for where there is none (or an
            index beyond the GPUs present).
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise VitpruneError(f"--device: {str(exc).splitlines()[0]}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise VitpruneError(f"--device {device}: no CUDA GPU is available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise VitpruneError(f"--device {device}: there are {torch.cuda.device_count()} CUDA GPUs here")
    elif dev.type not in ("cpu", "mps", "xpu"):
        raise VitpruneError(f"--device {device}: expected cpu or cuda[:N]")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, default: torch.dtype = torch.float32) -> torch.dtype:
    """The torch dtype for a ``--dtype`` name (``float32``, ``bfloat16``, ``float16``) or a torch dtype;
    ``None`` gives ``default``.

    Raises:
        VitpruneError: any other name or dtype.
    """
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
    elif str(dtype) in DTYPES:
        return DTYPES[str(dtype)]
    raise VitpruneError(f"--dtype: expected one of {', '.join(DTYPES)}, got {str(dtype)!r}")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the ``--dtype`` spelling)."""
    return str(dtype).removeprefix("torch.")


def autocast(device: torch.device, dtype: torch.dtype) -> ContextManager[Any]:
    """``torch.autocast`` to ``dtype`` on ``device``'s type; a no-op for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: torch.dtype) -> torch.amp.GradScaler:
    """A loss scaler, enabled for float16 on CUDA only (bfloat16 has float32's exponent range: no underflow;
    on the CPU float16 autocast runs without one, as ``torch.amp`` documents it for CUDA)."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16 and device.type == "cuda")


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued kernels (CUDA runs asynchronously; timing needs this); no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
