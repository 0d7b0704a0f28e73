"""Who may connect and what they may do: ``[auth]`` and ``[[acl]]``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

from ..mqtt.topics import valid_topic_filter
from .checks import Table, boolean, config_error, items, one_of, path_under, show, string

__all__ = ["AclRule", "AuthSettings", "TENANT_SOURCES", "parse_acl", "parse_auth"]

TenantSource = Literal["none", "username_prefix", "user_attribute", "certificate"]
TENANT_SOURCES = ("none", "username_prefix", "user_attribute", "certificate")


@dataclass(frozen=True, slots=True)
class AuthSettings:
    """``[auth]``: anonymous access, users file, the ACL fallback decision and RBAC.

    With ``rbac`` the roles in ``rbac_db`` (default: ``rbac.sqlite`` in the data directory)
    decide, after the ``[[acl]]`` table (the role ``config-acl``); the fallback is deny.
    """

    allow_anonymous: bool = True
    users_file: Path | None = None
    acl_default: Literal["allow", "deny"] = "allow"
    rbac: bool = False
    rbac_db: Path | None = None
    #: where a client's tenant comes from: none, username_prefix, user_attribute or
    #: certificate (the TLS client certificate's CN up to the separator; needs
    #: use_cn_as_username)
    tenant_source: TenantSource = "none"
    tenant_separator: str = ":"
    tenant_mountpoint: str = "tenants/${tenant}/"
    #: False (default): a tenant's clients name topics below its mountpoint without it
    #: (invisible, as EMQX's listener mountpoints); True: they name the full topics
    tenant_mountpoint_visible: bool = False
    #: an MQTT client is known by its TLS client certificate's subject CN, which
    #: authenticates it (no password); a client without a verified certificate is refused
    use_cn_as_username: bool = False


@dataclass(frozen=True, slots=True)
class AclRule:
    """One ``[[acl]]`` entry; ``topic`` may contain ``%u`` / ``%c`` placeholders."""

    user: str
    topic: str
    action: Literal["publish", "subscribe", "all"]
    access: Literal["allow", "deny"]



def parse_auth(data: object, base_dir: Path) -> AuthSettings:
    t = Table(data, "auth", ("allow_anonymous", "users_file", "acl_default", "rbac", "rbac_db",
                             "tenant_source", "tenant_separator", "tenant_mountpoint",
                             "tenant_mountpoint_visible", "use_cn_as_username"))
    rbac = t.get("rbac", boolean, False)
    if rbac and t.data.get("acl_default") == "allow":
        raise config_error(t.sub("acl_default"),
                           '"allow" contradicts rbac = true (outside a role, access is denied); '
                           "remove it or grant a role")
    source = cast(TenantSource, t.get("tenant_source", one_of(*TENANT_SOURCES), "none"))
    cn_user = t.get("use_cn_as_username", boolean, False)
    if source == "certificate" and not cn_user:
        raise config_error(t.sub("tenant_source"),
                           '"certificate" needs use_cn_as_username = true (the CN is then the '
                           "identity every tenant lookup uses; no client can claim another)")
    return AuthSettings(
        allow_anonymous=t.get("allow_anonymous", boolean, True),
        users_file=t.get("users_file", path_under(base_dir), None),
        acl_default=cast(Literal["allow", "deny"],
                         t.get("acl_default", one_of("allow", "deny"), "deny" if rbac else "")
                         or "allow"),
        rbac=rbac,
        rbac_db=t.get("rbac_db", path_under(base_dir), None),
        tenant_source=source,
        tenant_separator=t.get("tenant_separator", _separator, ":"),
        tenant_mountpoint=t.get("tenant_mountpoint", _mountpoint, "tenants/${tenant}/"),
        tenant_mountpoint_visible=t.get("tenant_mountpoint_visible", boolean, False),
        use_cn_as_username=cn_user,
    )


def _separator(where: str, value: object) -> str:
    if not isinstance(value, str) or len(value) != 1 or value in "/+#":
        raise config_error(where, f"must be one character other than / + #, got {show(value)}")
    return value


def _mountpoint(where: str, value: object) -> str:
    if (not isinstance(value, str) or "${tenant}" not in value or not value.endswith("/")
            or not valid_topic_filter(value.replace("${tenant}", "t") + "x")
            or "+" in value or "#" in value or value.startswith("$")):
        raise config_error(where, "must be topic levels holding ${tenant} and ending with /, "
                                  f"without wildcards or a leading $, got {show(value)}")
    return value


def _acl_rule(data: object, key: str) -> AclRule:
    t = Table(data, key, ("user", "topic", "action", "access"))
    for name in ("user", "topic", "access"):
        if name not in t.data:
            raise config_error(t.sub(name), "required")
    user = t.get("user", string, "")
    if not user:
        raise config_error(t.sub("user"), 'must be a user name or "*", got ""')
    topic = t.get("topic", string, "")
    if not valid_topic_filter(topic):
        raise config_error(t.sub("topic"), f"must be a valid MQTT topic filter, got {show(topic)}")
    if topic.startswith("$share/"):
        raise config_error(t.sub("topic"), "must not use $share/ (rules apply to the inner filter)")
    return AclRule(
        user=user,
        topic=topic,
        action=cast(
            Literal["publish", "subscribe", "all"],
            t.get("action", one_of("publish", "subscribe", "all"), "all"),
        ),
        access=cast(Literal["allow", "deny"], t.get("access", one_of("allow", "deny"), "")),
    )


def parse_acl(value: object) -> tuple[AclRule, ...]:
    if not isinstance(value, list):
        raise config_error("acl", f"must be an array of tables ([[acl]]), got {show(value)}")
    return tuple(items(value, _acl_rule, "acl"))
