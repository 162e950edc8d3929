"""Seconds per phase of a step (fence, promotion, divergence read): what the runbooks show in
a step's detail and the benches break their figures down by."""

from __future__ import annotations

import time


class Stopwatch:
    """``lap(name)`` records the seconds since the previous lap (or the start) under ``name``."""

    def __init__(self, digits: int = 4) -> None:
        self.laps: dict[str, float] = {}
        self._digits = digits
        self._t = time.monotonic()

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self.laps[name] = round(now - self._t, self._digits)
        self._t = now
