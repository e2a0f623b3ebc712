"""Bridges between the synchronous authentication libraries (pyspf, dkimpy) and mailhop's async ``Resolver``.

Both libraries are synchronous and would do their own DNS; all DNS must go through the one resolver (tests point
it at a loopback server, operators at their nameservers), and nothing may block the event loop. So:

- **pyspf** runs in a worker thread. It looks every name up through its module global
  ``spf.DNSLookup(name, qtype, strict, timeout)`` and offers no per-query hook (overriding ``spf.query.dns``
  would mean copying its CNAME, cache and void-lookup logic). We therefore replace that global once, with a
  dispatcher that finds the *calling thread's* bridge in a thread-local set by ``spf_lookups()``. Concurrent
  evaluations (other loops, other resolvers, other threads) never see each other's bridge, and a thread without
  one falls through to pyspf's own lookup, so other users of pyspf in the process keep working. The bridge runs
  each query on the event loop with ``run_coroutine_threadsafe(...).result(timeout)``.
- **dkimpy** takes a ``dnsfunc(name, timeout=5)`` per call, so nothing global is needed: the checks find every
  key name first, fetch them all asynchronously (``prefetch_txt``) and hand dkimpy a function that only serves
  those answers (``served_dnsfunc``); dkimpy never waits on DNS.
- dkimpy verifies Ed25519 (RFC 8463) through PyNaCl, which is optional for dkimpy and not one of our
  dependencies. ``ensure_ed25519()`` gives dkimpy a minimal stand-in built on ``cryptography`` when PyNaCl is
  missing (and does nothing when it is installed).

Untrusted input: names built from message headers and SPF records, and the DNS answers for them.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import contextlib
import logging
import threading
import types
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import dns.exception
import dns.name

from ..dns import DnsPermanentError, DnsTemporaryError, Resolver

__all__ = [
    "LibraryLog",
    "SpfDnsBridge",
    "TxtAnswer",
    "ensure_ed25519",
    "install_spf_dispatch",
    "prefetch_txt",
    "served_dnsfunc",
    "spf_lookups",
]

# pyspf's lookup result: ((name, qtype), value), value per type as pyspf's own dnspython driver makes it.
SpfRecord = tuple[tuple[str, str], Any]


def _valid_name(name: str) -> bool:
    """Whether ``name`` can be asked at all (a name that cannot does not exist, RFC 7208 4.3)."""
    try:
        dns.name.from_text(name)
    except (dns.exception.DNSException, ValueError, UnicodeError):
        return False
    return True


class SpfDnsBridge:
    """pyspf's ``DNSLookup`` signature, answered by ``resolver`` on ``loop`` from a worker thread.

    NXDOMAIN and NODATA are an empty answer (pyspf counts them as void lookups, RFC 7208 4.6.4); SERVFAIL,
    timeouts and an unusable loop are ``spf.TempError`` (pyspf turns that into "temperror").
    """

    def __init__(self, resolver: Resolver, loop: asyncio.AbstractEventLoop) -> None:
        self.resolver = resolver
        self.loop = loop

    def __call__(self, name: str, qtype: str, strict: object = True, timeout: float = 20.0) -> list[SpfRecord]:
        import spf

        name = str(name).rstrip(".")
        if not name or not _valid_name(name):
            return []
        try:
            return self._lookup(name, qtype, float(timeout) if timeout else 20.0)
        except DnsPermanentError:
            return []
        except DnsTemporaryError as exc:
            raise spf.TempError(f"DNS {exc}") from None
        except (TimeoutError, concurrent.futures.TimeoutError):
            raise spf.TempError(f"DNS {name} {qtype}: timeout") from None
        except (RuntimeError, concurrent.futures.CancelledError) as exc:  # the loop is closing or closed
            raise spf.TempError(f"DNS {name} {qtype}: resolver unavailable ({exc})") from None

    def _run(self, coro: Any, timeout: float) -> Any:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(max(timeout, 0.1))
        except BaseException:
            future.cancel()
            raise

    def _lookup(self, name: str, qtype: str, timeout: float) -> list[SpfRecord]:
        key = (name, qtype)
        if qtype in ("TXT", "SPF"):
            if qtype == "SPF":  # RFC 7208 3.1 retired type 99; pyspf asks only in its "harsh" mode
                return []
            texts: list[bytes] = self._run(self.resolver.txt(name), timeout)
            return [(key, (text,)) for text in texts]
        if qtype not in ("A", "AAAA", "MX", "PTR"):
            return []
        out: list[SpfRecord] = []
        for text in self._run(self.resolver.records(name, qtype), timeout):
            if qtype == "MX":
                pref, _, host = text.partition(" ")
                if pref.isdigit():
                    out.append((key, (int(pref), host)))  # "." (null MX) stays "."; pyspf skips it
            elif qtype == "PTR":
                out.append((key, text.rstrip(".")))
            else:
                out.append((key, text))
        return out


_local = threading.local()
_install_lock = threading.Lock()
_fallback: Callable[..., Iterable[SpfRecord]] | None = None  # pyspf's own lookup, for threads without a bridge


def _dispatch(name: str, qtype: str, strict: object = True, timeout: float = 20.0) -> list[SpfRecord]:
    bridge: SpfDnsBridge | None = getattr(_local, "bridge", None)
    if bridge is not None:
        return bridge(name, qtype, strict, timeout)
    assert _fallback is not None  # set before _dispatch is installed
    return list(_fallback(name, qtype, strict, timeout))


def install_spf_dispatch() -> None:
    """Route pyspf's DNS through the calling thread's bridge (idempotent; see the module docstring)."""
    global _fallback
    import spf

    with _install_lock:
        if spf.DNSLookup is not _dispatch:
            _fallback = spf.DNSLookup
            spf.DNSLookup = _dispatch


@contextlib.contextmanager
def spf_lookups(bridge: SpfDnsBridge) -> Iterator[None]:
    """pyspf calls made by this thread inside the block use ``bridge``."""
    install_spf_dispatch()
    previous = getattr(_local, "bridge", None)
    _local.bridge = bridge
    try:
        yield
    finally:
        _local.bridge = previous


# -- dkimpy ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TxtAnswer:
    """A prefetched TXT lookup: found (``records``), absent (NXDOMAIN or no TXT) or failed for now."""

    status: Literal["found", "absent", "temperror"]
    records: tuple[bytes, ...] = ()
    error: str = ""


def _key(name: str | bytes) -> str:
    if isinstance(name, bytes):
        name = name.decode("ascii", "replace")
    return name.rstrip(".").lower()


async def prefetch_txt(resolver: Resolver, names: Iterable[str]) -> dict[str, TxtAnswer]:
    """TXT records of every name, looked up concurrently; keys are lowercase names without the final dot."""

    async def one(name: str) -> TxtAnswer:
        if not _valid_name(name):
            return TxtAnswer("absent", error="not a valid DNS name")
        try:
            records = await resolver.txt(name)
        except DnsPermanentError:
            return TxtAnswer("absent", error="no such domain")
        except DnsTemporaryError as exc:
            return TxtAnswer("temperror", error=str(exc))
        return TxtAnswer("found", tuple(records)) if records else TxtAnswer("absent", error="no TXT record")

    unique = sorted({_key(n) for n in names})
    answers = await asyncio.gather(*(one(n) for n in unique))
    return dict(zip(unique, answers, strict=True))


def served_dnsfunc(answers: dict[str, TxtAnswer]) -> Callable[..., bytes | None]:
    """A dkimpy ``dnsfunc`` that answers only from ``answers`` (first TXT record; None when absent).

    A name not prefetched is answered as absent rather than looked up: dkimpy must never block on DNS.
    """

    def dnsfunc(name: bytes | str, timeout: float = 5) -> bytes | None:
        import dkim

        answer = answers.get(_key(name))
        if answer is None or answer.status == "absent":
            return None
        if answer.status == "temperror":
            raise dkim.DnsTimeoutError(answer.error)
        return answer.records[0]

    return dnsfunc


class LibraryLog:
    """The logger handed to dkimpy. dkimpy logs every signature that does not verify at ERROR; for a verifier
    facing the Internet that is an everyday event, reported in Authentication-Results, so it goes to DEBUG."""

    def __init__(self, name: str) -> None:
        self._log = logging.getLogger(name)

    def isEnabledFor(self, level: int) -> bool:
        return self._log.isEnabledFor(logging.DEBUG)

    def debug(self, msg: object, *args: object) -> None:
        self._log.debug(msg, *args)

    error = warning = info = debug


# -- Ed25519 for dkimpy without PyNaCl ------------------------------------------------------------------------------


class _NaclValueError(ValueError):
    pass


class _BadSignatureError(Exception):
    pass


class _Base64Encoder:
    @staticmethod
    def decode(data: bytes) -> bytes:
        return base64.b64decode(data)

    @staticmethod
    def encode(data: bytes) -> bytes:
        return base64.b64encode(data)


class _VerifyKey:
    """``nacl.signing.VerifyKey`` as dkimpy uses it: built from base64, ``verify(message, signature)``."""

    def __init__(self, key: bytes, encoder: type[_Base64Encoder] = _Base64Encoder) -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        try:
            self._key = Ed25519PublicKey.from_public_bytes(encoder.decode(key))
        except (ValueError, binascii.Error) as exc:
            raise _NaclValueError(str(exc)) from None

    def verify(self, message: bytes, signature: bytes) -> bytes:
        from cryptography.exceptions import InvalidSignature

        try:
            self._key.verify(bytes(signature), bytes(message))
        except InvalidSignature:
            raise _BadSignatureError("signature was forged or corrupt") from None
        return message


@dataclass(frozen=True, slots=True)
class _Signed:
    signature: bytes


class _SigningKey:
    """``nacl.signing.SigningKey`` as dkimpy uses it: a base64 32-byte seed, ``sign(message).signature``."""

    def __init__(self, seed: bytes, encoder: type[_Base64Encoder] = _Base64Encoder) -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        try:
            self._key = Ed25519PrivateKey.from_private_bytes(encoder.decode(seed))
        except (ValueError, binascii.Error) as exc:
            raise _NaclValueError(str(exc)) from None

    def sign(self, message: bytes) -> _Signed:
        return _Signed(self._key.sign(bytes(message)))


def ensure_ed25519() -> None:
    """Let dkimpy sign and verify Ed25519 even when PyNaCl is not installed (idempotent)."""
    import dkim

    if hasattr(dkim, "nacl"):
        return
    dkim.nacl = types.SimpleNamespace(  # dkimpy reads the module global ``nacl`` at call time
        signing=types.SimpleNamespace(VerifyKey=_VerifyKey, SigningKey=_SigningKey),
        encoding=types.SimpleNamespace(Base64Encoder=_Base64Encoder),
        exceptions=types.SimpleNamespace(ValueError=_NaclValueError, BadSignatureError=_BadSignatureError),
    )
