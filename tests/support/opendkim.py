"""A private OpenDKIM milter on loopback, signing for one domain and verifying the rest, without DNS.

Signing: a KeyTable/SigningTable pair for ``domain`` with the given private key; mail from ``InternalHosts``
(loopback, the default) or from an authenticated client ({auth_authen}) is signed. Verifying: public keys come
from ``TestPublicKeys`` (a file of "NAME TXT-RECORD" lines) instead of DNS, and every verified message gets an
Authentication-Results field. Nameservers point at a loopback port where nothing answers. Stopped by PID.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from .rspamd import free_port

__all__ = ["OpenDkim"]


class OpenDkim:
    """``with OpenDkim(path, "example.test", "sel", pem) as o:`` then ``o.milter`` ("inet:127.0.0.1:PORT")."""

    def __init__(self, program: str, domain: str, selector: str, private_key_pem: bytes, *,
                 canonicalization: str = "relaxed/simple", public_keys: Mapping[str, str] | None = None,
                 authserv_id: str = "mx.test", host: str = "127.0.0.1") -> None:
        self.program = program
        self.domain = domain
        self.selector = selector
        self.key = private_key_pem
        self.canonicalization = canonicalization
        self.public_keys = dict(public_keys or {})
        self.authserv_id = authserv_id
        self.host = host
        self.port = free_port(host)
        self.dir = Path(tempfile.mkdtemp(prefix="mailhop-opendkim-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def milter(self) -> str:
        return f"inet:{self.host}:{self.port}"

    def start(self, timeout: float = 20.0) -> None:
        d = self.dir
        keyname = f"{self.selector}._domainkey.{self.domain}"
        (d / "key.pem").write_bytes(self.key)
        (d / "KeyTable").write_text(f"{keyname} {self.domain}:{self.selector}:{d / 'key.pem'}\n")
        (d / "SigningTable").write_text(f"*@{self.domain} {keyname}\n")
        (d / "TestPublicKeys").write_text("".join(f"{k} {v}\n" for k, v in self.public_keys.items()))
        lines = [
            "Syslog no",
            "Background no",
            "Mode sv",
            f"Socket inet:{self.port}@{self.host}",
            f"KeyTable file:{d / 'KeyTable'}",
            f"SigningTable refile:{d / 'SigningTable'}",
            f"Canonicalization {self.canonicalization}",
            "SignatureAlgorithm rsa-sha256",
            "RequireSafeKeys no",
            f"TestPublicKeys {d / 'TestPublicKeys'}",
            f"Nameservers {self.host}",  # port 53 on loopback: nothing there, lookups fail at once
            "DNSTimeout 1",
            "AlwaysAddARHeader yes",
            f"AuthservID {self.authserv_id}",
            f"PidFile {d / 'opendkim.pid'}",
        ]
        if os.geteuid() == 0:
            with contextlib.suppress(KeyError):
                user = pwd.getpwnam("opendkim")
                os.chmod(d, 0o755)
                for path in (d, *d.iterdir()):
                    os.chown(path, user.pw_uid, user.pw_gid)
                lines.append("UserID opendkim")
        (d / "opendkim.conf").write_text("\n".join(lines) + "\n")
        self.proc = subprocess.Popen([self.program, "-f", "-x", str(d / "opendkim.conf")],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"opendkim exited with {self.proc.returncode}: {err}")
            try:
                with socket.create_connection((self.host, self.port), timeout=1.0):
                    return
            except OSError:
                time.sleep(0.05)  # not bound yet: it is still reading its tables
        self.stop()
        raise RuntimeError(f"opendkim did not listen on {self.port} within {timeout:g}s")

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                # libmilter notices SIGTERM only when its accept loop wakes, up to 5 s later; this test
                # instance keeps no state worth a clean stop.
                self.proc.kill()
                self.proc.wait(timeout=10)
            if self.proc.stderr:
                self.proc.stderr.close()
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> OpenDkim:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
