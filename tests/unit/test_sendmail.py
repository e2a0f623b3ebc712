"""``mailhop sendmail``: option parsing, input reading, header handling, and submission to a real SMTP receiver."""

from __future__ import annotations

import io
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailhop.cli import sendmail as sm
from mailhop.cli.sendmail import DataError, Options, UsageError, parse_options, prepare, read_input, run
from tests.support.receiver import DISCONNECT, Receiver

HOST = "h.example.test"

# --- option parsing -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["a@x.test"], {"recipients": ["a@x.test"]}),
        (["-t"], {"extract": True, "recipients": []}),
        (["-i", "a@x.test"], {"ignore_dots": True}),
        (["-oi", "a@x.test"], {"ignore_dots": True}),
        (["-o", "i", "a@x.test"], {"ignore_dots": True}),
        (["-ti"], {"extract": True, "ignore_dots": True}),
        (["-tioi"], {"extract": True, "ignore_dots": True}),
        (["-O", "IgnoreDots=True", "a@x.test"], {"ignore_dots": True}),
        (["-f", "s@x.test", "a@x.test"], {"sender": "s@x.test"}),
        (["-fs@x.test", "a@x.test"], {"sender": "s@x.test"}),
        (["-f<s@x.test>", "a@x.test"], {"sender": "s@x.test"}),
        (["-r", "s@x.test", "a@x.test"], {"sender": "s@x.test"}),
        (["-f", "", "a@x.test"], {"sender": ""}),
        (["-f", "<>", "a@x.test"], {"sender": ""}),
        (["-F", "Ann Example", "a@x.test"], {"full_name": "Ann Example"}),
        (["-FAnn", "a@x.test"], {"full_name": "Ann"}),
        (["-C", "/etc/x.toml", "a@x.test"], {"config": Path("/etc/x.toml")}),
        (["-C/etc/x.toml", "a@x.test"], {"config": Path("/etc/x.toml")}),
        (["-N", "success,delay", "a@x.test"], {"notify": ("SUCCESS", "DELAY")}),
        (["-Nnever", "a@x.test"], {"notify": ("NEVER",)}),
        (["-R", "hdrs", "-V", "env-1", "a@x.test"], {"ret": "HDRS", "envid": "env-1"}),
        # Accepted and ignored.
        (["-bm", "-odi", "-odb", "-oem", "-oee", "-om", "a@x.test"], {"ignore_dots": False, "recipients": ["a@x.test"]}),
        (["-v", "-m", "-n", "-U", "-G", "-c", "-x", "-4", "-6", "a@x.test"], {"recipients": ["a@x.test"]}),
        (["-h", "10", "-L", "tag", "-B", "8BITMIME", "-X", "/tmp/log", "-p", "smtp", "-e", "m", "-A", "m",
          "-OQueueDirectory=/x", "a@x.test"], {"recipients": ["a@x.test"]}),
        # "--" ends the options; so does the first recipient (POSIX getopt, as Postfix).
        (["-t", "--", "-dash@x.test"], {"extract": True, "recipients": ["-dash@x.test"]}),
        (["a@x.test", "-oi"], {"ignore_dots": False, "recipients": ["a@x.test", "-oi"]}),
        (["-i", "a@x.test", "b@x.test"], {"recipients": ["a@x.test", "b@x.test"]}),
    ],
)
def test_options(argv: list[str], expected: dict[str, Any]) -> None:
    opts = parse_options(argv)
    for name, value in expected.items():
        assert getattr(opts, name) == value, name


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-bs"], "-bs (SMTP on standard input) is not supported"),
        (["-bp"], "mailhop queue list"),
        (["-bd"], "mailhop serve"),
        (["-bi"], "no aliases"),
        (["-I"], "no aliases"),
        (["-bv", "a@x.test"], "-bv is not supported"),
        (["-q"], "mailhop queue flush"),
        (["-q30m"], "mailhop queue flush"),
        (["-z", "a@x.test"], "option -z not recognized"),
        (["--verbose", "a@x.test"], "option --verbose not recognized"),
        (["-f"], "option -f requires argument"),
        (["-N", "never,success", "a@x.test"], "-N"),
        (["-N", "sometimes", "a@x.test"], "-N"),
        (["-R", "body", "a@x.test"], "-R"),
        (["-V", "has space", "a@x.test"], "-V"),
        (["-C", "", "a@x.test"], "-C"),
    ],
)
def test_bad_options(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UsageError, match=re.escape(message)):
        parse_options(argv)
    assert run(argv, io.BytesIO(b""), config_path=Path("/nonexistent.toml")) == 64
    err = capsys.readouterr().err
    assert err.startswith("sendmail: ") and message in err and "usage: sendmail" in err


# --- reading the input ----------------------------------------------------------------------------------


def _read(data: bytes, *, ignore_dots: bool = False, max_size: int = 10**6, max_line: int = 1000) -> list[bytes]:
    return read_input(io.BytesIO(data), ignore_dots=ignore_dots, max_size=max_size, max_line=max_line)


@pytest.mark.parametrize(
    ("data", "ignore_dots", "lines"),
    [
        (b"a\n.\nb\n", False, [b"a"]),
        (b"a\n.\nb\n", True, [b"a", b".", b"b"]),
        (b"a\r\n.\r\nb\r\n", False, [b"a"]),
        (b"a\n.", False, [b"a"]),  # the dot line at EOF without a newline
        (b"a\n.", True, [b"a", b"."]),
        (b"a\n..\n. \n .\nb\n", False, [b"a", b"..", b". ", b" .", b"b"]),  # no other line ends it or changes
        (b"a\r\nb\nc\rd", True, [b"a", b"b", b"c", b"d"]),  # CRLF, LF and lone CR all end a line
        (b"", False, []),
        (b".\n", False, []),
    ],
)
def test_dot_handling_and_line_ends(data: bytes, ignore_dots: bool, lines: list[bytes]) -> None:
    assert _read(data, ignore_dots=ignore_dots) == lines


def test_reading_stops_at_the_dot() -> None:
    stdin = io.BytesIO(b"a\n.\nrest\n")
    read_input(stdin, ignore_dots=False, max_size=1000, max_line=1000)
    assert stdin.read() == b"rest\n"


def test_line_length_limit_counts_crlf() -> None:
    assert _read(b"x" * 998 + b"\n") == [b"x" * 998]
    assert _read(b"x" * 998) == [b"x" * 998]
    for data in (b"x" * 999 + b"\n", b"x" * 999 + b"\r\n", b"x" * 5000 + b"\n", b"x" * 999):
        with pytest.raises(DataError, match="longer than 998"):
            _read(data)


def test_size_limit_counts_crlf() -> None:
    assert len(_read(b"x\n" * 333, max_size=999)) == 333  # 333 * 3 octets with CRLF
    with pytest.raises(DataError, match="larger than the relay accepts"):
        _read(b"x\n" * 334, max_size=999)


# --- headers --------------------------------------------------------------------------------------------


def _prep(text: bytes, *, extract: bool = True, sender: str = "s@x.test", full_name: str | None = None) -> sm.Prepared:
    return prepare(_read(text, ignore_dots=True), extract=extract, sender=sender, full_name=full_name, hostname=HOST)


def _headers(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[0] + b"\r\n"


FOLDED = (
    b"From: Sender <s@x.test>\n"
    b"To: \"Doe, Jane\" <jane@x.test>,\n"
    b"   bob@x.test (Bob)\n"
    b"Subject: folded\n"
    b" subject\n"
    b"CC: team: c1@x.test,\n"
    b"\tc2@x.test;\n"
    b"Bcc: hidden1@x.test,\n"
    b"  Hidden Two <hidden2@x.test>\n"
    b"\t, hidden3@x.test\n"
    b"bcc: hidden4@x.test\n"
    b"Date: Mon, 1 Jan 2024 00:00:00 +0000\n"
    b"Message-ID: <m1@x.test>\n"
    b"\n"
    b"Bcc: this is body text, kept\n"
)


def test_t_extracts_folded_to_cc_bcc_and_removes_every_bcc_line() -> None:
    prepared = _prep(FOLDED)
    assert prepared.header_recipients == [
        "jane@x.test", "bob@x.test", "c1@x.test", "c2@x.test",
        "hidden1@x.test", "hidden2@x.test", "hidden3@x.test", "hidden4@x.test",
    ]
    assert prepared.data == (
        b"From: Sender <s@x.test>\r\n"
        b"To: \"Doe, Jane\" <jane@x.test>,\r\n"
        b"   bob@x.test (Bob)\r\n"
        b"Subject: folded\r\n"
        b" subject\r\n"
        b"CC: team: c1@x.test,\r\n"
        b"\tc2@x.test;\r\n"
        b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
        b"Message-ID: <m1@x.test>\r\n"
        b"\r\n"
        b"Bcc: this is body text, kept\r\n"
    )
    assert b"hidden" not in prepared.data


def test_bcc_is_removed_without_t_too_and_no_recipients_are_taken() -> None:
    prepared = _prep(FOLDED, extract=False)
    assert prepared.header_recipients == []
    assert b"hidden" not in prepared.data and b"Bcc: this is body text" in prepared.data


def test_resent_fields_take_precedence_with_t() -> None:
    prepared = _prep(b"To: old@x.test\nResent-To: new@x.test\nResent-Bcc: secret@x.test\n\nbody\n")
    assert prepared.header_recipients == ["new@x.test", "secret@x.test"]
    assert b"Resent-Bcc" not in prepared.data and b"Resent-To: new@x.test" in prepared.data


def test_group_and_empty_lists_yield_no_addresses() -> None:
    assert _prep(b"To: undisclosed-recipients:;\nCc:\n\nbody\n").header_recipients == []


def test_missing_from_date_message_id_are_added() -> None:
    data = _prep(b"Subject: hi\n\nbody\n").data
    head = _headers(data).decode()
    assert head.startswith("Subject: hi\r\nFrom: s@x.test\r\nDate: ")
    assert re.search(r"\r\nDate: \w{3}, \d{1,2} \w{3} \d{4} \d\d:\d\d:\d\d [+-]\d{4}\r\n", head)
    assert re.search(rf"\r\nMessage-ID: <[^<>@\s]+@{re.escape(HOST)}>\r\n", head)
    assert data.endswith(b"\r\n\r\nbody\r\n")


def test_present_fields_are_not_added_again_any_case() -> None:
    text = b"FROM: a@x.test\nmessage-id: <1@x.test>\nDATE: Mon, 1 Jan 2024 00:00:00 +0000\n\nb\n"
    assert _prep(text).data == text.replace(b"\n", b"\r\n")


@pytest.mark.parametrize(
    ("name", "line"),
    [
        ("Ann Example", b'From: "Ann Example" <s@x.test>'),
        ('Ann "the" \\ Ex', b'From: "Ann \\"the\\" \\\\ Ex" <s@x.test>'),
        ("Ann\nBcc: evil@x.test", b'From: "Ann Bcc: evil@x.test" <s@x.test>'),  # no header injection
        ("Jörg", b"From: =?utf-8?b?SsO2cmc=?= <s@x.test>"),
        ("  ", b"From: s@x.test"),
    ],
)
def test_full_name_sets_from_only_when_absent(name: str, line: bytes) -> None:
    assert _headers(_prep(b"Subject: x\n\nb\n", full_name=name).data).split(b"\r\n")[1] == line
    assert b"Ann" not in _prep(b"From: a@x.test\n\nb\n", full_name=name).data


def test_long_non_ascii_full_name_is_folded() -> None:
    head = _headers(_prep(b"\nb\n", full_name="Jörg Ünicode " * 10).data)
    from_lines = head.split(b"\r\n")[:-1]
    assert all(len(line) < 200 for line in from_lines) and len(from_lines) > 3
    assert all(line[:1] == b" " for line in from_lines[1:-2])


def test_null_sender_from_is_mailer_daemon() -> None:
    assert f"From: MAILER-DAEMON@{HOST}\r\n".encode() in _prep(b"\nb\n", sender="").data


def test_headerless_input_gets_a_separator() -> None:
    data = _prep(b"just a body line\nsecond\n").data
    assert re.fullmatch(rb"From: s@x.test\r\nDate: [^\r\n]+\r\nMessage-ID: <[^\r\n]+>\r\n\r\n"
                        rb"just a body line\r\nsecond\r\n", data)
    # Headers followed directly by a non-header line: the body starts there, after an inserted empty line.
    data = _prep(b"Subject: x\nnot a header\n").data
    assert data.startswith(b"Subject: x\r\nFrom: ") and data.endswith(b"\r\n\r\nnot a header\r\n")


def test_mbox_from_line_is_dropped_and_output_is_crlf() -> None:
    data = _prep(b"From s@x.test Mon Jan  1 00:00:00 2024\nSubject: x\r\n\nb\rc\n").data
    assert data.startswith(b"Subject: x\r\n") and data.endswith(b"\r\n\r\nb\r\nc\r\n")
    assert data.count(b"\n") == data.count(b"\r\n") == data.count(b"\r")


# --- submission against a real SMTP receiver ------------------------------------------------------------


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver("127.0.0.1", 0) as r:
        yield r


def write_config(tmp_path: Path, port: int, *, host: str = "127.0.0.1", extra: str = "") -> Path:
    cfg = tmp_path / "mailhop.toml"
    cfg.write_text(f'hostname = "{HOST}"\n[[listener]]\naddress = "{host}:{port}"\n{extra}')
    return cfg


def send(cfg: Path, argv: list[str], data: bytes) -> int:
    return run(argv, io.BytesIO(data), config_path=cfg)


MESSAGE = b"Subject: test\n\nline one\n.hidden dot\n"


def test_submit_pipelined_with_crlf_and_added_headers(receiver: Receiver, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOGNAME", "alice")
    cfg = write_config(tmp_path, receiver.port)
    assert send(cfg, ["-i", "a@x.test", "Bob <b@x.test>, c@x.test", "a@x.test", "local"], MESSAGE) == 0
    [tx] = receiver.wait_for(1)
    assert tx.mail_from == f"alice@{HOST}"  # $USER at the configured hostname
    assert [r for r, _ in tx.rcpts] == ["a@x.test", "b@x.test", "c@x.test", f"local@{HOST}"]
    assert tx.mail_params == [f"SIZE={len(tx.data)}"]  # 7-bit: no BODY=
    assert tx.bare_newlines == 0 and b"\r\n..hidden dot\r\n.\r\n" in tx.raw
    assert tx.data.startswith(b"Subject: test\r\nFrom: alice@" + HOST.encode() + b"\r\nDate: ")
    assert tx.data.endswith(b"\r\n\r\nline one\r\n.hidden dot\r\n")
    [session] = receiver.sessions
    assert session.batches()[1] == [f"MAIL FROM:<alice@h.example.test> SIZE={len(tx.data)}", "RCPT TO:<a@x.test>",
                                    "RCPT TO:<b@x.test>", "RCPT TO:<c@x.test>", f"RCPT TO:<local@{HOST}>", "DATA"]
    assert session.commands[-1] == "QUIT"


def test_dot_line_ends_input_without_i(receiver: Receiver, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, receiver.port)
    assert send(cfg, ["-f", "s@x.test", "a@x.test"], b"Subject: x\n\nkept\n.\nnot sent\n") == 0
    [tx] = receiver.wait_for(1)
    assert tx.data.endswith(b"\r\nkept\r\n") and b"not sent" not in tx.data


def test_t_adds_header_recipients_to_command_line_ones(receiver: Receiver, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, receiver.port)
    assert send(cfg, ["-t", "-f", "s@x.test", "extra@x.test", "jane@x.test"], FOLDED) == 0
    [tx] = receiver.wait_for(1)
    assert [r for r, _ in tx.rcpts] == [
        "extra@x.test", "jane@x.test", "bob@x.test", "c1@x.test", "c2@x.test",
        "hidden1@x.test", "hidden2@x.test", "hidden3@x.test", "hidden4@x.test",
    ]
    assert b"hidden" not in tx.data and tx.mail_from == "s@x.test"


def test_eight_bit_body_and_utf8_addresses(receiver: Receiver, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, receiver.port)
    assert send(cfg, ["-f", "s@x.test", "a@x.test"], "Subject: é\n\nbody ü\n".encode()) == 0
    assert send(cfg, ["-f", "", "jörg@bücher.test"], b"Subject: x\n\nascii\n") == 0
    one, two = receiver.wait_for(2)
    assert "BODY=8BITMIME" in one.mail_params and "SMTPUTF8" not in one.mail_params
    assert two.mail_from == "" and "SMTPUTF8" in two.mail_params and "BODY=8BITMIME" not in two.mail_params
    assert two.rcpts == [("jörg@bücher.test", [])]
    assert b"From: MAILER-DAEMON@" + HOST.encode() in two.data


def test_utf8_address_without_smtputf8_is_unavailable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with Receiver("127.0.0.1", 0, drop_capabilities=("SMTPUTF8",)) as r:
        assert send(write_config(tmp_path, r.port), ["-f", "s@x.test", "jörg@x.test"], MESSAGE) == 69
        assert r.transactions == []
    assert "SMTPUTF8" in capsys.readouterr().err


def test_dsn_options_are_passed(receiver: Receiver, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, receiver.port)
    assert send(cfg, ["-f", "s@x.test", "-N", "failure,delay", "-R", "hdrs", "-V", "env1", "a@x.test"], MESSAGE) == 0
    [tx] = receiver.wait_for(1)
    assert "RET=HDRS" in tx.mail_params and "ENVID=env1" in tx.mail_params
    assert tx.rcpts == [("a@x.test", ["NOTIFY=FAILURE,DELAY"])]


def test_some_recipients_refused_still_queues_and_warns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with Receiver("127.0.0.1", 0, on_rcpt={"bad@x.test": "550 5.1.1 No such user"}) as r:
        assert send(write_config(tmp_path, r.port), ["-f", "s@x.test", "a@x.test", "bad@x.test", "c@x.test"],
                    MESSAGE) == 0
        [tx] = r.wait_for(1)
        assert [a for a, _ in tx.rcpts] == ["a@x.test", "c@x.test"]
    err = capsys.readouterr().err
    assert "warning: message queued, but not for <bad@x.test>: 550 5.1.1 No such user" in err


def test_too_many_recipients_are_sent_in_another_transaction(tmp_path: Path) -> None:
    seen: list[str] = []

    def on_rcpt(addr: str) -> str | None:
        seen.append(addr)
        return "452 4.5.3 Too many recipients" if len(seen) > 2 and len(seen) <= 4 else None

    with Receiver("127.0.0.1", 0, on_rcpt=on_rcpt) as r:
        rcpts = [f"r{i}@x.test" for i in range(4)]
        assert send(write_config(tmp_path, r.port), ["-f", "s@x.test", *rcpts], MESSAGE) == 0
        one, two = r.wait_for(2)
    assert [a for a, _ in one.rcpts] == rcpts[:2] and [a for a, _ in two.rcpts] == rcpts[2:]
    assert one.data == two.data


def test_lost_second_transaction_still_exits_0_with_one_warning_each(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    on_rcpt = {"r1@x.test": "452 4.5.3 Too many recipients", "r2@x.test": "452 4.5.3 Too many recipients"}
    with Receiver("127.0.0.1", 0, on_rcpt=on_rcpt) as r:
        seen: list[int] = []

        def data_end(tx: Any) -> Any:
            seen.append(1)
            r.options.on_rcpt = None
            return None if len(seen) == 1 else DISCONNECT

        r.options.on_data_end = data_end
        argv = ["-f", "s@x.test", "r0@x.test", "r1@x.test", "r2@x.test"]
        assert send(write_config(tmp_path, r.port), argv, MESSAGE) == 0
        r.wait_for(2)
    err = capsys.readouterr().err.splitlines()
    assert sorted(err) == [f"sendmail: warning: message queued, but not for <r{i}@x.test>: the relay closed the "
                           "connection" for i in (1, 2)]


@pytest.mark.parametrize(
    ("options", "status", "text"),
    [
        ({"on_rcpt": lambda a: "550 5.1.1 No such user"}, 67, "no recipient accepted; message not sent"),
        ({"on_rcpt": lambda a: "550 5.7.1 Relaying denied"}, 77, "Relaying denied"),
        ({"on_rcpt": lambda a: "450 4.2.0 Busy" if a == "a@x.test" else "550 5.1.1 No"}, 75, "try again later"),
        ({"on_mail": lambda a: "553 5.1.8 Bad sender"}, 69, "refused the message: 553 5.1.8 Bad sender"),
        ({"on_mail": lambda a: "451 4.3.0 Later"}, 75, "deferred the message: 451 4.3.0 Later"),
        ({"on_mail": lambda a: "530 5.7.0 Authentication required"}, 77, "Authentication required"),
        ({"on_data_end": lambda tx: "451 4.3.0 Disk trouble"}, 75, "Disk trouble"),
        ({"on_data_end": lambda tx: "554 5.6.0 Bad content"}, 65, "Bad content"),
        ({"on_data_end": lambda tx: "552 5.3.4 Too big"}, 65, "Too big"),
        ({"on_data_end": lambda tx: "554 5.0.0 No"}, 69, "554 5.0.0 No"),
        ({"on_command": {"DATA": "554 5.5.1 No DATA for you"}}, 69, "No DATA for you"),
        ({"greeting": "554 5.3.2 Not now, not ever"}, 69, "Not now"),
        ({"greeting": "421 4.3.2 Shutting down"}, 75, "Shutting down"),
        ({"on_data_end": lambda tx: "421 4.3.2 Bye"}, 75, "closing the connection"),
        ({"disconnect_after": "."}, 75, "closed the connection"),
        ({"disconnect_after": "MAIL"}, 75, "closed the connection"),
    ],
)
def test_failure_exit_status(options: dict[str, Any], status: int, text: str, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    with Receiver("127.0.0.1", 0, **options) as r:
        assert send(write_config(tmp_path, r.port), ["-f", "s@x.test", "a@x.test", "b@x.test"], MESSAGE) == status
    err = capsys.readouterr().err
    assert text in err and err.startswith("sendmail: ")


def test_without_pipelining_one_command_at_a_time_and_no_data_without_recipients(tmp_path: Path) -> None:
    with Receiver("127.0.0.1", 0, drop_capabilities=("PIPELINING",), on_rcpt=lambda a: "550 5.1.1 No") as r:
        assert send(write_config(tmp_path, r.port), ["-f", "s@x.test", "a@x.test", "b@x.test"], MESSAGE) == 67
        [session] = r.wait_for_connections(1, closed=True)
    assert re.fullmatch(r"MAIL FROM:<s@x\.test> SIZE=\d+", session.commands[1])
    assert session.batches() == [["EHLO h.example.test"], [session.commands[1]], ["RCPT TO:<a@x.test>"],
                                 ["RCPT TO:<b@x.test>"], ["QUIT"]]


def test_helo_fallback(tmp_path: Path) -> None:
    with Receiver("127.0.0.1", 0, ehlo_supported=False) as r:
        assert send(write_config(tmp_path, r.port), ["-f", "s@x.test", "a@x.test"], "é\n".encode()) == 0
        [tx] = r.wait_for(1)
    assert tx.helo == HOST and not tx.ehlo and tx.mail_params == []


def test_slow_relay_times_out_with_tempfail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sm, "REPLY_TIMEOUT", 0.3)
    with Receiver("127.0.0.1", 0, reply_delay=2.0, slow_on=(".",)) as r:
        assert send(write_config(tmp_path, r.port), ["-f", "s@x.test", "a@x.test"], MESSAGE) == 75


def test_relay_not_running_is_tempfail(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connection refused
        assert send(write_config(tmp_path, port), ["-f", "s@x.test", "a@x.test"], MESSAGE) == 75
    assert "cannot reach the relay at 127.0.0.1:" in capsys.readouterr().err


def test_wildcard_listener_is_reached_on_loopback(receiver: Receiver, tmp_path: Path) -> None:
    assert send(write_config(tmp_path, receiver.port, host="0.0.0.0"), ["-f", "s@x.test", "a@x.test"], MESSAGE) == 0
    receiver.wait_for(1)


def test_config_sources_and_errors(receiver: Receiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    good = write_config(tmp_path, receiver.port)
    bad = tmp_path / "bad.toml"
    bad.write_text('hostname = "h.example.test"\n[limits]\nmax_mesage_size = 1\n')
    argv = ["-f", "s@x.test", "a@x.test"]
    assert run(argv, io.BytesIO(MESSAGE), config_path=bad) == 78
    assert "limits.max_mesage_size: unknown key" in capsys.readouterr().err
    assert run(argv, io.BytesIO(MESSAGE), config_path=tmp_path / "missing.toml") == 78
    assert "file not found" in capsys.readouterr().err
    assert run(["-C", str(good), *argv], io.BytesIO(MESSAGE), config_path=bad) == 0  # -C wins
    monkeypatch.setenv("MAILHOP_CONFIG", str(good))
    assert run(argv, io.BytesIO(MESSAGE), config_path=None) == 0
    monkeypatch.setenv("MAILHOP_CONFIG", str(bad))
    assert run(argv, io.BytesIO(MESSAGE), config_path=None) == 78
    assert len(receiver.wait_for(2)) == 2


def test_no_recipients_is_usage(receiver: Receiver, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path, receiver.port)
    assert send(cfg, ["-f", "s@x.test"], MESSAGE) == 64
    assert send(cfg, ["-t", "-f", "s@x.test"], b"Subject: none\nTo: undisclosed-recipients:;\n\nb\n") == 64
    assert "no recipients" in capsys.readouterr().err
    assert receiver.connections == 0


def test_bad_addresses(receiver: Receiver, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path, receiver.port)
    assert send(cfg, ["-f", "s@@x", "a@x.test"], MESSAGE) == 64
    assert "sender <s@@x>: not a valid address" in capsys.readouterr().err
    assert send(cfg, ["-f", "s@x.test", "a@x..test"], MESSAGE) == 67  # the only recipient is invalid
    assert receiver.connections == 0
    assert send(cfg, ["-f", "s@x.test", "a@x..test", "b@x.test"], MESSAGE) == 0
    [tx] = receiver.wait_for(1)
    assert tx.rcpts == [("b@x.test", [])]
    assert "warning: message queued, but not for <a@x..test>: 553 5.1.3 not a valid address" in capsys.readouterr().err


def test_oversized_message_is_dataerr_before_connecting(receiver: Receiver, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path, receiver.port, extra="[limits]\nmax_message_size = 1024\n")
    assert send(cfg, ["-f", "s@x.test", "a@x.test"], b"x" * 100 + b"\n" * 1000) == 65
    assert send(cfg, ["-f", "s@x.test", "a@x.test"], b"Subject: s\n\n" + b"y" * 1000 + b"\n") == 65  # with headers
    assert send(cfg, ["-f", "s@x.test", "a@x.test"], b"z" * 1200 + b"\n") == 65  # line too long
    err = capsys.readouterr().err
    assert "larger than the relay accepts (1024 bytes" in err and "longer than 998" in err
    assert receiver.connections == 0


def test_options_dataclass_defaults() -> None:
    assert parse_options([]) == Options()
