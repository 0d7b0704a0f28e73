"""The live dashboard (``/dashboard``): static pages, a login that sets a session cookie,
and one shared snapshot a second over Server-Sent Events (docs/dashboard.md)."""

from .app import Dashboard

__all__ = ["Dashboard"]
