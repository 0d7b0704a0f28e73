"""The broker's per-topic route plan (messages without retain: the sessions to deliver to and
their subscriptions' QoS, the read check already answered) follows every change that alters
routing: subscriptions added and removed, sessions ended and replaced, read rules changing
generation, and the subscription kinds it must leave to the full path (No Local,
subscription identifiers, overlapping subscriptions, shared groups). Real broker, real
in-process clients (:class:`~rapidmq_edge.broker.local.LocalClient`)."""

from __future__ import annotations

from rapidmq_edge.broker.broker import Broker, BrokerLimits
from rapidmq_edge.broker.local import LocalClient
from rapidmq_edge.broker.message import Delivery, Message
from rapidmq_edge.mqtt.packets import SubOptions


class ReadRules:
    """A read check whose rules can change at run time (``generation`` moves), as RBAC's."""

    generation = 0  # on the class: that is how the broker tells rules that can change

    def __init__(self) -> None:
        self.denied: set[str] = set()

    def check(self, username: str | None, client_id: str, topic: str) -> bool:
        return client_id not in self.denied


def _client(broker: Broker, cid: str, got: dict[str, list[bytes]]) -> LocalClient:
    got[cid] = []
    return LocalClient(broker, cid, lambda m, _r: got[cid].append(m.payload))


def _send(broker: Broker, payload: bytes, origin: str = "pub", topic: str = "t/1") -> int:
    return broker.publish(Message(topic, payload, origin=origin))


def test_plan_follows_subscriptions_and_sessions() -> None:
    broker = Broker(BrokerLimits())
    got: dict[str, list[bytes]] = {}
    a = _client(broker, "a", got)
    a.subscribe("t/1")
    assert _send(broker, b"1") == 1 and _send(broker, b"2") == 1  # the second: the plan
    b = _client(broker, "b", got)
    b.subscribe("t/+")
    assert _send(broker, b"3") == 2
    b.unsubscribe("t/+")
    assert _send(broker, b"4") == 1
    a.close()  # the session ends
    assert _send(broker, b"5") == 0
    a2 = _client(broker, "a", got)  # the same id, a new session
    a2.subscribe("t/#")
    assert _send(broker, b"6") == 1
    assert got == {"a": [b"6"], "b": [b"3"]}  # a's first list was replaced by a2's
    assert broker.stats.no_subscribers == 1


def test_plan_follows_read_rules_generation() -> None:
    rules = ReadRules()
    broker = Broker(BrokerLimits(), read_check=rules.check)
    got: dict[str, list[bytes]] = {}
    for cid in ("a", "b"):
        _client(broker, cid, got).subscribe("t/1")
    assert _send(broker, b"1") == 2
    rules.denied.add("b")  # without a new generation the cached answers stay (by design)
    rules.generation += 1
    assert _send(broker, b"2") == 1
    rules.denied.clear()
    rules.generation += 1
    assert _send(broker, b"3") == 2
    assert got == {"a": [b"1", b"2", b"3"], "b": [b"1", b"3"]}


def test_what_the_plan_leaves_to_the_full_path() -> None:
    broker = Broker(BrokerLimits())
    got: dict[str, list[bytes]] = {}
    a = _client(broker, "a", got)
    broker.subscribe(a.session, "t/1", SubOptions(0, no_local=True), None)
    b = _client(broker, "b", got)
    broker.subscribe(b.session, "t/1", SubOptions(0), 7)  # a subscription identifier
    c = _client(broker, "c", got)
    c.subscribe("t/1")
    c.subscribe("t/+")  # overlapping: one delivery
    d1, d2 = _client(broker, "d1", got), _client(broker, "d2", got)
    d1.subscribe("$share/g/t/1")
    d2.subscribe("$share/g/t/1")
    for i in range(4):  # alternately from a (No Local) and from someone else
        _send(broker, b"%d" % i, origin="a" if i % 2 == 0 else "x")
    assert got["a"] == [b"1", b"3"]  # No Local holds on every message
    assert got["b"] == got["c"] == [b"0", b"1", b"2", b"3"]
    assert sorted(got["d1"] + got["d2"]) == [b"0", b"1", b"2", b"3"] and got["d1"]
    broker.unsubscribe(a.session, "t/1")
    broker.unsubscribe(b.session, "t/1")
    c.unsubscribe("t/+")
    d1.unsubscribe("$share/g/t/1")
    d2.unsubscribe("$share/g/t/1")
    _send(broker, b"plain", origin="a")  # now only c's plain subscription: a plan
    assert got["c"][-1] == b"plain" and got["a"] == [b"1", b"3"]
    assert broker._plans.get("t/1") == ((c.session,), (0,))


def test_plan_follows_a_session_resumed_under_another_user_name() -> None:
    """The read check sees the user name: a session resumed by another user is asked again
    (the plan of its topics goes when a session is opened)."""
    broker = Broker(BrokerLimits(), read_check=lambda user, cid, topic: user != "mallory")
    got: list[bytes] = []
    link = LocalClient(broker, "a", lambda m, _r: got.append(m.payload), username="alice")
    session, _ = broker.open_session(link, "a", False, 60, 5, "alice")  # a lasting session
    broker.subscribe(session, "t/1", SubOptions(0), None)
    assert _send(broker, b"1") == 1
    broker.detach(session)
    again, present = broker.open_session(link, "a", False, 60, 5, "mallory")
    assert present and again is session
    assert _send(broker, b"2") == 0
    assert got == [b"1"]


class QosLink(LocalClient):
    """A local session that records each delivery's QoS and packet id."""

    def __init__(self, broker: Broker, cid: str) -> None:
        self.seen: list[tuple[bytes, int, int]] = []
        super().__init__(broker, cid, lambda m, _r: None)

    def send_delivery(self, d: Delivery) -> bool:
        self.seen.append((d.message.payload, d.qos, d.packet_id))
        return True


def test_plan_grants_each_subscription_its_qos() -> None:
    """QoS 1 and 2 messages take the plan too: each session gets min(message, subscription)
    QoS, a packet id when above 0 (what route's full path gives)."""
    broker = Broker(BrokerLimits())
    links = {q: QosLink(broker, f"s{q}") for q in (0, 1, 2)}
    for q, link in links.items():
        broker.subscribe(link.session, "t/1", SubOptions(q), None)
    for i, qos in enumerate((1, 2, 1, 0)):
        assert broker.publish(Message("t/1", b"%d" % i, qos)) == 3
    assert broker._plans.get("t/1") == (tuple(lk.session for lk in links.values()), (0, 1, 2))
    assert [s[:2] for s in links[0].seen] == [(b"0", 0), (b"1", 0), (b"2", 0), (b"3", 0)]
    assert [s[:2] for s in links[1].seen] == [(b"0", 1), (b"1", 1), (b"2", 1), (b"3", 0)]
    assert [s[:2] for s in links[2].seen] == [(b"0", 1), (b"1", 2), (b"2", 1), (b"3", 0)]
    assert [s[2] for s in links[2].seen[:3]] == [1, 2, 3]  # in flight, ids allocated
    assert set(links[2].session.inflight) == {1, 2, 3}
    broker.subscribe(links[2].session, "t/1", SubOptions(0), None)  # re-subscribed at QoS 0
    assert broker.publish(Message("t/1", b"4", 1)) == 3
    assert links[2].seen[-1][:2] == (b"4", 0) and links[1].seen[-1][:2] == (b"4", 1)
