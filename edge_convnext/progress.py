"""Progress on long work: a one-line bar with ETA on a terminal, a line every few seconds in CI logs."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def fmt_seconds(s: float) -> str:
    s = max(0.0, s)
    if s < 60:
        return f"{s:.1f}s"
    m, s = divmod(int(round(s)), 60)
    return f"{m}m{s:02d}s" if m < 60 else f"{m // 60}h{m % 60:02d}m"


class Progress:
    """``with Progress(total, "eval tflite-fp32") as p: ... p.advance()``.

    ``stream`` defaults to stderr so stdout stays clean for tables and JSON.
    """

    def __init__(self, total: int, label: str, stream: TextIO | None = None, every_s: float = 5.0,
                 rate_unit: str | None = None) -> None:
        self.total = max(0, total)
        self.label = label  # may be changed between advances (eval --ray shows the shards done in it)
        self.rate_unit = rate_unit  # e.g. "images": adds "12.3 images/s"
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every_s = every_s
        self.done = 0
        self.failed = 0
        self.start = time.perf_counter()
        self._last = 0.0

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self._draw(final=True)

    def advance(self, n: int = 1, failed: int = 0) -> None:
        self.done += n
        self.failed += failed
        now = time.perf_counter()
        if self.tty or now - self._last >= self.every_s or self.done == self.total:
            self._draw()
            self._last = now

    def _draw(self, final: bool = False) -> None:
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        frac = self.done / self.total if self.total else 1.0
        failed = f", {self.failed} failed" if self.failed else ""
        if self.rate_unit:
            failed += f", {rate:.1f} {self.rate_unit}/s"
        if self.tty:
            bar = "#" * int(frac * 24)
            line = f"\r{self.label} [{bar:<24}] {self.done}/{self.total}{failed} {fmt_seconds(elapsed)} ETA {fmt_seconds(eta)}"
            self.stream.write(line + ("\n" if final else ""))
        elif final or self.done:
            state = "done in" if final else "ETA"
            when = fmt_seconds(elapsed) if final else fmt_seconds(eta)
            self.stream.write(f"{self.label}: {self.done}/{self.total}{failed} ({100 * frac:.0f}%) {state} {when}\n")
        self.stream.flush()
