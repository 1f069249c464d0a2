"""tether.v1 is the contract between hub and clients: pin every rule, and fuzz the decoders."""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tether.protocol import (
    MAX_CLIENT_ID_LENGTH,
    MAX_RESUME_SEQ,
    MAX_SEQ,
    SUBPROTOCOL,
    Ack,
    Auth,
    ClientEvent,
    ClientProtocol,
    CloseCode,
    ConnectionState,
    Error,
    Frame,
    Hello,
    Lost,
    Msg,
    ProtocolError,
    Publish,
    Received,
    ServerProtocol,
    ServerRejected,
    Welcome,
    Welcomed,
    ack_seq_of,
    decode_client_frame,
    decode_data,
    decode_server_frame,
    encode,
    encode_data,
    encode_msg,
    has_out_of_range_int,
)


def dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


def welcome_text(**fields: Any) -> str:
    return dumps({"type": "welcome", "session": "s1", "resumed": False, "next_seq": 1, **fields})


def msg_text(seq: int | None, data: Any = "x", msg_id: str | None = None) -> str:
    return encode_msg(seq, msg_id or f"m{seq}", orjson.dumps(data))


# --------------------------------------------------------------------------- constants


def test_contract_constants() -> None:
    assert SUBPROTOCOL == "tether.v1"
    assert MAX_CLIENT_ID_LENGTH == 128
    assert MAX_SEQ == 2**53 - 1
    assert {c.name: int(c) for c in CloseCode} == {
        "NORMAL": 1000,
        "GOING_AWAY": 1001,
        "PROTOCOL_ERROR": 1002,
        "UNSUPPORTED_DATA": 1003,
        "POLICY_VIOLATION": 1008,
        "MESSAGE_TOO_BIG": 1009,
        "INTERNAL_ERROR": 1011,
        "TRY_AGAIN_LATER": 1013,
    }


def test_protocol_error_carries_frame_and_close_code() -> None:
    err = ProtocolError("too_big", "frame exceeds 10 bytes", CloseCode.MESSAGE_TOO_BIG)
    assert (err.code, err.reason, err.close_code) == ("too_big", "frame exceeds 10 bytes", 1009)
    assert str(err) == "too_big: frame exceeds 10 bytes"
    assert err.to_frame() == '{"type":"error","code":"too_big","reason":"frame exceeds 10 bytes"}'
    assert ProtocolError("x", "y").close_code == CloseCode.PROTOCOL_ERROR
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.code, copy.reason, copy.close_code) == (err.code, err.reason, err.close_code)


def test_frames_are_frozen_with_slots() -> None:
    ack = Ack(1)
    with pytest.raises(AttributeError):
        ack.seq = 2  # type: ignore[misc]
    assert not hasattr(ack, "__dict__")


# --------------------------------------------------------------------------- encoding


@pytest.mark.parametrize(
    ("frame", "text"),
    [
        (Hello("alice"), '{"type":"hello","client_id":"alice","last_seq":0}'),
        (
            Hello("alice", 7, "tok"),
            '{"type":"hello","client_id":"alice","last_seq":7,"token":"tok"}',
        ),
        (
            Welcome("s1", True, 8),
            '{"type":"welcome","session":"s1","resumed":true,"next_seq":8,"acked":0,'
            '"lost":0,"lost_ranges":[],"reset":false}',
        ),
        (
            Welcome("s1", False, 8, lost=3, lost_ranges=((2, 3),), acked=1),
            '{"type":"welcome","session":"s1","resumed":false,"next_seq":8,"acked":1,'
            '"lost":3,"lost_ranges":[[2,3]],"reset":false}',
        ),
        (Msg("m1", {"a": 1}, 5), '{"type":"msg","seq":5,"id":"m1","data":{"a":1}}'),
        (Msg("m1", None), '{"type":"msg","id":"m1","data":null}'),
        (
            Msg("m1", "aGk=", 2, "base64"),
            '{"type":"msg","seq":2,"id":"m1","enc":"base64","data":"aGk="}',
        ),
        (Ack(0), '{"type":"ack","seq":0}'),
        (Publish([1, 2]), '{"type":"publish","data":[1,2]}'),
        (
            Publish("aGk=", "p1", "base64"),
            '{"type":"publish","id":"p1","enc":"base64","data":"aGk="}',
        ),
        (
            Error("invalid_ack", "too high"),
            '{"type":"error","code":"invalid_ack","reason":"too high"}',
        ),
    ],
)
def test_encode_exact_text(frame: Frame, text: str) -> None:
    assert encode(frame) == text


@pytest.mark.parametrize(
    "msg_id", ['a"b', "back\\slash", "new\nline", "\x00ctl", "ünï©ødé", "💥", ""]
)
def test_encode_msg_escapes_ids(msg_id: str) -> None:
    text = encode_msg(1, msg_id, b'{"k":"v"}')
    assert orjson.loads(text) == {"type": "msg", "seq": 1, "id": msg_id, "data": {"k": "v"}}
    assert decode_server_frame(text) == Msg(msg_id, {"k": "v"}, 1)


def test_encode_msg_splices_data_verbatim() -> None:
    data_json = orjson.dumps({"nested": [1, 2.5, None, True, "é"]})
    assert (
        encode_msg(None, "m", data_json)
        == '{"type":"msg","id":"m","data":' + data_json.decode() + "}"
    )
    assert encode_msg(3, "m", data_json, enc=None).startswith('{"type":"msg","seq":3,')


def test_bytes_payload_round_trip() -> None:
    data_json, enc = encode_data(b"\x00\xffbinary")
    assert enc == "base64"
    msg = decode_server_frame(encode_msg(1, "b", data_json, enc=enc))
    assert isinstance(msg, Msg)
    assert msg.enc == "base64"
    assert decode_data(msg) == b"\x00\xffbinary"
    assert encode_data({"a": 1}) == (b'{"a":1}', None)
    assert encode_data("text") == (b'"text"', None)
    with pytest.raises(TypeError):
        encode_data(object())


@pytest.mark.parametrize("data", ["not base64!", "aGk", "é", "aGk=\n"])
def test_decode_data_rejects_bad_base64(data: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_data(Msg("m", data, 1, "base64"))
    assert info.value.code == "invalid_frame"


def test_decode_data_passes_json_through() -> None:
    assert decode_data(Msg("m", {"a": 1})) == {"a": 1}
    assert decode_data(Publish("aGk=", enc="base64")) == b"hi"


# --------------------------------------------------------------------------- decoding


def test_decode_valid_frames() -> None:
    assert decode_client_frame('{"type":"hello","client_id":"a-b.c:d@e_F9"}') == Hello(
        "a-b.c:d@e_F9"
    )
    assert decode_client_frame(
        '{"type":"hello","client_id":"a","last_seq":9,"token":"t"}'
    ) == Hello("a", 9, "t")
    assert decode_client_frame(b'{"type":"ack","seq":1}'.decode()) == Ack(1)
    assert decode_client_frame('{"type":"publish","data":null}') == Publish(None)
    assert decode_client_frame('{"type":"publish","data":{"x":1},"id":"p"}') == Publish(
        {"x": 1}, "p"
    )
    assert decode_server_frame(welcome_text()) == Welcome("s1", False, 1)
    assert decode_server_frame(
        welcome_text(next_seq=9, acked=2, lost=5, lost_ranges=[[3, 4], [6, 7]], reset=True)
    ) == Welcome("s1", False, 9, 5, ((3, 4), (6, 7)), True, 2)
    assert decode_server_frame('{"type":"msg","id":"m","data":[]}') == Msg("m", [])
    assert decode_server_frame('{"type":"error","code":"c","reason":"r"}') == Error("c", "r")


def test_unknown_fields_are_ignored() -> None:
    assert decode_client_frame('{"type":"ack","seq":3,"future":{"x":1}}') == Ack(3)
    assert decode_server_frame(welcome_text(extension=True)) == Welcome("s1", False, 1)
    assert decode_server_frame('{"type":"msg","id":"m","data":1,"seq":2,"prio":9}') == Msg(
        "m", 1, 2
    )


def test_null_optional_fields_mean_default() -> None:
    text = '{"type":"hello","client_id":"a","last_seq":null,"token":null}'
    assert decode_client_frame(text) == Hello("a")
    assert decode_client_frame('{"type":"publish","data":1,"id":null,"enc":null}') == Publish(1)
    assert decode_server_frame(welcome_text(lost=None, lost_ranges=None, reset=None)) == Welcome(
        "s1", False, 1
    )
    assert decode_server_frame('{"type":"msg","id":"m","data":1,"seq":null}') == Msg("m", 1)


INVALID_FRAMES: list[tuple[str, str]] = [
    # ints: bool is not an int, floats are not ints, bounds
    ('{"type":"ack","seq":true}', "invalid_frame"),
    ('{"type":"ack","seq":1.0}', "invalid_frame"),
    ('{"type":"ack","seq":-1}', "invalid_frame"),
    ('{"type":"ack","seq":9007199254740992}', "invalid_frame"),
    ('{"type":"ack","seq":"1"}', "invalid_frame"),
    ('{"type":"ack"}', "invalid_frame"),
    ('{"type":"ack","seq":null}', "invalid_frame"),
    ('{"type":"ack","seq":1e400}', "invalid_json"),
    ('{"type":"ack","seq":100000000000000000000000}', "invalid_frame"),
    ('{"type":"hello"}', "invalid_frame"),
    ('{"type":"hello","client_id":5}', "invalid_frame"),
    ('{"type":"hello","client_id":"a","last_seq":-1}', "invalid_frame"),
    ('{"type":"hello","client_id":"a","last_seq":false}', "invalid_frame"),
    ('{"type":"hello","client_id":"a","token":5}', "invalid_frame"),
    ('{"type":"hello","client_id":"a","token":"' + "t" * 4097 + '"}', "invalid_frame"),
    ('{"type":"hello","client_id":""}', "invalid_client_id"),
    ('{"type":"hello","client_id":"a b"}', "invalid_client_id"),
    ('{"type":"hello","client_id":"a/b"}', "invalid_client_id"),
    ('{"type":"hello","client_id":"ünï"}', "invalid_client_id"),
    ('{"type":"hello","client_id":"a\\n"}', "invalid_client_id"),
    ('{"type":"hello","client_id":"' + "a" * 129 + '"}', "invalid_client_id"),
    ('{"type":"publish"}', "invalid_frame"),
    ('{"type":"publish","data":1,"id":2}', "invalid_frame"),
    ('{"type":"publish","data":1,"enc":"hex"}', "invalid_frame"),
    ('{"type":"publish","data":1,"enc":"base64"}', "invalid_frame"),
    # wrong direction, unknown or missing type
    ('{"type":"welcome","session":"s","resumed":false,"next_seq":1}', "unexpected_frame"),
    ('{"type":"msg","id":"m","data":1}', "unexpected_frame"),
    ('{"type":"error","code":"c","reason":"r"}', "unexpected_frame"),
    ('{"type":"ping"}', "unknown_type"),
    ('{"type":"ACK","seq":1}', "unknown_type"),
    ('{"type":["ack"]}', "unknown_type"),
    ('{"type":{"a":1}}', "unknown_type"),
    ('{"seq":1}', "unknown_type"),
    # not JSON objects
    ("", "invalid_json"),
    ("ack", "invalid_json"),
    ('{"type":"ack","seq":1', "invalid_json"),
    ("[1,2]", "invalid_json"),
    ('"ack"', "invalid_json"),
    ("null", "invalid_json"),
    ("NaN", "invalid_json"),
    ("\ufeff{}", "invalid_json"),
    ('{"type":"ack","seq":1}\ud800', "invalid_json"),
    ("[" * 5000, "invalid_json"),
]


@pytest.mark.parametrize(("raw", "code"), INVALID_FRAMES)
def test_client_frame_errors(raw: str, code: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_client_frame(raw)
    assert info.value.code == code
    expected = (
        CloseCode.POLICY_VIOLATION if code == "invalid_client_id" else CloseCode.PROTOCOL_ERROR
    )
    assert info.value.close_code == expected
    assert orjson.loads(info.value.to_frame())["code"] == code


INVALID_SERVER_FRAMES: list[tuple[str, str]] = [
    (welcome_text(next_seq=0), "invalid_frame"),
    (welcome_text(resumed=1), "invalid_frame"),
    (welcome_text(session=None), "invalid_frame"),
    (welcome_text(reset="yes"), "invalid_frame"),
    (welcome_text(lost=-1), "invalid_frame"),
    (welcome_text(acked=-1), "invalid_frame"),
    (welcome_text(acked=False), "invalid_frame"),
    (welcome_text(acked=1, next_seq=1), "invalid_frame"),  # acked must be below next_seq
    (welcome_text(next_seq=9, lost=2, lost_ranges=[[0, 1]]), "invalid_frame"),
    (welcome_text(next_seq=9, lost=2, lost_ranges=[[3, 2]]), "invalid_frame"),
    (welcome_text(next_seq=9, lost=3, lost_ranges=[[1, 2, 3]]), "invalid_frame"),
    (welcome_text(next_seq=9, lost=3, lost_ranges=[[1, True]]), "invalid_frame"),
    (welcome_text(next_seq=9, lost=3, lost_ranges=[[1.0, 2]]), "invalid_frame"),
    (welcome_text(next_seq=9, lost=3, lost_ranges=[1, 2]), "invalid_frame"),
    (welcome_text(next_seq=9, lost=3, lost_ranges={"1": 2}), "invalid_frame"),
    (welcome_text(next_seq=9, lost=4, lost_ranges=[[4, 5], [1, 2]]), "invalid_frame"),  # order
    (welcome_text(next_seq=9, lost=5, lost_ranges=[[1, 3], [3, 4]]), "invalid_frame"),  # overlap
    (welcome_text(next_seq=9, lost=1, lost_ranges=[[1, 2]]), "invalid_frame"),  # lost < ranges
    (welcome_text(next_seq=9, acked=2, lost=2, lost_ranges=[[2, 3]]), "invalid_frame"),  # <= acked
    (welcome_text(next_seq=9, lost=2, lost_ranges=[[8, 9]]), "invalid_frame"),  # >= next_seq
    (welcome_text(next_seq=MAX_SEQ, lost=2, lost_ranges=[[1, 2**53]]), "invalid_frame"),
    ('{"type":"msg","id":"m"}', "invalid_frame"),
    ('{"type":"msg","data":1}', "invalid_frame"),
    ('{"type":"msg","id":1,"data":1}', "invalid_frame"),
    ('{"type":"msg","id":"m","data":1,"seq":0}', "invalid_frame"),
    ('{"type":"msg","id":"m","data":1,"seq":false}', "invalid_frame"),
    ('{"type":"msg","id":"m","data":1,"enc":"base32"}', "invalid_frame"),
    ('{"type":"msg","id":"m","data":[1],"enc":"base64"}', "invalid_frame"),
    ('{"type":"error","code":"c"}', "invalid_frame"),
    ('{"type":"error","reason":"r","code":1}', "invalid_frame"),
    ('{"type":"hello","client_id":"a"}', "unexpected_frame"),
    ('{"type":"ack","seq":1}', "unexpected_frame"),
    ('{"type":"publish","data":1}', "unexpected_frame"),
    ('{"type":"bye"}', "unknown_type"),
    ("1", "invalid_json"),
]


@pytest.mark.parametrize(("raw", "code"), INVALID_SERVER_FRAMES)
def test_server_frame_errors(raw: str, code: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_server_frame(raw)
    assert (info.value.code, info.value.close_code) == (code, CloseCode.PROTOCOL_ERROR)


@pytest.mark.parametrize("decode", [decode_client_frame, decode_server_frame])
def test_binary_frames_are_unsupported(decode: Any) -> None:
    with pytest.raises(ProtocolError) as info:
        decode(b'{"type":"ack","seq":1}')
    assert (info.value.code, info.value.close_code) == ("binary_not_supported", 1003)


def test_size_limit_counts_utf8_bytes() -> None:
    frame = '{"type":"publish","data":"' + "é" * 10 + '"}'  # 26 + 20 + 2 bytes
    size = len(frame.encode())
    assert size == 48
    assert decode_client_frame(frame, max_size=size) == Publish("é" * 10)
    with pytest.raises(ProtocolError) as info:
        decode_client_frame(frame, max_size=size - 1)
    assert (info.value.code, info.value.close_code) == ("too_big", CloseCode.MESSAGE_TOO_BIG)
    with pytest.raises(ProtocolError) as info:
        decode_server_frame("x" * 2_000_000)
    assert info.value.code == "too_big"


def test_client_id_and_token_limits() -> None:
    longest = "a" * MAX_CLIENT_ID_LENGTH
    assert decode_client_frame(dumps({"type": "hello", "client_id": longest})) == Hello(longest)
    token = "t" * 4096
    frame = decode_client_frame(dumps({"type": "hello", "client_id": "a", "token": token}))
    assert frame == Hello("a", 0, token)
    assert decode_client_frame(dumps({"type": "ack", "seq": MAX_SEQ})) == Ack(MAX_SEQ)


# --------------------------------------------------------------------------- ServerProtocol


def open_server(last_seq: int = 0, **welcome: Any) -> ServerProtocol:
    server = ServerProtocol()
    assert server.receive(encode(Hello("alice", last_seq))) == Hello("alice", last_seq)
    server.welcome(Welcome("s1", False, welcome.pop("next_seq", last_seq + 1), **welcome))
    return server


def test_server_happy_path() -> None:
    server = ServerProtocol()
    assert server.state.name == "AWAITING_HELLO"
    server.receive('{"type":"hello","client_id":"alice","last_seq":0}')
    assert server.hello == Hello("alice")
    text = server.welcome(Welcome("s1", False, 1))
    assert decode_server_frame(text) == Welcome("s1", False, 1)
    assert server.state is ConnectionState.OPEN
    assert server.msg(None, "n", b"1") == '{"type":"msg","id":"n","data":1}'
    assert server.highest_sent == 0
    assert server.msg(1, "m1", b'"a"') == '{"type":"msg","seq":1,"id":"m1","data":"a"}'
    assert server.msg(2, "m2", b'"YQ=="', enc="base64").count('"enc":"base64"') == 1
    assert server.highest_sent == 2
    assert server.receive('{"type":"ack","seq":1}') == Ack(1)
    assert server.acked == 1
    assert server.receive('{"type":"publish","data":{"q":1}}') == Publish({"q": 1})
    assert server.receive('{"type":"ack","seq":2}') == Ack(2)
    assert server.acked == 2


@pytest.mark.parametrize(
    ("raw", "seq"),
    [
        ('{"type":"ack","seq":0}', 0),
        ('{"type":"ack","seq":7}', 7),
        (f'{{"type":"ack","seq":{MAX_SEQ}}}', MAX_SEQ),
        # valid acks spelled differently: not the fast path, the full parser takes them
        ('{"type":"ack", "seq":7}', None),
        ('{"seq":7,"type":"ack"}', None),
        ('{"type":"ack","seq":7,"x":1}', None),
        # not acks the full parser accepts: never recognised
        ('{"type":"ack","seq":07}', None),
        ('{"type":"ack","seq":-1}', None),
        ('{"type":"ack","seq":1.0}', None),
        ('{"type":"ack","seq":1e3}', None),
        ('{"type":"ack","seq":\u0663}', None),
        ('{"type":"ack","seq":٣}', None),
        ('{"type":"ack","seq":²}', None),
        ('{"type":"ack","seq":1_0}', None),
        ('{"type":"ack","seq":}', None),
        ('{"type":"ack","seq":1}\n', None),
        (f'{{"type":"ack","seq":{MAX_SEQ + 1}}}', None),
        ('{"type":"ack","seq":12345678901234567}', None),
        (b'{"type":"ack","seq":1}', None),
    ],
)
def test_ack_seq_of_recognises_only_the_canonical_ack(raw: str | bytes, seq: int | None) -> None:
    assert ack_seq_of(raw) == seq


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.integers(min_value=-5, max_value=2**64).map(lambda n: f'{{"type":"ack","seq":{n}}}'),
        st.text(alphabet='{}":,ackqstype0123456789 -.e', max_size=30),
        st.text(max_size=8).map(lambda t: '{"type":"ack","seq":' + t + "}"),
    )
)
def test_ack_fast_path_agrees_with_the_full_parser(raw: str) -> None:
    # A leading space is valid JSON but not the canonical text: the full parser decides.
    try:
        full: Any = decode_client_frame(" " + raw)
    except ProtocolError:
        full = None
    fast = ack_seq_of(raw)
    if fast is not None:
        assert full == Ack(fast)
    elif full is not None and raw == f'{{"type":"ack","seq":{full.seq}}}':
        raise AssertionError(f"the canonical ack {raw!r} missed the fast path")


def test_server_receive_ack_seq() -> None:
    server = open_server()
    server.msg(3, "m3", b"3")
    assert server.receive_ack_seq('{"type":"ack","seq":2}', 3) == 2
    assert server.acked == 2
    assert server.receive_ack_seq('{"seq":3, "type":"ack"}', 3) == 3  # full parse
    assert server.receive_ack_seq('{"type":"ack","seq":1}', 3) == 1  # old: not lowering
    assert server.acked == 3
    assert server.receive_ack_seq('{"type":"ack","seq":5}', 4) == -1  # above highest sent
    assert (server.highest_sent, server.acked) == (4, 3)
    assert server.receive_ack_seq('{"type":"ack","seq":5}', 5) == 5  # the hub wrote more
    assert server.receive_ack(f'{{"type":"ack","seq":{MAX_SEQ + 1}}}', MAX_SEQ + 1) is None
    for other in (
        '{"type":"publish","data":1}',
        b'{"type":"ack","seq":1}',
        "nope",
        '{"type":"ack"}',
    ):
        assert server.receive_ack_seq(other, 5) == -1
        assert server.receive_ack(other, 5) is None
    assert server.state is ConnectionState.OPEN  # nothing was refused: `receive` does that
    assert server.receive_ack('{"type":"ack","seq":4}', 5) == Ack(4)
    small = open_server()
    small.max_message_size = 10
    assert small.receive_ack_seq('{"type":"ack","seq":0}', 0) == -1  # over its size limit
    with pytest.raises(ProtocolError, match="too_big"):
        small.receive('{"type":"ack","seq":0}')
    fresh = ServerProtocol()
    assert fresh.receive_ack_seq('{"type":"ack","seq":0}', 0) == -1  # before welcome


def test_server_resent_lower_seq_does_not_lower_highest_sent() -> None:
    server = open_server()
    server.msg(3, "m3", b"3")
    server.msg(2, "m2", b"2")
    assert server.highest_sent == 3


def test_server_acks_up_to_hello_last_seq_are_valid() -> None:
    server = open_server(last_seq=10)
    assert (server.highest_sent, server.acked) == (10, 10)
    assert server.receive('{"type":"ack","seq":10}') == Ack(10)
    assert server.receive('{"type":"ack","seq":4}') == Ack(4)  # old ack: returned, not lowering
    assert server.acked == 10
    with pytest.raises(ProtocolError) as info:
        server.receive('{"type":"ack","seq":11}')
    assert (info.value.code, info.value.close_code) == ("invalid_ack", 1002)
    assert server.state is ConnectionState.CLOSED


def test_server_acks_up_to_welcome_acked_are_valid() -> None:
    server = open_server(last_seq=0, next_seq=61, acked=50)  # a fresh client joins at 50
    assert (server.highest_sent, server.acked) == (50, 50)
    assert server.receive('{"type":"ack","seq":50}') == Ack(50)


def test_server_reset_starts_from_welcome_acked() -> None:
    server = ServerProtocol()
    server.receive(encode(Hello("alice", 50)))
    server.welcome(Welcome("s2", False, 4, reset=True, acked=0))  # numbering restarted at 1
    assert (server.highest_sent, server.acked) == (0, 0)
    with pytest.raises(ProtocolError):
        server.receive('{"type":"ack","seq":50}')


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ('{"type":"ack","seq":0}', "hello_required"),
        ('{"type":"publish","data":1}', "hello_required"),
        ('{"type":"ack","seq":"x"}', "invalid_frame"),
        ('{"type":"welcome","session":"s","resumed":false,"next_seq":1}', "unexpected_frame"),
    ],
)
def test_server_requires_hello_first(frame: str, code: str) -> None:
    server = ServerProtocol()
    with pytest.raises(ProtocolError) as info:
        server.receive(frame)
    assert info.value.code == code
    assert server.state is ConnectionState.CLOSED
    with pytest.raises(ProtocolError) as info:
        server.receive('{"type":"hello","client_id":"a"}')
    assert info.value.code == "closed"


def test_server_rejects_frames_between_hello_and_welcome() -> None:
    server = ServerProtocol()
    server.receive(encode(Hello("alice")))
    with pytest.raises(ProtocolError) as info:
        server.receive('{"type":"ack","seq":0}')
    assert info.value.code == "unexpected_frame"


def test_server_rejects_second_hello() -> None:
    server = open_server()
    with pytest.raises(ProtocolError) as info:
        server.receive(encode(Hello("alice")))
    assert (info.value.code, info.value.close_code) == ("unexpected_frame", 1002)
    assert server.state is ConnectionState.CLOSED


def test_server_binary_and_oversized_frames() -> None:
    server = ServerProtocol(max_message_size=64)
    with pytest.raises(ProtocolError) as info:
        server.receive(b"\x00")
    assert info.value.close_code == CloseCode.UNSUPPORTED_DATA
    server = open_server()
    server.max_message_size = 64
    with pytest.raises(ProtocolError) as info:
        server.receive(dumps({"type": "publish", "data": "x" * 100}))
    assert info.value.close_code == CloseCode.MESSAGE_TOO_BIG
    assert server.state is ConnectionState.CLOSED


def test_server_fail_returns_error_frame_and_closes() -> None:
    server = open_server()
    text = server.fail(ProtocolError("unauthorized", "bad token", CloseCode.POLICY_VIOLATION))
    assert decode_server_frame(text) == Error("unauthorized", "bad token")
    assert server.state is ConnectionState.CLOSED
    with pytest.raises(ProtocolError) as info:
        server.msg(1, "m", b"1")
    assert info.value.code == "closed"


def test_server_misuse_is_internal_error() -> None:
    server = ServerProtocol()
    calls: list[Callable[[], str]] = [
        lambda: server.welcome(Welcome("s", False, 1)),
        lambda: server.msg(1, "m", b"1"),
    ]
    for call in calls:
        with pytest.raises(ProtocolError) as info:
            call()
        assert (info.value.code, info.value.close_code) == ("internal_error", 1011)
    server.receive(encode(Hello("alice")))
    with pytest.raises(ProtocolError) as info:
        server.welcome(Welcome("s", False, 1, lost=0, lost_ranges=((1, 2),)))
    assert info.value.code == "internal_error"
    assert server.state is ConnectionState.AWAITING_HELLO  # a bad welcome is not sent
    server.welcome(Welcome("s", False, 1))
    with pytest.raises(ProtocolError):
        server.welcome(Welcome("s", False, 1))
    for seq in (0, -1, MAX_SEQ + 1):
        with pytest.raises(ProtocolError):
            server.msg(seq, "m", b"1")
    with pytest.raises(ProtocolError):
        server.msg(1, "m", b"1", enc="hex")
    server.close()
    with pytest.raises(ProtocolError) as info:
        server.welcome(Welcome("s", False, 1))
    assert info.value.code == "closed"


# --------------------------------------------------------------------------- ClientProtocol


def open_client(last_seq: int = 0, **welcome: Any) -> tuple[ClientProtocol, list[ClientEvent]]:
    """A client at `last_seq` that got a welcome; by default the server stands where it does."""
    client = ClientProtocol("alice", last_seq=last_seq, ack_every=3, ack_interval=1.0)
    client.hello()
    welcome.setdefault("acked", last_seq)
    welcome.setdefault("next_seq", last_seq + 1)
    events = client.receive(welcome_text(**welcome), 0.0)
    return client, events


def test_client_constructor_validates() -> None:
    for bad in ("", "a b", "x" * 129):
        with pytest.raises(ValueError):
            ClientProtocol(bad)
    with pytest.raises(ValueError):
        ClientProtocol("a", last_seq=-1)
    with pytest.raises(ValueError):
        ClientProtocol("a", last_seq=True)
    with pytest.raises(ValueError):
        ClientProtocol("a", token="t" * 4097)
    with pytest.raises(ValueError):
        ClientProtocol("a", ack_every=0)


def test_client_hello_carries_last_seq_and_token() -> None:
    client = ClientProtocol("alice", last_seq=4, token="tok")
    assert client.state.name == "CLOSED"
    assert decode_client_frame(client.hello()) == Hello("alice", 4, "tok")
    assert client.state is ConnectionState.AWAITING_WELCOME


def test_client_first_connect_and_in_order_delivery() -> None:
    client, events = open_client()
    assert events == [Welcomed(Welcome("s1", False, 1))]
    assert client.state is ConnectionState.OPEN
    assert client.welcome == Welcome("s1", False, 1)
    assert client.receive(msg_text(1, "a"), 0.1) == [Received(1, "m1", "a")]
    assert client.receive(msg_text(2, {"b": 2}), 0.2) == [Received(2, "m2", {"b": 2})]
    assert client.receive(msg_text(None, "n", "n1"), 0.3) == [Received(None, "n1", "n")]
    assert client.last_seq == 2


@pytest.mark.parametrize(
    "frames",
    [
        [msg_text(1, "a"), msg_text(2, {"b": [1, None]}), msg_text(None, "n", "n1")],
        [msg_text(3, "gap"), msg_text(2, "old"), msg_text(4, None)],  # loss, duplicate
        [encode_msg(1, "b1", b'"YQ=="', enc="base64"), msg_text(2, "x")],
        ['{"type":"msg","seq":1,"id":"m1","data":1,"type":"welcome"}'],  # last type wins
        ['{"type":"msg","seq":0,"id":"m0","data":1}'],
        ['{"type":"msg","seq":true,"id":"m","data":1}'],
        ['{"type":"msg","seq":1,"id":7,"data":1}'],
        ['{"type":"msg","seq":1,"id":"m1"}'],
        ['{"type":"msg","seq":1,"id":"m1","enc":"hex","data":"00"}'],
        ['{"type":"msg","seq":1,"id":"m1","data":1'],  # not JSON
        ['{"type":"msg","seq":1.0,"id":"m1","data":1}'],
    ],
)
def test_client_msg_fast_path_matches_the_full_path(frames: list[str]) -> None:
    def run(texts: list[str]) -> list[Any]:
        client, _ = open_client()
        out: list[Any] = []
        for i, text in enumerate(texts):
            try:
                out.append(client.receive(text, float(i)))
            except ProtocolError as exc:
                out.append((exc.code, client.state))
                break
        out.append((client.last_seq, client.duplicates, client.ack_now()))
        return out

    # the same frames, not in the servers' compact spelling: the client's full path
    respaced = [text.replace('"type":"msg"', '"type": "msg"', 1) for text in frames]
    assert all(not text.startswith('{"type":"msg",') for text in respaced)
    assert run(frames) == run(respaced)


def test_client_msg_before_welcome_or_after_close_is_refused() -> None:
    client = ClientProtocol("alice")
    client.hello()
    with pytest.raises(ProtocolError, match="unexpected_frame"):
        client.receive(msg_text(1), 0.0)
    client.close()
    with pytest.raises(ProtocolError, match="closed"):
        client.receive(msg_text(1), 0.0)


def test_client_drops_duplicates_but_still_acks() -> None:
    client, _ = open_client()
    client.receive(msg_text(1), 0.0)
    assert client.ack_now() == '{"type":"ack","seq":1}'
    assert client.receive(msg_text(1), 0.0) == []
    assert client.duplicates == 1
    assert client.ack_now() == '{"type":"ack","seq":1}'
    assert client.ack_now() is None


def test_client_reports_unannounced_gap_before_the_message() -> None:
    client, _ = open_client()
    client.receive(msg_text(1), 0.0)
    events = client.receive(msg_text(5), 0.0)
    assert events == [Lost(3, ((2, 4),), False), Received(5, "m5", "x")]
    assert client.last_seq == 5
    assert client.receive(msg_text(3), 0.0) == []  # a late seq is a duplicate, never re-delivered


def test_client_welcome_loss_is_reported_once() -> None:
    client, events = open_client(last_seq=3, next_seq=7, lost=3, lost_ranges=[[4, 5]])
    assert events[1] == Lost(3, ((4, 5),), False)  # 1 more lost with no known seq
    assert client.last_seq == 5  # given up on 4 and 5
    assert client.ack_now() is None  # nothing received yet: nothing to ack
    assert client.receive(msg_text(6), 0.0) == [Received(6, "m6", "x")]


def test_client_gap_partly_announced_reports_only_the_rest() -> None:
    client, _ = open_client(last_seq=3, next_seq=9, lost=1, lost_ranges=[[5, 5]])
    assert client.receive(msg_text(8), 0.0) == [
        Lost(3, ((4, 4), (6, 7)), False),
        Received(8, "m8", "x"),
    ]


def test_client_reannounced_loss_is_not_reported_twice() -> None:
    client, _ = open_client(last_seq=3, next_seq=7, lost=2, lost_ranges=[[4, 5]])
    client.close()
    client.hello()  # the connection dropped before seq 6 arrived
    text = welcome_text(next_seq=7, acked=3, lost=2, lost_ranges=[[4, 5]])
    assert client.receive(text, 0.0) == [Welcomed(Welcome("s1", False, 7, 2, ((4, 5),), acked=3))]
    assert client.receive(msg_text(6), 0.0) == [Received(6, "m6", "x")]


def test_client_ignores_announced_ranges_it_already_passed() -> None:
    _, events = open_client(last_seq=10, acked=7, next_seq=12, lost=4, lost_ranges=[[8, 11]])
    assert events[1] == Lost(1, ((11, 11),), False)


def test_client_reset_keeps_numbering_when_server_continues() -> None:
    # The server lost its state; it numbered the 3 messages it holds after our last_seq.
    client, events = open_client(last_seq=40, reset=True, next_seq=44, acked=40)
    assert events == [Welcomed(Welcome("s1", False, 44, reset=True, acked=40)), Lost(0, (), True)]
    assert client.last_seq == 40
    assert client.receive(msg_text(41), 0.0) == [Received(41, "m41", "x")]


@pytest.mark.parametrize("acked", [0, 19, 99])
def test_client_reset_adopts_server_numbering(acked: int) -> None:
    client = ClientProtocol("alice", last_seq=40)
    client.hello()
    events = client.receive(welcome_text(next_seq=acked + 3, acked=acked, reset=True), 0.0)
    assert events[1] == Lost(0, (), True)
    assert client.last_seq == acked
    seq = acked + 1
    assert client.receive(msg_text(seq), 0.0) == [Received(seq, f"m{seq}", "x")]
    assert client.ack_now() == dumps({"type": "ack", "seq": seq})


def test_client_treats_numbering_going_backwards_as_reset() -> None:
    client = ClientProtocol("alice", last_seq=40)
    client.hello()
    events = client.receive(welcome_text(next_seq=3, acked=0), 0.0)  # no reset flag
    assert events[1] == Lost(0, (), True)
    assert client.last_seq == 0
    assert client.receive(msg_text(1), 0.0) == [Received(1, "m1", "x")]


def test_fresh_client_joins_after_what_was_acknowledged() -> None:
    client = ClientProtocol("alice")
    client.hello()
    events = client.receive(welcome_text(next_seq=61, acked=50, resumed=True), 0.0)
    assert events == [Welcomed(Welcome("s1", True, 61, acked=50))]
    assert client.last_seq == 50
    assert client.receive(msg_text(51), 0.0) == [Received(51, "m51", "x")]


def test_client_behind_server_ack_is_told_what_it_missed() -> None:
    # e.g. the app restarted from a stale persisted last_seq
    client, events = open_client(last_seq=40, acked=50, next_seq=53, lost=1, lost_ranges=[[52, 52]])
    assert events[1] == Lost(11, ((41, 50), (52, 52)), False)
    assert client.last_seq == 50
    assert client.receive(msg_text(51), 0.0) == [Received(51, "m51", "x")]
    assert client.receive(msg_text(53), 0.0) == [Received(53, "m53", "x")]


def test_fresh_client_reports_announced_head_loss() -> None:
    client = ClientProtocol("alice")
    client.hello()
    events = client.receive(welcome_text(next_seq=5, lost=3, lost_ranges=[[1, 3]]), 0.0)
    assert events[1] == Lost(3, ((1, 3),), False)
    assert client.last_seq == 3
    assert client.receive(msg_text(4), 0.0) == [Received(4, "m4", "x")]


def test_client_never_acks_above_what_the_server_wrote() -> None:
    client, events = open_client(last_seq=5, next_seq=9, lost=2, lost_ranges=[[7, 8]])
    assert events[1] == Lost(2, ((7, 8),), False)
    assert client.last_seq == 5
    assert client.receive(msg_text(6), 0.0) == [Received(6, "m6", "x")]
    assert client.last_seq == 8  # 7 and 8 are given up: the next hello says so
    assert client.ack_now() == '{"type":"ack","seq":6}'  # but seq 8 was never written
    assert decode_client_frame(client.hello()) == Hello("alice", 8)


def test_losses_announced_earlier_are_not_skipped_on_a_new_connection() -> None:
    # Announced lost, then the server restarted without noticing (the client was at 0):
    # its new seqs 1 and 2 are new messages and must be delivered.
    client, _ = open_client(next_seq=3, lost=1, lost_ranges=[[2, 2]])
    client.close()
    client.hello()
    client.receive(welcome_text(next_seq=3), 0.0)
    assert client.receive(msg_text(1), 0.0) == [Received(1, "m1", "x")]
    assert client.receive(msg_text(2), 0.0) == [Received(2, "m2", "x")]


def test_client_bytes_message() -> None:
    client, _ = open_client()
    data_json, enc = encode_data(b"\x01\x02")
    assert client.receive(encode_msg(1, "b", data_json, enc=enc), 0.0) == [
        Received(1, "b", b"\x01\x02")
    ]


def test_client_bad_base64_fails_without_delivering() -> None:
    client, _ = open_client()
    with pytest.raises(ProtocolError) as info:
        client.receive('{"type":"msg","seq":1,"id":"m","enc":"base64","data":"@@"}', 0.0)
    assert info.value.code == "invalid_frame"
    assert client.last_seq == 0
    assert client.state is ConnectionState.CLOSED


def test_client_server_error_is_rejection() -> None:
    client = ClientProtocol("alice")
    client.hello()
    events = client.receive('{"type":"error","code":"unauthorized","reason":"bad token"}', 0.0)
    assert events == [ServerRejected("unauthorized", "bad token")]
    assert client.state is ConnectionState.CLOSED
    with pytest.raises(ProtocolError) as info:
        client.receive(welcome_text(), 0.0)
    assert info.value.code == "closed"


def test_client_state_rules() -> None:
    client = ClientProtocol("alice")
    with pytest.raises(ProtocolError) as info:
        client.receive(welcome_text(), 0.0)
    assert info.value.code == "closed"
    client.hello()
    with pytest.raises(ProtocolError) as info:
        client.receive(msg_text(1), 0.0)
    assert info.value.code == "unexpected_frame"
    assert client.state is ConnectionState.CLOSED
    client.hello()
    client.receive(welcome_text(), 0.0)
    with pytest.raises(ProtocolError) as info:
        client.receive(welcome_text(), 0.0)
    assert info.value.code == "unexpected_frame"
    client.hello()
    with pytest.raises(ProtocolError) as info:
        client.receive('{"type":"ack","seq":1}', 0.0)
    assert info.value.code == "unexpected_frame"
    client.hello()
    with pytest.raises(ProtocolError) as info:
        client.receive(b"binary", 0.0)
    assert info.value.close_code == CloseCode.UNSUPPORTED_DATA


def test_client_acks_every_n_messages() -> None:
    client, _ = open_client()  # ack_every=3, ack_interval=1.0
    assert client.ack_due(0.0) is None
    assert client.ack_deadline is None
    client.receive(msg_text(1), 10.0)
    client.receive(msg_text(2), 10.1)
    assert client.ack_deadline == 11.0
    assert client.ack_due(10.2) is None
    client.receive(msg_text(3), 10.2)
    assert client.ack_due(10.2) == '{"type":"ack","seq":3}'
    assert client.ack_due(10.2) is None
    client.receive(msg_text(None), 10.3)  # non-critical messages are never acked
    assert client.ack_due(99.0) is None


def test_client_acks_after_interval() -> None:
    client, _ = open_client()
    client.receive(msg_text(1), 5.0)
    assert client.ack_due(5.99) is None
    client.receive(msg_text(2), 5.5)
    assert client.ack_due(6.0) == '{"type":"ack","seq":2}'


def test_client_no_acks_outside_open_and_hello_resets_pending() -> None:
    client, _ = open_client()
    client.receive(msg_text(1), 0.0)
    client.close()
    assert client.ack_now() is None
    assert client.ack_due(100.0) is None
    assert decode_client_frame(client.hello()) == Hello("alice", 1)
    assert client.ack_now() is None  # hello carried last_seq
    client.receive(welcome_text(next_seq=2), 0.0)
    assert client.ack_now() is None


def test_client_publish() -> None:
    client = ClientProtocol("alice")
    client.hello()
    with pytest.raises(ProtocolError):
        client.publish({"x": 1})
    client.receive(welcome_text(), 0.0)
    assert client.publish({"x": 1}) == encode(Publish({"x": 1}))
    assert client.publish("t", id="p1") == encode(Publish("t", "p1"))
    frame = decode_client_frame(client.publish(b"\xff", id="p2"))
    assert frame == Publish("/w==", "p2", "base64")
    assert decode_data(frame) == b"\xff"


# --------------------------------------------------------------------------- properties

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=12,
)
frame_types = st.sampled_from(["hello", "welcome", "msg", "ack", "publish", "error", "other"])
field_names = st.sampled_from(
    [
        "client_id",
        "last_seq",
        "token",
        "session",
        "resumed",
        "next_seq",
        "lost",
        "lost_ranges",
        "reset",
        "seq",
        "id",
        "data",
        "enc",
        "code",
        "reason",
    ]
)
field_values = (
    json_values
    | st.integers(min_value=-2, max_value=2**54)
    | st.lists(st.lists(st.integers(-1, 10), max_size=3), max_size=3)
    | st.sampled_from(["base64", "alice", "", "aGk="])
)
typed_dicts = st.builds(
    lambda t, fields: {"type": t, **fields},
    frame_types,
    st.dictionaries(field_names, field_values, max_size=7),
)
raw_inputs = (
    st.text()
    | st.binary()
    | json_values.map(dumps)
    | typed_dicts.map(dumps)
    | st.text(alphabet='{}[]":,0123456789.eE-+ truefalsn\\u', max_size=40)
)


def decodes_cleanly(decode: Any, raw: Any) -> Any:
    try:
        frame = decode(raw)
    except ProtocolError as exc:
        assert isinstance(exc.code, str) and exc.code
        assert exc.close_code in set(CloseCode)
        return None
    assert decode(encode(frame)) == frame  # whatever decodes, re-encodes to the same frame
    return frame


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(raw_inputs)
def test_fuzz_decoders_raise_only_protocol_error(raw: Any) -> None:
    for decode in (decode_client_frame, decode_server_frame):
        frame = decodes_cleanly(decode, raw)
        if isinstance(frame, Msg | Publish):
            with contextlib.suppress(ProtocolError):
                decode_data(frame)


@settings(max_examples=400)
@given(typed_dicts)
def test_fuzz_right_type_wrong_fields(obj: dict[str, Any]) -> None:
    decodes_cleanly(decode_client_frame, dumps(obj))
    decodes_cleanly(decode_server_frame, dumps(obj))


client_ids = st.text(alphabet="abcXYZ019._:@-", min_size=1, max_size=MAX_CLIENT_ID_LENGTH)
seqs = st.integers(min_value=0, max_value=MAX_SEQ)
pos_seqs = st.integers(min_value=1, max_value=MAX_SEQ)


@st.composite
def welcomes(draw: st.DrawFn) -> Welcome:
    acked = draw(st.integers(0, 1000) | st.just(MAX_SEQ - 20_000))
    bounds = sorted(set(draw(st.lists(st.integers(acked + 1, acked + 10_000), max_size=8))))
    ranges = tuple((bounds[i], bounds[i + 1]) for i in range(0, len(bounds) - 1, 2))
    low = max(acked, ranges[-1][1] if ranges else 0) + 1
    next_seq = draw(st.integers(low, low + 5) | st.just(MAX_SEQ))
    lost = sum(b - a + 1 for a, b in ranges) + draw(st.integers(0, 5))
    resumed, reset = draw(st.booleans()), draw(st.booleans())
    return Welcome(draw(st.text()), resumed, next_seq, lost, ranges, reset, acked)


client_frames = st.one_of(
    st.builds(Hello, client_ids, st.integers(0, MAX_RESUME_SEQ), st.none() | st.text(max_size=50)),
    st.builds(Auth, st.text(min_size=1, max_size=50)),
    st.builds(Ack, seqs),
    st.builds(Publish, json_values, st.none() | st.text()),
)
server_frames = st.one_of(
    welcomes(),
    st.builds(Msg, st.text(), json_values, st.none() | pos_seqs),
    st.builds(Error, st.text(), st.text()),
)


@given(client_frames)
def test_round_trip_client_frames(frame: Frame) -> None:
    text = encode(frame)
    assert text.startswith('{"type":')
    assert decode_client_frame(text) == frame


@given(server_frames)
def test_round_trip_server_frames(frame: Frame) -> None:
    text = encode(frame)
    assert text.startswith('{"type":')
    assert decode_server_frame(text) == frame


@given(st.none() | pos_seqs, st.text(), json_values, st.sampled_from([None, "base64"]))
def test_encode_msg_matches_encode(
    seq: int | None, msg_id: str, data: Any, enc: str | None
) -> None:
    if enc is not None:
        data = "aGk="
    text = encode_msg(seq, msg_id, orjson.dumps(data), enc=enc)
    assert text == encode(Msg(msg_id, data, seq, enc))
    assert decode_server_frame(text) == Msg(msg_id, data, seq, enc)


@settings(max_examples=300)
@given(st.lists(raw_inputs | client_frames.map(encode), max_size=8))
def test_fuzz_server_protocol(frames: list[Any]) -> None:
    server = ServerProtocol()
    for raw in frames:
        if server.state is ConnectionState.AWAITING_HELLO and server.hello is not None:
            server.welcome(Welcome("s", False, min(server.hello.last_seq + 1, MAX_SEQ)))
        try:
            server.receive(raw)
        except ProtocolError:
            assert server.state is ConnectionState.CLOSED
        assert server.acked <= server.highest_sent


@settings(max_examples=300)
@given(st.lists(raw_inputs | server_frames.map(encode), max_size=8), st.booleans())
def test_fuzz_client_protocol(frames: list[Any], reconnect: bool) -> None:
    client = ClientProtocol("alice")
    client.hello()
    for raw in frames:
        try:
            client.receive(raw, 0.0)
        except ProtocolError:
            assert client.state is ConnectionState.CLOSED
        if client.state is ConnectionState.CLOSED and reconnect:
            client.hello()
        client.ack_due(1.0)


@settings(max_examples=300)
@given(st.lists(st.integers(1, 30), max_size=40), st.integers(0, 3))
def test_client_never_skips_silently(arrivals: list[int], last_seq: int) -> None:
    """Whatever order seqs arrive in: each is delivered once, in order, or reported lost once."""
    client = ClientProtocol("alice", last_seq=last_seq)
    client.hello()
    client.receive(welcome_text(next_seq=last_seq + 1), 0.0)
    delivered: list[int] = []
    lost: list[int] = []
    for seq in arrivals:
        for event in client.receive(msg_text(seq), 0.0):
            if isinstance(event, Received):
                assert event.seq is not None
                delivered.append(event.seq)
            elif isinstance(event, Lost):
                lost.extend(s for a, b in event.ranges for s in range(a, b + 1))
                assert event.count == sum(b - a + 1 for a, b in event.ranges)
    assert delivered == sorted(set(delivered))
    assert sorted(delivered + lost) == list(range(last_seq + 1, client.last_seq + 1))
    assert client.duplicates == len(arrivals) - len(delivered)


# --------------------------------------------------------------------------- end-to-end model


class Model:
    """A hub following docs/protocol.md over a flaky link, and the app behind a ClientProtocol.

    The server numbers a client's critical messages once a hello has told it where the
    stream stands, keeps each until acked or expired, and describes the rest in the next
    welcome; after losing its state (a restart) it answers with a reset.
    """

    def __init__(self) -> None:
        self.client = ClientProtocol("alice", ack_every=2, ack_interval=1.0)
        self.now = 0.0
        self.tags = 0
        # server state for alice
        self.established = False  # a hello has fixed the numbering since the last restart
        self.next_seq = 1
        self.acked = 0
        self.outbox: list[list[Any]] = []  # [seq | None, tag, written on this connection]
        self.lost_unnumbered = 0
        self.conn: ServerProtocol | None = None
        self.held = False  # e.g. an open breaker: sends wait in the outbox
        self.s2c: list[str] = []
        self.c2s: list[str] = []
        # what the app saw, and what the server gave up on, since the last server restart
        self.accepted: list[str] = []
        self.expired: list[tuple[int | None, str]] = []
        self.delivered: dict[str, int] = {}
        self.reported_lost: set[int] = set()
        self.reported_unnumbered = 0
        self.highest_delivered = 0

    # --- server
    def send(self) -> None:
        self.tags += 1
        tag = f"t{self.tags}"
        self.accepted.append(tag)
        entry: list[Any] = [None, tag, False]
        if self.established:
            entry[0] = self.next_seq
            self.next_seq += 1
        self.outbox.append(entry)
        self.flush()

    def flush(self) -> None:
        if self.conn is None or self.conn.state is not ConnectionState.OPEN or self.held:
            return
        for entry in self.outbox:
            if not entry[2]:
                entry[2] = True
                self.s2c.append(self.conn.msg(entry[0], entry[1], orjson.dumps(entry[1])))

    def expire(self, index: int) -> None:
        if self.outbox:
            seq, tag, _ = self.outbox.pop(index % len(self.outbox))
            self.expired.append((seq, tag))
            if seq is None:
                self.lost_unnumbered += 1

    def ack(self, seq: int) -> None:
        self.acked = max(self.acked, seq)
        self.outbox = [e for e in self.outbox if e[0] is None or e[0] > self.acked]

    def connect(self) -> None:
        if self.conn is not None:
            return
        conn = self.conn = ServerProtocol()
        hello = conn.receive(self.client.hello())
        assert isinstance(hello, Hello)
        last = hello.last_seq
        reset = last >= self.next_seq or (not self.established and last > 0)
        if reset or not self.established:
            self.next_seq = last + 1
            self.acked = last
            for entry in self.outbox:
                entry[0] = self.next_seq
                self.next_seq += 1
        self.ack(last)
        held = {e[0] for e in self.outbox}
        ranges: list[tuple[int, int]] = []
        for seq in range(self.acked + 1, self.next_seq):
            if seq in held:
                continue
            if ranges and ranges[-1][1] == seq - 1:
                ranges[-1] = (ranges[-1][0], seq)
            else:
                ranges.append((seq, seq))
        lost = sum(b - a + 1 for a, b in ranges) + self.lost_unnumbered
        resumed = self.established and not reset and lost == 0
        welcome = Welcome("s", resumed, self.next_seq, lost, tuple(ranges), reset, self.acked)
        self.established = True
        self.lost_unnumbered = 0
        for entry in self.outbox:
            entry[2] = False
        self.on_events(self.client.receive(conn.welcome(welcome), self.now))
        self.flush()

    def drop(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        self.client.close()
        self.s2c.clear()
        self.c2s.clear()

    def server_restart(self) -> None:
        self.drop()
        self.established = False
        self.next_seq = 1
        self.acked = 0
        self.outbox = []
        self.lost_unnumbered = 0
        self.accepted = []
        self.expired = []
        self.reported_unnumbered = 0
        self.reported_lost = set()  # a new stream: its seqs may reuse numbers reported before

    # --- link
    def deliver_to_client(self) -> None:
        if self.s2c:
            self.on_events(self.client.receive(self.s2c.pop(0), self.now))

    def deliver_to_server(self) -> None:
        if self.c2s and self.conn is not None:
            frame = self.conn.receive(self.c2s.pop(0))
            assert isinstance(frame, Ack)
            self.ack(frame.seq)

    def tick(self) -> None:
        self.now += 0.6
        ack = self.client.ack_due(self.now)
        if ack is not None:
            self.c2s.append(ack)

    # --- the app
    def on_events(self, events: list[ClientEvent]) -> None:
        for event in events:
            if isinstance(event, Received):
                assert event.seq is not None
                assert event.id not in self.delivered, "delivered twice"
                assert event.seq > self.highest_delivered, "out of order"
                assert event.seq not in self.reported_lost
                self.highest_delivered = event.seq
                self.delivered[event.id] = event.seq
            elif isinstance(event, Lost):
                seqs = {s for a, b in event.ranges for s in range(a, b + 1)}
                assert not seqs & self.reported_lost, "loss reported twice"
                assert not seqs & set(self.delivered.values())
                self.reported_lost |= seqs
                self.reported_unnumbered += event.count - len(seqs)
            else:
                assert isinstance(event, Welcomed)

    def settle(self) -> None:
        self.held = False
        for _ in range(2):  # what is pending on this connection, then on a fresh one
            self.flush()
            while self.s2c:
                self.deliver_to_client()
            self.drop()
            self.connect()
        accepted = set(self.accepted)
        expired_tags = {tag for _, tag in self.expired}
        for tag in accepted - expired_tags:
            assert tag in self.delivered, f"{tag} was never delivered"
        for seq, tag in self.expired:
            if seq is not None and tag not in self.delivered:
                assert seq in self.reported_lost, f"loss of seq {seq} was never reported"
        expired_unnumbered = sum(1 for seq, _ in self.expired if seq is None)
        assert self.reported_unnumbered == expired_unnumbered


actions = st.lists(
    st.one_of(
        st.sampled_from(
            ["send", "send", "send", "to_client", "to_client", "to_server", "tick", "connect"]
        ),
        st.sampled_from(["drop", "hold", "hold", "unhold", "restart"]),
        st.integers(0, 20).map(lambda i: ("expire", i)),
    ),
    max_size=80,
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(actions)
def test_model_exactly_once_in_order_or_reported(steps: list[Any]) -> None:
    model = Model()
    model.connect()
    for step in steps:
        if isinstance(step, tuple):
            model.expire(step[1])
        elif step == "send":
            model.send()
        elif step == "to_client":
            model.deliver_to_client()
        elif step == "to_server":
            model.deliver_to_server()
        elif step == "tick":
            model.tick()
        elif step == "connect":
            model.connect()
        elif step == "drop":
            model.drop()
        elif step == "hold":
            model.held = True
        elif step == "unhold":
            model.held = False
            model.flush()
        elif step == "restart":
            model.server_restart()
    model.settle()


@pytest.mark.parametrize(
    "number",
    ["18446744073709551616", "-9223372036854775809", "123456789012345678901234567890"],
)
def test_an_integer_beyond_64_bits_is_refused_not_rounded(number: str) -> None:
    # orjson parses such a number as a float (or refuses it, before 3.10): either way the
    # frame is refused as out of range, never handed on with its value rounded.
    raw = f'{{"type":"publish","data":{{"n":{number}}}}}'
    with pytest.raises(ProtocolError) as info:
        decode_client_frame(raw)
    assert info.value.code == "invalid_frame"
    assert "out of range" in str(info.value)


def test_long_digit_runs_that_are_not_huge_integers_pass() -> None:
    # 2**64 - 1 has 20 digits and fits; digits inside a string are text.
    frame = decode_client_frame(
        '{"type":"publish","data":{"n":18446744073709551615,"s":"123456789012345678901234"}}'
    )
    assert isinstance(frame, Publish)
    assert frame.data == {"n": 18446744073709551615, "s": "123456789012345678901234"}


def test_an_out_of_range_integer_nested_deeper_than_json_recurses_is_refused() -> None:
    # orjson parses up to 1,024 levels; the check must not give up where `json` would.
    for depth in (900, 1000, 1020):
        raw = '{"type":"publish","data":' + "[" * depth + "18446744073709551617" + "]" * depth + "}"
        with pytest.raises(ProtocolError) as info:
            decode_client_frame(raw)
        assert info.value.code == "invalid_frame"


@pytest.mark.parametrize(
    "text",
    [
        '{"f":1.12345678901234567890123}',  # a fraction's digits are not an integer
        '{"e":1e12345678901234567890}',  # nor an exponent's
        '{"s":"a\\"12345678901234567890123"}',  # digits after an escaped quote are text
        '{"n":-9223372036854775808,"m":18446744073709551615}',  # both ends of the range
    ],
)
def test_the_integer_scan_reads_only_integer_literals(text: str) -> None:
    assert not has_out_of_range_int(text)
    assert not has_out_of_range_int(text.encode())


def test_the_integer_scan_consumes_an_unterminated_string_in_one_match() -> None:
    # Malformed text reaches the scan on the error path (nested deeper than `json`
    # recurses). A string that never closes must be consumed to the end by one match,
    # not retried from every later quote: that was quadratic in the frame's length.
    from tether.protocol import _STRING_OR_INTEGER

    tail = '"\\' * 5000 + "1234567890123456789"
    found = _STRING_OR_INTEGER.match(tail)
    assert found is not None and found.end() == len(tail)
    raw = "[" * 1100 + tail
    with pytest.raises(ProtocolError) as info:
        decode_client_frame(raw)
    assert info.value.code == "invalid_json"
