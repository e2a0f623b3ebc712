"""The delivery engine: claims due recipients, groups them by destination, runs one attempt per group through a
transport, and records every outcome (plus the notices it causes) in one queue transaction per message.

The queue side decides everything about time: a deferred recipient's next attempt comes from the retry
schedule; a deferred recipient past the queue lifetime fails as expired (4.4.7); a delay notice goes out once.
Hand-off: ``offer()`` (the queue's ``on_accepted`` hook) starts a just-committed message at once, with its
inline body, without reading back from the queue what the session just wrote: no queue scan, no body read,
no thread hand-off per message. When the engine is full (``max_inflight``) it only wakes the scheduler.

Wake-ups: ``wake()`` makes the scheduler look at the queue at once; a timer set to the next due time backs
it up, so a lost wake-up only costs latency, never mail. A finished attempt wakes the scheduler only when it
may have changed what is due (room freed at capacity, recipients left deferred, an error), so the common
case, a message delivered at the first try, costs no queue scan at all.

One message is never in two attempts at once: ``_inflight`` holds every message being attempted, a scan
skips them, and a message that finished while a scan was reading (the scan's snapshot may predate its
record) is dropped from that scan's results.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import ipaddress
import logging
import random
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

from ..dns import DnsPermanentError, DnsTemporaryError, Resolver
from ..envelope import Envelope
from ..queue.backend import QueueBackend
from ..queue.faults import crash_point
from ..queue.model import (
    QueuedMessage,
    RcptStatus,
    RecipientState,
    mark_deferred,
    mark_delivered,
    mark_failed,
)
from ..queue.schedule import RetryPolicy, next_attempt_time, should_warn
from ..reply import Reply
from ..routing.router import Route, Router
from .bounce import NoticeItem, Notifier
from .mx import MxFailure, plan_mx
from .throttle import Throttle
from .transport import Candidate, CanonicalBody, Destination, Outcome, OutcomeKind, Transport

if TYPE_CHECKING:
    from ..signing.outbound import OutboundSigner

__all__ = ["DeliveryEngine"]

log = logging.getLogger("mailhop.delivery")
_OPEN = (RcptStatus.PENDING, RcptStatus.DEFERRED)
_IDLE_WAIT = 60.0  # longest sleep between looks at the queue when nothing is known to be due


@dataclass(frozen=True, slots=True)
class _Handed:
    """An inline body handed over with its message at accept (``offer``)."""

    data: bytes
    canonical: bool  # its writer checked it has CRLF line ends only


@dataclass(frozen=True, slots=True)
class _Group:
    key: str
    route: Route
    domain: str
    recipients: tuple[RecipientState, ...]


class DeliveryEngine:
    """Runs until ``stop()``; one instance per queue."""

    def __init__(
        self,
        queue: QueueBackend,
        router: Router,
        resolver: Resolver,
        transport: Transport,
        notifier: Notifier,
        *,
        policy: RetryPolicy | None = None,
        mx_port: int = 25,
        local_endpoints: Collection[tuple[str, int]] = (),
        max_connections: int = 100,
        max_per_destination: int = 10,
        batch_size: int = 200,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        signer: OutboundSigner | None = None,
    ) -> None:
        self.signer = signer  # DKIM-signs trusted outgoing mail (None: no [[dkim.sign]])
        self.queue = queue
        self.router = router
        self.resolver = resolver
        self.transport = transport
        self.notifier = notifier
        self.policy = policy or RetryPolicy()
        self.mx_port = mx_port
        self.local_endpoints = tuple(local_endpoints)
        self.throttle = Throttle(max_connections, max_per_destination)
        self.batch_size = batch_size
        self.max_inflight = max(batch_size, max_connections * 2)
        self.clock = clock
        self.rng = rng or random.Random()
        self._wake = asyncio.Event()
        self._stopping = False
        self._inflight: dict[str, asyncio.Task[bool]] = {}
        self._finished_while_reading: set[str] | None = None  # a scan is reading: who finished meanwhile
        self._saturated = False  # a scan left due messages behind for lack of room
        self.attempts = 0  # counters for tests and metrics
        self.recorded = 0

    def wake(self) -> None:
        """A hint that new mail is queued (or something changed): look at the queue now."""
        self._wake.set()

    async def run(self) -> None:
        """Schedule deliveries until ``stop()``."""
        while not self._stopping:
            self._wake.clear()
            room = self.max_inflight - len(self._inflight)
            messages: list[QueuedMessage] = []
            if room > 0:
                self._finished_while_reading = set()
                try:
                    messages = await self.queue.due(limit=min(room, self.batch_size), exclude=set(self._inflight))
                except Exception:
                    log.exception("delivery: cannot read the queue")
                finished, self._finished_while_reading = self._finished_while_reading, None
                if finished:  # their records may have been committed after the scan's snapshot
                    messages = [m for m in messages if m.id not in finished]
            else:
                self._saturated = True
            for message in messages:
                if message.id not in self._inflight:  # offered while the scan was reading
                    self._start(message, None)
            if messages and len(messages) >= min(room, self.batch_size):
                await asyncio.sleep(0)  # more may be due: look again after letting the new tasks start
                continue
            await self._sleep()

    async def _sleep(self) -> None:
        timeout = _IDLE_WAIT
        try:
            next_due = await self.queue.next_due()
        except Exception:
            next_due = None
        if next_due is not None:
            # A due message already in flight shows up here too; its task's completion wakes us.
            timeout = min(max(next_due - self.clock(), 0.0), _IDLE_WAIT)
            if timeout == 0.0:
                # Due but not handed out (in flight, or unreadable): completion of a task wakes us.
                timeout = _IDLE_WAIT if self._inflight else 1.0
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    def offer(self, message: QueuedMessage, body: bytes | None, canonical: bool = False) -> None:
        """A message just committed: attempt it now (``body``: its inline body, None to read it from the queue;
        ``canonical``: its writer checked it has CRLF line ends only), or leave it to the scheduler when full,
        stopping, held or already in flight."""
        if (self._stopping or message.held or message.id in self._inflight
                or len(self._inflight) >= self.max_inflight):
            self.wake()
            return
        self._start(message, None if body is None else _Handed(body, canonical))

    def _start(self, message: QueuedMessage, body: _Handed | None) -> None:
        task = asyncio.get_running_loop().create_task(self._process(message, body))
        self._inflight[message.id] = task
        task.add_done_callback(functools.partial(self._done, message.id))

    def _done(self, queue_id: str, task: asyncio.Task[bool]) -> None:
        self._inflight.pop(queue_id, None)
        if self._finished_while_reading is not None:
            self._finished_while_reading.add(queue_id)
        settled = not task.cancelled() and task.exception() is None and task.result()
        if not settled or self._saturated:
            # Something may be due that the scheduler does not know of: a deferral, an error (retried by
            # the scan's timer), or room for messages the scan had to leave behind.
            self._saturated = False
            self._wake.set()

    async def stop(self, grace: float = 10.0) -> None:
        """Stop scheduling; let attempts in flight finish within ``grace``, then cancel them (nothing recorded:
        they are simply tried again after the restart)."""
        self._stopping = True
        self._wake.set()
        tasks = list(self._inflight.values())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)

    # -- one message ------------------------------------------------------------------------------------------------
    async def _process(self, message: QueuedMessage, body: _Handed | None) -> bool:
        """Whether the message is settled: every recipient attempted is now final."""
        try:
            return await self._deliver_message(message, body)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("delivery of %s failed unexpectedly; it stays queued", message.id)
            return False

    async def _deliver_message(self, message: QueuedMessage, body: _Handed | None) -> bool:
        now = self.clock()
        due = [r for r in message.recipients if r.status in _OPEN and r.next_attempt <= now]
        if not due:
            return False  # not due after all (e.g. a recipient deferred since): let the scheduler look
        groups = self._group(due)
        if len(groups) == 1:
            outcomes = await self._attempt(message, groups[0], body)
            self.attempts += 1
            crash_point("after_delivery_before_record")
            await self._record(message, due, outcomes)
            return all(o.kind is not OutcomeKind.DEFERRED for o in outcomes)
        # Several destinations at once: a recipient a fast destination accepted is recorded as soon as it
        # is, not when the slowest sibling finishes (up to the data timeout): a crash or a shutdown in between
        # would send it again. Failures and deferrals are recorded together at the end, so the sender gets one
        # notice for the message, not one per destination.
        by_idx = {r.idx: r for r in due}

        async def attempt(group: _Group) -> list[Outcome]:
            outcomes = await self._attempt(message, group, body)
            delivered = [o for o in outcomes if o.kind is OutcomeKind.DELIVERED]
            if delivered:
                crash_point("after_delivery_before_record")
                await self._record(message, [by_idx[o.idx] for o in delivered], delivered)
            return [o for o in outcomes if o.kind is not OutcomeKind.DELIVERED]

        results = await asyncio.gather(*(attempt(g) for g in groups))
        self.attempts += 1
        rest = [o for group_outcomes in results for o in group_outcomes]
        if rest:
            crash_point("after_delivery_before_record")
            await self._record(message, [by_idx[o.idx] for o in rest], rest)
        return all(o.kind is not OutcomeKind.DEFERRED for o in rest)

    def _group(self, recipients: Sequence[RecipientState]) -> list[_Group]:
        buckets: dict[tuple[str, str], list[RecipientState]] = defaultdict(list)
        routes: dict[tuple[str, str], Route] = {}
        for rcpt in recipients:
            route = self.router.route(rcpt.domain)
            key = (f"mx:{rcpt.domain}", rcpt.domain) if route.is_mx else (route.key, "")
            buckets[key].append(rcpt)
            routes[key] = route
        return [_Group(k[0], routes[k], k[1], tuple(v)) for k, v in buckets.items()]

    async def _attempt(self, message: QueuedMessage, group: _Group, body: _Handed | None) -> list[Outcome]:
        destination = await self._destination(group)
        if isinstance(destination, Reply):
            kind = OutcomeKind.FAILED if destination.is_permanent else OutcomeKind.DEFERRED
            return [Outcome(r.idx, kind, destination) for r in group.recipients]

        async def open_body() -> BinaryIO:
            if body is not None:  # handed over with the message: a reader per transaction (BytesIO shares the bytes)
                return CanonicalBody(body.data) if body.canonical else io.BytesIO(body.data)
            return await self.queue.open_body(message.id)

        opener = open_body if self.signer is None else await self.signer.open_signed(message, open_body)

        async with self.throttle.slot(destination.key):
            try:
                outcomes = await self.transport.deliver(destination, message, group.recipients, opener)
            except Exception as exc:
                log.exception("transport error delivering %s to %s", message.id, destination.key)
                reply = Reply(451, "4.3.0", f"Local error in delivery: {type(exc).__name__}")
                return [Outcome(r.idx, OutcomeKind.DEFERRED, reply) for r in group.recipients]
        given = {r.idx for r in group.recipients}
        got = {o.idx for o in outcomes}
        if got != given:  # a transport bug must not lose or invent recipients
            log.error("transport returned outcomes for %s, expected %s", sorted(got), sorted(given))
            reply = Reply(451, "4.3.0", "Local error in delivery")
            outcomes = [o for o in outcomes if o.idx in given] + [
                Outcome(i, OutcomeKind.DEFERRED, reply) for i in given - got
            ]
        return outcomes

    async def _destination(self, group: _Group) -> Destination | Reply:
        route = group.route
        if route.is_mx:
            plan = await plan_mx(self.resolver, group.domain, port=self.mx_port,
                                 local_endpoints=self.local_endpoints, rng=self.rng)
            if isinstance(plan, MxFailure):
                return plan.reply
            candidates = tuple(Candidate(h.name, a, self.mx_port) for h in plan.hosts for a in h.addresses)
            return Destination(group.key, candidates, tls=route.tls)
        assert route.host is not None
        try:
            addresses = [route.host] if _is_ip(route.host) else await self.resolver.addresses(route.host)
        except DnsPermanentError:
            return Reply(451, "4.4.4", f"Smarthost {route.host} does not resolve")
        except DnsTemporaryError:
            return Reply(451, "4.4.3", f"Temporary DNS failure resolving smarthost {route.host}")
        if not addresses:
            return Reply(451, "4.4.4", f"Smarthost {route.host} has no address")
        candidates = tuple(Candidate(route.host, a, route.port) for a in addresses)
        return Destination(group.key, candidates, tls=route.tls, implicit_tls=route.implicit_tls,
                           username=route.username, password=route.password)

    # -- outcomes -> states and notices ---------------------------------------------------------------------------
    async def _record(self, message: QueuedMessage, due: Sequence[RecipientState], outcomes: Sequence[Outcome]) -> None:
        now = self.clock()
        by_idx = {o.idx: o for o in outcomes}
        updates: list[RecipientState] = []
        failed: list[NoticeItem] = []
        relayed: list[NoticeItem] = []
        deferred: list[tuple[RecipientState, Outcome]] = []
        for rcpt in due:
            outcome = by_idx[rcpt.idx]
            text = str(outcome.reply)
            if outcome.kind is OutcomeKind.DELIVERED:
                updates.append(mark_delivered(rcpt, text, now=now))
                log.info("delivered id=%s to=<%s> relay=%s reply=%s", message.id, rcpt.address,
                         outcome.remote_host or "-", text)
                if "SUCCESS" in rcpt.notify and not outcome.dsn_passed_on:
                    relayed.append(NoticeItem(rcpt, "relayed", outcome.reply.enhanced or "2.0.0", text,
                                              outcome.remote_host))
            elif outcome.kind is OutcomeKind.FAILED:
                updates.append(mark_failed(rcpt, text, now=now))
                log.info("failed id=%s to=<%s> reply=%s", message.id, rcpt.address, text)
                failed.append(NoticeItem(rcpt, "failed", outcome.reply.enhanced or "5.0.0", text, outcome.remote_host))
            else:
                when = next_attempt_time(self.policy, attempts=rcpt.attempts + 1, received_at=message.received_at,
                                         now=now, rng=self.rng)
                if when is None:
                    expired = Reply(outcome.reply.code if outcome.reply.code >= 400 else 451, "4.4.7",
                                    f"Message expired after {self.policy.lifetime / 86400:g} days; last: {text}")
                    updates.append(mark_failed(rcpt, str(expired), now=now))
                    log.info("expired id=%s to=<%s> last=%s", message.id, rcpt.address, text)
                    failed.append(NoticeItem(rcpt, "failed", "4.4.7", text, outcome.remote_host))
                else:
                    state = mark_deferred(rcpt, text, when, now=now)
                    updates.append(state)
                    deferred.append((state, outcome))
                    log.info("deferred id=%s to=<%s> reply=%s next=%.0fs", message.id, rcpt.address, text, when - now)
        warn = bool(deferred) and should_warn(self.policy, received_at=message.received_at, now=now,
                                              already_warned=message.warned)
        delayed = [
            NoticeItem(state, "delayed", o.reply.enhanced or "4.0.0", str(o.reply), o.remote_host,
                       will_retry_until=message.received_at + self.policy.lifetime)
            for state, o in deferred
        ] if warn else []
        notices: list[tuple[Envelope, bytes]] = []
        for items in (failed, delayed, relayed):
            if items:
                notices += await self._build_notices(message, items, now)
        await self.queue.record(message.id, updates, notices=notices, warned=warn)
        self.recorded += 1
        if notices:
            self.wake()  # queued by the record, not through accept: only a scan finds them

    async def _build_notices(
        self, message: QueuedMessage, items: list[NoticeItem], now: float
    ) -> list[tuple[Envelope, bytes]]:
        original = await self.queue.open_body(message.id)
        try:
            # Reading and encoding a large original takes a while: keep it off the event loop.
            return await asyncio.to_thread(self.notifier.build, message, items, original, now=now)
        finally:
            original.close()


@functools.lru_cache(maxsize=256)  # the same few smarthost names, once per attempt: parsing showed in profiles
def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
