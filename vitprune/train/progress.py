"""Progress on stderr for the long steps (``search``, ``finetune``, ``eval``): a tqdm bar when stderr is a
terminal, else plain lines every :data:`PLAIN_EVERY_S` seconds and one where the step ends, so CI logs and
``nohup`` files show that a run is alive and how far it is (a bar's carriage returns would pile up there).

    bar = Progress(total=48, desc="search FLOPs <= 0.6", unit="evals")
    for ...:
        bar.update(1)
        bar.set_postfix(best="0.981")
    bar.close()
"""

from __future__ import annotations

import sys
import time
from typing import Any, Iterable, Iterator, TextIO

#: seconds between two plain progress lines (when stderr is not a terminal).
PLAIN_EVERY_S = 10.0


class Progress:
    """``total`` steps of ``unit``; ``enabled=False`` shows nothing. ``file`` defaults to ``sys.stderr`` (read
    when the object is made, so a redirected stderr is followed)."""

    def __init__(self, total: int | None = None, desc: str = "", unit: str = "steps", enabled: bool = True,
                 every: float = PLAIN_EVERY_S, file: TextIO | None = None) -> None:
        self.file = file if file is not None else sys.stderr
        self.total, self.desc, self.unit, self.enabled, self.every = total, desc, unit, enabled, every
        self.n, self.postfix = 0, ""
        self.start = self.last = time.perf_counter()
        self.bar = None
        if enabled and getattr(self.file, "isatty", lambda: False)():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True, file=self.file)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and time.perf_counter() - self.last >= self.every:
            self._line()

    def set_postfix(self, **values: Any) -> None:
        """What the step has reached (``loss="0.123"``), shown on the bar or at the end of each line."""
        self.postfix = "  ".join(f"{k} {v}" for k, v in values.items())
        if self.bar is not None:
            self.bar.set_postfix(**values)

    def wrap(self, iterable: Iterable) -> Iterator:
        """``iterable``'s items, one :meth:`update` after each."""
        for item in iterable:
            yield item
            self.update(1)

    def close(self) -> None:
        """Close the bar, or write the last plain line (where the step ended)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.enabled and self.n:
            self._line()
        self.enabled = False  # a second close writes nothing

    def _line(self) -> None:
        now = self.last = time.perf_counter()
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        print(f"{self.desc}: {done} {self.unit}, {now - self.start:.0f} s" + (f", {self.postfix}" if self.postfix else ""),
              file=self.file, flush=True)
