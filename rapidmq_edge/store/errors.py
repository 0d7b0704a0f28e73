"""What the stores raise: one module, so callers need not know which file a store keeps."""

from __future__ import annotations

__all__ = ["QueueError", "QueueFull", "StoreError"]


class StoreError(Exception):
    """A session-store commit failed (for example: the disk is full)."""


class QueueError(Exception):
    """The forward queue could not store something (for example: the disk is full)."""


class QueueFull(QueueError):
    """A put was refused by a bound; ``reason`` says which."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
