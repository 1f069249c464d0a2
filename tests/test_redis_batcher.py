"""The Redis write batcher on its own: every submission's replies come back in order, whatever the pipeline splits."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Hashable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.backends.base import BackendError, OutcomeUnknown
from tether.backends.redis_batch import PIPELINE_ITEMS, Request, StreamBatcher


class EchoRedis:
    """A runner that answers each item with `reply:<item>`, as a script would: one reply per
    item, in order. Records the pipelines it was given."""

    def __init__(self) -> None:
        self.pipelines: list[list[Request]] = []

    async def run(self, requests: list[Request]) -> list[Any]:
        self.pipelines.append(requests)
        await asyncio.sleep(0)  # a round trip: the next turn's submissions queue meanwhile
        replies = []
        for request in requests:
            items = request.items.split(";")[:-1]  # each test item ends with ";"
            replies.append([f"{request.group}:{item.split('|')[-1]}" for item in items])
        return replies


async def _never(requests: list[Request]) -> list[Any]:
    """A runner whose pipelines are sent and never answered (a hung connection)."""
    await asyncio.Event().wait()
    return []


def _items(tag: str, count: int) -> list[str]:
    return [f"{tag}.{i};" for i in range(count)]


submissions = st.lists(
    st.tuples(
        st.sampled_from(["one", "group", "mixed"]),
        st.integers(min_value=1, max_value=3 * PIPELINE_ITEMS),
        st.booleans(),  # with a shared payload
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=60, deadline=None)
@given(submissions)
def test_every_submission_gets_its_own_replies_in_order(plan: list[tuple[str, int, bool]]) -> None:
    async def scenario() -> None:
        redis = EchoRedis()
        batcher = StreamBatcher(redis.run, max_in_flight=2)
        futures: list[tuple[asyncio.Future[Any], list[str]]] = []
        for n, (kind, count, shared) in enumerate(plan):
            payload = f"payload{n}".encode() if shared else None
            texts = _items(f"s{n}", 1 if kind == "one" else count)
            if kind == "one":
                future: asyncio.Future[Any] = batcher.submit_one("append", 0, texts[0], payload)
                futures.append((future, [f"0:{texts[0][:-1]}"]))
            elif kind == "group":
                future = batcher.submit_group("append", 0, texts, payload)
                futures.append((future, [f"0:{t[:-1]}" for t in texts]))
            else:  # groups alternate in stretches, as a Cluster's nodes would
                groups: list[Hashable] = [f"g{(i // 5) % 3}" for i in range(len(texts))]
                future = batcher.submit("append", list(zip(groups, texts, strict=True)), payload)
                futures.append(
                    (future, [f"{g}:{t[:-1]}" for g, t in zip(groups, texts, strict=True)])
                )
        for future, expected in futures:
            reply = await asyncio.wait_for(future, 30)  # a lost reply fails, never hangs
            assert (reply if isinstance(reply, list) else [reply]) == expected
        for requests in redis.pipelines:
            per_group: dict[Hashable, int] = {}
            for request in requests:
                per_group[request.group] = per_group.get(request.group, 0) + request.items.count(
                    ";"
                )
            assert all(items <= PIPELINE_ITEMS for items in per_group.values())
            for request in requests:  # a shared payload travels once per call
                names = re.findall(rb"payload\d", request.payloads)
                assert len(names) == len(set(names))
        await batcher.close()

    asyncio.run(scenario())


async def test_a_failed_pipeline_fails_each_of_its_submissions_once() -> None:
    async def broken(requests: list[Request]) -> list[Any]:
        raise ConnectionError("connection reset")

    batcher = StreamBatcher(broken)
    one = batcher.submit_one("append", 0, "a;")
    many = batcher.submit_group("append", 0, _items("b", PIPELINE_ITEMS + 3))
    for future in (one, many):  # sent, so maybe run: never "certainly not stored"
        with pytest.raises(OutcomeUnknown, match="connection reset"):
            await asyncio.wait_for(future, 30)
    await batcher.close()


async def test_a_reply_of_the_wrong_length_is_an_unknown_outcome_not_a_hang() -> None:
    async def short(requests: list[Request]) -> list[Any]:
        return [["only one"] for _ in requests]

    batcher = StreamBatcher(short)
    future = batcher.submit_group("append", 0, _items("c", 3))
    with pytest.raises(OutcomeUnknown, match="bad reply"):  # three items, one reply
        await asyncio.wait_for(future, 30)
    await batcher.close()


async def test_close_fails_what_is_still_queued() -> None:
    batcher = StreamBatcher(_never, max_in_flight=1)
    first = batcher.submit_one("append", 0, "a;")
    await asyncio.sleep(0)  # the first pipeline is in flight and never answers
    await asyncio.sleep(0)
    queued = batcher.submit_one("append", 0, "b;")
    await batcher.close()
    for future in (first, queued):
        with pytest.raises(BackendError):  # a regression fails, never hangs
            await asyncio.wait_for(future, 30)


async def test_a_batch_split_over_pipelines_is_unknown_when_one_of_them_is_refused() -> None:
    """The first pipeline runs, the second is refused before it was sent: the submission's
    outcome is unknown (part of it may be stored), never a plain failure."""
    calls = 0

    async def second_refused(requests: list[Request]) -> list[Any]:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise BackendError("fail-fast window: not sent")
        return [["ok"] * (request.items.count(";")) for request in requests]

    batcher = StreamBatcher(second_refused, max_in_flight=4)
    future = batcher.submit_group("append", 0, _items("d", PIPELINE_ITEMS + 1))
    with pytest.raises(OutcomeUnknown, match="may have run"):  # half of it was refused
        await asyncio.wait_for(future, 30)
    single = batcher.submit_one("append", 0, "e;")  # not split: answered as it is
    assert await asyncio.wait_for(single, 30) == "ok"
    await batcher.close()


@pytest.mark.parametrize("nodes", [1, 3])
async def test_many_senders_are_answered_in_two_halves_so_two_batches_overlap(nodes: int) -> None:
    """100 senders awaiting one store each: the first half hears back first and its next
    pipeline goes out while the second half still waits, so Redis stores one batch while
    this process prepares the other, instead of each idling in turn. On a Cluster (three
    key groups, one call each) the senders of all nodes count together."""
    progress = [0] * 100  # stores each sender has heard back from
    answered_when_sent: list[int] = []  # senders answered at least once, per pipeline
    redis = EchoRedis()
    run = redis.run

    async def recording_run(requests: list[Request]) -> list[Any]:
        answered_when_sent.append(sum(1 for done in progress if done))
        return await run(requests)

    batcher = StreamBatcher(recording_run)

    async def sender(number: int) -> None:
        for round_ in range(3):
            item, group = f"p{number}.{round_};", number % nodes
            reply = await batcher.submit_one("append", group, item)
            assert reply == f"{group}:{item[:-1]}"
            progress[number] += 1

    await asyncio.wait_for(asyncio.gather(*(sender(n) for n in range(100))), 30)
    assert progress == [3] * 100
    sizes = [sum(r.items.count(";") for r in requests) for requests in redis.pipelines]
    assert sizes[0] == 100
    # The second pipeline went out while some senders still waited for their first
    # reply, and it holds exactly the senders answered by then: two batches overlap.
    assert answered_when_sent[1] == sizes[1] < 100
    assert sum(sizes) == 300


async def test_a_cluster_pipeline_holds_a_full_call_for_each_node() -> None:
    """A broadcast over three nodes goes out in as few pipelines as one node's share
    needs: each node's call fills up to PIPELINE_ITEMS, not a third of it each."""
    redis = EchoRedis()
    batcher = StreamBatcher(redis.run)
    texts = _items("b", 3 * PIPELINE_ITEMS)
    groups: list[Hashable] = [f"node{i % 3}" for i in range(len(texts))]
    future = batcher.submit("append", list(zip(groups, texts, strict=True)))
    replies = await asyncio.wait_for(future, 30)
    assert replies == [f"{g}:{t[:-1]}" for g, t in zip(groups, texts, strict=True)]
    assert len(redis.pipelines) == 1
    assert sorted(r.items.count(";") for r in redis.pipelines[0]) == [PIPELINE_ITEMS] * 3


async def test_close_hands_out_replies_still_held_for_the_second_half() -> None:
    """Replies held back for the second half of many senders are stored successes: a
    close right after the pipeline answered gives them out, it does not fail them."""
    redis = EchoRedis()
    batcher = StreamBatcher(redis.run)
    futures = [batcher.submit_one("append", 0, f"s{n};") for n in range(100)]
    await asyncio.wait_for(futures[0], 30)  # the first half is answered
    await batcher.close()
    assert [f.result() for f in futures] == [f"0:s{n}" for n in range(100)]


async def test_a_burst_goes_out_one_pipeline_per_free_slot_in_order() -> None:
    """A broadcast of four pipelines' worth with two slots: never more than two pipelines
    in flight (Redis answers pipelines that arrive together only together), each sent as
    an earlier one is answered, in order, and every reply still reaches its item."""
    in_flight = 0
    most = 0
    sent: list[str] = []
    redis = EchoRedis()

    async def counting_run(requests: list[Request]) -> list[Any]:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        sent.append(requests[0].items.split(";")[0])
        try:
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            return await redis.run(requests)
        finally:
            in_flight -= 1

    batcher = StreamBatcher(counting_run, max_in_flight=2)
    texts = _items("w", 4 * PIPELINE_ITEMS)
    replies = await asyncio.wait_for(batcher.submit_group("append", 0, texts), 30)
    assert replies == [f"0:{t[:-1]}" for t in texts]
    assert most == 2
    assert sent == [f"w.{n * PIPELINE_ITEMS}" for n in range(4)]  # in order
    await batcher.close()


async def test_close_fails_built_pipelines_still_waiting_for_a_slot() -> None:
    batcher = StreamBatcher(_never, max_in_flight=1)
    future = batcher.submit_group("append", 0, _items("x", 2 * PIPELINE_ITEMS))
    await asyncio.sleep(0)  # one pipeline in flight, the other built and waiting
    await asyncio.sleep(0)
    await batcher.close()
    with pytest.raises(BackendError):  # a regression fails, never hangs
        await asyncio.wait_for(future, 30)


async def test_close_right_after_a_pipeline_was_started_fails_its_senders() -> None:
    """close() in the turn after a pipeline's task was created (before it ran): nothing
    was sent, and the sender hears so instead of waiting forever."""

    batcher = StreamBatcher(_never, max_in_flight=1)
    future = batcher.submit_one("append", 0, "a;")
    await asyncio.sleep(0)  # the batcher's turn: the pipeline's task exists, not started
    await batcher.close()
    with pytest.raises(BackendError, match="closed"):  # a regression fails, never hangs
        await asyncio.wait_for(future, 30)
