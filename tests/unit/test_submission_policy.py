"""Submission decisions as a table (pure): MAIL, recipient count and From: checks for authenticated users."""

from __future__ import annotations

import pytest

from mailhop.address import parse_path
from mailhop.auth.users import User
from mailhop.policy.submission import check_from_header, check_mail, check_recipient_count
from mailhop.policy.userlimits import UserRateLimiter

ALICE = User("alice", ("alice@example.org", "@sales.example.org"), max_messages_per_hour=2,
             max_recipients_per_message=3)


@pytest.mark.parametrize(
    ("user", "sender", "require_auth", "expect"),
    [
        (None, "<x@y.test>", True, "530 5.7.0"),
        (None, "<x@y.test>", False, "250 2.1.0"),
        (ALICE, "<alice@example.org>", True, "250 2.1.0"),
        (ALICE, "<ALICE@Example.ORG>", True, "250 2.1.0"),
        (ALICE, "<bob@sales.example.org>", True, "250 2.1.0"),
        (ALICE, "<bob@example.org>", True, "553 5.7.1"),
        (ALICE, "<alice@sub.sales.example.org>", True, "553 5.7.1"),
        (ALICE, "<>", True, "250 2.1.0"),
    ],
)
def test_mail_table(user: User | None, sender: str, require_auth: bool, expect: str) -> None:
    mailbox = parse_path(sender, allow_null=True)
    reply = check_mail(user=user, sender=mailbox, require_auth=require_auth, enforce_sender=True, rate=None)
    assert f"{reply.code} {reply.enhanced}" == expect


def test_mail_not_enforced_when_disabled() -> None:
    reply = check_mail(user=ALICE, sender=parse_path("<x@other.test>"), require_auth=True, enforce_sender=False,
                       rate=None)
    assert reply.code == 250


def test_hourly_rate() -> None:
    now = [0.0]
    rate = UserRateLimiter(clock=lambda: now[0])
    sender = parse_path("<alice@example.org>")
    for _ in range(2):
        assert check_mail(user=ALICE, sender=sender, require_auth=True, enforce_sender=True, rate=rate).code == 250
        rate.record("alice", 2)
    reply = check_mail(user=ALICE, sender=sender, require_auth=True, enforce_sender=True, rate=rate)
    assert (reply.code, reply.enhanced) == (450, "4.7.1")
    now[0] += 3601
    assert check_mail(user=ALICE, sender=sender, require_auth=True, enforce_sender=True, rate=rate).code == 250


@pytest.mark.parametrize(("accepted", "refused"), [(0, False), (2, False), (3, True), (10, True)])
def test_recipient_count(accepted: int, refused: bool) -> None:
    reply = check_recipient_count(ALICE, accepted)
    assert (reply is not None) == refused
    if reply is not None:
        assert (reply.code, reply.enhanced) == (452, "4.7.1")
    assert check_recipient_count(None, 10_000) is None


@pytest.mark.parametrize(
    ("values", "ok"),
    [
        (["Alice <alice@example.org>"], True),
        (['"Sales" <team@sales.example.org>'], True),
        (["alice@example.org, mallory@evil.test"], False),
        (["Mallory <mallory@evil.test>"], False),
        ([], False),
        (["undisclosed-recipients:;"], False),
    ],
)
def test_from_header(values: list[str], ok: bool) -> None:
    reply = check_from_header(ALICE, values)
    assert (reply is None) == ok
