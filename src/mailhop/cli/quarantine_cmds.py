"""``mailhop quarantine ...``: messages a policy check held (reason "quarantine: ..."), listed, shown, released
or deleted. Quarantined messages are held messages in the queue: nothing is delivered until an operator acts."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..queue.model import QueuedMessage
from ..queue.sqlite import SqliteQueue
from .common import config_option
from .queue_cmds import _any, _each, _found, _merged, _poke_daemon, _print_list, _print_show

__all__ = ["quarantine"]

PREFIX = "quarantine:"


def _quarantined(msg: QueuedMessage | None) -> bool:
    return msg is not None and msg.held and msg.hold_reason.startswith(PREFIX)


@click.group()
def quarantine() -> None:
    """Messages held by a policy check (spam, DMARC, a milter or rspamd said so)."""


@quarantine.command("list")
@config_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per message, one per line.")
@click.option("--limit", type=int, default=None, help="At most this many messages.")
def list_cmd(config_path: Path, as_json: bool, limit: int | None) -> None:
    """List quarantined messages, oldest first, with the reason."""

    async def action(b: SqliteQueue) -> list[QueuedMessage]:
        return [m for m in await b.list(held=True) if _quarantined(m)][:limit]

    messages = _merged(_each(config_path, action), limit)
    _print_list(messages, as_json, "reason", lambda m: m.hold_reason[len(PREFIX):].strip(),
                "message(s) in quarantine")


@quarantine.command("show")
@config_option
@click.argument("queue_id")
@click.option("--body", is_flag=True, help="Print the stored message too.")
def show_cmd(config_path: Path, queue_id: str, body: bool) -> None:
    """Show one quarantined message (envelope, reason and, with --body, the message)."""

    async def action(b: SqliteQueue) -> tuple[QueuedMessage | None, bytes]:
        msg = await b.get(queue_id)
        if not _quarantined(msg) or not body:
            return msg, b""
        with await b.open_body(queue_id) as fh:
            return msg, fh.read()

    msg, data = _found(_each(config_path, action))
    if msg is None or not _quarantined(msg):
        click.echo(f"mailhop: no quarantined message {queue_id}", err=True)
        sys.exit(1)
    _print_show(msg, data, body)


def _act(verb: str, done: str, help_text: str) -> None:
    @quarantine.command(verb, help=help_text)
    @config_option
    @click.argument("queue_ids", nargs=-1, required=True)
    def cmd(config_path: Path, queue_ids: tuple[str, ...]) -> None:
        async def action(b: SqliteQueue) -> list[bool]:
            out = []
            for qid in queue_ids:
                # Only quarantined messages: an admin hold is released with `mailhop queue release`.
                if not _quarantined(await b.get(qid)):
                    out.append(False)
                    continue
                out.append(await (b.release(qid) if verb == "release" else b.delete(qid)))
            if verb == "release" and any(out):
                _poke_daemon(b)
            return out

        results = _any(_each(config_path, action))
        for qid, ok in zip(queue_ids, results, strict=True):
            click.echo(f"{qid}: {done}" if ok else f"{qid}: not in quarantine")
        sys.exit(0 if all(results) else 1)


_act("release", "released for delivery", "Release quarantined messages: they are delivered as normal.")
_act("delete", "deleted", "Delete quarantined messages (no bounce is sent).")
