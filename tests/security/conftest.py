"""The security suite reuses the daemon fixtures (a relay trusting loopback, and an MX relay trusting no one)."""

from tests.daemon.conftest import mx_relay, relay  # noqa: F401
