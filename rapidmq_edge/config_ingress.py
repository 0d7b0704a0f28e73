"""Configuration of the non-MQTT ingress: ``[coap]`` and ``[http]``.

Validated with the same rules and messages as :mod:`rapidmq_edge.config`.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .config_checks import _bool, _err, _int, _path, _show, _str, _Table
from .config_mqtt import TlsSettings, parse_tls


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One ``listen`` URL of a non-MQTT listener."""

    url: str
    scheme: str
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class CoapSettings:
    """``[coap]``: the CoAP publish-subscribe broker (RFC 7252, draft-ietf-core-coap-pubsub)."""

    listen: tuple[Endpoint, ...] = ()
    max_payload: int = 65536
    oscore_dir: Path | None = None  # per-device OSCORE security contexts
    require_oscore: bool = False
    max_pending: int = 10000  # publications awaiting their commit; more: 4.29
    retry_after: int = 2  # Max-Age (s) of 4.29 and 5.03 answers
    dedup_entries: int = 100000  # remembered (remote, message id) responses


@dataclass(frozen=True, slots=True)
class HttpSettings:
    """``[http]``: the small HTTP API (publish, subscribe as SSE, health)."""

    listen: tuple[Endpoint, ...] = ()
    tokens_file: Path | None = None
    max_body: int = 1048576
    tls: TlsSettings | None = None  # required by https:// listeners


_DEFAULT_PORTS = {"udp": 5683, "http": 8080, "https": 8443}


def _endpoints(key: str, value: Any, schemes: tuple[str, ...]) -> tuple[Endpoint, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise _err(key, f"must be an array of URLs, got {_show(value)}")
    out = []
    for i, item in enumerate(value):
        k = f"{key}[{i}]"
        url = _str(k, item)
        parts = urlsplit(url)
        if parts.scheme not in schemes or not parts.hostname:
            want = " or ".join(f'"{s}://host:port"' for s in schemes)
            raise _err(k, f"must look like {want}, got {url!r}")
        try:
            port = parts.port if parts.port is not None else _DEFAULT_PORTS[parts.scheme]
        except ValueError:
            raise _err(k, f"invalid port in {url!r}") from None
        host = parts.hostname
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if host != "localhost":
                raise _err(k, f"host must be an IP address or localhost, got {host!r}") from None
        out.append(Endpoint(url, parts.scheme, host, port))
    return tuple(out)


def parse_coap(data: object, base_dir: Path) -> CoapSettings:
    """Validate ``[coap]``."""
    t = _Table(data, "coap", ("listen", "max_payload", "oscore_dir", "require_oscore",
                              "max_pending", "retry_after", "dedup_entries"))
    return CoapSettings(
        listen=t.get("listen", lambda k, v: _endpoints(k, v, ("udp",)), ()),
        max_payload=t.get("max_payload", _int(16, 16 * 1024 * 1024), 65536),
        oscore_dir=t.get("oscore_dir", _path(base_dir), None),
        require_oscore=t.get("require_oscore", _bool, False),
        max_pending=t.get("max_pending", _int(1, 1_000_000), 10000),
        retry_after=t.get("retry_after", _int(1, 3600), 2),
        dedup_entries=t.get("dedup_entries", _int(1000, 10_000_000), 100000),
    )


def parse_http(data: object, base_dir: Path) -> HttpSettings:
    """Validate ``[http]``."""
    t = _Table(data, "http", ("listen", "tokens_file", "max_body", "tls"))
    settings = HttpSettings(
        listen=t.get("listen", lambda k, v: _endpoints(k, v, ("http", "https")), ()),
        tokens_file=t.get("tokens_file", _path(base_dir), None),
        max_body=t.get("max_body", _int(16, 64 * 1024 * 1024), 1048576),
        tls=parse_tls(t.data["tls"], base_dir, "http.tls") if "tls" in t.data else None,
    )
    for i, ep in enumerate(settings.listen):
        if ep.scheme == "https" and settings.tls is None:
            raise _err("http.tls", f"required because http.listen[{i}] is {ep.url}")
    return settings
