"""The channel stream model, the channel frames and the client cursor, without sockets."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether import HubConfig, ManualClock, protocol
from tether.channels import Channels, MemoryChannelStore
from tether.channels.cursor import RESUBSCRIBE, ChannelCursor, ChannelLost, Publication
from tether.channels.model import ChannelStream, Position

WALL = 1_700_000_000.0


def publish(stream: ChannelStream, message_id: str, now: float = 0.0) -> int:
    message, duplicate = stream.append(message_id, message_id, b'"x"', None, now, WALL)
    assert not duplicate
    return message.offset


def test_a_fresh_subscription_starts_at_the_current_position() -> None:
    stream = ChannelStream(10, 60)
    for n in range(3):
        publish(stream, f"m{n}")
    answer = stream.recover(None, 0)
    assert (answer.offset, answer.after, answer.recovered, answer.messages) == (3, 3, True, ())


def test_recovery_replays_what_is_held_or_counts_what_is_gone() -> None:
    stream = ChannelStream(5, 60)
    for n in range(12):
        publish(stream, f"m{n}")  # offsets 1..12; 8..12 held
    within = stream.recover(Position(stream.epoch, 9), 0)
    assert within.recovered and within.lost == 0 and within.after == 9
    assert [m.offset for m in within.messages] == [10, 11, 12]
    edge = stream.recover(Position(stream.epoch, 7), 0)
    assert edge.recovered and [m.offset for m in edge.messages] == [8, 9, 10, 11, 12]
    gone = stream.recover(Position(stream.epoch, 2), 0)
    assert (gone.recovered, gone.lost, gone.after, gone.reset) == (False, 5, 7, False)
    assert [m.offset for m in gone.messages] == [8, 9, 10, 11, 12]
    other = stream.recover(Position("elsewhere", 2), 0)
    assert (other.recovered, other.reset, other.lost, other.after) == (False, True, 7, 7)
    ahead = stream.recover(Position(stream.epoch, 99), 0)
    assert ahead.reset and not ahead.recovered


def test_ttl_expiry_and_the_dedup_window_follow_the_history() -> None:
    stream = ChannelStream(3, 60)
    publish(stream, "a", now=0)
    _, duplicate = stream.append("a", "a", b'"a"', None, 10, WALL)
    assert duplicate and stream.top == 1
    assert [m.offset for m in stream.held(59)] == [1]
    assert stream.held(60) == []  # expired at exactly the TTL
    message, duplicate = stream.append("a", "a", b'"a"', None, 61, WALL)
    assert not duplicate and message.offset == 2  # the id left the window with its message
    answer = stream.recover(Position(stream.epoch, 0), 61)
    assert (answer.recovered, answer.lost) == (False, 1)


@given(
    size=st.integers(1, 20),
    published=st.integers(0, 60),
    data=st.data(),
)
def test_every_offset_is_either_replayed_or_counted_lost(
    size: int, published: int, data: st.DataObject
) -> None:
    stream = ChannelStream(size, 1e9)
    for n in range(published):
        publish(stream, f"m{n}")
    seen = data.draw(st.integers(0, published))
    answer = stream.recover(Position(stream.epoch, seen), 0)
    replayed = [m.offset for m in answer.messages]
    assert replayed == list(range(answer.after + 1, published + 1))
    assert answer.after - seen == answer.lost
    assert answer.recovered == (answer.lost == 0)


def test_channel_frames_round_trip() -> None:
    frames: list[protocol.Frame] = [
        protocol.Subscribe("news", protocol.Since("ab12", 7), presence=True),
        protocol.Subscribe("news"),
        protocol.Unsubscribe("news"),
    ]
    for frame in frames:
        assert protocol.decode_client_frame(protocol.encode(frame)) == frame
    server: list[protocol.Frame] = [
        protocol.Subscribed("news", "ab12", 9, False, 3, 5, False),
        protocol.Unsubscribed("news", "not allowed", "forbidden"),
        protocol.Unsubscribed("news", "bye"),
        protocol.Pub("news", 4, "m4", {"x": [1, 2]}),
        protocol.Pub("news", 5, "m5", "aGk=", "base64"),
        protocol.Join("news", "alice"),
        protocol.Leave("news", "alice"),
    ]
    for frame in server:
        assert protocol.decode_server_frame(protocol.encode(frame)) == frame


@pytest.mark.parametrize(
    "raw",
    [
        '{"type":"subscribe"}',
        '{"type":"subscribe","channel":""}',
        '{"type":"subscribe","channel":"a/b"}',
        '{"type":"subscribe","channel":"' + "x" * 129 + '"}',
        '{"type":"subscribe","channel":"n","since":7}',
        '{"type":"subscribe","channel":"n","since":{"epoch":"e","offset":-1}}',
        '{"type":"subscribe","channel":"n","since":{"offset":1}}',
        '{"type":"subscribe","channel":"n","presence":"yes"}',
        '{"type":"unsubscribe","channel":5}',
    ],
)
def test_bad_channel_frames_are_invalid(raw: str) -> None:
    with pytest.raises(protocol.ProtocolError) as error:
        protocol.decode_client_frame(raw)
    assert error.value.code == "invalid_frame"


def test_server_frames_are_validated() -> None:
    with pytest.raises(protocol.ProtocolError, match="after must not exceed offset"):
        protocol.decode_server_frame(
            '{"type":"subscribed","channel":"n","epoch":"e","offset":1,"recovered":true,"after":2}'
        )
    with pytest.raises(protocol.ProtocolError):
        protocol.decode_server_frame('{"type":"pub","channel":"n","offset":0,"id":"x","data":1}')
    with pytest.raises(protocol.ProtocolError, match="go the other way"):
        protocol.decode_client_frame('{"type":"pub","channel":"n","offset":1,"id":"x","data":1}')


def test_channel_frames_only_after_welcome() -> None:
    server = protocol.ServerProtocol()
    with pytest.raises(protocol.ProtocolError) as error:
        server.receive('{"type":"subscribe","channel":"n"}')
    assert error.value.code == "hello_required"
    client = protocol.ClientProtocol("alice")
    client.hello()
    with pytest.raises(protocol.ProtocolError) as error:
        client.receive('{"type":"join","channel":"n","client_id":"bob"}', 0.0)
    assert error.value.code == "unexpected_frame"
    with pytest.raises(protocol.ProtocolError):
        client.subscribe("n")


def pub(offset: int) -> protocol.Pub:
    return protocol.Pub("n", offset, f"m{offset}", offset)


def test_cursor_delivers_each_offset_once_and_asks_to_resubscribe_on_a_hole() -> None:
    cursor = ChannelCursor("n")
    assert cursor.since() is None
    assert cursor.on_pub(pub(1)) is None  # nothing before `subscribed`
    assert cursor.on_subscribed(protocol.Subscribed("n", "e", 4, True, 0, 4)) is None
    assert cursor.on_pub(pub(5)) == Publication("n", 5, "m5", 5)
    assert cursor.on_pub(pub(5)) is None and cursor.duplicates == 1
    assert cursor.on_pub(pub(7)) is RESUBSCRIBE
    assert cursor.since() == protocol.Since("e", 5)
    cursor.subscribing()
    lost = cursor.on_subscribed(protocol.Subscribed("n", "e", 30, False, 15, 20))
    assert lost == ChannelLost("n", 15, 5, False)
    assert cursor.on_pub(pub(21)) == Publication("n", 21, "m21", 21)
    reset = cursor.on_subscribed(protocol.Subscribed("n", "f", 3, False, 0, 0, True))
    assert reset == ChannelLost("n", 0, 0, True)


class Collecting:
    """A transport that takes every frame at once and keeps the `pub` offsets."""

    def __init__(self) -> None:
        self.offsets: list[int] = []
        self.frames: list[dict[str, object]] = []

    def try_send(self, data: str | bytes) -> bool:
        frame = orjson.loads(data)
        self.frames.append(frame)
        if frame["type"] == "pub":
            self.offsets.append(int(frame["offset"]))
        return True

    async def send(self, data: str | bytes) -> None:
        self.try_send(data)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        return None


class SharedMemoryStore(MemoryChannelStore):
    """The memory store posing as a shared one: other nodes' publishes are appended here
    and reported (or not) through the service's remote-publish path."""

    shared = True


async def _settle(service: Channels) -> None:
    while service._tasks:
        await asyncio.gather(*list(service._tasks))


@settings(max_examples=60, deadline=None)
@given(data=st.data(), count=st.integers(1, 40))
def test_a_node_hands_out_every_offset_once_in_order_whatever_it_is_told(
    data: st.DataObject, count: int
) -> None:
    """Reports of other nodes' publishes arrive shuffled, repeated or never: the node hands
    its subscriber 1..count once, in order (holes read back from the store; a listener
    reconnect re-reads the tail)."""
    order = data.draw(st.permutations(range(1, count + 1)))
    missed = data.draw(st.sets(st.integers(1, count)))
    repeated = data.draw(st.lists(st.integers(1, count), max_size=5))

    async def scenario() -> tuple[list[int], list[int]]:
        clock = ManualClock()
        config = HubConfig(channel_history_size=100)
        store = SharedMemoryStore(100, 300, clock)
        transport = Collecting()
        service = Channels(config, clock, store=store)
        await service.start()
        await service.subscribe("alice", transport, "c")  # type: ignore[arg-type]
        appended = [
            store.append_now("c", f"m{n}", n, str(n).encode(), None) for n in range(1, count + 1)
        ]
        for offset in [*order, *repeated]:
            if offset not in missed:
                a = appended[offset - 1]
                await service._on_remote_publish("c", a.epoch, a.message)
        await _settle(service)
        before = list(transport.offsets)
        await service._resync()  # the listener came back: re-read what was never reported
        await _settle(service)
        return before, transport.offsets

    before, after = asyncio.run(scenario())
    reported = [n for n in [*order, *repeated] if n not in missed]
    # Any reported offset brings every earlier one (holes are read from the store) ...
    assert before == list(range(1, max(reported, default=0) + 1))
    # ... and the re-read after a reconnect brings the tail nobody reported.
    assert after == list(range(1, count + 1))


async def test_the_memory_store_sweeps_on_recover_and_never_reuses_a_forgotten_epoch() -> None:
    """Subscribes alone (no publish) run the sweep too; a forgotten stream's next epoch
    is a new one, and a channel subscribed but never published keeps the epoch it gave."""
    from tether.channels.model import POSITION_KEPT

    clock = ManualClock()
    store = MemoryChannelStore(10, 60, clock)
    old = store.append_now("old", "m1", 1, b"1", None)
    store.append_now("older", "m1", 1, b"1", None)
    quiet = await store.recover("quiet", None)  # subscribed, never published
    await store.presence_add("quiet", "alice", {})
    assert [c.name for c in await store.channels()] == ["old", "older", "quiet"]
    clock.advance(POSITION_KEPT + 120)
    await store.recover("other", None)  # no publish: the sweep runs here
    assert [c.name for c in await store.channels()] == ["quiet"]
    back = await store.recover("old", Position(old.epoch, 1))
    assert back.epoch != old.epoch and back.reset and back.offset == 0
    assert store.append_now("old", "m2", 2, b"2", None).epoch == back.epoch != old.epoch
    assert store.append_now("quiet", "q", 3, b"3", None).epoch == quiet.epoch
