"""Client TLS contexts for outbound SMTP (RFC 3207 STARTTLS, RFC 8314 implicit TLS).

Untrusted input: none here; the remote certificate is checked by the ssl module against these settings.
"""

from __future__ import annotations

import ssl

__all__ = ["make_client_context"]


def make_client_context(verify: bool, cafile: str | None = None) -> ssl.SSLContext:
    """A client context with TLS 1.2 at least.

    ``verify``: the certificate must chain to the system trust store (or ``cafile``) and name the host.
    Unverified contexts are for opportunistic and "required" TLS, which protect against passive listeners
    only: MX certificates are mostly self-signed or for the wrong name (RFC 7435).
    """
    if verify:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    else:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context
