"""DATA and BDAT content decoders, checked against a slow line-by-line reference decoder."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailhop.smtp import BdatDecoder, DataDecoder


@dataclass
class Decoded:
    content: bytes  # what was emitted (at most max_size octets)
    consumed: int | None  # octets up to and including the end marker; None if no end was found
    bare_newline: bool
    line_too_long: bool
    too_big: bool
    size: int


def reference_flags(content: bytes, max_line: int) -> tuple[bool, bool]:
    """Byte-by-byte: a CR not followed by LF or an LF not preceded by CR is bare; a line (LF-delimited
    run of other octets, the CR included) of max_line or more octets is too long."""
    bare = False
    run = 0
    too_long = False
    for i, c in enumerate(content):
        if c == 0x0D and (i + 1 == len(content) or content[i + 1] != 0x0A):
            bare = True
        if c == 0x0A and (i == 0 or content[i - 1] != 0x0D):
            bare = True
        if c == 0x0A:
            run = 0
        else:
            run += 1
            if run >= max_line:
                too_long = True
    return bare, too_long


def reference_data(data: bytes, max_line: int, max_size: int) -> Decoded:
    """RFC 5321 4.5.2, one CRLF-terminated line at a time: "." alone ends, a leading "." is dropped."""
    lines = []
    pos = 0
    consumed = None
    while True:
        j = data.find(b"\r\n", pos)
        if j < 0:
            break
        line = data[pos:j]
        pos = j + 2
        if line == b".":
            consumed = pos
            break
        if line.startswith(b"."):
            line = line[1:]
        lines.append(line + b"\r\n")
    content = b"".join(lines)
    if consumed is None:
        # Incomplete: whole lines seen so far are content, the partial last line is not comparable.
        return Decoded(content, None, False, False, False, 0)
    bare, too_long = reference_flags(content, max_line)
    return Decoded(content[:max_size], consumed, bare, too_long, len(content) > max_size, len(content))


def run_data(pieces: list[bytes], max_line: int, max_size: int) -> Decoded:
    """Feed pieces to DataDecoder through a buffer as the server does (offset + compaction)."""
    return run_data_pos(pieces, max_line, max_size)[0]


def run_data_pos(pieces: list[bytes], max_line: int, max_size: int) -> tuple[Decoded, int]:
    """Like run_data, also returning how much input was consumed."""
    dec = DataDecoder(max_line, max_size)
    buf = bytearray()
    pos = 0
    fed = 0
    out = bytearray()
    for piece in pieces:
        del buf[:pos]
        fed += pos
        pos = 0
        buf += piece
        while True:
            content, pos, done = dec.decode(buf, pos)
            out += content
            if done:
                return (Decoded(bytes(out), fed + pos, dec.bare_newline, dec.line_too_long, dec.too_big, dec.size),
                        fed + pos)
            if not content:
                break
    return Decoded(bytes(out), None, False, False, False, 0), fed + pos


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces = []
    prev = 0
    for p in [*points, len(data)]:
        pieces.append(data[prev:p])
        prev = p
    return pieces


ALPHABET = st.sampled_from([b"\r", b"\n", b".", b"\x00", b"\r\n", b"\r\n.", b"\r\n.\r\n", b"a", b"bc", b"..", b"\xff"])
DATA = st.lists(ALPHABET, max_size=60).map(b"".join) | st.binary(max_size=40)


@settings(max_examples=2000, deadline=None)
@given(data=DATA, cuts=st.lists(st.integers(0, 400), max_size=8), max_line=st.integers(3, 12), max_size=st.integers(1, 40))
def test_data_decoder_matches_reference(data: bytes, cuts: list[int], max_line: int, max_size: int) -> None:
    expected = reference_data(data, max_line, max_size)
    got, position = run_data_pos(split(data, cuts), max_line, max_size)
    assert got.consumed == expected.consumed
    if expected.consumed is None:
        # No end yet: what was emitted must begin every possible completion of the message, and at
        # most the 4 octets that could start the end marker may be held back.
        completed = reference_data(data + b"X\r\n.\r\n", max_line, max_size)
        assert completed.content.startswith(got.content)
        assert position >= len(data) - 4
        return
    assert got == expected


@settings(max_examples=500, deadline=None)
@given(data=DATA, max_line=st.integers(3, 12))
def test_data_decoder_bytewise_matches_reference(data: bytes, max_line: int) -> None:
    data += b"\r\n.\r\n"
    expected = reference_data(data, max_line, 10**6)
    assert run_data([data[i : i + 1] for i in range(len(data))], max_line, 10**6) == expected


def decode_all(data: bytes, max_line: int = 1000, max_size: int = 10**6) -> Decoded:
    return run_data([data], max_line, max_size)


@pytest.mark.parametrize(
    ("wire", "content"),
    [
        (b".\r\n", b""),
        (b"\r\n.\r\n", b"\r\n"),
        (b"a\r\n.\r\n", b"a\r\n"),
        (b".a\r\n.\r\n", b"a\r\n"),
        (b"..\r\n.\r\n", b".\r\n"),
        (b"a\r\n..b\r\n...\r\n.\r\n", b"a\r\n.b\r\n..\r\n"),
        (b"a\r\n.b\r\n.\r\n", b"a\r\nb\r\n"),
    ],
)
def test_dot_unstuffing(wire: bytes, content: bytes) -> None:
    d = decode_all(wire + b"TRAILING")
    assert (d.content, d.consumed, d.bare_newline) == (content, len(wire), False)


@pytest.mark.parametrize("cut", range(1, 12))
def test_marker_split_at_every_boundary(cut: int) -> None:
    wire = b"ab\r\n.\r\nMAIL"
    d = run_data([wire[:cut], wire[cut:]], 1000, 10**6)
    assert (d.content, d.consumed) == (b"ab\r\n", 7)


def test_decoder_holds_back_at_most_four_bytes() -> None:
    dec = DataDecoder(1000, 10**6)
    content, pos, done = dec.decode(b"hello\r\n.\r", 0)
    assert (content, pos, done) == (b"hello", 5, False)
    content, pos, done = dec.decode(b"\r\n.\r", 0)
    assert (content, pos, done) == (b"", 0, False)


def test_start_of_data_dot_needs_more_input() -> None:
    dec = DataDecoder(1000, 10**6)
    assert dec.decode(b".", 0) == (b"", 0, False)
    assert dec.decode(b".\r", 0) == (b"", 0, False)
    assert dec.decode(b".\r\n", 0) == (b"", 3, True)
    with pytest.raises(RuntimeError):
        dec.decode(b"more", 0)


@pytest.mark.parametrize(
    ("body", "bare"),
    [(b"a\nb\r\n", True), (b"a\rb\r\n", True), (b"a\r\r\n", True), (b"\n\r\n", True), (b"a\r\nb\r\n", False),
     (b"\x00\r\n", False)],
)
def test_bare_newline_flag(body: bytes, bare: bool) -> None:
    d = decode_all(body + b".\r\n")
    assert d.bare_newline is bare
    assert d.content == body


@pytest.mark.parametrize(("length", "too_long"), [(998, False), (999, True), (5000, True), (0, False)])
def test_line_length_limit_counts_crlf(length: int, too_long: bool) -> None:
    d = decode_all(b"x" * length + b"\r\nshort\r\n.\r\n")
    assert d.line_too_long is too_long


def test_line_length_excludes_the_stuffing_dot() -> None:
    assert not decode_all(b"." + b"x" * 998 + b"\r\n.\r\n").line_too_long
    assert decode_all(b"y\r\n." + b"x" * 999 + b"\r\n.\r\n").line_too_long


def test_long_line_across_reads() -> None:
    pieces = [b"x" * 400] * 3 + [b"\r\n.\r\n"]
    assert run_data(pieces, 1000, 10**6).line_too_long
    assert not run_data([b"x" * 400] * 2 + [b"\r\n.\r\n"], 1000, 10**6).line_too_long


def test_too_big_stops_emitting_but_finds_the_end() -> None:
    body = b"0123456789\r\n" * 10
    d = run_data([body[:50], body[50:], b".\r\nNEXT"], 1000, 30)
    assert d.too_big and d.content == body[:30] and d.size == len(body) and d.consumed == len(body) + 3


def test_exactly_max_size_is_not_too_big() -> None:
    d = decode_all(b"abc\r\n.\r\n", max_size=5)
    assert not d.too_big and d.content == b"abc\r\n"


# -- BDAT ------------------------------------------------------------------------------------------


def read_chunks(chunks: list[bytes], max_line: int = 1000, max_size: int = 10**6, split_at: int = 0) -> BdatDecoder:
    dec = BdatDecoder(max_line, max_size)
    for chunk in chunks:
        dec.start_chunk(len(chunk))
        pieces = [chunk[:split_at], chunk[split_at:]] if split_at else [chunk]
        out = bytearray()
        done = False
        for i, piece in enumerate(pieces):
            # Bytes after the chunk (the next command) must be left alone.
            content, pos, done = dec.decode(piece + b"EXTRA" if i == len(pieces) - 1 else piece, 0)
            assert pos == len(piece)
            out += content
        assert done
    dec.finish()
    return dec


def test_bdat_reads_exactly_the_chunk() -> None:
    dec = BdatDecoder(1000, 10**6)
    dec.start_chunk(5)
    assert dec.decode(b"ab", 0) == (b"ab", 2, False)
    assert dec.decode(b"xcdeMAIL", 1) == (b"cde", 4, True)
    assert dec.decode(b"MAIL", 0) == (b"", 0, True)


def test_bdat_markers_are_plain_content() -> None:
    dec = read_chunks([b"a\r\n.\r\nMAIL FROM:<x@y>\r\n"])
    assert not dec.bare_newline and dec.size == 23


def test_bdat_crlf_split_across_chunks_is_not_bare() -> None:
    assert not read_chunks([b"a\r", b"\nb\r\n"]).bare_newline
    assert read_chunks([b"a\r", b"b\r\n"]).bare_newline
    assert read_chunks([b"a\r"]).bare_newline
    assert read_chunks([b"a\r", b""]).bare_newline
    assert read_chunks([b"a\n"]).bare_newline


def test_bdat_crlf_split_across_reads_is_not_bare() -> None:
    assert not read_chunks([b"abc\r\ndef\r\n"], split_at=4).bare_newline


def test_bdat_long_line_across_chunks() -> None:
    assert read_chunks([b"x" * 600, b"x" * 600 + b"\r\n"]).line_too_long
    assert not read_chunks([b"x" * 500, b"x" * 497 + b"\r\n"]).line_too_long


def test_bdat_too_big() -> None:
    dec = read_chunks([b"x" * 10, b"y" * 10], max_size=15)
    assert dec.too_big and dec.size == 20


def test_bdat_start_chunk_before_previous_is_read() -> None:
    dec = BdatDecoder(1000, 10**6)
    dec.start_chunk(3)
    with pytest.raises(RuntimeError):
        dec.start_chunk(3)


@settings(max_examples=1000, deadline=None)
@given(chunks=st.lists(DATA, max_size=5), max_line=st.integers(3, 12), max_size=st.integers(1, 60))
def test_bdat_flags_match_reference(chunks: list[bytes], max_line: int, max_size: int) -> None:
    content = b"".join(chunks)
    dec = BdatDecoder(max_line, max_size)
    out = bytearray()
    for chunk in chunks:
        dec.start_chunk(len(chunk))
        for i in range(len(chunk)):  # one octet per read: the hardest split
            piece, _, _ = dec.decode(chunk, i)
            out += piece
    dec.finish()
    bare, too_long = reference_flags(content, max_line)
    assert (dec.bare_newline, dec.line_too_long) == (bare, too_long)
    assert (bytes(out), dec.too_big, dec.size) == (content[:max_size], len(content) > max_size, len(content))
