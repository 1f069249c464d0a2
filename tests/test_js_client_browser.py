"""The JavaScript client (/static/tether.js) in headless Chromium against a real uvicorn server
running `create_app(hub)`: chaos (5,000 messages across 26 server kills and a page drop), plain
mode, loss reporting, duplicate suppression, rejection, a differential test against the Python
`ClientProtocol`, and the browser example."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from playwright.async_api import Browser, Page
from playwright.async_api import Error as PlaywrightError
from playwright.async_api import TimeoutError as PlaywrightTimeoutError

from support import until
from tether import Hub, HubConfig, SendStatus, protocol
from tether.monitoring import BackgroundServer, create_app
from tether.transports.base import Transport

pytestmark = pytest.mark.browser


ROOT = Path(__file__).resolve().parent.parent
N = 5_000
SERVER_KILLS = 26
WINDOW = 100

# Runs in the page: import the module, start a TetherClient and record everything it reports
# into window.log (one array, so the order of messages and loss events is visible).
START_CLIENT = """
async ([url, options]) => {
  const { TetherClient } = await import("/static/tether.js");
  if (options.storage === "session") options.storage = sessionStorage;
  const client = new TetherClient(url, options);
  window.client = client;
  window.log = [];
  window.got = [];
  window.states = [];
  client.addEventListener("message", (e) => {
    window.got.push(e.detail.seq);
    window.log.push({ kind: "msg", seq: e.detail.seq, id: e.detail.id, data: e.detail.data });
  });
  client.addEventListener("lost", (e) => window.log.push({ kind: "lost", ...e.detail }));
  client.addEventListener("error", (e) => window.log.push({ kind: "error", ...e.detail }));
  client.addEventListener("close", (e) => window.log.push({ kind: "close", ...e.detail }));
  client.addEventListener("statechange", (e) => window.states.push(e.detail.state));
  await client.connect();
  return client.state;
}
"""


async def open_page(browser: Browser, server: BackgroundServer) -> Page:
    """A page on the server's origin, so `import("/static/tether.js")` is same-origin."""
    page = await browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    response = await page.goto(server.url + "/static/tether.js")
    assert response is not None and response.ok
    assert "javascript" in (response.headers.get("content-type") or "")
    page.set_default_timeout(20_000)
    setattr(page, "js_errors", errors)  # noqa: B010 - checked at the end of each test
    return page


async def start_client(page: Page, server: BackgroundServer, **options: Any) -> None:
    state = await page.evaluate(START_CLIENT, [server.ws_url + "/ws", options])
    assert state == "connected"


@dataclass
class Recorded:
    transports: dict[str, Transport] = field(default_factory=dict)  # the latest per client id
    seqs_written: list[int] = field(default_factory=list)  # critical `msg` frames, re-sends too


def record_transports(hub: Hub) -> Recorded:
    """Note the server-side connection of each client and the critical frames written to it."""
    recorded = Recorded()
    connect = hub.connect

    async def recording(client_id: str, transport: Transport, **kwargs: Any) -> Any:
        recorded.transports[client_id] = transport
        send = transport.send

        def note(data: str | bytes) -> None:
            if isinstance(data, str) and data.startswith('{"type":"msg","seq":'):
                recorded.seqs_written.append(orjson.loads(data)["seq"])

        async def counting_send(data: str | bytes) -> None:
            await send(data)
            note(data)

        transport.send = counting_send  # type: ignore[method-assign]
        try_send = getattr(transport, "try_send", None)
        if try_send is not None:  # the synchronous write, when the adapter has one

            def counting_try_send(data: str | bytes) -> bool:
                taken = bool(try_send(data))
                if taken:
                    note(data)
                return taken

            transport.try_send = counting_try_send  # type: ignore[attr-defined]
        return await connect(client_id, transport, **kwargs)

    hub.connect = recording  # type: ignore[method-assign]
    return recorded


def live_ws(server: BackgroundServer) -> list[Any]:
    """uvicorn's protocol objects of the open /ws connections (to abort their TCP transport)."""
    live: list[Any] = []
    for conn in list(server.server.server_state.connections):
        scope = getattr(conn, "scope", None) or {}
        websocket = scope.get("type") == "websocket" and scope.get("path") == "/ws"
        if websocket and not conn.transport.is_closing():
            live.append(conn)
    return live


@pytest.mark.slow
@pytest.mark.parametrize("seed", [20240601, 99])
async def test_5000_critical_messages_survive_server_kills_and_a_page_drop(
    browser: Browser, seed: int
) -> None:
    rng = random.Random(seed)
    points = rng.sample(range(20, N - 20), SERVER_KILLS + 1)
    server_kills = set(points[:SERVER_KILLS])
    page_drop = points[SERVER_KILLS]
    hub = Hub(HubConfig(max_queue_size=N, send_timeout=2.0))
    recorded = record_transports(hub)
    async with hub, BackgroundServer(create_app(hub)) as server:
        page = await open_page(browser, server)
        await start_client(
            page,
            server,
            clientId="chaos",
            backoffBase=1,
            backoffMax=20,
            ackEvery=32,
            ackIntervalMs=5,
        )
        kills = 0

        def live() -> Any:
            conns = live_ws(server)
            return conns[0] if len(conns) == 1 and hub.is_connected("chaos") else None

        for n in range(1, N + 1):
            result = await hub.send("chaos", {"n": n}, critical=True)
            assert result.status in (SendStatus.SENT, SendStatus.QUEUED)
            # Stay at most ~WINDOW unacknowledged messages ahead, yielding at random, so that
            # kills land with messages on the wire, received but not yet acknowledged.
            if hub.pending("chaos") > WINDOW:
                await until(lambda: hub.pending("chaos") <= WINDOW // 2, timeout=10)
            elif rng.random() < 0.2:
                await asyncio.sleep(0)
            if n in server_kills:
                await until(lambda: live() is not None)  # every kill really cuts a connection
                # ... one whose welcome the page has taken (a reconnect counts from then)
                await page.wait_for_function("() => window.client.state === 'connected'")
                await until(lambda: live() is not None)
                live().transport.abort()  # drop TCP, no close handshake
                kills += 1
            if n == page_drop:
                await until(lambda: live() is not None)
                await page.wait_for_function("() => window.client.state === 'connected'")
                await page.evaluate("() => window.client._ws.close(4000, 'page drops it')")
        try:
            await page.wait_for_function(f"() => window.got.length >= {N}", timeout=20_000)
        except PlaywrightTimeoutError:
            got = await page.evaluate("() => window.got.length")
            pytest.fail(f"the page received {got} of {N} messages within 20 s of the last send")

        log = await page.evaluate("() => window.log")
        counters = await page.evaluate("() => window.client.counters")
        assert kills == SERVER_KILLS
        seqs = [item["seq"] for item in log if item["kind"] == "msg"]
        assert seqs == list(range(1, N + 1)), "exactly 1..N, in order, no duplicates"
        assert [item["data"]["n"] for item in log if item["kind"] == "msg"] == seqs
        assert [item for item in log if item["kind"] != "msg"] == []  # nothing lost, no error
        # The kills cut streams with messages on the wire: the resumes re-sent them.
        resent = len(recorded.seqs_written) - N
        assert resent > 0
        assert counters["received"] == N and counters["lost"] == 0
        # The hellos carried the position, so the server re-sent nothing already delivered.
        assert counters["duplicates"] == 0
        assert counters["reconnects"] >= SERVER_KILLS + 1
        assert await page.evaluate("() => window.client.lastSeq") == N
        await until(lambda: hub.pending("chaos") == 0)  # everything acknowledged
        assert hub.dead_letters("chaos") == []
        assert page.js_errors == []  # type: ignore[attr-defined]


async def test_plain_native_websocket_receives_sent_and_broadcast_messages(
    browser: Browser,
) -> None:
    hub = Hub(HubConfig())
    inbound: list[tuple[str, Any]] = []

    @hub.on_message
    async def handle(client_id: str, data: Any) -> None:
        inbound.append((client_id, data))

    async with hub, BackgroundServer(create_app(hub)) as server:
        page = await open_page(browser, server)
        protocol_name = await page.evaluate(
            """(url) => new Promise((resolve, reject) => {
                 const ws = new WebSocket(url);
                 window.plain = [];
                 ws.onmessage = (e) => window.plain.push(e.data);
                 ws.onopen = () => { ws.send("hello from the page"); resolve(ws.protocol); };
                 ws.onerror = () => reject(new Error("no connection"));
                 window.ws = ws;
               })""",
            server.ws_url + "/ws?client_id=bob",
        )
        assert protocol_name == ""  # no subprotocol: plain mode
        await until(lambda: hub.is_connected("bob"))
        assert (await hub.send("bob", {"text": "hi"})).status is SendStatus.SENT
        broadcast = await hub.broadcast({"text": "all"})
        assert broadcast.sent == 1
        assert (await hub.send("bob", "just text", critical=True)).status is SendStatus.SENT
        await page.wait_for_function("() => window.plain.length >= 3")
        plain = await page.evaluate("() => window.plain")
        assert [json.loads(plain[0]), json.loads(plain[1]), plain[2]] == [
            {"text": "hi"},
            {"text": "all"},
            "just text",
        ]
        await until(lambda: bool(inbound))
        assert inbound == [("bob", "hello from the page")]


async def test_messages_expired_while_away_are_reported_as_lost(browser: Browser) -> None:
    hub = Hub(HubConfig())
    async with hub, BackgroundServer(create_app(hub)) as server:
        page = await open_page(browser, server)
        # sessionStorage keeps lastSeq across clients, as across a page reload
        await start_client(page, server, clientId="lossy", storage="session")
        for n in (1, 2, 3):
            await hub.send("lossy", {"n": n}, critical=True)
        await page.wait_for_function("() => window.got.length === 3")
        await until(lambda: hub.pending("lossy") == 0)  # acknowledged
        await page.evaluate("() => window.client.close()")
        await until(lambda: not hub.is_connected("lossy"))

        for n in (4, 5):
            result = await hub.send("lossy", {"n": n}, critical=True, ttl=0.05)
            assert result.status is SendStatus.QUEUED
        assert (await hub.send("lossy", {"n": 6}, critical=True)).status is SendStatus.QUEUED
        # (the hub's own retry loop may expire 4 and 5 first; either way they are lost)

        async def expire() -> None:
            while hub.pending("lossy") > 1:
                await hub.retry_now()
                await asyncio.sleep(0.01)

        await asyncio.wait_for(expire(), 5)
        assert await page.evaluate("() => sessionStorage.getItem('tether:lastSeq:lossy')") == "3"

        await start_client(page, server, clientId="lossy", storage="session")
        await page.wait_for_function("() => window.got.length === 1")
        log = await page.evaluate("() => window.log")
        assert log == [
            {"kind": "lost", "count": 2, "ranges": [[4, 5]], "reset": False},
            {"kind": "msg", "seq": 6, "id": log[1]["id"], "data": {"n": 6}},
        ]
        client = await page.evaluate(
            "() => ({lastSeq: window.client.lastSeq, counters: window.client.counters})"
        )
        assert client == {
            "lastSeq": 6,
            "counters": {"received": 1, "duplicates": 0, "reconnects": 0, "lost": 2},
        }
        await until(lambda: hub.pending("lossy") == 0)  # 6 acknowledged; 4-5 never re-sent


async def test_resent_messages_are_dropped_as_duplicates_and_acked(browser: Browser) -> None:
    hub = Hub(HubConfig())
    transports = record_transports(hub).transports
    async with hub, BackgroundServer(create_app(hub)) as server:
        page = await open_page(browser, server)
        await start_client(page, server, clientId="dup")
        for n in range(1, 6):
            await hub.send("dup", {"n": n}, critical=True, message_id=f"m-{n}")
        await page.wait_for_function("() => window.got.length === 5")
        await until(lambda: hub.pending("dup") == 0)

        # A server that re-sends 3..5 (say its record of the ack was lost): the very frames
        # the hub wrote, seqs and ids included.
        session = transports["dup"]
        for n in (3, 4, 5):
            await session.send(protocol.encode_msg(n, f"m-{n}", orjson.dumps({"n": n})))
        await page.wait_for_function("() => window.client.counters.duplicates === 3")
        await hub.send("dup", {"n": 6}, critical=True, message_id="m-6")
        await page.wait_for_function("() => window.got.length === 6")

        log = await page.evaluate("() => window.log")
        assert [(item["seq"], item["id"], item["data"]) for item in log] == [
            (n, f"m-{n}", {"n": n}) for n in range(1, 7)
        ]
        counters = await page.evaluate("() => window.client.counters")
        assert counters == {"received": 6, "duplicates": 3, "reconnects": 0, "lost": 0}
        # The duplicates were acknowledged again (never above what the server wrote): the
        # connection is still up and 6 is acknowledged too.
        await until(lambda: hub.pending("dup") == 0)
        assert hub.is_connected("dup") and transports["dup"] is session
        assert page.js_errors == []  # type: ignore[attr-defined]


async def test_a_rejection_stops_the_client_with_an_error_event(browser: Browser) -> None:
    hub = Hub(HubConfig())
    async with hub, BackgroundServer(create_app(hub)) as server:
        page = await open_page(browser, server)
        # The constructor refuses a bad client id; bypass it to make the server refuse one.
        outcome = await page.evaluate(
            """async (url) => {
                 const { TetherClient } = await import("/static/tether.js");
                 const client = new TetherClient(url, { clientId: "ok", backoffBase: 1, backoffMax: 5 });
                 client.clientId = "not ok!";
                 const events = [];
                 for (const type of ["error", "close", "welcome"]) {
                   client.addEventListener(type, (e) => events.push({ type, ...e.detail }));
                 }
                 let rejected = null;
                 try { await client.connect(); } catch (error) { rejected = error.message; }
                 await new Promise((resolve) => setTimeout(resolve, 100));  // no retry follows
                 return { events, rejected, state: client.state };
               }""",
            server.ws_url + "/ws",
        )
        assert outcome["state"] == "closed"
        assert outcome["rejected"].startswith("invalid_client_id")
        events = outcome["events"]
        assert [e["type"] for e in events] == ["error", "close"]
        assert events[0]["code"] == "invalid_client_id" and events[0]["closeCode"] == 1008
        assert hub.clients() == []


# ---------------------------------------------------------------- the JS client vs ClientProtocol

# Runs in the page: each scenario drives a TetherClient over a scripted fake WebSocket (one
# list of server frames per connection, then a drop) and logs what the server would see
# (hello, ack) and what the application sees (msg, lost, error), in order.
RUN_SCRIPTED = """
async (scenarios) => {
  const { TetherClient } = await import("/static/tether.js");
  const realWebSocket = window.WebSocket;
  const tick = () => new Promise((resolve) => setTimeout(resolve, 0));
  const waitFor = async (condition) => {
    for (let i = 0; i < 2000 && !condition(); i++) await tick();
    if (!condition()) throw new Error("timed out");
  };
  const plain = (data) => (data instanceof Uint8Array ? { bytes: Array.from(data) } : data);
  const results = [];
  try {
    for (const scenario of scenarios) {
      const log = [];
      const sockets = [];
      window.WebSocket = class {
        constructor(url, protocols) {
          this.protocol = protocols.includes("tether.v1") ? "tether.v1" : "";
          this.readyState = 0;
          this.helloSent = false;
          sockets.push(this);
          Promise.resolve().then(() => { this.readyState = 1; this.onopen({}); });
        }
        send(text) {
          const frame = JSON.parse(text);
          if (frame.type === "hello") this.helloSent = true;
          log.push(frame.type === "hello" ? ["hello", frame.last_seq]
                   : frame.type === "ack" ? ["ack", frame.seq] : ["sent", frame.type]);
        }
        close(code, reason) {
          if (this.readyState === 3) return;
          this.readyState = 3;
          Promise.resolve().then(() => this.onclose({ code: code ?? 1005, reason: reason ?? "" }));
        }
      };
      const client = new TetherClient("ws://scripted/ws", {
        clientId: "alice", lastSeq: scenario.lastSeq, ackEvery: 1, ackIntervalMs: 0,
        backoffBase: 1, backoffMax: 1,
      });
      client.addEventListener("message", (e) =>
        log.push(["msg", e.detail.seq, e.detail.id, plain(e.detail.data)]));
      client.addEventListener("lost", (e) =>
        log.push(["lost", e.detail.count, e.detail.ranges, e.detail.reset]));
      client.addEventListener("error", (e) => log.push(["error", e.detail.code]));
      client.connect().catch(() => {});
      for (let i = 0; i < scenario.connections.length; i++) {
        await waitFor(() => client.state === "closed" || (sockets[i] && sockets[i].helloSent));
        if (client.state === "closed") break;
        const ws = sockets[i];
        for (const raw of scenario.connections[i]) {
          if (ws.readyState !== 1) break;
          ws.onmessage({ data: raw });
        }
        if (ws.readyState === 1) { ws.readyState = 3; ws.onclose({ code: 1006, reason: "" }); }
        await waitFor(() => client.state !== "connected");
      }
      client.close();
      results.push({ log, lastSeq: client.lastSeq, duplicates: client.counters.duplicates });
    }
  } finally {
    window.WebSocket = realWebSocket;
  }
  return results;
}
"""

_B64_SAMPLES = ["", "AAEC", "AAE=", "AA==", "/+8=", "AAE", "A===", "@@@@", "AA AA"]


def python_reference(last_seq: int, connections: list[list[str]]) -> dict[str, Any]:
    """What `tether.protocol.ClientProtocol` makes of the same script (acks due at once)."""
    cp = protocol.ClientProtocol("alice", last_seq=last_seq, ack_every=1, ack_interval=0)
    log: list[list[Any]] = []
    for frames in connections:
        log.append(["hello", json.loads(cp.hello())["last_seq"]])
        for raw in frames:
            try:
                events = cp.receive(raw, 0.0)
            except protocol.ProtocolError as error:
                log.append(["error", error.code])
                return {"log": log, "lastSeq": cp.last_seq, "duplicates": cp.duplicates}
            for event in events:
                if isinstance(event, protocol.Received):
                    data = (
                        {"bytes": list(event.data)} if isinstance(event.data, bytes) else event.data
                    )
                    log.append(["msg", event.seq, event.id, data])
                elif isinstance(event, protocol.Lost):
                    log.append(["lost", event.count, [list(r) for r in event.ranges], event.reset])
            ack = cp.ack_due(0.0)
            if ack is not None:
                log.append(["ack", json.loads(ack)["seq"]])
        cp.close()
    return {"log": log, "lastSeq": cp.last_seq, "duplicates": cp.duplicates}


def random_scenario(rng: random.Random) -> dict[str, Any]:
    """Connections of plausible (and now and then broken) server frames, built while a Python
    ClientProtocol follows along so that seqs land near the client's position."""
    last_seq = rng.choice([0, 0, 0, 3, 9])
    cp = protocol.ClientProtocol("alice", last_seq=last_seq, ack_every=1, ack_interval=0)
    connections: list[list[str]] = []
    for _ in range(rng.randint(1, 4)):
        cp.hello()
        frames: list[str] = []
        position = cp.last_seq
        if rng.random() < 0.03:
            frames.append('{"type":"msg","seq":1,"id":"early","data":null}')  # before welcome
        acked = max(
            0, rng.choice([0, position, position, position + rng.randint(1, 3), position - 2])
        )
        next_seq = acked + 1 + rng.randint(0, 6)
        ranges: list[list[int]] = []
        seq = acked + 1
        while seq < next_seq:
            if rng.random() < 0.3:
                end = min(next_seq - 1, seq + rng.randint(0, 1))
                ranges.append([seq, end])
                seq = end + 2
            else:
                seq += 1
        welcome: dict[str, Any] = {
            "type": "welcome",
            "session": "s",
            "resumed": not ranges,
            "next_seq": next_seq,
            "acked": acked,
            "lost": sum(b - a + 1 for a, b in ranges) + rng.choice([0, 0, 0, 1]),
            "lost_ranges": ranges,
            "reset": rng.random() < 0.1,
        }
        if rng.random() < 0.04:
            welcome["acked"] = next_seq  # invalid: acked must be below next_seq
        frames.append(json.dumps(welcome))
        try:
            for raw in frames:
                cp.receive(raw, 0.0)
        except protocol.ProtocolError:
            connections.append(frames)
            break
        for i in range(rng.randint(0, 8)):
            last = cp.last_seq
            kind = rng.random()
            if kind < 0.6:
                seq_value: int | None = last + 1
            elif kind < 0.75:
                seq_value = last + rng.randint(2, 4)  # a gap
            elif kind < 0.9:
                seq_value = max(1, last - rng.randint(0, 2))  # a duplicate
            else:
                seq_value = None  # non-critical
            msg: dict[str, Any] = {"type": "msg", "id": f"m{i}", "data": {"i": i}}
            if seq_value is not None:
                msg["seq"] = seq_value
            if rng.random() < 0.15:
                msg["enc"] = "base64"
                msg["data"] = rng.choice(_B64_SAMPLES)
            elif rng.random() < 0.02:
                msg["enc"] = "hex"
            raw = json.dumps(msg)
            frames.append(raw)
            try:
                cp.receive(raw, 0.0)
            except protocol.ProtocolError:
                break  # the client stops here: this is the script's last frame
            cp.ack_due(0.0)
        connections.append(frames)
        if cp.state is protocol.ConnectionState.CLOSED:
            break
        cp.close()
    return {"lastSeq": last_seq, "connections": connections}


SPEC_SCENARIOS: list[dict[str, Any]] = [
    # protocol.md §9.2-9.3: drop, then resume with loss; the loss is never reported twice
    {
        "lastSeq": 0,
        "connections": [
            [
                '{"type":"welcome","session":"s","resumed":true,"next_seq":1}',
                '{"type":"msg","seq":1,"id":"a","data":1}',
                '{"type":"msg","seq":2,"id":"b","data":2}',
                '{"type":"msg","seq":3,"id":"c","data":3}',
            ],
            [
                '{"type":"welcome","session":"s","resumed":false,"next_seq":7,"acked":3,'
                '"lost":2,"lost_ranges":[[4,5]],"reset":false}',
            ],
            [
                '{"type":"welcome","session":"s","resumed":false,"next_seq":7,"acked":3,'
                '"lost":2,"lost_ranges":[[4,5]],"reset":false}',
                '{"type":"msg","seq":6,"id":"f","data":6}',
            ],
        ],
    },
    # §9.4 a gap in the stream, then a duplicate and a non-critical message
    {
        "lastSeq": 6,
        "connections": [
            [
                '{"type":"welcome","session":"s","resumed":true,"next_seq":7,"acked":6}',
                '{"type":"msg","seq":7,"id":"g","data":7}',
                '{"type":"msg","seq":9,"id":"i","data":9}',
                '{"type":"msg","seq":9,"id":"i","data":9}',
                '{"type":"msg","id":"n","data":{"typing":true}}',
            ]
        ],
    },
    # §9.5 reset, §9.6 a fresh client joining, a stale position told what it missed
    {
        "lastSeq": 9,
        "connections": [
            [
                '{"type":"welcome","session":"s2","resumed":false,"next_seq":12,"acked":9,'
                '"reset":true}',
                '{"type":"msg","seq":10,"id":"j","data":10}',
                '{"type":"msg","seq":11,"id":"k","enc":"base64","data":"AAEC"}',
            ]
        ],
    },
    {
        "lastSeq": 0,
        "connections": [
            [
                '{"type":"welcome","session":"s","resumed":true,"next_seq":43,"acked":40}',
                '{"type":"msg","seq":41,"id":"x","data":41}',
            ]
        ],
    },
    {
        "lastSeq": 5,
        "connections": [
            [
                '{"type":"welcome","session":"s","resumed":true,"next_seq":10,"acked":8,'
                '"lost":1,"lost_ranges":[[9,9]]}',
            ]
        ],
    },
    # the server breaks the protocol: invalid base64, then a second welcome
    {
        "lastSeq": 0,
        "connections": [
            [
                '{"type":"welcome","session":"s","resumed":true,"next_seq":1}',
                '{"type":"msg","seq":1,"id":"a","enc":"base64","data":"AAE"}',
            ]
        ],
    },
    {
        "lastSeq": 0,
        "connections": [
            [
                '{"type":"welcome","session":"s","resumed":true,"next_seq":1}',
                '{"type":"welcome","session":"s","resumed":true,"next_seq":1}',
            ]
        ],
    },
]


async def test_js_client_makes_what_client_protocol_makes_of_the_same_frames(
    browser: Browser,
) -> None:
    """Differential: for the spec's worked examples and 300 random scripts, the JS client
    sends the same hellos and acks and tells the application the same messages and losses
    as the Python reference `ClientProtocol`."""
    rng = random.Random(20240607)
    scenarios = SPEC_SCENARIOS + [random_scenario(rng) for _ in range(300)]
    hub = Hub(HubConfig())
    async with hub, BackgroundServer(create_app(hub)) as server:
        page = await open_page(browser, server)
        results = await page.evaluate(RUN_SCRIPTED, scenarios)
    assert len(results) == len(scenarios)
    for scenario, result in zip(scenarios, results, strict=True):
        expected = python_reference(scenario["lastSeq"], scenario["connections"])
        assert result == expected, scenario
    kinds = {entry[0] for result in results for entry in result["log"]}
    assert kinds == {"hello", "ack", "msg", "lost", "error"}  # the scripts cover every path
    first = results[0]["log"]
    assert ["lost", 2, [[4, 5]], False] in first and first.count(["lost", 2, [[4, 5]], False]) == 1
    assert page.js_errors == []  # type: ignore[attr-defined]


async def test_the_browser_example_runs_as_written(browser: Browser) -> None:
    """`python examples/browser/serve.py --port N`: the page connects and shows the ticks."""
    root = ROOT
    with socket.socket() as probe:  # a free port for the example's own uvicorn
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "examples/browser/serve.py",
        "--port",
        str(port),
        cwd=root,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        page = await browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        async with asyncio.timeout(15):
            while True:  # until the server listens
                try:
                    await page.goto(f"http://127.0.0.1:{port}/")
                    break
                except PlaywrightError:
                    assert process.returncode is None, await process.stderr.read()  # type: ignore[union-attr]
                    await asyncio.sleep(0.1)
        assert await page.evaluate("() => document.compatMode") == "CSS1Compat"
        await page.wait_for_function(
            "() => document.getElementById('state').dataset.state === 'connected'"
            " && Number(document.getElementById('received').textContent) >= 2",
            timeout=10_000,
        )
        first = await page.locator("#messages li").last.text_content()
        assert first is not None and '#1  {"n":1,"text":"tick 1"}' in first
        await page.click("#drop")  # the page drops the connection; the client resumes
        await page.wait_for_function(
            "() => Number(document.getElementById('reconnects').textContent) >= 1"
            " && document.getElementById('state').dataset.state === 'connected'",
            timeout=10_000,
        )
        assert await page.locator("#losses li").count() == 0
        assert errors == []
    finally:
        process.terminate()
        await process.wait()
