"""Configuration of the policy checks ([checks]) and of DKIM signing ([dkim]). Part of the public schema."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..address import AddressError, canonical_domain

__all__ = [
    "CHECK_NAMES",
    "ArcConfig",
    "ChecksConfig",
    "CustomCheckConfig",
    "DkimConfig",
    "DkimSignConfig",
    "DkimVerifyConfig",
    "DmarcConfig",
    "DnsblConfig",
    "DnsblZoneConfig",
    "GreylistConfig",
    "MilterConfig",
    "RateLimitConfig",
    "RateRuleConfig",
    "RspamdConfig",
    "SpfConfig",
]

# The built-in checks, in their default order: cheap connection checks first, content filters last.
CHECK_NAMES = ("ratelimit", "dnsbl", "greylist", "spf", "dkim", "arc", "dmarc", "rspamd", "milter")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _networks(value: list[str], what: str) -> list[str]:
    """Validate addresses or networks (host bits allowed), naming the bad item and the expected form."""
    for item in value:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"{item!r} is not {what}") from None
    return value


TagOrReject = Literal["reject", "tempfail", "quarantine", "tag"]


class SpfConfig(_Section):
    enabled: bool = Field(False, description="Check SPF (RFC 7208) for MAIL FROM (and the HELO name).")
    helo: bool = Field(True, description="Also check the HELO identity; it decides for the null sender <>.")
    on_fail: TagOrReject = Field("reject", description='Action on "fail": reject (550 5.7.23), tempfail, '
                                 'quarantine or tag (only record it in Authentication-Results).')
    on_softfail: TagOrReject = Field("tag", description='Action on "softfail".')
    on_temperror: TagOrReject = Field("tag", description='Action on "temperror" (DNS trouble): tempfail asks the '
                                      "client to retry (451 4.7.24).")
    on_permerror: TagOrReject = Field("tag", description='Action on "permerror" (a broken record).')
    threads: int = Field(4, ge=1, le=64, description="Worker threads for SPF evaluation (pyspf is synchronous).")


class DkimVerifyConfig(_Section):
    enabled: bool = Field(False, description="Verify DKIM signatures (RFC 6376), RSA and Ed25519, at end of data.")
    max_signatures: int = Field(5, ge=1, le=50, description="Signatures verified per message; more are ignored.")
    min_rsa_bits: int = Field(1024, ge=512, description="RSA keys shorter than this fail (RFC 8301).")
    processes: int = Field(
        0, ge=0, le=64, description="Worker processes verifying signatures (dkimpy is pure Python, ~1 ms of CPU "
        "per signature). 0: threads inside the daemon. Processes only pay off with cores to spare: on 2 cores "
        "the hand-off cost more than it saved (bench/RESULTS.md)."
    )


class DmarcConfig(_Section):
    enabled: bool = Field(False, description="Evaluate DMARC (RFC 7489, DMARCbis tree walk); needs spf and dkim.")
    on_reject: TagOrReject = Field("reject", description="What a p=reject policy failure does here.")
    on_quarantine: TagOrReject = Field("quarantine", description="What a p=quarantine policy failure does here.")
    apply_pct: bool = Field(True, description="Honour pct= (sample the policy); false applies it to every message.")


class ArcConfig(_Section):
    enabled: bool = Field(False, description="Verify ARC chains (RFC 8617) and record arc= in Authentication-Results.")


class DnsblZoneConfig(_Section):
    zone: str = Field(description='DNS list zone, e.g. "zen.spamhaus.org" (a DNSWL zone takes a negative weight).')
    weight: float = Field(1.0, description="Score added when the client is listed (negative for allow lists).")
    answers: list[str] = Field(
        default_factory=list,
        description='Only these answers count (e.g. ["127.0.0.2", "127.0.0.0/24"]); empty: any 127.0.0.0/8 answer '
        "except 127.255.255.0/24 (the lists' error codes, e.g. Spamhaus \"query refused\").",
    )

    @field_validator("answers")
    @classmethod
    def _check_answers(cls, value: list[str]) -> list[str]:
        return _networks(value, 'an address or network, e.g. "127.0.0.2"')


class DnsblConfig(_Section):
    enabled: bool = Field(False, description="Score the client address against DNS block and allow lists at connect.")
    threshold: float = Field(1.0, description="A total score at or above this refuses the client's mail (554 5.7.1).")
    zones: list[DnsblZoneConfig] = Field(default_factory=list, description="One [[checks.dnsbl.zones]] per list.")
    cache_ttl: float = Field(300.0, ge=0, description="Seconds a client's score is remembered.")


_REDIS_URL = re.compile(r"^(rediss?://[^/\s]+(/\d+)?|unix://\S+)$")


def _redis_url(value: str) -> str:
    if not _REDIS_URL.match(value):
        raise ValueError(f"{value!r} is not a Redis URL, e.g. \"redis://127.0.0.1:6379/0\" (or rediss://, unix://)")
    return value


class GreylistConfig(_Section):
    enabled: bool = Field(False, description="Greylist (client /24 or /64, sender, recipient) triplets.")
    delay: float = Field(300.0, ge=0, description="Seconds a new triplet is refused with 451 4.7.1.")
    retry_window: float = Field(86400.0, gt=0, description="Seconds after the delay within which a retry passes.")
    expire: float = Field(36 * 86400.0, gt=0, description="Seconds a passed triplet stays known without new mail.")
    auto_allow_after: int = Field(
        5, ge=0, description="After this many passed triplets a client network skips greylisting (0: never)."
    )
    skip_networks: list[str] = Field(default_factory=list, description="Client networks (CIDR) never greylisted.")
    backend: Literal["memory", "redis"] = Field(
        "memory", description="Where triplets live: memory (this process, lost on restart) or redis (shared by every "
        "worker and relay using redis_url, kept across restarts; if Redis is down, mail passes ungreylisted and a "
        "warning is logged)."
    )
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis for backend = \"redis\".")

    _check_redis_url = field_validator("redis_url")(_redis_url)

    @field_validator("skip_networks")
    @classmethod
    def _check_networks(cls, value: list[str]) -> list[str]:
        return _networks(value, 'a network in CIDR form, e.g. "192.0.2.0/24"')


class RateRuleConfig(_Section):
    key: Literal["client_ip", "sender_domain", "recipient_domain"] = Field(
        description="What is counted per: the client address (IPv6 by /64), the MAIL FROM domain, each RCPT domain."
    )
    counter: Literal["connections", "messages", "recipients"] = Field(description="What is counted.")
    limit: int = Field(ge=1, description="The most allowed per window; beyond it 421/451 4.7.x.")
    window: float = Field(3600.0, gt=0, description="The window in seconds.")

    @model_validator(mode="after")
    def _sensible(self) -> RateRuleConfig:
        if self.counter == "connections" and self.key != "client_ip":
            raise ValueError("connections can only be counted per client_ip")
        return self


class RateLimitConfig(_Section):
    enabled: bool = Field(False, description="Enforce the [[checks.ratelimit.rules]].")
    backend: Literal["memory", "redis"] = Field(
        "memory", description="Where counters live: memory (this process) or redis (shared by every relay using "
        "redis_url; if Redis is down, limits are not enforced and a warning is logged)."
    )
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis for backend = \"redis\".")
    _check_redis_url = field_validator("redis_url")(_redis_url)
    exempt_authenticated: bool = Field(False, description="Authenticated users skip these limits (they have "
                                       "their own per-user limits).")
    rules: list[RateRuleConfig] = Field(default_factory=list, description="One [[checks.ratelimit.rules]] per limit.")


class RspamdConfig(_Section):
    enabled: bool = Field(False, description="Scan messages with rspamd's HTTP protocol (/checkv2).")
    url: str = Field("http://127.0.0.1:11333", description="rspamd's normal worker (or proxy) base URL.")
    timeout: float = Field(20.0, gt=0, description="Seconds for one scan.")
    password: str | None = Field(None, description="Sent as the Password header, if rspamd asks for one.")
    reject_score: float | None = Field(None, description="Reject at or above this score, whatever rspamd's action says.")
    add_header: bool = Field(True, description="Add X-Spam-Score / X-Spam-Status / X-Spam-Action headers.")

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/]+", value):
            raise ValueError(f"{value!r} is not an http(s) URL, e.g. \"http://127.0.0.1:11333\"")
        return value.rstrip("/")


class MilterConfig(_Section):
    name: str = Field(description="A name for logs and for listener check lists (milter:NAME).")
    address: str = Field(description='"inet:HOST:PORT" or "unix:/path/to/socket".')
    connect_timeout: float = Field(5.0, gt=0, description="Seconds to connect to the milter.")
    timeout: float = Field(30.0, gt=0, description="Seconds for each milter reply.")
    on_error: Literal["tempfail", "accept"] = Field(
        "tempfail", description="When the milter is down or misbehaves: tempfail (451) or accept without it."
    )

    @field_validator("address")
    @classmethod
    def _check_address(cls, value: str) -> str:
        kind, sep, rest = value.partition(":")
        if not sep or kind not in ("inet", "inet6", "unix") or not rest:
            raise ValueError(f"{value!r}: write \"inet:127.0.0.1:8891\" or \"unix:/run/milter.sock\"")
        if kind.startswith("inet"):
            host, _, port = rest.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"{value!r}: an inet milter needs HOST:PORT, e.g. \"inet:127.0.0.1:8891\"")
        return value


class CustomCheckConfig(_Section):
    name: str = Field(description="A name for logs and for listener check lists.")
    callable: str = Field(description='"package.module:function": an async def taking a CheckContext.')
    phase: Literal["connect", "helo", "mail", "rcpt", "data"] = Field(description="When it runs.")
    requires: list[str] = Field(default_factory=list, description="Checks whose results it reads (run before it).")

    @field_validator("callable")
    @classmethod
    def _check_callable(cls, value: str) -> str:
        if not re.match(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", value):
            raise ValueError(f"{value!r}: write \"package.module:function\"")
        return value


class ChecksConfig(_Section):
    authserv_id: str | None = Field(None, description="The authserv-id of our Authentication-Results header "
                                    "(RFC 8601); default: hostname. Headers with it from outside are removed.")
    timeout: float = Field(15.0, gt=0, description="Seconds each check's hook may take.")
    on_error: Literal["tempfail", "accept"] = Field(
        "tempfail", description="A check that fails or overruns: tempfail (451 4.7.0) or accept (fail open)."
    )
    max_scan_size: int = Field(
        10 * 1024 * 1024, ge=0, description="Content checks (DKIM, ARC, rspamd, milter, custom) see messages up to "
        "this size; larger ones are passed unscanned (logged)."
    )
    spf: SpfConfig = Field(default_factory=SpfConfig, description="SPF.")
    dkim: DkimVerifyConfig = Field(default_factory=DkimVerifyConfig, description="DKIM verification.")
    dmarc: DmarcConfig = Field(default_factory=DmarcConfig, description="DMARC.")
    arc: ArcConfig = Field(default_factory=ArcConfig, description="ARC verification.")
    dnsbl: DnsblConfig = Field(default_factory=DnsblConfig, description="DNS block/allow lists.")
    greylist: GreylistConfig = Field(default_factory=GreylistConfig, description="Greylisting.")
    ratelimit: RateLimitConfig = Field(default_factory=RateLimitConfig, description="Rate limits.")
    rspamd: RspamdConfig = Field(default_factory=RspamdConfig, description="rspamd over HTTP.")
    milter: list[MilterConfig] = Field(default_factory=list, description="One [[checks.milter]] per milter.")
    custom: list[CustomCheckConfig] = Field(default_factory=list, description="One [[checks.custom]] per "
                                            "user check (a Python async function).")

    @model_validator(mode="after")
    def _consistent(self) -> ChecksConfig:
        if self.dmarc.enabled and not (self.spf.enabled and self.dkim.enabled):
            raise ValueError("checks.dmarc needs checks.spf.enabled = true and checks.dkim.enabled = true")
        names = [m.name for m in self.milter] + [c.name for c in self.custom]
        for name in names:
            if name in CHECK_NAMES:
                raise ValueError(f"check name {name!r} is a built-in check's name; choose another, e.g. "
                                 f"\"{name}-milter\"")
            if names.count(name) > 1:
                raise ValueError(f"check name {name!r} is used by two [[checks.milter]]/[[checks.custom]] tables")
        return self

    def enabled_names(self) -> list[str]:
        """Every enabled check's name, in the default order."""
        out = [n for n in CHECK_NAMES[:-1] if getattr(self, n).enabled]
        out += [m.name for m in self.milter]
        out += [c.name for c in self.custom]
        return out


class DkimSignConfig(_Section):
    domain: str = Field(description="Sign mail whose From: domain is this domain (or a sub-domain of it).")
    selector: str = Field(description="The selector (s=): the key is published at SELECTOR._domainkey.DOMAIN.")
    key_file: Path = Field(description="PEM private key (RSA 2048+ or Ed25519); `mailhop dkim keygen` makes one.")
    headers: list[str] = Field(
        default_factory=lambda: ["From", "Reply-To", "Subject", "Date", "To", "Cc", "Message-ID", "In-Reply-To",
                                 "References", "MIME-Version", "Content-Type", "Content-Transfer-Encoding",
                                 "List-Unsubscribe", "List-Unsubscribe-Post"],
        description="Header fields signed (h=); From is always included.",
    )
    oversign: bool = Field(True, description="Sign one more instance of each header than present (blocks added "
                           "copies).")

    @field_validator("domain")
    @classmethod
    def _check_domain(cls, value: str) -> str:
        try:
            return canonical_domain(value)
        except AddressError as exc:
            raise ValueError(f"{value!r} is not a domain ({exc.reason})") from None

    @field_validator("selector")
    @classmethod
    def _check_selector(cls, value: str) -> str:
        if not re.match(r"^[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*$",
                        value):
            raise ValueError(f"{value!r} is not a selector (letters, digits, hyphens, dots), e.g. \"s2026\"")
        return value


class DkimConfig(_Section):
    sign: list[DkimSignConfig] = Field(default_factory=list, description="One [[dkim.sign]] per signing domain.")
    sign_trusted_only: bool = Field(
        True, description="Sign only mail from authenticated users, trusted networks and mailhop itself (never "
        "mail that arrived from outside: that would make us a signing oracle for forgers)."
    )
