"""What an authenticated (or unauthenticated) submission client may do: pure decisions, no I/O.

Untrusted input: the envelope sender and the From: header values of authenticated users' messages.
"""

from __future__ import annotations

from collections.abc import Sequence
from email.utils import getaddresses

from ..address import Mailbox
from ..auth.users import User
from ..reply import R, Reply
from .userlimits import UserRateLimiter, rate_reply, recipients_reply

__all__ = ["AUTH_REQUIRED", "check_from_header", "check_mail", "check_recipient_count"]

AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")


def check_mail(
    *,
    user: User | None,
    sender: Mailbox | None,
    require_auth: bool,
    enforce_sender: bool,
    rate: UserRateLimiter | None,
) -> Reply:
    """The reply to MAIL FROM: 530 without AUTH where required, 553 5.7.1 for a sender the user does not own
    (the null sender is allowed), 450 4.7.1 over the user's hourly message limit, else 250."""
    if user is None:
        return AUTH_REQUIRED if require_auth else R.SENDER_OK
    if enforce_sender and sender is not None and not user.may_send_as(str(sender)):
        return Reply(553, "5.7.1", f"Sender address rejected: not owned by user {user.name}")
    limit = user.max_messages_per_hour
    if limit is not None and rate is not None and not rate.allowed(user.name, limit):
        return rate_reply(limit)
    return R.SENDER_OK


def check_recipient_count(user: User | None, accepted: int) -> Reply | None:
    """452 4.7.1 once the user's recipients-per-message limit is reached, else None."""
    limit = user.max_recipients_per_message if user is not None else None
    if limit is not None and accepted >= limit:
        return recipients_reply(limit)
    return None


def check_from_header(user: User, from_values: Sequence[str]) -> Reply | None:
    """553 5.7.1 unless every address in the From: header(s) belongs to the user (and there is one)."""
    addresses = [addr for _, addr in getaddresses(list(from_values)) if addr]
    if not addresses or not all(user.may_send_as(a) for a in addresses):
        return Reply(553, "5.7.1", f"From: header address not owned by user {user.name}")
    return None
