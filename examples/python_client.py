"""Resumable Python client. Run: python examples/python_client.py [--url URL] [--id alice]

Start examples/websockets_server.py first. Stop and restart the server while this runs:
the client reconnects with backoff, resumes where it left off, and prints each tick
once, in order; messages that could not be kept are reported as lost. Across a restart
that holds when the server keeps its queue (TETHER_BACKEND=sqlite or redis); on the
default memory backend the queue dies with the process and the resume reports a reset.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

from tether.client import Client, Lost


async def main(url: str, client_id: str, count: int | None) -> None:
    async with Client(url, client_id=client_id) as client:

        def on_lost(lost: Lost) -> None:
            what = "server state was reset" if lost.reset else f"seqs {list(lost.ranges)}"
            print(f"lost {lost.count} message(s): {what}")

        client.on_lost(on_lost)
        print(f"connected to {url} as {client_id}")
        received = 0
        async for msg in client:
            print(
                f"seq={msg.seq} id={msg.id} data={msg.data!r}  [{client.state.value}, "
                f"reconnects={client.reconnects}]"
            )
            received += 1
            if count is not None and received >= count:
                break


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="ws://127.0.0.1:8765/")
    parser.add_argument("--id", default="alice")
    parser.add_argument("--count", type=int, default=None, help="stop after this many messages")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(args.url, args.id, args.count))
