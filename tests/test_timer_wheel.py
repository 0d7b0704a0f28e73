"""The shared keep-alive wheel (issue 17 part 3): deadlines fire never early, at most a
tick late, once; discarded ones never; an idle connection carries no dict, deque or timer."""

from __future__ import annotations

import asyncio

import pytest

from rapidmq_edge.broker.broker import Broker, BrokerLimits
from rapidmq_edge.broker.connection import ClientConnection
from rapidmq_edge.broker.negotiation import ConnectionSettings
from rapidmq_edge.broker.session import Session
from rapidmq_edge.broker.timer_wheel import TimerWheel

pytestmark = pytest.mark.timeout(20)

TICK = 0.02


class Entry:
    def __init__(self, loop: asyncio.AbstractEventLoop, wheel: TimerWheel,
                 again: float | None = None) -> None:
        self.loop, self.wheel, self.again = loop, wheel, again
        self.fired: list[float] = []

    def wheel_due(self) -> None:
        self.fired.append(self.loop.time())
        if self.again is not None and len(self.fired) == 1:
            self.wheel.add(self, self.again)  # re-armed from its own callback


def test_deadlines_fire_in_order_never_early_at_most_a_tick_late() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        wheel = TimerWheel(loop, TICK)
        t0 = loop.time()
        delays = [0.3, 0.05, 0.15, 0.15, 0.0]
        entries = [Entry(loop, wheel) for _ in delays]
        for e, d in zip(entries, delays, strict=True):
            wheel.add(e, d)
        dropped = Entry(loop, wheel)
        wheel.discard(dropped, wheel.add(dropped, 0.1))
        again = Entry(loop, wheel, again=0.1)
        wheel.add(again, 0.05)
        await asyncio.sleep(0.6)
        for e, d in zip(entries, delays, strict=True):
            assert len(e.fired) == 1
            late = e.fired[0] - t0 - d
            assert -0.002 <= late <= TICK + 0.1, (d, late)  # 0.1: a busy test machine
        assert dropped.fired == []
        assert len(again.fired) == 2 and again.fired[1] - again.fired[0] >= 0.1 - 0.002
        assert len(wheel) == 0

    asyncio.run(main())


def test_an_idle_connection_has_no_dict_deque_or_timer_handle() -> None:
    class Transport:
        def write(self, data: bytes) -> None: ...
        def close(self) -> None: ...
        def get_write_buffer_size(self) -> int: return 0
        def pause_reading(self) -> None: ...
        def resume_reading(self) -> None: ...

    async def main() -> None:
        broker = Broker(BrokerLimits())
        conns = [ClientConnection(broker, None, ConnectionSettings(), Transport(), "p")  # type: ignore[arg-type]
                 for _ in range(3)]
        assert not hasattr(conns[0], "__dict__")
        assert conns[0]._acks is None and conns[0]._pressure_waiters is None
        assert broker.wheel is not None and len(broker.wheel) == 3  # one wheel for all
        for c in conns:
            c.close(send_will=False)
        assert len(broker.wheel) == 0
        s = Session("c", 4, 0, None)
        assert not s.queue and not s.inbound_qos2
        s.add_inbound_qos2(7)
        assert 7 in s.inbound_qos2 and not Session("d", 4, 0, None).inbound_qos2

    asyncio.run(main())
