"""testssl.sh (Debian package ``testssl.sh``, program ``testssl``) against a real daemon on loopback:
the mx listener's STARTTLS and the implicit-TLS ``submissions`` listener. Only protocols (-p) and the
standard cipher categories (-s) are scanned, to keep the run short (about 8 s a listener). No --fast: without it
testssl probes the cipher categories with its own sockets, so ciphers the system OpenSSL lacks (NULL, EXPORT, RC4)
are really asked for."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from tests.conftest import require_program
from tests.daemon.harness import Relay, free_port, start_relay, write_config

NOT_OFFERED = ["SSLv2", "SSLv3", "TLS1", "TLS1_1"]
# testssl 3.0's ids for the standard cipher categories that must never be offered; RC4 (and DES, RC2) is in LOW.
WEAK_CATEGORIES = ["cipherlist_NULL", "cipherlist_aNULL", "cipherlist_EXPORT", "cipherlist_LOW",
                   "cipherlist_3DES_IDEA"]


@dataclass
class Tls:
    relay: Relay
    mx: int
    submissions: int


def find_testssl() -> str:
    # Debian installs it as "testssl"; upstream checkouts call it "testssl.sh".
    if shutil.which("testssl"):
        return require_program("testssl")
    return require_program("testssl.sh")


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tls]:
    tmp = tmp_path_factory.mktemp("testssl")
    ca = trustme.CA()
    cert = ca.issue_cert("relay.example.test", "127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp / "key.pem"))
    mx_port, p465 = free_port(), free_port()
    extra = f"""
[tls]
certificate = "cert.pem"
key = "key.pem"
[[listener]]
address = "127.0.0.1:{p465}"
role = "submissions"
[limits]
max_connections_per_ip = 500
"""
    cfg = write_config(tmp, mx_port, extra, trusted="[]")
    relay = start_relay(cfg, "127.0.0.1", mx_port, tmp / "spool")
    try:
        yield Tls(relay, mx_port, p465)
    finally:
        assert relay.stop() == 0, relay.log()


def scan(tmp_path: Path, port: int, *starttls: str) -> dict[str, dict[str, str]]:
    program = find_testssl()
    out = tmp_path / "testssl.json"
    cmd = [program, "--quiet", "--color", "0", "--warnings", "off", "--nodns", "none",
           "--connect-timeout", "5", "--openssl-timeout", "5", "--jsonfile", str(out),
           "-p", "-s", *starttls, f"127.0.0.1:{port}"]
    if shutil.which("openssl"):
        cmd[1:1] = ["--openssl", str(shutil.which("openssl"))]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.exists(), f"testssl wrote no JSON (exit {done.returncode}):\n{done.stdout}\n{done.stderr}"
    findings = {item["id"]: item for item in json.loads(out.read_text())}
    return findings


def check(findings: dict[str, dict[str, str]]) -> None:
    for proto in NOT_OFFERED:
        assert proto in findings, f"{proto} not scanned: {sorted(findings)}"
        assert findings[proto]["finding"].startswith("not offered"), findings[proto]
    assert findings["TLS1_2"]["finding"].startswith("offered"), findings["TLS1_2"]
    for category in WEAK_CATEGORIES:
        assert category in findings, f"{category} not scanned: {sorted(findings)}"
        assert findings[category]["finding"].startswith("not offered"), findings[category]


def test_testssl_mx_starttls(tls: Tls, tmp_path: Path) -> None:
    check(scan(tmp_path, tls.mx, "--starttls", "smtp"))


def test_testssl_implicit_tls_submissions(tls: Tls, tmp_path: Path) -> None:
    check(scan(tmp_path, tls.submissions))
