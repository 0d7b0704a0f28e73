"""``[security]``: post-quantum protection of forwarded messages (issue 5).

Per rule, ``[[forward]] encrypt`` / ``sign`` switch protection on; this table says where the
keys are and how batches and sessions are cut. Validated like the rest of the configuration
(same error messages, see :mod:`rapidmq_edge.config`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

from .checks import Table, config_error, float_range, int_range, one_of, path_under

__all__ = ["MANIFESTS", "SecuritySettings", "parse_security"]

#: what a published batch carries besides the signed header (see docs/crypto.md)
MANIFESTS = ("auto", "leaves", "ids")


@dataclass(frozen=True, slots=True)
class SecuritySettings:
    """``[security]``; ``keys_dir`` None = ``<data_dir>/keys``."""

    keys_dir: Path | None = None
    passphrase_file: Path | None = None
    batch_size: int = 1024
    batch_max_age: float = 1.0
    session_max_messages: int = 1 << 20
    session_max_age: float = 3600.0
    manifest: Literal["auto", "leaves", "ids"] = "auto"


def parse_security(data: object, base_dir: Path) -> SecuritySettings:
    """Validate the ``[security]`` table."""
    t = Table(data, "security", (
        "keys_dir", "passphrase_file", "batch_size", "batch_max_age", "session_max_messages",
        "session_max_age", "manifest",
    ))
    path = path_under(base_dir)
    return SecuritySettings(
        keys_dir=t.get("keys_dir", path, None),
        passphrase_file=t.get("passphrase_file", path, None),
        batch_size=t.get("batch_size", int_range(1, 1 << 20), 1024),
        batch_max_age=t.get("batch_max_age", float_range(0.01, 86400.0), 1.0),
        session_max_messages=t.get("session_max_messages", int_range(1, 1 << 40), 1 << 20),
        session_max_age=t.get("session_max_age", float_range(1.0, 30 * 86400.0), 3600.0),
        manifest=cast(Literal["auto", "leaves", "ids"],
                      t.get("manifest", one_of(*MANIFESTS), "auto")),
    )


def check_protected_rules(rules: Any, upstreams: Any) -> None:
    """Rules with ``encrypt``/``sign``: ``encrypt`` only with ``sign``, one signed upstream.
    Any protocol: the message id travels as the ``rmq-id`` user property on MQTT 5, in the id
    frame of :mod:`rapidmq_edge.mqtt.id_frame` on 3.1.1."""
    signed: set[str] = set()
    for i, r in enumerate(rules):
        if r.encrypt and not r.sign:
            raise config_error(
                f"forward[{i}].sign",
                "must be true when encrypt is true (sessions are not sender-authenticated; "
                "the signed batches are what the cloud consumer verifies)",
            )
        if r.sign:
            signed.add(r.upstream)
    if len(signed) > 1:
        raise config_error(
            "forward", f"sign = true rules must all go to one upstream, got {sorted(signed)}"
        )
