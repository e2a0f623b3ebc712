"""Real Postfix receivers on loopback: smtp-sink (counts / dumps messages) and a private Postfix delivering
everything it accepts into one Maildir.

Both are subprocesses stopped by PID; readiness is a port that accepts connections, never a fixed sleep. The
private Postfix lives entirely in its own temp directory (config, queue, data, log, mail) and never reads or
touches the system instance in /etc/postfix; it needs root (``postfix -c DIR`` outside
alternate_config_directories).

    with SmtpSink("127.0.0.41", 0, dump_dir=tmp_path) as sink:
        ...  # send to sink.host, sink.port
        sink.wait_for(1)
        [message] = sink.messages()   # X-Mail-Args etc. parsed; content with LF line ends

    with PostfixMaildir("127.0.0.42", 0) as mta:
        ...  # send to mta.host, mta.port, any recipient domain
        [raw] = mta.wait_for(1)      # the Maildir file: Return-Path, Delivered-To, Received + message (LF)
        assert strip_trace_headers(raw) == sent.replace(b"\\r\\n", b"\\n")
"""

from __future__ import annotations

import contextlib
import os
import pty
import pwd
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

__all__ = ["PostfixMaildir", "SinkMessage", "SmtpSink", "find_program", "free_port", "strip_trace_headers"]

START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
POLL = 0.02
MAIL_OWNER = "postfix"
TRACE_HEADERS = (b"return-path:", b"x-original-to:", b"delivered-to:", b"received:")


def find_program(name: str) -> str | None:
    """Path of a program on PATH or in /usr/sbin (where Debian puts Postfix, often off a user's PATH)."""
    found = shutil.which(name)
    if found:
        return found
    candidate = Path("/usr/sbin") / name
    return str(candidate) if os.access(candidate, os.X_OK) else None


def _require(name: str) -> str:
    path = find_program(name)
    if path is None:
        raise FileNotFoundError(f"{name} not installed (Debian package postfix)")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port the kernel just considered free on host."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    """Whether something accepts TCP connections on host:port right now."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll condition until true; TimeoutError naming what was awaited."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(POLL)


def _endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    # A zombie of someone else's child counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


# -- smtp-sink -------------------------------------------------------------------------------------------


@dataclass
class SinkMessage:
    """One message as smtp-sink dumped it (smtp-sink drops every CR: line ends are LF)."""

    path: Path
    client_addr: str
    proto: str
    helo: str | None
    mail_args: str
    rcpt_args: list[str]
    content: bytes
    """The message as received, dot-unstuffed, CRs removed."""

    @property
    def mail_from(self) -> str:
        return self.mail_args.split(">", 1)[0].lstrip("<")

    @property
    def rcpts(self) -> list[str]:
        return [arg.split(">", 1)[0].lstrip("<") for arg in self.rcpt_args]


def parse_sink_dump(path: Path) -> SinkMessage:
    """Parse one smtp-sink -d file: its X- records, its three-line Received header, the message."""
    lines = path.read_bytes().split(b"\n")
    fields: dict[str, list[str]] = {}
    i = 0
    while i < len(lines) and not lines[i].startswith(b"Received: "):
        name, _, value = lines[i].decode("utf-8", "replace").partition(": ")
        fields.setdefault(name, []).append(value)
        i += 1
    i += 1
    while i < len(lines) and lines[i].startswith(b"\t"):
        i += 1
    content = b"\n".join(lines[i:])
    # smtp-sink writes the LF of the final ".\r\n" as an extra empty line.
    content = content[:-1] if content.endswith(b"\n") else content

    def one(name: str) -> str | None:
        values = fields.get(name)
        return values[0] if values else None

    return SinkMessage(
        path=path,
        client_addr=one("X-Client-Addr") or "",
        proto=one("X-Client-Proto") or "",
        helo=one("X-Helo-Args"),
        mail_args=one("X-Mail-Args") or "",
        rcpt_args=fields.get("X-Rcpt-Args", []),
        content=content,
    )


class SmtpSink:
    """Postfix's smtp-sink on host:port (0: a free port) with extra ``options`` (e.g. ["-L"] for LMTP).

    ``count()`` is smtp-sink's own message counter (-c). With ``dump_dir`` each message is dumped to its
    own file (-d, one file per transaction; the file exists from MAIL on and is complete once closed).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        options: Sequence[str] = (),
        dump_dir: Path | str | None = None,
        backlog: int = 64,
    ) -> None:
        self.host = host
        self.port = port
        self.options = list(options)
        self.dump_dir = Path(dump_dir) if dump_dir is not None else None
        self.backlog = backlog
        self._proc: subprocess.Popen[bytes] | None = None
        self._out: IO[bytes] | None = None
        self._last_output = ""

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> SmtpSink:
        """Start smtp-sink and wait until its port accepts connections."""
        program = _require("smtp-sink")
        if self.port == 0:
            self.port = free_port(self.host)
        argv = [program, "-c"]
        if os.geteuid() == 0:
            # Required as root; staying root lets it write dumps into any (e.g. pytest's 0700) directory.
            argv += ["-u", "root"]
        if self.dump_dir is not None:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            argv += ["-d", f"{self.dump_dir}/%Y%m%d%H%M%S."]
        argv += [*self.options, _endpoint(self.host, self.port), str(self.backlog)]
        self._out = tempfile.NamedTemporaryFile(prefix="smtp-sink-", suffix=".out")  # noqa: SIM115
        self._proc = subprocess.Popen(
            argv, stdout=self._out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        try:
            wait_until(self._ready, START_TIMEOUT, f"smtp-sink on {_endpoint(self.host, self.port)}")
        except BaseException:
            self.stop()
            raise
        return self

    def _ready(self) -> bool:
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise RuntimeError(f"smtp-sink exited {self._proc.returncode}: {self.output()}")
        return port_open(self.host, self.port)

    def output(self) -> str:
        """What smtp-sink printed so far (counters, warnings)."""
        if self._out is None:
            return self._last_output
        return os.pread(self._out.fileno(), 1 << 20, 0).decode("utf-8", "replace")

    def count(self) -> int:
        """Messages received so far (smtp-sink updates its counter before replying to the final dot)."""
        counters = [part for part in self.output().replace("\r", "\n").split() if part.startswith("mesg=")]
        return int(counters[-1].removeprefix("mesg=")) if counters else 0

    def wait_for(self, n: int, timeout: float = 10.0) -> int:
        """Wait until at least n messages were received; the count."""
        wait_until(
            lambda: self.count() >= n, timeout, f"smtp-sink to count {n} message(s), has {self.count()}"
        )
        return self.count()

    def dump_files(self) -> list[Path]:
        """Dump files of finished transactions (open ones, still in a transaction, are skipped), by mtime.

        Files finished within one tick of the file system's clock have no defined order.
        """
        if self.dump_dir is None:
            raise RuntimeError("SmtpSink was started without dump_dir")
        # List the directory first, then the open files: a file closed in between is finished.
        candidates = [p for p in self.dump_dir.rglob("*") if p.is_file()]
        open_now = self._open_files()
        done = [p for p in candidates if p.resolve() not in open_now and p.exists()]
        return sorted(done, key=lambda p: (p.stat().st_mtime_ns, p.name))

    def messages(self) -> list[SinkMessage]:
        """The dumped messages of finished transactions, as dump_files() orders them."""
        out = []
        for path in self.dump_files():
            with contextlib.suppress(FileNotFoundError):
                out.append(parse_sink_dump(path))
        return out

    def _open_files(self) -> set[Path]:
        if self._proc is None:
            return set()
        fd_dir = Path(f"/proc/{self._proc.pid}/fd")
        opened = set()
        with contextlib.suppress(OSError):
            for fd in fd_dir.iterdir():
                with contextlib.suppress(OSError):
                    opened.add(Path(os.readlink(fd)))
        return opened

    def stop(self) -> None:
        """Terminate smtp-sink by PID and reap it."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT)
        if self._out is not None:
            self._last_output = self.output()
            self._out.close()
            self._out = None

    def __enter__(self) -> SmtpSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- private Postfix -----------------------------------------------------------------------------------


def strip_trace_headers(message: bytes) -> bytes:
    """Drop the Return-Path, X-Original-To, Delivered-To and Received fields Postfix prepends (leading only)."""
    lines = message.split(b"\n")
    i = 0
    while i < len(lines) and lines[i].lower().startswith(TRACE_HEADERS):
        i += 1
        while i < len(lines) and lines[i][:1] in (b" ", b"\t"):
            i += 1
    return b"\n".join(lines[i:])


# Debian's master.cf services, without chroot; the smtpd listener is added per instance.
MASTER_CF = """\
pickup     unix  n       -       n       60      1       pickup
cleanup    unix  n       -       n       -       0       cleanup
qmgr       unix  n       -       n       300     1       qmgr
tlsmgr     unix  -       -       n       1000?   1       tlsmgr
rewrite    unix  -       -       n       -       -       trivial-rewrite
bounce     unix  -       -       n       -       0       bounce
defer      unix  -       -       n       -       0       bounce
trace      unix  -       -       n       -       0       bounce
verify     unix  -       -       n       -       1       verify
flush      unix  n       -       n       1000?   0       flush
proxymap   unix  -       -       n       -       -       proxymap
proxywrite unix  -       -       n       -       1       proxymap
smtp       unix  -       -       n       -       -       smtp
relay      unix  -       -       n       -       -       smtp
showq      unix  n       -       n       -       -       showq
error      unix  -       -       n       -       -       error
retry      unix  -       -       n       -       -       error
discard    unix  -       -       n       -       -       discard
local      unix  -       n       n       -       -       local
virtual    unix  -       n       n       -       -       virtual
lmtp       unix  -       -       n       -       -       lmtp
anvil      unix  -       -       n       -       1       anvil
scache     unix  -       -       n       -       1       scache
postlog    unix-dgram n  -       n       -       1       postlogd
"""


class PostfixMaildir:
    """A private Postfix on host:port (0: a free port) delivering every accepted recipient into one Maildir.

    ``domains``: recipient domains accepted (None: every domain). ``settings``: extra main.cf lines. The
    instance lives under ``root`` (default: a fresh directory in /tmp, removed on stop unless ``keep``;
    pytest's tmp_path will not do: Postfix's daemons run as ``postfix`` and must traverse it).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        domains: Sequence[str] | None = None,
        settings: Mapping[str, str] | None = None,
        root: Path | str | None = None,
        keep: bool = False,
    ) -> None:
        self.host = host
        self.port = port
        self.domains = domains
        self.settings = dict(settings or {})
        self.root = Path(root) if root is not None else None
        self.keep = keep
        self._created_root = False
        self._master_pid: int | None = None

    @property
    def master_pid(self) -> int | None:
        return self._master_pid

    @property
    def config_dir(self) -> Path:
        return self._root / "etc"

    @property
    def maildir(self) -> Path:
        return self._root / "mail" / "Maildir"

    @property
    def maillog(self) -> Path:
        return self._root / "maillog"

    @property
    def _root(self) -> Path:
        if self.root is None:
            raise RuntimeError("PostfixMaildir not started")
        return self.root

    def main_cf(self) -> dict[str, str]:
        """The main.cf this instance runs with."""
        owner = pwd.getpwnam(MAIL_OWNER)
        root = self._root
        ipv6 = ":" in self.host
        return {
            "compatibility_level": "3.6",
            "queue_directory": str(root / "queue"),
            "data_directory": str(root / "data"),
            "mail_owner": MAIL_OWNER,
            # Postfix insists these exist on an interface; the smtpd listener in master.cf names self.host.
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv6" if ipv6 else "ipv4",
            "myhostname": "postfix.maildir.test",
            "mydomain": "maildir.test",
            "myorigin": "$myhostname",
            "mydestination": "",
            "relay_domains": "",
            "relayhost": "",
            "local_recipient_maps": "",
            "local_transport": "error:5.1.1 local delivery disabled",
            "alias_maps": "",
            "alias_database": "",
            "mynetworks": "[::1]/128" if ipv6 else "127.0.0.0/8",
            # Only the virtual domains are accepted; nothing is ever relayed onwards.
            "smtpd_relay_restrictions": "reject_unauth_destination",
            "smtpd_recipient_restrictions": "reject_unauth_destination",
            "default_transport": "error:5.7.1 this test instance relays nothing",
            "relay_transport": "error:5.7.1 this test instance relays nothing",
            # Loopback addresses other than 127.0.0.1 have no PTR: no DNS wait per connection.
            "smtpd_peername_lookup": "no",
            "smtpd_error_sleep_time": "0",
            "in_flow_delay": "0",
            # Leave the message as the client sent it: no added Date/Message-ID, no address rewriting.
            "local_header_rewrite_clients": "",
            "always_add_missing_headers": "no",
            "virtual_mailbox_domains": " ".join(self.domains) if self.domains is not None else "static:all",
            "virtual_mailbox_base": str(root / "mail"),
            "virtual_mailbox_maps": "static:Maildir/",
            "virtual_uid_maps": f"static:{owner.pw_uid}",
            "virtual_gid_maps": f"static:{owner.pw_gid}",
            "virtual_minimum_uid": "1",
            "biff": "no",
            "maillog_file": str(root / "maillog"),
            "maillog_file_prefixes": str(root),
            **self.settings,
        }

    def start(self) -> PostfixMaildir:
        """Configure, ``postfix -c DIR start`` and wait until smtpd accepts connections."""
        if os.geteuid() != 0:
            raise PermissionError("a private Postfix needs root (postfix -c DIR)")
        postfix = _require("postfix")
        if self.port == 0:
            self.port = free_port(self.host)
        if self.root is None:
            self.root = Path(tempfile.mkdtemp(prefix="mailhop-postfix-", dir="/tmp"))
            self._created_root = True
        root = self.root
        root.chmod(0o755)
        blocked = [str(p) for p in root.parents if not p.stat().st_mode & 0o001]
        if blocked:
            raise PermissionError(f"{MAIL_OWNER} cannot traverse {', '.join(blocked)}")
        for sub in ("etc", "queue", "data", "mail"):
            (root / sub).mkdir(exist_ok=True)
        shutil.chown(root / "data", user=MAIL_OWNER)
        shutil.chown(root / "mail", user=MAIL_OWNER, group=MAIL_OWNER)
        main_cf = "".join(f"{key} = {value}\n" for key, value in self.main_cf().items())
        (self.config_dir / "main.cf").write_text(main_cf)
        listener = f"{_endpoint(self.host, self.port)} inet n - n - - smtpd\n"
        (self.config_dir / "master.cf").write_text(listener + MASTER_CF)
        try:
            # "start" checks the configuration and creates the queue directories with Postfix's owners.
            self._postfix(postfix, "start")
            self._master_pid = self._read_master_pid()
            wait_until(
                lambda: port_open(self.host, self.port), START_TIMEOUT, f"Postfix on {self.host}:{self.port}"
            )
        except BaseException:
            self.stop()
            raise
        return self

    def _postfix(self, program: str, command: str) -> None:
        # postfix(1) reports errors on stderr only when it is a terminal (else to syslog): give it a pty.
        primary, secondary = pty.openpty()
        try:
            result = subprocess.run(
                [program, "-c", str(self.config_dir), command],
                stdin=subprocess.DEVNULL,
                stdout=secondary,
                stderr=secondary,
                timeout=START_TIMEOUT,
                check=False,
            )
        finally:
            os.close(secondary)
        output = bytearray()
        try:
            while select.select([primary], [], [], 0)[0]:
                try:
                    data = os.read(primary, 65536)
                except OSError:
                    break
                if not data:
                    break
                output += data
        finally:
            os.close(primary)
        if result.returncode != 0:
            text = output.decode("utf-8", "replace").strip()
            raise RuntimeError(f"postfix {command} failed ({result.returncode}): {text}")

    def _read_master_pid(self) -> int | None:
        try:
            return int((self._root / "queue" / "pid" / "master.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def message_files(self) -> list[Path]:
        """Delivered files in Maildir/new, oldest first."""
        new = self.maildir / "new"
        if not new.is_dir():
            return []
        return sorted((p for p in new.iterdir() if p.is_file()), key=lambda p: (p.stat().st_mtime_ns, p.name))

    def messages(self) -> list[bytes]:
        """Delivered messages (one per recipient), as stored: trace headers first, LF line ends."""
        return [p.read_bytes() for p in self.message_files()]

    def wait_for(self, n: int, timeout: float = 30.0) -> list[bytes]:
        """Wait until at least n messages were delivered; all delivered messages."""
        wait_until(
            lambda: len(self.message_files()) >= n, timeout, f"{n} delivered message(s); {self.log_tail()}"
        )
        return self.messages()

    def log(self) -> str:
        """The instance's maillog."""
        return self.maillog.read_text(errors="replace") if self.root and self.maillog.exists() else ""

    def log_tail(self, lines: int = 20) -> str:
        return "maillog tail:\n" + "\n".join(self.log().splitlines()[-lines:])

    def stop(self) -> None:
        """``postfix stop``; then make sure the master (by PID) is gone; remove the directory we created."""
        if self.root is None:
            return
        pid = self._master_pid or self._read_master_pid()
        program = find_program("postfix")
        if program is not None and pid is not None:
            with contextlib.suppress(Exception):
                self._postfix(program, "stop")
        if pid is not None:
            with contextlib.suppress(TimeoutError):
                wait_until(lambda: _pid_gone(pid), STOP_TIMEOUT, f"Postfix master {pid} to exit")
            if not _pid_gone(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self._master_pid = None
        if self._created_root and not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None
            self._created_root = False

    def __enter__(self) -> PostfixMaildir:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
