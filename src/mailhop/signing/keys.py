"""DKIM keys: loading a signing key, making a new one, and the DNS TXT record that publishes it.

Untrusted input: none from the network. The key file is the operator's, but it may be anything (a certificate,
an encrypted key, a short RSA key, another tool's format); every refusal is a ValueError naming the file and
what to do.

Formats read: PEM (PKCS#1 or PKCS#8) RSA and Ed25519 keys, and the bare base64 Ed25519 seed that dkimpy's
``dknewkey`` writes. Written: unencrypted PKCS#8 PEM, mode 0600, created under a temporary name and linked into
place so the key is never readable by others, even briefly, and an existing file is never replaced unless asked.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Literal

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from ..tlsutil import write_new

__all__ = [
    "MAX_RSA_BITS",
    "MIN_RSA_BITS",
    "SIGN_MIN_RSA_BITS",
    "Algorithm",
    "SigningKey",
    "dns_record",
    "dns_txt_strings",
    "dns_txt_value",
    "generate_key",
    "key_algorithm",
    "load_private_key",
    "private_key_pem",
    "public_key_b64",
    "write_private_key",
]

SigningKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
Algorithm = Literal["rsa", "ed25519"]

MIN_RSA_BITS = 2048  # new keys: RFC 8301 3.2 says signers SHOULD use at least 2048 bits
MAX_RSA_BITS = 8192  # beyond this signing gets slow and the TXT record unwieldy, for no practical gain
SIGN_MIN_RSA_BITS = 1024  # existing keys: RFC 8301 says verifiers MUST NOT accept shorter, so refuse to sign
_MAX_KEY_FILE = 64 * 1024  # a PEM key of 8192 bits is under 7 KB; anything far larger is not a key
_TXT_STRING_MAX = 255  # RFC 1035 3.3: one character-string holds at most 255 octets


def key_algorithm(key: SigningKey) -> Algorithm:
    """The k= / a= family of ``key``."""
    return "rsa" if isinstance(key, rsa.RSAPrivateKey) else "ed25519"


def load_private_key(path: Path) -> SigningKey:
    """Read a DKIM signing key; ValueError naming ``path`` when it is missing, unreadable or unusable."""
    try:
        with open(path, "rb") as fp:
            data = fp.read(_MAX_KEY_FILE + 1)
    except OSError as exc:
        raise ValueError(f"DKIM key file {path}: cannot read it ({exc.strerror or exc})") from None
    if len(data) > _MAX_KEY_FILE:
        raise ValueError(f"DKIM key file {path}: over {_MAX_KEY_FILE} bytes; not a private key")
    key = _parse_key(path, data)
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size < SIGN_MIN_RSA_BITS:
        raise ValueError(f"DKIM key file {path}: a {key.key_size}-bit RSA key is too short (verifiers ignore "
                         f"signatures under {SIGN_MIN_RSA_BITS} bits); make a new one with `mailhop dkim keygen`")
    return key


def _parse_key(path: Path, data: bytes) -> SigningKey:
    if b"-----BEGIN" not in data:
        # dknewkey's Ed25519 format: the base64 of the 32-byte seed, alone in the file.
        try:
            raw = base64.b64decode(data.strip(), validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) == 32:
            return ed25519.Ed25519PrivateKey.from_private_bytes(raw)
        raise ValueError(f"DKIM key file {path}: not a PEM private key (expected \"-----BEGIN PRIVATE KEY-----\")")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ValueError(f"DKIM key file {path}: the key is encrypted; store it unencrypted with mode 0600 "
                         "(e.g. `openssl pkey -in ENC.pem -out KEY.pem`)") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"DKIM key file {path}: not a usable PEM private key ({exc})") from None
    if isinstance(key, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
        return key
    raise ValueError(f"DKIM key file {path}: a {type(key).__name__.removeprefix('_')} key; DKIM signs only with "
                     "RSA or Ed25519 keys")


def generate_key(algorithm: Algorithm, bits: int = MIN_RSA_BITS) -> SigningKey:
    """A new signing key; ValueError for RSA sizes outside MIN_RSA_BITS..MAX_RSA_BITS (``bits`` is ignored for
    Ed25519)."""
    if algorithm == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if algorithm != "rsa":
        raise ValueError(f"unknown key algorithm {algorithm!r}; use rsa or ed25519")
    if bits < MIN_RSA_BITS:
        raise ValueError(f"RSA keys shorter than {MIN_RSA_BITS} bits are refused (RFC 8301); use --bits "
                         f"{MIN_RSA_BITS} or more, or --algorithm ed25519")
    if bits > MAX_RSA_BITS:
        raise ValueError(f"RSA keys longer than {MAX_RSA_BITS} bits are refused (slow to sign, too large for "
                         "many DNS setups)")
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def private_key_pem(key: SigningKey) -> bytes:
    """Unencrypted PKCS#8 PEM."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def public_key_b64(key: SigningKey) -> str:
    """The p= value: RSA as DER SubjectPublicKeyInfo (RFC 6376 3.6.1), Ed25519 as the raw 32 octets (RFC 8463)."""
    public = key.public_key()
    if isinstance(public, ed25519.Ed25519PublicKey):
        der = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:
        der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(der).decode("ascii")


def dns_txt_value(key: SigningKey) -> str:
    """The key record's text, e.g. ``v=DKIM1; k=rsa; p=MIIB...``."""
    return f"v=DKIM1; k={key_algorithm(key)}; p={public_key_b64(key)}"


def dns_txt_strings(value: str) -> list[str]:
    """``value`` cut into character-strings of at most 255 octets (the record is their concatenation)."""
    raw = value.encode("ascii")
    return [raw[i : i + _TXT_STRING_MAX].decode("ascii") for i in range(0, len(raw), _TXT_STRING_MAX)] or [""]


def dns_record(domain: str, selector: str, key: SigningKey) -> str:
    """One zone-file line: ``SELECTOR._domainkey.DOMAIN. IN TXT "..." "..."``."""
    strings = " ".join(f'"{s}"' for s in dns_txt_strings(dns_txt_value(key)))
    return f"{selector}._domainkey.{domain}. IN TXT {strings}"


def write_private_key(path: Path, key: SigningKey, *, force: bool = False) -> None:
    """Write ``key`` to ``path`` with mode 0600; FileExistsError if it exists and not ``force``; OSError when
    it cannot be written."""
    try:
        write_new(path, private_key_pem(key), 0o600, force)
    except FileExistsError:
        raise FileExistsError(f"{path} exists; use --force to replace it") from None
