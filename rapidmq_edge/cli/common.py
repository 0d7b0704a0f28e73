"""What every command module shares: logging set-up and the error exit."""

from __future__ import annotations

import getpass
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


def has_terminal() -> bool:
    """Whether this process has a controlling terminal (what ``getpass`` reads from)."""
    try:
        with open("/dev/tty"):
            return True
    except OSError:
        return False


def ask_secret(what: str, instead: str, confirm: bool = False) -> str:
    """Ask for a secret (``what``: "password") on the terminal, twice with ``confirm``.

    ValueError, naming ``instead`` (the option that reads it otherwise), when there is no
    terminal to ask on: getpass would then read the secret from a pipe with its echo on.
    """
    if not has_terminal():
        raise ValueError(f"no terminal to ask for the {what} on: {instead}")
    try:
        first = getpass.getpass(f"{what[:1].upper()}{what[1:]}: ")
        if confirm and first and getpass.getpass(f"Repeat {what}: ") != first:
            raise ValueError(f"{what}s do not match")
    except EOFError:
        raise ValueError(f"no {what} given") from None
    return first
