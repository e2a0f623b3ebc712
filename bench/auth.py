"""Handshake-plus-AUTH sessions per second on the implicit-TLS port (465 role), absolute figure.

Starts a private mailhop with a `submissions` listener and one user, then runs N client processes for a fixed
time, each doing: TCP connect, TLS handshake, EHLO, AUTH PLAIN, QUIT. Prints sessions/s. Run:

    .venv/bin/python -m bench.auth [--seconds 10] [--clients 4] [--no-cache]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .procs import free_port


def _client(port: int, seconds: float, out: mp.Queue) -> None:  # type: ignore[type-arg]
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    done = errors = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            with smtplib.SMTP_SSL("127.0.0.1", port, timeout=10, context=ctx) as s:
                s.ehlo("bench")
                s.login("bench", "bench password")
            done += 1
        except (OSError, smtplib.SMTPException):
            errors += 1
    out.put((done, errors))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--no-cache", action="store_true", help="auth.cache_ttl = 0: every login pays scrypt")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        from mailhop.tlsutil import make_self_signed

        make_self_signed("bench.example.test", tmp / "tls")
        port, mx = free_port(), free_port()
        cfg = tmp / "m.toml"
        cfg.write_text(f"""hostname = "bench.example.test"
[[listener]]
address = "127.0.0.1:{mx}"
[[listener]]
address = "127.0.0.1:{port}"
role = "submissions"
[tls]
certificate = "tls/cert.pem"
key = "tls/key.pem"
[queue]
path = "spool"
[delivery]
enabled = false
[log]
level = "warning"
[auth]
cache_ttl = {0 if args.no_cache else 300}
[limits]
max_connections_per_ip = 1000
""")
        mailhop = [sys.executable, "-m", "mailhop.cli"]
        subprocess.run([*mailhop, "users", "add", "bench", "--password-stdin", "--config", str(cfg)],
                       input="bench password\n", text=True, check=True, capture_output=True)
        proc = subprocess.Popen([*mailhop, "serve", "--config", str(cfg)], stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stderr is not None
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.05)
            out: mp.Queue = mp.Queue()  # type: ignore[type-arg]
            procs = [mp.Process(target=_client, args=(port, args.seconds, out)) for _ in range(args.clients)]
            started = time.monotonic()
            for p in procs:
                p.start()
            results = [out.get() for _ in procs]
            for p in procs:
                p.join()
            elapsed = time.monotonic() - started
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        sessions = sum(r[0] for r in results)
        errors = sum(r[1] for r in results)
        print(f"TLS handshake + AUTH PLAIN sessions: {sessions} in {elapsed:.1f} s with {args.clients} clients = "
              f"{sessions / elapsed:.0f}/s (errors {errors}; auth cache {'off' if args.no_cache else 'on'})")


if __name__ == "__main__":
    main()
