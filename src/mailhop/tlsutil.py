"""Self-signed certificates for a first run or a test setup (``mailhop tls self-signed``, ``scripts/run``).

:func:`make_self_signed` writes ``cert.pem`` (mode 0644) and ``key.pem`` (mode 0600, unencrypted PKCS#8) into a
directory: an ECDSA P-256 key and a certificate for one host name (subjectAltName dNSName; an IP address also
gets an iPAddress entry). Each file is written to a temporary name, fsynced and then linked into place, so a
reader never sees a partial file and the key is never readable by others, even briefly. Existing files are
refused (FileExistsError) unless ``force``.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import secrets
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .address import AddressError, canonical_domain

__all__ = ["CERT_FILE", "KEY_FILE", "MAX_DAYS", "cert_fingerprint", "make_self_signed", "write_new"]

CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
MAX_DAYS = 36500
_CN_MAX = 64  # ub-common-name (RFC 5280)


def _san(hostname: str) -> tuple[str, list[x509.GeneralName]]:
    """Canonical name for the subject and the subjectAltName entries; ValueError when not a host name or IP."""
    try:
        ip = ipaddress.ip_address(hostname)
    except ValueError:
        ip = None
    if ip is not None:
        text = ip.compressed
        return text, [x509.DNSName(text), x509.IPAddress(ip)]
    wildcard = hostname.startswith("*.")
    try:
        name = canonical_domain(hostname[2:] if wildcard else hostname)
    except AddressError as exc:
        raise ValueError(f"{hostname!r} is not a host name or IP address ({exc.reason})") from None
    if wildcard:
        name = "*." + name
    return name, [x509.DNSName(name)]


def write_new(path: Path, data: bytes, mode: int, force: bool) -> None:
    """Write ``data`` to ``path`` atomically with ``mode``; without ``force`` fail if ``path`` exists."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        try:
            os.fchmod(fd, mode)  # exactly ``mode``, whatever the umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if force:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails with FileExistsError if someone created it meanwhile
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_self_signed(hostname: str, out_dir: Path, days: int = 365, force: bool = False) -> tuple[Path, Path]:
    """Create ``out_dir/cert.pem`` and ``out_dir/key.pem`` for ``hostname``, valid ``days`` days from now.

    Returns ``(cert_path, key_path)``. Raises ValueError for a bad host name or day count, FileExistsError when
    either file exists and ``force`` is false (nothing is written then), OSError when the files cannot be written.
    """
    if not isinstance(days, int) or isinstance(days, bool) or not 1 <= days <= MAX_DAYS:
        raise ValueError(f"days must be 1-{MAX_DAYS}")
    name, san = _san(hostname)
    out_dir = Path(out_dir)
    cert_path, key_path = out_dir / CERT_FILE, out_dir / KEY_FILE
    if not force:
        for path in (cert_path, key_path):
            if path.exists() or path.is_symlink():
                raise FileExistsError(f"{path} exists; use --force (force=True) to replace it")

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, name)] if len(name) <= _CN_MAX else []
    )
    now = datetime.datetime.now(datetime.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate a peer's clock running a little behind
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(san), critical=not len(subject))  # critical if subject empty
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)

    out_dir.mkdir(parents=True, exist_ok=True)
    write_new(key_path, key_pem, 0o600, force)
    try:
        write_new(cert_path, cert_pem, 0o644, force)
    except BaseException:
        if not force:  # we created the key a moment ago; do not leave half a pair behind
            with contextlib.suppress(OSError):
                key_path.unlink()
        raise
    _fsync_dir(out_dir)
    return cert_path, key_path


def cert_fingerprint(cert_path: Path) -> str:
    """SHA-256 fingerprint of the first certificate in a PEM file, as colon-separated upper-case hex."""
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()
