"""Row encoding and decoding for the SQLite queue (``sqlite.SqliteQueue``): the schema, the column lists
and INSERT statements shared by the backend and start-up recovery (``recovery``), and the conversion
between an ``Envelope`` / ``QueuedMessage`` and database rows.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from typing import Any

from ..envelope import Envelope, MailParams
from ..errors import QueueError
from .model import QueuedMessage, RcptStatus, RecipientState

__all__ = [
    "BODY_PATH_PARAM",
    "INSERT_BODY",
    "INSERT_MESSAGE",
    "INSERT_RECIPIENT",
    "MESSAGE_COLUMNS",
    "N_MESSAGE_COLUMNS",
    "RECIPIENT_COLUMNS",
    "SCHEMA",
    "SCHEMA_VERSION",
    "decode_message",
    "encode_params",
    "ensure_schema",
    "load_message",
    "message_insert_row",
    "queued_message",
    "recipient_insert_rows",
]

SCHEMA_VERSION = 1
# messages and bodies are WITHOUT ROWID (keyed by the queue id alone): a rowid table with a TEXT primary key is
# two B-trees, and every page a commit touches is written whole to the WAL, so an accept touched seven pages
# where five now do. Spools made with rowid tables (same version, same columns, same queries) keep them.
SCHEMA = (
    """CREATE TABLE messages (
        id          TEXT PRIMARY KEY NOT NULL,
        sender      TEXT NOT NULL,              -- '' = null reverse-path
        params      TEXT NOT NULL,              -- JSON: MAIL FROM parameters and session facts
        received_at REAL NOT NULL,
        size        INTEGER NOT NULL,           -- body bytes
        held        INTEGER NOT NULL DEFAULT 0,
        hold_reason TEXT NOT NULL DEFAULT '',
        client_ip   TEXT NOT NULL DEFAULT '',
        helo        TEXT NOT NULL DEFAULT '',
        body_path   TEXT,                       -- relative to the spool; NULL: the body is in bodies
        warned      INTEGER NOT NULL DEFAULT 0  -- a delay notice has been sent for this message
    ) WITHOUT ROWID""",
    "CREATE INDEX messages_held ON messages(id) WHERE held = 1",
    """CREATE TABLE bodies (
        id   TEXT PRIMARY KEY NOT NULL,         -- = messages.id
        data BLOB NOT NULL
    ) WITHOUT ROWID""",
    """CREATE TABLE recipients (
        msg_id       TEXT NOT NULL,
        idx          INTEGER NOT NULL,
        address      TEXT NOT NULL,
        domain       TEXT NOT NULL,
        orcpt        TEXT,
        notify       TEXT NOT NULL DEFAULT '',  -- comma-separated; '' = not given
        status       TEXT NOT NULL,
        attempts     INTEGER NOT NULL DEFAULT 0,
        last_reply   TEXT NOT NULL DEFAULT '',
        next_attempt REAL NOT NULL,
        updated      REAL NOT NULL,
        PRIMARY KEY (msg_id, idx)
    ) WITHOUT ROWID""",
    "CREATE INDEX recipients_due ON recipients(status, next_attempt)",
    "CREATE INDEX recipients_domain ON recipients(domain, status)",
)

INSERT_MESSAGE = (
    "INSERT INTO messages (id, sender, params, received_at, size, client_ip, helo, body_path, held, hold_reason)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
INSERT_BODY = "INSERT INTO bodies (id, data) VALUES (?, ?)"
INSERT_RECIPIENT = (
    "INSERT INTO recipients (msg_id, idx, address, domain, orcpt, notify, status, attempts, last_reply,"
    " next_attempt, updated) VALUES (?, ?, ?, ?, ?, ?, 'pending', 0, '', ?, ?)"
)
MESSAGE_COLUMNS = (
    "m.id, m.sender, m.params, m.received_at, m.size, m.held, m.hold_reason, m.client_ip, m.helo, m.warned"
)
N_MESSAGE_COLUMNS = 10
RECIPIENT_COLUMNS = (
    "r.msg_id, r.idx, r.address, r.domain, r.orcpt, r.notify, r.status, r.attempts, r.last_reply,"
    " r.next_attempt, r.updated"
)


def ensure_schema(conn: sqlite3.Connection) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
        version = row[0] if row else None
        if version is None:
            for statement in SCHEMA:
                conn.execute(statement)
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
        elif version > SCHEMA_VERSION:
            raise QueueError(f"queue schema version {version} is newer than this mailhop ({SCHEMA_VERSION})")
        # Finds the messages of one body segment (segments.py); only rows with a body_path are in it. Spools made
        # before segments get it here, same schema version: nothing else changed.
        conn.execute(BODY_PATH_INDEX)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


_PARAMS_JSON = json.JSONEncoder(separators=(",", ":"))


def encode_params(env: Envelope) -> str:
    mp = env.mail_params
    d: dict[str, Any] = {}
    if mp.size is not None:
        d["size"] = mp.size
    if mp.body is not None:
        d["body"] = mp.body
    if mp.smtputf8:
        d["smtputf8"] = True
    if mp.ret is not None:
        d["ret"] = mp.ret
    if mp.envid is not None:
        d["envid"] = mp.envid
    if mp.requiretls:
        d["requiretls"] = True
    if env.client_port:
        d["port"] = env.client_port
    if env.authenticated is not None:
        d["auth"] = env.authenticated
    if env.tls:
        d["tls"] = True
    if env.kind:
        d["kind"] = env.kind
    # json.dumps with options builds a new encoder per call; one shared encoder costs a third as much.
    return _PARAMS_JSON.encode(d) if d else "{}"


BODY_PATH_INDEX = "CREATE INDEX IF NOT EXISTS messages_body_path ON messages(body_path) WHERE body_path IS NOT NULL"
BODY_PATH_PARAM = 7  # the index of body_path in message_insert_row's tuple


def message_insert_row(qid: str, env: Envelope, now: float, size: int, body_path: str | None) -> tuple[Any, ...]:
    """The parameters of ``INSERT_MESSAGE``; ``body_path`` None: the body goes in ``bodies``."""
    return (qid, env.sender_address, encode_params(env), now, size, env.client_ip, env.helo, body_path,
            1 if env.hold_reason else 0, env.hold_reason)


def recipient_insert_rows(qid: str, env: Envelope, now: float) -> list[tuple[Any, ...]]:
    """The parameters of ``INSERT_RECIPIENT``, one row per recipient of ``env``."""
    return [
        (qid, i, str(r.mailbox), r.mailbox.domain, r.params.orcpt, ",".join(r.params.notify), now, now)
        for i, r in enumerate(env.recipients)
    ]


def queued_message(qid: str, env: Envelope, now: float, size: int) -> QueuedMessage:
    """The message exactly as ``load_message`` would read back the rows that ``message_insert_row`` and
    ``recipient_insert_rows`` make of ``env`` (hands a just-committed message to delivery without a read)."""
    recipients = tuple(
        RecipientState(idx=i, address=str(r.mailbox), domain=r.mailbox.domain, orcpt=r.params.orcpt,
                       notify=r.params.notify, status=RcptStatus.PENDING, attempts=0, last_reply="",
                       next_attempt=now, updated=now)
        for i, r in enumerate(env.recipients)
    )
    return QueuedMessage(
        id=qid, sender=env.sender_address, params=env.mail_params, received_at=now, size=size,
        held=bool(env.hold_reason), hold_reason=env.hold_reason, client_ip=env.client_ip, helo=env.helo,
        recipients=recipients, client_port=env.client_port, authenticated=env.authenticated, tls=env.tls,
        kind=env.kind,
    )


def _typed(d: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = d.get(key, default)
    if value is default:
        return value
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"params.{key} has type {type(value).__name__}")
    return value


def _decode_params(text: Any) -> tuple[MailParams, int, str | None, bool, str]:
    """Strict: ValueError on anything we did not write."""
    if not isinstance(text, str):
        raise ValueError("params is not text")
    try:
        d = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"params is not JSON ({exc.msg})") from None
    except RecursionError:  # deeply nested garbage: still just a corrupt row
        raise ValueError("params is nested too deeply") from None
    if not isinstance(d, dict):
        raise ValueError("params is not a JSON object")
    params = MailParams(
        size=_typed(d, "size", int, None),
        body=_typed(d, "body", str, None),
        smtputf8=_typed(d, "smtputf8", bool, False),
        ret=_typed(d, "ret", str, None),
        envid=_typed(d, "envid", str, None),
        requiretls=_typed(d, "requiretls", bool, False),
    )
    return (params, _typed(d, "port", int, 0), _typed(d, "auth", str, None), _typed(d, "tls", bool, False),
            _typed(d, "kind", str, ""))


def _decode_recipient(row: tuple[Any, ...]) -> RecipientState:
    _, idx, address, domain, orcpt, notify, status, attempts, last_reply, next_attempt, updated = row
    if not (isinstance(idx, int) and isinstance(address, str) and isinstance(domain, str)
            and isinstance(notify, str) and isinstance(attempts, int) and isinstance(last_reply, str)
            and isinstance(next_attempt, int | float) and isinstance(updated, int | float)
            and (orcpt is None or isinstance(orcpt, str))):
        raise ValueError(f"recipient {idx!r} has a column of the wrong type")
    return RecipientState(
        idx=idx, address=address, domain=domain, orcpt=orcpt,
        notify=tuple(notify.split(",")) if notify else (),
        status=RcptStatus(status),  # ValueError for an unknown status
        attempts=attempts, last_reply=last_reply, next_attempt=float(next_attempt), updated=float(updated),
    )


def decode_message(row: tuple[Any, ...], rcpt_rows: Iterable[tuple[Any, ...]]) -> tuple[QueuedMessage, list[str]]:
    """Best effort: a message is always returned (defaults for what cannot be decoded) with the problems."""
    problems: list[str] = []
    qid, sender, params_text, received_at, size, held, hold_reason, client_ip, helo, warned = row
    try:
        params, port, auth, tls, kind = _decode_params(params_text)
    except ValueError as exc:
        problems.append(str(exc))
        params, port, auth, tls, kind = MailParams(), 0, None, False, ""
    recipients = []
    for r in rcpt_rows:
        try:
            recipients.append(_decode_recipient(r))
        except ValueError as exc:
            problems.append(f"recipient row: {exc}")
    if not recipients and not problems:
        problems.append("no recipients")
    if not isinstance(received_at, int | float):
        problems.append("received_at is not a number")
        received_at = 0.0
    if not isinstance(size, int):
        problems.append("size is not an integer")
        size = 0
    message = QueuedMessage(
        id=qid, sender=sender if isinstance(sender, str) else "", params=params,
        received_at=float(received_at), size=size, held=bool(held),
        hold_reason=hold_reason if isinstance(hold_reason, str) else "",
        client_ip=client_ip if isinstance(client_ip, str) else "", helo=helo if isinstance(helo, str) else "",
        recipients=tuple(recipients), client_port=port, authenticated=auth, tls=tls,
        warned=bool(warned), kind=kind,
    )
    return message, problems


def load_message(conn: sqlite3.Connection, qid: str) -> tuple[QueuedMessage, list[str]] | None:
    """Read and decode one message and its recipients (see ``decode_message``); None when there is none."""
    row = conn.execute(f"SELECT {MESSAGE_COLUMNS} FROM messages m WHERE m.id = ?", (qid,)).fetchone()
    if row is None:
        return None
    rcpts = conn.execute(
        f"SELECT {RECIPIENT_COLUMNS} FROM recipients r WHERE r.msg_id = ? ORDER BY r.idx", (qid,)
    ).fetchall()
    return decode_message(row, rcpts)
