"""Relay decisions as a table (pure logic): recipient x client -> accepted or 554 5.7.1."""

from __future__ import annotations

import pytest

from mailhop.address import AddressError, parse_path
from mailhop.policy.relay import RelayPolicy

POLICY = RelayPolicy(["192.0.2.0/24", "2001:db8::/32"], ["example.test", "bücher.test"])

CASES = [
    # path, smtputf8, trusted?, accepted?
    ("<u@example.test>", False, False, True),
    ("<u@EXAMPLE.test>", False, False, True),
    ("<u@xn--bcher-kva.test>", False, False, True),
    ("<u@BÜCHER.test>", True, False, True),
    ("<u@other.test>", False, False, False),
    ("<u@other.test>", False, True, True),
    ("<u%other.test@example.test>", False, False, False),
    ("<other.test!u@example.test>", False, False, False),
    ('<"u@other.test"@example.test>', False, False, False),
    ('<"u\\@other.test"@example.test>', False, False, False),
    ("<@example.test:u@other.test>", False, False, False),
    ("<@other.test:u@example.test>", False, False, True),
    ("<u@[192.0.2.1]>", False, False, False),
    ("<u@sub.example.test>", False, False, False),
    ("<postmaster>", False, False, True),
    ("<u@other．test>", True, False, False),
]


@pytest.mark.parametrize(("path", "utf8", "trusted", "accepted"), CASES)
def test_relay_table(path: str, utf8: bool, trusted: bool, accepted: bool) -> None:
    mailbox = parse_path(path, smtputf8=utf8)
    assert mailbox is not None
    reply = POLICY.check(mailbox, trusted=trusted)
    assert (reply is None) == accepted, (path, reply)
    if reply is not None:
        assert (reply.code, reply.enhanced) == (554, "5.7.1")


@pytest.mark.parametrize("path", ["<u@example.test.>", "<u@exa mple.test>", "<u@-x.test>", "<u@xn--zz.test>", "<u@>"])
def test_unparseable_paths(path: str) -> None:
    with pytest.raises(AddressError):
        parse_path(path)


@pytest.mark.parametrize(
    ("ip", "trusted"),
    [("192.0.2.7", True), ("192.0.3.1", False), ("::ffff:192.0.2.9", True), ("2001:db8::1", True), ("::1", False),
     ("garbage", False)],
)
def test_trusted_networks(ip: str, trusted: bool) -> None:
    assert POLICY.is_trusted(ip) is trusted


def test_authenticated_may_relay() -> None:
    mailbox = parse_path("<u@other.test>")
    assert mailbox is not None
    assert POLICY.check(mailbox, trusted=False, authenticated=True) is None
