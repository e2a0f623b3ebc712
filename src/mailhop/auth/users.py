"""``UserStore``: SMTP AUTH users in ``<spool>/users.db`` beside the queue (SQLite, WAL, ``synchronous=FULL``).

The CLI (``mailhop users ...``) changes users with the synchronous methods while the daemon runs; the daemon
uses the async methods, which run in worker threads so the event loop never blocks. Nothing is cached: every
call reads the database afresh (in WAL mode each read sees the last committed change), so a password change,
removal or ``disable`` takes effect at the daemon's next AUTH.

The KDF work of :meth:`UserStore.authenticate` runs on a small bounded thread pool (``kdf_workers``, default 2):
a flood of AUTH attempts queues up there instead of creating threads or starving the loop. Unknown and disabled
users are verified against :data:`~mailhop.auth.passwords.DUMMY_HASH`, so they cost the same KDF run as a
real user and the reply time does not say whether the name exists.

Names are case-insensitive (NFKC, then lowercased), 1-64 characters, printable, without whitespace; ``@`` is
allowed because names are often email addresses.

Sender addresses a user may use (:func:`may_send_as`): ``local@domain`` entries, or ``@domain`` for every address
in a domain (that exact domain, not its subdomains). Comparison is case-insensitive over the whole address,
local part included (RFC 5321 lets a server treat local parts case-sensitively, but practically no mail system
does, and the stored list is the administrator's own); domains are compared in canonical form (lowercase A-labels,
:func:`mailhop.address.canonical_domain`). A user with no addresses may send as nothing, and the null
reverse-path ``<>`` never matches: the caller decides whether an authenticated client may send bounces.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import threading
import time
import unicodedata
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..address import AddressError, canonical_domain, parse_path
from ..smtp.sasl import ScramCredentials
from .passwords import (
    DUMMY_HASH,
    SCRAM_ITERATIONS,
    hash_password,
    make_scram_credentials,
    normalize_password,
    verify_password,
)

__all__ = [
    "MAX_NAME",
    "USERS_DB",
    "User",
    "UserExistsError",
    "UserNotFoundError",
    "UserStore",
    "UserStoreError",
    "may_send_as",
    "normalize_address",
    "normalize_name",
]

USERS_DB = "users.db"
MAX_NAME = 64
SCHEMA_VERSION = 1
_SCHEMA = """CREATE TABLE IF NOT EXISTS users (
    name                       TEXT PRIMARY KEY NOT NULL,   -- normalize_name(): NFKC, lowercased
    password                   TEXT NOT NULL,               -- passwords.hash_password(): scrypt$n$r$p$salt$hash
    scram_salt                 BLOB NOT NULL,
    scram_iterations           INTEGER NOT NULL,
    scram_stored_key           BLOB NOT NULL,
    scram_server_key           BLOB NOT NULL,
    addresses                  TEXT NOT NULL DEFAULT '[]',  -- JSON list: "user@domain" or "@domain"
    max_messages_per_hour      INTEGER,                     -- NULL: no limit
    max_recipients_per_message INTEGER,                     -- NULL: no limit
    disabled                   INTEGER NOT NULL DEFAULT 0,
    created                    REAL NOT NULL,
    updated                    REAL NOT NULL
)"""
_USER_COLUMNS = "name, addresses, max_messages_per_hour, max_recipients_per_message, disabled, created, updated"


class UserStoreError(Exception):
    """A user store operation failed (the message is fit for the operator)."""


class UserExistsError(UserStoreError):
    """``add`` of a name that is already taken."""


class UserNotFoundError(UserStoreError):
    """The named user does not exist."""


@dataclass(frozen=True, slots=True)
class User:
    """A user as stored, without credentials. ``addresses`` are canonical (see :func:`normalize_address`)."""

    name: str
    addresses: tuple[str, ...] = ()
    max_messages_per_hour: int | None = None
    max_recipients_per_message: int | None = None
    disabled: bool = False
    created: float = 0.0
    updated: float = 0.0

    def may_send_as(self, address: str) -> bool:
        return may_send_as(self, address)


# --- names and addresses -----------------------------------------------------------------------------


def normalize_name(name: str) -> str:
    """Canonical user name (NFKC, lowercased); ValueError unless 1-64 printable characters without whitespace."""
    if not isinstance(name, str):
        raise ValueError("user name must be text")
    norm = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", name).lower())
    if not 1 <= len(norm) <= MAX_NAME:
        raise ValueError(f"user name must be 1-{MAX_NAME} characters")
    if not norm.isprintable() or any(ch.isspace() for ch in norm):
        raise ValueError("user name must be printable characters without whitespace")
    try:
        norm.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("user name is not valid Unicode text") from None
    return norm


def _canonical_mailbox(text: str) -> str:
    """``local@domain`` with the domain canonical and everything lowercased; AddressError if not a mailbox."""
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    mailbox = parse_path(f"<{text}>", smtputf8=True)
    if mailbox is None or not mailbox.domain or mailbox.had_source_route:
        raise AddressError("not a mailbox (local@domain)")
    return f"{mailbox.local}@{mailbox.domain}".lower()


def normalize_address(address: str) -> str:
    """Canonical form of a ``local@domain`` or ``@domain`` entry; ValueError (AddressError) when invalid."""
    if not isinstance(address, str) or not address:
        raise AddressError("empty address")
    if address.startswith("@"):
        try:
            return "@" + canonical_domain(address[1:])
        except AddressError as exc:
            raise AddressError(f"{address!r}: {exc.reason}") from None
    try:
        return _canonical_mailbox(address)
    except AddressError as exc:
        raise AddressError(f"{address!r}: {exc.reason}") from None


def _normalize_addresses(addresses: Iterable[str]) -> tuple[str, ...]:
    if isinstance(addresses, str):
        raise ValueError("addresses must be a list of addresses, not one string")
    seen: dict[str, None] = {}
    for address in addresses:
        seen[normalize_address(address)] = None
    return tuple(seen)


def may_send_as(user: User, address: str) -> bool:
    """May ``user`` use ``address`` (``local@domain``, angle brackets optional) as its MAIL FROM?

    True for an exact entry (compared case-insensitively, local part included) or an ``@domain`` entry for the
    address's domain. A user without addresses may send as nothing; the null path and junk are never allowed.
    """
    if not user.addresses or not isinstance(address, str):
        return False
    try:
        canonical = _canonical_mailbox(address)
    except AddressError:
        return False
    domain = canonical[canonical.rindex("@") :]
    return canonical in user.addresses or domain in user.addresses


def _check_limit(name: str, value: int | None) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer or None")
    return value


# --- the store -----------------------------------------------------------------------------------------


class UserStore:
    """Users in one SQLite file. Sync methods for the CLI; ``authenticate``/``scram_credentials``/``get_user``
    (async) for the daemon. Thread-safe; ``close()`` (or ``with``/``aclose()``) when done."""

    def __init__(
        self,
        path: Path,
        *,
        busy_timeout: float = 10.0,
        kdf_workers: int = 2,
        scram_iterations: int = SCRAM_ITERATIONS,
        cache_ttl: float = 300.0,
    ) -> None:
        self.path = Path(path)
        self._busy_timeout = busy_timeout
        self._kdf_workers = kdf_workers
        self._scram_iterations = scram_iterations
        self._lock = threading.Lock()
        self._idle: list[sqlite3.Connection] = []
        self._ready = False
        self._closed = False
        self._pool: ThreadPoolExecutor | None = None
        self._cache_ttl = cache_ttl
        self._cache_key = secrets.token_bytes(32)
        self._verified: dict[bytes, float] = {}

    @classmethod
    def for_spool(cls, spool: Path, **kwargs: Any) -> UserStore:
        """The store of a spool directory: ``<spool>/users.db``."""
        return cls(Path(spool) / USERS_DB, **kwargs)

    # --- connections ---------------------------------------------------------------------------------

    def _create(self) -> None:
        """Create the file (mode 0600: it holds password hashes) and the schema, once per store."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        conn = self._connect()
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise UserStoreError(f"{self.path}: cannot use WAL mode (got {mode})")
            conn.execute("BEGIN IMMEDIATE")
            try:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise UserStoreError(
                        f"{self.path}: user database version {version} is newer than this mailhop ({SCHEMA_VERSION})"
                    )
                conn.execute(_SCHEMA)
                if version < SCHEMA_VERSION:
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except BaseException:
            conn.close()
            raise
        self._idle.append(conn)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, timeout=self._busy_timeout, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute("PRAGMA synchronous=FULL")
        except BaseException:
            conn.close()
            raise
        return conn

    @contextlib.contextmanager
    def _conn(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._closed:
                raise UserStoreError("user store is closed")
            if not self._ready:
                self._create()
                self._ready = True
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = self._connect()
        try:
            yield conn
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        finally:
            with self._lock:
                if self._closed or len(self._idle) >= 4:
                    conn.close()
                else:
                    self._idle.append(conn)

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._conn() as conn:
            conn.execute("BEGIN IMMEDIATE")
            yield conn
            conn.execute("COMMIT")

    def close(self) -> None:
        """Close connections and stop the KDF threads (waiting for running verifications)."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            pool, self._pool = self._pool, None
        for conn in idle:
            conn.close()
        if pool is not None:
            pool.shutdown(wait=True)

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    def __enter__(self) -> UserStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- rows ----------------------------------------------------------------------------------------

    @staticmethod
    def _user(row: tuple[Any, ...]) -> User:
        name, addresses, mph, mrpm, disabled, created, updated = row
        try:
            decoded = json.loads(addresses)
        except (TypeError, json.JSONDecodeError):
            decoded = []
        addrs = tuple(a for a in decoded if isinstance(a, str)) if isinstance(decoded, list) else ()
        return User(
            name=name,
            addresses=addrs,
            max_messages_per_hour=mph,
            max_recipients_per_message=mrpm,
            disabled=bool(disabled),
            created=created,
            updated=updated,
        )

    def _credentials(self, password: str) -> tuple[str, ScramCredentials]:
        normalize_password(password)  # fail before the (slow) KDF runs
        return hash_password(password), make_scram_credentials(password, iterations=self._scram_iterations)

    def _get(self, conn: sqlite3.Connection, name: str) -> User | None:
        row = conn.execute(f"SELECT {_USER_COLUMNS} FROM users WHERE name = ?", (name,)).fetchone()
        return None if row is None else self._user(row)

    def _update(self, name: str, assignments: str, values: tuple[Any, ...]) -> User:
        key = normalize_name(name)
        with self._write() as conn:
            cur = conn.execute(f"UPDATE users SET {assignments}, updated = ? WHERE name = ?", (*values, time.time(), key))
            if cur.rowcount == 0:
                raise UserNotFoundError(f"no user {key!r}")
            user = self._get(conn, key)
        assert user is not None
        return user

    # --- sync API (CLI) ------------------------------------------------------------------------------

    def add(
        self,
        name: str,
        password: str,
        addresses: Iterable[str] = (),
        *,
        max_messages_per_hour: int | None = None,
        max_recipients_per_message: int | None = None,
        disabled: bool = False,
    ) -> User:
        """Create a user; UserExistsError if the name is taken, ValueError on invalid input."""
        key = normalize_name(name)
        addrs = _normalize_addresses(addresses)
        mph = _check_limit("max_messages_per_hour", max_messages_per_hour)
        mrpm = _check_limit("max_recipients_per_message", max_recipients_per_message)
        if self.get(key) is not None:  # cheap early answer; the INSERT below is what decides
            raise UserExistsError(f"user {key!r} already exists")
        encoded, scram = self._credentials(password)
        now = time.time()
        try:
            with self._write() as conn:
                conn.execute(
                    "INSERT INTO users (name, password, scram_salt, scram_iterations, scram_stored_key,"
                    " scram_server_key, addresses, max_messages_per_hour, max_recipients_per_message, disabled,"
                    " created, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (key, encoded, scram.salt, scram.iterations, scram.stored_key, scram.server_key,
                     json.dumps(list(addrs)), mph, mrpm, int(disabled), now, now),
                )
        except sqlite3.IntegrityError:
            raise UserExistsError(f"user {key!r} already exists") from None
        return User(key, addrs, mph, mrpm, disabled, now, now)

    def set_password(self, name: str, password: str) -> None:
        """Replace the password (scrypt hash and SCRAM credentials); UserNotFoundError if absent."""
        key = normalize_name(name)
        if self.get(key) is None:
            raise UserNotFoundError(f"no user {key!r}")
        encoded, scram = self._credentials(password)
        self._update(
            key,
            "password = ?, scram_salt = ?, scram_iterations = ?, scram_stored_key = ?, scram_server_key = ?",
            (encoded, scram.salt, scram.iterations, scram.stored_key, scram.server_key),
        )

    def remove(self, name: str) -> None:
        """Delete a user; UserNotFoundError if absent."""
        key = normalize_name(name)
        with self._write() as conn:
            if conn.execute("DELETE FROM users WHERE name = ?", (key,)).rowcount == 0:
                raise UserNotFoundError(f"no user {key!r}")

    def get(self, name: str) -> User | None:
        """The user, or None (also for a name that is not valid)."""
        try:
            key = normalize_name(name)
        except ValueError:
            return None
        with self._conn() as conn:
            return self._get(conn, key)

    def set_addresses(self, name: str, addresses: Iterable[str]) -> User:
        """Replace the user's sender addresses (an empty list: may send as nothing)."""
        addrs = _normalize_addresses(addresses)
        return self._update(name, "addresses = ?", (json.dumps(list(addrs)),))

    def set_limits(
        self, name: str, *, max_messages_per_hour: int | None, max_recipients_per_message: int | None
    ) -> User:
        """Set both limits (None: no limit)."""
        mph = _check_limit("max_messages_per_hour", max_messages_per_hour)
        mrpm = _check_limit("max_recipients_per_message", max_recipients_per_message)
        return self._update(name, "max_messages_per_hour = ?, max_recipients_per_message = ?", (mph, mrpm))

    def set_disabled(self, name: str, disabled: bool) -> User:
        """Disable (AUTH always fails, SCRAM credentials are withheld) or re-enable a user."""
        return self._update(name, "disabled = ?", (int(disabled),))

    def list(self) -> builtins.list[User]:
        """Every user, by name."""
        with self._conn() as conn:
            rows = conn.execute(f"SELECT {_USER_COLUMNS} FROM users ORDER BY name").fetchall()
        return [self._user(row) for row in rows]

    # --- blocking helpers for the async API ----------------------------------------------------------

    def _authenticate_sync(self, name: str, password: str) -> User | None:
        encoded: str | None = None
        user: User | None = None
        try:
            key = normalize_name(name)
        except ValueError:
            key = None
        if key is not None:
            with self._conn() as conn:
                row = conn.execute(f"SELECT {_USER_COLUMNS}, password FROM users WHERE name = ?", (key,)).fetchone()
            if row is not None:
                user = self._user(row[:-1])
                if not user.disabled:
                    encoded = row[-1]
        if encoded is None:
            verify_password(password, DUMMY_HASH)  # same KDF cost as a real user; the result is ignored
            return None
        assert key is not None
        # A verified (name, password, stored hash) is remembered for a while, as Dovecot's auth cache does:
        # applications that open a session per message would otherwise pay the memory-hard KDF every time.
        # The cache key is an HMAC under a per-process random key (no password is kept), and it includes the
        # stored hash, so `mailhop users passwd` invalidates it at once.
        token = hmac.new(self._cache_key, f"{key}\0{password}\0{encoded}".encode("utf-8", "surrogatepass"),
                         hashlib.sha256).digest()
        now = time.monotonic()
        with self._lock:
            expiry = self._verified.get(token)
            if expiry is not None and expiry > now:
                return user
        if not verify_password(password, encoded):
            return None
        with self._lock:
            self._verified[token] = now + self._cache_ttl
            while len(self._verified) > 10_000:
                self._verified.pop(next(iter(self._verified)))
        return user

    def _scram_sync(self, name: str) -> ScramCredentials | None:
        try:
            key = normalize_name(name)
        except ValueError:
            return None
        with self._conn() as conn:
            row = conn.execute(
                "SELECT scram_salt, scram_iterations, scram_stored_key, scram_server_key, disabled"
                " FROM users WHERE name = ?",
                (key,),
            ).fetchone()
        if row is None or row[4]:
            return None
        return ScramCredentials(salt=row[0], iterations=row[1], stored_key=row[2], server_key=row[3])

    def _kdf_pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._closed:
                raise UserStoreError("user store is closed")
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self._kdf_workers, thread_name_prefix="mailhop-kdf")
            return self._pool

    # --- async API (daemon) --------------------------------------------------------------------------

    async def authenticate(self, name: str, password: str) -> User | None:
        """The user when ``password`` is right and the user is enabled, else None.

        Runs on the bounded KDF pool; an unknown, disabled or invalid name costs the same scrypt run.
        A database failure raises (sqlite3.Error, OSError, UserStoreError): answer it as a temporary failure.
        """
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._kdf_pool(), self._authenticate_sync, name, password)

    async def scram_credentials(self, name: str) -> ScramCredentials | None:
        """Stored SCRAM-SHA-256 credentials, or None for an unknown or disabled user."""
        return await asyncio.to_thread(self._scram_sync, name)

    async def get_user(self, name: str) -> User | None:
        return await asyncio.to_thread(self.get, name)
