"""SMTP AUTH users: scrypt hashing, SCRAM credentials, the SQLite user store, may_send_as, ``mailhop users``."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import sqlite3
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from mailhop.auth import passwords
from mailhop.auth.passwords import DUMMY_HASH, hash_password, needs_rehash, verify_password
from mailhop.auth.users import (
    User,
    UserExistsError,
    UserNotFoundError,
    UserStore,
    may_send_as,
    normalize_address,
    normalize_name,
)
from mailhop.cli.users_cmds import users

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[UserStore]:
    s = UserStore.for_spool(tmp_path / "spool")
    try:
        yield s
    finally:
        s.close()


class ScryptCounter:
    """Counts KDF runs through the ``passwords._scrypt`` seam (and still runs the real thing)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        self.real = passwords._scrypt
        monkeypatch.setattr(passwords, "_scrypt", self)

    def __call__(self, *args: Any) -> bytes:
        self.calls += 1
        return self.real(*args)


# --- passwords ---------------------------------------------------------------------------------------


def test_hash_verify_round_trip() -> None:
    encoded = hash_password("correct horse battery staple")
    prefix, n, r, p, salt, digest = encoded.split("$")
    assert (prefix, n, r, p) == ("scrypt", str(2**15), "8", "1")
    assert len(passwords._unb64(salt)) == 16 and len(passwords._unb64(digest)) == 32
    assert verify_password("correct horse battery staple", encoded)
    assert not verify_password("correct horse battery stapler", encoded)
    assert not verify_password("", encoded)
    assert hash_password("x") != hash_password("x")  # fresh salt each time
    assert not needs_rehash(encoded)


def test_passwords_are_nfkc_normalised_and_bounded() -> None:
    encoded = hash_password("\ufb01sh")  # the "fi" ligature
    assert verify_password("fish", encoded)
    assert verify_password("\ufb01sh", encoded)
    assert hash_password("x" * 1024)
    for bad in ("", "x" * 1025, "a\x00b", "\ud800"):
        with pytest.raises(ValueError):
            hash_password(bad)
    assert not verify_password("x" * 5000, encoded)


def test_stored_parameters_are_honoured() -> None:
    salt = b"0123456789abcdef"
    digest = hashlib.scrypt(b"pw", salt=salt, n=2**10, r=4, p=2, dklen=32)
    encoded = f"scrypt${2**10}$4$2${passwords._b64(salt)}${passwords._b64(digest)}"
    assert verify_password("pw", encoded)
    assert not verify_password("pW", encoded)
    assert needs_rehash(encoded)


GOOD = hash_password("pw")


@pytest.mark.parametrize(
    "encoded",
    [
        "",
        "pw",
        "scrypt",
        "scrypt$",
        "scrypt$$$$$",
        "bcrypt$32768$8$1$AAAA$AAAA",
        GOOD.replace("scrypt$", "SCRYPT$"),
        GOOD + "$extra",
        GOOD.rsplit("$", 1)[0] + "$!!notbase64!!",
        GOOD.rsplit("$", 1)[0] + "$QUJD",  # digest too short
        GOOD.replace("$32768$", "$32767$"),  # n not a power of two
        GOOD.replace("$32768$", "$0$"),
        GOOD.replace("$32768$", "$-32768$"),
        GOOD.replace("$32768$", "$+32768$"),
        GOOD.replace("$32768$", "$\uff13\uff12768$"),  # fullwidth digits
        GOOD.replace("$32768$", f"${2**40}$"),  # would need terabytes
        GOOD.replace("$8$1$", "$99999$1$"),
        GOOD.replace("$32768$8$", f"${2**20}$32$"),  # 4 GiB
        GOOD.replace("$8$1$", "$8$16$").replace("$32768$", f"${2**18}$"),  # within each bound, too slow overall
        GOOD.replace("$8$1$", "$8$0$"),
        "scrypt$32768$8$1$\u00e9\u00e9$AAAA",
        "\x00" * 100,
    ],
)
def test_garbage_encodings_are_false_never_raise(encoded: str) -> None:
    assert verify_password("pw", encoded) is False
    assert needs_rehash(encoded)


def test_non_string_encodings_are_false() -> None:
    for value in (None, b"scrypt$", 42, ["scrypt"]):
        assert verify_password("pw", value) is False


def test_dummy_hash_is_well_formed_and_matches_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    counter = ScryptCounter(monkeypatch)
    assert not needs_rehash(DUMMY_HASH)  # current parameters: costs what a real verification costs
    assert verify_password("", DUMMY_HASH) is False
    assert verify_password("password", DUMMY_HASH) is False
    assert counter.calls == 1  # "" is refused before the KDF; "password" runs it once


def rfc5802(password: str, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    return hashlib.sha256(client_key).digest(), hmac.new(salted, b"Server Key", "sha256").digest()


def test_scram_credentials_follow_rfc5802() -> None:
    creds = passwords.make_scram_credentials("pencil")
    assert creds.iterations == 4096 and len(creds.salt) >= 16
    assert (creds.stored_key, creds.server_key) == rfc5802("pencil", creds.salt, 4096)
    other = passwords.make_scram_credentials("pencil")
    assert other.salt != creds.salt


# --- names and addresses -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("alice", "alice"),
        ("Alice@Example.ORG", "alice@example.org"),
        ("x" * 64, "x" * 64),
        ("b\u00f6b", "b\u00f6b"),
        ("\uff41\uff42", "ab"),  # fullwidth letters: NFKC
        ("a:b+c/d", "a:b+c/d"),
    ],
)
def test_valid_names(name: str, expected: str) -> None:
    assert normalize_name(name) == expected


@pytest.mark.parametrize("name", ["", "x" * 65, "a b", "a\tb", "a\nb", "a\x00b", "a\x7fb", "a\u200bb", "\u00a0", "a\u2028"])
def test_invalid_names(name: str) -> None:
    with pytest.raises(ValueError):
        normalize_name(name)


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("Alice@Example.ORG", "alice@example.org"),
        ("<bob@example.org>", "bob@example.org"),
        ("@Example.ORG", "@example.org"),
        ("x@b\u00fccher.example", "x@xn--bcher-kva.example"),
        ("@B\u00fccher.example", "@xn--bcher-kva.example"),
        ("u@[192.0.2.1]", "u@[192.0.2.1]"),
    ],
)
def test_normalize_address(address: str, expected: str) -> None:
    assert normalize_address(address) == expected


@pytest.mark.parametrize("address", ["", "@", "alice", "alice@", "a b@example.org", "@bad domain", "@example.org.", "<>", "@a@b"])
def test_invalid_addresses(address: str) -> None:
    with pytest.raises(ValueError):
        normalize_address(address)


USER = User("u", addresses=("alice@example.org", "@corp.example", "x@xn--bcher-kva.example"))


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("alice@example.org", True),
        ("ALICE@EXAMPLE.ORG", True),  # whole address compared case-insensitively
        ("<alice@example.org>", True),
        ("bob@example.org", False),  # exact entry only covers alice
        ("alice@sub.example.org", False),
        ("anyone@corp.example", True),  # @domain entry
        ("Anyone@CORP.example", True),
        ("anyone@sub.corp.example", False),  # not subdomains
        ("anyone@corp.example.evil", False),
        ("corp.example@evil.example", False),
        ("x@B\u00fccher.example", True),  # U-label matches the stored A-label
        ("x@xn--bcher-kva.example", True),
        ("", False),  # null path
        ("<>", False),
        ("garbage", False),
        ("alice@example.org@evil.example", False),
        ("<@corp.example:alice@evil.example>", False),
    ],
)
def test_may_send_as(address: str, allowed: bool) -> None:
    assert may_send_as(USER, address) is allowed
    assert USER.may_send_as(address) is allowed


def test_user_without_addresses_may_send_as_nothing() -> None:
    assert not may_send_as(User("u"), "u@example.org")


# --- the store ---------------------------------------------------------------------------------------


def test_store_crud(store: UserStore) -> None:
    user = store.add("Alice", "s3cret", ["Alice@Example.org", "@corp.example", "alice@example.org"],
                     max_messages_per_hour=100, max_recipients_per_message=10)
    assert user.name == "alice"
    assert user.addresses == ("alice@example.org", "@corp.example")  # canonical, duplicates dropped
    assert (user.max_messages_per_hour, user.max_recipients_per_message, user.disabled) == (100, 10, False)
    assert store.get("ALICE") == user
    assert store.get("nobody") is None
    assert store.get("bad name") is None
    with pytest.raises(UserExistsError):
        store.add("alice", "other")
    store.add("bob", "pw")
    assert [u.name for u in store.list()] == ["alice", "bob"]
    bob = store.get("bob")
    assert bob is not None and bob.addresses == () and bob.max_messages_per_hour is None and not bob.disabled

    assert store.set_addresses("alice", ["@example.net"]).addresses == ("@example.net",)
    assert store.set_addresses("alice", []).addresses == ()
    limited = store.set_limits("alice", max_messages_per_hour=None, max_recipients_per_message=5)
    assert (limited.max_messages_per_hour, limited.max_recipients_per_message) == (None, 5)
    assert store.set_disabled("alice", True).disabled
    assert not store.set_disabled("alice", False).disabled
    assert limited.updated >= user.updated

    store.remove("Alice")
    assert store.get("alice") is None
    for op in (
        lambda: store.remove("alice"),
        lambda: store.set_password("alice", "x"),
        lambda: store.set_addresses("alice", []),
        lambda: store.set_limits("alice", max_messages_per_hour=1, max_recipients_per_message=1),
        lambda: store.set_disabled("alice", True),
    ):
        with pytest.raises(UserNotFoundError):
            op()


def test_store_rejects_bad_input(store: UserStore) -> None:
    calls: tuple[Callable[[], object], ...] = (
        lambda: store.add("a b", "pw"),
        lambda: store.add("ok", ""),
        lambda: store.add("ok", "pw", ["not an address"]),
        lambda: store.add("ok", "pw", "alice@example.org"),  # a str, not a list
        lambda: store.add("ok", "pw", max_messages_per_hour=0),
        lambda: store.add("ok", "pw", max_recipients_per_message=-1),
    )
    for call in calls:
        with pytest.raises(ValueError):
            call()
    assert store.list() == []


def test_store_file_layout_and_durability_settings(store: UserStore, tmp_path: Path) -> None:
    store.add("alice", "pw")
    path = tmp_path / "spool" / "users.db"
    assert store.path == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # it holds password hashes
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        row = conn.execute(
            "SELECT name, password, scram_salt, scram_iterations, scram_stored_key, scram_server_key, addresses,"
            " max_messages_per_hour, max_recipients_per_message, disabled, created, updated FROM users"
        ).fetchone()
    conn.close()
    assert row[0] == "alice" and verify_password("pw", row[1])
    assert (row[4], row[5]) == rfc5802("pw", row[2], row[3])
    assert json.loads(row[6]) == [] and row[7] is None and row[9] == 0
    with store._conn() as c:
        assert c.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_set_password_replaces_both_credentials(store: UserStore) -> None:
    store.add("alice", "old")
    store.set_password("alice", "new")
    assert store._authenticate_sync("alice", "new") is not None
    assert store._authenticate_sync("alice", "old") is None
    creds = store._scram_sync("alice")
    assert creds is not None and (creds.stored_key, creds.server_key) == rfc5802("new", creds.salt, creds.iterations)


# --- async API ---------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_authenticate(store: UserStore, monkeypatch: pytest.MonkeyPatch) -> None:
    store.add("alice", "pw", ["alice@example.org"])
    store.add("mallory", "pw")
    store.set_disabled("mallory", True)
    counter = ScryptCounter(monkeypatch)
    user = await store.authenticate("ALICE", "pw")
    assert user is not None and user.name == "alice" and user.addresses == ("alice@example.org",)
    assert counter.calls == 1
    assert await store.authenticate("alice", "wrong") is None
    assert counter.calls == 2
    # Unknown, disabled and invalid names still run the KDF once each (against DUMMY_HASH).
    assert await store.authenticate("nobody", "pw") is None
    assert counter.calls == 3
    assert await store.authenticate("mallory", "pw") is None
    assert counter.calls == 4
    assert await store.authenticate("not a name", "pw") is None
    assert counter.calls == 5
    assert await store.get_user("alice") == user
    assert await store.get_user("nobody") is None


@pytest.mark.anyio
async def test_scram_credentials(store: UserStore) -> None:
    store.add("alice", "pencil")
    creds = await store.scram_credentials("Alice")
    assert creds is not None and creds.iterations == 4096
    assert (creds.stored_key, creds.server_key) == rfc5802("pencil", creds.salt, 4096)
    assert await store.scram_credentials("nobody") is None
    store.set_disabled("alice", True)
    assert await store.scram_credentials("alice") is None


@pytest.mark.anyio
async def test_authenticate_keeps_the_loop_responsive(store: UserStore, monkeypatch: pytest.MonkeyPatch) -> None:
    store.add("alice", "pw")
    in_kdf = threading.Event()
    loop_ran = threading.Event()
    waited: list[bool] = []
    real = passwords._scrypt

    def blocking_kdf(*args: Any) -> bytes:
        in_kdf.set()
        waited.append(loop_ran.wait(10))  # only the event loop can set this
        return real(*args)

    monkeypatch.setattr(passwords, "_scrypt", blocking_kdf)
    task = asyncio.create_task(store.authenticate("alice", "pw"))
    assert await asyncio.to_thread(in_kdf.wait, 10)  # the loop keeps running while the KDF has started
    asyncio.get_running_loop().call_soon(loop_ran.set)  # a callback scheduled while the KDF is in flight
    user = await asyncio.wait_for(task, 10)
    assert waited == [True]
    assert user is not None and user.name == "alice"


@pytest.mark.anyio
async def test_kdf_pool_is_bounded(store: UserStore, monkeypatch: pytest.MonkeyPatch) -> None:
    store.add("alice", "pw")
    lock = threading.Lock()
    running = peak = 0
    real = passwords._scrypt

    def tracking_kdf(*args: Any) -> bytes:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        try:
            return real(*args)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(passwords, "_scrypt", tracking_kdf)
    results = await asyncio.gather(*(store.authenticate(n, "pw") for n in ["alice", "x", "y", "z"] * 3))
    assert 1 <= peak <= 2  # never more KDF runs at once than pool workers
    assert sum(r is not None for r in results) == 3
    assert len([t for t in threading.enumerate() if t.name.startswith("mailhop-kdf")]) <= 2


@pytest.mark.anyio
async def test_running_store_sees_cli_changes(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    daemon = UserStore.for_spool(tmp_path / "spool")
    try:
        assert await daemon.authenticate("alice", "pw1") is None
        runner = CliRunner()
        assert runner.invoke(users, ["add", "alice", "-c", str(config), "--password-stdin"], input="pw1\n").exit_code == 0
        assert await daemon.authenticate("alice", "pw1") is not None
        assert runner.invoke(users, ["passwd", "alice", "-c", str(config), "--password-stdin"], input="pw2\n").exit_code == 0
        assert await daemon.authenticate("alice", "pw1") is None
        assert await daemon.authenticate("alice", "pw2") is not None
        assert runner.invoke(users, ["addresses", "alice", "a@example.org", "-c", str(config)]).exit_code == 0
        user = await daemon.get_user("alice")
        assert user is not None and user.addresses == ("a@example.org",)
        assert runner.invoke(users, ["disable", "alice", "-c", str(config)]).exit_code == 0
        assert await daemon.authenticate("alice", "pw2") is None
        assert runner.invoke(users, ["enable", "alice", "-c", str(config)]).exit_code == 0
        assert await daemon.authenticate("alice", "pw2") is not None
        # A second process writing directly, not through this store object, is seen too.
        with UserStore(tmp_path / "spool" / "users.db") as other:
            other.remove("alice")
        assert await daemon.authenticate("alice", "pw2") is None
        assert await daemon.scram_credentials("alice") is None
    finally:
        await daemon.aclose()


# --- the CLI -----------------------------------------------------------------------------------------


def write_config(tmp_path: Path) -> Path:
    path = tmp_path / "mailhop.toml"
    path.write_text('hostname = "relay.example.test"\n[queue]\npath = "spool"\n')
    return path


def test_cli(tmp_path: Path) -> None:
    cfg = ["-c", str(write_config(tmp_path))]
    runner = CliRunner()

    r = runner.invoke(users, ["add", "Alice", *cfg, "--address", "alice@example.org", "--address", "@corp.example",
                              "--max-messages-per-hour", "50", "--max-recipients", "20", "--password-stdin"],
                      input="s3cret\n")
    assert r.exit_code == 0, r.output
    assert "alice: added" in r.stdout
    # Prompted twice; a mismatch asks again.
    r = runner.invoke(users, ["add", "bob", *cfg], input="one\ntwo\npw\npw\n")
    assert r.exit_code == 0, r.output
    assert r.stdout.count("Password:") == 2
    assert "pw" not in r.stdout  # hidden input is not echoed

    r = runner.invoke(users, ["add", "ALICE", *cfg, "--password-stdin"], input="x\n")
    assert r.exit_code == 1 and "already exists" in r.stderr

    r = runner.invoke(users, ["list", *cfg, "--json"])
    assert r.exit_code == 0
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["name"] for row in rows] == ["alice", "bob"]
    assert rows[0]["addresses"] == ["alice@example.org", "@corp.example"]
    assert (rows[0]["max_messages_per_hour"], rows[0]["max_recipients_per_message"]) == (50, 20)
    assert "s3cret" not in r.stdout and "scrypt" not in r.stdout

    r = runner.invoke(users, ["list", *cfg])
    assert r.exit_code == 0 and "@corp.example" in r.stdout and "2 user(s)" in r.stdout

    r = runner.invoke(users, ["addresses", "bob", "bob@example.org", "@example.net", *cfg])
    assert r.exit_code == 0 and "bob@example.org, @example.net" in r.stdout
    r = runner.invoke(users, ["addresses", "bob", *cfg])
    assert r.exit_code == 64  # neither addresses nor --clear
    r = runner.invoke(users, ["addresses", "bob", "--clear", *cfg])
    assert r.exit_code == 0 and "(none)" in r.stdout
    r = runner.invoke(users, ["limits", "bob", "--max-recipients", "3", *cfg])
    assert r.exit_code == 0

    r = runner.invoke(users, ["passwd", "bob", *cfg, "--password-stdin"], input="new\r\n")
    assert r.exit_code == 0
    with UserStore.for_spool(tmp_path / "spool") as s:
        assert s._authenticate_sync("bob", "new") is not None  # one CRLF terminator stripped
        bob = s.get("bob")
        assert bob is not None and bob.max_recipients_per_message == 3 and bob.addresses == ()

    r = runner.invoke(users, ["remove", "bob", *cfg])
    assert r.exit_code == 0 and "bob: removed" in r.stdout
    for args in (["remove", "bob"], ["passwd", "bob", "--password-stdin"], ["addresses", "bob", "b@example.org"],
                 ["disable", "bob"], ["limits", "bob"]):
        r = runner.invoke(users, [*args, *cfg], input="pw\n")
        assert r.exit_code == 1, (args, r.output)
        assert "no user 'bob'" in r.stderr


@pytest.mark.parametrize(
    ("args", "stdin"),
    [
        (["add", "bad name", "--password-stdin"], "pw\n"),
        (["add", "carol", "--address", "not-an-address", "--password-stdin"], "pw\n"),
        (["add", "carol", "--max-recipients", "0", "--password-stdin"], "pw\n"),
        (["add", "carol", "--password-stdin"], "\n"),  # empty password
        (["add", "carol", "--password-stdin"], "a\x00b\n"),
        (["add", "carol", "--bogus"], ""),
        (["add"], ""),
        (["frobnicate"], ""),
        (["list", "extra-argument"], ""),
    ],
)
def test_cli_usage_errors_exit_64(tmp_path: Path, args: list[str], stdin: str) -> None:
    r = CliRunner().invoke(users, [*args, "-c", str(write_config(tmp_path))], input=stdin)
    assert r.exit_code == 64, r.output
    with UserStore.for_spool(tmp_path / "spool") as s:
        assert s.list() == []


def test_cli_config_error_exits_78(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[queue\n")
    r = CliRunner().invoke(users, ["list", "-c", str(bad)])
    assert r.exit_code == 78 and "configuration error" in r.stderr
    r = CliRunner().invoke(users, ["list", "-c", str(tmp_path / "missing.toml")])
    assert r.exit_code == 78


def test_cli_subprocess(tmp_path: Path) -> None:
    cfg = str(write_config(tmp_path))
    code = "from mailhop.cli.users_cmds import users; users(prog_name='mailhop users')"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}

    def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", code, *args], input=stdin, capture_output=True, text=True,
                              env=env, timeout=60, check=False)

    r = run("add", "dave@example.org", "-c", cfg, "--address", "@example.org", "--password-stdin", stdin="hunter2\n")
    assert r.returncode == 0, r.stderr
    r = run("list", "-c", cfg, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["addresses"] == ["@example.org"]
    assert run("add", "dave@example.org", "-c", cfg, "--password-stdin", stdin="x\n").returncode == 1
    assert run("add", "-c", cfg).returncode == 64
    with UserStore.for_spool(tmp_path / "spool") as s:
        user = s._authenticate_sync("Dave@Example.org", "hunter2")
        assert user is not None and user.may_send_as("someone@example.org")


@pytest.mark.anyio
async def test_verified_credentials_cache(store: UserStore, monkeypatch: pytest.MonkeyPatch) -> None:
    store.add("alice", "pw", ["alice@example.org"])
    counter = ScryptCounter(monkeypatch)
    assert await store.authenticate("alice", "pw") is not None
    assert await store.authenticate("alice", "pw") is not None
    assert counter.calls == 1  # the second login hit the cache: no KDF
    assert await store.authenticate("alice", "wrong") is None
    assert counter.calls == 2  # a wrong password always pays the KDF
    store.set_password("alice", "new")
    before = counter.calls
    assert await store.authenticate("alice", "pw") is None  # the old password is not served from the cache
    assert counter.calls == before + 1
    store.set_disabled("alice", True)
    assert await store.authenticate("alice", "new") is None  # disabled wins over any cache
