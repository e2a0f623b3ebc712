"""The command-line parser: every verb, every parameter, and that no input makes it raise."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailhop.envelope import MailParams, RcptParams
from mailhop.reply import R, Reply
from mailhop.smtp import (
    Bdat,
    CommandParser,
    Data,
    Ehlo,
    Forbidden,
    Help,
    Limits,
    Mail,
    Noop,
    Quit,
    Rcpt,
    Rset,
    StartTls,
    Vrfy,
    decode_xtext,
)

P = CommandParser(Limits(max_message_size=1000))


def mail(line: bytes) -> Mail:
    result = P.parse(line)
    assert isinstance(result, Mail), result
    return result


def rcpt(line: bytes, smtputf8_tx: bool = False) -> Rcpt:
    result = P.parse(line, smtputf8_tx)
    assert isinstance(result, Rcpt), result
    return result


# -- verbs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("line", [b"EHLO client.test", b"ehlo client.test", b"EhLo client.test", b"EHLO  client.test  "])
def test_ehlo_case_insensitive_and_lenient_spacing(line: bytes) -> None:
    assert P.parse(line) == Ehlo("client.test", True)


def test_helo_is_not_extended() -> None:
    assert P.parse(b"HELO client.test") == Ehlo("client.test", False)


@pytest.mark.parametrize("arg", [b"[192.0.2.1]", b"192.0.2.1", b"localhost", b"under_score.example", b"two words"])
def test_ehlo_argument_is_lenient(arg: bytes) -> None:
    assert P.parse(b"EHLO " + arg) == Ehlo(arg.decode(), True)


@pytest.mark.parametrize("line", [b"EHLO", b"EHLO ", b"HELO", b"EHLO a\x00b", b"EHLO a\x1bb", b"EHLO \xff\xfe"])
def test_ehlo_needs_a_printable_argument(line: bytes) -> None:
    assert P.parse(line) is R.BAD_ARGS


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"DATA", Data()),
        (b"data", Data()),
        (b"DATA   ", Data()),
        (b"RSET", Rset()),
        (b"NOOP", Noop()),
        (b"NOOP anything at all", Noop()),
        (b"QUIT", Quit()),
        (b"HELP", Help()),
        (b"HELP MAIL", Help()),
        (b"VRFY postmaster", Vrfy()),
        (b"STARTTLS", StartTls()),
        (b"starttls", StartTls()),
    ],
)
def test_simple_verbs(line: bytes, expected: object) -> None:
    assert P.parse(line) == expected


@pytest.mark.parametrize("line", [b"DATA x", b"RSET x", b"QUIT now", b"STARTTLS x", b"VRFY", b"VRFY  "])
def test_argument_rules_of_simple_verbs(line: bytes) -> None:
    assert P.parse(line) is R.BAD_ARGS


@pytest.mark.parametrize("verb", [b"AUTH PLAIN", b"AUTH", b"TURN", b"ETRN example.test", b"EXPN list", b"SEND", b"SOML", b"SAML"])
def test_known_but_unimplemented_verbs_are_502(verb: bytes) -> None:
    assert P.parse(verb) is R.NOT_IMPLEMENTED


@pytest.mark.parametrize("line", [b"GET / HTTP/1.1", b"POST /x HTTP/1.0", b"CONNECT a:25 HTTP/1.1", b"PUT /", b"HEAD /", b"USER bob", b"get /"])
def test_forbidden_verbs(line: bytes) -> None:
    result = P.parse(line)
    assert isinstance(result, Forbidden)
    assert result.verb == line.split()[0].upper().decode()


@pytest.mark.parametrize("line", [b"", b"   ", b"XYZZY", b"MAILFROM:<a@b.test>", b"\x00\x01", b"\xff", b" MAIL FROM:<a@b.test>"])
def test_unknown_verbs_are_500(line: bytes) -> None:
    assert P.parse(line) is R.SYNTAX


# -- BDAT ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "size", "last"),
    [(b"BDAT 100", 100, False), (b"BDAT 0 LAST", 0, True), (b"bdat 7 last", 7, True), (b"BDAT 00012", 12, False),
     (b"BDAT " + b"9" * 20, 10**20 - 1, False)],
)
def test_bdat(line: bytes, size: int, last: bool) -> None:
    assert P.parse(line) == Bdat(size, last)


@pytest.mark.parametrize(
    "line", [b"BDAT", b"BDAT x", b"BDAT -1", b"BDAT 1 2", b"BDAT 1 LAST x", b"BDAT 1.5", b"BDAT " + b"1" * 21, b"BDAT +5"]
)
def test_bdat_syntax_errors(line: bytes) -> None:
    assert P.parse(line) is R.BAD_BDAT_CHUNK


# -- MAIL FROM -------------------------------------------------------------------------------------


def test_mail_basic() -> None:
    m = mail(b"MAIL FROM:<Sender@Example.TEST>")
    assert m.sender is not None
    assert (m.sender.local, m.sender.domain) == ("Sender", "example.test")
    assert m.params == MailParams()


@pytest.mark.parametrize("line", [b"mail from:<a@b.test>", b"MAIL FROM: <a@b.test>", b"Mail From:<a@b.test>  "])
def test_mail_tolerates_case_and_space_after_colon(line: bytes) -> None:
    assert mail(line).sender is not None


def test_mail_null_sender() -> None:
    assert mail(b"MAIL FROM:<>").sender is None


def test_mail_quoted_local_part_with_space_and_bracket() -> None:
    m = mail(b'MAIL FROM:<"a> b"@example.test> SIZE=10')
    assert m.sender is not None and m.sender.local == '"a> b"'
    assert m.params.size == 10


@pytest.mark.parametrize(
    "line",
    [b"MAIL FROM:a@b.test", b"MAIL FROM:<a@b.test", b"MAIL FROM:<a@@b.test>", b"MAIL FROM:<a b@c.test>",
     b"MAIL FROM:<a@b.test>SIZE=1", b"MAIL FROM:<@>", b"MAIL FROM:<a@-b.test>"],
)
def test_mail_bad_path_is_501_517(line: bytes) -> None:
    assert P.parse(line) is R.BAD_SENDER_SYNTAX


@pytest.mark.parametrize("line", [b"MAIL", b"MAIL TO:<a@b.test>", b"MAIL FROM", b"MAIL <a@b.test>"])
def test_mail_without_from_is_501_554(line: bytes) -> None:
    assert P.parse(line) is R.BAD_ARGS


def test_mail_all_params() -> None:
    m = mail(b"MAIL FROM:<a@b.test> SIZE=999 BODY=8bitmime SMTPUTF8 RET=hdrs ENVID=id+2B1 REQUIRETLS")
    assert m.params == MailParams(size=999, body="8BITMIME", smtputf8=True, ret="HDRS", envid="id+1", requiretls=True)


def test_mail_params_keywords_case_insensitive() -> None:
    assert mail(b"MAIL FROM:<a@b.test> size=5 body=7bit").params == MailParams(size=5, body="7BIT")


def test_mail_size_over_limit_is_552() -> None:
    assert P.parse(b"MAIL FROM:<a@b.test> SIZE=1001") is R.MESSAGE_TOO_BIG
    assert mail(b"MAIL FROM:<a@b.test> SIZE=1000").params.size == 1000


@pytest.mark.parametrize(
    "params",
    [b"SIZE", b"SIZE=", b"SIZE=x", b"SIZE=-1", b"SIZE=" + b"1" * 21, b"BODY=BINARYMIME", b"BODY", b"SMTPUTF8=yes",
     b"RET=NEVER", b"RET", b"ENVID=a+zz", b"ENVID=a+0d", b"ENVID=+0D+0A", b"ENVID=" + b"x" * 101, b"ENVID",
     b"REQUIRETLS=1", b"=x", b"SI_ZE=1", b"-SIZE=1", b"SIZE==1"],
)
def test_mail_malformed_param_values_are_501(params: bytes) -> None:
    assert P.parse(b"MAIL FROM:<a@b.test> " + params) is R.BAD_ARGS


@pytest.mark.parametrize("params", [b"SIZE=1 SIZE=2", b"FOO=bar", b"XFORWARD", b"BODY=7BIT body=8BITMIME", b"AUTH=<>"])
def test_mail_unknown_or_repeated_params_are_555(params: bytes) -> None:
    assert P.parse(b"MAIL FROM:<a@b.test> " + params) is R.PARAM_NOT_IMPLEMENTED


def test_envid_limit_is_100() -> None:
    assert mail(b"MAIL FROM:<a@b.test> ENVID=" + b"x" * 100).params.envid == "x" * 100


def test_dsn_and_smtputf8_params_refused_when_not_offered() -> None:
    p = CommandParser(Limits(), dsn=False, smtputf8=False)
    for params in (b"RET=FULL", b"ENVID=x", b"SMTPUTF8"):
        assert p.parse(b"MAIL FROM:<a@b.test> " + params) is R.PARAM_NOT_IMPLEMENTED
    assert p.parse(b"RCPT TO:<a@b.test> NOTIFY=NEVER") is R.PARAM_NOT_IMPLEMENTED


def test_non_ascii_sender_needs_smtputf8() -> None:
    line = "MAIL FROM:<jös@exämple.test>".encode()
    assert P.parse(line) is R.SMTPUTF8_REQUIRED
    m = mail(line + b" SMTPUTF8")
    assert m.sender is not None and m.sender.utf8 and m.params.smtputf8


def test_invalid_utf8_sender_with_smtputf8_is_501() -> None:
    assert P.parse(b"MAIL FROM:<j\xff@b.test> SMTPUTF8") is R.BAD_SENDER_SYNTAX


# -- RCPT TO ---------------------------------------------------------------------------------------


def test_rcpt_basic() -> None:
    r = rcpt(b"RCPT TO:<Rcpt@Example.NET>")
    assert r.recipient.address == "Rcpt@example.net"
    assert r.recipient.params == RcptParams()


def test_rcpt_postmaster_and_space_after_colon() -> None:
    assert rcpt(b"rcpt to: <Postmaster>").recipient.mailbox.local == "postmaster"


@pytest.mark.parametrize("line", [b"RCPT TO:<>", b"RCPT TO:rcpt@b.test", b"RCPT TO:<a@>", b"RCPT TO:<a@b.test>x"])
def test_rcpt_bad_path_is_501_513(line: bytes) -> None:
    assert P.parse(line) is R.BAD_RCPT_SYNTAX


@pytest.mark.parametrize("line", [b"RCPT", b"RCPT FROM:<a@b.test>", b"RCPT TO"])
def test_rcpt_without_to_is_501_554(line: bytes) -> None:
    assert P.parse(line) is R.BAD_ARGS


def test_non_ascii_recipient_depends_on_transaction_smtputf8() -> None:
    line = "RCPT TO:<ü@exämple.test>".encode()
    assert P.parse(line) is R.SMTPUTF8_REQUIRED
    assert rcpt(line, smtputf8_tx=True).recipient.mailbox.domain == "xn--exmple-cua.test"


@pytest.mark.parametrize(
    ("param", "notify"),
    [(b"NOTIFY=NEVER", ("NEVER",)), (b"NOTIFY=success,Failure", ("SUCCESS", "FAILURE")),
     (b"NOTIFY=DELAY", ("DELAY",)), (b"NOTIFY=FAILURE,DELAY,SUCCESS", ("FAILURE", "DELAY", "SUCCESS"))],
)
def test_notify(param: bytes, notify: tuple[str, ...]) -> None:
    assert rcpt(b"RCPT TO:<a@b.test> " + param).recipient.params.notify == notify


@pytest.mark.parametrize(
    "param",
    [b"NOTIFY=NEVER,SUCCESS", b"NOTIFY=SUCCESS,SUCCESS", b"NOTIFY=SOMETIMES", b"NOTIFY", b"NOTIFY=,", b"NOTIFY=SUCCESS,"],
)
def test_bad_notify_is_501(param: bytes) -> None:
    assert P.parse(b"RCPT TO:<a@b.test> " + param) is R.BAD_ARGS


@pytest.mark.parametrize(
    ("param", "orcpt"),
    [(b"ORCPT=rfc822;a+2Bb@x.test", "rfc822;a+b@x.test"), (b"ORCPT=RFC822;a@x.test", "rfc822;a@x.test"),
     (b"ORCPT=utf-8;a+20b@x.test", "utf-8;a b@x.test")],
)
def test_orcpt(param: bytes, orcpt: str) -> None:
    assert rcpt(b"RCPT TO:<a@b.test> " + param).recipient.params.orcpt == orcpt


@pytest.mark.parametrize(
    "param",
    [b"ORCPT=x400;a", b"ORCPT=rfc822", b"ORCPT=rfc822;", b"ORCPT=rfc822;a+0D+0Ab", b"ORCPT=rfc822;a+zz",
     b"ORCPT=rfc822;" + b"a" * 500, b"ORCPT", b"ORCPT=utf-8;+FF"],
)
def test_bad_orcpt_is_501(param: bytes) -> None:
    assert P.parse(b"RCPT TO:<a@b.test> " + param) is R.BAD_ARGS


def test_rcpt_unknown_and_duplicate_params_are_555() -> None:
    assert P.parse(b"RCPT TO:<a@b.test> FOO") is R.PARAM_NOT_IMPLEMENTED
    assert P.parse(b"RCPT TO:<a@b.test> NOTIFY=NEVER NOTIFY=NEVER") is R.PARAM_NOT_IMPLEMENTED
    assert P.parse(b"RCPT TO:<a@b.test> SIZE=1") is R.PARAM_NOT_IMPLEMENTED


def test_decode_xtext() -> None:
    assert decode_xtext(b"abc") == b"abc"
    assert decode_xtext(b"a+2Bb+3Dc") == b"a+b=c"
    assert decode_xtext(b"") == b""
    for bad in (b"a+2b", b"a+", b"a=b", b"a b", b"\x80"):
        assert decode_xtext(bad) is None


# -- never raises ----------------------------------------------------------------------------------

VERBS = [b"EHLO", b"HELO", b"MAIL FROM:", b"RCPT TO:", b"DATA", b"BDAT", b"RSET", b"NOOP", b"QUIT", b"VRFY",
         b"HELP", b"STARTTLS", b"AUTH", b"GET", b"mail from:<", b"rcpt to:<", b"MAIL FROM:<a@b.test> "]
ARG_BYTES = st.binary(max_size=80) | st.lists(
    st.sampled_from([b"<", b">", b"@", b'"', b"\\", b"=", b";", b"+", b",", b" ", b"a", b"\xc3\xa9", b"\xff",
                     b"SIZE=", b"NOTIFY=", b"ORCPT=rfc822;", b"ENVID=", b"SMTPUTF8", b"LAST", b"1", b"[", b"]",
                     b"\x00", b".", b"example.test"]),
    max_size=30,
).map(b"".join)


@settings(max_examples=600, deadline=None)
@given(line=st.binary(max_size=600), utf8=st.booleans())
def test_parse_never_raises_on_random_bytes(line: bytes, utf8: bool) -> None:
    result = P.parse(line, utf8)
    assert isinstance(result, (Reply, Ehlo, Mail, Rcpt, Data, Bdat, Rset, Noop, Quit, Vrfy, Help, StartTls, Forbidden))


@settings(max_examples=1500, deadline=None)
@given(verb=st.sampled_from(VERBS), args=ARG_BYTES, utf8=st.booleans())
def test_parse_never_raises_on_structured_garbage(verb: bytes, args: bytes, utf8: bool) -> None:
    result = P.parse(verb + args, utf8)
    if isinstance(result, Reply):
        assert result.code in (500, 501, 502, 552, 553, 555)


def test_parsed_paths_are_cached_per_flags() -> None:
    first = mail(b"MAIL FROM:<cache@example.test>").sender
    assert mail(b"MAIL FROM:<cache@example.test>").sender is first
    assert rcpt(b"RCPT TO:<cache@example.test>").recipient.mailbox == first
    line = "RCPT TO:<ü@example.test>".encode()
    assert P.parse(line) is R.SMTPUTF8_REQUIRED
    assert isinstance(P.parse(line, True), Rcpt)  # the refusal without SMTPUTF8 is not reused
    assert P.parse(line) is R.SMTPUTF8_REQUIRED
