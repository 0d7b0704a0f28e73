"""A small asyncio MQTT 5 subscriber on the project's sans-I/O codec (rapidmq_edge.mqtt).

Connects, subscribes (shared ``$share/<group>/...`` filters allowed), hands every PUBLISH to a
callback and acknowledges QoS 1 after the callback returned. Reconnects with a short backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

from ..mqtt.codec import PacketReader, encode
from ..mqtt.packets import (
    MQTT_5,
    Connack,
    Connect,
    Pingreq,
    Puback,
    Publish,
    Suback,
    SubOptions,
    Subscribe,
)

__all__ = ["Subscriber"]

log = logging.getLogger(__name__)

OnPublish = Callable[[str, bytes, dict[str, str]], None]


def _user_props(props: dict[str, object]) -> dict[str, str]:
    pairs = props.get("user_property") or []
    return {str(k): str(v) for k, v in pairs}  # type: ignore[attr-defined]


class Subscriber:
    """One MQTT 5 connection subscribed to ``filters`` (each ``(filter, qos)``)."""

    def __init__(
        self, url: str, client_id: str, filters: Sequence[tuple[str, int]], on_publish: OnPublish,
        *, username: str | None = None, password: str | None = None, keep_alive: int = 30,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme != "mqtt" or not parts.hostname:
            raise ValueError(f"upstream URL must look like mqtt://host:port, got {url!r}")
        self.host, self.port = parts.hostname, parts.port or 1883
        self.client_id = client_id
        self.filters = list(filters)
        self.on_publish = on_publish
        self.username, self.password = username, password
        self.keep_alive = keep_alive
        self.subscribed = asyncio.Event()
        self.received = 0
        self._stop = asyncio.Event()

    async def run(self) -> None:
        """Connect and receive until :meth:`stop`; reconnect after a lost connection."""
        delay = 0.2
        while not self._stop.is_set():
            try:
                await self._session()
                delay = 0.2
            except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError) as exc:
                log.warning("upstream %s:%d: %s; reconnecting", self.host, self.port, exc)
            except Exception:  # a bug must not end the consumer silently
                log.exception("upstream %s:%d: unexpected error; reconnecting",
                              self.host, self.port)
            if self._stop.is_set():
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
            delay = min(delay * 2, 5.0)

    def stop(self) -> None:
        """Ask :meth:`run` to return."""
        self._stop.set()

    async def _session(self) -> None:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        codec = PacketReader(version=MQTT_5)
        try:
            writer.write(encode(Connect(
                MQTT_5, self.client_id, True, self.keep_alive, None, self.username,
                self.password.encode() if self.password is not None else None,
                {"receive_maximum": 1024},
            ), MQTT_5))
            writer.write(encode(Subscribe(
                1, [(f, SubOptions(qos=q)) for f, q in self.filters]), MQTT_5))
            await writer.drain()
            ping = asyncio.get_running_loop().create_task(self._ping(writer))
            stop = asyncio.get_running_loop().create_task(self._stop.wait())
            try:
                while True:
                    read = asyncio.ensure_future(reader.read(65536))
                    done, _ = await asyncio.wait({read, stop}, return_when=asyncio.FIRST_COMPLETED)
                    if stop in done:
                        read.cancel()
                        return
                    data = read.result()
                    if not data:
                        raise ConnectionError("connection closed by the upstream")
                    acks = []
                    for p in codec.feed(data):
                        if isinstance(p, Publish):
                            self.received += 1
                            self.on_publish(p.topic, p.payload, _user_props(p.properties))
                            if p.qos:
                                acks.append(encode(Puback(p.packet_id), MQTT_5))
                        elif isinstance(p, Connack) and p.reason_code:
                            raise ConnectionError(f"CONNACK reason code {p.reason_code:#x}")
                        elif isinstance(p, Suback):
                            bad = [c for c in p.reason_codes if c >= 0x80]
                            if bad:
                                raise ConnectionError(f"SUBACK refused: {bad}")
                            self.subscribed.set()
                    if acks:
                        writer.write(b"".join(acks))
            finally:
                ping.cancel()
                stop.cancel()
        finally:
            self.subscribed.clear()
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _ping(self, writer: asyncio.StreamWriter) -> None:
        while True:
            await asyncio.sleep(max(1, self.keep_alive // 2))
            writer.write(encode(Pingreq(), MQTT_5))
