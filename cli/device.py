"""``--device`` and ``--dtype``: the options of every command that runs a model (bench, eval, show, search,
finetune); validated by :mod:`vitprune.device` (a bad value: one line ``vitprune: error: --device: ...``)."""

from __future__ import annotations

from typing import Callable

import click

from vitprune.device import DTYPES


def device_options(dtype_help: str) -> Callable[[Callable], Callable]:
    """Add ``--device`` (``cpu``, ``cuda``, ``cuda:N``; default ``cuda`` when available) and ``--dtype``
    (``float32``, ``bfloat16``, ``float16``; what it does is ``dtype_help``) to a command."""

    def decorate(fn: Callable) -> Callable:
        fn = click.option("--dtype", metavar="|".join(DTYPES), help=dtype_help)(fn)
        return click.option("--device", help="cpu, cuda, cuda:1 ... [default: cuda when available, else cpu].")(fn)

    return decorate
