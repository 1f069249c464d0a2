// tether.js: the browser client for Tether's tether.v1 protocol (docs/protocol.md): one dependency-free ES module that reconnects with backoff, resumes from lastSeq, acks in batches, drops duplicates and reports lost messages, so the application sees every critical message exactly once, in order, or is told it was lost.
//
//   import { TetherClient } from "/static/tether.js";
//   const client = new TetherClient("/ws", { clientId: "alice", storage: sessionStorage });
//   client.addEventListener("message", (e) => console.log(e.detail.seq, e.detail.data));
//   client.addEventListener("lost", (e) => console.warn("lost", e.detail.count, e.detail.ranges));
//   await client.connect();
//   const news = client.subscribe("news");             // a channel: history, recovery, presence
//   news.addEventListener("message", (e) => console.log(e.detail.offset, e.detail.data));
//   news.addEventListener("lost", (e) => console.warn("lost", e.detail.count));
//
// Plain mode needs no library: `new WebSocket("/ws?client_id=alice")` receives payloads as-is.

/** The WebSocket subprotocol this client speaks. */
export const SUBPROTOCOL = "tether.v1";
/** The largest integer on the wire (2^53 - 1). */
export const MAX_SEQ = Number.MAX_SAFE_INTEGER;
/** Default maximum frame size, in UTF-8 bytes (1 MiB), as on the server. */
export const DEFAULT_MAX_MESSAGE_SIZE = 1_048_576;

// The server reads frames a little over its limit so it can explain a refusal; mirror it so
// the server's own `error` frames are never refused here.
const SIZE_SLACK = 64 * 1024;
// Close codes after which reconnecting would fail the same way (protocol.md §7).
const FATAL_CLOSES = new Set([1002, 1003, 1007, 1008, 1009, 1010]);
const CLIENT_ID_RE = /^[A-Za-z0-9._:@-]{1,128}$/;
const CHANNEL_RE = /^[A-Za-z0-9._:@-]{1,128}$/;
// `unsubscribed` codes after which a subscription resubscribes from its offset (protocol.md §11).
const RESUBSCRIBE_CODES = new Set(["slow_consumer", "epoch_changed", "history_gap"]);
const MAX_TOKEN_LENGTH = 4096;
const BASE64_RE = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;
const STORAGE_PREFIX = "tether:";

/**
 * @typedef {"connecting" | "connected" | "reconnecting" | "closed"} TetherState
 * @typedef {[number, number]} SeqRange  an inclusive range of seqs: [first, last]
 * @typedef {{getItem(key: string): string | null, setItem(key: string, value: string): void}} TetherStorage
 * @typedef {{received: number, duplicates: number, reconnects: number, lost: number}} TetherCounters
 *
 * @typedef {object} TetherMessage  detail of a `message` event
 * @property {number | null} seq  the critical message's seq; null for a non-critical message
 * @property {string} id  the message id (the same on every re-send)
 * @property {any} data  the payload: JSON value, or a Uint8Array for bytes (enc "base64")
 *
 * @typedef {object} TetherLost  detail of a `lost` event
 * @property {number} count  how many critical messages will never arrive
 * @property {SeqRange[]} ranges  the seqs among them that are known
 * @property {boolean} reset  the server lost its state for this client (count covers only what it knows)
 *
 * @typedef {object} TetherError  detail of an `error` event: the client stopped for good
 * @property {string} code  the server's error code (e.g. "unauthorized"), or the protocol error the client found
 * @property {string} reason  a human-readable explanation
 * @property {number | null} closeCode  the WebSocket close code, when known
 *
 * @typedef {object} TetherOptions
 * @property {string} [clientId]  the client's identity; default: from `storage`, else "js-" + 16 random hex digits
 * @property {string | (() => string | Promise<string>)} [token]  credentials for the server's
 *   authentication hook, sent in `hello`; or a function returning a fresh token: called before
 *   every connection and ahead of a signed token's expiry (the fresh one goes in an `auth` frame)
 * @property {number} [lastSeq=0]  resume point persisted by the application (ignored when `storage` holds one)
 * @property {number} [backoffBase=250]  ms; reconnect delays are uniform in [0, min(backoffMax, backoffBase * 2^(n-1))]
 * @property {number} [backoffMax=10000]  ms
 * @property {number} [ackEvery=64]  send an ack once this many critical messages are unacknowledged...
 * @property {number} [ackIntervalMs=50]  ...or this long after the first unacknowledged one arrived
 * @property {number} [maxMessageSize=1048576]  largest frame accepted from the server (UTF-8 bytes)
 * @property {TetherStorage} [storage]  e.g. sessionStorage: keeps clientId and lastSeq across page reloads
 */

/** A protocol violation: `code` and `closeCode` as in protocol.md §7. */
class ProtocolViolation extends Error {
  /** @param {string} code @param {string} reason @param {number} [closeCode=1002] */
  constructor(code, reason, closeCode = 1002) {
    super(`${code}: ${reason}`);
    this.code = code;
    this.reason = reason;
    this.closeCode = closeCode;
  }
}

const invalid = (reason) => new ProtocolViolation("invalid_frame", reason);

/** @param {SeqRange[]} ranges */
const size = (ranges) => ranges.reduce((n, [a, b]) => n + (b - a + 1), 0);

/**
 * `ranges` without `minus`; both ascending and disjoint.
 * @param {SeqRange[]} ranges @param {SeqRange[]} minus @returns {SeqRange[]}
 */
function subtract(ranges, minus) {
  /** @type {SeqRange[]} */
  const out = [];
  let j = 0;
  for (let [first, last] of ranges) {
    while (j < minus.length && minus[j][1] < first) j++;
    let k = j;
    while (first <= last) {
      if (k === minus.length || minus[k][0] > last) {
        out.push([first, last]);
        break;
      }
      const [mFirst, mLast] = minus[k];
      if (mFirst > first) out.push([first, mFirst - 1]);
      first = mLast + 1;
      k++;
    }
  }
  return out;
}

function isInt(value, low) {
  return Number.isInteger(value) && value >= low && value <= MAX_SEQ;
}

function int(obj, key, low, dflt) {
  const value = obj[key];
  if (value == null && dflt !== undefined) return dflt;
  if (!isInt(value, low)) throw invalid(`${key} must be an integer in ${low}..${MAX_SEQ}`);
  return value;
}

function bool(obj, key, dflt) {
  const value = obj[key];
  if (value == null && dflt !== undefined) return dflt;
  if (typeof value !== "boolean") throw invalid(`${key} must be a boolean`);
  return value;
}

function str(obj, key) {
  const value = obj[key];
  if (typeof value !== "string") throw invalid(`${key} must be a string`);
  return value;
}

function utf8Length(text) {
  return new TextEncoder().encode(text).length;
}

/** Parse and validate one frame from the server (protocol.md §2–3); throws ProtocolViolation. */
function decodeServerFrame(raw, maxSize) {
  if (typeof raw !== "string") {
    throw new ProtocolViolation(
      "binary_not_supported", "tether.v1 frames are JSON text; binary frames are not allowed", 1003);
  }
  if (raw.length > maxSize || (raw.length * 3 > maxSize && utf8Length(raw) > maxSize)) {
    throw new ProtocolViolation("too_big", `frame exceeds ${maxSize} bytes`, 1009);
  }
  let obj;
  try {
    obj = JSON.parse(raw);
  } catch {
    throw new ProtocolViolation("invalid_json", "frame is not valid JSON");
  }
  if (obj === null || typeof obj !== "object" || Array.isArray(obj)) {
    throw new ProtocolViolation("invalid_json", "frame is not a JSON object");
  }
  switch (obj.type) {
    case "msg": {
      if (!("data" in obj)) throw invalid("data is required");
      const enc = obj.enc ?? null;
      if (enc !== null && enc !== "base64") throw invalid('enc must be "base64" or absent');
      if (enc !== null && typeof obj.data !== "string") throw invalid("data must be a string when enc is set");
      const seq = obj.seq ?? null;
      if (seq !== null && !isInt(seq, 1)) throw invalid(`seq must be an integer in 1..${MAX_SEQ} or absent`);
      return { type: "msg", seq, id: str(obj, "id"), enc, data: obj.data };
    }
    case "welcome": {
      const nextSeq = int(obj, "next_seq", 1);
      const acked = int(obj, "acked", 0, 0);
      if (acked >= nextSeq) throw invalid("acked must be below next_seq");
      /** @type {SeqRange[]} */
      const ranges = [];
      const rawRanges = obj.lost_ranges ?? [];
      if (!Array.isArray(rawRanges)) throw invalid("lost_ranges must be a list of [first, last] pairs");
      let previous = 0;
      for (const item of rawRanges) {
        if (!Array.isArray(item) || item.length !== 2) throw invalid("lost_ranges must be a list of [first, last] pairs");
        const [first, last] = item;
        if (!isInt(first, 1) || !isInt(last, 1) || first > last) {
          throw invalid(`lost range bounds must satisfy 1 <= first <= last <= ${MAX_SEQ}`);
        }
        if (first <= previous) throw invalid("lost_ranges must be ascending and must not overlap");
        previous = last;
        ranges.push([first, last]);
      }
      if (ranges.length && (ranges[0][0] <= acked || ranges[ranges.length - 1][1] >= nextSeq)) {
        throw invalid("lost_ranges must lie between acked and next_seq");
      }
      const lost = int(obj, "lost", 0, 0);
      if (lost < size(ranges)) throw invalid("lost must be at least the number of seqs in lost_ranges");
      return {
        type: "welcome",
        session: str(obj, "session"),
        resumed: bool(obj, "resumed"),
        nextSeq,
        acked,
        lost,
        lostRanges: ranges,
        reset: bool(obj, "reset", false),
        epoch: typeof obj.epoch === "string" ? obj.epoch : null,
      };
    }
    case "error":
      return { type: "error", code: str(obj, "code"), reason: str(obj, "reason") };
    case "subscribed": {
      const offset = int(obj, "offset", 0);
      const after = int(obj, "after", 0, 0);
      if (after > offset) throw invalid("after must not exceed offset");
      return {
        type: "subscribed",
        channel: channelOf(obj),
        epoch: str(obj, "epoch"),
        offset,
        recovered: bool(obj, "recovered"),
        lost: int(obj, "lost", 0, 0),
        after,
        reset: bool(obj, "reset", false),
      };
    }
    case "unsubscribed": {
      const code = obj.code ?? null;
      if (code !== null && typeof code !== "string") throw invalid("code must be a string or absent");
      return { type: "unsubscribed", channel: channelOf(obj), reason: str(obj, "reason"), code };
    }
    case "pub": {
      if (!("data" in obj)) throw invalid("data is required");
      const enc = obj.enc ?? null;
      if (enc !== null && enc !== "base64") throw invalid('enc must be "base64" or absent');
      return {
        type: "pub", channel: channelOf(obj), offset: int(obj, "offset", 1), id: str(obj, "id"), enc, data: obj.data,
      };
    }
    case "join":
    case "leave": {
      const clientId = str(obj, "client_id");
      if (!CLIENT_ID_RE.test(clientId)) throw invalid("client_id must be 1..128 characters of [A-Za-z0-9._:@-]");
      return { type: obj.type, channel: channelOf(obj), clientId };
    }
    case "hello":
    case "ack":
    case "publish":
    case "auth":
    case "subscribe":
    case "unsubscribe":
      throw new ProtocolViolation("unexpected_frame", `'${obj.type}' frames go the other way`);
    default:
      throw new ProtocolViolation(
        "unknown_type",
        "type must be one of ['error', 'join', 'leave', 'msg', 'pub', 'subscribed', 'unsubscribed', 'welcome']",
      );
  }
}

function channelOf(obj) {
  const channel = obj.channel;
  if (typeof channel !== "string" || !CHANNEL_RE.test(channel)) {
    throw invalid("channel must be 1..128 characters of [A-Za-z0-9._:@-]");
  }
  return channel;
}

/**
 * One channel subscription of a TetherClient (from `client.subscribe(name)`). Events:
 * `message` (detail {channel, offset, id, data}: each offset once, in order), `lost`
 * (detail {channel, count, after, reset}: messages that will never arrive), `join` /
 * `leave` (detail {channel, clientId}; with `presence: true`), `subscribed` (each answer
 * of the server) and `unsubscribed` (detail {code, reason}: it ended). It resubscribes from
 * its offset after every reconnect, and with the client's `storage` after a page reload.
 * `ready` resolves at the first answer, rejects on refusal.
 */
export class TetherSubscription extends EventTarget {
  constructor(client, channel, { presence = false, since = null } = {}) {
    super();
    /** @readonly */ this.channel = channel;
    /** @readonly */ this.presence = presence;
    this.client = client;
    // With the client's `storage`, the position survives a page reload.
    this._key = `${STORAGE_PREFIX}channel:${client.clientId}:${channel}`;
    if (since === null && client._storage) {
      const saved = client._storage.getItem(this._key);
      const match = saved === null ? null : /^([^:]{1,64}):(\d+)$/.exec(saved);
      if (match && isInt(Number(match[2]), 0)) since = { epoch: match[1], offset: Number(match[2]) };
    }
    /** @type {string | null} */ this.epoch = since ? since.epoch : null;
    this.offset = since ? since.offset : 0;
    this.counters = { received: 0, duplicates: 0, lost: 0, resubscribes: 0 };
    this.active = false; // the server answered the last `subscribe`
    this.ended = false;
    this._sentOn = null; // the WebSocket the last `subscribe` went out on
    this.ready = new Promise((resolve, reject) => {
      this._resolve = resolve;
      this._reject = reject;
    });
    this.ready.catch(() => {}); // callers that do not await see no unhandled rejection
  }

  /** End the subscription. */
  unsubscribe() {
    this.client._unsubscribe(this);
  }

  _onSubscribed(frame) {
    if (this.epoch !== null && (frame.lost > 0 || frame.reset || !frame.recovered)) {
      this.counters.lost += frame.lost;
      this._emit("lost", { channel: this.channel, count: frame.lost, after: frame.after - frame.lost, reset: frame.reset });
    }
    this.epoch = frame.epoch;
    this.offset = frame.after;
    this.active = true;
    this._persist();
    this._emit("subscribed", frame);
    this._resolve();
  }

  /** @returns {boolean} true when the caller must resubscribe (a hole in the offsets) */
  _onPub(frame) {
    if (!this.active) return false;
    if (frame.offset <= this.offset) {
      this.counters.duplicates++;
      return false;
    }
    if (frame.offset !== this.offset + 1) {
      this.active = false;
      return true;
    }
    this.offset = frame.offset;
    this.counters.received++;
    this._persist();
    const data = frame.enc === "base64" ? fromBase64(frame.data) : frame.data;
    this._emit("message", { channel: this.channel, offset: frame.offset, id: frame.id, data });
    return false;
  }

  _persist() {
    this.client._storage?.setItem(this._key, `${this.epoch}:${this.offset}`);
  }

  _end(code, reason) {
    if (this.ended) return;
    this.ended = true;
    this.active = false;
    this._emit("unsubscribed", { code, reason });
    const error = new Error(`${this.channel}: ${code ?? "unsubscribed"}: ${reason}`);
    error.code = code;
    this._reject(error);
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}

/** Bytes from standard base64 with padding (RFC 4648 §4); throws ProtocolViolation otherwise. */
function fromBase64(text) {
  if (!BASE64_RE.test(text)) throw invalid("data is not valid base64");
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

function toBase64(bytes) {
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(binary);
}

function validToken(token) {
  return typeof token === "string" && token.length > 0 && token.length <= MAX_TOKEN_LENGTH;
}

// Refresh a token when this share of its remaining lifetime is left (at least
// REFRESH_MIN_AHEAD seconds, never more than half of what is left).
const REFRESH_SHARE = 0.25;
const REFRESH_MIN_AHEAD = 1;

/**
 * The expiry (epoch seconds) of a Tether signed token, read WITHOUT verifying it (only to
 * schedule a refresh): the part before "." is base64url of "<expires_at>:<client_id>".
 * @param {string} token
 * @returns {number | null}
 */
function tokenExpiresAt(token) {
  const dot = token.indexOf(".");
  if (dot <= 0) return null;
  try {
    const body = token.slice(0, dot).replace(/-/g, "+").replace(/_/g, "/");
    const text = atob(body + "=".repeat((4 - (body.length % 4)) % 4));
    const match = /^(\d{1,15}):/.exec(text);
    return match ? Number(match[1]) : null;
  } catch {
    return null;
  }
}

function randomHex(n) {
  const bytes = new Uint8Array(Math.ceil(n / 2));
  crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("").slice(0, n);
}

/** An absolute ws:// or wss:// URL; relative URLs and http(s) resolve against the page. */
function resolveUrl(url) {
  const base = typeof location !== "undefined" ? location.href : undefined;
  const resolved = new URL(url, base);
  if (resolved.protocol === "http:") resolved.protocol = "ws:";
  else if (resolved.protocol === "https:") resolved.protocol = "wss:";
  return resolved.href;
}

/**
 * A tether.v1 client: exactly-once, in-order delivery of critical messages to the page.
 *
 * Events (all `CustomEvent`s): `message` {seq, id, data}; `lost` {count, ranges, reset};
 * `statechange` {state, previous}; `welcome` (the server's welcome, after it is applied);
 * `error` {code, reason, closeCode} when the server rejects the client or breaks the
 * protocol — the client then stops, and `close` {code, reason} follows. `close` also
 * follows `close()`.
 *
 * Every critical message is dispatched once and in seq order for the lifetime of the
 * object (and across reloads with `storage`), or reported by a `lost` event dispatched
 * before the first message after the gap — never skipped silently.
 */
export class TetherClient extends EventTarget {
  /**
   * @param {string} url  the tether endpoint, e.g. "ws://host:8765/ws" or "/ws"
   * @param {TetherOptions} [options]
   */
  constructor(url, options = {}) {
    super();
    const {
      clientId,
      token,
      lastSeq = 0,
      backoffBase = 250,
      backoffMax = 10000,
      ackEvery = 64,
      ackIntervalMs = 50,
      maxMessageSize = DEFAULT_MAX_MESSAGE_SIZE,
      storage,
    } = options;
    if (!(backoffBase > 0) || !(backoffMax >= backoffBase)) {
      throw new RangeError("need 0 < backoffBase <= backoffMax");
    }
    if (!(ackEvery >= 1) || !(ackIntervalMs >= 0)) {
      throw new RangeError("ackEvery must be >= 1 and ackIntervalMs >= 0");
    }
    if (token != null && typeof token !== "function" && !validToken(token)) {
      throw new RangeError(`token must be a string of at most ${MAX_TOKEN_LENGTH} characters`);
    }
    /** @readonly */
    this.url = resolveUrl(url);
    /** @type {TetherStorage | null} */
    this._storage = storage ?? null;
    let id = clientId;
    if (id == null && this._storage) id = this._storage.getItem(STORAGE_PREFIX + "clientId");
    if (id == null) {
      id = "js-" + randomHex(16);
      this._storage?.setItem(STORAGE_PREFIX + "clientId", id);
    }
    if (typeof id !== "string" || !CLIENT_ID_RE.test(id)) {
      throw new RangeError("clientId must be 1..128 characters of [A-Za-z0-9._:@-]");
    }
    /** @readonly */
    this.clientId = id;
    let start = lastSeq;
    const stored = this._storage?.getItem(this._seqKey());
    if (stored != null && /^\d+$/.test(stored) && isInt(Number(stored), 0)) start = Number(stored);
    if (!isInt(start, 0)) throw new RangeError(`lastSeq must be an integer in 0..${MAX_SEQ}`);
    this.token = typeof token === "string" ? token : null;
    this._tokenSource = typeof token === "function" ? token : null;
    this._refreshTimer = null;
    this.backoffBase = backoffBase;
    this.backoffMax = backoffMax;
    this.ackEvery = ackEvery;
    this.ackIntervalMs = ackIntervalMs;
    this.maxMessageSize = maxMessageSize + SIZE_SLACK;

    /** @type {TetherCounters} */
    this.counters = { received: 0, duplicates: 0, reconnects: 0, lost: 0 };
    /** Fresh tokens sent in `auth` frames (token function only). */
    this.tokenRefreshes = 0;
    /** The last welcome frame the server sent (parsed), or null. */
    this.welcome = null;

    /** @type {TetherState} */
    this._state = "closed";
    this._lastSeq = start;
    /** @type {string | null} */
    this._epoch = this._storage?.getItem(this._seqKey() + ":epoch") ?? null;
    // Seqs above lastSeq already reported lost (never reported twice, across connections),
    // and those this connection's welcome announced (skipped when reached).
    /** @type {SeqRange[]} */ this._reported = [];
    /** @type {SeqRange[]} */ this._skip = [];
    // The highest seq this connection may ack: the server refuses acks above what it wrote.
    this._ceiling = start;
    this._unacked = 0;
    this._unackedSince = 0;
    this._ackTimer = null;

    /** @type {WebSocket | null} */
    this._ws = null;
    this._open = false; // welcome received on the current connection
    this._rejection = null; // the server's `error` frame on the current connection
    this._violation = null; // a protocol error this client found on the current connection
    this._failures = 0; // consecutive connection attempts that did not reach a welcome
    this._retryTimer = null;
    this._started = false;
    this._ended = false;
    this._closeInfo = null;
    this._waiters = new Set(); // pending connect()/publish() waits for a welcome
    /** @type {Map<string, TetherSubscription>} */
    this.subscriptions = new Map();
  }

  /** @returns {TetherState} */
  get state() {
    return this._state;
  }

  /** The highest seq delivered or reported lost: persist it to resume after a restart. */
  get lastSeq() {
    return this._lastSeq;
  }

  /**
   * Start the client; resolves at the first welcome, rejects if the client stopped first.
   * Calling it again returns the same kind of promise (it never starts a second loop).
   * @returns {Promise<void>}
   */
  connect() {
    if (this._ended) return Promise.reject(new Error("TetherClient is closed"));
    if (!this._started) {
      this._started = true;
      this._setState("connecting");
      this._open_();
    }
    const done = this._untilWelcome(true);
    done.catch(() => {}); // a caller that does not await should see no unhandled rejection
    return done;
  }

  /**
   * Send `data` to the server's `on_message` handlers; waits for a connection first.
   * Bytes (Uint8Array / ArrayBuffer) are sent base64. At-most-once: a publish written just
   * before a drop may be lost (protocol.md §6.2); make the handler idempotent with `id`.
   * @param {any} data
   * @param {{id?: string}} [options]
   * @returns {Promise<void>}
   */
  async publish(data, { id } = {}) {
    if (!this._started || this._ended) throw new Error("TetherClient is not running");
    if (!this._connected()) await this._untilWelcome(false);
    /** @type {Record<string, any>} */
    const frame = { type: "publish" };
    if (id != null) frame.id = String(id);
    if (data instanceof ArrayBuffer) data = new Uint8Array(data);
    if (ArrayBuffer.isView(data)) {
      frame.enc = "base64";
      frame.data = toBase64(new Uint8Array(data.buffer, data.byteOffset, data.byteLength));
    } else {
      frame.data = data === undefined ? null : data;
    }
    this._ws.send(JSON.stringify(frame));
  }

  /**
   * Subscribe to a channel (protocol.md §11): returns a TetherSubscription at once (attach
   * listeners, await `sub.ready` for the server's answer). It resumes from its last offset
   * after any reconnect. `since` ({epoch, offset}) resumes a position saved earlier;
   * `presence` asks for join/leave events.
   * @param {string} channel
   * @param {{presence?: boolean, since?: {epoch: string, offset: number} | null}} [options]
   * @returns {TetherSubscription}
   */
  subscribe(channel, options = {}) {
    if (typeof channel !== "string" || !CHANNEL_RE.test(channel)) {
      throw new RangeError("channel must be 1..128 characters of [A-Za-z0-9._:@-]");
    }
    if (this._ended) throw new Error("TetherClient is closed");
    let sub = this.subscriptions.get(channel);
    if (sub === undefined) {
      sub = new TetherSubscription(this, channel, options);
      this.subscriptions.set(channel, sub);
      this._sendSubscribe(sub);
    }
    return sub;
  }

  _sendSubscribe(sub) {
    const ws = this._ws;
    if (ws === null || !this._open || sub._sentOn === ws || sub.ended) return;
    sub.active = false;
    sub._sentOn = ws;
    /** @type {Record<string, any>} */
    const frame = { type: "subscribe", channel: sub.channel };
    if (sub.epoch !== null) frame.since = { epoch: sub.epoch, offset: sub.offset };
    if (sub.presence) frame.presence = true;
    try {
      ws.send(JSON.stringify(frame));
    } catch {
      sub._sentOn = null; // sent again after the next welcome
    }
  }

  _unsubscribe(sub) {
    if (this.subscriptions.get(sub.channel) === sub) this.subscriptions.delete(sub.channel);
    sub._end(null, "unsubscribed");
    if (this._ws !== null && this._open) {
      try {
        this._ws.send(JSON.stringify({ type: "unsubscribe", channel: sub.channel }));
      } catch {
        /* the connection is going; nothing is subscribed on the next one */
      }
    }
  }

  _onChannelFrame(ws, frame) {
    let sub = this.subscriptions.get(frame.channel);
    if (frame.type === "subscribed") {
      if (sub === undefined) {
        // The server subscribed this client itself (hub.subscribe).
        sub = new TetherSubscription(this, frame.channel);
        sub._sentOn = ws;
        this.subscriptions.set(frame.channel, sub);
        this._emit("subscription", sub);
      }
      sub._onSubscribed(frame);
      return;
    }
    if (sub === undefined) return; // in flight when the application unsubscribed
    if (frame.type === "pub") {
      if (sub._onPub(frame)) {
        sub.counters.resubscribes++;
        sub._sentOn = null;
        this._sendSubscribe(sub);
      }
    } else if (frame.type === "unsubscribed") {
      if (frame.code !== null && RESUBSCRIBE_CODES.has(frame.code)) {
        sub.counters.resubscribes++;
        sub._sentOn = null;
        this._sendSubscribe(sub);
      } else if (frame.code === null && !sub.active) {
        // the answer to an earlier unsubscribe of this channel
      } else if (frame.code === "unavailable" && sub.epoch !== null) {
        // The server's channel store is down for now: keep the position, ask again shortly.
        sub._sentOn = null;
        setTimeout(() => {
          if (this.subscriptions.get(sub.channel) === sub && !sub.ended) {
            sub.counters.resubscribes++;
            this._sendSubscribe(sub);
          }
        }, 200 + Math.random() * 800);
      } else {
        this.subscriptions.delete(frame.channel);
        sub._end(frame.code, frame.reason);
      }
    } else {
      sub._emit(frame.type, { channel: frame.channel, clientId: frame.clientId });
    }
  }

  /** Acknowledge what was received, close the connection and stop. Idempotent. */
  close() {
    if (this._ended) return;
    const ws = this._ws;
    if (ws && this._open) this._sendAck(ws);
    this._finish(1000, "client closing");
    if (ws) {
      try {
        ws.close(1000, "client closing");
      } catch {
        /* already closing */
      }
    }
  }

  // ------------------------------------------------------------------ connection

  _connected() {
    return this._state === "connected" && this._ws !== null && this._open;
  }

  _untilWelcome(anyWelcome) {
    if (this._ended) return Promise.reject(this._endError());
    if (anyWelcome ? this.welcome !== null : this._connected()) return Promise.resolve();
    return new Promise((resolve, reject) => this._waiters.add({ resolve, reject, anyWelcome }));
  }

  _endError() {
    const info = this._closeInfo;
    const error = new Error(info?.error ? `${info.error.code}: ${info.error.reason}` : "TetherClient is closed");
    error.detail = info?.error ?? null;
    return error;
  }

  _open_() {
    this._retryTimer = null;
    if (this._ended) return;
    if (this._tokenSource === null) {
      this._dial();
      return;
    }
    // A fresh token for every connection; a failing token function counts as a failed attempt.
    this._freshToken().then(
      (token) => {
        if (this._ended) return;
        this.token = token;
        this._dial();
      },
      () => this._retryLater(),
    );
  }

  async _freshToken() {
    const token = await this._tokenSource();
    if (!validToken(token)) throw new RangeError("the token function must return a non-empty string");
    return token;
  }

  /** Send a fresh token in an `auth` frame ahead of the current one's expiry (protocol.md, auth). */
  _scheduleRefresh(ws) {
    this._cancelRefresh();
    if (this._tokenSource === null || this.token === null) return;
    const expires = tokenExpiresAt(this.token);
    if (expires === null) return; // no readable expiry: refreshed on reconnection only
    const left = expires - Date.now() / 1000;
    const ahead = Math.min(Math.max(left * REFRESH_SHARE, REFRESH_MIN_AHEAD), left / 2);
    this._refreshTimer = setTimeout(() => this._refresh(ws, expires, ahead), Math.max(50, (left - ahead) * 1000));
  }

  async _refresh(ws, expires, ahead) {
    this._refreshTimer = null;
    let fresh = null;
    try {
      fresh = await this._freshToken();
    } catch {
      /* asked again below */
    }
    if (ws !== this._ws || !this._open) return;
    const freshExpiry = fresh === null ? null : tokenExpiresAt(fresh);
    if (fresh === null || fresh === this.token || (freshExpiry !== null && freshExpiry <= expires)) {
      // Nothing fresher yet: ask again shortly, until the old one runs out (then the
      // server closes with token_expired and the client reconnects with a new token).
      const wait = Math.min(ahead / 4, expires - Date.now() / 1000);
      if (wait > 0) this._refreshTimer = setTimeout(() => this._refresh(ws, expires, ahead), Math.max(50, wait * 1000));
      return;
    }
    try {
      ws.send(JSON.stringify({ type: "auth", token: fresh }));
    } catch {
      return; // the close event follows
    }
    this.token = fresh;
    this.tokenRefreshes++;
    this._scheduleRefresh(ws);
  }

  _cancelRefresh() {
    if (this._refreshTimer !== null) {
      clearTimeout(this._refreshTimer);
      this._refreshTimer = null;
    }
  }

  _retryLater() {
    if (this._ended) return;
    this._setState(this.welcome !== null ? "reconnecting" : "connecting");
    this._failures++;
    // Exponential backoff with full jitter: no thundering herd after a server restart.
    const cap = Math.min(this.backoffMax, this.backoffBase * 2 ** (this._failures - 1));
    this._retryTimer = setTimeout(() => this._open_(), Math.random() * cap);
  }

  _dial() {
    let ws;
    try {
      ws = new WebSocket(this.url, [SUBPROTOCOL]);
    } catch (error) {
      // A malformed URL can never work.
      this._stop({ code: "invalid_url", reason: String(error), closeCode: null });
      return;
    }
    ws.binaryType = "arraybuffer";
    this._ws = ws;
    this._open = false;
    this._rejection = null;
    this._violation = null;
    ws.onopen = () => this._onOpen(ws);
    ws.onmessage = (event) => this._onFrame(ws, event.data);
    ws.onclose = (event) => this._onClose(ws, event.code, event.reason);
    ws.onerror = () => {}; // a close event always follows
  }

  _onOpen(ws) {
    if (ws !== this._ws) return;
    if (ws.protocol !== SUBPROTOCOL) {
      this._violation = new ProtocolViolation(
        "unsupported_protocol", "the server did not accept tether.v1", 1002);
      ws.close(1002, "tether.v1 required");
      return;
    }
    // hello(): the (re)connection starts over, carrying last_seq (which acknowledges it).
    this._unacked = 0;
    this._skip = [];
    this._ceiling = this._lastSeq;
    /** @type {Record<string, any>} */
    const hello = { type: "hello", client_id: this.clientId, last_seq: this._lastSeq };
    if (this.token != null) hello.token = this.token;
    // The stream identity lastSeq belongs to: a recreated stream is then reset, not resumed over.
    if (this._epoch != null) hello.epoch = this._epoch;
    ws.send(JSON.stringify(hello));
  }

  _onFrame(ws, raw) {
    if (ws !== this._ws || this._rejection || this._violation) return;
    let frame;
    try {
      frame = decodeServerFrame(raw, this.maxMessageSize);
      if (frame.type === "msg") {
        if (!this._open) throw new ProtocolViolation("unexpected_frame", "msg before welcome");
        this._onMsg(frame);
      } else if (frame.type === "welcome") {
        if (this._open) throw new ProtocolViolation("unexpected_frame", "welcome was already received");
        this._onWelcome(frame);
        this._scheduleRefresh(ws);
        for (const sub of [...this.subscriptions.values()]) this._sendSubscribe(sub);
      } else if (frame.type !== "error") {
        if (!this._open) throw new ProtocolViolation("unexpected_frame", `${frame.type} before welcome`);
        this._onChannelFrame(ws, frame);
      } else {
        // The server closes next; the close code decides whether to come back (_onClose).
        this._rejection = frame;
        this._open = false;
        this._cancelAckTimer();
        return;
      }
    } catch (error) {
      if (!(error instanceof ProtocolViolation)) throw error;
      this._violation = error;
      this._open = false;
      this._cancelAckTimer();
      try {
        ws.close(error.closeCode, error.reason.slice(0, 120));
      } catch {
        /* closing anyway */
      }
      return;
    }
    if (ws === this._ws && this._open) this._scheduleAck(ws);
  }

  _onWelcome(welcome) {
    // A next_seq at or below lastSeq means the server's numbering went backwards without it
    // saying so: its new messages would pass for duplicates. Resync (protocol.md §5.4).
    const reset = welcome.reset || welcome.nextSeq <= this._lastSeq;
    this._epoch = welcome.epoch;
    /** @type {SeqRange[]} */
    let missed = [];
    if (reset) {
      this._lastSeq = this._ceiling = welcome.acked;
      this._reported = [];
    } else if (welcome.acked > this._lastSeq) {
      // An earlier connection of this client id acknowledged seqs this one never saw; they
      // will not be re-sent. A fresh client (lastSeq 0) starts after them; one that had a
      // position is told what it missed.
      if (this._lastSeq) missed = subtract([[this._lastSeq + 1, welcome.acked]], this._reported);
      this._advance(welcome.acked);
    }
    const last = this._lastSeq;
    /** @type {SeqRange[]} */
    const ranges = welcome.lostRanges.filter(([, b]) => b > last).map(([a, b]) => [Math.max(a, last + 1), b]);
    const fresh = subtract(ranges, this._reported);
    if (fresh.length) this._reported = [...this._reported, ...fresh].sort((x, y) => x[0] - y[0]);
    const count = welcome.lost - (size(welcome.lostRanges) - size(fresh)) + size(missed);
    this._skip = ranges;
    this._advance(last);
    if (this.welcome !== null) this.counters.reconnects++;
    this.welcome = welcome;
    this._open = true;
    this._failures = 0;
    this._persist();
    this._setState("connected");
    this._emit("welcome", welcome);
    if (count > 0 || reset) this._reportLost(count, [...missed, ...fresh], reset);
    for (const waiter of [...this._waiters]) {
      this._waiters.delete(waiter);
      waiter.resolve();
    }
  }

  _onMsg(msg) {
    const data = msg.enc === "base64" ? fromBase64(msg.data) : msg.data;
    const seq = msg.seq;
    if (seq === null) {
      this._deliver(null, msg.id, data);
      return;
    }
    if (seq > this._ceiling) this._ceiling = seq;
    if (!this._unacked) this._unackedSince = performance.now();
    this._unacked++;
    const last = this._lastSeq;
    if (seq <= last) {
      this.counters.duplicates++; // dropped, but acknowledged again
      return;
    }
    if (seq === last + 1 && !this._reported.length) {
      this._lastSeq = seq;
    } else {
      const gap = seq > last + 1 ? subtract([[last + 1, seq - 1]], this._reported) : [];
      this._advance(seq);
      if (gap.length) this._reportLost(size(gap), gap, false);
    }
    this._deliver(seq, msg.id, data);
    this._persist();
  }

  /** Move lastSeq to `seq`, then over announced losses that now follow it. */
  _advance(seq) {
    let last = Math.max(this._lastSeq, seq);
    const skip = this._skip;
    while (skip.length && skip[0][0] <= last + 1) last = Math.max(last, skip.shift()[1]);
    this._lastSeq = last;
    const reported = this._reported;
    while (reported.length && reported[0][1] <= last) reported.shift();
    if (reported.length && reported[0][0] <= last) reported[0] = [last + 1, reported[0][1]];
  }

  _deliver(seq, id, data) {
    this.counters.received++;
    this._emit("message", { seq, id, data });
  }

  _reportLost(count, ranges, reset) {
    this.counters.lost += count;
    this._emit("lost", { count, ranges: ranges.map(([a, b]) => [a, b]), reset });
  }

  // ------------------------------------------------------------------ acks

  _scheduleAck(ws) {
    if (!this._unacked) return;
    const now = performance.now();
    if (this._unacked >= this.ackEvery || now - this._unackedSince >= this.ackIntervalMs) {
      this._sendAck(ws);
      return;
    }
    if (this._ackTimer === null) {
      const delay = this._unackedSince + this.ackIntervalMs - now;
      this._ackTimer = setTimeout(() => {
        this._ackTimer = null;
        if (ws === this._ws && this._open) this._scheduleAck(ws);
      }, Math.max(0, delay));
    }
  }

  _sendAck(ws) {
    this._cancelAckTimer();
    if (!this._unacked) return;
    this._unacked = 0;
    // Never above what the server wrote: lastSeq may already cover announced losses.
    const seq = Math.min(this._lastSeq, this._ceiling);
    try {
      ws.send(`{"type":"ack","seq":${seq}}`);
    } catch {
      /* the close event follows; the next hello acknowledges it */
    }
  }

  _cancelAckTimer() {
    if (this._ackTimer !== null) {
      clearTimeout(this._ackTimer);
      this._ackTimer = null;
    }
  }

  // ------------------------------------------------------------------ closing

  _onClose(ws, code, reason) {
    if (ws !== this._ws) return;
    this._ws = null;
    this._open = false;
    this._cancelAckTimer();
    this._cancelRefresh();
    if (this._ended) return;
    const violation = this._violation;
    const rejection = this._rejection;
    if (violation) {
      this._stop({
        code: violation.code,
        reason: `server broke tether.v1: ${violation.reason}`,
        closeCode: violation.closeCode,
      });
      return;
    }
    const expired = rejection?.code === "token_expired" && this._tokenSource !== null;
    if (FATAL_CLOSES.has(code) && !expired) {
      // A rejection (auth, protocol): coming back would fail the same way (protocol.md §7).
      this._stop({
        code: rejection ? rejection.code : "closed",
        reason: rejection ? rejection.reason : reason || `connection closed with ${code}`,
        closeCode: code,
      });
      return;
    }
    this._retryLater();
  }

  _stop(error) {
    this._emit("error", error);
    this._finish(error.closeCode ?? 1006, error.reason, error);
  }

  _finish(code, reason, error = null) {
    if (this._ended) return;
    this._ended = true;
    this._closeInfo = { code, reason, error };
    if (this._retryTimer !== null) clearTimeout(this._retryTimer);
    this._retryTimer = null;
    this._cancelAckTimer();
    this._cancelRefresh();
    this._ws = null;
    this._open = false;
    this._setState("closed");
    for (const sub of [...this.subscriptions.values()]) sub._end("closed", "the client stopped");
    this.subscriptions.clear();
    const failure = this._endError();
    for (const waiter of [...this._waiters]) waiter.reject(failure);
    this._waiters.clear();
    this._emit("close", { code, reason });
  }

  // ------------------------------------------------------------------ helpers

  _seqKey() {
    return `${STORAGE_PREFIX}lastSeq:${this.clientId}`;
  }

  _persist() {
    this._storage?.setItem(this._seqKey(), String(this._lastSeq));
    if (this._epoch != null) this._storage?.setItem(this._seqKey() + ":epoch", this._epoch);
  }

  _setState(state) {
    const previous = this._state;
    if (previous === state) return;
    this._state = state;
    this._emit("statechange", { state, previous });
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}
