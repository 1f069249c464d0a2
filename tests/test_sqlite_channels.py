"""Channels on the SQLite backend: epochs, offsets and history survive restarts (in process and a SIGKILLed `tether serve`)."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from channel_support import ws_server
from test_sqlite_backend import Server, server  # noqa: F401  (the fixture)
from tether import Hub, HubConfig
from tether.backends.sqlite import SqliteBackend
from tether.channels import Position, PublishStatus
from tether.channels.sqlite_store import SqliteChannelStore
from tether.client import Client
from tether.clock import ManualClock
from tether.subscription import ChannelLost, Publication, Subscription

Factory = Callable[..., Hub]


@pytest_asyncio.fixture
async def node(tmp_path: Path) -> AsyncIterator[Factory]:
    """`node(clock=..., **config)`: a Hub on tmp_path/tether.db (the same file each call:
    a restart is `await old.shutdown()` then `node()` again)."""
    hubs: list[Hub] = []

    def factory(clock: Any = None, **values: Any) -> Hub:
        values.setdefault("sqlite_path", str(tmp_path / "tether.db"))
        hub = Hub(HubConfig(backend="sqlite", **values), clock=clock)
        hubs.append(hub)
        return hub

    yield factory
    for hub in hubs:
        await hub.shutdown(timeout=1.0)


def rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


async def collect(sub: Subscription, into: list[Publication], count: int) -> None:
    async for pub in sub:
        into.append(pub)
        if len(into) == count:
            return


async def test_the_channel_store_is_the_files_and_offsets_continue_after_a_restart(
    node: Factory, tmp_path: Path
) -> None:
    first = node()
    async with first:
        assert isinstance(first.channels.store, SqliteChannelStore)
        results = [await first.publish("news", n, message_id=f"m{n}") for n in range(1, 6)]
        assert [r.offset for r in results] == [1, 2, 3, 4, 5]
        epoch = results[0].epoch
    second = node()
    async with second:
        result = await second.publish("news", 6)
        assert (result.status, result.epoch, result.offset) == (PublishStatus.PUBLISHED, epoch, 6)
        # The ids held in the history still dedup after the restart.
        again = await second.publish("news", "ignored", message_id="m3")
        assert (again.status, again.offset) == (PublishStatus.DUPLICATE, 3)
        history = await second.history("news", since=Position(epoch, 2))
        assert [(m.offset, m.data) for m in history] == [(3, 3), (4, 4), (5, 5), (6, 6)]
        infos = await second.channels.store.channels()
        assert [(i.name, i.epoch, i.offset, i.depth) for i in infos] == [("news", epoch, 6, 6)]


async def test_a_resubscribe_after_a_restart_recovers_exactly_or_counts_the_loss(
    node: Factory,
) -> None:
    first = node(channel_history_size=10)
    async with first:
        for n in range(1, 4):
            await first.publish("news", n)
        epoch = (await first.channels.store.recover("news", None)).epoch
    second = node(channel_history_size=10)
    async with second:
        store = second.channels
        await store.start()
        recovery = await store.store.recover("news", Position(epoch, 1))
        assert (recovery.recovered, recovery.lost, recovery.offset) == (True, 0, 3)
        assert [m.data for m in recovery.messages] == [2, 3]
        for n in range(4, 21):  # the history keeps 11..20
            await second.publish("news", n)
        gone = await store.store.recover("news", Position(epoch, 3))
        assert (gone.recovered, gone.lost, gone.after) == (False, 7, 10)
        assert [m.offset for m in gone.messages] == list(range(11, 21))
        stranger = await store.store.recover("news", Position("not-the-epoch", 3))
        assert stranger.reset and not stranger.recovered


async def test_a_subscriber_with_since_gets_the_rest_through_a_real_socket(
    node: Factory,
) -> None:
    first = node(channel_history_size=100)
    async with first:
        for n in range(1, 11):
            await first.publish("ticks", n)
        epoch = (await first.channels.store.recover("ticks", None)).epoch
    second = node(channel_history_size=100)
    async with second, ws_server(second) as srv:
        client = Client(srv.url, client_id="sam", backoff_base=0.01, backoff_max=0.05)
        async with client:
            sub = await client.subscribe("ticks", since=(epoch, 4))
            got: list[Publication] = []
            await asyncio.wait_for(collect(sub, got, 6), 10)
            assert [(p.offset, p.data) for p in got] == [(n, n) for n in range(5, 11)]
            answer = sub.last_subscribed
            assert answer is not None and answer.recovered and answer.lost == 0
            await second.publish("ticks", 11)
            await asyncio.wait_for(collect(sub, got, 7), 10)
            assert got[-1].offset == 11 and sub.lost == 0 and sub.duplicates == 0


async def test_the_first_subscribers_of_a_fresh_hub_wait_for_the_file_to_open(
    node: Factory,
) -> None:
    """Subscribes arriving together before any other channel use: the store opens the
    file once (one writer) and every one of them is answered `subscribed`."""
    hub = node()
    async with hub, ws_server(hub) as srv:
        clients = [
            Client(srv.url, client_id=f"f{i}", backoff_base=0.01, backoff_max=0.05)
            for i in range(8)
        ]
        await asyncio.gather(*(client.connect() for client in clients))
        try:
            subs = await asyncio.gather(*(client.subscribe("first") for client in clients))
            assert all(sub.last_subscribed is not None for sub in subs)
            assert (await hub.publish("first", "hello")).delivered == 8
        finally:
            await asyncio.gather(*(client.close() for client in clients))


def hold_the_writer(
    hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> tuple[asyncio.Event, threading.Event]:
    """Make the writer stop at the next channel operation it receives: `received` is set
    once it holds it, and it goes on (and commits) when `proceed` is set."""
    backend = hub.backend
    assert isinstance(backend, SqliteBackend)
    store = backend.store
    loop = asyncio.get_running_loop()
    received, proceed = asyncio.Event(), threading.Event()
    transact = store.transact

    def held(fn: Callable[[sqlite3.Connection], Any]) -> Any:
        def run(conn: sqlite3.Connection) -> Any:
            loop.call_soon_threadsafe(received.set)
            proceed.wait(30)  # a hang guard only: the test sets it
            return fn(conn)

        monkeypatch.setattr(store, "transact", transact)  # only the next operation
        return transact(run)

    monkeypatch.setattr(store, "transact", held)
    return received, proceed


async def test_a_cancelled_publish_does_not_cancel_the_publishes_sharing_its_commit(
    node: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = node()
    async with hub, ws_server(hub) as srv:
        await hub.publish("mixed", 0)
        client = Client(srv.url, client_id="sue", backoff_base=0.01, backoff_max=0.05)
        async with client:
            sub = await client.subscribe("mixed")
            received, proceed = hold_the_writer(hub, monkeypatch)
            publishes = [asyncio.ensure_future(hub.publish("mixed", n)) for n in range(1, 4)]
            await received.wait()  # the writer holds the shared commit of all three
            publishes[2].cancel()  # the last: no later publish hands it out either
            proceed.set()
            results = await asyncio.gather(*publishes, return_exceptions=True)
            assert isinstance(results[2], asyncio.CancelledError)
            assert [r.status for r in results[:2]] == [PublishStatus.PUBLISHED] * 2
            # The cancelled one was appended all the same: offsets 2..4 are all held,
            # and this node's subscriber gets it without waiting for another publish.
            assert [m.offset for m in await hub.history("mixed", since=1)] == [2, 3, 4]
            got: list[Publication] = []
            await asyncio.wait_for(collect(sub, got, 3), 10)
            assert [(p.offset, p.data) for p in got] == [(2, 1), (3, 2), (4, 3)]


async def test_one_store_write_per_publish_whatever_the_subscribers(node: Factory) -> None:
    hub = node()
    async with hub, ws_server(hub) as srv:
        clients = [
            Client(srv.url, client_id=f"c{i}", backoff_base=0.01, backoff_max=0.05)
            for i in range(20)
        ]
        subs = []
        for client in clients:
            await client.connect()
            subs.append(await client.subscribe("wide"))
        try:
            backend = hub.backend
            assert isinstance(backend, SqliteBackend)
            before = backend.store.operations
            for n in range(10):
                result = await hub.publish("wide", n)
                assert result.delivered == 20
            assert backend.store.operations - before == 10
            for sub in subs:
                got: list[Publication] = []
                await asyncio.wait_for(collect(sub, got, 10), 10)
                assert [p.data for p in got] == list(range(10))
        finally:
            for client in clients:
                await client.close()


async def test_history_is_bounded_by_size_and_ttl_and_trimmed_in_batches(
    node: Factory, tmp_path: Path
) -> None:
    clock = ManualClock()
    hub = node(clock=clock, channel_history_size=16, channel_history_ttl=60)
    async with hub:
        store = hub.channels.store
        assert isinstance(store, SqliteChannelStore) and store.trim_every == 2
        for n in range(1, 101):
            await hub.publish("busy", n)
        held = await hub.history("busy", limit=1000)
        assert [m.offset for m in held] == list(range(85, 101))  # exactly the size
        count = rows(tmp_path / "tether.db", "SELECT count(*) FROM channel_messages")[0][0]
        assert 16 <= count <= 16 + store.trim_every  # the rest deleted in batches
        clock.advance(61)
        assert await hub.history("busy") == []  # past the TTL: held no more
        recovery = await store.recover("busy", Position((await store.read("busy", 0, 1))[0], 90))
        assert (recovery.recovered, recovery.lost) == (False, 10)
        await hub.publish("other", 1)  # a publish after a TTL sweeps idle channels' rows
        left = rows(tmp_path / "tether.db", "SELECT count(*) FROM channel_messages")[0][0]
        assert left == 1


async def test_a_lost_message_count_is_exact_after_a_restart_past_the_history(
    node: Factory,
) -> None:
    clock = ManualClock()
    first = node(clock=clock, channel_history_size=5)
    async with first:
        for n in range(1, 4):
            await first.publish("feed", n)
        epoch = (await first.channels.store.recover("feed", None)).epoch
    second = node(clock=clock, channel_history_size=5)
    async with second, ws_server(second) as srv:
        for n in range(4, 13):
            await second.publish("feed", n)
        client = Client(srv.url, client_id="lee", backoff_base=0.01, backoff_max=0.05)
        async with client:
            sub = await client.subscribe("feed", since=(epoch, 3))
            losses: list[ChannelLost] = []
            sub.on_lost(losses.append)
            got: list[Publication] = []
            await asyncio.wait_for(collect(sub, got, 5), 10)
            assert [p.offset for p in got] == [8, 9, 10, 11, 12]
            answer = sub.last_subscribed
            assert answer is not None
            assert (answer.recovered, answer.lost) == (False, 4)
            assert losses == [ChannelLost("feed", 4, 3, False)]


@pytest.mark.slow
async def test_channel_history_survives_a_sigkilled_server(
    server: Callable[..., Server],  # noqa: F811
) -> None:
    first = server().start()
    async with httpx.AsyncClient(timeout=10) as http:
        for n in range(1, 41):
            body = {"channel": "ticks", "data": n, "id": f"t{n}"}
            reply = (await http.post(first.http + "/api/publish", json=body)).json()
            assert reply["status"] == "published" and reply["offset"] == n, reply
        epoch = reply["epoch"]
    first.kill(signal.SIGKILL)

    second = server().start()
    client = Client(second.ws, client_id="viv", backoff_base=0.05, backoff_max=0.3)
    await client.connect()
    try:
        sub = await client.subscribe("ticks", since=(epoch, 25))
        got: list[Publication] = []
        await asyncio.wait_for(collect(sub, got, 15), 30)
        assert [(p.offset, p.data) for p in got] == [(n, n) for n in range(26, 41)]
        answer = sub.last_subscribed
        assert answer is not None and answer.recovered and answer.epoch == epoch
        async with httpx.AsyncClient(timeout=10) as http:
            reply = (
                await http.post(second.http + "/api/publish", json={"channel": "ticks", "data": 41})
            ).json()
            assert (reply["offset"], reply["epoch"]) == (41, epoch)
            again = (
                await http.post(
                    second.http + "/api/publish", json={"channel": "ticks", "data": 0, "id": "t7"}
                )
            ).json()
            assert (again["status"], again["offset"]) == ("duplicate", 7)
            history = (await http.get(second.http + "/api/channels/ticks/history?since=38")).json()
        await asyncio.wait_for(collect(sub, got, 16), 10)
        assert got[-1].offset == 41 and sub.lost == 0 and sub.duplicates == 0
    finally:
        await client.close()
    assert [m["offset"] for m in history["messages"]] == [39, 40, 41]


async def test_an_idle_channel_is_forgotten_after_a_day_unless_subscribed(node: Factory) -> None:
    clock = ManualClock()
    hub = node(clock=clock, channel_history_ttl=60)
    async with hub:
        old = await hub.publish("old", 1)
        kept = await hub.publish("kept", 1)
        store = hub.channels.store
        await store.presence_add("kept", "someone", {})  # a subscriber here keeps its epoch
        clock.advance(86_400 + 61)
        await hub.publish("other", 1)  # the first publish after a TTL sweeps
        assert [i.name for i in await store.channels()] == ["kept", "other"]
        again = await hub.publish("old", 2)
        assert again.offset == 1 and again.epoch != old.epoch  # a new epoch
        still = await hub.publish("kept", 2)
        assert (still.offset, still.epoch) == (2, kept.epoch)


def file_store(hub: Hub) -> Any:
    backend = hub.backend
    assert isinstance(backend, SqliteBackend)
    return backend.store


async def test_the_ttl_sweep_is_set_based_and_in_chunks_of_the_deletion_budget(
    tmp_path: Path,
) -> None:
    clock = ManualClock()
    path = tmp_path / "tether.db"
    config = HubConfig(backend="sqlite", sqlite_path=str(path), channel_history_ttl=60)
    backend = SqliteBackend(path, config, clock=clock, chunk_rows=4)
    hub = Hub(config, clock=clock, backend=backend)
    async with hub:
        for n in range(5):
            for m in range(3):
                await hub.publish(f"idle{n}", m)
        store = backend.store
        statements: list[str] = []
        await store.transact(lambda conn: conn.set_trace_callback(statements.append))
        expired = "SELECT count(*) FROM channel_messages"

        clock.advance(61)  # past the TTL (not a day): all 15 rows expired
        await hub.publish("fresh", 1)  # the first publish after a TTL sweeps
        for _ in range(20):  # each transaction takes the sweep one chunk further
            if rows(path, expired) == [(1,)]:
                break
            await store.transact(lambda conn: None)
        assert rows(path, expired) == [(1,)]  # only the fresh message is left
        sweeps = [s for s in statements if "DELETE FROM channel_messages WHERE id IN" in s]
        assert len(sweeps) >= 4  # 15 rows, at most 4 per transaction
        infos = await hub.channels.store.channels()  # positions outlive the history
        assert [(i.name, i.offset, i.depth) for i in infos] == [
            ("fresh", 1, 1),
            *[(f"idle{n}", 3, 0) for n in range(5)],
        ]

        statements.clear()
        clock.advance(61)
        await hub.publish("fresh", 2)  # the next sweep: the idle channels hold nothing
        deletes = [s for s in statements if s.startswith("DELETE FROM channel_messages")]
        assert len(deletes) == 1  # one set-based delete, not one per idle channel
        await store.transact(lambda conn: conn.set_trace_callback(None))


async def test_a_sweep_that_fails_fails_no_publish_and_is_tried_again(node: Factory) -> None:
    clock = ManualClock()
    hub = node(clock=clock, channel_history_ttl=60)
    async with hub:
        old = await hub.publish("old", 1)
        store = file_store(hub)
        await store.transact(
            lambda conn: conn.execute(
                "CREATE TRIGGER not_now BEFORE DELETE ON channels "
                "BEGIN SELECT RAISE(ABORT, 'not now'); END"
            )
        )
        clock.advance(86_400 + 61)
        first = await hub.publish("other", 1)  # its sweep fails and is rolled back
        assert first.status is PublishStatus.PUBLISHED
        await store.transact(lambda conn: conn.execute("DROP TRIGGER not_now"))
        await hub.publish("other", 2)  # the sweep is still due: it runs now
        assert [i.name for i in await hub.channels.store.channels()] == ["other"]
        again = await hub.publish("old", 2)
        assert again.offset == 1 and again.epoch != old.epoch  # forgotten: a new epoch


async def test_listing_the_channels_is_one_query_with_exact_depths(node: Factory) -> None:
    clock = ManualClock()
    hub = node(clock=clock, channel_history_size=2, channel_history_ttl=60)
    async with hub:
        await hub.publish("gone", 1)
        clock.advance(61)  # the message of "gone" has expired (its position has not)
        for n in range(3):
            await hub.publish("full", n)  # the size bound holds the last two
        await hub.publish("one", 1)
        store = file_store(hub)
        statements: list[str] = []
        await store.query(lambda conn: conn.set_trace_callback(statements.append))
        infos = await hub.channels.store.channels()
        await store.query(lambda conn: conn.set_trace_callback(None))
        assert [(i.name, i.offset, i.depth) for i in infos] == [
            ("full", 3, 2),
            ("gone", 1, 0),
            ("one", 1, 1),
        ]
        selects = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
        assert len(selects) == 1  # not one count per channel
