"""The legal order of SMTP commands as a transition table (RFC 5321 4.1.4, RFC 3030, RFC 3207).

Untrusted input: none; this module only decides whether a command that already parsed may come now.

Reasoning behind the table:
- RFC 5321 4.1.4: a session starts with EHLO/HELO. NOOP, HELP, VRFY, RSET and QUIT may be used at any
  time, even before EHLO. MAIL starts a transaction and may not be nested; RCPT needs MAIL; DATA needs at
  least one accepted RCPT. EHLO/HELO may be repeated and then reset the transaction like RSET.
- RFC 3030: BDAT needs an accepted RCPT too; after a non-LAST chunk only more BDAT (or RSET, which
  aborts) continues the message, and DATA in a BDAT transaction is a 503. A BDAT command is always
  followed by its octets, so even a refused BDAT has its chunk consumed before the reply, otherwise the
  chunk would be read as commands. After a chunk is refused the rest of that message is refused too
  (BDAT_FAILED) until BDAT LAST or RSET.
- RFC 3207: STARTTLS comes after EHLO and outside a transaction; bytes sent after it before the
  handshake are discarded (server.py), and after the handshake everything restarts at NEED_HELO.
- RFC 5321 3.1: after a 554 greeting (REJECTING) the server answers everything but QUIT with 503.
- RFC 4954 4: AUTH follows EHLO (it is an ESMTP extension: after HELO, or before any greeting, 503), is
  "not permitted during a mail transaction" (503), and after a successful AUTH "MUST NOT" be repeated
  (503); the last two rules depend on the connection, not the state, so server.py checks them on top of
  the AUTH row below. Only when these pass does the mechanism (504) and encryption (538) matter.
  After our 334 the next line is the client's SASL response, not a command (AUTH_RESPONSE, not a command
  state); a 235 or any 4xx/5xx to a step ends the exchange back in READY. The AUTH row is kept apart from
  SEQUENCE because it is offered only when mechanisms are configured (else AUTH is a 502 like TURN).
- RFC 3207 4.2 and RFC 4954 4: STARTTLS discards everything learned before it, AUTH included.
"""

from __future__ import annotations

from enum import Enum

from ..reply import R, Reply
from .commands import Bdat, Data, Help, Noop, Rset, Vrfy
from .events import AuthStart, Ehlo, Mail, Quit, Rcpt, StartTls
from .sasl import AuthReply

__all__ = ["AUTH_SEQUENCE", "COMMAND_STATES", "SEQUENCE", "State", "sequence_error"]


class State(Enum):
    GREETING = "greeting"  # the server has not sent its greeting yet
    NEED_HELO = "need_helo"
    READY = "ready"  # greeted, no transaction
    HAVE_MAIL = "have_mail"
    HAVE_RCPT = "have_rcpt"
    IN_DATA = "in_data"  # reading dot-stuffed content after 354
    IN_BDAT_CHUNK = "in_bdat_chunk"  # reading a chunk's octets
    BDAT_ACTIVE = "bdat_active"  # between chunks of an accepted BDAT message
    BDAT_FAILED = "bdat_failed"  # between chunks of a refused BDAT message: further chunks get 503
    TLS_PENDING = "tls_pending"  # 220 sent to STARTTLS; input is discarded until the handshake is done
    REJECTING = "rejecting"  # 554 greeting sent: only QUIT is allowed
    AUTH_RESPONSE = "auth_response"  # 334 sent: the next line is the client's SASL response
    CLOSED = "closed"

    # Members are singletons compared by identity; the default Enum hash runs Python code on every
    # table lookup, and the core looks the state up once per command.
    __hash__ = object.__hash__


# States in which the core reads command lines.
COMMAND_STATES = frozenset(
    (State.NEED_HELO, State.READY, State.HAVE_MAIL, State.HAVE_RCPT, State.BDAT_ACTIVE, State.BDAT_FAILED,
     State.REJECTING)
)

_ANY_TIME: dict[type, Reply | None] = {Rset: None, Noop: None, Help: None, Vrfy: None, Quit: None,
                                       Ehlo: None}

# SEQUENCE[state][command type] is None when the command is allowed now, else the 503 to send.
SEQUENCE: dict[State, dict[type, Reply | None]] = {
    State.NEED_HELO: {**_ANY_TIME, Mail: R.NEED_HELO, Rcpt: R.NEED_HELO, Data: R.NEED_HELO,
                      Bdat: R.NEED_HELO, StartTls: R.NEED_HELO},
    State.READY: {**_ANY_TIME, Mail: None, Rcpt: R.NEED_MAIL, Data: R.NEED_MAIL, Bdat: R.NEED_MAIL,
                  StartTls: None},
    State.HAVE_MAIL: {**_ANY_TIME, Mail: R.NESTED_MAIL, Rcpt: None, Data: R.NEED_RCPT, Bdat: R.NEED_RCPT,
                      StartTls: R.BAD_SEQUENCE},
    State.HAVE_RCPT: {**_ANY_TIME, Mail: R.NESTED_MAIL, Rcpt: None, Data: None, Bdat: None,
                      StartTls: R.BAD_SEQUENCE},
    State.BDAT_ACTIVE: {**_ANY_TIME, Mail: R.NESTED_MAIL, Rcpt: R.BAD_SEQUENCE, Data: R.BAD_SEQUENCE,
                        Bdat: None, StartTls: R.BAD_SEQUENCE},
    State.BDAT_FAILED: {**_ANY_TIME, Mail: R.NESTED_MAIL, Rcpt: R.BAD_SEQUENCE, Data: R.BAD_SEQUENCE,
                        Bdat: R.BAD_SEQUENCE, StartTls: R.BAD_SEQUENCE},
    State.REJECTING: {Quit: None},
}

# AUTH_SEQUENCE[state] is None when AUTH may start now (subject to server.py's checks), else the 503.
AUTH_SEQUENCE: dict[State, Reply | None] = {
    State.NEED_HELO: AuthReply.NEED_EHLO,
    State.READY: None,
    State.HAVE_MAIL: AuthReply.IN_TRANSACTION,
    State.HAVE_RCPT: AuthReply.IN_TRANSACTION,
    State.BDAT_ACTIVE: AuthReply.IN_TRANSACTION,
    State.BDAT_FAILED: AuthReply.IN_TRANSACTION,
    State.REJECTING: R.BAD_SEQUENCE,
}


def sequence_error(state: State, command: type) -> Reply | None:
    """None if ``command`` may be issued in ``state``, else the 503 reply. Unlisted pairs are 503."""
    if command is AuthStart:
        return AUTH_SEQUENCE.get(state, R.BAD_SEQUENCE)
    table = SEQUENCE.get(state)
    if table is None:
        return R.BAD_SEQUENCE
    return table.get(command, R.BAD_SEQUENCE)
