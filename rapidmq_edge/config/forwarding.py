"""Store-and-forward configuration: ``[[upstream]]``, ``[[forward]]``, ``[[downstream]]``,
``[queue]``.

Validated with the same rules and messages as :mod:`rapidmq_edge.config`.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, cast

from ..mqtt.topics import valid_topic_filter
from .checks import (
    Table,
    boolean,
    config_error,
    existing_file,
    float_range,
    int_range,
    items,
    one_of,
    section,
    show,
    string,
    url_parts,
)
from .security import SecuritySettings, check_protected_rules, parse_security

#: priority class names and numbers (0 drains first)
PRIORITIES: dict[str, int] = {"alarm": 0, "high": 1, "normal": 2, "bulk": 3}
Policy = Literal["drop_oldest", "refuse_new"]
#: ``[[upstream]] endpoint_policy`` values (see :mod:`rapidmq_edge.uplink.endpoint_policy`)
ENDPOINT_POLICIES = ("ordered", "round_robin", "bandit")


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    """One ``[[upstream]]``: a broker cluster, its node URLs in failover order."""

    name: str
    urls: tuple[str, ...]
    topic_prefix: str = "edge/{gateway_id}/"
    protocol: int = 5
    client_id: str = "{gateway_id}"
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    keep_alive: int = 30
    window: int = 100
    rate_limit: float = 0.0
    heartbeat_interval: float = 30.0
    endpoint_policy: str = "ordered"
    endpoint_dwell: float = 5.0
    reconnect_max_s: float = 30.0  # longest reconnect backoff delay

    def client_tls(self) -> ssl.SSLContext | None:
        """The client TLS context for ``mqtts://`` URLs (None without one); raises OSError /
        ssl.SSLError for unreadable CA, certificate or key files."""
        if not any(u.startswith("mqtts://") for u in self.urls):
            return None
        ctx = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
        if self.cert is not None and self.key is not None:
            ctx.load_cert_chain(str(self.cert), str(self.key))
        return ctx


@dataclass(frozen=True, slots=True)
class ForwardRule:
    """One ``[[forward]]``: local messages matching ``filter`` go to ``upstream``."""

    filter: str
    upstream: str
    qos: int = 1
    priority: int = 2
    ttl: float = 0.0
    topic_prefix: str | None = None  # overrides the upstream's prefix
    encrypt: bool = False  # session AEAD envelope (docs/crypto.md)
    sign: bool = False  # leaf in the signed batch chain
    #: ``priority`` was set: the intelligence runtime's class does not override it
    priority_explicit: bool = False
    #: a tenant's rule: ``filter`` is under its mountpoint (``mount``), which is replaced by
    #: the prefix upstream (``{tenant}`` in the prefix, else the tenant as one more level)
    tenant: str | None = None
    mount: str = ""


@dataclass(frozen=True, slots=True)
class DownstreamRule:
    """One ``[[downstream]]``: upstream topics matching ``filter`` are published locally."""

    upstream: str
    filter: str
    qos: int = 1
    strip_prefix: str = ""
    local_prefix: str = ""


@dataclass(frozen=True, slots=True)
class ClassLimitSettings:
    """Bounds of one priority class in the queue (0 = unlimited)."""

    max_messages: int = 0
    max_bytes: int = 0
    max_age: float = 0.0
    policy: Policy = "drop_oldest"


def _default_classes() -> dict[int, ClassLimitSettings]:
    return {
        0: ClassLimitSettings(policy="refuse_new"),
        1: ClassLimitSettings(),
        2: ClassLimitSettings(),
        3: ClassLimitSettings(),
    }


@dataclass(frozen=True, slots=True)
class QueueSettings:
    """``[queue]``: durability and bounds of the store-and-forward queue."""

    durability: Literal["fsync", "normal"] = "fsync"
    commit_delay_ms: float = 5.0
    max_bytes: int = 0
    classes: dict[int, ClassLimitSettings] = field(default_factory=_default_classes)


@dataclass(frozen=True, slots=True)
class ForwardingSettings:
    """Everything about store-and-forward; empty upstreams = a local broker only."""

    upstreams: tuple[UpstreamSettings, ...] = ()
    forward: tuple[ForwardRule, ...] = ()
    downstream: tuple[DownstreamRule, ...] = ()
    queue: QueueSettings = field(default_factory=QueueSettings)
    security: SecuritySettings = field(default_factory=SecuritySettings)


def _priority(key: str, value: Any) -> int:
    if isinstance(value, str) and value in PRIORITIES:
        return PRIORITIES[value]
    names = ", ".join(f'"{n}"' for n in PRIORITIES)
    raise config_error(key, f"must be one of {names}, got {show(value)}")


def _filter(key: str, value: Any) -> str:
    f = string(key, value)
    if not valid_topic_filter(f.replace("{gateway_id}", "x")):
        raise config_error(key, f"must be a valid MQTT topic filter, got {show(value)}")
    return f


def _urls(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise config_error(key, f"must be a non-empty array of URLs, got {show(value)}")
    out = []
    for i, u in enumerate(value):
        k = f"{key}[{i}]"
        url = string(k, u)
        parts = url_parts(k, url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise config_error(
                k, f'must look like "mqtt://host:port" or "mqtts://host:port", got {url!r}')
        try:
            parts.port  # noqa: B018 - validates the port
        except ValueError:
            raise config_error(k, f"invalid port in {url!r}") from None
        if url in out:
            raise config_error(k, f"duplicate URL {url!r}")
        out.append(url)
    return tuple(out)


def _upstream(data: object, key: str, base_dir: Path) -> UpstreamSettings:
    t = Table(data, key, (
        "name", "urls", "topic_prefix", "protocol", "client_id", "username", "password",
        "ca_file", "cert", "key", "keep_alive", "window", "rate_limit", "heartbeat_interval",
        "endpoint_policy", "endpoint_dwell", "reconnect_max_s",
    ))
    for name in ("name", "urls"):
        if name not in t.data:
            raise config_error(t.sub(name), "required")
    files = existing_file(base_dir)
    up = UpstreamSettings(
        name=t.get("name", string, ""),
        urls=t.get("urls", _urls, ()),
        topic_prefix=t.get("topic_prefix", string, "edge/{gateway_id}/"),
        protocol=t.get("protocol", int_range(4, 5), 5),
        client_id=t.get("client_id", string, "{gateway_id}"),
        username=t.get("username", string, None),
        password=t.get("password", string, None),
        ca_file=t.get("ca_file", files, None),
        cert=t.get("cert", files, None),
        key=t.get("key", files, None),
        keep_alive=t.get("keep_alive", int_range(0, 65535), 30),
        window=t.get("window", int_range(1, 65535), 100),
        rate_limit=t.get("rate_limit", float_range(0.0, 10_000_000.0), 0.0),
        heartbeat_interval=t.get("heartbeat_interval", float_range(0.0, 86400.0), 30.0),
        endpoint_policy=t.get("endpoint_policy", one_of(*ENDPOINT_POLICIES), "ordered"),
        endpoint_dwell=t.get("endpoint_dwell", float_range(0.1, 86400.0), 5.0),
        reconnect_max_s=t.get("reconnect_max_s", float_range(0.1, 86400.0), 30.0),
    )
    if not up.name:
        raise config_error(t.sub("name"), "must not be empty")
    if (up.cert is None) != (up.key is None):
        raise config_error(t.sub("key" if up.key is None else "cert"), "cert and key go together")
    return up


def _forward(data: object, key: str, upstreams: set[str],
             mountpoint: str = "tenants/${tenant}/") -> ForwardRule:
    t = Table(data, key, (
        "filter", "upstream", "qos", "priority", "ttl", "topic_prefix", "encrypt", "sign",
        "tenant"))
    for name in ("filter", "upstream"):
        if name not in t.data:
            raise config_error(t.sub(name), "required")
    rule = ForwardRule(
        filter=t.get("filter", _filter, "#"),
        upstream=t.get("upstream", string, ""),
        qos=t.get("qos", int_range(0, 1), 1),
        priority=t.get("priority", _priority, 2),
        ttl=t.get("ttl", float_range(0.0, 10 * 365 * 86400.0), 0.0),
        topic_prefix=t.get("topic_prefix", string, None),
        encrypt=t.get("encrypt", boolean, False),
    )
    rule = replace(rule, sign=t.get("sign", boolean, rule.encrypt),
                   priority_explicit="priority" in t.data)
    tenant = t.get("tenant", string, "") or None
    if tenant is not None:
        if any(c in tenant for c in "/+#$") or not tenant.isprintable():
            raise config_error(t.sub("tenant"), f"must be a tenant name, got {show(tenant)}")
        mount = mountpoint.replace("${tenant}", tenant)
        # the tenant's own topics only: its filter is read below its mountpoint
        rule = replace(rule, tenant=tenant, mount=mount, filter=mount + rule.filter)
    elif rule.topic_prefix is not None and "{tenant}" in rule.topic_prefix:
        raise config_error(t.sub("topic_prefix"), "{tenant} needs a tenant on the rule")
    if rule.upstream not in upstreams:
        raise config_error(t.sub("upstream"), f"no [[upstream]] named {rule.upstream!r}")
    return rule


def _downstream(data: object, key: str, upstreams: set[str]) -> DownstreamRule:
    t = Table(data, key, ("upstream", "filter", "qos", "strip_prefix", "local_prefix"))
    for name in ("upstream", "filter"):
        if name not in t.data:
            raise config_error(t.sub(name), "required")
    rule = DownstreamRule(
        upstream=t.get("upstream", string, ""),
        filter=t.get("filter", _filter, "#"),
        qos=t.get("qos", int_range(0, 2), 1),
        strip_prefix=t.get("strip_prefix", string, ""),
        local_prefix=t.get("local_prefix", string, ""),
    )
    if rule.upstream not in upstreams:
        raise config_error(t.sub("upstream"), f"no [[upstream]] named {rule.upstream!r}")
    return rule


def _class_limits(data: object, key: str, default: ClassLimitSettings) -> ClassLimitSettings:
    t = Table(data, key, ("max_messages", "max_bytes", "max_age", "policy"))
    return ClassLimitSettings(
        max_messages=t.get("max_messages", int_range(0, 10**10), 0),
        max_bytes=t.get("max_bytes", int_range(0, 10**15), 0),
        max_age=t.get("max_age", float_range(0.0, 10 * 365 * 86400.0), 0.0),
        policy=cast(
            Policy, t.get("policy", one_of("drop_oldest", "refuse_new"), str(default.policy))
        ),
    )


def _queue(data: object) -> QueueSettings:
    t = Table(data, "queue", ("durability", "commit_delay_ms", "max_bytes", *PRIORITIES))
    classes = _default_classes()
    for name, number in PRIORITIES.items():
        if name in t.data:
            classes[number] = _class_limits(t.data[name], t.sub(name), classes[number])
    return QueueSettings(
        durability=cast(
            Literal["fsync", "normal"], t.get("durability", one_of("fsync", "normal"), "fsync")
        ),
        commit_delay_ms=t.get("commit_delay_ms", float_range(0.0, 1000.0), 5.0),
        max_bytes=t.get("max_bytes", int_range(0, 10**15), 0),
        classes=classes,
    )


def _array(value: object, key: str) -> list[Any]:
    if not isinstance(value, list):
        raise config_error(key, f"must be an array of tables ([[{key}]]), got {show(value)}")
    return value


def _mountpoint(data: dict[str, Any]) -> str:
    """``[auth] tenant_mountpoint`` (validated with ``[auth]``)."""
    auth = data.get("auth")
    value = auth.get("tenant_mountpoint") if isinstance(auth, dict) else None
    return value if isinstance(value, str) else "tenants/${tenant}/"


def parse_forwarding(data: dict[str, Any], base_dir: Path) -> ForwardingSettings:
    """Validate the store-and-forward sections of a decoded config document."""
    raw: list[Any] = section(lambda: _array(data.get("upstream", []), "upstream"), [])
    ups = tuple(items(raw, lambda item, key: _upstream(item, key, base_dir), "upstream"))
    names = [u.name for u in ups]
    for i, n in enumerate(names):
        if n in names[:i]:
            raise config_error(f"upstream[{i}].name", f"duplicate upstream name {n!r}")
    # an upstream left out for a problem of its own is still "known" to the rules below
    known = set(names) | {u["name"] for u in raw if isinstance(u, dict)
                          and isinstance(u.get("name"), str)}
    fwd = tuple(items(section(lambda: _array(data.get("forward", []), "forward"), []),
                      lambda item, key: _forward(item, key, known, _mountpoint(data)),
                      "forward"))
    down = tuple(items(section(lambda: _array(data.get("downstream", []), "downstream"), []),
                       lambda item, key: _downstream(item, key, known), "downstream"))
    queue = section(lambda: _queue(data.get("queue", {})), QueueSettings())
    section(lambda: check_protected_rules(fwd, ups), None)
    security = section(lambda: parse_security(data.get("security", {}), base_dir),
                       SecuritySettings())
    return ForwardingSettings(ups, fwd, down, queue, security)


__all__ = [
    "PRIORITIES",
    "UpstreamSettings",
    "ForwardRule",
    "DownstreamRule",
    "ClassLimitSettings",
    "QueueSettings",
    "ForwardingSettings",
    "parse_forwarding",
]
