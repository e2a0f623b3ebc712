"""The vectorised search helpers give exactly what the ``bytes`` methods give, on bytes and bytearray."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mailhop.smtp import scan

# Few distinct octets, so that patterns made of them occur, overlap and sit at the edges of the range.
_octets = st.binary(max_size=300).map(lambda b: bytes(b"\r\n.a"[x % 4] for x in b))
_patterns = st.sampled_from([b"\r", b"\n", b".", b"\r\n", b"\r\n.", b"\r\n.\r\n", b"..", b"a\r"])


@settings(max_examples=500, deadline=None)
@given(data=_octets, pattern=_patterns, start=st.integers(0, 320), end=st.integers(0, 320),
       as_bytearray=st.booleans())
def test_search_matches_the_bytes_methods(data: bytes, pattern: bytes, start: int, end: int,
                                          as_bytearray: bool) -> None:
    text = bytearray(data) if as_bytearray else data
    assert scan.find(text, pattern, start, end) == text.find(pattern, start, end)
    assert scan.rfind(text, pattern, start, end) == text.rfind(pattern, start, end)
    assert scan.count(text, pattern, start, end) == text.count(pattern, start, end)
    assert scan.find(text, pattern, start) == text.find(pattern, start)
    assert scan.count(text, pattern) == text.count(pattern)


def test_long_buffers_past_the_vector_width() -> None:
    # SIMD kernels work in 16-64 octet blocks: matches at every offset around block ends must be found.
    base = bytearray(b"x" * 1000)
    for at in range(0, 200):
        text = bytes(base[:at] + b"\r\n." + base[at:])
        assert scan.find(text, b"\r\n.") == at
        assert scan.rfind(text, b"\n") == at + 1
        assert scan.count(text, b"\r") == 1
