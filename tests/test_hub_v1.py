"""tether.v1 semantics in the hub, with mock transports: seqs, acks, resume, loss, reset."""

from __future__ import annotations

import pytest

from tether import Hub, HubConfig, SendStatus
from tether.clock import ManualClock
from tether.protocol import Hello, ProtocolError
from tether.testing import MockWebSocket


async def connect_v1(hub: Hub, client_id: str, last_seq: int = 0) -> tuple[MockWebSocket, dict]:
    ws = MockWebSocket(name=client_id)
    welcome = await hub.connect(client_id, ws, hello=Hello(client_id, last_seq))
    assert welcome is not None
    assert ws.frames[0]["type"] == "welcome"
    return ws, ws.frames[0]


async def test_critical_messages_are_numbered_and_held_until_acked(hub: Hub) -> None:
    ws, welcome = await connect_v1(hub, "alice")
    assert welcome["next_seq"] == 1 and welcome.get("lost", 0) == 0
    for n in range(3):
        result = await hub.send("alice", {"n": n}, critical=True)
        assert result.status is SendStatus.SENT and result.seq == n + 1
    await hub.send("alice", "chatter")  # best-effort: no seq, not retained
    assert ws.seqs() == [1, 2, 3]
    assert [f.get("seq") for f in ws.frames[1:]] == [1, 2, 3, None]
    assert hub.pending("alice") == 3  # written but not acknowledged
    assert await hub.ack("alice", 2) == 2
    assert hub.pending("alice") == 1
    delivered = hub.metrics.snapshot().to_dict()["messages"]["delivered"]
    assert delivered == 3  # two acked + the best-effort one


async def test_ack_beyond_what_was_written_is_a_protocol_error(hub: Hub) -> None:
    await connect_v1(hub, "alice")
    await hub.send("alice", "one", critical=True)
    with pytest.raises(ProtocolError) as excinfo:
        await hub.ack("alice", 5)
    assert excinfo.value.code == "invalid_ack"


async def test_resume_resends_unacked_in_order(hub: Hub) -> None:
    ws, _ = await connect_v1(hub, "alice")
    for n in range(5):
        await hub.send("alice", n, critical=True)
    await hub.ack("alice", 2)
    ws.drop()
    await hub.disconnect("alice", transport=ws)
    await hub.send("alice", 5, critical=True)  # queued while away
    again, welcome = await connect_v1(hub, "alice", last_seq=3)  # the client had seen 3
    assert welcome["resumed"] is True and welcome.get("lost", 0) == 0
    assert again.seqs() == [4, 5, 6]
    assert again.data() == [3, 4, 5]


async def test_resume_reports_expired_messages_as_lost(hub: Hub, clock: ManualClock) -> None:
    _ws, _ = await connect_v1(hub, "alice")
    await hub.send("alice", "a", critical=True)
    await hub.ack("alice", 1)
    await hub.disconnect("alice")
    await hub.send("alice", "b", critical=True, ttl=5)
    await hub.send("alice", "c", critical=True, ttl=5)
    await hub.send("alice", "d", critical=True, ttl=500)
    clock.advance(10)
    await hub.retry_now()
    again, welcome = await connect_v1(hub, "alice", last_seq=1)
    assert welcome["resumed"] is False
    assert welcome["lost"] == 2 and welcome["lost_ranges"] == [[2, 3]]
    assert again.seqs() == [4]


async def test_restarted_memory_hub_says_reset_instead_of_skipping(clock: ManualClock) -> None:
    """A new in-memory hub knows nothing of the client's stream: it must say so."""
    hub = Hub(HubConfig(), clock=clock)
    await hub.send("alice", "queued after restart 1", critical=True)
    await hub.send("alice", "queued after restart 2", critical=True)
    ws, welcome = await connect_v1(hub, "alice", last_seq=1)  # a seq from the old hub
    assert welcome["reset"] is True and welcome["resumed"] is False
    # Numbering continues after the client's last_seq, so nothing looks like a duplicate.
    assert ws.seqs() == [2, 3]
    assert ws.data() == ["queued after restart 1", "queued after restart 2"]
    await hub.shutdown()


async def test_fresh_client_after_earlier_session_acked_everything(hub: Hub) -> None:
    _ws, _ = await connect_v1(hub, "alice")
    for n in range(3):
        await hub.send("alice", n, critical=True)
    await hub.ack("alice", 3)
    await hub.disconnect("alice")
    _, welcome = await connect_v1(hub, "alice", last_seq=0)  # e.g. a reloaded page
    assert welcome.get("lost", 0) == 0 and welcome["acked"] == 3


async def test_shutdown_waits_for_acks_of_v1_clients(clock: ManualClock) -> None:
    hub = Hub(HubConfig(), clock=clock)
    _ws, _ = await connect_v1(hub, "alice")
    await hub.disconnect("alice")
    for n in range(3):
        await hub.send("alice", n, critical=True)
    ws2, _ = await connect_v1(hub, "alice")  # resend: written, not yet acked
    assert ws2.seqs() == [1, 2, 3]

    import asyncio

    async def ack_soon() -> None:
        await asyncio.sleep(0)
        await hub.ack("alice", 3)

    acker = asyncio.create_task(ack_soon())
    stats = await hub.shutdown(timeout=5.0)
    await acker
    assert stats.pending_messages_flushed == 3 and stats.pending_messages_dropped == 0
    assert ws2.close_code == 1001


async def test_unencodable_payloads_are_rejected_without_tripping_the_breaker(hub: Hub) -> None:
    ws, _ = await connect_v1(hub, "alice")
    for bad in ("lone \ud800 surrogate", {"set": {1, 2}}, object()):
        result = await hub.send("alice", bad, critical=True)
        assert result.status is SendStatus.REJECTED and result.reason
    assert hub.circuit_state("alice").value == "closed"
    assert (await hub.send("alice", "fine", critical=True)).status is SendStatus.SENT
    assert ws.data() == ["fine"]
    assert hub.metrics.snapshot().to_dict()["messages"]["rejected"] == 3
