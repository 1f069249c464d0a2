"""Soak test: mixed load and chaos over loopback against an in-process hub; checks exactly-once-or-reported.

    python -m benchmarks.soak --duration 300 --clients 50 --seed 7 [--restarts 2] [--json out.json]
    tether soak ...            (the same, from a source checkout)

For `--duration` seconds, resumable `tether.Client`s receive critical and best-effort
messages from a hub served by `tether.transports.websockets.serve`, while a chaos task
aborts connections from the server side, drops and closes them from the client side,
sends bad frames and floods from raw clients, keeps a stalled client that never reads,
and restarts the (in-memory) hub. At the end every critical message the hub accepted
(`SENT`/`QUEUED`) must have reached the application exactly once, or be reported lost:
by the client (`on_lost`: expired, overflowed, gaps) or by the restart of a hub that
keeps no state (`ShutdownStats.pending_messages_dropped`, attributed per client from
`hub.pending()` just before the shutdown). It also checks that tracked state returns to
zero after cleanup. Figures are printed; the exit status is 1 on any violation.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import resource
import socket
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson
from websockets.asyncio.client import connect
from websockets.asyncio.server import Server
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from tether import Hub, HubConfig, SendStatus
from tether.client import Client, Lost, TetherError
from tether.transports import websockets as tw

log = logging.getLogger("tether.soak")

V1 = [Subprotocol("tether.v1")]

# Frames a misbehaving client sends, with the close codes the server may answer with.
BAD_FRAMES: tuple[str | bytes, ...] = (
    "{not json",
    "[1, 2]",
    '{"type":"nope"}',
    '{"type":"welcome"}',
    '{"type":"ack","seq":"x"}',
    '{"type":"ack","seq":999999}',
    '{"type":"hello","client_id":"a b"}',
    '{"type":"publish"}',
    b"\x00\x01binary",
    '{"type":"publish","data":"' + "x" * 70_000 + '"}',
)
BAD_CLOSES = frozenset({1002, 1003, 1008, 1009})


class ShiftClock:
    """The real clock plus an offset the soak moves forward to age state out at the end."""

    def __init__(self) -> None:
        self.offset = 0.0

    def now(self) -> float:
        return time.monotonic() + self.offset

    def wall(self) -> float:
        return time.time() + self.offset

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def rss_bytes() -> int:
    """Current resident set size (Linux), else the peak."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def soak_config(max_message_size: int = 65_536) -> HubConfig:
    return HubConfig(
        backend="memory",
        send_timeout=1.0,
        max_queue_size=20_000,  # no overflow: losses come only from chaos we account for
        message_ttl=3600,
        retry_interval=0.2,
        retry_base_delay=0.05,
        retry_max_delay=0.5,
        max_retries=1000,
        heartbeat_interval=5,
        heartbeat_timeout=5,
        hello_timeout=2,
        max_message_size=max_message_size,
        max_inbound_rate=200,
        client_ttl=600,
        cleanup_interval=3600,
    )


@dataclass
class Figures:
    duration_seconds: float = 0.0
    clients: int = 0
    seed: int = 0
    critical_sent: int = 0  # accepted by the hub (SENT or QUEUED)
    critical_refused: int = 0  # not accepted (REJECTED while restarting, ...)
    critical_delivered: int = 0  # distinct ids the applications received
    critical_lost_reported: int = 0  # by the clients' loss events
    critical_dropped_by_restart: int = 0  # pending in a hub that was restarted
    critical_unaccounted: int = 0  # neither delivered nor reported: must be 0
    duplicates_delivered: int = 0  # ids the application saw twice: must be 0
    duplicates_suppressed: int = 0  # re-sent after a resume and dropped by the clients
    best_effort_sent: int = 0  # written to a connection (one per recipient)
    best_effort_received: int = 0
    reconnects: int = 0
    resets_seen: int = 0
    server_aborts: int = 0
    client_aborts: int = 0
    client_closes: int = 0
    bad_frames: int = 0
    floods: int = 0
    stalls_cut_off: int = 0
    restarts: int = 0
    rss_start_bytes: int = 0
    rss_end_bytes: int = 0
    tracked_clients_after_cleanup: int = -1
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations


@dataclass
class Peer:
    """What one soak client was sent (`expected` ids) and what its application received."""

    client: Client
    expected: set[str] = field(default_factory=set)
    delivered: Counter[str] = field(default_factory=Counter)
    best_effort: int = 0
    lost: int = 0
    resets: int = 0
    dropped_by_restart: int = 0
    consumer: asyncio.Task[None] | None = None
    error: BaseException | None = None


class Soak:
    """One soak run; `await Soak(...).run()` returns its `Figures`."""

    def __init__(
        self,
        *,
        duration: float,
        clients: int,
        seed: int,
        restarts: int,
        rate: float,
        progress: bool = False,
    ) -> None:
        self.duration = duration
        self.rng = random.Random(seed)
        self.restarts = restarts
        self.rate = rate
        self.progress = progress
        self.figures = Figures(clients=clients, seed=seed)
        self.clock = ShiftClock()
        self.hub = self._new_hub()
        self.server: Server | None = None
        self.port = 0
        self.peers: dict[str, Peer] = {}
        self.client_ids = [f"soak-{n}" for n in range(clients)]
        self.send_lock = asyncio.Lock()  # a restart waits for the send in progress
        self.stop = asyncio.Event()
        self.counter = 0
        self.stalled: Any = None

    def _new_hub(self) -> Hub:
        return Hub(soak_config(), clock=self.clock)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def violation(self, text: str) -> None:
        log.error("soak violation: %s", text)
        self.figures.violations.append(text)

    # ------------------------------------------------------------------ run

    async def run(self) -> Figures:
        figures = self.figures
        figures.rss_start_bytes = rss_bytes()
        started = time.monotonic()
        await self.hub.start()
        await self._serve()
        for client_id in self.client_ids:
            await self._start_peer(client_id)
        self.stalled = await self._stalled_client()
        tasks = [
            asyncio.create_task(self._produce(), name="soak-producer"),
            asyncio.create_task(self._chaos(), name="soak-chaos"),
            asyncio.create_task(self._restarter(), name="soak-restarts"),
            asyncio.create_task(self._reporter(), name="soak-progress"),
        ]
        try:
            await asyncio.sleep(self.duration)
        finally:
            self.stop.set()
            async with self.send_lock:  # never cancel a restart half-way
                for task in tasks:
                    task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException) and not isinstance(
                    result, asyncio.CancelledError
                ):
                    self.violation(f"a soak task failed: {result!r}")
        await self._drain()
        self.verify()
        for peer in self.peers.values():
            await peer.client.close()
            if peer.consumer is not None:
                peer.consumer.cancel()
                await asyncio.gather(peer.consumer, return_exceptions=True)
        self.stalled.transport.abort()
        await self._cleanup()
        figures.stalls_cut_off += self.hub.metrics.counters.connections_timeouts
        await self.hub.shutdown(timeout=2)
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        figures.duration_seconds = round(time.monotonic() - started, 2)
        figures.rss_end_bytes = rss_bytes()
        return figures

    async def _serve(self) -> None:
        # The same port across restarts, so clients come back to the new hub.
        self.server = await tw.serve(self.hub, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _start_peer(self, client_id: str) -> None:
        client = Client(
            self.url,
            client_id=client_id,
            backoff_base=0.05,
            backoff_max=0.5,
            ack_interval=0.05,
            ping_interval=None,
            rng=random.Random(self.rng.random()),
        )
        peer = Peer(client)
        self.peers[client_id] = peer

        def on_lost(lost: Lost) -> None:
            peer.lost += lost.count
            peer.resets += lost.reset

        client.on_lost(on_lost)
        await client.connect()
        peer.consumer = asyncio.create_task(self._consume(peer), name=f"soak-{client_id}")

    async def _consume(self, peer: Peer) -> None:
        try:
            async for message in peer.client:
                if message.seq is None:
                    peer.best_effort += 1
                else:
                    peer.delivered[message.id] += 1
        except TetherError as exc:
            peer.error = exc
            self.violation(f"{peer.client.client_id} stopped: {exc!r}")

    # ------------------------------------------------------------------ load

    async def _produce(self) -> None:
        interval = 1.0 / self.rate
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while not self.stop.is_set():
            self.counter += 1
            n = self.counter
            client_id = self.rng.choice(self.client_ids)
            async with self.send_lock:
                hub = self.hub
                if n % 5 == 0:  # best-effort: counted as written, per recipient
                    if n % 25 == 0:
                        written = (await hub.broadcast({"n": n, "kind": "best-effort"})).sent
                    else:
                        result = await hub.send(client_id, {"n": n, "kind": "best-effort"})
                        written = result.status is SendStatus.SENT
                    self.figures.best_effort_sent += written
                else:
                    message_id = f"m-{n}"
                    payload = {"id": message_id, "n": n, "pad": "x" * self.rng.randrange(400)}
                    result = await hub.send(client_id, payload, critical=True)
                    if result.status in (SendStatus.SENT, SendStatus.QUEUED):
                        self.peers[client_id].expected.add(message_id)
                        self.figures.critical_sent += 1
                    else:
                        self.figures.critical_refused += 1
                # enough to fill the stalled client's buffers in seconds; once it is cut
                # off, nothing more (its outbox would otherwise grow for the whole run)
                if n % 7 == 0 and hub.is_connected("stalled"):
                    await hub.send("stalled", {"n": n, "pad": "y" * 20_000}, critical=True)
            next_at += interval
            delay = next_at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -1.0:
                next_at = loop.time()  # fell behind: do not burst to catch up

    async def _chaos(self) -> None:
        actions = (
            (self._server_abort, 3),
            (self._client_abort, 3),
            (self._client_close, 2),
            (self._bad_frame, 2),
            (self._flood, 1),
        )
        kinds = [action for action, weight in actions for _ in range(weight)]
        while not self.stop.is_set():
            await asyncio.sleep(self.rng.uniform(0.05, 0.4))
            action = self.rng.choice(kinds)
            try:
                await action()
            except (OSError, ConnectionClosed, TimeoutError) as exc:
                log.debug("soak chaos %s: %r", action.__name__, exc)

    async def _server_abort(self) -> None:
        server = self.server
        if server is None:
            return
        stalled = self.stalled.transport.get_extra_info("sockname")
        # the stalled client is left alone: send_timeout is what must cut it off
        connections = [c for c in server.connections if c.remote_address != stalled]
        if connections:
            self.rng.choice(connections).transport.abort()
            self.figures.server_aborts += 1

    async def _client_abort(self) -> None:
        ws = self.peers[self.rng.choice(self.client_ids)].client.connection
        if ws is not None:
            ws.transport.abort()
            self.figures.client_aborts += 1

    async def _client_close(self) -> None:
        ws = self.peers[self.rng.choice(self.client_ids)].client.connection
        if ws is not None:
            await ws.close(1000, "soak: client-side close")
            self.figures.client_closes += 1

    async def _bad_frame(self) -> None:
        frame = self.rng.choice(BAD_FRAMES)
        async with connect(self.url, subprotocols=V1, max_size=None) as ws:
            if self.rng.random() < 0.5:
                await ws.send(orjson.dumps({"type": "hello", "client_id": "badguy"}).decode())
                async with asyncio.timeout(5):
                    await ws.recv()  # welcome
            await ws.send(frame)
            code = await _closed_with(ws)
        self.figures.bad_frames += 1
        if code not in BAD_CLOSES:
            self.violation(f"bad frame {frame[:40]!r} answered with close {code}")

    async def _flood(self) -> None:
        async with connect(self.url + "/?client_id=flooder") as ws:
            for n in range(1000):
                try:
                    await ws.send(str(n))
                except ConnectionClosed:
                    break
            code = await _closed_with(ws)
        self.figures.floods += 1
        if code != 1008:
            self.violation(f"a flood was answered with close {code}, not 1008")

    async def _stalled_client(self) -> Any:
        """A tether.v1 client with a tiny receive buffer that never reads after hello."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.port))
        ws = await connect(self.url, subprotocols=V1, max_queue=1, sock=sock, compression=None)
        await ws.send(orjson.dumps({"type": "hello", "client_id": "stalled"}).decode())
        return ws

    # ------------------------------------------------------------------ restarts

    async def _restarter(self) -> None:
        if self.restarts <= 0:
            return
        gap = self.duration / (self.restarts + 1)
        for _ in range(self.restarts):
            await asyncio.sleep(gap)
            await self._restart()

    async def _restart(self) -> None:
        """Replace the in-memory hub: what it still holds is lost, and accounted for."""
        async with self.send_lock:
            # The stalled client has served its purpose (send_timeout cut it off); left
            # open, closing the server would wait out its close handshake timeout.
            self.stalled.transport.abort()
            old = self.hub
            pending = {cid: old.pending(cid) for cid in old.clients()}
            self.figures.stalls_cut_off += old.metrics.counters.connections_timeouts
            # No await between the snapshot and the shutdown's own count (it is taken
            # before the shutdown's first await): the two must agree exactly.
            stats = await old.shutdown(flush=False, timeout=1)
            if sum(pending.values()) != stats.pending_messages_dropped:
                self.violation(
                    f"restart: shutdown reported {stats.pending_messages_dropped} dropped, "
                    f"the outboxes held {sum(pending.values())}: {pending}"
                )
            pending.pop("stalled", None)  # it never reads; not part of the accounting
            for client_id, count in pending.items():
                if client_id in self.peers:
                    self.peers[client_id].dropped_by_restart += count
            if self.server is not None:
                self.server.close()
                await self.server.wait_closed()
            self.hub = self._new_hub()
            await self.hub.start()
            await self._serve()
            self.figures.restarts += 1
            self.stalled = await self._stalled_client()

    # ------------------------------------------------------------------ the end

    async def _drain(self, timeout: float = 20.0) -> None:
        """Wait until every client is connected, holds nothing pending and consumed all."""

        def settled() -> bool:
            for client_id, peer in self.peers.items():
                consumed = peer.best_effort + sum(peer.delivered.values())
                if peer.error is not None:
                    continue
                if not self.hub.is_connected(client_id) or self.hub.pending(client_id):
                    return False
                if consumed != peer.client.received:
                    return False
            return True

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not settled():
            if loop.time() > deadline:
                self.violation(f"not settled {timeout:g} s after the load stopped")
                return
            await asyncio.sleep(0.05)

    def verify(self) -> None:
        """Tally each peer's deliveries into the figures; record duplicates, strays and
        critical messages missing without a loss report as violations."""
        f = self.figures
        for client_id, peer in self.peers.items():
            delivered = set(peer.delivered)
            twice = sorted(i for i, count in peer.delivered.items() if count > 1)
            unknown = delivered - peer.expected
            missing = peer.expected - delivered
            reported = peer.lost + peer.dropped_by_restart
            f.critical_delivered += len(delivered & peer.expected)
            f.duplicates_delivered += sum(peer.delivered[i] - 1 for i in twice)
            f.critical_lost_reported += peer.lost
            f.critical_dropped_by_restart += peer.dropped_by_restart
            f.best_effort_received += peer.best_effort
            f.duplicates_suppressed += peer.client.duplicates
            f.reconnects += peer.client.reconnects
            f.resets_seen += peer.resets
            if twice:
                self.violation(f"{client_id}: delivered twice: {twice[:5]}")
            if unknown:
                self.violation(f"{client_id}: delivered but never accepted: {sorted(unknown)[:5]}")
            if len(missing) > reported:
                f.critical_unaccounted += len(missing) - reported
                self.violation(
                    f"{client_id}: {len(missing)} critical messages missing, only "
                    f"{reported} reported lost (e.g. {sorted(missing)[:3]})"
                )

    async def _cleanup(self) -> None:
        """Age everything out (the clock jumps past every TTL); tracked state must go."""
        hub = self.hub
        await _until(lambda: not any(hub.is_connected(c) for c in hub.clients()), 10)
        self.clock.offset += max(hub.config.client_ttl, hub.config.message_ttl) + 1
        await hub.retry_now()  # expires what waits for the stalled client
        await hub.cleanup_now()
        tracked = len(hub.clients())
        self.figures.tracked_clients_after_cleanup = tracked
        if tracked or hub.metrics.clients:
            self.violation(f"{tracked} clients still tracked after cleanup")

    async def _reporter(self) -> None:
        if not self.progress:
            return
        while not self.stop.is_set():
            await asyncio.sleep(10)
            f = self.figures
            print(
                f"  … sent {f.critical_sent} critical, {f.server_aborts + f.client_aborts} "
                f"aborts, {f.bad_frames} bad frames, {f.restarts} restarts, "
                f"RSS {rss_bytes() / 1e6:.0f} MB",
                flush=True,
            )


async def _closed_with(ws: Any, timeout: float = 5.0) -> int | None:
    with contextlib.suppress(ConnectionClosed):
        async with asyncio.timeout(timeout):
            while True:
                await ws.recv()
    return ws.close_code  # type: ignore[no-any-return]


async def _until(predicate: Any, timeout: float) -> None:
    # Polling: the hub has no event for "every connection has been detached".
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            while not predicate():  # noqa: ASYNC110
                await asyncio.sleep(0.02)


async def run_soak(
    *,
    duration: float = 60.0,
    clients: int = 20,
    seed: int | None = None,
    restarts: int = 1,
    rate: float = 300.0,
    progress: bool = False,
) -> Figures:
    """Run one soak; the returned `Figures` say what happened and list any violations."""
    chosen = seed if seed is not None else random.randrange(2**31)
    soak = Soak(
        duration=duration,
        clients=clients,
        seed=chosen,
        restarts=restarts,
        rate=rate,
        progress=progress,
    )
    return await soak.run()


def report(figures: Figures) -> str:
    f = figures
    lines = [
        f"soak: {f.duration_seconds:.0f} s, {f.clients} clients, seed {f.seed}",
        f"  critical   sent {f.critical_sent}  delivered {f.critical_delivered}  "
        f"lost (reported) {f.critical_lost_reported}  dropped by restarts "
        f"{f.critical_dropped_by_restart}  unaccounted {f.critical_unaccounted}  "
        f"refused {f.critical_refused}",
        f"  duplicates delivered {f.duplicates_delivered}  seen and suppressed "
        f"{f.duplicates_suppressed}",
        f"  best-effort sent {f.best_effort_sent}  received {f.best_effort_received}",
        f"  chaos      reconnects {f.reconnects}  server aborts {f.server_aborts}  "
        f"client aborts {f.client_aborts}  client closes {f.client_closes}  bad frames "
        f"{f.bad_frames}  floods {f.floods}  stalls cut off {f.stalls_cut_off}  restarts "
        f"{f.restarts} (resets seen {f.resets_seen})",
        f"  memory     RSS {f.rss_start_bytes / 1e6:.1f} MB -> {f.rss_end_bytes / 1e6:.1f} MB  "
        f"tracked clients after cleanup {f.tracked_clients_after_cleanup}",
        "  result     " + ("OK" if f.ok else f"{len(f.violations)} VIOLATION(S)"),
    ]
    lines += [f"    - {v}" for v in f.violations[:20]]
    return "\n".join(lines)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="soak", description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of load (120)")
    parser.add_argument("--clients", type=int, default=20, help="resumable clients (20)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (random)")
    parser.add_argument("--restarts", type=int, default=1, help="hub restarts during the run (1)")
    parser.add_argument("--rate", type=float, default=300.0, help="messages per second (300)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    """Run with parsed options, print the figures; 0 when every check passed."""
    if args.duration <= 0 or args.clients < 1 or args.rate <= 0 or args.restarts < 0:
        print("soak: --duration, --clients and --rate must be positive", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    print(
        f"soak: {args.duration:g} s, {args.clients} clients, {args.rate:g} msg/s, "
        f"{args.restarts} restart(s)…",
        flush=True,
    )
    figures = asyncio.run(
        run_soak(
            duration=args.duration,
            clients=args.clients,
            seed=args.seed,
            restarts=args.restarts,
            rate=args.rate,
            progress=True,
        )
    )
    print(report(figures))
    if args.json:
        with open(args.json, "w") as out:
            json.dump({**asdict(figures), "ok": figures.ok}, out, indent=2)
    return 0 if figures.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    return run_from_args(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
