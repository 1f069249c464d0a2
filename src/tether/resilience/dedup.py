"""Per-client duplicate detection in a sliding time window, O(1) per check."""

from __future__ import annotations

from collections import OrderedDict

import xxhash

from ..clock import Clock


def content_key(encoded: bytes | str) -> str:
    """The dedup key of a payload by content: xxh3-128 of its encoded bytes."""
    data = encoded.encode() if isinstance(encoded, str) else encoded
    return "h:" + xxhash.xxh3_128_hexdigest(data)


class DedupWindow:
    """Keys accepted for one client in the last `window` seconds, at most `max_entries`.

    Every key lives exactly `window` seconds, so insertion order is expiry order: expired
    keys are evicted from the front as they come due, and a check never scans the table.
    """

    __slots__ = ("_clock", "_keys", "max_entries", "window")

    def __init__(self, window: float, max_entries: int, clock: Clock) -> None:
        self.window = window
        self.max_entries = max_entries
        self._clock = clock
        self._keys: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def seen(self, key: str) -> bool:
        now = self._clock.now()
        self._evict(now)
        expires = self._keys.get(key)
        return expires is not None and expires > now

    def record(self, key: str) -> None:
        """Remember `key`; call only once the message has been accepted."""
        keys = self._keys
        keys[key] = self._clock.now() + self.window
        keys.move_to_end(key)
        while len(keys) > self.max_entries:
            keys.popitem(last=False)

    def forget(self, key: str) -> None:
        self._keys.pop(key, None)

    def _evict(self, now: float) -> None:
        keys = self._keys
        while keys:
            first = next(iter(keys))
            if keys[first] > now:
                return
            del keys[first]
