"""Route selection (pure): exact beats wildcard, longest suffix wins, "*" catches the rest, MX by default."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailhop.config.schema import RouteConfig
from mailhop.delivery.transport import TlsPolicy
from mailhop.routing import Router


def test_default_is_mx() -> None:
    assert Router().route("example.test").is_mx


def test_matching_order(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    router = Router([
        RouteConfig(domains=["*"], via="smtp://smarthost.test:587", tls="required", username="u", password_file=secret),
        RouteConfig(domains=["*.corp.test"], via="smtps://inner.test:465"),
        RouteConfig(domains=["*.eu.corp.test"], via="smtp://eu.test:25", tls="verify"),
        RouteConfig(domains=["direct.corp.test", "Bücher.test"], via="mx"),
    ])
    r = router.route("anything.test")
    assert (r.host, r.port, r.tls, r.username, r.password) == ("smarthost.test", 587, TlsPolicy.REQUIRED, "u", "s3cret")
    assert router.route("a.corp.test").host == "inner.test" and router.route("a.corp.test").implicit_tls
    assert router.route("x.eu.corp.test").host == "eu.test"
    assert router.route("direct.corp.test").is_mx
    assert router.route("xn--bcher-kva.test").is_mx
    assert router.route("corp.test").host == "smarthost.test"  # *.corp.test does not match corp.test itself


@pytest.mark.parametrize("via", ["smtp://host", "http://x:1", "smtp://:25", "smtp://h:99999"])
def test_bad_via_refused(via: str) -> None:
    with pytest.raises(ValueError, match="via"):
        RouteConfig(domains=["*"], via=via)


def test_username_needs_password() -> None:
    with pytest.raises(ValueError, match="password_file"):
        RouteConfig(domains=["*"], via="smtp://h:25", username="u")
