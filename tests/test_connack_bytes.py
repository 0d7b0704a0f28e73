"""The pre-built 3.1.1 CONNACKs the handshake sends and the SUBACKs the broker writes without
building a packet are exactly what the codec encodes."""

from __future__ import annotations

import pytest

from rapidmq_edge.broker.connect_handshake import CONNACK_311
from rapidmq_edge.mqtt.codec import encode, suback_bytes
from rapidmq_edge.mqtt.packets import Connack, Suback


@pytest.mark.parametrize("level", [3, 4])
@pytest.mark.parametrize("present", [False, True])
def test_prebuilt_connack_is_the_encoded_one(level: int, present: bool) -> None:
    assert CONNACK_311[present] == encode(Connack(present, 0, {}), level)
    assert CONNACK_311[present][2] == int(present)  # the Session Present flag


@pytest.mark.parametrize("level", [3, 4, 5])
def test_suback_bytes_are_the_encoded_ones(level: int) -> None:
    """The SUBACK the broker writes without building a packet equals the codec's."""
    for pid in (1, 255, 256, 0x1234, 65535):
        for codes in ([0], [1], [2], [0x80], [0x87], [0x8F], [0, 1, 0x80], [2] * 130):
            assert suback_bytes(pid, codes, level == 5) == encode(Suback(pid, codes), level)
