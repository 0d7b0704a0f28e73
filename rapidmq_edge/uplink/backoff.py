"""Jittered exponential backoff for reconnect rounds."""

from __future__ import annotations

import random
from collections.abc import Callable

__all__ = ["Backoff"]


class Backoff:
    """Delays ``initial * factor**n`` capped at ``maximum``, each scaled by a random factor.

    With ``jitter=0.5`` a delay ``d`` becomes uniform in ``[0.5 d, 1.5 d]`` (still capped at
    ``maximum``). ``rand`` returns floats in ``[0, 1)``; inject it for deterministic tests.
    """

    def __init__(
        self,
        initial: float = 0.1,
        maximum: float = 30.0,
        factor: float = 2.0,
        jitter: float = 0.5,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if initial <= 0 or maximum < initial or factor < 1 or not 0 <= jitter <= 1:
            raise ValueError("invalid backoff parameters")
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self.jitter = jitter
        self._rand = rand
        self.attempt = 0

    def next(self) -> float:
        """Return the next delay in seconds and advance."""
        base = min(self.maximum, self.initial * self.factor ** min(self.attempt, 64))
        self.attempt += 1
        scale = 1.0 + self.jitter * (2.0 * self._rand() - 1.0)
        return min(self.maximum, base * scale)

    def reset(self) -> None:
        """Start again from ``initial`` (after a successful connection)."""
        self.attempt = 0
