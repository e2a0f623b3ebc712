"""One SMTP AUTH exchange on the server side: drives a sans-IO SASL mechanism, checks credentials against the
user store off the event loop, and applies the brute-force limits.

Untrusted input: every AUTH response line (bounded by the core) and the user names inside them. The peer
learns only "235" or "535 5.7.8" (after ``failure_delay``), never which part was wrong or whether the user
exists; an address or user name over the failure limit gets 421 4.7.0 and the connection is closed.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from ..auth.users import User, UserStore
from ..policy.authlimit import AuthLimiter
from ..policy.userlimits import UserRateLimiter
from ..reply import Reply
from ..smtp.sasl import (
    AuthReply,
    Challenge,
    CheckPassword,
    Failure,
    NeedScramCredentials,
    SaslMechanism,
    Step,
    Success,
    make_mechanism,
    step_reply,
)

__all__ = ["AuthExchange", "AuthOutcome", "AuthServices"]

log = logging.getLogger("mailhop.auth")
LOCKED_OUT = Reply(421, "4.7.0", "Too many failed authentication attempts, try again later")


@dataclass
class AuthServices:
    """What AUTH and authenticated submission need, shared by all sessions."""

    users: UserStore
    limiter: AuthLimiter
    rate: UserRateLimiter
    failure_delay: float = 1.0
    enforce_sender: bool = True
    enforce_from_header: bool = False
    received_shows_user: bool = False


@dataclass(frozen=True, slots=True)
class AuthOutcome:
    reply: Reply
    user: User | None = None  # set on success
    close: bool = False  # locked out: close after the reply
    done: bool = True  # False while the exchange continues (a 334 challenge)


class AuthExchange:
    """One exchange: ``start`` then ``respond`` until an outcome with ``done``."""

    def __init__(self, services: AuthServices, client_ip: str, mechanism: str) -> None:
        self.services = services
        self.ip_key = AuthLimiter.ip_key(client_ip)
        self.client_ip = client_ip
        self.mechanism = mechanism
        self.mech: SaslMechanism = make_mechanism(mechanism)
        self.username = ""
        self.user: User | None = None

    async def start(self, initial: bytes | None) -> AuthOutcome:
        if self.services.limiter.locked(self.ip_key):
            return AuthOutcome(LOCKED_OUT, close=True)
        return await self._drive(self.mech.start(initial))

    async def respond(self, data: bytes) -> AuthOutcome:
        return await self._drive(self.mech.respond(data))

    async def _drive(self, step: Step) -> AuthOutcome:
        users = self.services.users
        try:
            while True:
                if isinstance(step, CheckPassword):
                    self.username = step.username
                    if self.services.limiter.locked(AuthLimiter.user_key(step.username)):
                        step = self.mech.password_result(False)
                        continue
                    self.user = await users.authenticate(step.username, step.password)
                    step = self.mech.password_result(self.user is not None)
                elif isinstance(step, NeedScramCredentials):
                    self.username = step.username
                    creds = None
                    if not self.services.limiter.locked(AuthLimiter.user_key(step.username)):
                        creds = await users.scram_credentials(step.username)
                    step = self.mech.scram_credentials(creds)
                elif isinstance(step, Challenge):
                    reply = step_reply(step)
                    assert reply is not None
                    return AuthOutcome(reply, done=False)
                elif isinstance(step, Success):
                    user = self.user or await users.get_user(step.identity)
                    if user is None or user.disabled:
                        return await self._failed("user vanished or disabled")
                    self.services.limiter.success(self.ip_key, AuthLimiter.user_key(user.name))
                    log.info("auth ok client=%s user=%s mechanism=%s", self.client_ip, user.name, self.mechanism)
                    return AuthOutcome(AuthReply.OK, user=user)
                elif isinstance(step, Failure):
                    return await self._failed(step.reason)
                else:  # pragma: no cover - the Step union is closed
                    raise AssertionError(step)
        except Exception:
            log.exception("auth: user store failed client=%s", self.client_ip)
            return AuthOutcome(AuthReply.TEMPORARY_FAILURE)

    async def _failed(self, reason: str) -> AuthOutcome:
        keys = [self.ip_key] + ([AuthLimiter.user_key(self.username)] if self.username else [])
        locked = self.services.limiter.failure(*keys)
        log.warning("auth failed client=%s user=%s mechanism=%s reason=%s%s", self.client_ip,
                    self.username[:64] or "-", self.mechanism, reason, " (locked out)" if locked else "")
        # A fixed delay blunts password guessing and hides which step failed.
        await asyncio.sleep(self.services.failure_delay)
        if locked:
            return AuthOutcome(LOCKED_OUT, close=True)
        return AuthOutcome(AuthReply.FAILED)
