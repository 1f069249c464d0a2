"""The tether.v1 wire protocol, sans-I/O: text in, typed frames and events out, nothing else.

Keeping the protocol free of sockets, tasks and clocks makes it the one place where the
rules of resumable delivery live, so the hub, the client and other-language
implementations (see docs/protocol.md) agree, and so it can be fuzzed in isolation.
Decoders and state machines raise only `ProtocolError` for anything that arrives from
the wire; each error carries the `error` frame code and the WebSocket close code to use.
"""

from __future__ import annotations

import base64
import enum
import json
import re
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

import orjson

__all__ = [
    "CHANNEL_PATTERN",
    "CLIENT_ID_PATTERN",
    "CLIENT_ID_RULE",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "MAX_CHANNEL_LENGTH",
    "MAX_CLIENT_ID_LENGTH",
    "MAX_RESUME_SEQ",
    "MAX_SEQ",
    "MAX_TOKEN_LENGTH",
    "SUBPROTOCOL",
    "Ack",
    "Auth",
    "ChannelFrame",
    "ClientEvent",
    "ClientFrame",
    "ClientProtocol",
    "CloseCode",
    "ConnectionState",
    "Error",
    "Frame",
    "Hello",
    "Join",
    "Leave",
    "Lost",
    "Msg",
    "ProtocolError",
    "Pub",
    "Publish",
    "Received",
    "ServerFrame",
    "ServerProtocol",
    "ServerRejected",
    "Since",
    "Subscribe",
    "Subscribed",
    "Unsubscribe",
    "Unsubscribed",
    "Welcome",
    "Welcomed",
    "ack_seq_of",
    "check_ack",
    "decode_client_frame",
    "decode_data",
    "decode_server_frame",
    "encode",
    "encode_data",
    "encode_msg",
    "encode_pub",
    "has_out_of_range_int",
    "valid_client_id",
]

SUBPROTOCOL: Final = "tether.v1"
MAX_CLIENT_ID_LENGTH: Final = 128
MAX_TOKEN_LENGTH: Final = 4096
MAX_EPOCH_LENGTH: Final = 64
MAX_SEQ: Final = 2**53 - 1  # every integer on the wire must survive a JavaScript number
# The highest `hello.last_seq` a server accepts: a stream resumed there still has room for
# 2^32 more messages before its seqs would leave the range every peer can represent.
MAX_RESUME_SEQ: Final = MAX_SEQ - 2**32
# orjson parses integers of at most 64 bits exactly; a longer one is an out-of-range
# number, not malformed JSON, so it gets `invalid_frame` (see `_load`). Older orjson
# refuses such text, newer orjson quietly parses it as a float: text holding a run of 19
# digits (2**64 has 20, -2**63 has 19 after its minus) is scanned for such integers
# (`has_out_of_range_int`). The run is found at memory speed: digits are mapped to "0",
# everything else to "x", and the result searched for nineteen "0"s (a regular
# expression without a literal prefix would try every position: ~40x slower).
_INT64_MIN: Final = -(2**63)
_UINT64_MAX: Final = 2**64 - 1
_DIGITS_AS_ZERO: Final = bytes(0x30 if 0x30 <= b <= 0x39 else 0x78 for b in range(256))
_NINETEEN_DIGITS: Final = b"0" * 19
# A JSON value that is a string (skipped whole, so its digits are text), or an integer
# literal: not preceded by a digit, dot, exponent or sign, not followed by a fraction or
# exponent. Linear, and without recursion however deep the nesting. The string branch
# never fails once it has started (unrolled, its closing quote optional): on malformed
# text (the error path scans what orjson refused) a string that never closes is consumed
# to the end once, instead of being tried again from every later quote (quadratic).
_STRING_OR_INTEGER: Final = re.compile(
    r'"[^"\\]*(?:\\[\s\S][^"\\]*)*"?|(?<![0-9.eE+\-])(-?[0-9]{19,})(?![0-9.eE])'
)
DEFAULT_MAX_MESSAGE_SIZE: Final = 1_048_576

# The client-id rule, for every layer (hello frames, hub sends, HTTP routes, auth tokens).
CLIENT_ID_PATTERN: Final = re.compile(rf"^[A-Za-z0-9._:@-]{{1,{MAX_CLIENT_ID_LENGTH}}}$")
CLIENT_ID_RULE: Final = f"1-{MAX_CLIENT_ID_LENGTH} characters of A-Z a-z 0-9 . _ : @ -"


def valid_client_id(client_id: object) -> bool:
    """Whether `client_id` is a string that follows the client-id rule (`fullmatch`: with
    `match`, the pattern's `$` would also accept a trailing newline)."""
    return isinstance(client_id, str) and CLIENT_ID_PATTERN.fullmatch(client_id) is not None


MAX_CHANNEL_LENGTH: Final = 128
CHANNEL_PATTERN: Final = re.compile(rf"[A-Za-z0-9._:@-]{{1,{MAX_CHANNEL_LENGTH}}}")
MAX_REASON_LENGTH: Final = 1024


_ENCODINGS: Final = (None, "base64")


class CloseCode(enum.IntEnum):
    """WebSocket close codes (RFC 6455 §7.4) that Tether uses."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013


class ProtocolError(Exception):
    """Why a connection must end: the `error` frame to send and the close code to close with."""

    def __init__(self, code: str, reason: str, close_code: int = CloseCode.PROTOCOL_ERROR) -> None:
        super().__init__(code, reason, close_code)
        self.code = code
        self.reason = reason
        self.close_code = close_code

    def __str__(self) -> str:
        return f"{self.code}: {self.reason}"

    def to_frame(self) -> str:
        """The JSON text of the `error` frame that reports this error to the peer."""
        return encode(Error(self.code, self.reason))


# --------------------------------------------------------------------------- frames


@dataclass(frozen=True, slots=True)
class Hello:
    client_id: str
    last_seq: int = 0
    token: str | None = None
    epoch: str | None = None  # the stream identity last_seq belongs to (from a welcome)


@dataclass(frozen=True, slots=True)
class Welcome:
    """The answer to hello: each seq between `acked` and `next_seq` is re-sent next or lost."""

    session: str
    resumed: bool
    next_seq: int
    lost: int = 0
    lost_ranges: tuple[tuple[int, int], ...] = ()
    reset: bool = False
    acked: int = 0  # every seq <= acked counts as delivered to this client id
    epoch: str | None = None  # the stream's identity: a hello names it to resume


@dataclass(frozen=True, slots=True)
class Msg:
    id: str
    data: Any
    seq: int | None = None  # None: a non-critical message (not numbered, not acked)
    enc: str | None = None  # "base64": `data` is the base64 text of a bytes payload


@dataclass(frozen=True, slots=True)
class Ack:
    seq: int


@dataclass(frozen=True, slots=True)
class Publish:
    data: Any
    id: str | None = None
    enc: str | None = None


@dataclass(frozen=True, slots=True)
class Auth:
    """A fresh token for an open connection (client -> server), sent before the old expires."""

    token: str


@dataclass(frozen=True, slots=True)
class Error:
    code: str
    reason: str


# ---- channels (see docs/protocol.md, "Channels")


@dataclass(frozen=True, slots=True)
class Since:
    """A subscriber's position: the last offset it saw within `epoch`."""

    epoch: str
    offset: int


@dataclass(frozen=True, slots=True)
class Subscribe:
    """Client -> server: subscribe to `channel`, resuming after `since` when given;
    `presence` asks for `join`/`leave` frames."""

    channel: str
    since: Since | None = None
    presence: bool = False


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    channel: str


@dataclass(frozen=True, slots=True)
class Subscribed:
    """Server -> client: the subscription is on. `epoch`/`offset`: the stream's position
    now. `pub` frames follow from offset `after + 1` (a replay first, when resuming).
    `recovered` false: `lost` messages after `since` are gone; `reset`: the subscriber's
    epoch no longer exists, so losses from it could not be counted."""

    channel: str
    epoch: str
    offset: int
    recovered: bool
    lost: int = 0
    after: int = 0
    reset: bool = False


@dataclass(frozen=True, slots=True)
class Unsubscribed:
    """Server -> client: the subscription is off (or was refused: `code` says why)."""

    channel: str
    reason: str
    code: str | None = None


@dataclass(frozen=True, slots=True)
class Pub:
    """Server -> client: one message of a channel's stream."""

    channel: str
    offset: int
    id: str
    data: Any
    enc: str | None = None


@dataclass(frozen=True, slots=True)
class Join:
    channel: str
    client_id: str


@dataclass(frozen=True, slots=True)
class Leave:
    channel: str
    client_id: str


ChannelFrame: TypeAlias = Subscribed | Unsubscribed | Pub | Join | Leave
Frame: TypeAlias = (
    Hello | Welcome | Msg | Ack | Publish | Auth | Error | Subscribe | Unsubscribe | ChannelFrame
)
ClientFrame: TypeAlias = Hello | Ack | Publish | Auth | Subscribe | Unsubscribe
ServerFrame: TypeAlias = Welcome | Msg | Error | ChannelFrame


# --------------------------------------------------------------------------- encoding


def encode(frame: Frame) -> str:
    """The compact JSON text of a frame, `type` first; optional fields at None are omitted."""
    obj: dict[str, Any]
    if isinstance(frame, Msg):
        return encode_msg(frame.seq, frame.id, orjson.dumps(frame.data), enc=frame.enc)
    if isinstance(frame, Ack):
        return f'{{"type":"ack","seq":{frame.seq}}}'
    if isinstance(frame, Hello):
        obj = {"type": "hello", "client_id": frame.client_id, "last_seq": frame.last_seq}
        if frame.token is not None:
            obj["token"] = frame.token
        if frame.epoch is not None:
            obj["epoch"] = frame.epoch
    elif isinstance(frame, Welcome):
        obj = {
            "type": "welcome",
            "session": frame.session,
            "resumed": frame.resumed,
            "next_seq": frame.next_seq,
            "acked": frame.acked,
            "lost": frame.lost,
            "lost_ranges": frame.lost_ranges,
            "reset": frame.reset,
        }
        if frame.epoch is not None:
            obj["epoch"] = frame.epoch
    elif isinstance(frame, Auth):
        obj = {"type": "auth", "token": frame.token}
    elif isinstance(frame, Pub):
        data_json = orjson.dumps(frame.data)
        return encode_pub(frame.channel, frame.offset, frame.id, data_json, frame.enc)
    elif isinstance(frame, Subscribe):
        obj = {"type": "subscribe", "channel": frame.channel}
        if frame.since is not None:
            obj["since"] = {"epoch": frame.since.epoch, "offset": frame.since.offset}
        if frame.presence:
            obj["presence"] = True
    elif isinstance(frame, Unsubscribe):
        obj = {"type": "unsubscribe", "channel": frame.channel}
    elif isinstance(frame, Subscribed):
        obj = {
            "type": "subscribed",
            "channel": frame.channel,
            "epoch": frame.epoch,
            "offset": frame.offset,
            "recovered": frame.recovered,
            "lost": frame.lost,
            "after": frame.after,
            "reset": frame.reset,
        }
    elif isinstance(frame, Unsubscribed):
        obj = {"type": "unsubscribed", "channel": frame.channel, "reason": frame.reason}
        if frame.code is not None:
            obj["code"] = frame.code
    elif isinstance(frame, Join | Leave):
        kind = "join" if isinstance(frame, Join) else "leave"
        obj = {"type": kind, "channel": frame.channel, "client_id": frame.client_id}
    elif isinstance(frame, Publish):
        obj = {"type": "publish"}
        if frame.id is not None:
            obj["id"] = frame.id
        if frame.enc is not None:
            obj["enc"] = frame.enc
        obj["data"] = frame.data
    else:
        obj = {"type": "error", "code": frame.code, "reason": frame.reason}
    return orjson.dumps(obj).decode()


def encode_msg(seq: int | None, msg_id: str, data_json: bytes, *, enc: str | None = None) -> str:
    """A `msg` frame around already-encoded JSON `data_json`, spliced in without re-parsing."""
    id_json = orjson.dumps(msg_id).decode()
    enc_json = "" if enc is None else ',"enc":' + orjson.dumps(enc).decode()
    if seq is None:
        return f'{{"type":"msg","id":{id_json}{enc_json},"data":{data_json.decode()}}}'
    return f'{{"type":"msg","seq":{seq},"id":{id_json}{enc_json},"data":{data_json.decode()}}}'


def check_ack(seq: int, highest_sent: int) -> None:
    """The ack rule: a client may acknowledge only seqs it was sent. Raises
    `ProtocolError("invalid_ack")` (close 1002) for an ack above `highest_sent`."""
    if seq > highest_sent:
        raise ProtocolError(
            "invalid_ack", f"ack {seq} is above the highest seq sent ({highest_sent})"
        )


def encode_pub(
    channel: str, offset: int, msg_id: str, data_json: bytes, enc: str | None = None
) -> str:
    """A `pub` frame around already-encoded JSON `data_json`: built once per publish and
    written to every subscriber as is."""
    enc_json = "" if enc is None else ',"enc":' + orjson.dumps(enc).decode()
    return (
        f'{{"type":"pub","channel":{orjson.dumps(channel).decode()},"offset":{offset},'
        f'"id":{orjson.dumps(msg_id).decode()}{enc_json},"data":{data_json.decode()}}}'
    )


def encode_data(payload: Any) -> tuple[bytes, str | None]:
    """`(data_json, enc)` for a payload: bytes become base64 text with enc "base64".

    Raises `orjson.JSONEncodeError` (a `TypeError`) for payloads JSON cannot carry.
    """
    if isinstance(payload, bytes | bytearray | memoryview):
        return orjson.dumps(base64.b64encode(payload).decode("ascii")), "base64"
    return orjson.dumps(payload), None


def decode_data(msg: Msg | Publish | Pub) -> Any:
    """The application payload of a `msg` or `publish`: bytes when enc is "base64", else data."""
    if msg.enc is None:
        return msg.data
    try:
        return base64.b64decode(msg.data, validate=True)
    except (ValueError, TypeError):
        raise _invalid("data is not valid base64") from None


# --------------------------------------------------------------------------- decoding


def _invalid(reason: str) -> ProtocolError:
    return ProtocolError("invalid_frame", reason)


def _load(raw: str | bytes, max_size: int) -> dict[str, Any]:
    if not isinstance(raw, str):
        raise ProtocolError(
            "binary_not_supported",
            "tether.v1 frames are JSON text; binary frames are not allowed",
            CloseCode.UNSUPPORTED_DATA,
        )
    n = len(raw)
    if n > max_size or (n * 4 > max_size and len(raw.encode("utf-8", "surrogatepass")) > max_size):
        raise ProtocolError("too_big", f"frame exceeds {max_size} bytes", CloseCode.MESSAGE_TOO_BIG)
    try:
        obj = orjson.loads(raw)
    except ValueError:
        if _has_huge_int(raw):
            raise _invalid(_OUT_OF_RANGE) from None
        raise ProtocolError("invalid_json", "frame is not valid JSON") from None
    if has_out_of_range_int(raw):
        raise _invalid(_OUT_OF_RANGE)  # parsed, but such a number came out as a float
    if type(obj) is not dict:
        raise ProtocolError("invalid_json", "frame is not a JSON object")
    return obj


class _HugeInt(Exception):
    pass


def _refuse_huge(text: str) -> int:
    # Checked on the digits, before int(): a 400-digit number must not cost a conversion.
    if len(text.lstrip("-")) > 20:
        raise _HugeInt
    value = int(text)
    if not _INT64_MIN <= value <= _UINT64_MAX:
        raise _HugeInt
    return value


_OUT_OF_RANGE: Final = "a number is out of range (integers must fit in 64 bits)"


def has_out_of_range_int(raw: str | bytes) -> bool:
    """Whether valid JSON text holds an integer beyond 64 bits (which orjson returns as a
    float, its value rounded). Cheap unless the text has a run of 19 digits somewhere
    (in a string too): then its integer literals are scanned, linearly."""
    data = raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogatepass")
    if _NINETEEN_DIGITS not in data.translate(_DIGITS_AS_ZERO):
        return False
    text = raw if isinstance(raw, str) else raw.decode("utf-8", "surrogatepass")
    for found in _STRING_OR_INTEGER.finditer(text):
        literal = found.group(1)
        if literal is not None and not _INT64_MIN <= int(literal) <= _UINT64_MAX:
            return True
    return False


def _has_huge_int(raw: str) -> bool:
    """Whether text that orjson refused is valid JSON apart from an integer beyond 64
    bits (older orjson refuses those). Only runs on the error path (the connection is
    closing anyway), with the frame already bounded by `max_size`.
    """
    try:
        json.loads(raw, parse_int=_refuse_huge, parse_constant=_refuse_constant)
    except _HugeInt:
        return True
    except RecursionError:  # nested deeper than `json` goes (orjson allows 1024 levels)
        return has_out_of_range_int(raw)
    except ValueError:  # malformed
        return False
    return False


def _refuse_constant(text: str) -> Any:
    raise ValueError(f"{text} is not JSON")


def _int(obj: dict[str, Any], key: str, low: int, default: int | None = None) -> int:
    value = obj.get(key)
    if value is None and default is not None:
        return default
    if type(value) is not int or not low <= value <= MAX_SEQ:
        raise _invalid(f"{key} must be an integer in {low}..{MAX_SEQ}")
    return value


def _bool(obj: dict[str, Any], key: str, default: bool | None = None) -> bool:
    value = obj.get(key)
    if value is None and default is not None:
        return default
    if type(value) is not bool:
        raise _invalid(f"{key} must be a boolean")
    return value


def _str(obj: dict[str, Any], key: str) -> str:
    value = obj.get(key)
    if type(value) is not str:
        raise _invalid(f"{key} must be a string")
    return value


def _opt_str(obj: dict[str, Any], key: str) -> str | None:
    value = obj.get(key)
    if value is not None and type(value) is not str:
        raise _invalid(f"{key} must be a string or absent")
    return value


def _data(obj: dict[str, Any]) -> tuple[Any, str | None]:
    if "data" not in obj:
        raise _invalid("data is required")
    data = obj["data"]
    enc = obj.get("enc")
    if enc not in _ENCODINGS:
        raise _invalid('enc must be "base64" or absent')
    if enc is not None and type(data) is not str:
        raise _invalid("data must be a string when enc is set")
    return data, enc


def _lost_ranges(obj: dict[str, Any]) -> tuple[tuple[int, int], ...]:
    value = obj.get("lost_ranges")
    if value is None:
        return ()
    if type(value) is not list:
        raise _invalid("lost_ranges must be a list of [first, last] pairs")
    ranges: list[tuple[int, int]] = []
    previous = 0
    for item in value:
        if type(item) is not list or len(item) != 2:
            raise _invalid("lost_ranges must be a list of [first, last] pairs")
        first, last = item
        if type(first) is not int or type(last) is not int or not 1 <= first <= last <= MAX_SEQ:
            raise _invalid(f"lost range bounds must satisfy 1 <= first <= last <= {MAX_SEQ}")
        if first <= previous:
            raise _invalid("lost_ranges must be ascending and must not overlap")
        previous = last
        ranges.append((first, last))
    return tuple(ranges)


def _hello(obj: dict[str, Any]) -> Hello:
    client_id = _str(obj, "client_id")
    if not valid_client_id(client_id):
        raise ProtocolError(
            "invalid_client_id",
            f"client_id must be 1..{MAX_CLIENT_ID_LENGTH} characters of [A-Za-z0-9._:@-]",
            CloseCode.POLICY_VIOLATION,
        )
    token = _opt_str(obj, "token")
    if token is not None and len(token) > MAX_TOKEN_LENGTH:
        raise _invalid(f"token must be at most {MAX_TOKEN_LENGTH} characters")
    epoch = _opt_str(obj, "epoch")
    if epoch is not None and len(epoch) > MAX_EPOCH_LENGTH:
        raise _invalid(f"epoch must be at most {MAX_EPOCH_LENGTH} characters")
    last_seq = _int(obj, "last_seq", 0, 0)
    if last_seq > MAX_RESUME_SEQ:
        raise _invalid(
            f"last_seq must be at most {MAX_RESUME_SEQ}: a stream resumed beyond it "
            "could not be continued"
        )
    return Hello(client_id, last_seq, token, epoch)


def _auth(obj: dict[str, Any]) -> Auth:
    token = _str(obj, "token")
    if not token or len(token) > MAX_TOKEN_LENGTH:
        raise _invalid(f"token must be 1..{MAX_TOKEN_LENGTH} characters")
    return Auth(token)


def _publish(obj: dict[str, Any]) -> Publish:
    data, enc = _data(obj)
    return Publish(data, _opt_str(obj, "id"), enc)


def _welcome(obj: dict[str, Any]) -> Welcome:
    next_seq = _int(obj, "next_seq", 1)
    acked = _int(obj, "acked", 0, 0)
    if acked >= next_seq:
        raise _invalid("acked must be below next_seq")
    ranges = _lost_ranges(obj)
    if ranges and (ranges[0][0] <= acked or ranges[-1][1] >= next_seq):
        raise _invalid("lost_ranges must lie between acked and next_seq")
    lost = _int(obj, "lost", 0, 0)
    if lost < sum(last - first + 1 for first, last in ranges):
        raise _invalid("lost must be at least the number of seqs in lost_ranges")
    return Welcome(
        _str(obj, "session"),
        _bool(obj, "resumed"),
        next_seq,
        lost,
        ranges,
        _bool(obj, "reset", False),
        acked,
        _opt_str(obj, "epoch"),
    )


def _msg(obj: dict[str, Any]) -> Msg:
    data, enc = _data(obj)
    seq = obj.get("seq")
    if seq is not None and (type(seq) is not int or not 1 <= seq <= MAX_SEQ):
        raise _invalid(f"seq must be an integer in 1..{MAX_SEQ} or absent")
    return Msg(_str(obj, "id"), data, seq, enc)


def _error(obj: dict[str, Any]) -> Error:
    return Error(_str(obj, "code"), _str(obj, "reason"))


def _channel(obj: dict[str, Any]) -> str:
    channel = obj.get("channel")
    if type(channel) is not str or CHANNEL_PATTERN.fullmatch(channel) is None:
        raise _invalid(f"channel must be 1..{MAX_CHANNEL_LENGTH} characters of [A-Za-z0-9._:@-]")
    return channel


def _epoch(obj: dict[str, Any]) -> str:
    epoch = _str(obj, "epoch")
    if len(epoch) > MAX_EPOCH_LENGTH:
        raise _invalid(f"epoch must be at most {MAX_EPOCH_LENGTH} characters")
    return epoch


def _subscribe(obj: dict[str, Any]) -> Subscribe:
    channel = _channel(obj)
    since = None
    raw = obj.get("since")
    if raw is not None:
        if type(raw) is not dict:
            raise _invalid("since must be an object {epoch, offset} or absent")
        since = Since(_epoch(raw), _int(raw, "offset", 0))
    return Subscribe(channel, since, _bool(obj, "presence", False))


def _subscribed(obj: dict[str, Any]) -> Subscribed:
    offset = _int(obj, "offset", 0)
    after = _int(obj, "after", 0, 0)
    if after > offset:
        raise _invalid("after must not exceed offset")
    return Subscribed(
        _channel(obj),
        _epoch(obj),
        offset,
        _bool(obj, "recovered"),
        _int(obj, "lost", 0, 0),
        after,
        _bool(obj, "reset", False),
    )


def _unsubscribed(obj: dict[str, Any]) -> Unsubscribed:
    reason = _str(obj, "reason")
    if len(reason) > MAX_REASON_LENGTH:
        raise _invalid(f"reason must be at most {MAX_REASON_LENGTH} characters")
    return Unsubscribed(_channel(obj), reason, _opt_str(obj, "code"))


def _pub(obj: dict[str, Any]) -> Pub:
    data, enc = _data(obj)
    return Pub(_channel(obj), _int(obj, "offset", 1), _str(obj, "id"), data, enc)


def _member(obj: dict[str, Any]) -> str:
    client_id = _str(obj, "client_id")
    if not valid_client_id(client_id):
        raise _invalid("client_id must be 1..128 characters of [A-Za-z0-9._:@-]")
    return client_id


_SERVER_TYPES: Final = frozenset(
    {"welcome", "msg", "error", "subscribed", "unsubscribed", "pub", "join", "leave"}
)
_CLIENT_TYPES: Final = frozenset({"hello", "ack", "publish", "auth", "subscribe", "unsubscribe"})


def _wrong_type(
    frame_type: object, expected: frozenset[str], other: frozenset[str]
) -> ProtocolError:
    if type(frame_type) is str and frame_type in other:
        return ProtocolError("unexpected_frame", f"{frame_type!r} frames go the other way")
    return ProtocolError("unknown_type", f"type must be one of {sorted(expected)}")


# The ack frame exactly as the reference clients write it (Python and JavaScript), the
# frame a busy connection receives most: one regex match instead of a JSON parse, a dict
# and its checks. Only text the full parser would decode to the same Ack matches: ASCII
# digits, no leading zero (not JSON), at most 16 of them (MAX_SEQ is checked after).
_ACK_RE: Final = re.compile(r'\{"type":"ack","seq":(0|[1-9][0-9]{0,15})\}')


def ack_seq_of(raw: object) -> int | None:
    """The seq of a canonical ack frame (`{"type":"ack","seq":N}`, compact, nothing else),
    or None for any other text — which may still be a valid ack (spaces, other member
    order, extra members) and must then go through `decode_client_frame`."""
    if type(raw) is not str:
        return None
    match = _ACK_RE.fullmatch(raw)
    if match is None:
        return None
    seq = int(match[1])
    return seq if seq <= MAX_SEQ else None


def decode_client_frame(
    raw: str | bytes, *, max_size: int = DEFAULT_MAX_MESSAGE_SIZE
) -> ClientFrame:
    """Parse and validate a frame a client sent; raises only `ProtocolError`."""
    fast = ack_seq_of(raw)
    if fast is not None and len(raw) <= max_size:
        return Ack(fast)
    obj = _load(raw, max_size)
    frame_type = obj.get("type")
    if frame_type == "ack":
        seq = obj.get("seq")
        if type(seq) is not int or not 0 <= seq <= MAX_SEQ:
            raise _invalid(f"seq must be an integer in 0..{MAX_SEQ}")
        return Ack(seq)
    if frame_type == "publish":
        return _publish(obj)
    if frame_type == "hello":
        return _hello(obj)
    if frame_type == "auth":
        return _auth(obj)
    if frame_type == "subscribe":
        return _subscribe(obj)
    if frame_type == "unsubscribe":
        return Unsubscribe(_channel(obj))
    raise _wrong_type(frame_type, _CLIENT_TYPES, _SERVER_TYPES)


def decode_server_frame(
    raw: str | bytes, *, max_size: int = DEFAULT_MAX_MESSAGE_SIZE
) -> ServerFrame:
    """Parse and validate a frame a server sent; raises only `ProtocolError`."""
    obj = _load(raw, max_size)
    frame_type = obj.get("type")
    if frame_type == "msg":
        return _msg(obj)
    if frame_type == "welcome":
        return _welcome(obj)
    if frame_type == "error":
        return _error(obj)
    if frame_type == "pub":
        return _pub(obj)
    if frame_type == "subscribed":
        return _subscribed(obj)
    if frame_type == "unsubscribed":
        return _unsubscribed(obj)
    if frame_type == "join":
        return Join(_channel(obj), _member(obj))
    if frame_type == "leave":
        return Leave(_channel(obj), _member(obj))
    raise _wrong_type(frame_type, _SERVER_TYPES, _CLIENT_TYPES)


# --------------------------------------------------------------------------- state machines


class ConnectionState(enum.Enum):
    AWAITING_HELLO = "awaiting_hello"  # server: before hello is received and welcome sent
    AWAITING_WELCOME = "awaiting_welcome"  # client: hello sent, welcome not yet received
    OPEN = "open"
    CLOSED = "closed"


# Module-level aliases: enum attribute lookups are measurably slow on the per-frame path.
_AWAITING_HELLO: Final = ConnectionState.AWAITING_HELLO
_AWAITING_WELCOME: Final = ConnectionState.AWAITING_WELCOME
_OPEN: Final = ConnectionState.OPEN
_CLOSED: Final = ConnectionState.CLOSED


# Frames a client may send once the connection is open, besides `ack`.
_OPEN_CLIENT_FRAMES: Final = frozenset({Publish, Auth, Subscribe, Unsubscribe})


def _internal(reason: str) -> ProtocolError:
    return ProtocolError("internal_error", reason, CloseCode.INTERNAL_ERROR)


def _closed() -> ProtocolError:
    return ProtocolError("closed", "the connection is closed")


class ServerProtocol:
    """One server-side tether.v1 connection: validates what the client sends, in order.

    The hub owns delivery state (seq counters, outbox); this object owns the rules of a
    single connection: hello first, acks only for seqs actually sent, nothing after an
    error. Calling it out of order (msg before welcome, welcome twice) raises
    `ProtocolError("internal_error", ..., 1011)`; after the connection is closed,
    `ProtocolError("closed", ...)`.
    """

    __slots__ = ("acked", "hello", "highest_sent", "max_message_size", "state")

    def __init__(self, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        self.max_message_size = max_message_size
        self.state = _AWAITING_HELLO
        self.hello: Hello | None = None
        self.highest_sent = 0
        self.acked = 0

    def receive(self, raw: str | bytes) -> ClientFrame:
        """Validate one frame from the client. Any `ProtocolError` closes the connection."""
        if self.state is _CLOSED:
            raise _closed()
        try:
            frame = decode_client_frame(raw, max_size=self.max_message_size)
            if self.state is _OPEN:
                if type(frame) is Ack:
                    check_ack(frame.seq, self.highest_sent)
                    if frame.seq > self.acked:
                        self.acked = frame.seq
                    return frame
                if type(frame) in _OPEN_CLIENT_FRAMES:
                    return frame
                raise ProtocolError("unexpected_frame", "hello was already received")
            if self.hello is not None:
                raise ProtocolError("unexpected_frame", "nothing may follow hello before welcome")
            if type(frame) is not Hello:
                raise ProtocolError("hello_required", "the first frame must be hello")
            self.hello = frame
            return frame
        except ProtocolError:
            self.state = _CLOSED
            raise

    def receive_ack(self, raw: str | bytes, highest_sent: int) -> Ack | None:
        """`receive` for the frame a client sends most, on an open connection: a valid
        `ack` (of at most `highest_sent`, which it records), or None for anything else —
        then nothing changed and the frame goes to `receive`, which reports any error."""
        seq = self.receive_ack_seq(raw, highest_sent)
        return None if seq < 0 else Ack(seq)

    def receive_ack_seq(self, raw: str | bytes, highest_sent: int) -> int:
        """`receive_ack` without the `Ack` object: the acknowledged seq, or -1 when the
        frame is not a valid ack on an open connection (nothing changed then).

        The canonical ack text costs one regex match and an `int()`; any other text gets
        the full parse, so an ack a third-party client spells differently still counts."""
        if self.state is not _OPEN:
            return -1
        fast = ack_seq_of(raw)
        if fast is not None and len(raw) <= self.max_message_size:
            seq = fast
        else:
            try:
                frame = decode_client_frame(raw, max_size=self.max_message_size)
            except ProtocolError:
                return -1
            if type(frame) is not Ack:
                return -1
            seq = frame.seq
        if highest_sent > self.highest_sent:
            self.highest_sent = highest_sent
        if seq > self.highest_sent:
            return -1
        if seq > self.acked:
            self.acked = seq
        return seq

    def welcome(self, welcome: Welcome) -> str:
        """Accept the connection: returns the `welcome` text and opens the connection."""
        if self.state is _CLOSED:
            raise _closed()
        if self.state is _OPEN or self.hello is None:
            raise _internal("welcome must answer a hello, once")
        text = encode(welcome)
        try:  # never send a welcome that a conforming client would reject
            decode_server_frame(text, max_size=MAX_SEQ)
        except ProtocolError as exc:
            raise _internal(f"invalid welcome: {exc.reason}") from None
        start = welcome.acked if welcome.reset else max(self.hello.last_seq, welcome.acked)
        self.highest_sent = self.acked = start
        self.state = _OPEN
        return text

    def msg(self, seq: int | None, msg_id: str, data_json: bytes, *, enc: str | None = None) -> str:
        """The text of a `msg` frame, validated; a critical `seq` raises `highest_sent`.

        For a server that keeps delivery state per connection. Tether's hub keeps it per
        client (it outlives connections): it writes frames made by the same `encode_msg`
        and its connection adapter raises `highest_sent` from `Hub.highest_sent`."""
        if self.state is not _OPEN:
            if self.state is _CLOSED:
                raise _closed()
            raise _internal("msg before welcome")
        if seq is not None:
            if type(seq) is not int or not 1 <= seq <= MAX_SEQ:
                raise _internal(f"seq must be an integer in 1..{MAX_SEQ}")
            if seq > self.highest_sent:
                self.highest_sent = seq
        if enc is not None and enc != "base64":
            raise _internal('enc must be "base64" or None')
        return encode_msg(seq, msg_id, data_json, enc=enc)

    def fail(self, error: ProtocolError) -> str:
        """The `error` frame text for `error`; the connection is closed from now on."""
        self.state = _CLOSED
        return error.to_frame()

    def close(self) -> None:
        """Mark the connection closed (the socket went away or was closed normally)."""
        self.state = _CLOSED


# --------------------------------------------------------------------------- client side


@dataclass(frozen=True, slots=True)
class Received:
    """A message for the application (bytes when it was sent as bytes)."""

    seq: int | None
    id: str
    data: Any


@dataclass(frozen=True, slots=True)
class Lost:
    """Critical messages that will never arrive: `count` of them, the seqs when known.

    `reset` means the server lost its delivery state for this client, so an unknown
    number of messages may be gone; `count` then counts only what the server knows of.
    """

    count: int
    ranges: tuple[tuple[int, int], ...]
    reset: bool


@dataclass(frozen=True, slots=True)
class Welcomed:
    welcome: Welcome


@dataclass(frozen=True, slots=True)
class ServerRejected:
    code: str
    reason: str


ClientEvent: TypeAlias = Received | Lost | Welcomed | ServerRejected | ChannelFrame

_Ranges: TypeAlias = list[tuple[int, int]]


def _subtract(ranges: _Ranges, minus: _Ranges) -> _Ranges:
    """`ranges` without `minus`; both ascending and disjoint, so this is one linear merge."""
    out: _Ranges = []
    j = 0
    for first, last in ranges:
        while j < len(minus) and minus[j][1] < first:
            j += 1
        k = j
        while first <= last:
            if k == len(minus) or minus[k][0] > last:
                out.append((first, last))
                break
            m_first, m_last = minus[k]
            if m_first > first:
                out.append((first, m_first - 1))
            first = m_last + 1
            k += 1
    return out


def _size(ranges: _Ranges | tuple[tuple[int, int], ...]) -> int:
    return sum(last - first + 1 for first, last in ranges)


# How the servers write a `msg` frame (`encode_msg`): the client's fast path looks for it.
_MSG_PREFIX: Final = '{"type":"msg",'


class ClientProtocol:
    """The client side of tether.v1: exactly-once, in-order delivery of critical messages.

    It survives reconnections: call `hello()` on every new connection and it resumes
    from `last_seq`. Every critical seq is either delivered once, in order, or reported
    as `Lost` — never skipped silently. The caller sends what `hello()`, `ack_due()`
    and `ack_now()` return, and passes the time in, so nothing here reads a clock.
    """

    def __init__(
        self,
        client_id: str,
        *,
        last_seq: int = 0,
        token: str | None = None,
        epoch: str | None = None,
        ack_every: int = 64,
        ack_interval: float = 0.05,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        if not valid_client_id(client_id):
            raise ValueError(
                f"client_id must be 1..{MAX_CLIENT_ID_LENGTH} characters of [A-Za-z0-9._:@-]"
            )
        if type(last_seq) is not int or not 0 <= last_seq <= MAX_SEQ:
            raise ValueError(f"last_seq must be an integer in 0..{MAX_SEQ}")
        if token is not None and len(token) > MAX_TOKEN_LENGTH:
            raise ValueError(f"token must be at most {MAX_TOKEN_LENGTH} characters")
        if ack_every < 1 or ack_interval < 0:
            raise ValueError("ack_every must be >= 1 and ack_interval >= 0")
        self.client_id = client_id
        self.token = token
        self.ack_every = ack_every
        self.ack_interval = ack_interval
        self.max_message_size = max_message_size
        self.state = _CLOSED
        self.welcome: Welcome | None = None
        self.last_seq = last_seq
        # The stream identity last_seq belongs to; persist it with last_seq to resume.
        self.epoch = epoch
        self.duplicates = 0
        self._unacked = 0  # critical msgs (duplicates too) since the last ack
        self._unacked_since = 0.0
        # Seqs above last_seq already reported to the app as lost (so never reported
        # twice), and those this connection's welcome announced (skipped when reached).
        self._reported: _Ranges = []
        self._skip: _Ranges = []
        # The highest seq this connection may ack: the server refuses acks above what it
        # wrote, and last_seq may already cover announced losses it never wrote.
        self._ceiling = last_seq

    def hello(self) -> str:
        """The `hello` text that starts a (re)connection; it carries, and so acks, `last_seq`."""
        self.state = _AWAITING_WELCOME
        self.welcome = None
        self._unacked = 0
        self._skip = []
        self._ceiling = self.last_seq
        return encode(Hello(self.client_id, self.last_seq, self.token, self.epoch))

    def receive(self, raw: str | bytes, now: float) -> list[ClientEvent]:
        """Events for one frame from the server. Any `ProtocolError` closes the connection."""
        if (
            self.state is _OPEN
            and type(raw) is str
            and raw.startswith(_MSG_PREFIX)
            and len(raw) * 4 <= self.max_message_size
        ):
            # The frame a client receives most: one parse, no `Msg` object. Whatever does
            # not pass every check here takes the full path below, which reports errors.
            try:
                obj = orjson.loads(raw)
            except ValueError:
                obj = None
            if type(obj) is dict and obj.get("type") == "msg" and obj.get("enc") is None:
                msg_id = obj.get("id")
                seq = obj.get("seq")
                if type(msg_id) is str and "data" in obj:
                    if seq is None:
                        return [Received(None, msg_id, obj["data"])]
                    if type(seq) is int and 1 <= seq <= MAX_SEQ:
                        return self._on_msg(seq, msg_id, obj["data"], now)
        if self.state is _CLOSED:
            raise _closed()
        try:
            frame = decode_server_frame(raw, max_size=self.max_message_size)
            if type(frame) is Msg:
                if self.state is not _OPEN:
                    raise ProtocolError("unexpected_frame", "msg before welcome")
                data = decode_data(frame)
                if frame.seq is None:
                    return [Received(None, frame.id, data)]
                return self._on_msg(frame.seq, frame.id, data, now)
            if type(frame) is Welcome:
                if self.state is not _AWAITING_WELCOME:
                    raise ProtocolError("unexpected_frame", "welcome was already received")
                return self._on_welcome(frame)
            if type(frame) is Error:
                self.state = _CLOSED
                return [ServerRejected(frame.code, frame.reason)]
            assert isinstance(frame, Subscribed | Unsubscribed | Pub | Join | Leave)
            if self.state is not _OPEN:
                raise ProtocolError("unexpected_frame", f"{type(frame).__name__} before welcome")
            return [frame]
        except ProtocolError:
            self.state = _CLOSED
            raise

    def _on_welcome(self, welcome: Welcome) -> list[ClientEvent]:
        # A next_seq at or below last_seq means the server's numbering went backwards
        # without it saying so: its new messages would pass for duplicates. Resync.
        reset = welcome.reset or welcome.next_seq <= self.last_seq
        self.epoch = welcome.epoch
        missed: _Ranges = []
        if reset:
            self.last_seq = self._ceiling = welcome.acked
            self._reported = []
        elif welcome.acked > self.last_seq:
            # An earlier connection of this client id acknowledged seqs this one never
            # saw; they will not be re-sent. A fresh client (last_seq 0) just starts
            # after them; one that had a position is told what it missed.
            if self.last_seq:
                missed = _subtract([(self.last_seq + 1, welcome.acked)], self._reported)
            self._advance(welcome.acked)
        last = self.last_seq
        ranges = [(max(a, last + 1), b) for a, b in welcome.lost_ranges if b > last]
        new = _subtract(ranges, self._reported)
        if new:
            self._reported = sorted(self._reported + new)
        count = welcome.lost - (_size(welcome.lost_ranges) - _size(new)) + _size(missed)
        self._skip = ranges
        self._advance(last)
        self.welcome = welcome
        self.state = _OPEN
        events: list[ClientEvent] = [Welcomed(welcome)]
        if count > 0 or reset:
            events.append(Lost(count, tuple(missed + new), reset))
        return events

    def _on_msg(self, seq: int, msg_id: str, data: Any, now: float) -> list[ClientEvent]:
        if seq > self._ceiling:
            self._ceiling = seq
        if not self._unacked:
            self._unacked_since = now
        self._unacked += 1
        last = self.last_seq
        if seq <= last:
            self.duplicates += 1
            return []
        received = Received(seq, msg_id, data)
        if seq == last + 1 and not self._reported:
            self.last_seq = seq
            return [received]
        gap = _subtract([(last + 1, seq - 1)], self._reported) if seq > last + 1 else []
        self._advance(seq)
        if gap:
            return [Lost(_size(gap), tuple(gap), False), received]
        return [received]

    def _advance(self, seq: int) -> None:
        """Move last_seq to `seq`, then over announced losses that now follow it."""
        last = max(self.last_seq, seq)
        skip = self._skip
        while skip and skip[0][0] <= last + 1:
            last = max(last, skip.pop(0)[1])
        self.last_seq = last
        reported = self._reported
        while reported and reported[0][1] <= last:
            reported.pop(0)
        if reported and reported[0][0] <= last:
            reported[0] = (last + 1, reported[0][1])

    @property
    def ack_deadline(self) -> float | None:
        """When `ack_due` will next return an ack, if nothing else arrives; None if none is due."""
        if not self._unacked or self.state is not _OPEN:
            return None
        return self._unacked_since + self.ack_interval

    def ack_due(self, now: float) -> str | None:
        """An `ack` frame when enough deliveries are pending or the oldest waited long enough."""
        if not self._unacked or self.state is not _OPEN:
            return None
        if self._unacked >= self.ack_every or now - self._unacked_since >= self.ack_interval:
            return self._ack()
        return None

    def ack_now(self) -> str | None:
        """An `ack` frame if anything is unacknowledged (flush before closing), else None."""
        if not self._unacked or self.state is not _OPEN:
            return None
        return self._ack()

    def _ack(self) -> str:
        self._unacked = 0
        return f'{{"type":"ack","seq":{min(self.last_seq, self._ceiling)}}}'

    def auth(self, token: str) -> str:
        """The `auth` text that hands the server a fresh token on the open connection.

        The token is also kept for the `hello` of the next connection. Raises ValueError
        for an empty or over-long token, `ProtocolError` when the connection is not open.
        """
        if not isinstance(token, str) or not 0 < len(token) <= MAX_TOKEN_LENGTH:
            raise ValueError(f"token must be 1..{MAX_TOKEN_LENGTH} characters")
        self.token = token
        if self.state is not _OPEN:
            if self.state is _CLOSED:
                raise _closed()
            raise _internal("auth before welcome")
        return encode(Auth(token))

    def subscribe(self, channel: str, since: Since | None = None, *, presence: bool = False) -> str:
        """The text of a `subscribe` frame; raises ValueError for a bad channel name and
        `ProtocolError` when the connection is not open."""
        if not isinstance(channel, str) or CHANNEL_PATTERN.fullmatch(channel) is None:
            raise ValueError(
                f"channel must be 1..{MAX_CHANNEL_LENGTH} characters of [A-Za-z0-9._:@-]"
            )
        self._require_open("subscribe")
        return encode(Subscribe(channel, since, presence))

    def unsubscribe(self, channel: str) -> str:
        """The text of an `unsubscribe` frame."""
        self._require_open("unsubscribe")
        return encode(Unsubscribe(channel))

    def _require_open(self, what: str) -> None:
        if self.state is not _OPEN:
            if self.state is _CLOSED:
                raise _closed()
            raise _internal(f"{what} before welcome")

    def publish(self, data: Any, *, id: str | None = None) -> str:
        """The text of a `publish` frame; bytes are sent base64 with enc "base64"."""
        if self.state is not _OPEN:
            if self.state is _CLOSED:
                raise _closed()
            raise _internal("publish before welcome")
        data_json, enc = encode_data(data)
        id_json = "" if id is None else ',"id":' + orjson.dumps(id).decode()
        enc_json = "" if enc is None else ',"enc":"base64"'
        return f'{{"type":"publish"{id_json}{enc_json},"data":{data_json.decode()}}}'

    def close(self) -> None:
        """The connection ended; state is kept for the next `hello()`."""
        self.state = _CLOSED
