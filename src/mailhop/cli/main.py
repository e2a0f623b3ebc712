"""``mailhop``: serve, check-config, queue administration."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import click

from ..checks.registry import CheckError, load_callable
from ..signing.keys import load_private_key
from .common import config_option, read_config
from .dkim_cmds import dkim
from .quarantine_cmds import quarantine
from .queue_cmds import queue
from .tls_cmds import tls
from .users_cmds import users

__all__ = ["main"]

@click.group()
@click.version_option(package_name="mailhop")
def main() -> None:
    """mailhop: a durable SMTP relay."""


@main.command()
@config_option
@click.option(
    "--loop",
    type=click.Choice(["auto", "asyncio", "uvloop"]),
    default="auto",
    show_default=True,
    help="Event loop: uvloop when installed (auto), or the standard one.",
)
@click.option("--worker", type=int, default=None, hidden=True, help="Internal: run as worker N of [workers].")
def serve(config_path: Path, loop: str, worker: int | None) -> None:
    """Run the relay in the foreground, logging to stderr. SIGTERM finishes in-flight transactions and exits 0."""
    from ..daemon import Daemon
    from ..observability import setup_logging
    from ..workers import Supervisor, stranded_shards

    config = read_config(config_path)
    setup_logging(config.log.level)
    if worker is None:
        stranded = stranded_shards(config.queue.path, config.workers)
        if stranded:
            click.echo(f"mailhop: configuration error\n{config_path}: workers = {config.workers}, but spool shards "
                       f"{', '.join(str(p) for p in stranded)} still hold mail that no worker would deliver; "
                       "raise workers until they are drained", err=True)
            sys.exit(78)
        if config.workers > 1:
            sys.exit(Supervisor(config_path, config.workers, loop).run())
    elif not 0 <= worker < config.workers:
        raise click.BadParameter(f"--worker must be below workers = {config.workers}")
    use_uvloop = False
    if loop in ("auto", "uvloop"):
        try:
            import uvloop

            use_uvloop = True
        except ImportError:
            if loop == "uvloop":
                raise click.ClickException("uvloop is not installed; pip install 'mailhop[fast]'") from None
    if use_uvloop:
        import uvloop

        uvloop.run(Daemon(config, worker=worker).run())
    else:
        asyncio.run(Daemon(config, worker=worker).run())


@main.command("check-config")
@config_option
def check_config(config_path: Path) -> None:
    """Validate the configuration; exit 0 when valid, 78 with each offending key named otherwise."""
    config = read_config(config_path)
    problems = []
    for i, cc in enumerate(config.checks.custom):
        try:
            load_callable(cc.callable)
        except CheckError as exc:
            problems.append(f"checks.custom[{i}].callable: {exc}")
    for i, entry in enumerate(config.dkim.sign):
        try:
            load_private_key(entry.key_file)
        except (OSError, ValueError) as exc:
            problems.append(f"dkim.sign[{i}].key_file: {exc}")
    if problems:
        for line in problems:
            click.echo(f"{config_path}: {line}", err=True)
        sys.exit(78)
    listeners = ", ".join(f"{lc.address} ({lc.role})" for lc in config.listener)
    click.echo(f"{config_path}: OK")
    click.echo(f"  hostname: {config.hostname}")
    click.echo(f"  listeners: {listeners}")
    click.echo(f"  spool: {config.queue.path}")
    click.echo(f"  served domains: {', '.join(config.relay.domains) or '(none)'}")
    click.echo(f"  trusted networks: {', '.join(config.relay.trusted_networks) or '(none)'}")
    for lc in config.listener:
        click.echo(f"  checks on {lc.address}: {', '.join(config.listener_checks(lc)) or '(none)'}")


@main.command("config-reference")
def config_reference() -> None:
    """Print the configuration reference (Markdown) generated from the schema."""
    from ..config.reference import render_reference

    click.echo(render_reference(), nl=False)


@main.command(
    "sendmail",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def sendmail_cmd(args: tuple[str, ...]) -> None:
    """sendmail-compatible submission: [-t] [-i|-oi] [-f sender] [-F name] [-C config] [recipients...]."""
    import sys

    from .sendmail import run

    sys.exit(run(list(args), sys.stdin.buffer, config_path=None))


main.add_command(queue)
main.add_command(quarantine)
main.add_command(dkim)
main.add_command(users)
main.add_command(tls)
