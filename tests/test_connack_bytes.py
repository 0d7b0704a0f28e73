"""The pre-built 3.1.1 CONNACKs the handshake sends are exactly what the codec encodes."""

from __future__ import annotations

import pytest

from rapidmq_edge.broker.connect_handshake import CONNACK_311
from rapidmq_edge.mqtt.codec import encode
from rapidmq_edge.mqtt.packets import Connack


@pytest.mark.parametrize("level", [3, 4])
@pytest.mark.parametrize("present", [False, True])
def test_prebuilt_connack_is_the_encoded_one(level: int, present: bool) -> None:
    assert CONNACK_311[present] == encode(Connack(present, 0, {}), level)
    assert CONNACK_311[present][2] == int(present)  # the Session Present flag
