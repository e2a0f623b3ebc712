"""Run a real ``mailhop serve`` on loopback and talk SMTP to it over sockets."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

READY = re.compile(r"ready listeners=(\S+)")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class Relay:
    """A running daemon: its address, spool, config file and collected stderr."""

    proc: subprocess.Popen[str]
    host: str
    port: int
    spool: Path
    config: Path
    log_lines: list[str] = field(default_factory=list)
    pump: threading.Thread | None = None

    def log(self) -> str:
        return "".join(self.log_lines)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        finally:
            if self.pump is not None:
                self.pump.join(timeout=5)
            if self.proc.stderr is not None:
                self.proc.stderr.close()

    def queue_ids(self) -> list[str]:
        out = subprocess.run(
            [sys.executable, "-m", "mailhop.cli", "queue", "list", "--json", "--config", str(self.config)],
            capture_output=True,
            text=True,
            check=True,
        )
        import json

        return [json.loads(line)["id"] for line in out.stdout.splitlines() if line.strip()]


def write_config(tmp: Path, port: int, extra: str = "", host: str = "127.0.0.1", domains: str = '["example.test"]',
                 trusted: str = '["127.0.0.0/8", "::1/128"]', top: str = "") -> Path:
    """``top``: top-level keys (before any table, e.g. ``workers = 2``); ``extra``: tables appended."""
    cfg = tmp / "mailhop.toml"
    addr = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    cfg.write_text(
        textwrap.dedent(
            f"""
            hostname = "relay.example.test"
            {top}
            [[listener]]
            address = "{addr}"
            role = "mx"
            [relay]
            trusted_networks = {trusted}
            domains = {domains}
            [queue]
            path = "spool"
            [log]
            level = "info"
            """
        )
        # Daemon tests of the accepting side keep mail queued: delivery would resolve real domains.
        + ("" if "[delivery]" in extra else "[delivery]\nenabled = false\n")
        + textwrap.dedent(extra)
    )
    return cfg


@contextmanager
def run_relay(tmp: Path, *, extra: str = "", host: str = "127.0.0.1", trusted: str = '["127.0.0.0/8", "::1/128"]',
              domains: str = '["example.test"]', env: dict[str, str] | None = None,
              expect_exit: int | None = 0, loop: str = "auto", top: str = "") -> Iterator[Relay]:
    """Start ``mailhop serve``, wait for its readiness line (never a sleep), yield it, SIGTERM it on exit."""
    port = free_port(host)
    cfg = write_config(tmp, port, extra, host=host, domains=domains, trusted=trusted, top=top)
    relay = start_relay(cfg, host, port, tmp / "spool", env=env, loop=loop)
    try:
        yield relay
    finally:
        code = relay.stop()
        if expect_exit is not None:
            assert code == expect_exit, f"mailhop exited {code}\n{relay.log()}"


def start_relay(cfg: Path, host: str, port: int, spool: Path, env: dict[str, str] | None = None,
                timeout: float = 20, loop: str = "auto") -> Relay:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailhop.cli", "serve", "--config", str(cfg), "--loop", loop],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    relay = Relay(proc, host, port, spool, cfg)
    ready = threading.Event()
    seen = threading.Event()

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            relay.log_lines.append(line)
            if READY.search(line):
                seen.set()
                ready.set()
        ready.set()

    relay.pump = threading.Thread(target=pump, daemon=True)
    relay.pump.start()
    if not ready.wait(timeout) or not seen.is_set():
        proc.kill()
        proc.wait()
        relay.pump.join(timeout=5)
        assert proc.stderr is not None
        proc.stderr.close()
        raise RuntimeError(f"mailhop did not become ready:\n{relay.log()}")
    return relay


class Client:
    """A minimal raw SMTP client for transcripts: sends exact bytes, reads whole replies with a deadline."""

    def __init__(self, host: str, port: int, timeout: float = 10, source: str | None = None) -> None:
        """``source``: the local address to connect from (another loopback address than the trusted one)."""
        self.sock = socket.create_connection((host, port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self, text: str) -> None:
        self.send(text.encode() + b"\r\n")

    def _read_line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed by server; unread {self.buf!r}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def reply(self) -> str:
        """One complete reply, lines joined with newlines."""
        lines = []
        while True:
            line = self._read_line()
            lines.append(line.decode("utf-8", "replace"))
            if len(line) < 4 or line[3:4] != b"-":
                return "\n".join(lines)

    def closed(self, timeout: float = 5) -> bool:
        """True when the server closes the connection without sending anything more."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
        self.buf += data
        return data == b""

    def close(self) -> None:
        self.sock.close()


def run_transcript(relay: Relay, script: str) -> Client:
    """Play a transcript. Lines: ``C: text`` send text+CRLF; ``B: <python bytes literal>`` send raw bytes;
    ``S: regex`` next whole reply must match (re.match, DOTALL); ``CLOSED`` the server must close."""
    import ast

    client = Client(relay.host, relay.port)
    for number, raw in enumerate(textwrap.dedent(script).strip().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        kind, _, arg = line.partition(": ")
        if line == "CLOSED":
            assert client.closed(), f"line {number}: server did not close"
        elif kind == "C":
            client.line(arg)
        elif kind == "B":
            client.send(ast.literal_eval(arg))
        elif kind == "S":
            got = client.reply()
            assert re.match(arg, got, re.DOTALL), f"line {number}: expected /{arg}/, got {got!r}"
        else:
            raise ValueError(f"bad transcript line {number}: {raw!r}")
    return client
