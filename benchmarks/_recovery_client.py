"""Client process for the `recovery` benchmark: a tether.Client that leaves, then resumes from its
last seq and drains the backlog; reports the timings as JSON lines."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from benchmarks._common import emit, next_command, read_commands
from tether.client import Client


async def main(config: dict[str, Any]) -> None:
    commands = await read_commands()
    url, backlog = config["url"], int(config["backlog"])
    for _ in range(int(config["rounds"])):
        command = await next_command(commands, timeout=300)
        if command.get("cmd") != "join":
            return
        client_id = command["client_id"]
        async with Client(url, client_id=client_id, ping_interval=None) as client:
            emit({"event": "joined"})
            async for _msg in client:  # the one live message, then leave (acked on close)
                break
            last_seq = client.last_seq
        emit({"event": "left", "last_seq": last_seq})
        command = await next_command(commands, timeout=300)
        if command.get("cmd") != "resume":
            return
        t0 = time.monotonic()
        received = 0
        client = Client(url, client_id=client_id, last_seq=last_seq, ping_interval=None)
        async with client:
            t_welcome = time.monotonic()
            async for _msg in client:
                received += 1
                if received >= backlog:
                    break
            t_last = time.monotonic()
            lost, duplicates = client.lost, client.duplicates
        emit(
            {
                "event": "resumed",
                "t0": t0,
                "welcome_s": t_welcome - t0,
                "total_s": t_last - t0,
                "received": received,
                "lost": lost,
                "duplicates": duplicates,
            }
        )


if __name__ == "__main__":
    cfg = json.loads(sys.argv[1])
    if cfg.get("uvloop", True):
        import uvloop

        uvloop.run(main(cfg))
    else:
        asyncio.run(main(cfg))
