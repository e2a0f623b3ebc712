"""``mailhop dkim ...``: DKIM signing helpers. ``keygen`` makes a signing key and prints what to publish.

Exit codes: 0 done, 1 the key file exists (use --force), 64 usage error (bad domain, selector, algorithm or
key size), 73 cannot write the key file.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import cast

import click
from pydantic import ValidationError

from .users_cmds import UsageExitGroup

__all__ = ["dkim"]

EX_CANTCREAT = 73


@click.group(cls=UsageExitGroup)
def dkim() -> None:
    """DKIM signing helpers."""


@dkim.command("keygen")
@click.option("--domain", required=True, help="The signing domain (d=), e.g. example.com.")
@click.option("--selector", required=True, help="The selector (s=), e.g. s2026: the key is published at "
              "SELECTOR._domainkey.DOMAIN.")
@click.option("--algorithm", type=click.Choice(["rsa", "ed25519"]), default="rsa", show_default=True,
              help="Key type. Ed25519 (RFC 8463) is not yet verified everywhere: publish an RSA key too.")
@click.option("--bits", type=int, default=2048, show_default=True, help="RSA key size (2048 or more).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("."),
              show_default=True, help="Directory for DOMAIN.SELECTOR.key (mode 0600); created if missing.")
@click.option("--force", is_flag=True, help="Replace an existing key file.")
def keygen_cmd(domain: str, selector: str, algorithm: str, bits: int, out_dir: Path, force: bool) -> None:
    """Write a new DKIM private key and print its DNS TXT record and the [[dkim.sign]] configuration."""
    from ..config.checks import DkimSignConfig  # the same validation as the configuration file
    from ..signing.keys import Algorithm, dns_record, generate_key, write_private_key

    try:
        entry = DkimSignConfig(domain=domain, selector=selector, key_file=Path("unused"))
    except ValidationError as exc:
        problems = "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())
        raise click.UsageError(problems) from None
    try:
        key = generate_key(cast(Algorithm, algorithm), bits)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    path = out_dir / f"{entry.domain}.{entry.selector}.key"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_private_key(path, key, force=force)
    except FileExistsError as exc:
        click.echo(f"mailhop: {exc}", err=True)
        sys.exit(1)
    except OSError as exc:
        click.echo(f"mailhop: cannot write the key: {exc}", err=True)
        sys.exit(EX_CANTCREAT)
    click.echo(f"# private key: {path} (mode 0600)")
    click.echo("# DNS: publish this TXT record (each quoted piece at most 255 octets; resolvers join them):")
    click.echo(dns_record(entry.domain, entry.selector, key))
    click.echo("# mailhop.toml: add")
    click.echo("[[dkim.sign]]")
    click.echo(f'domain = "{entry.domain}"')
    click.echo(f'selector = "{entry.selector}"')
    click.echo(f"key_file = {_toml_string(str(path.resolve()))}")


def _toml_string(text: str) -> str:
    # A literal string needs no escaping unless the path holds a quote or a control character.
    if "'" not in text and text.isprintable():
        return f"'{text}'"
    escaped = "".join(c if c.isprintable() and c not in '"\\' else f"\\u{ord(c):04x}" for c in text)
    return f'"{escaped}"'
