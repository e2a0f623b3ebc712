"""SMTP AUTH (RFC 4954) in the server core: advertising, command order, the exchange's framing."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailhop.reply import R, Reply
from mailhop.smtp import (
    NEED_DATA,
    AuthAborted,
    AuthReply,
    AuthResponse,
    AuthStart,
    CheckPassword,
    ConnectionClosed,
    Limits,
    NeedScramCredentials,
    SaslMechanism,
    ServerSettings,
    State,
    Step,
    derive_scram_credentials,
    make_mechanism,
    step_reply,
)
from mailhop.smtp.state import AUTH_SEQUENCE, sequence_error

from .helpers import EHLO, MAIL, RCPT, Harness, codes, replies
from .test_sasl import ScramClient

ALL = ("SCRAM-SHA-256", "PLAIN", "LOGIN")
USERS = {"user": "secret", "j\u00f6rg": "p\u00e4ss"}


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


PLAIN_OK = b"AUTH PLAIN " + b64(b"\0user\0secret") + b"\r\n"
PLAIN_BAD = b"AUTH PLAIN " + b64(b"\0user\0wrong") + b"\r\n"


class Session:
    """What the real session does for AUTH: one mechanism per exchange, steps turned into replies."""

    def __init__(self) -> None:
        self.creds = {name: derive_scram_credentials(pw, iterations=64) for name, pw in USERS.items()}
        self.mech: SaslMechanism | None = None
        self.steps: list[Step] = []
        self.aborted: list[str] = []

    def responses(self) -> dict[type, Any]:
        return {AuthStart: self.start, AuthResponse: self.respond, AuthAborted: self.abort}

    def start(self, event: AuthStart) -> Reply:
        self.mech = make_mechanism(event.mechanism)
        return self._reply(self.mech.start(event.initial))

    def respond(self, event: AuthResponse) -> Reply:
        assert self.mech is not None
        return self._reply(self.mech.respond(event.data))

    def abort(self, event: AuthAborted) -> None:
        self.aborted.append(event.reason)
        self.mech = None

    def _reply(self, step: Step) -> Reply:
        assert self.mech is not None
        while True:
            self.steps.append(step)
            if isinstance(step, CheckPassword):
                step = self.mech.password_result(USERS.get(step.username) == step.password)
            elif isinstance(step, NeedScramCredentials):
                step = self.mech.scram_credentials(self.creds.get(step.username))
            else:
                reply = step_reply(step)
                assert reply is not None
                if reply.code != 334:
                    self.mech = None
                return reply


def auth_harness(*, tls: bool = True, plaintext_ok: bool = False, mechanisms: tuple[str, ...] = ALL,
                 greet: bytes | None = EHLO, **limits: Any) -> tuple[Harness, Session]:
    session = Session()
    settings = ServerSettings("mx.example.test", Limits(**limits), tls_available=True, tls_active=tls,
                              auth_mechanisms=mechanisms, auth_plaintext_ok=plaintext_ok)
    h = Harness(settings, responses=session.responses())
    if greet:
        h.feed(greet)
    return h, session


# -- advertising -------------------------------------------------------------------------------------------


def test_auth_not_advertised_before_tls() -> None:
    h, _ = auth_harness(tls=False, greet=None)
    out = h.feed(EHLO)
    assert b"AUTH" not in out and b"250 STARTTLS" in out
    h.feed(b"STARTTLS\r\n")
    h.conn.tls_started()
    out = h.feed(EHLO)
    assert out.endswith(b"250 AUTH SCRAM-SHA-256 PLAIN LOGIN\r\n") and b"STARTTLS" not in out


def test_auth_advertised_with_implicit_tls_or_plaintext_ok() -> None:
    for kwargs in ({"tls": True}, {"tls": False, "plaintext_ok": True}):
        h, _ = auth_harness(greet=None, mechanisms=("PLAIN",), **kwargs)
        assert b"AUTH PLAIN\r\n" in h.feed(EHLO)


def test_no_mechanisms_no_auth() -> None:
    h, _ = auth_harness(mechanisms=(), greet=None)
    assert b"AUTH" not in h.feed(EHLO)
    assert codes(h.feed(PLAIN_OK)) == ["502 5.5.1"]


def test_helo_reply_has_no_extensions() -> None:
    h, _ = auth_harness(greet=None)
    assert h.feed(b"HELO client.test\r\n") == b"250 mx.example.test hello\r\n"


def test_settings_validate_mechanisms() -> None:
    with pytest.raises(ValueError):
        ServerSettings("mx.test", auth_mechanisms=("CRAM-MD5",))
    with pytest.raises(ValueError):
        ServerSettings("mx.test", auth_mechanisms=("plain",))
    with pytest.raises(ValueError):
        ServerSettings("mx.test", auth_mechanisms=("PLAIN", "PLAIN"))
    with pytest.raises(ValueError):
        Limits(max_auth_line=10)


# -- refusals the core answers itself ---------------------------------------------------------------------


def test_plaintext_auth_is_538() -> None:
    h, _ = auth_harness(tls=False)
    out = h.feed(PLAIN_OK)
    assert out == b"538 5.7.11 Encryption required for requested authentication mechanism\r\n"
    assert not h.of_type(AuthStart) and not h.conn.authenticated


@pytest.mark.parametrize(
    ("line", "expected"),
    [(b"AUTH CRAM-MD5\r\n", "504 5.5.4"), (b"AUTH\r\n", "501 5.5.4"), (b"AUTH PLAIN a b\r\n", "501 5.5.4"),
     (b"AUTH PL@IN\r\n", "501 5.5.4"), (b"AUTH ABCDEFGHIJKLMNOPQRSTU\r\n", "501 5.5.4"),
     (b"AUTH PLAIN AGEAYg\r\n", "501 5.5.2"), (b"AUTH PLAIN !!!!\r\n", "501 5.5.2"),
     (b"AUTH PLAIN AGEAYg==AA==\r\n", "501 5.5.2")],
)
def test_auth_command_errors(line: bytes, expected: str) -> None:
    h, _ = auth_harness()
    assert codes(h.feed(line)) == [expected]
    assert not h.of_type(AuthStart) and h.conn.state is State.READY


def test_auth_before_ehlo_and_after_helo_is_503() -> None:
    h, _ = auth_harness(greet=None)
    assert replies(h.feed(PLAIN_OK)) == ["503 5.5.1 Send EHLO first"]
    h.feed(b"HELO client.test\r\n")
    assert replies(h.feed(PLAIN_OK)) == ["503 5.5.1 Send EHLO first"]
    h.feed(EHLO)
    assert codes(h.feed(PLAIN_OK)) == ["235 2.7.0"]


@pytest.mark.parametrize("setup", [MAIL, MAIL + RCPT, MAIL + RCPT + b"BDAT 1\r\nx"])
def test_auth_in_transaction_is_503(setup: bytes) -> None:
    h, _ = auth_harness()
    h.feed(setup)
    state = h.conn.state
    assert replies(h.feed(PLAIN_OK)) == ["503 5.5.1 AUTH not permitted during a mail transaction"]
    assert h.conn.state is state and not h.conn.authenticated


def test_auth_sequence_table() -> None:
    assert sequence_error(State.READY, AuthStart) is None
    assert sequence_error(State.NEED_HELO, AuthStart) is AuthReply.NEED_EHLO
    assert sequence_error(State.AUTH_RESPONSE, AuthStart) is R.BAD_SEQUENCE
    assert sequence_error(State.IN_DATA, AuthStart) is R.BAD_SEQUENCE
    assert all(reply is None or reply.code == 503 for reply in AUTH_SEQUENCE.values())


def test_rejecting_refuses_auth() -> None:
    h = Harness(ServerSettings("mx.test", tls_active=True, auth_mechanisms=ALL), greet=False)
    h.conn.send_greeting(Reply(554, "5.3.2", "No"))
    h.conn.data_to_send()
    assert codes(h.feed(PLAIN_OK)) == ["503 5.5.1"]


# -- exchanges ---------------------------------------------------------------------------------------------


def test_plain_with_initial_response() -> None:
    h, _ = auth_harness()
    assert replies(h.feed(PLAIN_OK)) == ["235 2.7.0 Authentication successful"]
    assert h.of_type(AuthStart) == [AuthStart("PLAIN", b"\0user\0secret")]
    assert "secret" not in repr(h.of_type(AuthStart)[0])
    assert h.conn.authenticated and h.conn.state is State.READY
    assert codes(h.feed(MAIL + RCPT)) == ["250 2.1.0", "250 2.1.5"]


def test_plain_lowercase_mechanism_and_empty_initial_response() -> None:
    h, _ = auth_harness()
    assert codes(h.feed(b"auth plain =\r\n")) == ["535 5.7.8"]
    assert h.of_type(AuthStart) == [AuthStart("PLAIN", b"")]


def test_plain_two_steps() -> None:
    h, _ = auth_harness()
    assert h.feed(b"AUTH PLAIN\r\n") == b"334 \r\n"
    assert h.conn.state is State.AUTH_RESPONSE
    assert codes(h.feed(b64(b"\0user\0secret") + b"\r\n")) == ["235 2.7.0"]
    assert h.of_type(AuthResponse) == [AuthResponse(b"\0user\0secret")]
    assert h.conn.authenticated


def test_login_exchange_pipelined() -> None:
    h, _ = auth_harness()
    out = h.feed(b"AUTH LOGIN\r\n" + b64(b"user") + b"\r\n" + b64(b"secret") + b"\r\n" + MAIL)
    assert replies(out) == ["334 VXNlcm5hbWU6", "334 UGFzc3dvcmQ6", "235 2.7.0 Authentication successful",
                            "250 2.1.0 Sender OK"]
    assert [e.data for e in h.of_type(AuthResponse)] == [b"user", b"secret"]


def test_login_with_initial_response_split_bytewise() -> None:
    h, _ = auth_harness()
    out = h.feed_bytewise(b"AUTH LOGIN " + b64(b"user") + b"\r\n" + b64(b"secret") + b"\r\nNOOP\r\n")
    assert codes(out) == ["334", "235 2.7.0", "250 2.0.0"]


def test_scram_sha_256_through_the_core() -> None:
    h, session = auth_harness()
    client = ScramClient("j\u00f6rg", "p\u00e4ss")
    out = h.feed(b"AUTH SCRAM-SHA-256 " + b64(client.first()) + b"\r\n")
    assert out.startswith(b"334 ")
    server_first = base64.b64decode(out[4:-2])
    out = h.feed(b64(client.final(server_first)) + b"\r\n")
    assert out.startswith(b"334 ") and client.check(base64.b64decode(out[4:-2]))
    assert codes(h.feed(b"\r\n")) == ["235 2.7.0"]  # empty response to the server-final message
    assert h.conn.authenticated and session.mech is None


def test_failed_auth_is_535_and_may_be_retried() -> None:
    h, _ = auth_harness()
    assert replies(h.feed(PLAIN_BAD)) == ["535 5.7.8 Authentication credentials invalid"]
    assert not h.conn.authenticated and h.conn.state is State.READY
    assert codes(h.feed(PLAIN_OK)) == ["235 2.7.0"]


def test_second_auth_is_503_and_rset_keeps_authentication() -> None:
    h, _ = auth_harness()
    h.feed(PLAIN_OK)
    assert codes(h.feed(b"RSET\r\n")) == ["250 2.0.0"]
    assert h.conn.authenticated
    assert replies(h.feed(PLAIN_OK)) == ["503 5.5.1 Already authenticated"]
    h.feed(EHLO)
    assert h.conn.authenticated
    assert len(h.of_type(AuthStart)) == 1


def test_starttls_resets_authentication() -> None:
    h, _ = auth_harness(tls=False, plaintext_ok=True)
    assert codes(h.feed(PLAIN_OK)) == ["235 2.7.0"]
    assert h.conn.authenticated
    h.feed(b"STARTTLS\r\n")
    h.conn.tls_started()
    assert not h.conn.authenticated
    assert codes(h.feed(PLAIN_OK)) == ["503 5.5.1"]  # EHLO first, again
    h.feed(EHLO)
    assert codes(h.feed(PLAIN_OK)) == ["235 2.7.0"]


# -- the exchange's framing ----------------------------------------------------------------------------


def test_star_cancels() -> None:
    h, session = auth_harness()
    h.feed(b"AUTH LOGIN\r\n")
    assert replies(h.feed(b"*\r\nNOOP\r\n")) == ["501 5.7.0 Authentication cancelled", "250 2.0.0 OK"]
    assert session.aborted == ["cancelled"] and session.mech is None
    assert h.conn.state is State.READY and not h.conn.authenticated
    assert not h.of_type(AuthResponse)


def test_bad_base64_response_ends_exchange() -> None:
    h, session = auth_harness()
    h.feed(b"AUTH LOGIN\r\n")
    assert codes(h.feed(b"dXNlcg\r\nNOOP\r\n")) == ["501 5.5.2", "250 2.0.0"]
    assert session.aborted == ["bad base64"] and h.conn.state is State.READY


def test_equals_response_is_empty() -> None:
    h, _ = auth_harness()
    h.feed(b"AUTH LOGIN\r\n")
    assert codes(h.feed(b"=\r\n")) == ["535 5.7.8"]
    assert h.of_type(AuthResponse) == [AuthResponse(b"")]


def test_bare_newline_in_response_ends_exchange() -> None:
    h, session = auth_harness()
    h.feed(b"AUTH LOGIN\r\n")
    assert codes(h.feed(b"dXNlcg==\nNOOP\r\n")) == ["500 5.5.2", "250 2.0.0"]
    assert session.aborted == ["bare newline"] and not h.of_type(AuthResponse)


def test_long_response_line_is_allowed() -> None:
    h, _ = auth_harness()
    h.feed(b"AUTH PLAIN\r\n")
    line = b64(b"\0user\0" + b"x" * 9000)  # 12012 octets: far over a command line
    assert codes(h.feed(line + b"\r\n")) == ["535 5.7.8"]
    assert len(h.of_type(AuthResponse)[0].data) == 9006
    # The exact limit: 12288 octets, CRLF included (the user name is then too long for LOGIN: 535).
    h.feed(b"AUTH LOGIN\r\n")
    assert codes(h.feed(b"A" * 12284 + b"\r\n")) == ["535 5.7.8"]
    assert len(h.of_type(AuthResponse)) == 2
    h.feed(b"AUTH LOGIN\r\n")
    assert codes(h.feed(b"A" * 12288 + b"\r\n")) == ["500 5.5.6"]
    assert len(h.of_type(AuthResponse)) == 2


@pytest.mark.parametrize("bytewise", [False, True])
def test_overlong_response_is_read_to_its_end_and_refused(bytewise: bool) -> None:
    h, session = auth_harness()
    h.feed(b"AUTH LOGIN\r\n")
    data = b"A" * 13000 + b"\r\nNOOP\r\n"
    out = h.feed_bytewise(data) if bytewise else h.feed(data[:5000], data[5000:])
    assert replies(out) == ["500 5.5.6 Authentication exchange line is too long", "250 2.0.0 OK"]
    assert session.aborted == ["line too long"] and h.conn.state is State.READY
    assert not h.of_type(AuthResponse)


def test_overlong_response_is_never_buffered() -> None:
    h, _ = auth_harness()
    h.feed(b"AUTH LOGIN\r\n")
    for _ in range(100):
        h.conn.receive_data(b"A" * 10_000)
        assert h.conn.next_event() is NEED_DATA
        assert len(h.conn._in) <= 12_288  # white box: the overlong line is dropped as it arrives
    assert codes(h.feed(b"\r\n")) == ["500 5.5.6"]


def test_eof_during_exchange() -> None:
    h, _ = auth_harness()
    h.feed(b"AUTH LOGIN\r\n", b"dXNl")
    h.feed(b"")
    assert h.closed == ConnectionClosed("peer closed the connection")


def test_errors_are_counted() -> None:
    h, _ = auth_harness(max_errors=4)
    out = h.feed(PLAIN_BAD, b"AUTH LOGIN\r\n*\r\n", b"AUTH CRAM-MD5\r\n", PLAIN_BAD)
    assert codes(out) == ["535 5.7.8", "334", "501 5.7.0", "504 5.5.4", "535 5.7.8", "421 4.7.0"]
    assert h.closed == ConnectionClosed("too many errors")


def test_session_421_closes() -> None:
    h, _ = auth_harness(greet=None)
    h.responses[AuthStart] = R.SHUTTING_DOWN
    h.feed(EHLO)
    assert codes(h.feed(PLAIN_OK)) == ["421 4.3.2"]
    assert h.closed is not None and h.conn.state is State.CLOSED


def test_reply_validation() -> None:
    h, _ = auth_harness()
    conn = h.conn
    conn.receive_data(PLAIN_OK)
    assert conn.next_event() == AuthStart("PLAIN", b"\0user\0secret")
    for bad in (R.OK, Reply(354, "", "go"), Reply(334, "2.7.0", "eA=="), Reply(334, "", "eA==", ("x",))):
        with pytest.raises(ValueError):
            conn.send(bad)
    with pytest.raises(RuntimeError):
        conn.next_event()  # still pending: the refused replies changed nothing
    conn.send(AuthReply.TEMPORARY_FAILURE)
    assert conn.data_to_send() == b"454 4.7.0 Temporary authentication failure\r\n"
    assert conn.state is State.READY


def test_timeout_in_exchange_is_the_command_timeout() -> None:
    h, _ = auth_harness(command_timeout=7.0)
    h.feed(b"AUTH LOGIN\r\n")
    assert h.conn.wants_timeout() == 7.0


# -- property: any input, split anywhere, with AUTH in the mix ------------------------------------------

PIECES = st.sampled_from(
    [EHLO, b"HELO a.test\r\n", MAIL, RCPT, b"DATA\r\n", b"RSET\r\n", b"NOOP\r\n", b".\r\n", b"\r\n", b"*\r\n",
     b"=\r\n", PLAIN_OK, PLAIN_BAD, b"AUTH PLAIN\r\n", b"AUTH LOGIN\r\n", b"AUTH LOGIN dXNlcg==\r\n",
     b"AUTH SCRAM-SHA-256\r\n", b"AUTH X\r\n", b"dXNlcg==\r\n", b"c2VjcmV0\r\n", b64(b"\0user\0secret") + b"\r\n",
     b"AAAA\n", b"\n", b"\r", b"x" * 300, b"!!!\r\n", b"BDAT 2 LAST\r\n"]
)
STREAM = st.lists(PIECES | st.binary(max_size=12), max_size=30).map(b"".join)


def run(pieces: list[bytes]) -> tuple[bytes, list[object], bool]:
    h, _ = auth_harness(greet=None, max_command_line=64, max_auth_line=200, max_errors=8)
    out = h.feed(*[p for p in pieces if p])
    if h.closed is None:
        out += h.feed(b"")
    return out, list(h.events), h.conn.authenticated


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(stream=STREAM, cuts=st.lists(st.integers(0, 3000), max_size=8))
def test_split_invariance_with_auth(stream: bytes, cuts: list[int]) -> None:
    whole = run([stream])
    points = sorted({c % (len(stream) + 1) for c in cuts})
    pieces = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    assert run(pieces) == whole
    replies(whole[0])
