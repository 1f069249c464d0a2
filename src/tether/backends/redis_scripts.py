"""The Lua scripts of the Redis backend: every multi-key change to a client's stream, atomically.

Each script works on a batch of clients: one call stores a critical broadcast for every
client of one key group (see `redis_keys`), or every send that arrived in one event-loop
turn. Lua in Redis is 5.1: no `goto`, and a script's error aborts the whole call, so
the scripts check instead of failing.

A stream's state lives in its meta hash (`redis_keys.RedisKeys.meta`):

    e   epoch: the stream's identity, new whenever the stream is created anew (its keys
        had vanished: expiry, a Redis restart without persistence, FLUSHALL) or renumbered
    s   the last seq handed out
    a   the highest cumulative ack
    v   "1" once a tether.v1 client resumed onto this epoch; a hello with last_seq > 0
        for a stream nobody attached to speaks of an older epoch and gets a reset
"""

from __future__ import annotations

# The highest entry id of a stream (0 when it has none): numbering never goes below it.
# keep_alive: a client's keys expire together, at least `keep` ms from now; the meta
# field k remembers the deadline last set, so most writes need no PEXPIRE at all.
# The batched scripts take many clients of one Cluster node per call, from many slots
# (the shebang flag allows that; every key of a call must still live on that node).
_BATCH = "#!lua flags=allow-cross-slot-keys\n"

_TOP = """
local function top_of(out)
  if redis.call('EXISTS', out) == 0 then return 0 end
  local info = redis.call('XINFO', 'STREAM', out)
  for j = 1, #info, 2 do
    if info[j] == 'last-generated-id' then
      return tonumber(string.match(info[j + 1], '^(%d+)'))
    end
  end
  return 0
end
local function keep_alive(keys, keep)
  for _, k in ipairs(keys) do
    local ttl = redis.call('PTTL', k)
    if ttl ~= -2 and ttl < keep then redis.call('PEXPIRE', k, keep) end
  end
end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local function extend(meta, out, k, keep, force)
  if force or k < now + keep then
    local ms = math.floor(keep * 1.25)
    -- never shortened: the stream may hold a message that lives longer than this write
    -- asks (a meta recreated alone, after an eviction, starts with k = 0); both keys
    -- get the later deadline, which k records (the keys expire together)
    local tm, to = redis.call('PTTL', meta), redis.call('PTTL', out)
    if tm > ms then ms = tm end
    if to > ms then ms = to end
    if tm < ms then redis.call('PEXPIRE', meta, ms) end
    if to < ms then redis.call('PEXPIRE', out, ms) end
    redis.call('HSET', meta, 'k', now + ms)
  end
end
"""

# Store critical messages, one per item. Most of a pipeline's cost in Python is packing
# and parsing arguments, so a call's items travel as one string, and a client's keys
# derive from its base key (declared or not, they share the call's slot: see redis_keys).
# KEYS: 1, the call's slot key. ARGV: max_size, policy, dedup_ms, fresh epoch, the payload
#   table (one argument, concatenated; each payload
#   "kind|expires wall ms|created wall ms|id length|data length|" + message id + data),
#   the items (one argument, concatenated), the caller's wall-clock ms (its clock decides
#   what has expired). Each item is binary (`struct`, big-endian: Lua reads its numbers
#   without a string-to-number conversion, a strtod each, which cost more than the rest
#   of the parsing): uint16 payload index, uint8 flags, int64 floor, int64 known, int64
#   keep ms, then the base key and the expected epoch, each as a uint16 length followed
#   by its bytes, and the dedup key as a uint32 length and its bytes ('>HBi8i8i8Hc0Hc0I4c0').
#   flags: 1 = check and record the dedup key; 2 = probe: an earlier attempt to store this
#          message may have succeeded without a reply, so look for its id in the stream
#          first (a scan of the pending entries, only on this rare path); 4 = direct: a
#          plain-mode client connected to the calling node with nothing queued there; if
#          the stream holds nothing beyond the node's mirror, answer 0 (write it, do
#          not store it: an integer, the cheapest reply to send and parse)
#          8 = restore (see `DeliveryPipeline.restore`): record the dedup key without
#          checking it; `floor` is then the copy's seq in the stream it came from and
#          16 = skip it, answering "S", if the stream is still the expected epoch and its
#          acked floor reached that seq (delivered by another node); numbering as for a
#          client connected nowhere
#   floor: numbering continues above it (the highest seq this node's mirror has seen)
#   known: the highest seq this node's mirror holds (-1: no mirror, the client is not
#          connected here); entries between it and the new seq (stored by other nodes)
#          are returned, to keep FIFO
#   expected epoch: the epoch this node's mirror belongs to ('' for none); a different
#          one means the stream was recreated under a connected client, and a counter
#          below `floor` in the same epoch that it was rolled back (a failover lost writes):
#          either way the item says `changed` ('1'; 'r' and the counter found when
#          rolled back)
# Returns per item: "D|seq it was stored with" duplicate, "S" skipped (flag 16), 0 write
# directly, "F" full, the
# seq alone (an integer) when stored with nothing else to say — in the epoch the caller
# expects, or for a client connected nowhere (the common cases: no string to build or
# parse), or
# "seq|changed|epoch|holder" (holder: the presence value when the client is not
# connected here, '' otherwise, so the caller can ring that node) — or {that string,
# evicted entries, gap entries, expired entries} when any is non-empty (expired: found
# past their TTL at the head of a full stream, and removed). A broadcast's payload is
# sent once for all its clients.
APPEND = (
    _BATCH
    + _TOP
    + """
local max, policy, dedup_ms, fresh = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4]
local table_, blob = ARGV[5], ARGV[6]
local hub_now = tonumber(ARGV[7])  -- the caller's clock decides expiry
local payloads = {}
local pos = 1
while pos <= #table_ do
  local kind, x, c, ml, dl, at = string.match(table_,
    '^([^|]*)|(%d+)|(%d+)|(%d+)|(%d+)|()', pos)
  ml, dl = ml + 0, dl + 0
  payloads[#payloads + 1] = {kind, x, c, string.sub(table_, at, at + ml - 1),
                             string.sub(table_, at + ml, at + ml + dl - 1)}
  pos = at + ml + dl
end
local results = {}
local i = 0
local unpack = struct.unpack
local size = #blob
pos = 1
while pos <= size do
  i = i + 1
  local pi, fl, floor, known, keep, base, expect, dkey
  pi, fl, floor, known, keep, base, expect, dkey, pos = unpack('>HBi8i8i8Hc0Hc0I4c0', blob, pos)
  local head = payloads[pi]
  local kind, x, c, mid, data = head[1], head[2], head[3], head[4], head[5]
  local meta, out = base .. '#m', base .. '#o'
  local dflag = fl % 2 == 1
  local direct = math.floor(fl / 4) % 2 == 1
  local restore = math.floor(fl / 8) % 2 == 1
  local prior = false
  local skipped = false
  local dd
  if restore then
    -- a copy its node held when the stream was found recreated or rolled back: not in
    -- the stream (the caller looked), so its dedup key, which may have outlived the
    -- stream, is recorded anew, not checked. Delivered meanwhile (an ack in the epoch it
    -- came from reached its old seq, the floor field): skipped.
    if math.floor(fl / 16) % 2 == 1 then
      local ea = redis.call('HMGET', meta, 'e', 'a')
      if ea[1] == expect and (ea[2] or 0) + 0 >= floor then skipped = true end
    end
    floor, expect = 0, ''
    if dflag then dd = base .. '#d:' .. dkey end
  elseif dflag then
    dd = base .. '#d:' .. dkey
    prior = redis.call('GET', dd)
  end
  if skipped then prior = true end
  if not prior and math.floor(fl / 2) % 2 == 1 then
    for _, e in ipairs(redis.call('XRANGE', out, '-', '+')) do
      local f = e[2]
      for j = 1, #f, 2 do
        if f[j] == 'm' and f[j + 1] == mid then prior = string.match(e[1], '^(%d+)') end
      end
    end
  end
  local state = prior
  if not prior then
    if direct and not dflag and expect == '' and known == 0
        and redis.call('EXISTS', meta, out) == 0 then
      state = false  -- no key at all (a plain client never stored for): one call
    else
      state = redis.call('HMGET', meta, 'e', 's', 'k')
    end
  end
  if skipped then
    results[i] = 'S'
  elseif prior then
    results[i] = 'D|' .. prior
  elseif state == false or (direct and not dflag and (state[1] or '') == expect
      and (state[2] or 0) + 0 == known and redis.call('XLEN', out) == 0) then
    -- Nothing of this client's is held anywhere beyond what the node has: it writes the
    -- message directly (plain mode: written is delivered). Only for messages without a
    -- dedup key: a key recorded for a write that then failed would claim a delivery.
    results[i] = 0
  else
    local epoch, s, k = state[1], (state[2] or 0) + 0, (state[3] or 0) + 0
    if not epoch then
      epoch = fresh
      s = math.max(floor, top_of(out))
      k = 0
      redis.call('HSET', meta, 'e', epoch, 's', s, 'a', s, 'v', '0')
    end
    local evicted = {}
    local len = redis.call('XLEN', out)
    local full = false
    local expired = {}
    if len >= max then
      -- Messages past their TTL at the head do not hold a place (no node may be there to
      -- expire them): removed first, and returned to be counted as expired.
      for _, e in ipairs(redis.call('XRANGE', out, '-', '+', 'COUNT', 64)) do
        local x = nil
        for j = 1, #e[2], 2 do
          if e[2][j] == 'x' then x = tonumber(e[2][j + 1]) end
        end
        if x == nil or x > hub_now then break end
        redis.call('XDEL', out, e[1])
        expired[#expired + 1] = e
        len = len - 1
      end
    end
    if len >= max then
      if policy ~= 'drop_oldest' then
        full = true
      else
        evicted = redis.call('XRANGE', out, '-', '+', 'COUNT', len - max + 1)
        for _, e in ipairs(evicted) do redis.call('XDEL', out, e[1]) end
      end
    end
    if full then
      results[i] = 'F'
    else
      -- Behind this node's mirror of the same epoch: the stream was rolled back (a
      -- failover lost the last writes) and some numbers may be reused. Say so.
      local rolled_back = expect ~= '' and expect == epoch and s < floor
      local found_at = s
      if s < floor then s = floor end
      s = s + 1
      local sd = string.format('%d', s)
      local added = redis.pcall('XADD', out, sd .. '-0', 'm', mid, 'd', data, 't', kind,
                                'x', x, 'c', c)
      if type(added) == 'table' and added.err then
        -- the counter is behind the stream (rolled back by a failover): stay above it
        s = top_of(out) + 1
        sd = string.format('%d', s)
        redis.call('XADD', out, sd .. '-0', 'm', mid, 'd', data, 't', kind, 'x', x, 'c', c)
      end
      redis.call('HSET', meta, 's', sd)
      if dflag then redis.call('SET', dd, sd, 'PX', dedup_ms) end
      if k < now + keep then
        extend(meta, out, k, keep, true)
      elseif len == 0 then
        -- an empty stream may have been created just now, without an expiry: it gets
        -- the meta's deadline (the keys expire together), one call instead of three
        redis.call('PEXPIREAT', out, k)
      end
      local changed = '0'
      if expect ~= '' and expect ~= epoch then
        changed = '1'
      elseif rolled_back then
        changed = 'r' .. string.format('%d', found_at)  -- and the counter it was found at
      end
      local gap = {}
      if known >= 0 and changed == '0' and s > known + 1 then
        gap = redis.call('XRANGE', out, string.format('%d-0', known + 1),
                         string.format('%d-0', s - 1))
      end
      local holder = ''
      if known < 0 then holder = redis.call('GET', base .. '#p') or '' end
      local extra = #evicted > 0 or #gap > 0 or #expired > 0
      if not extra and changed == '0' and holder == '' and (expect ~= '' or known < 0) then
        -- the common cases: stored in the epoch the caller mirrors, or for a client
        -- connected nowhere (the caller has no mirror, so no use for the epoch)
        results[i] = s
      else
        local head = sd .. '|' .. changed .. '|' .. epoch .. '|' .. holder
        if extra then
          results[i] = {head, evicted, gap, expired}
        else
          results[i] = head
        end
      end
    end
  end
end
return results
"""
)

# Acknowledge: trim everything <= seq and raise the acked floor, unless the stream is no
# longer the epoch the acking connection speaks of (then nothing is trimmed).
# KEYS: 1, the call's slot key. ARGV: the items, concatenated, each
# "base key|seq|keep ms|expected epoch;".
# Returns per item: the previous acked floor, or -1 when the epoch differs or vanished, or
# the ack is beyond the stream's last seq (rolled back by a failover).
ACK = (
    _BATCH
    + _TOP
    + """
local results = {}
local blob = ARGV[1]
local pos, i = 1, 0
while pos <= #blob do
  i = i + 1
  local base, seq, keep, expect, at = string.match(blob,
    '^([^|]*)|(%d+)|(%d+)|([^;]*);()', pos)
  pos = at
  -- `+ 0` converts once where tonumber converts twice (a strtod each); the matched
  -- text is digits, and the seq goes back to Redis as that text, not as a float
  local seq_text = seq
  seq, keep = seq + 0, keep + 0
  local meta, out = base .. '#m', base .. '#o'
  local state = redis.call('HMGET', meta, 'e', 'a', 'k', 's')
  local epoch = state[1]
  -- an ack beyond the last seq handed out speaks of writes a failover lost
  if not epoch or (expect ~= '' and epoch ~= expect) or seq > (state[4] or 0) + 0 then
    results[i] = -1
  else
    redis.call('XTRIM', out, 'MINID', string.format('%d', seq + 1) .. '-0')
    local cur = (state[2] or 0) + 0
    if seq > cur then redis.call('HSET', meta, 'a', seq_text) end
    extend(meta, out, (state[3] or 0) + 0, keep, false)
    results[i] = cur
  end
end
return results
"""
)

# Forget messages that left other than by delivery (expired, dead-lettered): an entry is
# deleted only while it is still the message the caller means — the stream is the epoch
# the caller's copy came from and the entry at that seq carries the same message id. A
# stream recreated under a node (its keys vanished) numbers from 1 again: a bare XDEL of
# a stale copy's seq would delete another message, which nobody would count.
# KEYS: 1, the call's slot key. ARGV: the items, concatenated, each
# "base key|expected epoch|seq|message id length|" followed by the message id (any
# bytes). An empty expected epoch (the caller's copy names none) checks the id alone.
# Returns per item 1 (deleted) or 0 (not there, or another message or epoch).
DISCARD = (
    _BATCH
    + """
local results = {}
local blob = ARGV[1]
local pos, i = 1, 0
while pos <= #blob do
  i = i + 1
  local base, expect, seq, ml, at = string.match(blob,
    '^([^|]*)|([^|]*)|(%d+)|(%d+)|()', pos)
  ml = ml + 0
  local mid = string.sub(blob, at, at + ml - 1)
  pos = at + ml
  local meta, out = base .. '#m', base .. '#o'
  local deleted = 0
  if expect == '' or redis.call('HGET', meta, 'e') == expect then
    local id = seq .. '-0'
    local found = redis.call('XRANGE', out, id, id)
    if #found == 1 then
      local f = found[1][2]
      for j = 1, #f, 2 do
        if f[j] == 'm' then
          if f[j + 1] == mid then deleted = redis.call('XDEL', out, id) end
          break
        end
      end
    end
  end
  results[i] = deleted
end
return results
"""
)

# A tether.v1 client resumes from `last_seq`: settle its stream against it.
# KEYS: meta, out. ARGV: last_seq, the hello's epoch ('' when it sent none), fresh epoch,
# keep ms. A stream that cannot vouch for last_seq (no record of it, never attached, another
# epoch, or numbered below it) is reset: its pending entries are renumbered after
# last_seq under a fresh epoch, so nothing new is mistaken for something already seen.
# Returns {epoch, s, a, reset, entries, expired}: expired, the entries a reset found past
# their TTL and left out (removed), to be counted.
ATTACH = (
    _TOP
    + """
local meta, out = KEYS[1], KEYS[2]
local last, said, fresh, keep = tonumber(ARGV[1]), ARGV[2], ARGV[3], tonumber(ARGV[4])
local hub_now = tonumber(ARGV[5])  -- the caller's clock decides expiry
local epoch = redis.call('HGET', meta, 'e')
local s = tonumber(redis.call('HGET', meta, 's') or '0')
local a = tonumber(redis.call('HGET', meta, 'a') or '0')
local attached = redis.call('HGET', meta, 'v') == '1'
local reset = 0
if last > 0 then
  if not epoch or not attached or (said ~= '' and said ~= epoch) or last > s then
    reset = 1
  end
end
local entries = redis.call('XRANGE', out, '-', '+')
local expired = {}
if reset == 1 then
  redis.call('DEL', out)
  local n = last
  local longest = keep
  for _, e in ipairs(entries) do
    local f, x = e[2], nil
    for j = 1, #f, 2 do
      if f[j] == 'x' then x = tonumber(f[j + 1]) end
    end
    -- Expired entries are not renumbered (the node would skip them, and the numbers
    -- would then disagree); the reset already tells the client that it may have lost.
    if x == nil or x > hub_now then
      n = n + 1
      redis.call('XADD', out, n .. '-0', unpack(f))
      if x ~= nil and x - hub_now > longest then longest = x - hub_now end
    else
      expired[#expired + 1] = e
    end
  end
  keep = longest
  epoch, s, a = fresh, n, last
  -- the recreated stream has no expiry yet: keep_alive below gives both keys at least
  -- `longest` (the longest pending TTL), and `k` says so. Left lower (it was 0), the
  -- next ack's extend shortened the keys to 1.25 x client_ttl, below that message's TTL.
  redis.call('HSET', meta, 'k', now + longest)
  entries = redis.call('XRANGE', out, '-', '+')
elseif not epoch then
  epoch = fresh
  s = math.max(s, top_of(out))
end
redis.call('HSET', meta, 'e', epoch, 's', s, 'a', a, 'v', '1')
keep_alive({meta, out}, keep)
return {epoch, s, a, reset, entries, expired}
"""
)

# Read a stream for a (re)connection or a doorbell. KEYS: meta, out. ARGV: after.
# Returns {epoch or false, s, a, entries after `after`}.
LOAD = """
local meta, out = KEYS[1], KEYS[2]
local after = tonumber(ARGV[1])
local state = redis.call('HMGET', meta, 'e', 's', 'a')
local start = '-'
if after > 0 then start = (after + 1) .. '-0' end
return {state[1], tonumber(state[2] or '0'), tonumber(state[3] or '0'),
        redis.call('XRANGE', out, start, '+')}
"""

# Presence. claim: this node holds the connection now; returns the previous holder
# (maybe a "~node" tombstone). KEYS: presence, meta, out, claim record. ARGV: node,
# presence ms, keep ms, claim token. Idempotent per token: a claim re-run after its reply
# was lost finds its record ("token|previous holder") and returns the holder it replaced,
# not itself - that node must still be kicked - unless another node claimed in between.
CLAIM = (
    _TOP
    + """
local old = redis.call('GET', KEYS[1])
local record = redis.call('GET', KEYS[4])
local mark = ARGV[4] .. '|'
if record and string.sub(record, 1, #mark) == mark then
  if old == false or old == ARGV[1] then
    old = string.sub(record, #mark + 1)
    if old == '' then old = false end
  end
else
  redis.call('SET', KEYS[4], mark .. (old or ''), 'PX', ARGV[2])
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
keep_alive({KEYS[2], KEYS[3]}, tonumber(ARGV[3]))
return old
"""
)

# refresh: keep our presence alive (never steal it back). Same KEYS/ARGV as claim.
REFRESH = (
    _TOP
    + """
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] or cur == false or cur == '~' .. ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
keep_alive({KEYS[2], KEYS[3]}, tonumber(ARGV[3]))
return cur
"""
)

# release: leave a tombstone where the presence is still ours (the client left this node).
# KEYS: 1, the call's slot key. ARGV: node, tombstone ms, then the items, concatenated,
# each "base key;". Returns per item 1 (tombstoned) or 0 (someone else holds it).
RELEASE = (
    _BATCH
    + """
local results = {}
local pos, i = 1, 0
local blob = ARGV[3]
while pos <= #blob do
  i = i + 1
  local base, at = string.match(blob, '^([^;]*);()', pos)
  pos = at
  local key = base .. '#p'
  if redis.call('GET', key) == ARGV[1] then
    redis.call('SET', key, '~' .. ARGV[1], 'PX', ARGV[2])
    results[i] = 1
  else
    results[i] = 0
  end
end
return results
"""
)

SCRIPTS: dict[str, str] = {
    "append": APPEND,
    "ack": ACK,
    "attach": ATTACH,
    "load": LOAD,
    "claim": CLAIM,
    "refresh": REFRESH,
    "release": RELEASE,
    "discard": DISCARD,
}
