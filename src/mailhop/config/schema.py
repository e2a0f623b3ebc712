"""The configuration schema. Field names are a public interface: users' files and tools rely on them.

Every field's description doubles as the reference documentation (docs/configuration.md is generated from it by
``mailhop config-reference``) and as the hint printed when a value is invalid.
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..address import AddressError, canonical_domain
from ..dns import split_nameserver
from ..queue.sqlite import DEFAULT_PAGE_SIZE, PAGE_SIZES
from .checks import ChecksConfig, DkimConfig

__all__ = [
    "AuthConfig",
    "Config",
    "DeliveryConfig",
    "DnsConfig",
    "LimitsConfig",
    "ListenerConfig",
    "LogConfig",
    "QueueConfig",
    "RelayConfig",
    "RouteConfig",
    "TlsConfig",
]


class _Section(BaseModel):
    # A misspelt key is an error, not silently ignored: "max_mesage_size" must not leave the default in force.
    model_config = ConfigDict(extra="forbid", frozen=True)


def parse_hostport(value: str) -> tuple[str, int]:
    """Split "HOST:PORT" or "[v6]:PORT"; raise ValueError with a fix on bad input."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"{value!r} is not HOST:PORT; write e.g. \"127.0.0.1:2525\" or \"[::1]:2525\"")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range 1-65535")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ValueError(f"{host!r} is not an IP address; listeners bind to addresses, not names") from None
    return host, port


class ListenerConfig(_Section):
    address: str = Field(description='Address and port to listen on, "HOST:PORT" or "[V6]:PORT".')
    role: Literal["mx", "submission", "submissions"] = Field(
        "mx",
        description='"mx": mail for served domains and from trusted networks; "submission" (587): STARTTLS, then '
        'AUTH, then relay; "submissions" (465): the same with TLS from the first byte (RFC 8314).',
    )
    certificate: Path | None = Field(None, description="PEM certificate for this listener; default: [tls] certificate.")
    key: Path | None = Field(None, description="PEM key for this listener; default: [tls] key.")
    tls_min_version: Literal["1.2", "1.3"] = Field("1.2", description="Lowest TLS version accepted.")
    require_auth: bool | None = Field(
        None, description="MAIL needs AUTH first (530 5.7.0). Default: true for submission roles, false for mx."
    )
    auth: bool | None = Field(
        None, description="Offer AUTH (after TLS). Default: true for submission roles, false for mx."
    )
    allow_plaintext_auth: bool = Field(
        False,
        description="Accept AUTH without TLS. Only for a loopback address (e.g. local apps); refused elsewhere.",
    )
    max_message_size: int | None = Field(
        None, ge=1024, description="This listener's largest message in bytes; default: limits.max_message_size."
    )
    max_recipients: int | None = Field(
        None, ge=100, description="This listener's recipients per message; default: limits.max_recipients."
    )
    max_connections: int | None = Field(
        None, ge=1, description="Concurrent connections on this listener (within limits.max_connections)."
    )
    checks: list[str] | None = Field(
        None,
        description='Names of the [checks] run on this listener, e.g. ["spf", "dkim", "dmarc", "rspamd"]. Default: '
        'every enabled check on "mx" listeners; only "ratelimit" (if enabled) on submission listeners.',
    )

    @field_validator("address")
    @classmethod
    def _check_address(cls, value: str) -> str:
        parse_hostport(value)
        return value

    @model_validator(mode="after")
    def _check_listener(self) -> ListenerConfig:
        if (self.certificate is None) != (self.key is None):
            raise ValueError("set both certificate and key on the listener, or neither")
        if self.allow_plaintext_auth and not ipaddress.ip_address(
            self.host_port[0] if self.host_port[0] != "localhost" else "127.0.0.1"
        ).is_loopback:
            raise ValueError("allow_plaintext_auth is only allowed on a loopback address")
        return self

    @property
    def offers_auth(self) -> bool:
        return self.auth if self.auth is not None else self.role != "mx"

    @property
    def requires_auth(self) -> bool:
        return self.require_auth if self.require_auth is not None else self.role != "mx"

    @property
    def host_port(self) -> tuple[str, int]:
        return parse_hostport(self.address)


class RelayConfig(_Section):
    trusted_networks: list[str] = Field(
        default_factory=lambda: ["127.0.0.0/8", "::1/128"],
        description="Client networks (CIDR) allowed to relay to any domain. Keep this small: it is the open-relay door.",
    )
    domains: list[str] = Field(
        default_factory=list,
        description="Domains this relay accepts mail for from anyone (exact names; IDNs allowed).",
    )

    @field_validator("trusted_networks")
    @classmethod
    def _check_networks(cls, value: list[str]) -> list[str]:
        for net in value:
            try:
                ipaddress.ip_network(net, strict=True)
            except ValueError as exc:
                raise ValueError(f"{net!r} is not a network in CIDR form (e.g. \"192.0.2.0/24\"): {exc}") from None
        return value

    @field_validator("domains")
    @classmethod
    def _check_domains(cls, value: list[str]) -> list[str]:
        out = []
        for name in value:
            try:
                out.append(canonical_domain(name))
            except AddressError as exc:
                raise ValueError(f"{name!r} is not a valid domain name ({exc.reason}); write e.g. \"example.org\"") from None
        return out


class QueueConfig(_Section):
    path: Path = Field(
        Path("var/spool"),
        description="Spool directory (SQLite database and large bodies). Relative paths are relative to the config file.",
    )
    inline_body_max: int = Field(
        131072,
        ge=0,
        le=16 * 1024 * 1024,
        description="Bodies up to this many bytes are stored inside the database (one fsync per batch); larger ones "
        "are streamed to files.",
    )
    page_size: int = Field(
        DEFAULT_PAGE_SIZE,
        description="SQLite page size in bytes (4096, 8192, 16384, 32768 or 65536) of a spool database when it is "
        "created; an existing spool keeps its own. Large pages write large bodies with fewer system calls; small "
        "ones write less per status update (4096 suits a relay of only small messages).",
    )
    segment_min: int = Field(
        0,
        ge=0,
        description="Bodies of at least this many bytes that are stored with the database (see inline_body_max) are "
        "appended to shared body segment files instead, one fdatasync per batch: written once, where the database "
        "writes a body twice (bench/RESULTS.md: accepting 100 KB messages 0.98x -> 1.64x Postfix, with page_size = "
        "4096). 0 (the default for now): never. Segments are freed when no queued message uses them; bodies still "
        "queued after 10 minutes move into the database.",
    )
    health_probe_interval: float = Field(
        5.0,
        gt=0,
        le=3600,
        description="Seconds between probe writes while the spool is failed or full. While failed (an I/O error "
        "from the disk) clients get 421 4.3.2; the first probe that writes and fsyncs a file and a database "
        "transaction restores service. See docs/reliability.md.",
    )

    @field_validator("page_size")
    @classmethod
    def _check_page_size(cls, value: int) -> int:
        if value not in PAGE_SIZES:
            sizes = ", ".join(map(str, PAGE_SIZES[:-1])) + f" or {PAGE_SIZES[-1]}"
            raise ValueError(f"{value} is not a SQLite page size: use {sizes}")
        return value


class LimitsConfig(_Section):
    max_message_size: int = Field(52428800, ge=1024, description="Largest message accepted, in bytes (SIZE, RFC 1870).")
    max_recipients: int = Field(
        1000, ge=100, description="Recipients per message; RFC 5321 4.5.3.1.8 requires at least 100."
    )
    max_command_line: int = Field(
        512, ge=512, le=65536, description="Longest command line in octets incl. CRLF (RFC 5321 4.5.3.1.4)."
    )
    max_text_line: int = Field(
        1000, ge=1000, le=1048576, description="Longest line of message text in octets incl. CRLF (RFC 5321 4.5.3.1.6)."
    )
    max_errors: int = Field(20, ge=1, description="Error replies in one session before 421 and disconnect.")
    command_timeout: float = Field(
        300.0, gt=0, description="Seconds to wait for the next command (RFC 5321 4.5.3.2.7: 5 minutes)."
    )
    data_timeout: float = Field(
        180.0, gt=0, description="Seconds to wait for each block of DATA (RFC 5321 4.5.3.2.5: 3 minutes)."
    )
    max_connections: int = Field(1000, ge=1, description="Concurrent SMTP connections over all listeners.")
    max_connections_per_ip: int = Field(50, ge=1, description="Concurrent SMTP connections from one client address.")
    max_received_headers: int = Field(
        50, ge=1, description="A message with more Received: headers than this is refused as a mail loop (554 5.4.6)."
    )
    shutdown_grace: float = Field(
        30.0, ge=0, description="Seconds that SIGTERM waits for in-flight transactions before closing them."
    )


class TlsConfig(_Section):
    certificate: Path | None = Field(None, description="PEM certificate chain; STARTTLS is offered when set.")
    key: Path | None = Field(None, description="PEM private key for the certificate.")
    reload_interval: float = Field(
        10.0, ge=0, description="Seconds between checks for changed certificate files (0: only on SIGHUP)."
    )

    @model_validator(mode="after")
    def _both_or_neither(self) -> TlsConfig:
        if (self.certificate is None) != (self.key is None):
            raise ValueError("set both tls.certificate and tls.key, or neither")
        return self


Mechanism = Literal["SCRAM-SHA-256", "PLAIN", "LOGIN"]


def _default_mechanisms() -> list[Mechanism]:
    return ["SCRAM-SHA-256", "PLAIN", "LOGIN"]


class AuthConfig(_Section):
    mechanisms: list[Mechanism] = Field(
        default_factory=_default_mechanisms, description="SASL mechanisms offered, in order."
    )
    failure_delay: float = Field(1.0, ge=0, le=30, description="Seconds before answering a failed AUTH (535).")
    max_failures: int = Field(
        5, ge=1, description="Failed AUTH attempts per client address or user name within failure_window "
        "before 421 4.7.0 and disconnect."
    )
    failure_window: float = Field(300.0, gt=0, description="Seconds over which AUTH failures are counted.")
    penalty: float = Field(900.0, ge=0, description="Seconds a client address or user stays locked out.")
    enforce_sender: bool = Field(
        True, description="An authenticated user's MAIL FROM must be one of its addresses (553 5.7.1)."
    )
    enforce_from_header: bool = Field(
        False, description="The From: header's address must be one of the user's addresses too (553 5.7.1)."
    )
    received_shows_user: bool = Field(
        False, description="Name the authenticated user in the Received: header (off: privacy by default)."
    )
    cache_ttl: float = Field(
        300.0, ge=0, description="Seconds a verified user/password pair skips the slow password hash (0: never). "
        "A password change ends it at once."
    )


class DnsConfig(_Section):
    nameservers: list[str] = Field(
        default_factory=list,
        description='Resolvers to ask, "IP" or "IP:PORT" (e.g. ["127.0.0.1:5353"]); empty means the system resolver.',
    )
    timeout: float = Field(5.0, gt=0, description="Seconds to wait for one DNS server to answer.")
    lifetime: float = Field(15.0, gt=0, description="Seconds a whole lookup may take, retries included.")

    @field_validator("nameservers")
    @classmethod
    def _check_nameservers(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                host, port = split_nameserver(item)
                ipaddress.ip_address(host)
                if not 0 < port < 65536:
                    raise ValueError
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or IP:PORT; write e.g. \"127.0.0.1:53\"") from None
        return value


class DeliveryConfig(_Section):
    enabled: bool = Field(True, description="Deliver queued mail. false keeps everything queued (a pure spool).")
    mx_port: int = Field(25, ge=1, le=65535, description="Port for MX delivery. Change only for labs and tests.")
    max_connections: int = Field(100, ge=1, description="Outbound connections over all destinations.")
    max_connections_per_destination: int = Field(
        10, ge=1, description="Outbound connections to one destination (domain or smarthost)."
    )
    max_recipients_per_transaction: int = Field(
        100, ge=1, description="Recipients sent in one SMTP transaction; more go in further transactions."
    )
    connect_timeout: float = Field(30.0, gt=0, description="Seconds to wait for a TCP connection.")
    command_timeout: float = Field(
        300.0, gt=0, description="Seconds to wait for a reply (RFC 5321 4.5.3.2: 5 minutes for most commands)."
    )
    data_timeout: float = Field(
        600.0, gt=0, description="Seconds to wait for the reply to the end of data (RFC 5321 4.5.3.2.6: 10 minutes)."
    )
    connection_idle_timeout: float = Field(
        30.0, ge=0, description="Seconds an idle outbound connection is kept for reuse."
    )
    max_messages_per_connection: int = Field(100, ge=1, description="Messages sent over one connection.")
    first_retry: float = Field(300.0, gt=0, description="Seconds from the first failed attempt to the first retry.")
    max_retry_interval: float = Field(14400.0, gt=0, description="Longest wait between retries (backoff cap).")
    max_queue_lifetime: float = Field(
        432000.0, gt=0, description="Seconds a message may stay queued before it is bounced (RFC 5321 4.5.4.1: 4-5 days)."
    )
    delay_warning_time: float = Field(
        14400.0, ge=0, description="Seconds after which a delay notice goes to the sender (NOTIFY permitting); 0: never."
    )
    postmaster: str = Field(
        "postmaster",
        description='Where undeliverable notices go (once). A bare local part gets "@" + hostname appended.',
    )
    batch_size: int = Field(200, ge=1, description="Messages claimed from the queue per scheduling round.")


class RouteConfig(_Section):
    domains: list[str] = Field(
        description='Recipient domains this route serves: exact names, "*.suffix" for sub-domains, or "*" for all.'
    )
    via: str = Field(
        "mx", description='"mx" (look up MX records), "smtp://HOST:PORT" or "smtps://HOST:PORT" (implicit TLS).'
    )
    tls: Literal["none", "opportunistic", "required", "verify"] = Field(
        "opportunistic", description="STARTTLS policy: none, opportunistic, required (unverified), verify."
    )
    username: str | None = Field(None, description="AUTH user name for a smarthost.")
    password_file: Path | None = Field(None, description="File holding the AUTH password (first line).")

    @field_validator("domains")
    @classmethod
    def _check_domains(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError('list at least one domain, or "*"')
        out = []
        for name in value:
            if name == "*":
                out.append(name)
                continue
            wildcard = name.startswith("*.")
            try:
                canon = canonical_domain(name[2:] if wildcard else name)
            except AddressError as exc:
                raise ValueError(f"{name!r} is not a domain or *.domain ({exc.reason})") from None
            out.append(("*." if wildcard else "") + canon)
        return out

    @field_validator("via")
    @classmethod
    def _check_via(cls, value: str) -> str:
        if value == "mx":
            return value
        scheme, sep, rest = value.partition("://")
        if not sep or scheme not in ("smtp", "smtps"):
            raise ValueError(f"{value!r}: write \"mx\", \"smtp://host:port\" or \"smtps://host:port\"")
        host, _, port = rest.rstrip("/").rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{value!r}: the smarthost needs a host and a port, e.g. \"smtp://relay.example:587\"")
        return value

    @model_validator(mode="after")
    def _auth_pair(self) -> RouteConfig:
        if (self.username is None) != (self.password_file is None):
            raise ValueError("set both username and password_file, or neither")
        return self


class LogConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = Field("info", description="Lowest level written to stderr.")


class Config(_Section):
    hostname: str = Field(
        default_factory=socket.getfqdn, description="Our name in the greeting, EHLO and Received headers."
    )
    listener: list[ListenerConfig] = Field(
        default_factory=lambda: [ListenerConfig(address="127.0.0.1:2525")],
        description="One [[listener]] table per address to accept SMTP on.",
    )
    relay: RelayConfig = Field(default_factory=RelayConfig, description="Who may relay where.")
    queue: QueueConfig = Field(default_factory=QueueConfig, description="Durable queue storage.")
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="Size, count and time limits.")
    tls: TlsConfig = Field(default_factory=TlsConfig, description="TLS certificate for STARTTLS.")
    auth: AuthConfig = Field(default_factory=AuthConfig, description="SMTP AUTH on submission listeners.")
    log: LogConfig = Field(default_factory=LogConfig, description="Logging.")
    dns: DnsConfig = Field(default_factory=DnsConfig, description="DNS resolution for delivery.")
    delivery: DeliveryConfig = Field(default_factory=DeliveryConfig, description="Outbound delivery and retries.")
    route: list[RouteConfig] = Field(
        default_factory=list,
        description="One [[route]] per group of recipient domains: MX delivery or a smarthost. Unmatched: MX.",
    )
    workers: int = Field(
        1, ge=1, le=64, description="Worker processes, each a whole relay on its own spool shard, sharing the "
        "listeners (SO_REUSEPORT). One per core when one core is the limit; see docs/architecture.md. Limits "
        "such as max_connections and in-memory rate limits apply per worker."
    )
    checks: ChecksConfig = Field(default_factory=ChecksConfig, description="Policy checks on incoming mail.")
    dkim: DkimConfig = Field(default_factory=DkimConfig, description="DKIM signing of outgoing mail.")

    @field_validator("hostname")
    @classmethod
    def _check_hostname(cls, value: str) -> str:
        try:
            canonical_domain(value)
        except AddressError:
            raise ValueError(f"{value!r} is not a host name; write a fully qualified name like \"mx.example.org\"") from None
        return value

    @field_validator("listener")
    @classmethod
    def _unique_listeners(cls, value: list[ListenerConfig]) -> list[ListenerConfig]:
        if not value:
            raise ValueError("at least one [[listener]] is needed")
        seen = set()
        for item in value:
            if item.host_port in seen:
                raise ValueError(f"listener address {item.address} appears twice")
            seen.add(item.host_port)
        return value

    def listener_checks(self, lc: ListenerConfig) -> list[str]:
        """The names of the checks a listener runs, in chain order."""
        enabled = self.checks.enabled_names()
        if lc.checks is not None:
            return [name for name in enabled if name in lc.checks]
        if lc.role == "mx":
            return enabled
        return [name for name in enabled if name == "ratelimit"]

    @model_validator(mode="after")
    def _workers_share_nothing(self) -> Config:
        if self.workers > 1 and self.checks.greylist.enabled and self.checks.greylist.backend == "memory":
            raise ValueError("checks.greylist with backend = \"memory\" keeps its triplets in each worker's memory "
                             "and a retry may reach another worker: set checks.greylist.backend = \"redis\" "
                             "(shared by every worker), or use workers = 1")
        return self

    @model_validator(mode="after")
    def _listener_checks_exist(self) -> Config:
        enabled = set(self.checks.enabled_names())
        for i, lc in enumerate(self.listener):
            for name in lc.checks or ():
                if name not in enabled:
                    raise ValueError(f"listener[{i}].checks names {name!r}, which is not an enabled check; enable "
                                     f"it under [checks] (enabled: {', '.join(sorted(enabled)) or 'none'})")
            names = self.listener_checks(lc)
            if "dmarc" in names and not {"spf", "dkim"} <= set(names):
                raise ValueError(f"listener[{i}].checks: dmarc needs spf and dkim on the same listener")
        return self

    @model_validator(mode="after")
    def _tls_for_submission(self) -> Config:
        for i, lc in enumerate(self.listener):
            has_cert = lc.certificate is not None or self.tls.certificate is not None
            if lc.role != "mx" and not has_cert:
                raise ValueError(
                    f"listener[{i}] ({lc.role}) needs a certificate: set [tls] certificate/key or the listener's "
                    "own; `mailhop tls self-signed --hostname H --out DIR` makes a pair for a first run"
                )
        return self
