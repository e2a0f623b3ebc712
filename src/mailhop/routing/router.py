"""Recipient domain -> Route. Routes come from ``[[route]]`` tables; a domain no route names goes by MX.

Matching: an exact domain wins over any wildcard; among ``*.suffix`` wildcards the longest suffix wins; ``*``
matches everything else. Within the same specificity the first route in the file wins.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..config.schema import RouteConfig
from ..delivery.transport import TlsPolicy
from ..errors import ConfigError

__all__ = ["Route", "Router"]


@dataclass(frozen=True, slots=True)
class Route:
    """How to deliver: by MX (``host`` None) or through a smarthost."""

    key: str  # "mx" or the smarthost URL; throttling is per domain for mx, per key for smarthosts
    host: str | None = None
    port: int = 25
    implicit_tls: bool = False
    tls: TlsPolicy = TlsPolicy.OPPORTUNISTIC
    username: str | None = None
    password: str | None = None

    @property
    def is_mx(self) -> bool:
        return self.host is None


MX = Route("mx")


def _route_from_config(cfg: RouteConfig) -> Route:
    password = None
    if cfg.password_file is not None:
        try:
            password = cfg.password_file.read_text(encoding="utf-8").splitlines()[0].strip()
        except (OSError, IndexError, UnicodeDecodeError) as exc:
            raise ConfigError(f"route password_file {cfg.password_file}: cannot read a password: {exc}") from None
    tls = TlsPolicy(cfg.tls)
    if cfg.via == "mx":
        return Route("mx", tls=tls)
    scheme, _, rest = cfg.via.partition("://")
    host, _, port = rest.rstrip("/").rpartition(":")
    return Route(cfg.via, host.strip("[]"), int(port), scheme == "smtps", tls, cfg.username, password)


class Router:
    """Chooses the route of a recipient domain."""

    def __init__(self, routes: Sequence[RouteConfig] = ()) -> None:
        self._exact: dict[str, Route] = {}
        self._suffixes: list[tuple[str, Route]] = []
        self._default = MX
        default_set = False
        for cfg in routes:
            route = _route_from_config(cfg)
            for name in cfg.domains:
                if name == "*":
                    if not default_set:
                        self._default, default_set = route, True
                elif name.startswith("*."):
                    self._suffixes.append((name[1:], route))
                else:
                    self._exact.setdefault(name, route)
        # Longest suffix first; sorted() is stable so file order breaks ties.
        self._suffixes.sort(key=lambda item: -len(item[0]))

    def route(self, domain: str) -> Route:
        """The route for a canonical (lowercase A-label) domain."""
        found = self._exact.get(domain)
        if found is not None:
            return found
        for suffix, route in self._suffixes:
            if domain.endswith(suffix):
                return route
        return self._default
