"""The sans-IO milter protocol: encodings byte for byte, reply decoding, negotiation masks, bounds, and the
per-message conversation (which steps go out, which wait for a reply, what each reply means)."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailhop.milter import protocol as p
from mailhop.milter.conversation import Connect, Conversation, Decision, MessageInfo, Result, Stage, Step
from mailhop.milter.protocol import (
    AddHeader,
    ChangeHeader,
    Cmd,
    InsertHeader,
    Negotiated,
    OptNeg,
    PacketReader,
    ProtocolError,
    Quarantine,
    ReplyCode,
    Simple,
    SmfiFlag,
    SmfiProto,
    decode_response,
    negotiate,
)


def pkt(cmd: bytes, data: bytes = b"") -> bytes:
    """A packet built by hand, independent of the module's encoder."""
    return struct.pack(">I", len(data) + 1) + cmd + data


# -- encoding --------------------------------------------------------------------------------------------------------

def test_optneg_offers_version_6_our_actions_and_skippable_steps() -> None:
    raw = p.optneg()
    assert raw[:5] == b"\x00\x00\x00\x0dO"
    version, actions, protocol = struct.unpack(">III", raw[5:])
    assert version == 6
    assert actions == SmfiFlag.ADDHDRS | SmfiFlag.CHGHDRS | SmfiFlag.QUARANTINE | SmfiFlag.SETSYMLIST
    assert not actions & (SmfiFlag.CHGBODY | SmfiFlag.ADDRCPT | SmfiFlag.DELRCPT | SmfiFlag.CHGFROM)
    for flag in (SmfiProto.NOCONNECT, SmfiProto.NOBODY, SmfiProto.NR_HDR, SmfiProto.NR_BODY, SmfiProto.SKIP):
        assert protocol & flag
    assert not protocol & (SmfiProto.RCPT_REJ | SmfiProto.HDR_LEADSPC)


def test_connect_encodings_per_family() -> None:
    assert p.connect("[192.0.2.1]", "4", 2525, "192.0.2.1") == pkt(
        b"C", b"[192.0.2.1]\x004\x09\xdd192.0.2.1\x00")
    assert p.connect("[2001:db8::1]", "6", 25, "2001:db8::1") == pkt(
        b"C", b"[2001:db8::1]\x006\x00\x192001:db8::1\x00")
    assert p.connect("localhost", "L", 0, "/run/sock") == pkt(b"C", b"localhost\x00L/run/sock\x00")
    assert p.connect("localhost", "U", 0, "") == pkt(b"C", b"localhost\x00U")


def test_envelope_and_macro_encodings() -> None:
    assert p.macro(Cmd.MAIL, [("i", "Q1"), ("{auth_authen}", "bob")]) == pkt(
        b"D", b"Mi\x00Q1\x00{auth_authen}\x00bob\x00")
    assert p.helo("client.test") == pkt(b"H", b"client.test\x00")
    assert p.mail("") == pkt(b"M", b"<>\x00")
    assert p.mail("a@b.test", ["SIZE=10"]) == pkt(b"M", b"<a@b.test>\x00SIZE=10\x00")
    assert p.rcpt("c@d.test") == pkt(b"R", b"<c@d.test>\x00")
    assert p.header(b"Subject", b"a\n b") == pkt(b"L", b"Subject\x00a\n b\x00")
    assert p.encode(Cmd.BODYEOB) == b"\x00\x00\x00\x01E"


def test_nul_in_a_string_cannot_shift_the_fields() -> None:
    assert p.helo("evil\x00name") == pkt(b"H", b"evil name\x00")
    assert p.header(b"X", b"a\x00b") == pkt(b"L", b"X\x00a b\x00")


def test_body_chunks_are_bounded() -> None:
    assert p.body(b"x" * p.CHUNK_SIZE)[:5] == struct.pack(">I", p.CHUNK_SIZE + 1) + b"B"
    with pytest.raises(ValueError):
        p.body(b"x" * (p.CHUNK_SIZE + 1))


def test_split_message_gives_values_as_sendmail_and_postfix_send_them() -> None:
    msg = (b"From: a@b.test\r\nSubject: one\r\n  two\r\n\tthree\r\nX-Tab:\tvalue\r\nX-Two:  spaces\r\n"
           b"Name :spaced\r\nX-Empty:\r\nnot a field\r\n\r\nbody line\r\n\r\n")
    fields, body = p.split_message(msg)
    assert fields == [(b"From", b"a@b.test"), (b"Subject", b"one\n  two\n\tthree"), (b"X-Tab", b"\tvalue"),
                      (b"X-Two", b" spaces"), (b"Name", b"spaced"), (b"X-Empty", b"")]
    assert body == b"body line\r\n\r\n"


def test_split_message_edge_shapes() -> None:
    assert p.split_message(b"\r\nonly body\r\n") == ([], b"only body\r\n")
    assert p.split_message(b"A: 1\r\nB: 2\r\n") == ([(b"A", b"1"), (b"B", b"2")], b"")
    assert p.split_message(b"A: 1\r\n\r\n") == ([(b"A", b"1")], b"")


# -- decoding --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("cmd", "expected"), [
    (b"c", Simple.CONTINUE), (b"a", Simple.ACCEPT), (b"r", Simple.REJECT), (b"t", Simple.TEMPFAIL),
    (b"d", Simple.DISCARD), (b"p", Simple.PROGRESS), (b"s", Simple.SKIP), (b"f", Simple.TEMPFAIL),
])
def test_simple_replies(cmd: bytes, expected: Simple) -> None:
    assert decode_response(cmd, b"") is expected


def test_reply_code_variants() -> None:
    assert decode_response(b"y", b"554 5.7.1 Go away\x00") == ReplyCode(554, "5.7.1", "Go away")
    assert decode_response(b"y", b"451 Busy now\x00") == ReplyCode(451, "", "Busy now")
    assert decode_response(b"y", b"550\x00") == ReplyCode(550, "", "")
    # Multi-line: the first line is kept.
    assert decode_response(b"y", b"550-5.7.1 first\r\n550 5.7.1 second\x00") == ReplyCode(550, "5.7.1", "first")
    # An enhanced code of the other class is dropped (the default replaces it).
    assert decode_response(b"y", b"550 4.7.1 mixed\x00") == ReplyCode(550, "", "mixed")
    # Control characters never reach the SMTP client.
    assert decode_response(b"y", b"550 5.7.1 a\tb\x00") == ReplyCode(550, "5.7.1", "a b")


@pytest.mark.parametrize("data", [b"250 2.0.0 OK\x00", b"hello\x00", b"55 x\x00", b"550 5.7.1 no nul",
                                  b"550 a\x00extra\x00"])
def test_reply_code_refusals(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_response(b"y", data)


def test_header_and_quarantine_replies() -> None:
    assert decode_response(b"h", b"X-A\x00v\n\tw\x00") == AddHeader("X-A", "v\r\n\tw")
    assert decode_response(b"i", b"\x00\x00\x00\x01DKIM-Signature\x00v=1\x00") == InsertHeader(1, "DKIM-Signature",
                                                                                              "v=1")
    assert decode_response(b"m", b"\x00\x00\x00\x02Subject\x00\x00") == ChangeHeader(2, "Subject", "")
    assert decode_response(b"q", b"held for review\x00") == Quarantine("held for review")


@pytest.mark.parametrize(("cmd", "data"), [
    (b"h", b"Bad Name\x00v\x00"), (b"h", b"X:Y\x00v\x00"), (b"h", b"\x00v\x00"), (b"h", b"X\x00v"),
    (b"h", b"X\x00v\x00junk\x00"), (b"i", b"\x00\x00X\x00v\x00"), (b"m", b""), (b"q", b"no nul"),
    (b"b", b"new body"), (b"+", b"<x@y>\x00"), (b"-", b"<x@y>\x00"), (b"e", b"<x@y>\x00"), (b"2", b"<x@y>\x00"),
    (b"l", b""), (b"Z", b""), (b"O", b"\x00\x00\x00\x06"),
])
def test_malformed_or_not_negotiated_replies(cmd: bytes, data: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_response(cmd, data)


def test_optneg_reply_with_macro_wish_list() -> None:
    data = struct.pack(">III", 6, 0x1FF, 0x1FFFFF) + b"\x00\x00\x00\x01j {auth_authen}\x00\x00\x00\x00\x03i\x00"
    assert decode_response(b"O", data) == OptNeg(6, 0x1FF, 0x1FFFFF, ((1, "j {auth_authen}"), (3, "i")))
    with pytest.raises(ProtocolError):
        decode_response(b"O", struct.pack(">III", 6, 0, 0) + b"\x00\x00\x00\x01j")


# -- negotiation -----------------------------------------------------------------------------------------------------

def test_negotiation_masks_actions_to_what_we_offered() -> None:
    everything = SmfiFlag.ADDHDRS | SmfiFlag.CHGBODY | SmfiFlag.ADDRCPT | SmfiFlag.CHGHDRS | SmfiFlag.QUARANTINE
    n = negotiate(OptNeg(6, everything, SmfiProto.NOCONNECT | SmfiProto.NR_HDR))
    assert n.actions == SmfiFlag.ADDHDRS | SmfiFlag.CHGHDRS | SmfiFlag.QUARANTINE
    assert n.protocol == SmfiProto.NOCONNECT | SmfiProto.NR_HDR


def test_negotiation_ignores_unoffered_skips_but_refuses_unoffered_no_reply() -> None:
    n = negotiate(OptNeg(6, 0, SmfiProto.RCPT_REJ | 0x10000000), offered_protocol=p.OUR_PROTOCOL)
    assert n.protocol == 0
    with pytest.raises(ProtocolError, match="did not offer"):
        negotiate(OptNeg(6, 0, SmfiProto.NR_BODY), offered_protocol=SmfiProto.NOCONNECT)
    with pytest.raises(ProtocolError):
        negotiate(OptNeg(6, 0, SmfiProto.HDR_LEADSPC))


@pytest.mark.parametrize("version", [0, 1, 7, 2**32 - 1])
def test_negotiation_refuses_unknown_versions(version: int) -> None:
    with pytest.raises(ProtocolError, match="version"):
        negotiate(OptNeg(version, 0, 0))


def test_negotiation_needs_an_optneg_reply() -> None:
    with pytest.raises(ProtocolError):
        negotiate(Simple.CONTINUE)
    assert negotiate(OptNeg(2, 1, 0)).version == 2


# -- bounds ----------------------------------------------------------------------------------------------------------

def test_packet_reader_reassembles_split_input() -> None:
    reader = PacketReader()
    stream = pkt(b"h", b"X\x00v\x00") + pkt(b"c")
    for i in range(len(stream)):
        reader.feed(stream[i:i + 1])
    assert reader.next_packet() == (b"h", b"X\x00v\x00")
    assert reader.next_packet() == (b"c", b"")
    assert reader.next_packet() is None
    assert reader.needed() == 4


def test_packet_reader_truncated_packet_waits() -> None:
    reader = PacketReader()
    reader.feed(pkt(b"q", b"reason\x00")[:-3])
    assert reader.needed() == 3
    assert reader.next_packet() is None


@pytest.mark.parametrize("length", [0, p.MAX_PACKET + 1, 2**32 - 1])
def test_packet_reader_refuses_bad_lengths(length: int) -> None:
    reader = PacketReader()
    reader.feed(struct.pack(">I", length) + b"c")
    with pytest.raises(ProtocolError):
        reader.needed()


def test_packet_reader_limit_is_configurable() -> None:
    reader = PacketReader(max_packet=10)
    reader.feed(pkt(b"h", b"X\x00" + b"v" * 20 + b"\x00"))
    with pytest.raises(ProtocolError, match="limit"):
        reader.next_packet()


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=2000))
def test_fuzz_stream_decoding_raises_only_protocol_errors(stream: bytes) -> None:
    reader = PacketReader(max_packet=4096)
    reader.feed(stream)
    try:
        while (packet := reader.next_packet()) is not None:
            decode_response(*packet)
    except ProtocolError:
        pass


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(list(b"OycarptdsfhimqbZ+-el2\x00")), st.binary(max_size=300))
def test_fuzz_reply_decoder_raises_only_protocol_errors(cmd: int, data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode_response(bytes([cmd]), data)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(list(b"cartdpsyhimqO")), st.binary(max_size=40)), max_size=30))
def test_fuzz_conversation_raises_only_protocol_errors(replies: list[tuple[int, bytes]]) -> None:
    conv = Conversation(negotiate(OptNeg(6, p.OUR_ACTIONS, 0)), info())
    try:
        for cmd, data in replies:
            step = conv.next_step()
            if step is None:
                break
            if step.expects_reply:
                conv.receive(decode_response(bytes([cmd]), data))
    except ProtocolError:
        pass


# -- the conversation ------------------------------------------------------------------------------------------------

MESSAGE = b"From: a@b.test\r\nSubject: hi\r\n\r\nbody\r\n"


def info(recipients: tuple[str, ...] = ("x@y.test",), message: bytes = MESSAGE) -> MessageInfo:
    return MessageInfo(Connect("[192.0.2.1]", "4", 1234, "192.0.2.1"), "client.test", "a@b.test", recipients,
                       message, {Cmd.CONNECT: (("j", "mx.test"),), Cmd.BODYEOB: (("i", "Q1"),)})


def negotiated(protocol: int = 0, actions: int = p.OUR_ACTIONS) -> Negotiated:
    return negotiate(OptNeg(6, actions, protocol))


def run(conv: Conversation, answer: dict[Stage, list[p.Response]] | None = None) -> list[Step]:
    """Drive a conversation; each stage answers CONTINUE unless ``answer`` scripts it (list, consumed)."""
    answer = answer or {}
    steps = []
    while (step := conv.next_step()) is not None:
        steps.append(step)
        if not step.expects_reply:
            continue
        replies = answer.get(step.stage) or [Simple.CONTINUE]
        while True:
            r = replies.pop(0) if replies else Simple.CONTINUE
            if conv.receive(r):
                break
    return steps


def test_full_replay_order_and_macros() -> None:
    conv = Conversation(negotiated(), info(("x@y.test", "z@y.test")))
    steps = run(conv)
    assert [s.stage for s in steps] == [Stage.CONNECT, Stage.HELO, Stage.MAIL, Stage.RCPT, Stage.RCPT, Stage.DATA,
                                        Stage.HEADER, Stage.HEADER, Stage.EOH, Stage.BODY, Stage.EOB]
    assert all(s.expects_reply for s in steps)
    assert steps[0].payload == pkt(b"D", b"Cj\x00mx.test\x00") + pkt(b"C", b"[192.0.2.1]\x004\x04\xd2192.0.2.1\x00")
    assert steps[2].payload.startswith(pkt(b"D", b"M{mail_addr}\x00a@b.test\x00"))
    assert steps[4].payload == pkt(b"D", b"R{rcpt_addr}\x00z@y.test\x00") + pkt(b"R", b"<z@y.test>\x00")
    assert steps[-1].payload == pkt(b"D", b"Ei\x00Q1\x00") + pkt(b"E")
    assert conv.result == Result(Decision.CONTINUE, Stage.EOB)


def test_skipped_steps_are_not_sent_and_no_reply_steps_do_not_wait() -> None:
    skip_all = (SmfiProto.NOCONNECT | SmfiProto.NOHELO | SmfiProto.NOMAIL | SmfiProto.NORCPT | SmfiProto.NODATA
                | SmfiProto.NOHDRS | SmfiProto.NOEOH | SmfiProto.NOBODY)
    assert [s.stage for s in run(Conversation(negotiated(skip_all), info()))] == [Stage.EOB]
    no_reply = SmfiProto.NR_HDR | SmfiProto.NR_BODY | SmfiProto.NR_CONN
    steps = run(Conversation(negotiated(no_reply), info()))
    waits = {s.stage: s.expects_reply for s in steps}
    assert waits[Stage.HEADER] is False and waits[Stage.BODY] is False and waits[Stage.CONNECT] is False
    assert waits[Stage.MAIL] is True and waits[Stage.EOB] is True


def test_large_body_goes_in_bounded_chunks_and_skip_stops_them() -> None:
    big = b"From: a@b.test\r\n\r\n" + b"y" * (3 * p.CHUNK_SIZE + 10)
    steps = run(Conversation(negotiated(), info(message=big)))
    chunks = [s for s in steps if s.stage is Stage.BODY]
    assert len(chunks) == 4 and all(len(s.payload) <= p.CHUNK_SIZE + 5 for s in chunks)
    steps = run(Conversation(negotiated(), info(message=big)), {Stage.BODY: [Simple.SKIP]})
    assert [s.stage for s in steps].count(Stage.BODY) == 1 and steps[-1].stage is Stage.EOB


def test_end_of_message_modifications_progress_and_quarantine() -> None:
    conv = Conversation(negotiated(), info())
    run(conv, {Stage.EOB: [Simple.PROGRESS, AddHeader("X-A", "1"), InsertHeader(1, "X-B", "2"),
                           ChangeHeader(1, "Subject", ""), Quarantine("look at it"), Simple.ACCEPT]})
    assert conv.result is not None
    assert conv.result.decision is Decision.ACCEPT
    assert conv.result.headers == (AddHeader("X-A", "1"), InsertHeader(1, "X-B", "2"), ChangeHeader(1, "Subject", ""))
    assert conv.result.quarantine == "look at it"


def test_refusal_at_end_drops_modifications() -> None:
    conv = Conversation(negotiated(), info())
    run(conv, {Stage.EOB: [AddHeader("X-A", "1"), ReplyCode(554, "5.7.1", "no")]})
    assert conv.result == Result(Decision.REJECT, Stage.EOB, ReplyCode(554, "5.7.1", "no"))


@pytest.mark.parametrize(("stage", "reply", "decision"), [
    (Stage.CONNECT, Simple.REJECT, Decision.REJECT), (Stage.HELO, Simple.TEMPFAIL, Decision.TEMPFAIL),
    (Stage.MAIL, Simple.DISCARD, Decision.DISCARD), (Stage.DATA, Simple.ACCEPT, Decision.ACCEPT),
    (Stage.HEADER, ReplyCode(451, "4.3.0", "later"), Decision.TEMPFAIL),
    (Stage.RCPT, Simple.ACCEPT, Decision.ACCEPT), (Stage.RCPT, Simple.DISCARD, Decision.DISCARD),
])
def test_early_decisions_end_the_conversation(stage: Stage, reply: p.Response, decision: Decision) -> None:
    conv = Conversation(negotiated(), info())
    steps = run(conv, {stage: [reply]})
    assert steps[-1].stage is stage
    assert conv.result is not None and conv.result.decision is decision and conv.result.stage is stage


def test_some_recipients_refused_the_message_goes_on() -> None:
    conv = Conversation(negotiated(), info(("a@y.test", "b@y.test")))
    steps = run(conv, {Stage.RCPT: [Simple.REJECT, Simple.CONTINUE]})
    assert steps[-1].stage is Stage.EOB
    assert conv.result is not None and conv.result.decision is Decision.CONTINUE
    assert conv.result.refused_recipients == (("a@y.test", Decision.REJECT, None),)


def test_every_recipient_refused_refuses_the_message_tempfail_first() -> None:
    conv = Conversation(negotiated(), info(("a@y.test", "b@y.test")))
    steps = run(conv, {Stage.RCPT: [Simple.REJECT, ReplyCode(450, "4.2.1", "full")]})
    assert steps[-1].stage is Stage.RCPT
    assert conv.result is not None
    assert (conv.result.decision, conv.result.reply) == (Decision.TEMPFAIL, ReplyCode(450, "4.2.1", "full"))
    conv = Conversation(negotiated(), info(("a@y.test",)))
    run(conv, {Stage.RCPT: [ReplyCode(550, "5.1.1", "unknown")]})
    assert conv.result is not None and conv.result.decision is Decision.REJECT


@pytest.mark.parametrize("reply", [AddHeader("X", "1"), Quarantine("q"), ChangeHeader(1, "X", "")])
def test_modifications_before_end_of_message_are_errors(reply: p.Response) -> None:
    with pytest.raises(ProtocolError, match="only allowed"):
        run(Conversation(negotiated(), info()), {Stage.HEADER: [reply]})


@pytest.mark.parametrize(("actions", "reply"), [
    (SmfiFlag.CHGHDRS, AddHeader("X", "1")), (SmfiFlag.ADDHDRS, ChangeHeader(1, "X", "")),
    (SmfiFlag.ADDHDRS, Quarantine("q")),
])
def test_modifications_not_negotiated_are_errors(actions: int, reply: p.Response) -> None:
    with pytest.raises(ProtocolError, match="without negotiating"):
        run(Conversation(negotiated(actions=actions), info()), {Stage.EOB: [reply]})


def test_optneg_mid_message_and_replies_out_of_turn_are_errors() -> None:
    with pytest.raises(ProtocolError):
        run(Conversation(negotiated(), info()), {Stage.MAIL: [OptNeg(6, 0, 0)]})
    with pytest.raises(ProtocolError):
        Conversation(negotiated(), info()).receive(Simple.CONTINUE)
