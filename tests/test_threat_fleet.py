"""The threat watch on a realistic fleet, through a real gateway: 200 healthy devices at
0.1 to 50 msg/s (started together, some reconnecting and flushing what they buffered)
beside 5 attackers of each kind. Not one healthy device is throttled or disconnected;
every attacker is caught: guessers banned, scanners disconnected (0x87), floods throttled
and then, as they keep sending, disconnected (0x96) and banned."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from rapidmq_edge.mqtt.codec import PacketReader, encode, encode_publish
from rapidmq_edge.mqtt.packets import (
    CONNACK,
    DISCONNECT,
    MQTT_5,
    MQTT_311,
    PUBACK,
    PUBLISH,
    Connect,
    SubOptions,
    Subscribe,
)
from rapidmq_edge.security.users import add_user

from .gateway_proc import GatewayProcess

pytestmark = pytest.mark.timeout(150)


class Client:
    """A small asyncio MQTT client that records what the server did to it."""

    def __init__(self, cid: str, version: int = MQTT_311) -> None:
        self.cid = cid
        self.version = version
        self.connacks: list[int] = []
        self.disconnects: list[int] = []
        self.alerts: list[dict[str, Any]] = []
        self.closed = asyncio.Event()
        self.writer: asyncio.StreamWriter | None = None
        self._connack: asyncio.Future[int] | None = None
        self._task: asyncio.Task[None] | None = None
        self.sent = 0
        self.inflight = 0  # QoS 1 PUBLISHes not acknowledged yet (MQTT 5: Receive Maximum)
        self.acked = asyncio.Event()

    async def connect(self, port: int, username: str | None = None,
                      password: str | None = None) -> int:
        reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
        self.closed.clear()
        self._connack = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._read(reader))
        self.writer.write(encode(Connect(self.version, self.cid, clean_start=True,
                                         keep_alive=60, username=username,
                                         password=password.encode() if password else None),
                                 self.version))
        try:
            code = await asyncio.wait_for(self._connack, 10)
        except (TimeoutError, ConnectionError):
            code = -1
        self.connacks.append(code)
        return code

    async def _read(self, reader: asyncio.StreamReader) -> None:
        pr = PacketReader(version=self.version)
        try:
            while data := await reader.read(65536):
                for p in pr.feed(data):
                    if p.type == CONNACK and self._connack and not self._connack.done():
                        self._connack.set_result(p.reason_code)  # type: ignore[union-attr]
                    elif p.type == DISCONNECT:
                        self.disconnects.append(p.reason_code)  # type: ignore[union-attr]
                    elif p.type == PUBLISH and p.topic.startswith("$edge/alerts/"):  # type: ignore[union-attr]
                        self.alerts.append(json.loads(p.payload))  # type: ignore[union-attr]
                    elif p.type == PUBACK:
                        self.inflight -= 1
                        self.acked.set()
        except (ConnectionError, OSError, ValueError):
            pass
        finally:
            if self._connack and not self._connack.done():
                self._connack.set_exception(ConnectionError("closed"))
            self.closed.set()

    def publish(self, topic: str, payload: bytes, qos: int = 0) -> None:
        if self.writer is not None and not self.closed.is_set():
            props = b"\x00" if self.version == MQTT_5 else None  # an empty property block
            self.writer.write(encode_publish(topic.encode(), payload, qos, False, False,
                                             (self.sent % 65535) + 1 if qos else 0, props))
            self.sent += 1
            self.inflight += qos

    async def window(self, limit: int = 50) -> None:
        """Wait while ``limit`` QoS 1 messages are unacknowledged (as real clients do)."""
        while self.inflight >= limit and not self.closed.is_set():
            self.acked.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.acked.wait(), 1.0)

    def subscribe(self, pid: int, filt: str) -> None:
        if self.writer is not None:
            self.writer.write(encode(Subscribe(pid, [(filt, SubOptions(0))]), self.version))

    async def close(self) -> None:
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task


async def _healthy(c: Client, port: int, rate: float, until: float, rng: random.Random,
                   away: tuple[float, float] | None) -> None:
    """Publish ``{"value": x}`` at ``rate`` msg/s; while ``away``, buffer and flush on return."""
    await asyncio.sleep(rng.uniform(0, 2))  # the fleet starts together
    assert await c.connect(port) == 0
    t0 = time.monotonic()
    buffered = 0
    next_at = t0
    while time.monotonic() < until:
        now = time.monotonic()
        if away and away[0] <= now - t0 < away[1]:
            if c.writer is not None:
                await c.close()
                c.writer = None
                c.inflight = 0
            buffered += 1
        else:
            if c.writer is None:
                assert await c.connect(port) == 0
                for _ in range(buffered):  # catching up: as fast as its window allows
                    await c.window()
                    c.publish(f"sensors/{c.cid}/temp", b'{"value": 21.5}', 1)
                buffered = 0
            await c.window()
            c.publish(f"sensors/{c.cid}/temp", b'{"value": %.2f}' % rng.gauss(21, 0.3),
                      rng.choice((0, 1)))
        next_at += rng.expovariate(rate)
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))


async def _guess(c: Client, port: int, until: float) -> None:
    while time.monotonic() < until:
        code = await c.connect(port, "op", f"guess{random.random()}")
        await c.close()
        if code == 0x8A:  # banned
            return
        await asyncio.sleep(0.2)


async def _scan(c: Client, port: int, until: float) -> None:
    assert await c.connect(port) == 0
    filters = ["#", "$SYS/#", "+/#", "cmd/#", "+/+/+", "site/#", "$share/g/#", "devices/#"]
    filters += [f"cmd/{i:04d}/ota" for i in range(30)]
    for i, filt in enumerate(filters):
        if c.closed.is_set() or time.monotonic() > until:
            return
        c.subscribe(i + 1, filt)
        await asyncio.sleep(0.1)
    await asyncio.wait_for(c.closed.wait(), max(0.1, until - time.monotonic()))


async def _flood(c: Client, port: int, until: float) -> None:
    assert await c.connect(port) == 0
    payload = b"x" * 512
    while time.monotonic() < until and not c.closed.is_set():
        for _ in range(200):
            c.publish("spam/data", payload)
        assert c.writer is not None
        with contextlib.suppress(TimeoutError, ConnectionError):
            await asyncio.wait_for(c.writer.drain(), 1.0)  # blocks while throttled
        await asyncio.sleep(0)


def test_healthy_fleet_untouched_attackers_caught(
    gateway_factory: Callable[..., GatewayProcess], tmp_path: Path,
) -> None:
    users = tmp_path / "users.toml"
    add_user(users, "op", "the-real-password")
    gw = gateway_factory({
        "auth": {"allow_anonymous": True, "users_file": str(users)},
        "acl": [{"user": "*", "topic": "$SYS/#", "action": "subscribe", "access": "deny"},
                {"user": "*", "topic": "cmd/#", "access": "deny"}],
        "intelligence": {"enabled": True, "anomaly": "off", "ban_s": 300.0},
    })
    rng = random.Random(11)
    rates = [math.exp(rng.uniform(math.log(0.1), math.log(50.0))) for _ in range(200)]

    async def main() -> tuple[list[Client], dict[str, list[Client]], list[dict[str, Any]]]:
        watcher = Client("alert-watcher")
        assert await watcher.connect(gw.port) == 0
        watcher.subscribe(1, "$edge/alerts/threat/#")
        until = time.monotonic() + 25
        healthy = [Client(f"dev{i:03d}", MQTT_5 if i % 3 == 0 else MQTT_311)
                   for i in range(200)]
        attackers = {kind: [Client(f"{kind}{i}", MQTT_5) for i in range(5)]
                     for kind in ("guess", "scan", "flood")}
        jobs = [_healthy(c, gw.port, r, until, random.Random(i),
                         (8.0, 14.0) if i % 10 == 0 else None)
                for i, (c, r) in enumerate(zip(healthy, rates, strict=True))]
        await asyncio.sleep(3)  # the fleet first
        jobs += [_guess(c, gw.port, until) for c in attackers["guess"]]
        jobs += [_scan(c, gw.port, until) for c in attackers["scan"]]
        jobs += [_flood(c, gw.port, until) for c in attackers["flood"]]
        results = await asyncio.gather(*jobs, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)
                  and not isinstance(r, TimeoutError)]
        assert not errors, errors[:3]
        await asyncio.sleep(1.5)  # the last verdicts' alerts
        for c in [*healthy, *[a for group in attackers.values() for a in group], watcher]:
            await c.close()
        return healthy, attackers, watcher.alerts

    healthy, attackers, alerts = asyncio.run(main())
    judged = {a["client"]: a for a in alerts}
    touched = [c.cid for c in healthy if c.disconnects or c.cid in judged]
    assert touched == [], [(c.cid, c.disconnects, judged.get(c.cid)) for c in healthy
                           if c.cid in touched][:3]
    for c in attackers["guess"]:
        assert judged.get(c.cid, {}).get("kind") == "credential_guessing", c.cid
        assert 0x8A in c.connacks, c.connacks[-5:]
    for c in attackers["scan"]:
        # subscribed to "#" on a busy broker, its DISCONNECT may wait behind megabytes of
        # the fleet's messages and be cut off: the alert says what was done
        assert c.disconnects in ([0x87], []), (c.cid, c.disconnects)
        assert judged[c.cid]["kind"] == "topic_scanning" and judged[c.cid]["evidence"]["denied"]
        assert judged[c.cid]["action"] == "disconnected" and c.closed.is_set()
    for c in attackers["flood"]:
        assert c.disconnects == [0x96], (c.cid, c.disconnects, judged.get(c.cid))
        kinds = [a["action"] for a in alerts if a["client"] == c.cid]
        assert kinds[0].startswith("throttled to") and kinds[-1] == "disconnected", kinds
    st = json.loads((gw.data_dir / "status.json").read_text())["intelligence"]["threat"]
    assert st["disconnected"] == 10 and st["throttled"] == 5, st
