"""``mailhop users ...``: manage SMTP AUTH users in ``<spool>/users.db``; a running daemon sees changes at once.

Exit codes: 0 done, 1 no such user / user already exists, 64 usage error (bad option, name, address,
password or limit), 74 the user database cannot be read or written, 78 configuration error.
"""

from __future__ import annotations

import json
import sqlite3
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from rich.console import Console
from rich.table import Table

from ..auth.users import User, UserExistsError, UserNotFoundError, UserStore, UserStoreError, normalize_name
from .common import config_option, read_config

__all__ = ["EX_IOERR", "EX_USAGE", "UsageExitGroup", "users"]

EX_USAGE = 64
EX_IOERR = 74
T = TypeVar("T")


class UsageExitGroup(click.Group):
    """A group whose usage errors exit 64 (EX_USAGE) instead of click's 2: bad options or arguments of the
    group or any of its commands, unknown commands, and ``click.UsageError`` raised by a command itself."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            _usage_exit(exc)
            raise

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            _usage_exit(exc)
            raise


def _usage_exit(exc: click.UsageError) -> None:
    # exit_code is declared a ClassVar, but click reads it from the instance: keep the subclass (and its
    # message formatting, e.g. BadParameter's) and change only the status.
    setattr(exc, "exit_code", EX_USAGE)  # noqa: B010


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"mailhop: {message}", err=True)
    sys.exit(code)


@contextmanager
def _store(config_path: Path) -> Iterator[UserStore]:
    config = read_config(config_path)
    store = UserStore.for_spool(config.queue.path)
    try:
        yield store
    except (UserExistsError, UserNotFoundError) as exc:
        _fail(str(exc), 1)
    except ValueError as exc:
        _fail(str(exc), EX_USAGE)
    except (UserStoreError, sqlite3.Error, OSError) as exc:
        _fail(f"user database {store.path}: {exc}", EX_IOERR)
    finally:
        store.close()


def _run(config_path: Path, action: Callable[[UserStore], T]) -> T:
    with _store(config_path) as store:
        return action(store)
    raise AssertionError("unreachable")  # pragma: no cover  (_store exits on every error)


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        text = sys.stdin.read()
        # One trailing line ending is the terminator of `echo pw |`, not part of the password.
        if text.endswith("\r\n"):
            text = text[:-2]
        elif text.endswith("\n"):
            text = text[:-1]
        if not text:
            _fail("no password on standard input", EX_USAGE)
        return text
    return str(click.prompt("Password", hide_input=True, confirmation_prompt=True))


def _as_dict(user: User) -> dict[str, Any]:
    return {
        "name": user.name,
        "addresses": list(user.addresses),
        "max_messages_per_hour": user.max_messages_per_hour,
        "max_recipients_per_message": user.max_recipients_per_message,
        "disabled": user.disabled,
        "created": user.created,
        "updated": user.updated,
    }


_password_stdin = click.option(
    "--password-stdin", is_flag=True, help="Read the password from standard input (one line) instead of prompting."
)
_positive = click.IntRange(min=1)


@click.group(cls=UsageExitGroup)
def users() -> None:
    """Manage SMTP AUTH users (stored in <spool>/users.db; a running daemon sees changes at once)."""


@users.command("add")
@config_option
@click.argument("name")
@click.option("--address", "addresses", multiple=True, metavar="ADDR",
              help="A sender address the user may use: user@domain, or @domain for a whole domain. Repeatable.")
@click.option("--max-messages-per-hour", type=_positive, default=None, help="Messages per hour (default: no limit).")
@click.option("--max-recipients", type=_positive, default=None, help="Recipients per message (default: no limit).")
@_password_stdin
def add_cmd(
    config_path: Path,
    name: str,
    addresses: tuple[str, ...],
    max_messages_per_hour: int | None,
    max_recipients: int | None,
    password_stdin: bool,
) -> None:
    """Add a user. Without --address the user may authenticate but send as no address."""
    with _store(config_path) as store:
        key = normalize_name(name)
        if store.get(key) is not None:  # before asking for a password that would be thrown away
            raise UserExistsError(f"user {key!r} already exists")
        password = _read_password(password_stdin)
        user = store.add(
            name,
            password,
            addresses,
            max_messages_per_hour=max_messages_per_hour,
            max_recipients_per_message=max_recipients,
        )
    click.echo(f"{user.name}: added")


@users.command("passwd")
@config_option
@click.argument("name")
@_password_stdin
def passwd_cmd(config_path: Path, name: str, password_stdin: bool) -> None:
    """Change a user's password."""
    with _store(config_path) as store:
        key = normalize_name(name)
        user = store.get(key)
        if user is None:
            raise UserNotFoundError(f"no user {key!r}")
        store.set_password(user.name, _read_password(password_stdin))
    click.echo(f"{user.name}: password changed")


@users.command("remove")
@config_option
@click.argument("name")
def remove_cmd(config_path: Path, name: str) -> None:
    """Remove a user."""
    _run(config_path, lambda s: s.remove(name))
    click.echo(f"{normalize_name(name)}: removed")


@users.command("list")
@config_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per user, one per line.")
def list_cmd(config_path: Path, as_json: bool) -> None:
    """List users (never their passwords)."""
    all_users = _run(config_path, lambda s: s.list())
    if as_json:
        for user in all_users:
            click.echo(json.dumps(_as_dict(user), separators=(",", ":")))
        return
    table = Table()
    table.add_column("name", overflow="fold")
    for header in ("msgs/hour", "rcpts/msg", "disabled"):
        table.add_column(header, no_wrap=True)
    table.add_column("addresses", overflow="fold")
    for user in all_users:
        table.add_row(
            user.name,
            "-" if user.max_messages_per_hour is None else str(user.max_messages_per_hour),
            "-" if user.max_recipients_per_message is None else str(user.max_recipients_per_message),
            "yes" if user.disabled else "no",
            "\n".join(user.addresses) or "(none)",
        )
    Console().print(table)
    click.echo(f"{len(all_users)} user(s)")


@users.command("addresses")
@config_option
@click.argument("name")
@click.argument("addresses", nargs=-1, metavar="ADDR...")
@click.option("--clear", is_flag=True, help="Remove every address (the user may then send as nothing).")
def addresses_cmd(config_path: Path, name: str, addresses: tuple[str, ...], clear: bool) -> None:
    """Replace a user's sender addresses (user@domain, or @domain for a whole domain)."""
    if bool(addresses) == clear:
        raise click.UsageError("give the new addresses, or --clear (not both)")
    user = _run(config_path, lambda s: s.set_addresses(name, addresses))
    click.echo(f"{user.name}: addresses {', '.join(user.addresses) or '(none)'}")


@users.command("limits")
@config_option
@click.argument("name")
@click.option("--max-messages-per-hour", type=_positive, default=None, help="Messages per hour (omit: no limit).")
@click.option("--max-recipients", type=_positive, default=None, help="Recipients per message (omit: no limit).")
def limits_cmd(config_path: Path, name: str, max_messages_per_hour: int | None, max_recipients: int | None) -> None:
    """Set both of a user's limits; an omitted one becomes unlimited."""
    user = _run(
        config_path,
        lambda s: s.set_limits(
            name, max_messages_per_hour=max_messages_per_hour, max_recipients_per_message=max_recipients
        ),
    )
    click.echo(
        f"{user.name}: max messages/hour {user.max_messages_per_hour or '-'},"
        f" max recipients/message {user.max_recipients_per_message or '-'}"
    )


def _toggle(cmd_name: str, disabled: bool, help_text: str) -> None:
    @users.command(cmd_name, help=help_text)
    @config_option
    @click.argument("name")
    def cmd(config_path: Path, name: str) -> None:
        user = _run(config_path, lambda s: s.set_disabled(name, disabled))
        click.echo(f"{user.name}: {cmd_name}d")


_toggle("disable", True, "Disable a user: authentication fails until `enable`.")
_toggle("enable", False, "Enable a disabled user.")
