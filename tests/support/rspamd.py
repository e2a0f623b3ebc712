"""A private rspamd on loopback: a normal worker (HTTP /checkv2) and a proxy worker in milter mode.

Offline by construction: the configuration is our own (nothing from /etc/rspamd's module list is loaded, so no
RBL, fuzzy, SPF/DKIM/DMARC lookups, maps or update checks), DNS points at a loopback port that answers nothing
(or at a ``TestDns``), and only the ``milter_headers`` plugin is enabled so clean mail gets rspamd's own headers.
GTUBE needs no module: rspamd's core recognises it and forces the "reject" action.

Start-up trick: rspamd compiles the public-suffix list (~9,600 entries) for URL detection at start, which takes
about 15 seconds; a four-line suffix file brings the start under a second. Hyperscan is off for the same reason.

When run as root the workers drop to the ``_rspamd`` user (Debian's), so the state directory is made in /tmp
(not under pytest's private 0700 tree) and handed to that user. Stopped by PID.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["Rspamd", "free_port"]

_CONFIG = """\
options {{
  filters = "";
  dns {{ nameserver = ["{nameserver}"]; timeout = 0.5s; retransmits = 1; sockets = 2; }}
  url_tld = "{dir}/tld.dat";
  disable_hyperscan = true;
  cache_file = "{dir}/symbols.cache";
  hs_cache_dir = "{dir}/";
  history_file = "{dir}/history";
  dynamic_conf = "{dir}/dynamic.conf";
  stats_file = "{dir}/stats.ucl";
  tempdir = "{dir}";
  local_addrs = [];
  task_timeout = 8s;
  enable_test_patterns = true;  # YJS/ZJS/AJS variants of GTUBE: add header, rewrite subject, soft reject
}}
logging {{ type = "file"; filename = "{dir}/rspamd.log"; level = "info"; }}
actions {{ reject = 15; add_header = 6; greylist = 4; }}
modules {{ path = "${{PLUGINSDIR}}"; }}
milter_headers {{
  use = ["x-spamd-result", "x-rspamd-queue-id", "x-spam-status"];
  skip_local = false;
  skip_authenticated = false;
}}
worker "normal" {{ bind_socket = "{host}:{http_port}"; mime = true; count = 1; }}
worker "rspamd_proxy" {{
  bind_socket = "{host}:{milter_port}";
  milter = yes;
  timeout = 30s;
  count = 1;
  upstream "local" {{ default = yes; self_scan = yes; }}
}}
"""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class Rspamd:
    """``with Rspamd(path) as r:`` then ``r.url`` (HTTP) and ``r.milter`` ("inet:127.0.0.1:PORT")."""

    def __init__(self, program: str, host: str = "127.0.0.1", nameserver: str | None = None) -> None:
        self.program = program
        self.host = host
        self.http_port = free_port(host)
        self.milter_port = free_port(host)
        # Nothing answers on a fresh port: any lookup fails at once, and no query leaves the machine.
        self.nameserver = nameserver or f"{host}:{free_port(host)}"
        self.dir = Path(tempfile.mkdtemp(prefix="mailhop-rspamd-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def milter(self) -> str:
        return f"inet:{self.host}:{self.milter_port}"

    def version(self) -> str:
        out = subprocess.run([self.program, "--version"], capture_output=True, text=True, timeout=30, check=False)
        return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else "unknown"

    def start(self, timeout: float = 30.0) -> None:
        (self.dir / "tld.dat").write_text("com\norg\nnet\ntest\n")
        (self.dir / "rspamd.conf").write_text(_CONFIG.format(
            dir=self.dir, host=self.host, http_port=self.http_port, milter_port=self.milter_port,
            nameserver=self.nameserver))
        args = [self.program, "-f", "-c", str(self.dir / "rspamd.conf")]
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam("_rspamd")
            except KeyError:
                args.append("-i")  # no unprivileged user to drop to: allow running as root
            else:
                os.chmod(self.dir, 0o755)
                for path in (self.dir, *self.dir.iterdir()):
                    os.chown(path, user.pw_uid, user.pw_gid)
                args += ["-u", "_rspamd", "-g", "_rspamd"]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        # /ping is answered by the normal worker once it runs; the proxy starts alongside it. A refused
        # connection means the main process has not bound yet (it is still reading its configuration).
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"rspamd exited with {self.proc.returncode}:\n{self.log_tail()}")
            conn = http.client.HTTPConnection(self.host, self.http_port, timeout=max(0.1, deadline - time.monotonic()))
            try:
                conn.request("GET", "/ping")
                if conn.getresponse().status == 200 and self._milter_listening():
                    return
            except OSError:
                time.sleep(0.05)
            finally:
                conn.close()
        self.stop()
        raise RuntimeError(f"rspamd did not start within {timeout:g}s:\n{self.log_tail()}")

    def _milter_listening(self) -> bool:
        with contextlib.suppress(OSError), socket.create_connection((self.host, self.milter_port), timeout=1.0):
            return True
        return False

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join((self.dir / "rspamd.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # the main process stops its workers on SIGTERM
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Rspamd:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
