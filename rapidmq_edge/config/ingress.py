"""Configuration of the non-MQTT ingress: ``[coap]`` and ``[http]``.

Validated with the same rules and messages as :mod:`rapidmq_edge.config`.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checks import (
    Table,
    boolean,
    config_error,
    int_range,
    path_under,
    show,
    string,
    url_parts,
)
from .mqtt import TlsSettings, parse_tls


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
        raise config_error(key, f"must be an array of URLs, got {show(value)}")
    out = []
    for i, item in enumerate(value):
        k = f"{key}[{i}]"
        url = string(k, item)
        parts = url_parts(k, url)
        if parts.scheme not in schemes or not parts.hostname:
            want = " or ".join(f'"{s}://host:port"' for s in schemes)
            raise config_error(k, f"must look like {want}, got {url!r}")
        try:
            port = parts.port if parts.port is not None else _DEFAULT_PORTS[parts.scheme]
        except ValueError:
            raise config_error(k, f"invalid port in {url!r}") from None
        host = parts.hostname
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if host != "localhost":
                raise config_error(
                    k, f"host must be an IP address or localhost, got {host!r}") from None
        out.append(Endpoint(url, parts.scheme, host, port))
    return tuple(out)


def parse_coap(data: object, base_dir: Path) -> CoapSettings:
    """Validate ``[coap]``."""
    t = Table(data, "coap", ("listen", "max_payload", "oscore_dir", "require_oscore",
                              "max_pending", "retry_after", "dedup_entries"))
    return CoapSettings(
        listen=t.get("listen", lambda k, v: _endpoints(k, v, ("udp",)), ()),
        max_payload=t.get("max_payload", int_range(16, 16 * 1024 * 1024), 65536),
        oscore_dir=t.get("oscore_dir", path_under(base_dir), None),
        require_oscore=t.get("require_oscore", boolean, False),
        max_pending=t.get("max_pending", int_range(1, 1_000_000), 10000),
        retry_after=t.get("retry_after", int_range(1, 3600), 2),
        dedup_entries=t.get("dedup_entries", int_range(1000, 10_000_000), 100000),
    )


def parse_http(data: object, base_dir: Path) -> HttpSettings:
    """Validate ``[http]``."""
    t = Table(data, "http", ("listen", "tokens_file", "max_body", "tls"))
    settings = HttpSettings(
        listen=t.get("listen", lambda k, v: _endpoints(k, v, ("http", "https")), ()),
        tokens_file=t.get("tokens_file", path_under(base_dir), None),
        max_body=t.get("max_body", int_range(16, 64 * 1024 * 1024), 1048576),
        tls=parse_tls(t.data["tls"], base_dir, "http.tls") if "tls" in t.data else None,
    )
    for i, ep in enumerate(settings.listen):
        if ep.scheme == "https" and settings.tls is None:
            raise config_error("http.tls", f"required because http.listen[{i}] is {ep.url}")
    return settings
