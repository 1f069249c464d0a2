"""Where the Redis backend keeps what: the key layout, and the groups a batch is split into.

Per client ("#" ends the client id: no client id contains one, so no client's key names
another's; the hash tag is the client's bucket, so a script may touch many clients of one
bucket at once and each bucket lives in one Redis Cluster slot):

    {prefix}:{b<n>}:<cid>#m       Hash: the stream's state (epoch, last seq, acked, attached;
                                  see `redis_scripts`)
    {prefix}:{b<n>}:<cid>#o       Stream, entry id "<seq>-0": the unacked critical messages
    {prefix}:{b<n>}:<cid>#d:<k>   String, PX dedup_window: an accepted dedup key
    {prefix}:{b<n>}:<cid>#x       List of dead letters (JSON), newest first, LTRIM'd
    {prefix}:{b<n>}:<cid>#p       String, PX presence_ttl: the node holding the connection,
                                  or "~<node>" once that node let it go (a tombstone)
    {prefix}:{b<n>}:<cid>#c       String, PX presence_ttl: the last claim ("<token>|<the
                                  holder it replaced>"), so that a re-run claim kicks it

Per deployment:

    {prefix}:clients              ZSET client id -> last seen (wall seconds): `members(None)`
    {prefix}:group:<name>         SET of client ids: `members(group)`

Pub/sub channels and their message formats are in `redis_wire`.

A client's meta hash and stream always carry the same expiry, at least `client_ttl` past
its last activity and at least as long as its longest-lived pending message, so no part of
a client's state expires while a message is pending for it.
"""

from __future__ import annotations

from collections.abc import Hashable

import xxhash

BUCKETS = 128  # fixed: part of the key layout; more buckets, smaller batches per slot


def bucket_of(client_id: str) -> int:
    """The client's bucket: stable across processes and versions (xxh32)."""
    return int(xxhash.xxh32_intdigest(client_id.encode("utf-8"))) % BUCKETS


class RedisKeys:
    """Key names under one prefix."""

    __slots__ = ("_clients", "clients", "prefix")

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.clients = f"{prefix}:clients"
        # hot: every stream write names its client's base key (as text, or UTF-8 in a
        # binary-packed script item) and, on a Cluster, its bucket
        self._clients: dict[str, tuple[str, bytes, int]] = {}

    def _client(self, client_id: str) -> tuple[str, bytes, int]:
        if len(self._clients) >= 100_000:  # bounded; rebuilt on demand
            self._clients.clear()
        bucket = bucket_of(client_id)
        base = f"{self.prefix}:{{b{bucket}}}:{client_id}"
        entry = self._clients[client_id] = (base, base.encode("utf-8"), bucket)
        return entry

    def base(self, client_id: str) -> str:
        return (self._clients.get(client_id) or self._client(client_id))[0]

    def base_bytes(self, client_id: str) -> bytes:
        """`base` encoded as UTF-8 (as a binary-packed script item carries it)."""
        return (self._clients.get(client_id) or self._client(client_id))[1]

    def bucket(self, client_id: str) -> int:
        """`bucket_of(client_id)`, remembered."""
        return (self._clients.get(client_id) or self._client(client_id))[2]

    def meta(self, client_id: str) -> str:
        return self.base(client_id) + "#m"

    def out(self, client_id: str) -> str:
        return self.base(client_id) + "#o"

    def dedup(self, client_id: str, key: str) -> str:
        return f"{self.base(client_id)}#d:{key}"

    def dead(self, client_id: str) -> str:
        return self.base(client_id) + "#x"

    def presence(self, client_id: str) -> str:
        return self.base(client_id) + "#p"

    def claim(self, client_id: str) -> str:
        return self.base(client_id) + "#c"

    def slot_key(self, group: Hashable) -> str:
        """The key a script call over one batch group declares: on a Cluster it routes
        the call to the node of the group's slot, where every client key it touches lives."""
        return f"{self.prefix}:{{b{group}}}"

    def group(self, name: str) -> str:
        return f"{self.prefix}:group:{name}"

    def node_channel(self, node_id: str) -> str:
        return f"{self.prefix}:node:{node_id}"

    @property
    def broadcast_channel(self) -> str:
        return f"{self.prefix}:broadcast"
