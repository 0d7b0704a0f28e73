"""What every command module shares: the log format and the error exit."""

from __future__ import annotations

import sys

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def fail(message: str, code: int = 2) -> int:
    """Print ``error: message`` to stderr and return the exit ``code``."""
    print(f"error: {message}", file=sys.stderr)
    return code
