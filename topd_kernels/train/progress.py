"""A minimal progress bar on stderr (no dependency): one line redrawn in place on a terminal."""
from __future__ import annotations

import sys
import time


class Progress:
    """`Progress(total, label)`; call `update(n=1, **info)` per step and `close()` at the end.

    On a terminal the line is redrawn in place; otherwise a line is printed at most every 10% of the work.
    `enabled=False` prints nothing.
    """

    def __init__(self, total: int, label: str, enabled: bool = True, stream=sys.stderr):
        self.total, self.label, self.enabled, self.stream = max(total, 1), label, enabled, stream
        self.done = 0
        self.started = time.perf_counter()
        self.interactive = enabled and hasattr(stream, "isatty") and stream.isatty()
        self._last_decile = -1
        self.info = ""

    def update(self, n: int = 1, **info) -> None:
        self.done = min(self.done + n, self.total)
        if info:
            self.info = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items())
        if not self.enabled:
            return
        decile = 10 * self.done // self.total
        if self.interactive:
            self._draw("\r")
        elif decile != self._last_decile:
            self._last_decile = decile
            self._draw("", "\n")

    def _draw(self, prefix: str, suffix: str = "") -> None:
        width = 24
        filled = width * self.done // self.total
        elapsed = time.perf_counter() - self.started
        eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        bar = "#" * filled + "." * (width - filled)
        self.stream.write(
            f"{prefix}{self.label} [{bar}] {self.done}/{self.total} {elapsed:.0f}s<{eta:.0f}s {self.info}\x1b[K"
            if self.interactive
            else f"{self.label} [{bar}] {self.done}/{self.total} {elapsed:.0f}s {self.info}{suffix}"
        )
        self.stream.flush()

    def close(self) -> None:
        if self.interactive:
            self.stream.write("\n")
            self.stream.flush()
