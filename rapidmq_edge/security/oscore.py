"""OSCORE (RFC 8613) security contexts of CoAP devices: provisioning and loading.

One sub-directory of ``coap.oscore_dir`` per device, in aiocoap's
``FilesystemSecurityContext`` format; the directory's name is the MQTT user the device is
authorised as (same users and ACL as MQTT). ``rapidmq-edge oscore add NAME`` provisions one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..telemetry import RepeatedLog

__all__ = ["LiveContexts", "context_problems", "list_devices", "provision_device"]

log = logging.getLogger(__name__)


def provision_device(oscore_dir: Path | str, name: str) -> dict[str, Any]:
    """Create an OSCORE security context for device ``name`` under ``oscore_dir``.

    Writes ``<oscore_dir>/<name>/secret.json`` (the gateway's view: master secret and
    salt, its own sender id and the device's id as recipient id) and returns the device's
    view, in aiocoap's ``FilesystemSecurityContext`` format (``*_hex`` values), to be
    installed on the device. The device is then authorised as MQTT user ``name``.
    The gateway loads contexts at start-up.
    """
    if not name or "/" in name or name.startswith(".") or name != name.strip():
        raise ValueError(f"invalid device name {name!r}")
    base = Path(oscore_dir)
    kids = set()
    if base.is_dir():
        for sub in base.iterdir():
            with contextlib.suppress(OSError, ValueError, KeyError):
                kids.add(json.loads((sub / "secret.json").read_text())["recipient-id_hex"])
    device_id = secrets.token_hex(6)
    while device_id in kids:  # the recipient id selects the context: unique per device
        device_id = secrets.token_hex(6)
    ctx_dir = base / name
    ctx_dir.mkdir(parents=True, exist_ok=False)
    os.chmod(ctx_dir, 0o700)
    secret = secrets.token_hex(32)
    salt = secrets.token_hex(8)
    server_id = "00"
    gateway_view = {
        "sender-id_hex": server_id,
        "recipient-id_hex": device_id,
        "secret_hex": secret,
        "salt_hex": salt,
    }
    path = ctx_dir / "secret.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(gateway_view, fh, indent=2)
    return {
        "sender-id_hex": device_id,
        "recipient-id_hex": server_id,
        "secret_hex": secret,
        "salt_hex": salt,
    }


def _contexts(oscore_dir: Path) -> Iterator[tuple[str, Any]]:
    """(device name, its security context, or the exception loading it raised)."""
    from aiocoap.oscore import FilesystemSecurityContext

    for sub in sorted(oscore_dir.iterdir()):
        if not sub.is_dir() or sub.name.startswith("."):
            continue
        try:
            yield sub.name, FilesystemSecurityContext(str(sub) + "/")
        except Exception as exc:  # noqa: BLE001 - one bad context must not stop the rest
            yield sub.name, exc


class LiveContexts:
    """The contexts a running server serves (``creds``, and ``names``: context id -> device),
    kept equal to ``oscore_dir`` by :meth:`sync`: a device provisioned since is served, one
    whose context was removed (``erase --oscore``, by hand) is not any more."""

    def __init__(self, oscore_dir: Path) -> None:
        from aiocoap.credentials import CredentialsMap

        self.dir = oscore_dir
        self.creds = CredentialsMap()
        self.names: dict[int, str] = {}
        self._repeats = RepeatedLog(log)
        if not oscore_dir.is_dir():
            log.warning("coap.oscore_dir %s does not exist: no OSCORE devices", oscore_dir)
        self.sync()
        log.info("loaded %d OSCORE security contexts from %s", len(self.names), oscore_dir)

    def sync(self) -> tuple[list[str], list[str]]:
        """Load the contexts added to the directory, drop the removed ones: (added, removed).
        A context that does not load is logged (once, then counted) and tried again."""
        from aiocoap.oscore import FilesystemSecurityContext

        try:
            present = set(list_devices(self.dir))
        except OSError:
            present = set()
        loaded = {key[1:] for key in self.creds}
        added, removed = [], []
        for name in sorted(present - loaded):
            try:
                ctx = FilesystemSecurityContext(str(self.dir / name) + "/")
            except Exception as exc:  # noqa: BLE001 - one bad context must not stop the rest
                self._repeats(name, logging.ERROR, "OSCORE context %s not loaded: %s",
                              self.dir / name, exc)
                continue
            self._repeats.clear(name)
            self.creds[":" + name] = ctx
            self.names[id(ctx)] = name
            added.append(name)
        for name in sorted(loaded - present):
            ctx = self.creds.pop(":" + name)
            self.names.pop(id(ctx), None)
            removed.append(name)
        return added, removed


def context_problems(oscore_dir: Path) -> list[str]:
    """What :class:`LiveContexts` would not load (``check-config``): one line per bad
    context."""
    if not oscore_dir.is_dir():
        return []
    return [f"context {name}: {ctx}" for name, ctx in _contexts(oscore_dir)
            if isinstance(ctx, Exception)]


def list_devices(oscore_dir: Path | str) -> list[str]:
    """Names of the devices provisioned under ``oscore_dir``."""
    base = Path(oscore_dir)
    if not base.is_dir():
        return []
    return sorted(d.name for d in base.iterdir()
                  if d.is_dir() and (d / "secret.json").is_file())
