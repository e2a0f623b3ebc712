"""Server-side SASL mechanisms for SMTP AUTH (RFC 4954) as small sans-IO state machines.

Untrusted input: every byte given to ``start`` and ``respond`` (the client's base64-decoded SASL
messages). Every method returns a Step and never raises: malformed, oversized or out-of-order input
becomes a ``Failure`` whose reason is a fixed, log-safe string (no peer data); the peer only ever sees
535 5.7.8. Credential checking stays with the caller: PLAIN and LOGIN ask for it with ``CheckPassword``
(the caller runs the slow KDF off the event loop, then calls ``password_result``); SCRAM asks for the
user's stored ``ScramCredentials`` and needs no KDF of its own.

Supported: PLAIN (RFC 4616), LOGIN (draft-murchison-sasl-login) and SCRAM-SHA-256 (RFC 5802, RFC 7677)
without channel binding. Proxy authorization (an authzid other than the user) is refused.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import unicodedata
from dataclasses import dataclass, field
from typing import Final, Protocol

from ..reply import Reply

__all__ = [
    "MECHANISMS",
    "AuthReply",
    "Challenge",
    "CheckPassword",
    "Failure",
    "NeedScramCredentials",
    "SaslMechanism",
    "ScramCredentials",
    "ScramSha256",
    "Step",
    "Success",
    "challenge_reply",
    "derive_scram_credentials",
    "make_mechanism",
    "saslprep",
    "step_reply",
    "verify_scram_password",
]

#: Mechanism names ``make_mechanism`` knows, strongest first.
MECHANISMS: Final = ("SCRAM-SHA-256", "PLAIN", "LOGIN")

# Bounds on parsed fields (octets of UTF-8, or characters of ASCII). A response line is at most 12288
# octets (9216 decoded), so these mostly keep identities sane for logs and credential look-ups.
_MAX_NAME = 255
_MAX_PASSWORD = 1024
_MAX_NONCE = 256
_MAX_MESSAGE = 4096
_MAX_ITERATIONS = 10_000_000  # a stored count above this is corrupt (PBKDF2 would run for minutes)


# -- steps ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Challenge:
    """Send ``334 base64(data)`` (``challenge_reply``) and pass the client's answer to ``respond``."""

    data: bytes


@dataclass(frozen=True, slots=True)
class CheckPassword:
    """Verify the password (slow KDF, off the event loop), then call ``password_result(ok)``.

    ``password`` is as the client sent it (not SASLprep'd; ``verify_scram_password`` prepares it), and
    ``ok`` must be the bool itself: anything but ``True`` (say, an un-awaited future) counts as a failure.
    """

    authzid: str
    username: str
    password: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class NeedScramCredentials:
    """Look up the user's stored ScramCredentials, then call ``scram_credentials(creds or None)``."""

    username: str


@dataclass(frozen=True, slots=True)
class Success:
    """Authenticated as ``identity``: reply 235 (``AuthReply.OK``)."""

    identity: str


@dataclass(frozen=True, slots=True)
class Failure:
    """The exchange failed; ``reason`` is for logs only. Reply 535 5.7.8 (``AuthReply.FAILED``)."""

    reason: str


Step = Challenge | CheckPassword | NeedScramCredentials | Success | Failure


@dataclass(frozen=True, slots=True)
class ScramCredentials:
    """What a server stores for SCRAM-SHA-256 (RFC 5802 3): never the password itself."""

    salt: bytes
    iterations: int
    stored_key: bytes = field(repr=False)
    server_key: bytes = field(repr=False)


class SaslMechanism(Protocol):
    """One server side of one exchange. Every call returns the next Step; none raises."""

    def start(self, initial: bytes | None) -> Step: ...

    def respond(self, data: bytes) -> Step: ...

    def password_result(self, ok: bool) -> Step: ...

    def scram_credentials(self, creds: ScramCredentials | None) -> Step: ...


# -- replies --------------------------------------------------------------------------------------------


class AuthReply:
    """The AUTH replies (RFC 4954 6): the core sends the protocol errors, the session the outcomes."""

    OK = Reply(235, "2.7.0", "Authentication successful")
    FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
    TEMPORARY_FAILURE = Reply(454, "4.7.0", "Temporary authentication failure")
    NEED_EHLO = Reply(503, "5.5.1", "Send EHLO first")
    ALREADY_AUTHENTICATED = Reply(503, "5.5.1", "Already authenticated")
    IN_TRANSACTION = Reply(503, "5.5.1", "AUTH not permitted during a mail transaction")
    UNKNOWN_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication type")
    ENCRYPTION_REQUIRED = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
    BAD_BASE64 = Reply(501, "5.5.2", "Invalid base64 data")
    CANCELLED = Reply(501, "5.7.0", "Authentication cancelled")
    LINE_TOO_LONG = Reply(500, "5.5.6", "Authentication exchange line is too long")


def challenge_reply(data: bytes) -> Reply:
    """The 334 carrying one server challenge (RFC 4954 4): base64 text, no enhanced code."""
    return Reply(334, "", base64.b64encode(data).decode("ascii"))


def step_reply(step: Step) -> Reply | None:
    """The reply for a Challenge, Success or Failure; None for the steps that need the caller's work."""
    if isinstance(step, Challenge):
        return challenge_reply(step.data)
    if isinstance(step, Success):
        return AuthReply.OK
    if isinstance(step, Failure):
        return AuthReply.FAILED
    return None


# -- SASLprep (RFC 4013, simplified) --------------------------------------------------------------------

# RFC 3454 B.1: commonly mapped to nothing.
_MAP_TO_NOTHING = frozenset(
    "\u00ad\u034f\u1806\u180b\u180c\u180d\u200b\u200c\u200d\u2060\ufe00\ufe01\ufe02\ufe03\ufe04\ufe05\ufe06"
    "\ufe07\ufe08\ufe09\ufe0a\ufe0b\ufe0c\ufe0d\ufe0e\ufe0f\ufeff"
)
# Unicode categories refused after normalisation: controls, format characters, surrogates, private use.
_PROHIBITED_CATEGORIES = frozenset(("Cc", "Cf", "Cs", "Co"))


def saslprep(text: str) -> str | None:
    """RFC 4013 simplified: map non-ASCII spaces to SPACE, drop B.1 characters, NFKC, refuse controls.

    None when the string holds a prohibited character (controls, format characters, surrogates,
    private use); bidirectional checks and unassigned code points are not enforced.
    """
    if text.isascii():
        if any(ch < " " or ch == "\x7f" for ch in text):
            return None
        return text
    mapped = "".join(
        " " if unicodedata.category(ch) == "Zs" else ch for ch in text if ch not in _MAP_TO_NOTHING
    )
    normal = unicodedata.normalize("NFKC", mapped)
    if any(unicodedata.category(ch) in _PROHIBITED_CATEGORIES for ch in normal):
        return None
    return normal


def _utf8(data: bytes, limit: int) -> str | None:
    if len(data) > limit:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _username(data: bytes) -> str | None:
    """A user name from the wire: bounded UTF-8, non-empty after SASLprep."""
    text = _utf8(data, _MAX_NAME)
    if text is None:
        return None
    name = saslprep(text)
    return name if name and len(name) <= _MAX_NAME else None


# -- PLAIN and LOGIN ------------------------------------------------------------------------------------

_FAILED_PASSWORD = Failure("invalid credentials")
_OUT_OF_ORDER = Failure("unexpected step")


class _Mechanism:
    """Shared plumbing: a stage name, and Failure for every call the current stage does not expect."""

    __slots__ = ("_stage", "_user")

    def __init__(self) -> None:
        self._stage = "new"
        self._user = ""

    def _fail(self, reason: str | Failure) -> Failure:
        self._stage = "done"
        return reason if isinstance(reason, Failure) else Failure(reason)

    def start(self, initial: bytes | None) -> Step:
        return self._fail(_OUT_OF_ORDER)

    def respond(self, data: bytes) -> Step:
        return self._fail(_OUT_OF_ORDER)

    def password_result(self, ok: bool) -> Step:
        if self._stage != "check":
            return self._fail(_OUT_OF_ORDER)
        self._stage = "done"
        return Success(self._user) if ok is True else _FAILED_PASSWORD

    def scram_credentials(self, creds: ScramCredentials | None) -> Step:
        return self._fail(_OUT_OF_ORDER)

    def _check(self, authzid: str, user: str, password: str) -> Step:
        self._user = user
        self._stage = "check"
        return CheckPassword(authzid, user, password)


class Plain(_Mechanism):
    """PLAIN (RFC 4616): ``[authzid] NUL authcid NUL passwd`` in UTF-8."""

    __slots__ = ()

    def start(self, initial: bytes | None) -> Step:
        if self._stage != "new":
            return self._fail(_OUT_OF_ORDER)
        if initial is None:
            self._stage = "response"
            return Challenge(b"")
        return self._message(initial)

    def respond(self, data: bytes) -> Step:
        if self._stage != "response":
            return self._fail(_OUT_OF_ORDER)
        return self._message(data)

    def _message(self, data: bytes) -> Step:
        if len(data) > 2 * _MAX_NAME + _MAX_PASSWORD + 2:
            return self._fail("PLAIN message too long")
        parts = data.split(b"\0")
        if len(parts) != 3:
            return self._fail("malformed PLAIN message")
        raw_authzid, raw_user, raw_password = parts
        user = _username(raw_user)
        if user is None:
            return self._fail("bad PLAIN user name")
        password = _utf8(raw_password, _MAX_PASSWORD)
        if not password:
            return self._fail("bad PLAIN password")
        if raw_authzid:
            authzid = _username(raw_authzid)
            if authzid is None:
                return self._fail("bad PLAIN authorization identity")
            if authzid != user:
                return self._fail("proxy authorization not supported")
        else:
            authzid = ""
        return self._check(authzid, user, password)


class Login(_Mechanism):
    """LOGIN (draft-murchison-sasl-login): user name and password in answer to two challenges."""

    __slots__ = ()

    def start(self, initial: bytes | None) -> Step:
        if self._stage != "new":
            return self._fail(_OUT_OF_ORDER)
        if initial is None:
            self._stage = "username"
            return Challenge(b"Username:")
        return self._take_user(initial)

    def respond(self, data: bytes) -> Step:
        if self._stage == "username":
            return self._take_user(data)
        if self._stage == "password":
            password = _utf8(data, _MAX_PASSWORD)
            if not password or "\0" in password:
                return self._fail("bad LOGIN password")
            return self._check("", self._user, password)
        return self._fail(_OUT_OF_ORDER)

    def _take_user(self, data: bytes) -> Step:
        user = _username(data)
        if user is None:
            return self._fail("bad LOGIN user name")
        self._user = user
        self._stage = "password"
        return Challenge(b"Password:")


# -- SCRAM-SHA-256 --------------------------------------------------------------------------------------

_SASLNAME = re.compile(r"(?:[^=,]|=2C|=3D)+")
_NONCE = re.compile(r"[\x21-\x2b\x2d-\x7e]+")  # printable ASCII except ","
_ATTR = re.compile(r"[a-zA-Z]=")
_PROOF_LENGTH = 32  # SHA-256


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.digest(key, msg, "sha256")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes | None:
    try:
        return binascii.a2b_base64(text.encode("ascii"), strict_mode=True)
    except (binascii.Error, UnicodeEncodeError):
        return None


def _saslname(text: str) -> str | None:
    """Unescape a SCRAM saslname (=2C is ",", =3D is "="); None if malformed, too long or prohibited."""
    if len(text) > 3 * _MAX_NAME or _SASLNAME.fullmatch(text) is None:
        return None
    name = saslprep(text.replace("=2C", ",").replace("=3D", "="))
    return name if name and len(name.encode("utf-8")) <= _MAX_NAME else None


def derive_scram_credentials(
    password: str, *, salt: bytes | None = None, iterations: int = 4096
) -> ScramCredentials:
    """The SCRAM-SHA-256 credentials to store for ``password`` (RFC 5802 3, RFC 7677).

    SaltedPassword is PBKDF2-HMAC-SHA-256 of the SASLprep'd password: slow by design, run it off the
    event loop. Raises ValueError for an empty or prohibited password or a bad salt or iteration count.
    """
    prepared = saslprep(password)
    if not prepared:
        raise ValueError("password is empty or contains prohibited characters")
    if salt is None:
        salt = secrets.token_bytes(16)
    if not salt:
        raise ValueError("salt must not be empty")
    if not 1 <= iterations <= _MAX_ITERATIONS:
        raise ValueError(f"iterations must be between 1 and {_MAX_ITERATIONS}")
    salted = hashlib.pbkdf2_hmac("sha256", prepared.encode("utf-8"), salt, iterations)
    client_key = _hmac(salted, b"Client Key")
    return ScramCredentials(
        salt, iterations, hashlib.sha256(client_key).digest(), _hmac(salted, b"Server Key")
    )


def verify_scram_password(password: str, creds: ScramCredentials) -> bool:
    """True if ``password`` matches stored SCRAM credentials (for PLAIN/LOGIN; slow, run off the loop)."""
    try:
        derived = derive_scram_credentials(password, salt=creds.salt, iterations=creds.iterations)
    except ValueError:
        return False
    return hmac.compare_digest(derived.stored_key, creds.stored_key)


# Unknown users get credentials derived from a per-process secret, so the same name always sees the same
# salt and the exchange looks like a real one until the proof fails.
_FAKE_SECRET: Final = secrets.token_bytes(32)
_FAKE_ITERATIONS = 4096


def _fake_credentials(username: str) -> ScramCredentials:
    seed = _hmac(_FAKE_SECRET, username.encode("utf-8"))
    return ScramCredentials(seed[:16], _FAKE_ITERATIONS, _hmac(seed, b"stored"), _hmac(seed, b"server"))


class ScramSha256(_Mechanism):
    """SCRAM-SHA-256 (RFC 5802, RFC 7677) without channel binding (gs2 flag "n" or "y").

    ``server_nonce`` is for tests only (RFC 7677's example); otherwise a fresh random nonce is used.
    """

    __slots__ = ("_auth_first", "_creds", "_gs2", "_known", "_nonce", "_server_first", "_snonce")

    def __init__(self, server_nonce: str | None = None) -> None:
        super().__init__()
        self._snonce = secrets.token_urlsafe(24) if server_nonce is None else server_nonce
        self._gs2 = ""
        self._nonce = ""
        self._auth_first = ""  # client-first-message-bare
        self._server_first = ""
        self._creds: ScramCredentials | None = None
        self._known = False

    def start(self, initial: bytes | None) -> Step:
        if self._stage != "new":
            return self._fail(_OUT_OF_ORDER)
        if initial is None:
            self._stage = "first"
            return Challenge(b"")
        return self._client_first(initial)

    def respond(self, data: bytes) -> Step:
        stage = self._stage
        if stage == "first":
            return self._client_first(data)
        if stage == "final":
            return self._client_final(data)
        if stage == "ack":
            self._stage = "done"
            return Success(self._user) if not data else Failure("unexpected data after server-final")
        return self._fail(_OUT_OF_ORDER)

    def scram_credentials(self, creds: ScramCredentials | None) -> Step:
        if self._stage != "creds":
            return self._fail(_OUT_OF_ORDER)
        if creds is not None and not (
            creds.salt and 1 <= creds.iterations <= _MAX_ITERATIONS
            and len(creds.stored_key) == _PROOF_LENGTH and len(creds.server_key) == _PROOF_LENGTH
        ):
            return self._fail("stored SCRAM credentials are malformed")
        self._known = creds is not None
        self._creds = creds if creds is not None else _fake_credentials(self._user)
        self._server_first = (
            f"r={self._nonce}{self._snonce},s={_b64(self._creds.salt)},i={self._creds.iterations}"
        )
        self._stage = "final"
        return Challenge(self._server_first.encode("ascii"))

    def _client_first(self, data: bytes) -> Step:
        text = _utf8(data, _MAX_MESSAGE)
        if text is None:
            return self._fail("malformed SCRAM client-first message")
        # gs2-header = gs2-cbind-flag "," [authzid] ","
        if text.startswith("p="):
            return self._fail("SCRAM channel binding not supported")
        if not text.startswith(("n,", "y,")):
            return self._fail("malformed SCRAM gs2 header")
        end = text.find(",", 2)
        if end < 0:
            return self._fail("malformed SCRAM gs2 header")
        raw_authzid = text[2:end]
        self._gs2 = text[: end + 1]
        bare = text[end + 1 :]
        attrs = bare.split(",")
        if len(attrs) < 2 or attrs[0].startswith("m="):
            return self._fail("malformed SCRAM client-first message or mandatory extension")
        if not attrs[0].startswith("n=") or not attrs[1].startswith("r="):
            return self._fail("malformed SCRAM client-first message")
        if any(_ATTR.match(attr) is None for attr in attrs[2:]):
            return self._fail("malformed SCRAM extension")
        user = _saslname(attrs[0][2:])
        if user is None:
            return self._fail("bad SCRAM user name")
        if raw_authzid:
            authzid = _saslname(raw_authzid[2:]) if raw_authzid.startswith("a=") else None
            if authzid is None:
                return self._fail("malformed SCRAM authorization identity")
            if authzid != user:
                return self._fail("proxy authorization not supported")
        nonce = attrs[1][2:]
        if len(nonce) > _MAX_NONCE or _NONCE.fullmatch(nonce) is None:
            return self._fail("bad SCRAM client nonce")
        self._user = user
        self._nonce = nonce
        self._auth_first = bare
        self._stage = "creds"
        return NeedScramCredentials(user)

    def _client_final(self, data: bytes) -> Step:
        text = _utf8(data, _MAX_MESSAGE)
        if text is None or not text.isascii():
            return self._fail("malformed SCRAM client-final message")
        cut = text.rfind(",p=")
        if cut < 0:
            return self._fail("malformed SCRAM client-final message")
        without_proof = text[:cut]
        proof = _unb64(text[cut + 3 :])
        attrs = without_proof.split(",")
        if len(attrs) < 2 or not attrs[0].startswith("c=") or not attrs[1].startswith("r="):
            return self._fail("malformed SCRAM client-final message")
        if any(_ATTR.match(attr) is None for attr in attrs[2:]):
            return self._fail("malformed SCRAM extension")
        if attrs[0][2:] != _b64(self._gs2.encode("utf-8")):
            return self._fail("SCRAM channel binding mismatch")
        if attrs[1][2:] != self._nonce + self._snonce:
            return self._fail("SCRAM nonce mismatch")
        if proof is None or len(proof) != _PROOF_LENGTH:
            return self._fail("malformed SCRAM proof")
        creds = self._creds
        assert creds is not None  # set when entering "final"
        auth_message = f"{self._auth_first},{self._server_first},{without_proof}".encode()
        client_signature = _hmac(creds.stored_key, auth_message)
        client_key = bytes(a ^ b for a, b in zip(proof, client_signature, strict=True))
        valid = hmac.compare_digest(hashlib.sha256(client_key).digest(), creds.stored_key)
        if not self._known:
            return self._fail("unknown user")
        if not valid:
            return self._fail(_FAILED_PASSWORD)
        self._stage = "ack"
        server_signature = _hmac(creds.server_key, auth_message)
        return Challenge(b"v=" + base64.b64encode(server_signature))


def make_mechanism(name: str) -> SaslMechanism:
    """A fresh server-side mechanism for one exchange; ``name`` is one of MECHANISMS (ValueError if not)."""
    if name == "SCRAM-SHA-256":
        return ScramSha256()
    if name == "PLAIN":
        return Plain()
    if name == "LOGIN":
        return Login()
    raise ValueError(f"unsupported SASL mechanism {name!r}")
