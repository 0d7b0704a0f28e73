"""What every layer reports through; imports nothing of the project, so any package may
use it: :mod:`.repeats` logs a repeating problem once with a count, not once per attempt."""

from .repeats import RepeatedLog

__all__ = ["RepeatedLog"]
