"""Open-relay tricks against a relay that does not trust the client: each must be refused with 554 5.7.1."""

from __future__ import annotations

import pytest

from tests.daemon.harness import Client, Relay


def _rcpt(relay: Relay, *paths: str, utf8: bool = False) -> list[str]:
    c = Client(relay.host, relay.port)
    c.reply()
    c.line("EHLO c.test")
    c.reply()
    c.line("MAIL FROM:<a@c.test>" + (" SMTPUTF8" if utf8 else ""))
    assert c.reply().startswith("250")
    out = []
    for path in paths:
        c.send(f"RCPT TO:{path}\r\n".encode())
        out.append(c.reply())
    c.close()
    return out


DENIED = {
    "other_domain": "<user@other.test>",
    "percent_hack": "<user%other.test@example.test>",
    "source_route": "<@example.test,@b.test:user@other.test>",
    "quoted_at": '<"user@other.test"@example.test>',
    "bang_path": "<other.test!user@example.test>",
    "ip_literal": "<user@[127.0.0.1]>",
    "ipv6_literal": "<user@[IPv6:::1]>",
    "subdomain_of_served": "<user@sub.example.test>",
    "served_as_prefix": "<user@example.test.other.test>",
    "fullwidth_dot_other": "<user@other．test>",
    "quoted_percent": '<"user%other.test"@example.test>',
}


@pytest.mark.parametrize("path", list(DENIED.values()), ids=list(DENIED))
def test_relay_trick_denied(mx_relay: Relay, path: str) -> None:
    (reply,) = _rcpt(mx_relay, path, utf8=not path.isascii())
    assert reply.startswith("554 5.7.1 Relay access denied"), reply


@pytest.mark.parametrize(
    "path",
    ["<user@example.test.>", "<user@other.test.>"],
    ids=["trailing_dot_served", "trailing_dot_other"],
)
def test_trailing_dot_refused(mx_relay: Relay, path: str) -> None:
    (reply,) = _rcpt(mx_relay, path)
    assert reply.startswith("501 5.1.3"), reply


ACCEPTED = {
    "served": "<user@example.test>",
    "served_uppercase": "<USER@EXAMPLE.TEST>",
    "served_mixed_case": "<User@Example.Test>",
    "source_route_to_served": "<@other.test:user@example.test>",
    "idna_alabel": "<user@xn--bcher-kva.test>",
    "postmaster_no_domain": "<postmaster>",
    "postmaster_any_case": "<PostMaster>",
}


@pytest.mark.parametrize("path", list(ACCEPTED.values()), ids=list(ACCEPTED))
def test_served_recipient_accepted(mx_relay: Relay, path: str) -> None:
    (reply,) = _rcpt(mx_relay, path)
    assert reply.startswith("250 2.1.5"), reply


def test_idna_ulabel_with_smtputf8_accepted(mx_relay: Relay) -> None:
    (reply,) = _rcpt(mx_relay, "<user@bücher.test>", utf8=True)
    assert reply.startswith("250 2.1.5"), reply


def test_idna_ulabel_without_smtputf8_refused(mx_relay: Relay) -> None:
    (reply,) = _rcpt(mx_relay, "<user@bücher.test>")
    assert reply.startswith(("553 5.6.7", "501")), reply


def test_trusted_client_relays_anywhere(relay: Relay) -> None:
    replies = _rcpt(relay, "<user@other.test>", "<user%x@example.test>")
    assert all(r.startswith("250 2.1.5") for r in replies), replies
