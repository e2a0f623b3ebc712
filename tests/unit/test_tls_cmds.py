"""``mailhop tls self-signed`` and ``tlsutil.make_self_signed``: a usable pair, SANs, key mode, --force."""

from __future__ import annotations

import ipaddress
import os
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from mailhop.cli.tls_cmds import tls
from mailhop.tlsutil import cert_fingerprint, make_self_signed

ROOT = Path(__file__).resolve().parents[2]


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def sans(cert: x509.Certificate) -> tuple[list[str], list[ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return ext.get_values_for_type(x509.DNSName), ext.get_values_for_type(x509.IPAddress)  # type: ignore[return-value]


def handshake(cert: Path, key: Path, server_hostname: str) -> None:
    """A full TLS handshake in memory: our pair on the server, the certificate as the client's only CA."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))  # check_hostname and CERT_REQUIRED
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=server_hostname)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(10):
        for name, side, out, peer_in in (("client", client, c_out, s_in), ("server", server, s_out, c_in)):
            if not done[name]:
                try:
                    side.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
            peer_in.write(out.read())
        if all(done.values()):
            return
    raise AssertionError("handshake did not complete")


def test_make_self_signed(tmp_path: Path) -> None:
    out = tmp_path / "tls"
    cert_path, key_path = make_self_signed("MX.Example.ORG", out, days=30)
    assert (cert_path, key_path) == (out / "cert.pem", out / "key.pem")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(cert_path.stat().st_mode) == 0o644
    assert sorted(os.listdir(out)) == ["cert.pem", "key.pem"]  # no temporary files left behind

    ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_path, key_path)
    cert = load(cert_path)
    assert sans(cert) == (["mx.example.org"], [])
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "mx.example.org"
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert 30 * 86400 <= lifetime.total_seconds() <= 30 * 86400 + 600
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    handshake(cert_path, key_path, "mx.example.org")
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(cert_path, key_path, "other.example.org")


@pytest.mark.parametrize(
    ("hostname", "dns", "ips"),
    [
        ("127.0.0.1", ["127.0.0.1"], [ipaddress.ip_address("127.0.0.1")]),
        ("::1", ["::1"], [ipaddress.ip_address("::1")]),
        ("b\u00fccher.example", ["xn--bcher-kva.example"], []),
        ("localhost", ["localhost"], []),
    ],
)
def test_san_entries(tmp_path: Path, hostname: str, dns: list[str], ips: list[object]) -> None:
    cert_path, key_path = make_self_signed(hostname, tmp_path)
    assert sans(load(cert_path)) == (dns, ips)
    if hostname == "127.0.0.1":
        handshake(cert_path, key_path, "127.0.0.1")  # matched against the iPAddress entry


def test_long_hostname_has_san_only(tmp_path: Path) -> None:
    name = ".".join(["a" * 60] * 3) + ".example"
    cert_path, _ = make_self_signed(name, tmp_path)
    cert = load(cert_path)
    assert len(cert.subject) == 0
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).critical  # RFC 5280 4.2.1.6
    assert sans(cert) == ([name], [])


@pytest.mark.parametrize(("hostname", "days"), [("bad host", 1), ("", 1), ("ok.example", 0), ("ok.example", 99999)])
def test_bad_arguments(tmp_path: Path, hostname: str, days: int) -> None:
    with pytest.raises(ValueError):
        make_self_signed(hostname, tmp_path / "out", days=days)
    assert not (tmp_path / "out").exists()


def test_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    cert_path, key_path = make_self_signed("a.example", tmp_path)
    before = cert_path.read_bytes(), key_path.read_bytes()
    with pytest.raises(FileExistsError):
        make_self_signed("b.example", tmp_path)
    assert (cert_path.read_bytes(), key_path.read_bytes()) == before
    # Only one of the two present is refused too, and nothing is written.
    cert_path.unlink()
    with pytest.raises(FileExistsError):
        make_self_signed("b.example", tmp_path)
    assert not cert_path.exists() and key_path.read_bytes() == before[1]

    make_self_signed("b.example", tmp_path, force=True)
    assert sans(load(cert_path)) == (["b.example"], [])
    assert key_path.read_bytes() != before[1]
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_path, key_path)


def test_key_mode_ignores_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        _, key_path = make_self_signed("a.example", tmp_path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600


def test_cli(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "certs"
    r = runner.invoke(tls, ["self-signed", "--hostname", "relay.example.test", "--out", str(out), "--days", "7"])
    assert r.exit_code == 0, r.output
    fingerprint = load(out / "cert.pem").fingerprint(hashes.SHA256()).hex(":").upper()
    assert fingerprint == cert_fingerprint(out / "cert.pem")
    assert f"SHA-256 fingerprint: {fingerprint}" in r.stdout
    assert stat.S_IMODE((out / "key.pem").stat().st_mode) == 0o600

    r = runner.invoke(tls, ["self-signed", "--hostname", "relay.example.test", "--out", str(out)])
    assert r.exit_code == 1 and "--force" in r.stderr
    assert cert_fingerprint(out / "cert.pem") == fingerprint  # untouched

    r = runner.invoke(tls, ["self-signed", "--hostname", "relay.example.test", "--out", str(out), "--force"])
    assert r.exit_code == 0
    assert fingerprint not in r.stdout

    for args in (["--hostname", "bad host", "--out", str(out)], ["--out", str(out)],
                 ["--hostname", "x.example", "--out", str(out), "--days", "0"]):
        r = runner.invoke(tls, ["self-signed", *args])
        assert r.exit_code == 64, (args, r.output)


def test_cli_subprocess(tmp_path: Path) -> None:
    code = "from mailhop.cli.tls_cmds import tls; tls(prog_name='mailhop tls')"
    r = subprocess.run(
        [sys.executable, "-c", code, "self-signed", "--hostname", "127.0.0.1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    assert r.returncode == 0, r.stderr
    assert "SHA-256 fingerprint:" in r.stdout
    ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
