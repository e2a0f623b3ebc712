"""The command order table (RFC 5321 4.1.4, 3030, 3207), checked directly and through the server."""

from __future__ import annotations

import pytest

from mailhop.reply import R, Reply
from mailhop.smtp import Bdat, Data, Ehlo, Help, Mail, Noop, Quit, Rcpt, Rset, StartTls, State, Vrfy
from mailhop.smtp.state import COMMAND_STATES, SEQUENCE, sequence_error

from .helpers import EHLO, MAIL, RCPT, Harness, codes

COMMANDS = [Ehlo, Mail, Rcpt, Data, Bdat, Rset, Noop, Help, Vrfy, Quit, StartTls]
ANY_TIME = {Rset, Noop, Help, Vrfy, Quit, Ehlo}

EXPECTED: dict[State, dict[type, Reply]] = {
    State.NEED_HELO: {Mail: R.NEED_HELO, Rcpt: R.NEED_HELO, Data: R.NEED_HELO, Bdat: R.NEED_HELO, StartTls: R.NEED_HELO},
    State.READY: {Rcpt: R.NEED_MAIL, Data: R.NEED_MAIL, Bdat: R.NEED_MAIL},
    State.HAVE_MAIL: {Mail: R.NESTED_MAIL, Data: R.NEED_RCPT, Bdat: R.NEED_RCPT, StartTls: R.BAD_SEQUENCE},
    State.HAVE_RCPT: {Mail: R.NESTED_MAIL, StartTls: R.BAD_SEQUENCE},
    State.BDAT_ACTIVE: {Mail: R.NESTED_MAIL, Rcpt: R.BAD_SEQUENCE, Data: R.BAD_SEQUENCE, StartTls: R.BAD_SEQUENCE},
    State.BDAT_FAILED: {Mail: R.NESTED_MAIL, Rcpt: R.BAD_SEQUENCE, Data: R.BAD_SEQUENCE, Bdat: R.BAD_SEQUENCE,
                        StartTls: R.BAD_SEQUENCE},
}


@pytest.mark.parametrize("state", list(EXPECTED))
@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.__name__)
def test_sequence_table(state: State, command: type) -> None:
    assert sequence_error(state, command) is EXPECTED[state].get(command)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.__name__)
def test_rejecting_allows_only_quit(command: type) -> None:
    assert sequence_error(State.REJECTING, command) is (None if command is Quit else R.BAD_SEQUENCE)


def test_every_command_state_has_a_complete_row() -> None:
    assert set(SEQUENCE) == COMMAND_STATES
    for state in COMMAND_STATES - {State.REJECTING}:
        assert set(SEQUENCE[state]) == set(COMMANDS), state
        for command in ANY_TIME:
            assert SEQUENCE[state][command] is None
        for reply in SEQUENCE[state].values():
            assert reply is None or reply.code == 503


@pytest.mark.parametrize("state", [State.IN_DATA, State.CLOSED, State.GREETING, State.TLS_PENDING])
def test_non_command_states_refuse_everything(state: State) -> None:
    assert sequence_error(state, Noop) is R.BAD_SEQUENCE


# Through the server: reach each state, send each command, compare the core's reply.
SETUP = {
    State.NEED_HELO: b"",
    State.READY: EHLO,
    State.HAVE_MAIL: EHLO + MAIL,
    State.HAVE_RCPT: EHLO + MAIL + RCPT,
    State.BDAT_ACTIVE: EHLO + MAIL + RCPT + b"BDAT 1\r\nx",
}
LINES = {
    Mail: MAIL, Rcpt: RCPT, Data: b"DATA\r\n", Bdat: b"BDAT 1 LAST\r\nz", StartTls: b"STARTTLS\r\n",
    Noop: b"NOOP\r\n", Help: b"HELP\r\n", Vrfy: b"VRFY x\r\n",
}


@pytest.mark.parametrize("state", list(SETUP), ids=lambda s: s.value)
@pytest.mark.parametrize("command", list(LINES), ids=lambda c: c.__name__)
def test_sequence_through_server(state: State, command: type) -> None:
    h = Harness()
    if SETUP[state]:  # feeding b"" would mean EOF
        h.feed(SETUP[state])
    assert h.conn.state is state
    out = h.feed(LINES[command])
    expected = EXPECTED[state].get(command)
    if expected is not None:
        assert out == expected.to_bytes()
        assert h.conn.state is state
    else:
        assert not codes(out) or codes(out)[0][0] in "23"
