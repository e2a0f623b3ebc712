"""Server TLS contexts, reloadable without dropping connections.

A context is made once per certificate/key pair and handed to listeners (implicit TLS) and sessions
(STARTTLS). Reloading calls ``load_cert_chain`` on the same context objects: new handshakes get the new
certificate, established connections keep theirs. A reload that fails (a half-written file, a key that does
not match) keeps the old certificate and logs why, so a bad deploy never takes TLS down.
"""

from __future__ import annotations

import logging
import os
import ssl
from pathlib import Path

__all__ = ["TlsContexts"]

log = logging.getLogger("mailhop.tls")

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def _stamp(paths: tuple[Path, Path]) -> tuple[float, float, int, int]:
    a, b = (os.stat(p) for p in paths)
    return (a.st_mtime, b.st_mtime, a.st_ino, b.st_ino)


class TlsContexts:
    """One server SSLContext per (certificate, key, minimum version)."""

    def __init__(self) -> None:
        self._contexts: dict[tuple[Path, Path, str], ssl.SSLContext] = {}
        self._stamps: dict[tuple[Path, Path], tuple[float, float, int, int]] = {}

    def get(self, certificate: Path, key: Path, min_version: str = "1.2") -> ssl.SSLContext:
        """The context for this pair, made (and loaded) on first use; raises on an unusable pair."""
        k = (certificate, key, min_version)
        ctx = self._contexts.get(k)
        if ctx is None:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.minimum_version = _VERSIONS[min_version]
            ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
            ctx.load_cert_chain(str(certificate), str(key))
            self._contexts[k] = ctx
            self._stamps[(certificate, key)] = _stamp((certificate, key))
        return ctx

    def reload(self, *, only_changed: bool = False) -> int:
        """Re-read every pair (or only those whose files changed); returns how many were reloaded."""
        done = 0
        for (cert, key, _), ctx in self._contexts.items():
            try:
                stamp = _stamp((cert, key))
            except OSError as exc:
                log.error("TLS reload: cannot stat %s / %s: %s; keeping the old certificate", cert, key, exc)
                continue
            if only_changed and self._stamps.get((cert, key)) == stamp:
                continue
            try:
                ctx.load_cert_chain(str(cert), str(key))
            except (OSError, ssl.SSLError) as exc:
                log.error("TLS reload of %s failed: %s; keeping the old certificate", cert, exc)
                continue
            self._stamps[(cert, key)] = stamp
            done += 1
            log.info("TLS certificate reloaded: %s", cert)
        return done
