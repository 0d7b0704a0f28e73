"""The operator's side on a cluster: publish an update, roll it out in stages, see the fleet.

* :func:`publish_signed`: the payload's chunks retained, then the manifest retained on the
  class topic or on named gateways' own topics (``{prefix}/manifest/gw/<id>/<component>``).
* :func:`run_rollout`: a :class:`~.rollout.Rollout` driven by the fleet's retained state
  documents; its state is saved to a file after every step, so the same command resumes.
* :func:`fleet_view`: the retained state documents collected for a moment.

Nothing here verifies a manifest: the operator signed it. Chunking follows the signed
manifest (its chunk size and digests), so gateways check every chunk against the signature.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .fetch import chunk_topic
from .link import OtaLink
from .manifest import Manifest, decode_manifest, parse_envelope
from .publish import manifest_topic
from .report import FleetView
from .rollout import DEFAULT_STAGES, Rollout

__all__ = ["Cluster", "fleet_view", "gateway_manifest_topic", "publish_signed", "read_signed",
           "run_rollout"]


@dataclass(frozen=True)
class Cluster:
    """Where and how the operator connects (an MQTT URL list and credentials)."""

    urls: Sequence[str]
    prefix: str = "rapidmq/ota"
    username: str | None = None
    password: str | None = None
    version: int = 5

    def link(self) -> OtaLink:
        """A link of its own (no will: an operator is not a gateway)."""
        cid = f"ota-operator-{os.getpid()}-{os.urandom(3).hex()}"
        return OtaLink(list(self.urls), cid, client_id=cid, prefix=self.prefix,
                       username=self.username, password=self.password, version=self.version,
                       will=False)


def gateway_manifest_topic(prefix: str, gateway_id: str, component: str) -> str:
    """A manifest for one gateway (a rollout's early stages)."""
    return f"{prefix.rstrip('/')}/manifest/gw/{gateway_id}/{component}"


def read_signed(manifest_path: Path, payload_path: Path) -> tuple[Manifest, bytes, bytes]:
    """(manifest, envelope, payload) from ``ota sign``'s files; ValueError when the payload
    is not the one the manifest names."""
    import hashlib

    envelope = Path(manifest_path).read_bytes()
    body, _, _ = parse_envelope(envelope)
    m = decode_manifest(body)
    payload = Path(payload_path).read_bytes()
    if len(payload) != m.payload_size or hashlib.sha256(payload).digest() != m.payload_digest:
        raise ValueError(f"{payload_path} is not the payload {manifest_path} names")
    return m, envelope, payload


async def _chunks(link: OtaLink, prefix: str, m: Manifest, payload: bytes) -> None:
    await asyncio.gather(*(
        link.publish(chunk_topic(prefix, m.payload_digest, i),
                     payload[i * m.chunk_size:(i + 1) * m.chunk_size], 1, True)
        for i in range(m.chunk_count)))


async def publish_signed(cluster: Cluster, manifest_path: Path, payload_path: Path,
                         gateways: Sequence[str] = (), timeout: float = 120.0) -> dict[str, Any]:
    """Chunks, then the manifest: on the class topic, or on each of ``gateways``' topics."""
    m, envelope, payload = read_signed(manifest_path, payload_path)
    link = cluster.link()
    runner = asyncio.create_task(link.run())
    t0 = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            await _chunks(link, cluster.prefix, m, payload)
            topics = ([gateway_manifest_topic(cluster.prefix, g, m.component) for g in gateways]
                      or [manifest_topic(cluster.prefix, m.gateway_class, m.component)])
            for t in topics:
                await link.publish(t, envelope, 1, True)
    finally:
        await link.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(runner, 5)
    return {"component": m.component, "sequence": m.sequence, "class": m.gateway_class,
            "topics": topics, "chunks": m.chunk_count, "payload_bytes": m.payload_size,
            "seconds": round(time.monotonic() - t0, 3)}


async def _watch(link: OtaLink, view: FleetView) -> None:
    async def take(topic: str, payload: bytes, retained: bool) -> None:
        view.take(topic, payload)

    link.add_listener(take)
    await link.subscribe(f"{view.prefix}/state/#", 1)


async def _settle(view: FleetView, quiet: float, limit: float) -> None:
    """Wait until the retained documents stop coming (``quiet`` s) or ``limit`` s pass."""
    deadline = time.monotonic() + limit
    seen = -1
    while time.monotonic() < deadline:
        n = len(view.gateways) + len(view.components)
        if n == seen:
            return
        seen = n
        await asyncio.sleep(quiet)


async def fleet_view(cluster: Cluster, wait: float = 2.0) -> FleetView:
    """The fleet's retained state documents, collected until they stop coming."""
    view = FleetView(cluster.prefix.rstrip("/"))
    link = cluster.link()
    runner = asyncio.create_task(link.run())
    try:
        if not await link.wait_online(wait + 5.0):
            raise ConnectionError(f"cannot reach {', '.join(cluster.urls)}")
        await _watch(link, view)
        await _settle(view, 0.5, wait)
    finally:
        await link.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(runner, 5)
    return view


async def run_rollout(cluster: Cluster, manifest_path: Path, payload_path: Path,
                      state_file: Path, *, stages: Sequence[str] = DEFAULT_STAGES,
                      max_failure: float = 0.2, stage_timeout: float = 600.0,
                      poll: float = 0.5, fleet: Sequence[str] | None = None,
                      on_step: Callable[[str], None] = print,
                      clock: Callable[[], float] = time.time) -> dict[str, Any]:
    """Roll the signed update out in stages (see :mod:`.rollout`); resumes from
    ``state_file`` when it holds the same component and sequence. ``fleet``: the gateway ids
    to roll out to (default: every gateway of the manifest's class that has reported)."""
    m, envelope, payload = read_signed(manifest_path, payload_path)
    ro: Rollout | None = None
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        saved = Rollout.from_dict(json.loads(Path(state_file).read_text()))
        if (saved.component, saved.sequence) == (m.component, m.sequence):
            ro = saved
            on_step(f"resuming at stage {ro.stage + 1} of {len(ro.stages)}")
    if ro is None:
        ro = Rollout(m.component, m.sequence, tuple(stages), max_failure, stage_timeout)
    view = FleetView(cluster.prefix.rstrip("/"))
    link = cluster.link()
    runner = asyncio.create_task(link.run())

    def save() -> None:
        assert ro is not None
        tmp = Path(state_file).with_suffix(".tmp")
        tmp.write_text(json.dumps(ro.to_dict(), indent=1))
        os.replace(tmp, state_file)

    try:
        if not await link.wait_online(30.0):
            raise ConnectionError(f"cannot reach {', '.join(cluster.urls)}")
        await _watch(link, view)
        await _settle(view, 0.5, 5.0)
        await _chunks(link, cluster.prefix, m, payload)
        while True:
            members = list(fleet) if fleet is not None else view.members(m.gateway_class)
            ro.observe(view.reports(m.component))
            step = ro.step(members, clock())
            for g in step.targets:
                await link.publish(gateway_manifest_topic(cluster.prefix, g, m.component),
                                   envelope, 1, True)
            if step.to_class:
                await link.publish(manifest_topic(cluster.prefix, m.gateway_class, m.component),
                                   envelope, 1, True)
            if step.targets or step.to_class:
                on_step(f"stage {ro.stage + 1}/{len(ro.stages)}: "
                        f"{len(ro.targeted)} of {len(members)} gateways"
                        + (" + the class topic" if step.to_class else ""))
            save()
            if step.done or step.halted:
                on_step(("halted: " if step.halted else "done: ") + step.reason)
                break
            await asyncio.sleep(poll)
    finally:
        await link.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(runner, 5)
    return {**ro.to_dict(), "succeeded": sorted(ro.succeeded)}
