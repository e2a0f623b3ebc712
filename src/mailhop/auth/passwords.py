"""Password hashing for SMTP AUTH users: scrypt for PLAIN/LOGIN, SCRAM-SHA-256 credentials for SCRAM.

Stored form (self-describing, so the cost parameters can be raised later without breaking old entries)::

    scrypt$<n>$<r>$<p>$<salt base64>$<hash base64>

Passwords are ``str``, NFKC-normalised before use (so a password typed as a compatibility form, e.g. the
``ﬁ`` ligature, matches the plain letters), at most :data:`MAX_PASSWORD` characters, not empty and without
NUL (SASL PLAIN separates its fields with NUL, so such a password could never be used).

:func:`verify_password` never raises: a malformed, unknown or absurdly expensive encoding is simply ``False``.
:data:`DUMMY_HASH` is a well-formed hash with the current parameters that matches no password: verify against
it for unknown or disabled users so they cost the same KDF work as real ones.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import unicodedata
from typing import Any

from ..smtp.sasl import ScramCredentials, derive_scram_credentials

__all__ = [
    "DUMMY_HASH",
    "MAX_PASSWORD",
    "SCRAM_ITERATIONS",
    "SCRYPT_DKLEN",
    "SCRYPT_N",
    "SCRYPT_P",
    "SCRYPT_R",
    "SCRYPT_SALT_LEN",
    "hash_password",
    "make_scram_credentials",
    "needs_rehash",
    "normalize_password",
    "verify_password",
]

MAX_PASSWORD = 1024
SCRYPT_N = 2**15
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_DKLEN = 32
SCRYPT_SALT_LEN = 16
SCRAM_ITERATIONS = 4096

# Upper bounds for parameters read back from storage: a corrupted or hostile entry must not make one
# verification allocate gigabytes or run for minutes. Memory is 128*r*n bytes (32 MiB now), time ~ n*r*p.
_MAX_N = 2**20
_MAX_R = 32
_MAX_P = 16
_MAX_MEMORY = 256 * 1024 * 1024
_MAX_WORK = 2**24  # n*r*p; 64 times the current 2**18
_MAX_DKLEN = 64
_MAX_SALT = 64
_PREFIX = "scrypt"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


# A valid encoding with the current parameters whose hash is all zero bytes: no password produces it (short of
# a preimage of scrypt), so verifying against it costs exactly one KDF run and always fails.
DUMMY_HASH = (
    f"{_PREFIX}${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(bytes(SCRYPT_SALT_LEN))}${_b64(bytes(SCRYPT_DKLEN))}"
)


def _maxmem(n: int, r: int, p: int) -> int:
    # OpenSSL needs 128*r*(n+2) bytes for V plus 128*r*p for B; leave room for its bookkeeping.
    return 128 * r * (n + p + 2) + 1024 * 1024


def _scrypt(password: bytes, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
    """The one place the KDF runs (a seam: tests count calls through it)."""
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, dklen=dklen, maxmem=_maxmem(n, r, p))


def normalize_password(password: str) -> str:
    """NFKC form of ``password``; ValueError when it is empty, too long, contains NUL or is not valid text."""
    if not isinstance(password, str):
        raise ValueError("password must be text")
    norm = unicodedata.normalize("NFKC", password)
    if not norm:
        raise ValueError("password is empty")
    if len(norm) > MAX_PASSWORD:
        raise ValueError(f"password longer than {MAX_PASSWORD} characters")
    if "\x00" in norm:
        raise ValueError("password contains NUL")
    try:
        norm.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("password is not valid Unicode text") from None
    return norm


def hash_password(password: str) -> str:
    """Hash with scrypt (current parameters, fresh 16-byte salt); ValueError on an unusable password."""
    pw = normalize_password(password).encode("utf-8")
    salt = os.urandom(SCRYPT_SALT_LEN)
    digest = _scrypt(pw, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P, SCRYPT_DKLEN)
    return f"{_PREFIX}${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def _parse(encoded: str) -> tuple[int, int, int, bytes, bytes] | None:
    parts = encoded.split("$")
    if len(parts) != 6 or parts[0] != _PREFIX:
        return None
    try:
        # isdigit() first: int() would accept "+8", " 8", "8_0" and non-ASCII digits.
        if not all(x.isascii() and x.isdigit() for x in parts[1:4]):
            return None
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt, digest = _unb64(parts[4]), _unb64(parts[5])
    except (ValueError, binascii.Error, UnicodeEncodeError):
        return None
    if not (2 <= n <= _MAX_N and n & (n - 1) == 0 and 1 <= r <= _MAX_R and 1 <= p <= _MAX_P):
        return None
    if 128 * r * n > _MAX_MEMORY or n * r * p > _MAX_WORK:
        return None
    if not (1 <= len(salt) <= _MAX_SALT and 16 <= len(digest) <= _MAX_DKLEN):
        return None
    return n, r, p, salt, digest


def verify_password(password: str, encoded: Any) -> bool:
    """True when ``password`` matches ``encoded``; False for a mismatch and for anything malformed."""
    if not isinstance(encoded, str):
        return False
    parsed = _parse(encoded)
    if parsed is None:
        return False
    try:
        pw = normalize_password(password).encode("utf-8")
    except ValueError:
        return False
    n, r, p, salt, digest = parsed
    try:
        candidate = _scrypt(pw, salt, n, r, p, len(digest))
    except (ValueError, MemoryError):
        return False
    return hmac.compare_digest(candidate, digest)


def needs_rehash(encoded: str) -> bool:
    """True when ``encoded`` is not a hash with the current parameters (rehash it at the next login)."""
    parsed = _parse(encoded) if isinstance(encoded, str) else None
    if parsed is None:
        return True
    n, r, p, salt, digest = parsed
    return (n, r, p, len(salt), len(digest)) != (SCRYPT_N, SCRYPT_R, SCRYPT_P, SCRYPT_SALT_LEN, SCRYPT_DKLEN)


def make_scram_credentials(password: str, *, iterations: int = SCRAM_ITERATIONS) -> ScramCredentials:
    """SCRAM-SHA-256 server credentials (RFC 5802/7677) for the normalised password, fresh salt."""
    return derive_scram_credentials(normalize_password(password), iterations=iterations)
