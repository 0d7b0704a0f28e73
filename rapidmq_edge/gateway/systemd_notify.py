"""systemd ``Type=notify``: ``READY=1`` once the gateway serves, ``WATCHDOG=1`` from the
event loop, a ``STATUS=`` line, ``STOPPING=1`` on shutdown (via ``sdnotify``).

Without ``NOTIFY_SOCKET`` (not started by systemd) every call does nothing. The watchdog
pings come from a task on the event loop: a loop that is stuck stops pinging and systemd
restarts the service after ``WatchdogSec=``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .assembly import Gateway

__all__ = ["ServiceNotifier", "service_status", "watchdog_interval"]


def service_status(gw: Gateway) -> str:
    """One line for systemd's ``STATUS=``: clients, backlog, upstream links."""
    text = f"{gw.broker.stats.clients_connected} clients"
    if gw.forward is not None:
        ups = sum(u.connected for u in gw.uplinks)
        text += (f", backlog {gw.forward.queue.stats()['messages']}, upstreams "
                 f"{ups}/{len(gw.uplinks)} up")
    return text


def watchdog_interval(env: Mapping[str, str], fraction: float = 0.5) -> float | None:
    """Seconds between pings (``fraction`` of ``WATCHDOG_USEC``), None when systemd asks
    for none or asks another process (``WATCHDOG_PID``)."""
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1e6 * fraction


class ServiceNotifier:
    """The gateway's messages to systemd (no-ops outside systemd)."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.enabled = bool(env.get("NOTIFY_SOCKET"))
        self._sd: Any = None
        if self.enabled:
            import sdnotify  # only under systemd

            self._sd = sdnotify.SystemdNotifier()
        self._env = env
        self.pings = 0

    def _send(self, text: str) -> None:
        if self._sd is not None:
            self._sd.notify(text)

    def ready(self, status: str) -> None:
        """The store is recovered and the listeners are up."""
        self._send(f"READY=1\nSTATUS={status}\nMAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        """Update the one-line status ``systemctl status`` shows."""
        self._send(f"STATUS={status}")

    def stopping(self) -> None:
        """Shutdown has begun."""
        self._send("STOPPING=1\nSTATUS=shutting down")

    async def watchdog(self, status: Callable[[], str], fraction: float = 0.5,
                       status_every: float = 5.0) -> None:
        """Ping ``WATCHDOG=1`` forever (cancel to stop), the status line every
        ``status_every`` seconds; returns at once when no watchdog is asked for."""
        loop = asyncio.get_running_loop()
        interval = watchdog_interval(self._env, fraction) if self.enabled else None
        every = interval if interval is not None else status_every
        if not self.enabled:
            return
        next_status = loop.time()
        while True:
            if interval is not None:
                self._send("WATCHDOG=1")
                self.pings += 1
            if loop.time() >= next_status:
                self.status(status())
                next_status = loop.time() + status_every
            await asyncio.sleep(min(every, status_every))
