"""Server-side SASL mechanisms: PLAIN, LOGIN and SCRAM-SHA-256, against tables, RFC 7677 and a client."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailhop.reply import Reply
from mailhop.smtp import (
    MECHANISMS,
    AuthReply,
    Challenge,
    CheckPassword,
    Failure,
    NeedScramCredentials,
    ScramCredentials,
    Success,
    challenge_reply,
    derive_scram_credentials,
    make_mechanism,
    step_reply,
    verify_scram_password,
)
from mailhop.smtp.sasl import ScramSha256, saslprep

STEPS = (Challenge, CheckPassword, NeedScramCredentials, Success, Failure)

# -- PLAIN ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (b"\0user\0secret", CheckPassword("", "user", "secret")),
        (b"user\0user\0secret", CheckPassword("user", "user", "secret")),
        ("\0j\u00f6rg\0p\u00e4ss w\u00f6rd".encode(), CheckPassword("", "j\u00f6rg", "p\u00e4ss w\u00f6rd")),
        ("\0\u2168\0x".encode(), CheckPassword("", "IX", "x")),  # SASLprep (NFKC) on the user name
    ],
)
def test_plain_accepts(message: bytes, expected: CheckPassword) -> None:
    mech = make_mechanism("PLAIN")
    assert mech.start(message) == expected
    assert mech.password_result(True) == Success(expected.username)


@pytest.mark.parametrize(
    "message",
    [
        b"", b"user", b"\0user", b"\0user\0", b"\0\0secret", b"a\0b\0c\0d", b"admin\0user\0secret",
        b"\0us\xffer\0secret", b"\0user\0se\xffcret", b"\0us\x07er\0secret", b"\0" + b"u" * 256 + b"\0p",
        b"\0user\0" + b"p" * 1025, b"\0\xe2\x80\x8b\0x",  # a user name that SASLprep maps to nothing
    ],
)
def test_plain_refuses_malformed(message: bytes) -> None:
    step = make_mechanism("PLAIN").start(message)
    assert isinstance(step, Failure)
    assert step.reason.isascii() and step.reason.isprintable() and "secret" not in step.reason  # log-safe


def test_plain_without_initial_response_and_wrong_password() -> None:
    mech = make_mechanism("PLAIN")
    assert mech.start(None) == Challenge(b"")
    assert mech.respond(b"\0user\0wrong") == CheckPassword("", "user", "wrong")
    assert isinstance(mech.password_result(False), Failure)
    assert isinstance(mech.respond(b"\0user\0again"), Failure)  # over: everything fails now


def test_password_result_needs_a_real_true() -> None:
    mech = make_mechanism("PLAIN")
    mech.start(b"\0user\0secret")
    assert isinstance(mech.password_result(1), Failure)  # type: ignore[arg-type]  # e.g. an un-awaited future


def test_check_password_repr_hides_the_password() -> None:
    assert "secret" not in repr(CheckPassword("", "user", "secret"))


# -- LOGIN ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("initial", "responses", "expected"),
    [
        (None, [b"user", b"secret"], [Challenge(b"Username:"), Challenge(b"Password:"),
                                      CheckPassword("", "user", "secret")]),
        (b"user", [b"secret"], [Challenge(b"Password:"), CheckPassword("", "user", "secret")]),
        (None, [b""], [Challenge(b"Username:"), Failure]),
        (None, [b"user", b""], [Challenge(b"Username:"), Challenge(b"Password:"), Failure]),
        (None, [b"us\0er"], [Challenge(b"Username:"), Failure]),
        (None, [b"user", b"se\0cret"], [Challenge(b"Username:"), Challenge(b"Password:"), Failure]),
        (b"\xff", [], [Failure]),
        (None, [b"user", b"p" * 1025], [Challenge(b"Username:"), Challenge(b"Password:"), Failure]),
    ],
)
def test_login_table(initial: bytes | None, responses: list[bytes], expected: list[object]) -> None:
    mech = make_mechanism("LOGIN")
    got = [mech.start(initial), *(mech.respond(r) for r in responses)]
    assert len(got) == len(expected)
    for step, want in zip(got, expected, strict=True):
        if want is Failure:
            assert isinstance(step, Failure)
        else:
            assert step == want


def test_login_success_and_out_of_order() -> None:
    mech = make_mechanism("LOGIN")
    assert isinstance(mech.password_result(True), Failure)  # nothing to check yet
    mech = make_mechanism("LOGIN")
    mech.start(b"user")
    assert isinstance(mech.scram_credentials(None), Failure)
    mech = make_mechanism("LOGIN")
    mech.start(b"user")
    mech.respond(b"secret")
    assert mech.password_result(True) == Success("user")
    assert isinstance(mech.password_result(True), Failure)  # only once


# -- SCRAM-SHA-256: an independent client following RFC 5802 / RFC 7677 -----------------------------------


class ScramClient:
    """The client side, written from RFC 5802 section 3 and RFC 7677 (no code shared with the server)."""

    def __init__(self, user: str, password: str, nonce: str | None = None, gs2: str = "n,,") -> None:
        self.user = user
        self.password = password
        self.nonce = nonce or base64.b64encode(secrets.token_bytes(18)).decode()
        self.gs2 = gs2
        self.server_signature = b""

    def first(self) -> bytes:
        name = self.user.replace("=", "=3D").replace(",", "=2C")
        self.bare = f"n={name},r={self.nonce}"
        return (self.gs2 + self.bare).encode()

    def final(self, server_first: bytes) -> bytes:
        fields = dict(item.split("=", 1) for item in server_first.decode().split(","))
        assert fields["r"].startswith(self.nonce)
        salted = hashlib.pbkdf2_hmac("sha256", self.password.encode(), base64.b64decode(fields["s"]),
                                     int(fields["i"]))
        client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
        stored_key = hashlib.sha256(client_key).digest()
        without_proof = f"c={base64.b64encode(self.gs2.encode()).decode()},r={fields['r']}"
        auth_message = f"{self.bare},{server_first.decode()},{without_proof}".encode()
        signature = hmac.new(stored_key, auth_message, hashlib.sha256).digest()
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
        self.server_signature = hmac.new(server_key, auth_message, hashlib.sha256).digest()
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()

    def check(self, server_final: bytes) -> bool:
        return server_final == b"v=" + base64.b64encode(self.server_signature)


# RFC 7677 section 3.
RFC_CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_SALT = "W22ZaJ0SNY7soEsUEjb6gQ=="
RFC_SERVER_FIRST = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
RFC_CLIENT_FINAL = (b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def rfc_credentials() -> ScramCredentials:
    return derive_scram_credentials("pencil", salt=base64.b64decode(RFC_SALT), iterations=4096)


def test_scram_rfc7677_vector() -> None:
    mech = ScramSha256(server_nonce=RFC_SERVER_NONCE)
    assert mech.start(RFC_CLIENT_FIRST) == NeedScramCredentials("user")
    assert mech.scram_credentials(rfc_credentials()) == Challenge(RFC_SERVER_FIRST)
    assert mech.respond(RFC_CLIENT_FINAL) == Challenge(RFC_SERVER_FINAL)
    assert mech.respond(b"") == Success("user")


def test_scram_client_reproduces_rfc7677_vector() -> None:
    client = ScramClient("user", "pencil", nonce="rOprNGfwEbeRWgbNEkqO")
    assert client.first() == RFC_CLIENT_FIRST
    assert client.final(RFC_SERVER_FIRST) == RFC_CLIENT_FINAL
    assert client.check(RFC_SERVER_FINAL)


def run_scram(client: ScramClient, creds: ScramCredentials | None, *, initial: bool = True) -> list[object]:
    """Run one exchange; returns the server's steps."""
    mech = make_mechanism("SCRAM-SHA-256")
    steps: list[object] = []
    if initial:
        steps.append(mech.start(client.first()))
    else:
        steps.append(mech.start(None))
        assert steps[-1] == Challenge(b"")
        steps.append(mech.respond(client.first()))
    assert isinstance(steps[-1], NeedScramCredentials)
    server_first = mech.scram_credentials(creds)
    steps.append(server_first)
    assert isinstance(server_first, Challenge)
    final = mech.respond(client.final(server_first.data))
    steps.append(final)
    if isinstance(final, Challenge):
        assert client.check(final.data)
        steps.append(mech.respond(b""))
    return steps


@pytest.mark.parametrize(
    ("user", "password", "gs2"),
    [("user", "pencil", "n,,"), ("user", "pencil", "y,,"), ("a,b=c", "x", "n,,"), ("user", "pencil", "n,a=user,"),
     ("j\u00f6rg", "p\u00e4ss", "n,,")],
)
@pytest.mark.parametrize("initial", [True, False])
def test_scram_round_trip(user: str, password: str, gs2: str, initial: bool) -> None:
    creds = derive_scram_credentials(password, iterations=64)
    steps = run_scram(ScramClient(user, password, gs2=gs2), creds, initial=initial)
    assert steps[-1] == Success(user)


def test_scram_password_is_saslprepped() -> None:
    creds = derive_scram_credentials("p\u00e4ss", iterations=64)  # composed
    decomposed = "pa\u0308ss"
    client = ScramClient("user", saslprep(decomposed) or "")
    assert run_scram(client, creds)[-1] == Success("user")
    assert verify_scram_password(decomposed, creds)


def test_scram_wrong_password_fails_at_the_proof() -> None:
    creds = derive_scram_credentials("pencil", iterations=64)
    steps = run_scram(ScramClient("user", "crayon"), creds)
    assert isinstance(steps[-1], Failure) and len(steps) == 3


def test_scram_unknown_user_fails_after_full_exchange() -> None:
    first = run_scram(ScramClient("ghost", "boo"), None)
    assert isinstance(first[1], Challenge) and isinstance(first[-1], Failure) and len(first) == 3
    # The fake salt is stable per user name, so probing twice does not reveal that the user is unknown.
    again = run_scram(ScramClient("ghost", "boo"), None)
    challenges = [c for c in (first[1], again[1]) if isinstance(c, Challenge)]
    salt = [dict(kv.split("=", 1) for kv in c.data.decode().split(","))["s"] for c in challenges]
    assert len(challenges) == 2
    assert salt[0] == salt[1]


@pytest.mark.parametrize(
    "client_first",
    [b"p=tls-unique,,n=user,r=abc", b"x,,n=user,r=abc", b"n,,", b"n,,n=user", b"n,,r=abc,n=user",
     b"n,,m=ext,n=user,r=abc", b"n,,n=us=2Xer,r=abc", b"n,,n=,r=abc", b"n,,n=user,r=", b"n,,n=user,r=a,b",
     b"n,,n=user,r=\xff", b"n,a=other,n=user,r=abc", b"n,b=x,n=user,r=abc", b"n", b"n,,n=user,r=abc,junk",
     b"n,,n=u\x00ser,r=abc", b"n,,n=" + b"u" * 800 + b",r=abc", b"n,,n=user,r=" + b"a" * 257, b""],
)
def test_scram_refuses_malformed_client_first(client_first: bytes) -> None:
    assert isinstance(make_mechanism("SCRAM-SHA-256").start(client_first), Failure)


def _at_final() -> tuple[ScramSha256, str]:
    mech = ScramSha256(server_nonce="SNONCE")
    mech.start(b"n,,n=user,r=CNONCE")
    mech.scram_credentials(derive_scram_credentials("pencil", iterations=64))
    return mech, "CNONCESNONCE"


@pytest.mark.parametrize(
    "final",
    ["c=biws,r={n}", "c=biws,r={n}X,p=" + "A" * 43 + "=", "c=eSws,r={n},p=" + "A" * 43 + "=",
     "c=biws,r={n},p=AAAA", "c=biws,r={n},p=!!!!", "r={n},c=biws,p=" + "A" * 43 + "=", "c=biws,p=AAAA",
     "c=biws,r={n},p=" + "A" * 43 + "=", "c=biws,r={n},\u00e9,p=AAAA", ""],
)
def test_scram_refuses_bad_client_final(final: str) -> None:
    mech, nonce = _at_final()
    assert isinstance(mech.respond(final.format(n=nonce).encode()), Failure)


def test_scram_refuses_data_after_server_final_and_out_of_order() -> None:
    client = ScramClient("user", "pencil")
    mech = make_mechanism("SCRAM-SHA-256")
    mech.start(client.first())
    server_first = mech.scram_credentials(derive_scram_credentials("pencil", iterations=64))
    assert isinstance(server_first, Challenge)
    assert isinstance(mech.respond(client.final(server_first.data)), Challenge)
    assert isinstance(mech.respond(b"extra"), Failure)
    mech = make_mechanism("SCRAM-SHA-256")
    assert isinstance(mech.respond(b"n,,n=user,r=abc"), Failure)  # before start
    mech = make_mechanism("SCRAM-SHA-256")
    mech.start(b"n,,n=user,r=abc")
    assert isinstance(mech.respond(b"c=biws"), Failure)  # credentials not supplied yet
    assert isinstance(mech.password_result(True), Failure)


@pytest.mark.parametrize(
    "creds",
    [ScramCredentials(b"", 4096, b"k" * 32, b"k" * 32), ScramCredentials(b"s", 0, b"k" * 32, b"k" * 32),
     ScramCredentials(b"s", 4096, b"k" * 31, b"k" * 32), ScramCredentials(b"s", 10**9, b"k" * 32, b"k" * 32)],
)
def test_scram_refuses_malformed_stored_credentials(creds: ScramCredentials) -> None:
    mech = make_mechanism("SCRAM-SHA-256")
    mech.start(b"n,,n=user,r=abc")
    assert isinstance(mech.scram_credentials(creds), Failure)


# -- credentials, SASLprep, helpers ------------------------------------------------------------------------


def test_derive_and_verify() -> None:
    creds = derive_scram_credentials("pencil", iterations=64)
    assert len(creds.salt) == 16 and creds.iterations == 64
    assert len(creds.stored_key) == 32 and len(creds.server_key) == 32
    assert "stored_key" not in repr(creds)
    assert verify_scram_password("pencil", creds)
    assert not verify_scram_password("Pencil", creds)
    assert not verify_scram_password("pen\x00cil", creds)
    assert derive_scram_credentials("pencil", salt=creds.salt, iterations=64) == creds
    for bad in ("", "\x07bell", "\ud800", "\ue000"):
        with pytest.raises(ValueError):
            derive_scram_credentials(bad)
    with pytest.raises(ValueError):
        derive_scram_credentials("x", salt=b"")
    with pytest.raises(ValueError):
        derive_scram_credentials("x", iterations=0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("user", "user"), ("I\u00adX", "IX"), ("\u2168", "IX"), ("a\u00a0b", "a b"), ("\u00aa", "a"),
     ("\x07", None), ("a\x7f", None), ("\u200e", None), ("\ue000", None), ("", "")],
)
def test_saslprep(text: str, expected: str | None) -> None:
    assert saslprep(text) == expected


def test_make_mechanism_and_replies() -> None:
    for name in MECHANISMS:
        assert make_mechanism(name).start is not None
    with pytest.raises(ValueError):
        make_mechanism("CRAM-MD5")
    assert challenge_reply(b"Username:").to_bytes() == b"334 VXNlcm5hbWU6\r\n"
    assert challenge_reply(b"").to_bytes() == b"334 \r\n"
    assert step_reply(Challenge(b"x")) == Reply(334, "", "eA==")
    assert step_reply(Success("u")) is AuthReply.OK
    assert step_reply(Failure("no")) is AuthReply.FAILED
    assert step_reply(CheckPassword("", "u", "p")) is None
    assert step_reply(NeedScramCredentials("u")) is None
    assert AuthReply.FAILED.to_bytes() == b"535 5.7.8 Authentication credentials invalid\r\n"


# -- no input raises ---------------------------------------------------------------------------------------

SCRAMISH = st.lists(
    st.sampled_from([b"n,,", b"y,,", b"p=x,,", b"n,a=u,", b"n=", b"r=", b"c=biws", b"p=", b"m=", b",", b"=",
                     b"=2C", b"=3D", b"user", b"abc", b"\0", b"\xff", b"\xc3\xa9", b"AAAA", b"==", b"v="]),
    max_size=12,
).map(b"".join)
DATA = st.binary(max_size=64) | SCRAMISH
CREDS = st.none() | st.builds(ScramCredentials, st.binary(max_size=4), st.integers(-2, 3),
                              st.binary(min_size=31, max_size=33), st.binary(min_size=31, max_size=33))
CALL = st.one_of(
    st.tuples(st.just("respond"), DATA),
    st.tuples(st.just("password_result"), st.booleans()),
    st.tuples(st.just("scram_credentials"), CREDS),
    st.tuples(st.just("start"), st.none() | DATA),
)


@settings(max_examples=500, deadline=None)
@given(name=st.sampled_from(MECHANISMS), initial=st.none() | DATA, calls=st.lists(CALL, max_size=6))
def test_no_input_raises(name: str, initial: bytes | None, calls: list[tuple[str, object]]) -> None:
    mech = make_mechanism(name)
    steps = [mech.start(initial)]
    for method, arg in calls:
        steps.append(getattr(mech, method)(arg))
    assert all(isinstance(step, STEPS) for step in steps)
    # Once an exchange has failed, it stays failed.
    for i, step in enumerate(steps):
        if isinstance(step, Failure):
            assert all(isinstance(s, Failure) for s in steps[i:])
