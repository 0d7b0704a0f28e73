"""The identity a TLS client certificate gives a connection: its subject's common name."""

from __future__ import annotations

from typing import Any

__all__ = ["certificate_cn"]


def certificate_cn(transport: Any) -> str | None:
    """The subject CN of the client certificate the TLS handshake verified; None on plain
    TCP, without a certificate, or when it has no CN (the first one when several)."""
    get = getattr(transport, "get_extra_info", None)
    cert = get("peercert") if get is not None else None
    if not cert:  # {} when the certificate was not verified (no client_ca)
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName" and isinstance(value, str) and value:
                return value
    return None
