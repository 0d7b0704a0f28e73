"""End-to-end chaos on the 3-node NATS JetStream cluster, bounded for CI (issue 16, part 4):
devices -> gateway (encrypt + sign, MQTT 3.1.1 upstream with the id frame) -> NATS (MQTT
listeners, R3 MQTT streams) -> 2 consumers (``--protocol 4 --partition I/2``) -> PostgreSQL,
while the gateway, the consumer owning its partition and the node the gateway is on are each
SIGKILLed and restarted (the node first: the cluster's elections and session reloads then
overlap the run). ``python3 bench/cloud_chaos.py`` runs it longer.

What is asserted: every device-acknowledged message is in PostgreSQL exactly once, verified and
decrypted — or, if the cluster lost it after acknowledging it, reported ``missing-message`` by
the consumers (the signed batch lists it): nothing is lost silently, nothing unverified or
tampered is written, nothing else is reported. nats-server 2.9.10 (Debian's) does lose a few
acknowledged messages for a resumed MQTT session around a node kill (docs/cloud.md: an
independent subscriber on the cluster received them, the consumer's session never did); the
count is printed, and a run on a build without that loss reads ``lost 0``."""

from __future__ import annotations

from pathlib import Path

import pytest

from .cloud_helpers import pg_dsn, pg_server  # noqa: F401 - fixtures
from .cloud_nats import nats_available, run_nats_chaos

pytestmark = [pytest.mark.interop, pytest.mark.slow, pytest.mark.timeout(120)]


def test_nats_cluster_chaos_every_device_acked_message_lands_once_or_is_reported(
    tmp_path: Path, pg_dsn: str,  # noqa: F811
) -> None:
    if not nats_available():
        pytest.skip("nats-server not installed")
    res = run_nats_chaos(tmp_path, pg_dsn, messages=900, rate=200.0, settle=30.0, observe=True)
    summary = res.summary()
    print(summary)
    assert [k.split("@")[0] for k in res.kills] == ["node0", "gateway", "consumer"], summary
    assert len(res.acked) >= 600, summary  # most were acknowledged despite the kills
    assert res.silent == 0, (sorted(res.lost)[:20], summary)
    assert len(res.lost) <= 40, summary  # the cluster's loss stays a handful, not a stream
    assert not res.duplicated, summary
    assert res.unencrypted == 0, summary  # every row came sealed and was decrypted
    assert set(res.rows) <= {f"m{i}" for i in range(res.sent)}, summary
    assert not res.unexpected_reports, (res.unexpected_reports[:5], summary)
