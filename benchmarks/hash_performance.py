"""Benchmark: xxh3-64 / xxh3-128 (Tether's dedup hash) against SHA-256 at 64 B, 1 KiB and 16 KiB."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Any

import xxhash

from tether.resilience import content_key

from ._common import Result, check, cli_main, make_result, rnd, timeit_ns

NAME = "hash_performance"
SIZES = (64, 1024, 16 * 1024)


def run(quick: bool = False) -> Result:
    """ns per hash for xxh3-64, xxh3-128 and SHA-256; the SHA-256 / xxh3 ratio."""
    repeat = 3 if quick else 7
    budget = 2_000_000 if quick else 20_000_000  # bytes hashed per repetition
    rows: list[dict[str, Any]] = []
    targets: dict[str, dict[str, Any]] = {}
    for size in SIZES:
        data = os.urandom(size)
        ns: dict[str, Any] = {"data": data, "xxhash": xxhash, "hashlib": hashlib, "ck": content_key}
        number = max(200, budget // size)
        x64 = timeit_ns("xxhash.xxh3_64_digest(data)", ns, number=number, repeat=repeat)
        x128 = timeit_ns("xxhash.xxh3_128_digest(data)", ns, number=number, repeat=repeat)
        sha = timeit_ns("hashlib.sha256(data).digest()", ns, number=number, repeat=repeat)
        key = timeit_ns("ck(data)", ns, number=number, repeat=repeat)
        ratio64 = sha["median_ns"] / x64["median_ns"]
        ratio128 = sha["median_ns"] / x128["median_ns"]
        rows.append(
            {
                "size_bytes": size,
                "xxh3_64_ns": rnd(x64["median_ns"]),
                "xxh3_128_ns": rnd(x128["median_ns"]),
                "sha256_ns": rnd(sha["median_ns"]),
                "content_key_ns": rnd(key["median_ns"]),
                "sha256/xxh3_64": rnd(ratio64),
                "sha256/xxh3_128": rnd(ratio128),
                "xxh3_128_GB_s": rnd(size / x128["median_ns"]),
                "loop_ns": rnd(x64["loop_ns"]),
            }
        )
        targets[f"speedup_xxh3_128_vs_sha256_{size}B"] = check(
            ratio128,
            unit="x",
            target=3.0,
            goal=5.0,
            higher_is_better=True,
            note="content_key uses xxh3-128",
        )
    params = {"quick": quick, "repeat": repeat, "sizes": list(SIZES), "bytes_per_rep": budget}
    return make_result(NAME, params, rows, targets)


def main(argv: Sequence[str] | None = None) -> None:
    cli_main(NAME, run, argv)


if __name__ == "__main__":
    main()
