"""``mailhop queue ...``: inspect and change the queue while the daemon runs (it reads the same backend)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from ..queue.model import QueuedMessage
from ..queue.sqlite import SqliteQueue
from ..workers import shard_paths
from .common import config_option, read_config

__all__ = ["queue"]

T = TypeVar("T")


def _each(config_path: Path, action: Callable[[SqliteQueue], Awaitable[T]]) -> list[T]:
    """``action``'s answer for every spool shard (one, unless ``workers > 1``: see mailhop.workers), in order."""
    config = read_config(config_path)

    async def go() -> list[T]:
        out = []
        for path in shard_paths(config.queue.path, config.workers):
            if path != config.queue.path and not (path / "queue.db").exists():
                continue
            backend = SqliteQueue(path, inline_max=config.queue.inline_body_max,
                                  page_size=config.queue.page_size)
            await backend.start(recover=False)
            try:
                out.append(await action(backend))
            finally:
                await backend.stop()
        return out

    return asyncio.run(go())


def _merged(per_shard: list[list[QueuedMessage]], limit: int | None = None) -> list[QueuedMessage]:
    """Messages of every shard in id (arrival) order."""
    return sorted((m for shard in per_shard for m in shard), key=lambda m: m.id)[:limit]


def _found(per_shard: list[tuple[QueuedMessage | None, bytes]]) -> tuple[QueuedMessage | None, bytes]:
    """The shard's answer that has the message (ids are unique across shards)."""
    return next((r for r in per_shard if r[0] is not None), (None, b""))


def _any(per_shard: list[list[bool]]) -> list[bool]:
    """Per id: done on some shard."""
    return [any(col) for col in zip(*per_shard, strict=True)]


def _ts(value: float) -> str:
    return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def _as_dict(msg: QueuedMessage) -> dict[str, Any]:
    return {
        "id": msg.id,
        "sender": msg.sender,
        "size": msg.size,
        "received_at": msg.received_at,
        "held": msg.held,
        "hold_reason": msg.hold_reason,
        "client_ip": msg.client_ip,
        "helo": msg.helo,
        "ret": msg.params.ret,
        "envid": msg.params.envid,
        "smtputf8": msg.params.smtputf8,
        "body_type": msg.params.body,
        "recipients": [
            {
                "address": r.address,
                "status": str(r.status),
                "attempts": r.attempts,
                "last_reply": r.last_reply,
                "next_attempt": r.next_attempt,
                "notify": list(r.notify),
                "orcpt": r.orcpt,
            }
            for r in msg.recipients
        ],
    }


@click.group()
def queue() -> None:
    """Inspect and manage the mail queue."""


@queue.command("list")
@config_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per message, one per line.")
@click.option("--domain", default=None, help="Only messages with a recipient in this domain.")
@click.option("--limit", type=int, default=None, help="At most this many messages.")
def list_cmd(config_path: Path, as_json: bool, domain: str | None, limit: int | None) -> None:
    """List queued messages, oldest first."""
    messages = _merged(_each(config_path, lambda b: b.list(domain=domain, limit=limit)), limit)
    _print_list(messages, as_json, "state", _state, "message(s)")


def _state(msg: QueuedMessage) -> str:
    return "held" if msg.held else ",".join(sorted({str(r.status) for r in msg.recipients}))


def _print_list(messages: list[QueuedMessage], as_json: bool, last: str, column: Callable[[QueuedMessage], str],
                counted: str) -> None:
    """One JSON object per line, or a table whose last column is ``last`` (``column(msg)``) and a count."""
    if as_json:
        for msg in messages:
            click.echo(json.dumps(_as_dict(msg), separators=(",", ":")))
        return
    table = Table("id", "received", "size", "sender", "recipients", last)
    for msg in messages:
        rcpts = ", ".join(r.address for r in msg.recipients[:3]) + (" ..." if len(msg.recipients) > 3 else "")
        table.add_row(msg.id, _ts(msg.received_at), str(msg.size), msg.sender or "<>", rcpts, column(msg))
    Console().print(table)
    click.echo(f"{len(messages)} {counted}")


def _print_show(msg: QueuedMessage, data: bytes, body: bool) -> None:
    """The envelope as indented JSON and, with ``body``, a blank line and the stored message."""
    click.echo(json.dumps(_as_dict(msg), indent=2))
    if body:
        click.echo("")
        sys.stdout.flush()
        sys.stdout.buffer.write(data)


@queue.command("show")
@config_option
@click.argument("queue_id")
@click.option("--body", is_flag=True, help="Print the stored message (headers and body) too.")
def show_cmd(config_path: Path, queue_id: str, body: bool) -> None:
    """Show one message's envelope and per-recipient state."""

    async def action(b: SqliteQueue) -> tuple[QueuedMessage | None, bytes]:
        msg = await b.get(queue_id)
        data = b""
        if msg is not None and body:
            with await b.open_body(queue_id) as fh:
                data = fh.read()
        return msg, data

    msg, data = _found(_each(config_path, action))
    if msg is None:
        click.echo(f"mailhop: no message {queue_id}", err=True)
        sys.exit(1)
    _print_show(msg, data, body)


def _simple(name: str, verb: str, done: str, help_text: str) -> None:
    @queue.command(name, help=help_text)
    @config_option
    @click.argument("queue_ids", nargs=-1, required=True)
    def cmd(config_path: Path, queue_ids: tuple[str, ...]) -> None:
        async def action(b: SqliteQueue) -> list[bool]:
            method = getattr(b, verb)
            done = [await method(qid) for qid in queue_ids]
            if verb == "release" and any(done):
                _poke_daemon(b)
            return done

        results = _any(_each(config_path, action))
        failed = 0
        for qid, ok in zip(queue_ids, results, strict=True):
            click.echo(f"{qid}: {done}" if ok else f"{qid}: not found")
            failed += not ok
        sys.exit(1 if failed else 0)


_simple("delete", "delete", "deleted", "Delete messages from the queue (no bounce is sent).")
_simple("hold", "hold", "held", "Hold messages: they stay queued but are not delivered until released.")
_simple("release", "release", "released", "Release held messages back to delivery.")


@queue.command("flush")
@config_option
def flush_cmd(config_path: Path) -> None:
    """Make every deferred recipient due now (like postqueue -f)."""
    async def action(b: SqliteQueue) -> tuple[int, bool]:
        return await b.flush(), _poke_daemon(b)

    per_shard = _each(config_path, action)
    count, woke = sum(c for c, _ in per_shard), any(w for _, w in per_shard)
    click.echo(f"{count} recipient(s) scheduled for immediate delivery"
               + ("" if woke else " (no daemon is running: they go when it starts)"))


def _poke_daemon(backend: SqliteQueue) -> bool:
    """Wake a running daemon's delivery engine (SIGUSR1), so flush and release act now, like postqueue -f."""
    pid = backend.daemon_pid()
    if pid is None:
        return False
    try:
        os.kill(pid, signal.SIGUSR1)
    except OSError:
        return False
    return True
