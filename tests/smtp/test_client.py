"""The sans-IO client core: reply parsing, EHLO capabilities, command builders and the DATA encoder."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailhop.reply import Reply
from mailhop.smtp import client
from mailhop.smtp.client import Capabilities, CommandError, ReplyError, ReplyParser, parse_ehlo
from mailhop.smtp.data import DataDecoder
from mailhop.smtp.encode import DotStuffer, canonicalize, encode_data, xtext

ALL = Capabilities(pipelining=True, size=1000, eightbitmime=True, smtputf8=True, dsn=True)
NONE = Capabilities()

# -- ReplyParser -------------------------------------------------------------------------------------------


def test_single_and_multiline_replies() -> None:
    p = ReplyParser()
    assert p.feed(b"220 mx.test ESMTP\r\n") == [Reply(220, "", "mx.test ESMTP")]
    assert p.feed(b"250-mx.test\r\n250-PIPELINING\r\n250 SIZE 100\r\n") == [
        Reply(250, "", "mx.test", ("PIPELINING", "SIZE 100"))
    ]


def test_enhanced_code_split_from_every_line() -> None:
    p = ReplyParser()
    [r] = p.feed(b"550-5.1.1 No such\r\n550 5.1.1 user here\r\n")
    assert r == Reply(550, "5.1.1", "No such", ("user here",))
    [r] = p.feed(b"250 2.0.0\r\n")
    assert r == Reply(250, "2.0.0", "")
    # A class that does not match the reply code is just text.
    [r] = p.feed(b"250 5.0.0 odd\r\n")
    assert r == Reply(250, "", "5.0.0 odd")


def test_replies_split_anywhere_and_several_per_feed() -> None:
    wire = b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n354 go ahead\r\n"
    for cut in range(len(wire) + 1):
        p = ReplyParser()
        got = p.feed(wire[:cut]) + p.feed(wire[cut:])
        assert [r.code for r in got] == [250, 250, 354]
        assert p.buffered == 0


def test_bare_lf_and_code_only_lines() -> None:
    assert ReplyParser().feed(b"250\n") == [Reply(250, "", "")]


@pytest.mark.parametrize("wire", [
    b"25 ok\r\n", b"abc ok\r\n", b"250x\r\n", b"150 ok\r\n", b"650 ok\r\n", b"\r\n", b"250_ok\r\n",
    b"250-a\r\n251 b\r\n",  # the code changed inside a multi-line reply
])
def test_malformed_replies(wire: bytes) -> None:
    with pytest.raises(ReplyError):
        ReplyParser().feed(wire)


def test_huge_line_refused_after_about_2k_not_buffered() -> None:
    p = ReplyParser()
    fed = 0
    with pytest.raises(ReplyError):
        for _ in range(1024):  # 1 MB in 1 KB pieces
            p.feed(b"x" * 1024)
            fed += 1024
    assert fed <= 3 * 1024
    # ... and a complete long line in one piece, too.
    with pytest.raises(ReplyError):
        ReplyParser().feed(b"250 " + b"x" * 1024 * 1024 + b"\r\n")
    assert ReplyParser().feed(b"250 " + b"x" * 2044 + b"\r\n")[0].code == 250  # 2048 octets: the limit
    with pytest.raises(ReplyError):
        ReplyParser().feed(b"250 " + b"x" * 2045 + b"\r\n")


def test_too_many_lines() -> None:
    p = ReplyParser()
    with pytest.raises(ReplyError):
        p.feed(b"250-x\r\n" * 101)
    assert len(ReplyParser().feed(b"250-x\r\n" * 99 + b"250 y\r\n")[0].extra) == 99


def test_control_characters_never_reach_reply_text() -> None:
    [r] = ReplyParser().feed(b"550 bad\x00\x1b[31m\rX-Injected: yes\r\n")
    assert "\r" not in r.text and "\x00" not in r.text and "\x1b" not in r.text
    [r] = ReplyParser().feed("250 caf\u00e9 \xff".encode("utf-8", "surrogateescape") + b"\r\n")
    assert r.text.startswith("caf\u00e9")


def test_discard_drops_partial_input() -> None:
    p = ReplyParser()
    assert p.feed(b"220 Ready\r\n250-evil\r\n250-more") == [Reply(220, "", "Ready")]
    assert p.buffered > 0
    assert p.discard() > 0
    assert p.buffered == 0
    assert p.feed(b"250 fine\r\n") == [Reply(250, "", "fine")]


# -- EHLO ---------------------------------------------------------------------------------------------------


def test_parse_ehlo() -> None:
    [r] = ReplyParser().feed(
        b"250-mx.test hello\r\n250-PIPELINING\r\n250-SIZE 35882577\r\n250-8BITMIME\r\n250-smtputf8\r\n"
        b"250-DSN\r\n250-CHUNKING\r\n250-STARTTLS\r\n250-ENHANCEDSTATUSCODES\r\n250-AUTH PLAIN login\r\n"
        b"250 X-EXTRA param\r\n"
    )
    caps = parse_ehlo(r)
    assert caps.pipelining and caps.eightbitmime and caps.smtputf8 and caps.dsn and caps.chunking
    assert caps.starttls and caps.enhancedstatuscodes
    assert caps.size == 35882577
    assert caps.auth == {"PLAIN", "LOGIN"}
    assert "X-EXTRA" in caps.keywords


def test_parse_ehlo_minimal_and_size_without_limit() -> None:
    assert parse_ehlo(Reply(250, "", "mx.test")) == Capabilities()
    assert parse_ehlo(Reply(250, "", "mx.test", ("SIZE",))).size == 0
    assert parse_ehlo(Reply(250, "", "mx.test", ("SIZE 0",))).size == 0
    assert parse_ehlo(Reply(250, "", "mx.test", ("SIZE junk",))).size == 0


# -- command builders --------------------------------------------------------------------------------------


def test_mail_with_and_without_extensions() -> None:
    full = client.mail("a@b.test", caps=ALL, size=42, body="8BITMIME", smtputf8=True, ret="HDRS",
                       envid="id+1 =x")
    assert full == b"MAIL FROM:<a@b.test> SIZE=42 BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=id+2B1+20+3Dx\r\n"
    bare = client.mail("a@b.test", caps=NONE, size=42, body="8BITMIME", ret="HDRS", envid="x")
    assert bare == b"MAIL FROM:<a@b.test>\r\n"
    assert client.mail("", caps=NONE) == b"MAIL FROM:<>\r\n"


def test_rcpt_dsn_params_only_with_dsn() -> None:
    cmd = client.rcpt("c@d.test", caps=ALL, notify=("SUCCESS", "FAILURE"), orcpt="rfc822;c+x@d.test")
    assert cmd == b"RCPT TO:<c@d.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;c+2Bx@d.test\r\n"
    assert client.rcpt("c@d.test", caps=NONE, notify=("NEVER",), orcpt="rfc822;c@d.test") == b"RCPT TO:<c@d.test>\r\n"


def test_utf8_orcpt_forms() -> None:
    assert client.rcpt("c@d.test", caps=ALL, orcpt="utf-8;j\u00f6@d.test").endswith(b"ORCPT=utf-8;j\\x{F6}@d.test\r\n")
    utf8 = client.rcpt("j\u00f6@d.test", caps=ALL, smtputf8=True, orcpt="utf-8;j\u00f6 x@d.test")
    assert utf8 == "RCPT TO:<j\u00f6@d.test> ORCPT=utf-8;j\u00f6+20x@d.test\r\n".encode()


@pytest.mark.parametrize("bad", ["a\r\n@b", "a\n@b", "a\r@b", "a\x00@b"])
def test_builders_refuse_line_breaks_and_nul(bad: str) -> None:
    with pytest.raises(CommandError):
        client.mail(bad, caps=ALL)
    with pytest.raises(CommandError):
        client.rcpt(bad, caps=ALL)
    with pytest.raises(CommandError):
        client.rcpt("ok@b.test", caps=ALL, orcpt="rfc822;" + bad)
    with pytest.raises(CommandError):
        client.mail("ok@b.test", caps=ALL, envid=bad)
    with pytest.raises(CommandError):
        client.ehlo(bad)
    with pytest.raises(CommandError):
        client.rcpt("ok@b.test", caps=ALL, notify=(bad,))


def test_non_ascii_needs_smtputf8() -> None:
    with pytest.raises(CommandError):
        client.mail("j\u00f6@b.test", caps=ALL)
    with pytest.raises(CommandError):
        client.rcpt("j\u00f6@b.test", caps=NONE, smtputf8=True)  # the server cannot take it
    assert client.mail("j\u00f6@b.test", caps=ALL, smtputf8=True).startswith("MAIL FROM:<j\u00f6@".encode())


def test_simple_commands_and_auth() -> None:
    assert client.ehlo("me.test") == b"EHLO me.test\r\n"
    assert client.helo("me.test") == b"HELO me.test\r\n"
    assert client.lhlo("me.test") == b"LHLO me.test\r\n"
    with pytest.raises(CommandError):
        client.ehlo("two words")
    assert client.data() == b"DATA\r\n" and client.rset() == b"RSET\r\n" and client.quit() == b"QUIT\r\n"
    assert client.starttls() == b"STARTTLS\r\n" and client.noop() == b"NOOP\r\n"
    assert client.bdat(10) == b"BDAT 10\r\n" and client.bdat(0, last=True) == b"BDAT 0 LAST\r\n"
    plain = client.auth_plain("user", "p\u00e4ss")
    assert plain.startswith(b"AUTH PLAIN ") and plain.endswith(b"\r\n")
    assert base64.b64decode(plain[11:-2]) == b"\0user\0p\xc3\xa4ss"
    with pytest.raises(CommandError):
        client.auth_plain("us\0er", "x")
    assert client.auth_login_start() == b"AUTH LOGIN\r\n"
    assert client.auth_login_response("user") == b"dXNlcg==\r\n"
    assert client.auth_login_response("") == b"=\r\n"


def test_xtext() -> None:
    assert xtext(b"plain") == "plain"
    assert xtext(b"a+b=c d\x7f\xff") == "a+2Bb+3Dc+20d+7F+FF"


# -- DATA encoding -----------------------------------------------------------------------------------------


def reference_encode(content: bytes) -> bytes:
    """Slow but obvious: canonical line ends, then stuff each line, then the terminator."""
    canonical = reference_canonical(content)
    lines = canonical.split(b"\r\n")[:-1] if canonical else []
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines) + b".\r\n"


def reference_canonical(content: bytes) -> bytes:
    out = bytearray()
    i = 0
    while i < len(content):
        c = content[i : i + 1]
        if c == b"\r":
            out += b"\r\n"
            i += 2 if content[i + 1 : i + 2] == b"\n" else 1
            continue
        out += b"\r\n" if c == b"\n" else c
        i += 1
    if out and not out.endswith(b"\r\n"):
        out += b"\r\n"
    return bytes(out)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return pieces


content_bytes = st.lists(st.sampled_from([b"\r", b"\n", b".", b"a", b"\r\n", b"\r\n.", b".\r\n", b"\x00", b"\xff"]),
                         max_size=60).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(content_bytes, st.lists(st.integers(0, 200), max_size=6))
def test_encoder_matches_reference_for_any_split(content: bytes, cuts: list[int]) -> None:
    encoded = b"".join(encode_data(split_at(content, cuts)))
    assert encoded == reference_encode(content)
    assert encoded.count(b"\r") == encoded.count(b"\n") == encoded.count(b"\r\n")  # no bare CR or LF


@settings(max_examples=300, deadline=None)
@given(content_bytes, st.lists(st.integers(0, 200), max_size=6), st.lists(st.integers(0, 200), max_size=6))
def test_round_trip_through_the_server_decoder(content: bytes, cuts: list[int], wire_cuts: list[int]) -> None:
    encoded = b"".join(encode_data(split_at(content, cuts)))
    decoder = DataDecoder(10_000, 10**6)
    buf = bytearray()
    pos = 0
    out = bytearray()
    ended = False
    fed = 0
    for piece in split_at(encoded, wire_cuts):
        buf += piece
        fed += len(piece)
        while not ended:
            chunk, new_pos, ended = decoder.decode(buf, pos)
            out += chunk
            if new_pos == pos and not ended:
                break
            pos = new_pos
        if ended:
            break
    assert ended and pos == fed == len(encoded)  # the decoder ends exactly at our terminator
    assert bytes(out) == reference_canonical(content)
    assert reference_canonical(content).startswith(canonicalize(content))
    assert not decoder.bare_newline


def test_dots_and_boundaries() -> None:
    assert b"".join(encode_data([b".a\r\n", b".b\r", b"\n.c"])) == b"..a\r\n..b\r\n..c\r\n.\r\n"
    assert b"".join(encode_data([])) == b".\r\n"
    assert b"".join(encode_data([b"", b"."])) == b"..\r\n.\r\n"
    assert b"".join(encode_data([b"x\r"])) == b"x\r\n.\r\n"
    assert b"".join(encode_data([b"\r\n.\r\n", b"smuggled\n.\n"])) == b"\r\n..\r\nsmuggled\r\n..\r\n.\r\n"


def test_long_lines_are_kept_and_flagged() -> None:
    s = DotStuffer()
    line = b"y" * 2000
    out = s.feed(b"short\r\n" + line[:700]) + s.feed(line[700:] + b"\r\nend\r\n") + s.finish()
    assert line + b"\r\n" in out and s.long_lines
    ok = DotStuffer()
    ok.feed(b"z" * 998 + b"\r\n" + (b"w" * 998 + b"\r\n") * 3)
    assert not ok.long_lines
    inner = DotStuffer()
    inner.feed(b"a\r\n" + b"q" * 999 + b"\r\nb\r\n")
    assert inner.long_lines


canonical_bytes = st.lists(st.sampled_from([b"\r\n", b".", b"a", b"\r\n.", b".\r\n", b"\x00", b"\xff"]),
                          max_size=60).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(canonical_bytes, st.lists(st.integers(0, 200), max_size=6))
def test_canonical_fast_path_matches_reference_for_any_split(content: bytes, cuts: list[int]) -> None:
    # Content vouched canonical (CRLF only) is only dot-stuffed: the same wire form as the full encoder.
    stuffer = DotStuffer(canonical=True)
    encoded = b"".join(stuffer.feed(piece) for piece in split_at(content, cuts)) + stuffer.finish()
    assert encoded == reference_encode(content)


line_pieces = st.lists(st.sampled_from([b"x" * 400, b"x" * 598, b"x" * 599, b"y", b"\r\n", b"\n", b"\r", b"."]),
                      max_size=40).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(line_pieces, st.lists(st.integers(0, 8000), max_size=6))
def test_long_line_flag_matches_reference_for_any_split(content: bytes, cuts: list[int]) -> None:
    stuffer = DotStuffer()
    for piece in split_at(content, cuts):
        stuffer.feed(piece)
    stuffer.finish()
    lines = reference_canonical(content).split(b"\r\n")
    assert stuffer.long_lines == any(len(line) > 998 for line in lines)


def test_encoder_is_fast_enough() -> None:
    import time

    body = (b"Some ordinary text line of about seventy characters, as mail has.\r\n" * 16000)  # ~1 MB
    chunks = [body[i : i + 65536] for i in range(0, len(body), 65536)]
    start = time.perf_counter()
    for _ in range(10):
        for _piece in encode_data(chunks):
            pass
    assert time.perf_counter() - start < 2.0  # ~10 MB; C-speed replaces take a few ms per MB


def test_buffered_counts_raw_octets_of_pending_lines() -> None:
    p = ReplyParser()
    assert p.feed(b"250-\r\n") == []
    assert p.buffered == 6  # an empty continuation line is still a reply in progress
    assert p.feed(b"250-mx\r\n250 ") == []
    assert p.buffered == 6 + 8 + 4
    assert p.discard() == 18 and p.buffered == 0
    assert [r.code for r in p.feed(b"220 Ready\r\n")] == [220] and p.buffered == 0
