"""CONNECT negotiation as a pure function: keep-alive, expiry, limits, CONNACK properties."""

from __future__ import annotations

from rapidmq_edge.broker.negotiation import ConnectionSettings, Terms, negotiate
from rapidmq_edge.broker.session import NEVER_EXPIRES
from rapidmq_edge.mqtt import reasons as rc
from rapidmq_edge.mqtt.packets import Connect


def terms(p: Connect, s: ConnectionSettings | None = None, assigned: str | None = None) -> Terms:
    t = negotiate(p, s or ConnectionSettings(), assigned)
    assert isinstance(t, Terms), t
    return t


def test_v311_clean_session_flag_maps_to_expiry() -> None:
    s = ConnectionSettings(max_session_expiry=3600)
    assert terms(Connect(4, "c", clean_start=True), s).session_expiry == 0
    assert terms(Connect(4, "c", clean_start=False), s).session_expiry == 3600
    unlimited = ConnectionSettings(max_session_expiry=NEVER_EXPIRES)
    assert terms(Connect(4, "c", clean_start=False), unlimited).session_expiry == NEVER_EXPIRES


def test_v5_expiry_capped_and_announced() -> None:
    s = ConnectionSettings(max_session_expiry=30)
    t = terms(Connect(5, "c", properties={"session_expiry_interval": 100}), s)
    assert t.session_expiry == 30
    assert t.connack_properties["session_expiry_interval"] == 30
    t = terms(Connect(5, "c", properties={"session_expiry_interval": 10}), s)
    assert t.session_expiry == 10 and "session_expiry_interval" not in t.connack_properties


def test_server_keep_alive_overrides_and_is_announced_in_v5() -> None:
    s = ConnectionSettings(server_keep_alive=7)
    t = terms(Connect(5, "c", keep_alive=60), s)
    assert t.keep_alive == 7 and t.connack_properties["server_keep_alive"] == 7
    assert terms(Connect(4, "c", keep_alive=60), s).keep_alive == 7


def test_keep_alive_above_maximum_refused_in_v311_lowered_in_v5() -> None:
    s = ConnectionSettings(max_keep_alive=60)
    assert negotiate(Connect(4, "c", keep_alive=120), s, None) == rc.CLIENT_IDENTIFIER_NOT_VALID
    t = terms(Connect(5, "c", keep_alive=120), s)
    assert t.keep_alive == 60 and t.connack_properties["server_keep_alive"] == 60
    t = terms(Connect(5, "c", keep_alive=0), s)  # "no keep-alive" is above any maximum
    assert t.keep_alive == 60


def test_client_limits_taken_from_connect_properties() -> None:
    p = Connect(5, "c", properties={
        "receive_maximum": 5, "maximum_packet_size": 1000, "topic_alias_maximum": 3,
    })
    t = terms(p, ConnectionSettings(max_inflight_messages=100))
    assert (t.send_quota, t.max_out_size, t.alias_max_out) == (5, 1000, 3)
    t = terms(Connect(4, "c"), ConnectionSettings(max_inflight_messages=20))
    assert (t.send_quota, t.alias_max_out) == (20, 0)


def test_connack_properties_describe_the_server() -> None:
    s = ConnectionSettings(receive_maximum=50, max_packet_size=4096, topic_alias_maximum=0,
                           max_qos=1, retain_available=False)
    props = terms(Connect(5, ""), s, assigned="auto-1").connack_properties
    assert props == {
        "assigned_client_identifier": "auto-1", "receive_maximum": 50,
        "maximum_packet_size": 4096, "maximum_qos": 1, "retain_available": 0,
    }
    assert terms(Connect(4, "c"), s).connack_properties == {}  # 3.1.1 has no properties
