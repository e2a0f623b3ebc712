"""Configuration validation: errors name the key and the fix; check-config exit codes; the reference is current."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mailhop.config import load_config
from mailhop.config.reference import render_reference
from mailhop.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "m.toml"
    p.write_text(text)
    return p


def test_sample_config_is_valid(tmp_path: Path) -> None:
    # The sample names var/tls/*.pem, made by scripts/run on first use: check it with a copy that has them.
    from mailhop.tlsutil import make_self_signed

    make_self_signed("relay.example.test", tmp_path / "var" / "tls")
    (tmp_path / "mailhop.toml").write_text((ROOT / "mailhop.sample.toml").read_text())
    cfg = load_config(tmp_path / "mailhop.toml")
    assert [lc.role for lc in cfg.listener] == ["mx", "submission", "submissions"]
    cfg = load_config(ROOT / "mailhop.sample.toml") if (ROOT / "var" / "tls" / "cert.pem").exists() else cfg
    assert cfg.listener[0].host_port == ("127.0.0.1", 2525)
    assert cfg.queue.path.name == "spool" and cfg.queue.path.parent.name == "var"
    assert cfg.relay.domains == ["example.test"]


def test_issue_keys_accepted(tmp_path: Path) -> None:
    cfg = load_config(
        write(
            tmp_path,
            """
hostname = "relay.example.test"
[[listener]]
address = "127.0.0.1:2525"
role = "mx"
[relay]
trusted_networks = ["127.0.0.0/8", "::1/128"]
domains = ["example.test"]
[queue]
path = "var/spool"
[limits]
max_message_size = 52428800
max_recipients = 1000
""",
        )
    )
    assert cfg.limits.max_recipients == 1000 and cfg.hostname == "relay.example.test"


@pytest.mark.parametrize(
    ("text", "key", "hint"),
    [
        ('[[listener]]\naddress = "127.0.0.1"\n', "listener[0].address", "HOST:PORT"),
        ('[[listener]]\naddress = "mail.example:25"\n', "listener[0].address", "not an IP address"),
        ('[relay]\ntrusted_networks = ["10.0.0.1/8"]\n', "relay.trusted_networks", "CIDR"),
        ('[relay]\ndomains = ["bad domain"]\n', "relay.domains", "valid domain"),
        ("[limits]\nmax_recipients = 10\n", "limits.max_recipients", "greater than or equal to 100"),
        ("[limits]\nmax_mesage_size = 10\n", "limits.max_mesage_size", "unknown key"),
        ('[tls]\ncertificate = "c.pem"\n', "tls", "both"),
        ('hostname = "not a host"\n', "hostname", "fully qualified"),
        ('[[listener]]\naddress = "127.0.0.1:25"\n[[listener]]\naddress = "127.0.0.1:25"\n', "listener", "twice"),
        ("[queue]\npage_size = 5000\n", "queue.page_size", "use 4096, 8192, 16384, 32768 or 65536"),
    ],
    ids=["no-port", "name-not-ip", "bad-cidr", "bad-domain", "too-few-rcpts", "typo", "tls-half", "hostname", "dup",
         "page-size"],
)
def test_errors_name_key_and_fix(tmp_path: Path, text: str, key: str, hint: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert f": {key}:" in info.value.detail, info.value.detail
    assert hint in info.value.detail


def test_missing_certificate_file_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"tls\.certificate: file .* does not exist"):
        load_config(write(tmp_path, '[tls]\ncertificate = "c.pem"\nkey = "k.pem"\n'))


def test_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[limits\n"))


def _check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailhop.cli", "check-config", "--config", str(path)], capture_output=True, text=True
    )


def test_check_config_exit_codes(tmp_path: Path) -> None:
    from mailhop.tlsutil import make_self_signed

    make_self_signed("relay.example.test", tmp_path / "var" / "tls")
    (tmp_path / "sample.toml").write_text((ROOT / "mailhop.sample.toml").read_text())
    ok = _check(tmp_path / "sample.toml")
    assert ok.returncode == 0 and "OK" in ok.stdout
    bad = _check(write(tmp_path, "[limits]\nmax_recipients = -1\n"))
    assert bad.returncode == 78
    assert "limits.max_recipients" in bad.stderr
    missing = _check(tmp_path / "nope.toml")
    assert missing.returncode == 78 and "file not found" in missing.stderr


def test_configuration_reference_is_current() -> None:
    assert (ROOT / "docs" / "configuration.md").read_text() == render_reference(), (
        "docs/configuration.md is stale: run `mailhop config-reference > docs/configuration.md`"
    )


def test_plaintext_auth_only_on_loopback(tmp_path: Path) -> None:
    from mailhop.tlsutil import make_self_signed

    make_self_signed("relay.example.test", tmp_path / "tls")
    tls = '[tls]\ncertificate = "tls/cert.pem"\nkey = "tls/key.pem"\n'
    ok = load_config(write(tmp_path, tls + '[[listener]]\naddress = "127.0.0.1:5870"\nrole = "submission"\n'
                                            "allow_plaintext_auth = true\n"))
    assert ok.listener[0].allow_plaintext_auth
    with pytest.raises(ConfigError, match=r"listener\[0\].*loopback"):
        load_config(write(tmp_path, tls + '[[listener]]\naddress = "192.0.2.1:587"\nrole = "submission"\n'
                                          "allow_plaintext_auth = true\n"))


def test_submission_needs_a_certificate(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"needs a certificate.*self-signed"):
        load_config(write(tmp_path, '[[listener]]\naddress = "127.0.0.1:5870"\nrole = "submission"\n'))
