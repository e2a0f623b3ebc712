"""``mailhop tls ...``: certificate helpers. ``self-signed`` makes a key and certificate for a first run or tests.

Exit codes: 0 done, 1 a file exists (use --force), 64 usage error (bad host name or --days), 73 cannot write.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .users_cmds import EX_USAGE, UsageExitGroup

__all__ = ["tls"]

EX_CANTCREAT = 73


@click.group(cls=UsageExitGroup)
def tls() -> None:
    """TLS certificate helpers."""


@tls.command("self-signed")
@click.option("--hostname", required=True, help="Host name (or IP address) the certificate is for.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory to write cert.pem and key.pem (mode 0600) into; created if missing.")
@click.option("--days", type=click.IntRange(1, 36500), default=365, show_default=True, help="Validity in days.")
@click.option("--force", is_flag=True, help="Replace existing cert.pem/key.pem.")
def self_signed_cmd(hostname: str, out_dir: Path, days: int, force: bool) -> None:
    """Write a self-signed ECDSA P-256 certificate and key for HOSTNAME (not trusted by other servers)."""
    from ..tlsutil import cert_fingerprint, make_self_signed  # imports cryptography: only when used

    try:
        cert_path, key_path = make_self_signed(hostname, out_dir, days=days, force=force)
    except FileExistsError as exc:
        click.echo(f"mailhop: {exc}", err=True)
        sys.exit(1)
    except ValueError as exc:
        click.echo(f"mailhop: {exc}", err=True)
        sys.exit(EX_USAGE)
    except OSError as exc:
        click.echo(f"mailhop: cannot write the certificate: {exc}", err=True)
        sys.exit(EX_CANTCREAT)
    click.echo(f"certificate: {cert_path}")
    click.echo(f"key:         {key_path} (mode 0600)")
    click.echo(f"SHA-256 fingerprint: {cert_fingerprint(cert_path)}")
