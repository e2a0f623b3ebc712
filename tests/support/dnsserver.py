"""A scriptable authoritative DNS server on loopback (dnslib), for tests that resolve through real DNS.

Records are given as zone-file lines; faults per name: SERVFAIL, no answer at all (the client times out),
truncation (TC bit over UDP, forcing TCP) and NXDOMAIN for names not in any zone we serve. Every query is
recorded (``zone.queries``), so a test can tell e.g. that a name was asked again over TCP.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

from dnslib import QTYPE, RCODE, RR, DNSError, DNSRecord
from dnslib.server import BaseResolver, DNSHandler, DNSServer


@dataclass
class Zone:
    records: list[RR] = field(default_factory=list)
    servfail: set[str] = field(default_factory=set)
    drop: set[str] = field(default_factory=set)
    truncate: set[str] = field(default_factory=set)
    #: Every query received, in order: (name without the trailing dot, type, "udp" or "tcp").
    queries: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, *lines: str) -> None:
        for line in lines:
            self.records.extend(RR.fromZone(line))


class _Resolver(BaseResolver):  # type: ignore[misc]
    def __init__(self, zone: Zone, origins: Iterable[str]) -> None:
        self.zone = zone
        self.origins = [o.rstrip(".").lower() for o in origins]

    def resolve(self, request: DNSRecord, handler: DNSHandler) -> DNSRecord:
        reply = request.reply()
        qname = str(request.q.qname).rstrip(".").lower()
        qtype = QTYPE[request.q.qtype]
        self.zone.queries.append((qname, str(qtype), handler.protocol))
        if qname in self.zone.drop:
            # dnslib's handler sends no reply for a DNSError (and logs it to our quiet logger); returning
            # None instead would print an AttributeError traceback for every dropped query.
            raise DNSError(f"dropped query for {qname}")
        if qname in self.zone.servfail:
            reply.header.rcode = RCODE.SERVFAIL
            return reply
        known = False
        for rr in self.zone.records:
            if str(rr.rname).rstrip(".").lower() == qname:
                known = True
                if QTYPE[rr.rtype] == qtype or (QTYPE[rr.rtype] == "CNAME" and qtype != "CNAME"):
                    reply.add_answer(rr)
        if not known and not any(qname == o or qname.endswith("." + o) for o in self.origins):
            reply.header.rcode = RCODE.REFUSED
        elif not known:
            reply.header.rcode = RCODE.NXDOMAIN
        if qname in self.zone.truncate and handler.protocol == "udp":
            reply = request.reply()
            reply.header.tc = 1
        return reply


class _Handler(DNSHandler):  # type: ignore[misc]
    def handle(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            super().handle()


class _QuietLogger:
    def __getattr__(self, name: str) -> object:
        return lambda *a, **k: None


class TestDns:
    """Start with ``TestDns(origins=["example.test"])``, add records, use ``nameserver`` ("127.0.0.1:PORT")."""

    __test__ = False

    def __init__(self, origins: Iterable[str] = ("test",), host: str = "127.0.0.1") -> None:
        self.zone = Zone()
        resolver = _Resolver(self.zone, origins)
        port = _free_port(host)
        self.host, self.port = host, port
        logger = _QuietLogger()
        self._udp = DNSServer(resolver, address=host, port=port, handler=_Handler, logger=logger)
        self._tcp = DNSServer(resolver, address=host, port=port, tcp=True, handler=_Handler, logger=logger)
        # serve_forever with a short poll: stop() (shutdown) waits for one poll, 0.5 s by default, per server.
        for server in (self._udp, self._tcp):
            threading.Thread(target=server.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def nameserver(self) -> str:
        return f"{self.host}:{self.port}"

    def add(self, *lines: str) -> None:
        self.zone.add(*lines)

    def stop(self) -> None:
        for server in (self._udp, self._tcp):
            server.server.shutdown()
            server.server.server_close()

    def __enter__(self) -> TestDns:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _free_port(host: str) -> int:
    # A port free for both UDP and TCP.
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind((host, 0))
            port = int(u.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind((host, port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port")
