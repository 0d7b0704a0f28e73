"""End-to-end chaos, bounded for CI (issue 16, part 4): devices -> gateway (encrypt + sign)
-> Mosquitto 2 -> 2 consumers (``--partition``) -> PostgreSQL, while the gateway and a
consumer are killed with SIGKILL and the broker is restarted, each in turn. (Mosquitto is one
node: a SIGKILL of it loses what it acknowledged since its last save, and a restart forgets
``$share`` subscriptions — bench/cloud_ingest.py ``--chaos`` measures both; the signed path
cannot cross NATS's 3.1.1 MQTT yet, see docs/cloud.md.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from .cloud_chaos import run_chaos
from .cloud_helpers import pg_dsn, pg_server  # noqa: F401 - fixtures

pytestmark = [pytest.mark.interop, pytest.mark.slow, pytest.mark.timeout(150)]


def test_every_device_acknowledged_message_lands_once_verified_and_decrypted(
    tmp_path: Path, pg_dsn: str,  # noqa: F811
) -> None:
    res = run_chaos(tmp_path, pg_dsn, messages=800, rate=250.0, consumers=2, rounds=1)
    summary = res.summary()
    assert len(res.kills) == 3, summary
    assert len(res.acked) >= 600, summary  # most were acknowledged despite the kills
    assert not res.lost, (sorted(res.lost)[:20], summary)
    assert not res.duplicated, summary
    assert res.unencrypted == 0, summary  # every row came sealed and was decrypted
    assert set(res.rows) <= {f"m{i}" for i in range(res.sent)}, summary
    assert not res.bad_reports, (res.bad_reports[:5], summary)
