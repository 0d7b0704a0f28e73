"""``[ota]`` assembled: the OTA agent of a running gateway (docs/ota.md).

The agent's link goes to the ``[[upstream]]`` ``[ota] upstream`` names (default the first),
with that upstream's URLs, credentials and TLS; its models live in the runtime's
:class:`~rapidmq_edge.ota.activate.RuntimeModelHost`. Payloads encrypted to this gateway are
opened with its recipient keys (``keys init --recipient``), when it has any.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..config import Config

if TYPE_CHECKING:  # the OTA parts are imported only by a gateway that uses them
    from ..ota.agent import OtaAgent
    from ..ota.feedback_upload import FeedbackService

__all__ = ["build_feedback", "build_ota_agent"]

log = logging.getLogger("rapidmq_edge")

#: the model slots the runtime can swap (not the anomaly detector's fault-kind classifier,
#: which the stream table holds: it ships with the gateway)
RUNTIME_COMPONENTS = ("priority", "threat")


def _recipient(config: Config) -> Any:
    """This gateway's recipient keyring, or None (no recipient key / locked)."""
    from ..crypto.keystore import KeyStore

    sec = config.forwarding.security
    keys_dir = sec.keys_dir or config.gateway.data_dir / "keys"
    try:
        store = KeyStore(keys_dir)
        if not store.keys("recipient"):
            return None
        passphrase = None
        if sec.passphrase_file is not None:
            passphrase = sec.passphrase_file.read_bytes().strip()
        elif os.environ.get("RAPIDMQ_KEY_PASSPHRASE"):
            passphrase = os.environ["RAPIDMQ_KEY_PASSPHRASE"].encode()
        return store.recipient_keyring(passphrase)
    except Exception as exc:  # encrypted updates are then refused with "not-a-recipient"
        log.warning("ota: no recipient key for encrypted updates: %s", exc)
        return None


def build_ota_agent(config: Config, host: Any) -> OtaAgent | None:
    """The agent for ``config`` (None when ``[ota]`` is off); ``host``: the runtime's
    model host (None without ``[intelligence]``: nothing to update, said once)."""
    ota = config.ota
    if not ota.enabled:
        return None
    from ..ota.agent import OtaAgent
    from ..ota.link import OtaLink
    from ..ota.sequences import SequenceStore
    from ..ota.trust import TrustAnchors

    if host is None:
        log.warning("ota: [ota] is on but [intelligence] is off: no model to update")
        return None
    ups = config.forwarding.upstreams
    up = next((u for u in ups if u.name == ota.upstream), None) if ota.upstream else \
        (ups[0] if ups else None)
    if up is None:
        log.warning("ota: no [[upstream]] %s to take updates from",
                    repr(ota.upstream) if ota.upstream else "configured")
        return None
    components = []
    for c in RUNTIME_COMPONENTS:
        try:
            host.active(c)
        except ValueError as exc:  # e.g. the threat watch off: its manifests are refused
            log.info("ota: no %s updates here: %s", c, exc)
        else:
            components.append(c)
    gid = config.gateway.id
    link = OtaLink.from_upstream(up, gid, prefix=ota.prefix, presence={
        "class": ota.gateway_class, "version": __version__})
    data_dir = config.gateway.data_dir
    return OtaAgent(
        link=link, trust=TrustAnchors.from_files(ota.trust, threshold=ota.trust_threshold),
        sequences=SequenceStore.in_data_dir(data_dir), host=host,
        work_dir=data_dir / "ota", gateway_id=gid, gateway_class=ota.gateway_class,
        gateway_version=__version__, prefix=ota.prefix,
        max_payload_bytes=ota.max_payload_bytes, window=ota.chunk_window,
        bandwidth=float(ota.bandwidth), recipient=_recipient(config),
        components=components)


def build_feedback(config: Config, agent: OtaAgent | None) -> FeedbackService | None:
    """The feedback loop's gateway side (None without ``[intelligence]``): incident verdicts
    are always kept; rows are sampled and everything uploaded over the agent's link when
    ``[ota] feedback`` is on (said once when it cannot be)."""
    if not config.intelligence.enabled:
        return None
    from ..ota.feedback import FeedbackSampler
    from ..ota.feedback_upload import FeedbackService
    from ..ota.verdicts import VerdictStore

    ota = config.ota
    store = VerdictStore.in_data_dir(config.gateway.data_dir)
    if not ota.feedback:
        return FeedbackService(store)
    if agent is None:
        log.warning("ota: [ota] feedback is on but there is no OTA link to upload on")
        return FeedbackService(store)
    sampler = FeedbackSampler("priority", ota.feedback_rows_per_minute, ota.feedback_buffer)
    return FeedbackService(store, sampler, link=agent.link, gateway_id=config.gateway.id,
                           prefix=ota.prefix, interval=ota.feedback_interval)
