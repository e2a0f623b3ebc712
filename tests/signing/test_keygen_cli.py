"""``mailhop dkim keygen``: the key file (mode 0600, never silently replaced), the printed DNS record (split
into <=255-octet strings, p= matching the key, and, served by a loopback DNS server, verifying mail signed
with the key) and the printed configuration snippet (loads as it is)."""

from __future__ import annotations

import base64
import io
import os
import re
import stat
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from cryptography.hazmat.primitives import serialization

from mailhop.cli.dkim_cmds import dkim
from mailhop.config.checks import DkimConfig
from mailhop.dns import Resolver
from mailhop.signing.dkim import DkimSigner
from mailhop.signing.keys import load_private_key, public_key_b64
from tests.support.dnsserver import TestDns

from . import dkimpy_verify, need_nacl

MESSAGE = b"From: Someone <someone@example.test>\r\nTo: x@elsewhere.test\r\nSubject: keygen\r\n\r\nHello.\r\n"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def zero_umask() -> Iterator[None]:
    """A umask that would leave new files world-readable: the key must be 0600 anyway."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def keygen(*args: str) -> Result:
    return CliRunner().invoke(dkim, ["keygen", *args], catch_exceptions=False)


def record_of(output: str) -> tuple[str, list[str]]:
    """(owner name, character-strings) of the printed TXT record line."""
    [line] = [ln for ln in output.splitlines() if " IN TXT " in ln]
    owner, _, rest = line.partition(" IN TXT ")
    strings = re.findall(r'"([^"]*)"', rest)
    assert rest == " ".join(f'"{s}"' for s in strings), line  # nothing but quoted strings
    return owner, strings


def tag_list(text: str) -> dict[str, str]:
    return {k.strip(): v.strip() for k, _, v in (item.partition("=") for item in text.split(";") if item.strip())}


def snippet_of(output: str) -> DkimConfig:
    """The printed [[dkim.sign]] snippet, read as TOML and validated like the configuration file."""
    start = output.index("[[dkim.sign]]")
    return DkimConfig.model_validate(tomllib.loads(output[start:])["dkim"])


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
def test_keygen_writes_a_0600_key_and_prints_its_record(tmp_path: Path, algorithm: str, zero_umask: None) -> None:
    result = keygen("--domain", "Example.TEST", "--selector", "s2026", "--algorithm", algorithm,
                    "--out", str(tmp_path / "keys"))
    assert result.exit_code == 0, result.output
    path = tmp_path / "keys" / "example.test.s2026.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file left behind
    key = load_private_key(path)
    owner, strings = record_of(result.output)
    assert owner == "s2026._domainkey.example.test."
    assert all(1 <= len(s.encode()) <= 255 for s in strings)
    tags = tag_list("".join(strings))
    assert tags["v"] == "DKIM1" and tags["k"] == algorithm and tags["p"] == public_key_b64(key)
    public = base64.b64decode(tags["p"])
    if algorithm == "rsa":
        assert len(strings) == 2  # 2048-bit: over 255 octets, so split
        loaded = serialization.load_der_public_key(public)
        assert loaded.public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]
    else:
        assert len(strings) == 1 and len(public) == 32
        assert public == key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    [entry] = snippet_of(result.output).sign
    assert (entry.domain, entry.selector, entry.key_file) == ("example.test", "s2026", path.resolve())


def test_keygen_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    args = ["--domain", "example.test", "--selector", "s1", "--algorithm", "ed25519", "--out", str(tmp_path)]
    assert keygen(*args).exit_code == 0
    path = tmp_path / "example.test.s1.key"
    before = path.read_bytes()
    again = keygen(*args)
    assert again.exit_code == 1 and "exists" in again.output and "--force" in again.output
    assert path.read_bytes() == before
    forced = keygen(*args, "--force")
    assert forced.exit_code == 0 and path.read_bytes() != before
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert public_key_b64(load_private_key(path)) in "".join(record_of(forced.output)[1])


@pytest.mark.parametrize("args, message", [
    (["--bits", "1024"], "2048"),
    (["--bits", "16384"], "8192"),
    (["--domain", "not a domain"], "not a domain"),
    (["--selector", "bad_selector"], "not a selector"),
    (["--algorithm", "dsa"], "dsa"),
])
def test_keygen_usage_errors_exit_64_and_write_nothing(tmp_path: Path, args: list[str], message: str) -> None:
    base = {"--domain": "example.test", "--selector": "s1", "--out": str(tmp_path)}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    result = keygen(*(x for kv in base.items() for x in kv))
    assert result.exit_code == 64, result.output
    assert message in result.output
    assert list(tmp_path.iterdir()) == []


def test_keygen_default_out_is_the_current_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = keygen("--domain", "example.test", "--selector", "s1", "--algorithm", "ed25519")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "example.test.s1.key").exists()
    assert snippet_of(result.output).sign[0].key_file == tmp_path.resolve() / "example.test.s1.key"


@pytest.mark.anyio
@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
async def test_printed_record_served_by_dns_verifies_signed_mail(tmp_path: Path, algorithm: str) -> None:
    need_nacl(algorithm)
    result = keygen("--domain", "example.test", "--selector", "sel", "--algorithm", algorithm, "--out",
                    str(tmp_path))
    assert result.exit_code == 0, result.output
    [line] = [ln for ln in result.output.splitlines() if " IN TXT " in ln]
    [entry] = snippet_of(result.output).sign
    signer = DkimSigner(entry)
    header = signer.sign_file(io.BytesIO(MESSAGE))
    assert header is not None
    with TestDns(origins=("test",)) as server:
        server.add(line)  # the printed line, exactly as an operator would paste it into a zone
        resolver = Resolver([server.nameserver], timeout=1.0, lifetime=2.0)
        [txt] = await resolver.txt("sel._domainkey.example.test")
    records = {"sel._domainkey.example.test": txt}
    assert dkimpy_verify(header + MESSAGE, records)
    assert not dkimpy_verify(header + MESSAGE.replace(b"Hello", b"Jello"), records)


def test_real_entry_point(tmp_path: Path) -> None:
    """The installed command line, as an operator runs it (needs the group registered in cli/main.py)."""
    from mailhop.cli.main import main

    if "dkim" not in main.commands:
        reason = "the dkim group is not registered in mailhop.cli.main (main.add_command(dkim))"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    done = subprocess.run(
        [sys.executable, "-m", "mailhop.cli", "dkim", "keygen", "--domain", "example.test", "--selector", "cli",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, check=False)
    assert done.returncode == 0, done.stderr
    path = tmp_path / "example.test.cli.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert tag_list("".join(record_of(done.stdout)[1]))["p"] == public_key_b64(load_private_key(path))
