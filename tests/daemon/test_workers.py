"""``workers = N``: N shared-nothing worker processes on spool shards behind one listening address
(SO_REUSEPORT), supervised: the kernel spreads connections, the CLI sees every shard, a killed worker is
restarted and its shard recovers, delivery runs in every worker, and mail is never stranded by lowering N."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

from tests.support.redisserver import REDIS_URL, redis_or_skip
from tests.support.sink import SmtpSink

from .harness import Client, Relay, free_port, run_relay, start_relay, write_config

TWO = "workers = 2"


def wait_log(relay: Relay, pattern: str, count: int = 1, timeout: float = 20.0) -> list[str]:
    """Wait until ``pattern`` matched ``count`` log lines; the matches."""
    deadline = time.monotonic() + timeout
    while True:
        found = re.findall(pattern, relay.log())
        if len(found) >= count:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{pattern!r} seen {len(found)}/{count} times:\n{relay.log()}")
        time.sleep(0.05)


def submit(relay: Relay, n: int) -> list[str]:
    ids = []
    for i in range(n):
        c = Client(relay.host, relay.port)
        try:
            c.reply()
            for cmd in ("EHLO client.test", "MAIL FROM:<a@client.test>", f"RCPT TO:<u{i}@example.test>", "DATA"):
                c.line(cmd)
                c.reply()
            c.send(f"Subject: {i}\r\n\r\nhello {i}\r\n.\r\n".encode())
            reply = c.reply()
            assert reply.startswith("250"), reply
            ids.append(reply.rsplit(" ", 1)[1])
            c.line("QUIT")
        finally:
            c.close()
    return ids


def shard_count(spool: Path) -> int:
    with sqlite3.connect(f"file:{spool / 'queue.db'}?mode=ro", uri=True) as conn:
        (n,) = conn.execute("SELECT count(*) FROM messages").fetchone()
    return int(n)


def cli(relay: Relay, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mailhop.cli", *args, "--config", str(relay.config)],
                          capture_output=True, text=True, timeout=60)


def test_connections_spread_over_workers_and_the_cli_sees_every_shard(tmp_path: Path) -> None:
    with run_relay(tmp_path, top=TWO) as relay:
        wait_log(relay, r"ready listeners=\S+ spool=\S+ worker=\d", 2)
        ids = submit(relay, 24)
        spool = tmp_path / "spool"
        per_shard = [shard_count(spool), shard_count(spool / "shard-1")]
        assert sum(per_shard) == 24 and all(per_shard), per_shard  # 2 * 2**-24: both workers took some
        listed = [json.loads(line)["id"] for line in cli(relay, "queue", "list", "--json").stdout.splitlines()]
        assert listed == sorted(ids)
        with sqlite3.connect(f"file:{spool / 'shard-1' / 'queue.db'}?mode=ro", uri=True) as conn:
            (in_shard_1,) = conn.execute("SELECT id FROM messages LIMIT 1").fetchone()
        shown = cli(relay, "queue", "show", in_shard_1, "--body")
        assert shown.returncode == 0 and f"id {in_shard_1}" in shown.stdout, shown.stdout
        assert cli(relay, "queue", "hold", *ids[:3]).returncode == 0
        assert cli(relay, "queue", "delete", *ids[3:6]).returncode == 0
        after = {json.loads(line)["id"]: json.loads(line) for line in
                 cli(relay, "queue", "list", "--json").stdout.splitlines()}
        assert set(after) == set(ids[:3] + ids[6:]) and all(after[i]["held"] for i in ids[:3])
    assert relay.proc.returncode == 0


def test_a_killed_worker_is_restarted_and_keeps_its_mail(tmp_path: Path) -> None:
    with run_relay(tmp_path, top=TWO) as relay:
        wait_log(relay, r"ready listeners=\S+ spool=\S+ worker=\d", 2)
        ids = submit(relay, 12)
        pid = int(wait_log(relay, r"worker 1 started pid=(\d+)")[0])
        os.kill(pid, signal.SIGKILL)
        wait_log(relay, r"worker 1 \(pid \d+\) exited -9; restarting", 1)
        wait_log(relay, r"worker 1 started pid=(\d+)", 2)
        wait_log(relay, r"ready listeners=\S+ spool=\S+shard-1 worker=1", 2)
        ids += submit(relay, 6)
        listed = {json.loads(line)["id"] for line in cli(relay, "queue", "list", "--json").stdout.splitlines()}
        assert listed == set(ids)


def test_fewer_workers_than_shards_with_mail_refuses_to_start(tmp_path: Path) -> None:
    with run_relay(tmp_path, top=TWO) as relay:
        wait_log(relay, r"ready listeners=\S+ spool=\S+ worker=\d", 2)
        submit(relay, 16)
    assert shard_count(tmp_path / "spool" / "shard-1") > 0
    cfg = write_config(tmp_path, free_port())  # workers = 1 now
    out = subprocess.run([sys.executable, "-m", "mailhop.cli", "serve", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 78 and "shard-1" in out.stderr and "raise workers" in out.stderr
    # ... while the queue CLI still sees the stranded shard's mail.
    listing = subprocess.run([sys.executable, "-m", "mailhop.cli", "queue", "list", "--json", "--config", str(cfg)],
                             capture_output=True, text=True, timeout=60, check=True).stdout.splitlines()
    assert len(listing) == 16


def test_greylisting_in_memory_with_workers_is_a_config_error(tmp_path: Path) -> None:
    cfg = tmp_path / "mh.toml"
    cfg.write_text('hostname = "relay.example.test"\nworkers = 2\n[checks.greylist]\nenabled = true\n')
    out = subprocess.run([sys.executable, "-m", "mailhop.cli", "check-config", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 78 and "greylist" in out.stderr and 'backend = "redis"' in out.stderr
    cfg.write_text(cfg.read_text() + 'backend = "redis"\n')
    out = subprocess.run([sys.executable, "-m", "mailhop.cli", "check-config", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_greylisting_in_redis_works_across_workers(tmp_path: Path) -> None:
    """With the Redis store, a retry passes whichever worker it reaches. 24 triplets, each refused once and then
    retried on a new connection: a store per worker would refuse about half of the retries (SO_REUSEPORT spreads
    connections by their source port), so every retry passing is the proof (a per-worker store passes all 24
    with chance 2**-24)."""
    redis_or_skip()
    run = uuid.uuid4().hex[:12]  # the triplets are new to the shared Redis on every run of this test
    url = REDIS_URL.rsplit("/", 1)[0] + "/15"  # a database of its own, not production's keys in database 0
    extra = textwrap.dedent(f"""
    [checks.greylist]
    enabled = true
    delay = 0
    retry_window = 60
    expire = 60
    auto_allow_after = 0
    backend = "redis"
    redis_url = "{url}"
    """)
    with run_relay(tmp_path, top=TWO, extra=extra, trusted='["127.0.0.1/32"]') as relay:
        wait_log(relay, r"ready listeners=\S+ spool=\S+ worker=\d", 2)

        def attempt(n: int) -> str:
            c = Client(relay.host, relay.port, source="127.0.0.2")  # not trusted: greylisted
            try:
                c.reply()
                for cmd in ("EHLO client.test", f"MAIL FROM:<s{run}@sender.test>"):
                    c.line(cmd)
                    assert c.reply().startswith("250")
                c.line(f"RCPT TO:<u{n}@example.test>")
                return c.reply()
            finally:
                c.close()

        firsts = [attempt(n) for n in range(24)]
        assert all(r.startswith("451 4.7.1 Greylisted") for r in firsts), firsts
        retries = [attempt(n) for n in range(24)]
        assert all(r.startswith("250") for r in retries), retries
    assert len(re.findall(r"greylist: passed after", relay.log())) == 24
    import redis

    with redis.Redis.from_url(url) as client:
        keys = list(client.scan_iter(match="mailhop:grey:*"))
        if keys:
            client.delete(*keys)


def test_every_worker_delivers_what_it_accepted(tmp_path: Path) -> None:
    with SmtpSink("127.0.0.66", 0) as sink:
        extra = textwrap.dedent(f"""
        [delivery]
        enabled = true
        [[route]]
        domains = ["*"]
        via = "smtp://127.0.0.66:{sink.port}"
        tls = "none"
        """)
        port = free_port()
        cfg = write_config(tmp_path, port, extra, top=TWO)
        relay = start_relay(cfg, "127.0.0.1", port, tmp_path / "spool")
        try:
            wait_log(relay, r"ready listeners=\S+ spool=\S+ worker=\d", 2)
            submit(relay, 20)
            sink.wait_for(20, timeout=30)
            deadline = time.monotonic() + 20
            while cli(relay, "queue", "list", "--json").stdout.strip() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert cli(relay, "queue", "list", "--json").stdout.strip() == ""
        finally:
            assert relay.stop() == 0, relay.log()
        assert sink.count() == 20
