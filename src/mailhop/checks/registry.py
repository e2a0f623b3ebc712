"""Builds each listener's policy chain from [checks]. Check objects are shared by every listener that names them
(one SPF thread pool, one greylist store, one rate-limit counter set)."""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .api import Check, FunctionCheck, Hook, Phase
from .chain import PolicyChain

if TYPE_CHECKING:
    from ..config.checks import ChecksConfig, CustomCheckConfig
    from ..dns import Resolver

__all__ = ["CheckError", "CheckRegistry", "load_callable"]

log = logging.getLogger("mailhop.checks")


class CheckError(ValueError):
    """A check cannot be built from its configuration (named key, reason)."""


def load_callable(spec: str) -> Hook:
    """Import "package.module:function" and check that it is an async function."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CheckError(f"cannot import {module_name!r} for check {spec!r}: {exc}") from exc
    func = getattr(module, attr, None)
    if func is None:
        raise CheckError(f"module {module_name!r} has no {attr!r} (check {spec!r})")
    if not inspect.iscoroutinefunction(func):
        raise CheckError(f"{spec!r} must be an async def taking a CheckContext")
    hook: Hook = func
    return hook


class CheckRegistry:
    """Instantiates each enabled check once, on first use."""

    def __init__(self, config: ChecksConfig, resolver: Resolver, hostname: str | None = None) -> None:
        self.config = config
        self.resolver = resolver
        self.hostname = hostname
        self._built: dict[str, Check] = {}

    def get(self, name: str) -> Check:
        check = self._built.get(name)
        if check is None:
            check = self._build(name)
            self._built[name] = check
        return check

    def chain(self, names: Sequence[str]) -> PolicyChain | None:
        """The chain for a listener running ``names`` (None when it runs none: the session skips all check work)."""
        if not names:
            return None
        return PolicyChain([self.get(n) for n in names], timeout=self.config.timeout, on_error=self.config.on_error)

    def _build(self, name: str) -> Check:
        c = self.config
        if name == "spf":
            from .spf import SpfCheck

            return SpfCheck(c.spf, self.resolver)
        if name == "dkim":
            from .dkimverify import DkimCheck

            return DkimCheck(c.dkim, self.resolver)
        if name == "arc":
            from .arc import ArcCheck

            return ArcCheck(c.arc, self.resolver)
        if name == "dmarc":
            from .dmarc import DmarcCheck

            return DmarcCheck(c.dmarc, self.resolver)
        if name == "dnsbl":
            from .dnsbl import DnsblCheck

            return DnsblCheck(c.dnsbl, self.resolver)
        if name == "greylist":
            from .greylist import GreylistCheck, GreylistStore, MemoryGreylistStore, RedisGreylistStore

            store: GreylistStore = (RedisGreylistStore(c.greylist.redis_url) if c.greylist.backend == "redis"
                                    else MemoryGreylistStore())
            return GreylistCheck(c.greylist, store)
        if name == "ratelimit":
            from .ratelimit import MemoryRateBackend, RateBackend, RateLimitCheck, RedisRateBackend

            backend: RateBackend = (RedisRateBackend(c.ratelimit.redis_url) if c.ratelimit.backend == "redis"
                                    else MemoryRateBackend())
            return RateLimitCheck(c.ratelimit, backend)
        if name == "rspamd":
            from .rspamd import RspamdCheck

            return RspamdCheck(c.rspamd)
        for m in c.milter:
            if m.name == name:
                from .milter import MilterCheck

                return MilterCheck(m, hostname=self.hostname)
        for cc in c.custom:
            if cc.name == name:
                return _custom(cc)
        raise CheckError(f"no check named {name!r}")

    async def aclose(self) -> None:
        """Close every check built; one that fails to close is logged and does not keep the others open."""
        for check in self._built.values():
            try:
                await check.aclose()
            except Exception:
                log.exception("closing check %s failed", check.name)


def _custom(cc: CustomCheckConfig) -> Check:
    return FunctionCheck(cc.name, Phase(cc.phase), load_callable(cc.callable), tuple(cc.requires))
