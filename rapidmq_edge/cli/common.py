"""What every command module shares: logging set-up and the error exit."""

from __future__ import annotations

import logging
import logging.handlers
import sys

from ..config import LogSettings

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(settings: LogSettings) -> None:
    """Log at ``settings.level`` to stderr, or to ``settings.file`` (rotated at its size,
    keeping ``backups`` old files; where that file cannot be opened: stderr, and say so)."""
    handler: logging.Handler = logging.StreamHandler()
    problem = None
    if settings.file is not None:
        try:
            settings.file.parent.mkdir(parents=True, exist_ok=True)
            handler = logging.handlers.RotatingFileHandler(
                settings.file, maxBytes=settings.max_bytes, backupCount=settings.backups)
        except OSError as exc:
            problem = f"cannot write the log file {settings.file}: {exc}; logging to stderr"
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.basicConfig(level=settings.level.upper(), handlers=[handler], force=True)
    if problem:
        logging.getLogger("rapidmq_edge").error("%s", problem)


def fail(message: str, code: int = 2) -> int:
    """Print ``error: message`` to stderr and return the exit ``code``."""
    print(f"error: {message}", file=sys.stderr)
    return code
