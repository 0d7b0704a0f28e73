"""The operator side of the transport: put an update on the cluster.

Every chunk of the payload is published retained at QoS 1 to
``{prefix}/payload/{digest_hex}/{index}``; only when all are acknowledged is the signed
envelope published retained to ``{prefix}/manifest/{gateway_class}/{component}``, so a
gateway never sees a manifest whose chunks are missing. The chunk size must be the one the
manifest was signed with (pass its digests to have them checked against the payload).
"""

from __future__ import annotations

import asyncio
import os
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .download import MAX_CHUNK_SIZE, plan_chunks
from .fetch import chunk_topic
from .link import DEFAULT_PREFIX, OtaLink

__all__ = ["DEFAULT_CHUNK_SIZE", "PublishReport", "manifest_topic", "publish_files",
           "publish_update"]

DEFAULT_CHUNK_SIZE = 64 * 1024


@dataclass(frozen=True, slots=True)
class PublishReport:
    """What :func:`publish_update` put on the cluster."""

    manifest_topic: str
    payload_digest: bytes
    payload_bytes: int
    chunks: int
    seconds: float


def manifest_topic(prefix: str, gateway_class: str, component: str) -> str:
    """``{prefix}/manifest/{gateway_class}/{component}``; ValueError for a name that is not
    one plain topic level."""
    for what, name in (("gateway class", gateway_class), ("component", component)):
        if not name or any(c in name for c in "/+#\0"):
            raise ValueError(f"{what} {name!r} must be one topic level (no / + # or NUL)")
    return f"{prefix.rstrip('/')}/manifest/{gateway_class}/{component}"


async def publish_update(
    url: str | Sequence[str],
    envelope: bytes,
    payload: bytes,
    *,
    gateway_class: str,
    component: str,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    prefix: str = DEFAULT_PREFIX,
    payload_digest: bytes | None = None,
    chunk_digests: Sequence[bytes] | None = None,
    username: str | None = None,
    password: str | None = None,
    tls: ssl.SSLContext | None = None,
    version: int = 5,
    client_id: str | None = None,
    timeout: float = 120.0,
) -> PublishReport:
    """Publish ``payload`` in chunks, then ``envelope`` (see the module docstring).

    ``payload_digest`` / ``chunk_digests`` (from the signed manifest) are checked against
    the payload first: ValueError names the mismatch. TimeoutError after ``timeout`` s
    without the broker's acknowledgements."""
    if not envelope:
        raise ValueError("empty manifest envelope")
    if not payload:
        raise ValueError("empty payload")
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk size {chunk_size} outside 1..{MAX_CHUNK_SIZE}")
    topic = manifest_topic(prefix, gateway_class, component)
    plan = plan_chunks(payload, chunk_size)
    if payload_digest is not None and payload_digest != plan.payload_digest:
        raise ValueError("the payload's SHA-256 is not the manifest's payload digest")
    if chunk_digests is not None and tuple(chunk_digests) != plan.chunk_digests:
        raise ValueError(f"the manifest's chunk digests are not those of the payload cut "
                         f"into {chunk_size}-byte chunks")
    urls = [url] if isinstance(url, str) else list(url)
    cid = client_id or f"ota-publisher-{os.getpid()}-{os.urandom(3).hex()}"
    link = OtaLink(urls, cid, client_id=cid, prefix=prefix, username=username,
                   password=password, tls=tls, version=version, will=False)
    started = time.monotonic()
    runner = asyncio.create_task(link.run())
    try:
        async with asyncio.timeout(timeout):
            await asyncio.gather(*(
                link.publish(chunk_topic(prefix, plan.payload_digest, i),
                             payload[i * chunk_size:(i + 1) * chunk_size], 1, True)
                for i in range(len(plan.chunk_digests))))
            await link.publish(topic, envelope, 1, True)  # last: its chunks are all there
    finally:
        await link.stop()
        await asyncio.wait_for(runner, 5)
    return PublishReport(topic, plan.payload_digest, len(payload), len(plan.chunk_digests),
                         time.monotonic() - started)


async def publish_files(
    url: str | Sequence[str],
    manifest_path: Path | str,
    payload_path: Path | str,
    gateway_class: str,
    component: str,
    prefix: str = DEFAULT_PREFIX,
    **options: object,
) -> PublishReport:
    """:func:`publish_update` with the envelope and payload read from files (the CLI's
    ``rapidmq-edge ota publish``); ``options`` are its keyword arguments."""
    envelope = Path(manifest_path).read_bytes()
    payload = Path(payload_path).read_bytes()
    return await publish_update(url, envelope, payload, gateway_class=gateway_class,
                                component=component, prefix=prefix, **options)  # type: ignore[arg-type]

