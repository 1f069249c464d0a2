"""Profile the hub's hot paths (send, broadcast, critical send + ack, retry tick) with pyinstrument,
and time them against an experimental writer without a per-send `asyncio.timeout`.

    python -m benchmarks.profile_hot_paths [--quick] [--html DIR]

Not part of `tether bench`: it prints per-operation costs and pyinstrument call trees that
`docs/benchmarks.md` summarises. The experiments swap the hub's `Writer`; src/tether is untouched.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from websockets.protocol import State

from tether import Hub, HubConfig, ManualClock, protocol
from tether.envelopes import copy_for_client
from tether.transports.base import TransportClosed
from tether.writes import WriteOutcome, Writer

from ._common import median, rnd
from ._hubkit import NullTransport

Op = Callable[[], Awaitable[int]]


_SENDING: dict[Any, Any] = {}  # the watchdog's table: client -> (deadline, task)


class WatchdogWriter(Writer):
    """Experiment: the send timeout enforced by a watchdog instead of `asyncio.timeout`.

    Each write records (deadline, task) in a dict; a periodic watchdog (not run here: it
    wakes every send_timeout/4 and costs nothing per send) would cancel the task of a write
    past its deadline and account it as a timeout. Per send this costs a dict store and
    delete instead of a Timeout, a TimerHandle (with a copied context), a heap push and a
    cancelled handle left in the loop's heap.
    """

    __slots__ = ()

    async def write_awaited(self, client: Any, frame: str | bytes) -> WriteOutcome:
        transport = client.transport
        if transport is None:
            return WriteOutcome.CLOSED
        _SENDING[client] = (time.monotonic() + self.send_timeout, asyncio.current_task())
        try:
            await transport.send(frame)
        except TransportClosed:
            client.breaker.release()
            self._registry.detach(client, transport, failed=False)
            return WriteOutcome.CLOSED
        except Exception:
            client.breaker.record_failure()
            self._acct.failed(client)
            return WriteOutcome.FAILED
        finally:
            del _SENDING[client]
        client.breaker.record_success()
        return WriteOutcome.OK


class WatchdogHub(Hub):
    """A Hub whose writer is the `WatchdogWriter` experiment."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pipeline.writer.__class__ = WatchdogWriter  # every part shares this writer


_WRITE_LIMIT = 32 * 1024  # websockets' default write_limit (high-water mark)


def _try_write(transport: Any, frame: str | bytes) -> bool:
    """Experiment: what a `try_send(frame) -> bool` on the websockets adapter would do.

    Write synchronously (as `websockets.broadcast()` does) when the connection is open and
    its write buffer is under the high-water mark; otherwise return False and let the hub
    take the awaited path with its send timeout.
    """
    conn = getattr(transport, "conn", None)
    ws = getattr(conn, "ws", None)
    if ws is None:
        return False
    if ws.protocol.state is not State.OPEN or ws.send_in_progress is not None:
        return False
    if ws.transport.get_write_buffer_size() > _WRITE_LIMIT:
        return False
    if isinstance(frame, str):
        ws.protocol.send_text(frame.encode())
    else:
        ws.protocol.send_binary(frame)
    ws.send_data()
    return True


def _writable(transport: Any) -> bool:
    ws = getattr(getattr(transport, "conn", None), "ws", None)
    return (
        ws is not None
        and ws.protocol.state is State.OPEN
        and ws.transport.get_write_buffer_size() <= _WRITE_LIMIT
    )


class TrySendWriter(Writer):
    """Experiment A: writes synchronously when the transport can take the frame now, and
    only otherwise awaits `transport.send` under `asyncio.timeout`."""

    __slots__ = ()

    async def write(self, client: Any, frame: str | bytes) -> WriteOutcome:
        transport = client.transport
        if transport is not None and _try_write(transport, frame):
            client.breaker.record_success()
            return WriteOutcome.OK
        return await super().write(client, frame)


class TrySendHub(Hub):
    """A Hub whose writer is the `TrySendWriter` experiment."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pipeline.writer.__class__ = TrySendWriter


class InlineBroadcastHub(TrySendHub):
    """Experiment B: A, plus `broadcast` delivers inline (no task per client) to every client
    whose lock is free and whose socket can take the frame now; only the others get tasks."""

    async def broadcast(self, payload: Any, **kwargs: Any) -> Any:
        from tether.messages import BroadcastResult, SendStatus

        if kwargs or self._closing:
            return await super().broadcast(payload, **kwargs)
        targets = [c for c in list(self._registry.sessions.values()) if c.connected]
        template = self._envelopes.prepare(payload, False, None, None)
        deliver = self._pipeline.deliver
        slow = [c for c in targets if c.lock.locked() or not _writable(c.transport)]
        tasks = [asyncio.ensure_future(deliver(c, copy_for_client(template))) for c in slow]
        skip = set(map(id, slow))
        results = [
            await deliver(c, copy_for_client(template)) for c in targets if id(c) not in skip
        ]
        results += await asyncio.gather(*tasks)
        sent = sum(1 for r in results if r.status is SendStatus.SENT)
        return BroadcastResult(template.message_id, sent=sent, dropped=len(results) - sent)


async def _experiment_e2e(clients: int, messages: int, repeat: int) -> dict[str, Any]:
    from ._servers import RawServer, TetherServer, measure

    servers = [
        RawServer("send"),
        RawServer("broadcast"),
        TetherServer(critical=False, clients_hint=clients),
        TetherServer(critical=False, clients_hint=clients, hub_cls=TrySendHub, label=" +A"),
        TetherServer(
            critical=False, clients_hint=clients, hub_cls=InlineBroadcastHub, label=" +A+B"
        ),
        TetherServer(critical=True, clients_hint=clients),
        TetherServer(critical=True, clients_hint=clients, hub_cls=TrySendHub, label=" +A"),
    ]
    try:
        for server in servers:
            await server.start()
        return await measure(servers, clients, messages, repeat)
    finally:
        for server in servers:
            await server.close()


def _config(**extra: Any) -> HubConfig:
    return HubConfig(max_queue_size=100_000, **extra)


async def _plain_hub(cls: type[Hub], clients: int) -> tuple[Hub, list[str]]:
    hub = cls(_config())
    ids = [f"c{i}" for i in range(clients)]
    for cid in ids:
        await hub.connect(cid, NullTransport())
    return hub, ids


async def _v1_hub(cls: type[Hub], clients: int) -> tuple[Hub, list[str]]:
    hub = cls(_config())
    ids = [f"v{i}" for i in range(clients)]
    for cid in ids:
        await hub.connect(cid, NullTransport(), hello=protocol.Hello(cid, 0))
    return hub, ids


def _ops(cls: type[Hub], n: int) -> dict[str, Callable[[], Awaitable[tuple[Op, int, Hub]]]]:
    """Factories: each builds a hub and returns (operation, deliveries it makes, hub)."""
    data: dict[str, Any] = {"n": 0, "text": "x" * 64}

    async def send() -> tuple[Op, int, Hub]:
        hub, ids = await _plain_hub(cls, 100)

        async def op() -> int:
            for i in range(n):
                await hub.send(ids[i % 100], data)
                if i % 100 == 0:
                    await asyncio.sleep(0)
            return n

        return op, n, hub

    async def broadcast() -> tuple[Op, int, Hub]:
        hub, _ = await _plain_hub(cls, 100)
        rounds = max(1, n // 100)

        async def op() -> int:
            for _ in range(rounds):
                await hub.broadcast(data)
                await asyncio.sleep(0)
            return rounds * 100

        return op, rounds * 100, hub

    async def critical_ack() -> tuple[Op, int, Hub]:
        hub, ids = await _v1_hub(cls, 100)

        async def op() -> int:
            for i in range(n):
                cid = ids[i % 100]
                result = await hub.send(cid, data, critical=True)
                seq = result.seq or 0
                if seq % 64 == 0:  # cumulative acks, like tether.Client
                    await hub.ack(cid, seq)
                if i % 100 == 0:
                    await asyncio.sleep(0)
            return n

        return op, n, hub

    async def retry_tick() -> tuple[Op, int, Hub]:
        clock = ManualClock()
        hub = cls(_config(retry_interval=86_400, cleanup_interval=86_400), clock=clock)
        clients = 1_000

        class FailOnce(NullTransport):
            failed = False

            async def send(self, data: str | bytes) -> None:
                if not self.failed:
                    self.failed = True
                    raise ConnectionError("first write fails")
                self.frames += 1

        ids = [f"q{i}" for i in range(clients)]
        for cid in ids:
            await hub.connect(cid, FailOnce())
            await hub.send(cid, data, critical=True)  # fails once: queued with backoff
        clock.advance(120)

        async def op() -> int:
            return await hub.retry_now()

        return op, clients, hub

    return {
        "send (plain, best-effort)": send,
        "broadcast (100 clients)": broadcast,
        "send critical + ack (tether.v1)": critical_ack,
        "retry tick (1,000 due)": retry_tick,
    }


async def _time(factory: Callable[[], Awaitable[tuple[Op, int, Hub]]]) -> float:
    op, _, hub = await factory()
    gc.collect()
    start = time.perf_counter()
    done = await op()
    elapsed = time.perf_counter() - start
    await hub.shutdown(flush=False)
    return elapsed / max(1, done) * 1e6


async def _profile(factory: Callable[[], Awaitable[tuple[Op, int, Hub]]]) -> Any:
    from pyinstrument import Profiler

    op, _, hub = await factory()
    profiler = Profiler(interval=0.0002, async_mode="disabled")
    profiler.start()
    await op()
    profiler.stop()
    await hub.shutdown(flush=False)
    return profiler


async def _profile_e2e(critical: bool, clients: int, messages: int) -> Any:
    """The server side of an e2e round (real sockets, receivers in another process)."""
    from pyinstrument import Profiler

    from ._servers import TetherServer

    server = TetherServer(critical=critical, clients_hint=clients)
    await server.start()
    try:
        await server.attach(clients)
        await server.round(0, max(1, messages // 10))
        profiler = Profiler(interval=0.0002, async_mode="disabled")
        profiler.start()
        await server.round(messages, messages)
        profiler.stop()
    finally:
        await server.close()
    return profiler


def _report(name: str, profiler: Any, html: Path | None) -> None:
    print(f"\n===== {name} =====")
    print(profiler.output_text(unicode=False, color=False, show_all=False))
    if html is not None:
        html.mkdir(parents=True, exist_ok=True)
        slug = "".join(c if c.isalnum() else "_" for c in name).strip("_")
        (html / f"{slug}.html").write_text(profiler.output_html())


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_hot_paths")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--html", metavar="DIR", help="also write pyinstrument HTML reports")
    parser.add_argument(
        "--experiment",
        action="store_true",
        help="only the e2e experiment: try_send fast path (A) and inline broadcast (B)",
    )
    args = parser.parse_args(argv)
    logging.getLogger("tether").setLevel(logging.ERROR)
    n = 5_000 if args.quick else 50_000
    repeat = 3 if args.quick else 7
    html = Path(args.html) if args.html else None
    if args.experiment:
        from ._common import raise_fd_limit

        raise_fd_limit()
        for clients, messages in ((1, n // 5), (100, 200), (1_000, 30)):
            figures = asyncio.run(_experiment_e2e(clients, messages, repeat=3 if args.quick else 5))
            raw = figures["raw websockets send"]
            print(f"\n{clients} client(s) x {messages} msgs")
            for name, fig in figures.items():
                print(
                    f"  {name:40s} {rnd(fig['deliveries_per_s']):>9} deliveries/s  "
                    f"x raw send {rnd(fig['deliveries_per_s'] / raw['deliveries_per_s']):>6}  "
                    f"server CPU {rnd(fig['server_cpu_us_per_delivery']):>6} us/delivery"
                )
        return
    print(f"us per delivery, median of {repeat} (Hub as is vs WatchdogHub experiment)")
    for name in _ops(Hub, n):
        base = [asyncio.run(_time(_ops(Hub, n)[name])) for _ in range(repeat)]
        exp = [asyncio.run(_time(_ops(WatchdogHub, n)[name])) for _ in range(repeat)]
        b, e = median(base), median(exp)
        print(
            f"  {name:34s} hub {rnd(b):>7} us   watchdog {rnd(e):>7} us   gain {rnd(100 * (1 - e / b)):>5} %"
        )
    for name, factory in _ops(Hub, n).items():
        _report(name, asyncio.run(_profile(factory)), html)
    for critical, clients, messages in ((False, 1, n // 5), (False, 100, 200), (True, 100, 200)):
        mode = "v1 critical+acks" if critical else "plain"
        name = f"e2e server side: {mode}, {clients} client(s) x {messages}"
        _report(name, asyncio.run(_profile_e2e(critical, clients, messages)), html)


if __name__ == "__main__":
    main()
