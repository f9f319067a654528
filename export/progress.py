"""Stage-by-stage progress for long work (export, parity, benchmarks), printed to stderr."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO


class Progress:
    """Prints ``[i/n] stage ... done (1.2 s)``; ``tick`` redraws a counter inside a stage on a terminal."""

    def __init__(self, total: int, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.total = total
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self._i = 0
        self._label = ""

    @contextmanager
    def stage(self, label: str) -> Iterator[None]:
        self._i += 1
        self._label = f"[{self._i}/{self.total}] {label}"
        start = time.perf_counter()
        self._write(f"{self._label} ...", end="\n" if not self._tty else "")
        try:
            yield
        except BaseException:
            self._write(f"\r{self._label} ... failed\n" if self._tty else f"{self._label} failed\n", end="")
            raise
        self._write(f"\r{self._label} ... done ({time.perf_counter() - start:.1f} s)\n", end="")

    def tick(self, done: int, total: int) -> None:
        if self._tty:
            self._write(f"\r{self._label} ... {done}/{total}", end="")

    def note(self, text: str) -> None:
        self._write(f"      {text}\n", end="")

    @property
    def _tty(self) -> bool:
        return self.enabled and hasattr(self.stream, "isatty") and self.stream.isatty()

    def _write(self, text: str, end: str = "\n") -> None:
        if self.enabled:
            if not self._tty:
                text = text.lstrip("\r")
            self.stream.write(text + end)
            self.stream.flush()


class Silent(Progress):
    def __init__(self) -> None:
        super().__init__(0, enabled=False)
