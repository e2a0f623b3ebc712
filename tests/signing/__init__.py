"""Shared helpers for the DKIM signing tests: keys, the receiver's view of a message, and independent verifiers:
dkimpy in process; OpenDKIM's ``opendkim -t`` (a real program, public keys from a TestPublicKeys file); and
dkimpy's own ``dkimverify`` command, which has no option for a key or a nameserver, so it runs in a private
mount and network namespace whose /etc/resolv.conf points at a loopback TestDns on port 53."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from mailhop.config.checks import DkimSignConfig
from mailhop.signing.keys import Algorithm, SigningKey, dns_txt_value, generate_key, write_private_key
from mailhop.smtp.encode import canonicalize
from tests.conftest import require_program


def make_key(directory: Path, algorithm: Algorithm, name: str | None = None) -> tuple[Path, SigningKey]:
    """A new key written to ``directory`` (RSA-2048 or Ed25519)."""
    key = generate_key(algorithm)
    path = directory / (name or f"{algorithm}.key")
    write_private_key(path, key, force=True)
    return path, key


def sign_config(key_file: Path, domain: str = "example.test", selector: str = "s1", **options: object
                ) -> DkimSignConfig:
    return DkimSignConfig.model_validate({"domain": domain, "selector": selector, "key_file": key_file, **options})


def wire(stored: bytes) -> bytes:
    """The content a receiver gets for ``stored`` (the delivery encoder's line-end rule and final CRLF)."""
    out = canonicalize(stored)
    return out if not out or out.endswith(b"\r\n") else out + b"\r\n"


def need_nacl(algorithm: str) -> None:
    """dkimpy verifies Ed25519 only with PyNaCl: skip without it, but fail under CI."""
    if algorithm != "ed25519":
        return
    try:
        import nacl.signing  # noqa: F401
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("PyNaCl is not installed: dkimpy cannot verify Ed25519 (pip install pynacl)")
        pytest.skip("PyNaCl is not installed: dkimpy cannot verify Ed25519")


def dkimpy_verify(message: bytes, records: dict[str, bytes], index: int = 0) -> bool:
    """dkimpy's verdict on signature ``index``, its DNS answered from ``records`` (name -> TXT text)."""
    import dkim

    def dnsfunc(name: bytes | str, timeout: float = 5) -> bytes:
        text = name.decode("ascii") if isinstance(name, bytes) else name
        return records.get(text.rstrip(".").lower(), b"")

    try:
        return bool(dkim.DKIM(message).verify(idx=index, dnsfunc=dnsfunc))
    except dkim.DKIMException:  # the method raises for some failures (e.g. a body hash mismatch)
        return False


def key_records(*entries: tuple[str, str, SigningKey]) -> dict[str, bytes]:
    """TXT records for (domain, selector, key) triples, as dkimpy_verify wants them."""
    return {f"{s}._domainkey.{d}": dns_txt_value(k).encode("ascii") for d, s, k in entries}


def opendkim_verify(message: bytes, records: dict[str, bytes], workdir: Path) -> str:
    """Run the real ``opendkim -t`` (test mode) on ``message`` with public keys from a TestPublicKeys file.
    Returns its report: the Authentication-Results it would add (one ``dkim=pass``/``dkim=fail`` per
    signature) and the "verification (...) succeeded/failed" line about the first signature."""
    program = require_program("opendkim")
    keys = workdir / "opendkim-keys"
    keys.write_text("".join(f"{name} {value.decode('ascii')}\n" for name, value in records.items()))
    conf = workdir / "opendkim.conf"
    conf.write_text(f"Mode v\nSyslog no\nTestPublicKeys {keys}\nMinimumKeyBits 1024\n")
    msg = workdir / "message.eml"
    msg.write_bytes(message)
    done = subprocess.run([program, "-x", str(conf), "-vv", "-t", str(msg)], capture_output=True, text=True,
                          timeout=30, stdin=subprocess.DEVNULL, check=False)
    return "".join(line for line in (done.stdout + done.stderr).splitlines(keepends=True) if "mlfi_" not in line)


_REPO = Path(__file__).resolve().parents[2]
_NAMESPACE_DNS = """
import subprocess, sys
import tests.support.dnsserver as dnsserver
dnsserver._free_port = lambda host: 53  # in a private network namespace, port 53 of its loopback is ours
message, program, index, *records = sys.argv[1:]
with dnsserver.TestDns(origins=("test",)) as server:
    server.add(*records)
    with open(message, "rb") as fp:
        done = subprocess.run([program, "--index", index], stdin=fp, capture_output=True, timeout=30, check=False)
sys.stdout.buffer.write(done.stdout + done.stderr)
sys.exit(done.returncode)
"""


def dkimverify(message: bytes, records: Sequence[str], workdir: Path, index: int = 0) -> tuple[int, str]:
    """Run dkimpy's ``dkimverify --index INDEX`` on ``message`` with ``records`` (zone-file lines) as the only
    DNS data; (exit status, output). The namespace is private: nothing outside it sees the resolv.conf or the
    DNS server."""
    program = shutil.which("dkimverify", path=str(Path(sys.executable).parent)) or require_program("dkimverify")
    unshare, ip = require_program("unshare"), require_program("ip")
    resolv = workdir / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\noptions timeout:2 attempts:1\n")
    script = workdir / "namespace_dns.py"
    script.write_text(_NAMESPACE_DNS)
    msg = workdir / "dkimverify.eml"
    msg.write_bytes(message)
    shell = 'set -e; "$1" link set lo up; mount --bind "$2" /etc/resolv.conf; shift 2; exec "$@"'
    done = subprocess.run(
        [unshare, "--mount", "--net", "sh", "-c", shell, "sh", ip, str(resolv), sys.executable, str(script),
         str(msg), program, str(index), *records],
        capture_output=True, text=True, timeout=60, cwd=_REPO, stdin=subprocess.DEVNULL, check=False,
        env={**os.environ, "PYTHONPATH": str(_REPO)})
    if "Operation not permitted" in done.stderr and "unshare" in done.stderr:
        if os.environ.get("CI") == "true":
            pytest.fail(f"cannot make a private namespace for dkimverify: {done.stderr.strip()}")
        pytest.skip(f"cannot make a private namespace for dkimverify: {done.stderr.strip()}")
    return done.returncode, done.stdout + done.stderr
