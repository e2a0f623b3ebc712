"""Reloading certificates keeps the context object (so listeners and sessions pick it up) and survives bad files."""

from __future__ import annotations

import os
import socket
import ssl
import threading
from pathlib import Path

import trustme

from mailhop.server.tls import TlsContexts
from tests.support.certs import dns_names


def _write(ca: trustme.CA, name: str, d: Path) -> tuple[Path, Path]:
    cert = ca.issue_cert(name)
    c, k = d / "cert.pem", d / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(c))
    cert.private_key_pem.write_to_path(str(k))
    return c, k


def _served_name(ctx: ssl.SSLContext, ca: trustme.CA) -> str:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        try:
            with ctx.wrap_socket(conn, server_side=True) as s:
                s.recv(1)
        except (ssl.SSLError, OSError):
            pass

    t = threading.Thread(target=serve)
    t.start()
    client = ssl.create_default_context()
    ca.configure_trust(client)
    client.check_hostname = False
    with socket.create_connection(srv.getsockname()) as raw, client.wrap_socket(raw) as s:
        cert = s.getpeercert()
        s.sendall(b"x")
    t.join(5)
    srv.close()
    return dns_names(cert)[0]


def test_reload_serves_new_certificate_and_keeps_old_on_error(tmp_path: Path) -> None:
    ca = trustme.CA()
    c, k = _write(ca, "old.example.test", tmp_path)
    contexts = TlsContexts()
    ctx = contexts.get(c, k)
    assert _served_name(ctx, ca) == "old.example.test"
    assert contexts.reload(only_changed=True) == 0
    _write(ca, "new.example.test", tmp_path)
    os.utime(c, (1, 2_000_000_000))
    assert contexts.reload(only_changed=True) == 1
    assert _served_name(ctx, ca) == "new.example.test"
    k.write_text("not a key")
    os.utime(k, (1, 2_000_000_001))
    assert contexts.reload(only_changed=True) == 0  # refused, logged
    assert _served_name(ctx, ca) == "new.example.test"


def test_minimum_version(tmp_path: Path) -> None:
    ca = trustme.CA()
    c, k = _write(ca, "x.test", tmp_path)
    contexts = TlsContexts()
    assert contexts.get(c, k, "1.3").minimum_version == ssl.TLSVersion.TLSv1_3
    assert contexts.get(c, k).minimum_version == ssl.TLSVersion.TLSv1_2
