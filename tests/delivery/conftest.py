"""Fixtures for the delivery tests: anyio on asyncio, a throw-away CA and TLS contexts from it."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme

from mailhop.delivery.tls import make_client_context


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def server_tls(ca: trustme.CA) -> ssl.SSLContext:
    """Server context with a certificate for receiver.test and the loopback test addresses."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("receiver.test", "127.0.0.31", "127.0.0.32", "127.0.0.33").configure_cert(context)
    return context


@pytest.fixture(scope="session")
def cafile(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = Path(tmp_path_factory.mktemp("ca")) / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture(scope="session")
def trusting(cafile: str) -> Callable[[bool], ssl.SSLContext]:
    """An ssl_context_factory whose verifying contexts trust the test CA (and nothing else)."""
    return lambda verify: make_client_context(verify, cafile=cafile)
