// Tether dashboard: renders /ws/live pushes and /api/* reads; reconnects and flags stale data.
// Plain ES module, no dependencies: charts are drawn as SVG by drawChart below. Charts come
// from the hub's sample history (/api/history, kept by the server whether or not a page is
// open); header, panels and totals from one /ws/live realtime frame, so they always agree.

const TOKEN_KEY = "tether.monitorToken";
const BACKOFF_MIN_MS = 500;
const BACKOFF_MAX_MS = 5000;
const STATE_GLYPH = { closed: "🟢", half_open: "🟡", open: "🔴" };
const STATE_LABEL = { closed: "CLOSED", half_open: "HALF_OPEN", open: "OPEN" };
const PAGE_SIZE = 50;

// Everything is addressed relative to where the page is served, so the app also works
// mounted under a prefix (e.g. /tether/dashboard inside a FastAPI app).
const BASE = location.pathname.replace(/dashboard\/?$/, "");

const $ = (id) => document.getElementById(id);

const state = {
  token: null,
  cadence: { realtime: 1, performance: 5, aggregate: 30 },
  lastUpdate: 0, // Date.now() of the last /ws/live message
  everLive: false,
  ws: null,
  attempt: 0,
  reconnectTimer: null,
  needToken: false,
  session: null,
  history: { fine: [], coarse: [] }, // samples from /api/history, oldest first
  step: { fine: 1, coarse: 60 }, // seconds between samples of each ring
  keep: { fine: 900, coarse: 1440 },
  range: "fine", // which ring the charts show
  historyLoading: false,
  lastCoarseFetch: 0,
  clients: { offset: 0, total: 0, loading: false, lastFetch: 0, queued: false },
  selected: null,
  lastDead: 0,
};

// ------------------------------------------------------------------ token + fetch

function loadToken() {
  const params = new URLSearchParams(location.search);
  const fromUrl = params.get("token");
  if (fromUrl) {
    sessionStorage.setItem(TOKEN_KEY, fromUrl);
    // keep the secret out of the address bar, history and screenshots
    params.delete("token");
    const rest = params.toString();
    history.replaceState(null, "", location.pathname + (rest ? "?" + rest : "") + location.hash);
  }
  state.token = sessionStorage.getItem(TOKEN_KEY);
}

function askForToken() {
  if (state.needToken) return;
  state.needToken = true;
  setLive("auth", "token needed");
  $("token-form").hidden = false;
  $("token-input").focus();
}

class Unauthorized extends Error {}

async function api(path) {
  const headers = { Accept: "application/json" };
  if (state.token) headers.Authorization = "Bearer " + state.token;
  const response = await fetch(BASE + path, { headers, cache: "no-store" });
  if (response.status === 401) {
    askForToken();
    throw new Unauthorized(path);
  }
  const body = await response.json();
  if (!response.ok && !(path === "health" && response.status === 503)) {
    throw new Error(body.message || response.statusText);
  }
  return body;
}

// ------------------------------------------------------------------ formatting

const nf = new Intl.NumberFormat("en");
const fmtInt = (n) => (n === null || n === undefined ? "–" : nf.format(Math.round(n)));
const fmtNum = (n, digits = 1) =>
  n === null || n === undefined ? "–" : Number(n).toLocaleString("en", { maximumFractionDigits: digits });

function fmtBytes(n, digits = 1) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return `${n.toFixed(i ? digits : 0)} ${units[i]}`;
}

// latency: milliseconds below a second, seconds above, so axis labels stay short
function fmtMs(ms, digits = 1) {
  if (ms === null || ms === undefined) return "–";
  if (ms >= 1000) return `${fmtNum(ms / 1000, ms >= 10000 ? 0 : 1)} s`;
  return `${fmtNum(ms, ms < 1 ? 1 : digits)} ms`;
}

function fmtAge(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
  if (seconds < 60) return `${seconds.toFixed(1)} s`;
  const m = Math.floor(seconds / 60);
  if (m < 60) return `${m}m ${Math.round(seconds % 60)}s`;
  return `${Math.floor(m / 60)}h ${m % 60}m`;
}

function fmtAgo(wallSeconds) {
  if (!wallSeconds) return "–";
  return fmtAge(Math.max(0, Date.now() / 1000 - wallSeconds)) + " ago";
}

function setText(id, value) {
  const el = $(id);
  if (el && el.textContent !== String(value)) el.textContent = String(value);
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined) continue;
    if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child));
  return node;
}

function stateBadge(s) {
  const key = s || "closed";
  // the glyph rides along as a title (hover, screen readers); the dot is drawn by CSS
  return el("span", { class: "state", "data-testid": "client-state", "data-state": key, title: `${STATE_GLYPH[key] || ""} ${STATE_LABEL[key] || key}` },
    el("span", { class: "dot", "data-state": key, "aria-hidden": "true" }), STATE_LABEL[key] || key);
}

// ------------------------------------------------------------------ charts

const SVG_NS = "http://www.w3.org/2000/svg";

function svgEl(tag, attrs) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  return node;
}

function niceMax(value, floor = 1) {
  if (!(value > floor)) return floor;
  const exp = Math.pow(10, Math.floor(Math.log10(value)));
  for (const step of [1, 2, 2.5, 5, 10]) {
    if (step * exp >= value) return step * exp;
  }
  return 10 * exp;
}

function clockTime(seconds, withSeconds) {
  const d = new Date(seconds * 1000);
  const two = (n) => String(n).padStart(2, "0");
  return `${two(d.getHours())}:${two(d.getMinutes())}` + (withSeconds ? `:${two(d.getSeconds())}` : "");
}

// Draws line series over the selected time window into an <svg>: x runs from (now − the
// window) to now, so missing time is empty space, and a line breaks wherever samples are
// missing (a gap longer than two steps) or a value is null. `scale` "log" spaces decades
// evenly so small values (p50) stay readable beside large ones (p99). Sized to the
// element's pixels, so text is crisp; redrawn on resize.
function drawChart(svg, rows, series, { format, floor = 1, scale = "linear", integer = false, empty = "no samples yet" }) {
  const width = Math.max(120, Math.round(svg.clientWidth || 600));
  const height = Math.max(80, Math.round(svg.clientHeight || 180));
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.replaceChildren();
  const step = state.step[state.range];
  const span = step * state.keep[state.range];
  const t1 = Math.max(Date.now() / 1000, rows.length ? rows[rows.length - 1].ts : 0);
  const t0 = t1 - span;
  const visible = rows.filter((r) => r.ts >= t0);
  svg.dataset.points = String(visible.length);
  svg.dataset.scale = scale;
  const left = 58;
  const right = 8;
  const top = 6;
  const bottom = 16;
  const w = width - left - right;
  const h = height - top - bottom;
  let max = 0;
  for (const r of visible) for (const s of series) max = Math.max(max, s.value(r) ?? 0);
  let yOf;
  const ticks = [];
  if (scale === "log") {
    // decades from 0.1 ms up to the first power of ten above the largest value
    const lo = -1;
    const hi = Math.max(lo + 2, Math.ceil(Math.log10(Math.max(max, floor))));
    yOf = (v) => top + h - ((Math.log10(Math.max(v, 10 ** lo)) - lo) / (hi - lo)) * h;
    for (let e = lo; e <= hi; e += 1) ticks.push(10 ** e);
  } else {
    max = niceMax(max, floor);
    if (integer) max = Math.ceil(max / 4) * 4; // counts: every grid line on a whole number
    yOf = (v) => top + h - (Math.min(v, max) / max) * h;
    for (let i = 0; i <= 4; i += 1) ticks.push((max * i) / 4);
  }
  let lastLabel = null;
  for (const value of ticks) {
    const text = format(value);
    if (text === lastLabel) continue; // never the same label twice on one axis
    lastLabel = text;
    const y = yOf(value);
    svg.append(svgEl("line", { class: "grid-line", x1: left, x2: left + w, y1: y, y2: y }));
    const label = svgEl("text", { x: left - 4, y: y + 3, "text-anchor": "end", "font-size": 10, fill: "#8391a1" });
    label.textContent = text;
    svg.append(label);
  }
  const xOf = (ts) => left + ((ts - t0) / span) * w;
  const marks = w < 320 ? [0, 3] : [0, 1, 2, 3]; // a narrow chart: its ends only
  for (const i of marks) {
    const ts = t0 + (span * i) / 3;
    const anchor = i === 0 ? "start" : i === 3 ? "end" : "middle";
    const label = svgEl("text", { x: xOf(ts), y: height - 3, "text-anchor": anchor, "font-size": 10, fill: "#8391a1" });
    label.textContent = i === 3 ? "now" : clockTime(ts, state.range === "fine");
    svg.append(label);
  }
  if (visible.length === 0) {
    const t = svgEl("text", { x: left + w / 2, y: top + h / 2, "text-anchor": "middle", "font-size": 12, fill: "#8391a1" });
    t.textContent = empty;
    svg.append(t);
  }
  let segmentsOfFirst = 0;
  series.forEach((s, index) => {
    let d = "";
    let segments = 0;
    let prev = null;
    for (const r of visible) {
      const v = s.value(r);
      if (v === null || v === undefined) {
        prev = null;
        continue;
      }
      const joined = prev !== null && r.ts - prev.ts <= 2.5 * step;
      if (!joined) segments += 1;
      d += `${joined ? "L" : "M"}${xOf(r.ts).toFixed(1)},${yOf(v).toFixed(1)}`;
      // a lone sample between gaps still shows, as a short tick
      prev = r;
    }
    if (index === 0) segmentsOfFirst = segments;
    if (d) svg.append(svgEl("path", { class: `series ${s.cls || "s" + index}`, d, "data-segments": segments }));
  });
  svg.dataset.segments = String(segmentsOfFirst);
}

function historyRows() {
  return state.history[state.range];
}

function drawCharts() {
  const rows = historyRows();
  drawChart($("latency-chart"), rows, [
    { value: (r) => r.p50_ms },
    { value: (r) => r.p95_ms },
    { value: (r) => r.p99_ms },
  ], { format: (v) => fmtMs(v, 0), scale: "log", floor: 10, empty: "no deliveries yet" });
  drawChart($("throughput-chart"), rows, [
    { value: (r) => r.delivered_per_s },
    { value: (r) => r.queued_per_s },
    { value: (r) => r.failed_per_s },
    { value: (r) => r.dropped_per_s },
  ], { format: (v) => fmtNum(v, 2), floor: 1 });
  drawChart($("memory-chart"), rows, [{ value: (r) => r.rss_bytes }], { format: (v) => fmtBytes(v, 0), floor: 1 << 20 });
  drawChart($("clients-chart"), rows, [
    { value: (r) => r.tracked_clients, cls: "s1" },
    { value: (r) => r.connected, cls: "s3" },
    { value: (r) => r.breakers_open, cls: "s2" },
  ], { format: fmtInt, floor: 4, integer: true });
  const last = rows[rows.length - 1];
  if (last) {
    setText("lat-p50", fmtMs(last.p50_ms, 2));
    setText("lat-p95", fmtMs(last.p95_ms, 2));
    setText("lat-p99", fmtMs(last.p99_ms, 2));
    for (const k of ["delivered", "queued", "failed", "dropped"]) setText(`tp-${k}`, fmtNum(last[`${k}_per_s`], 1));
    // a chart's legend shows its own newest sample; the client counts are not repeated
    // here, so they are read in one place only (the panels above, from the live frame)
    setText("mem-rss", fmtBytes(last.rss_bytes));
  }
}

function addRows(cadence, body) {
  const rows = body.rows.map((values) => Object.fromEntries(body.fields.map((f, i) => [f, values[i]])));
  state.step[cadence] = body.step_seconds;
  state.keep[cadence] = body.keep;
  const list = state.history[cadence];
  const lastTs = list.length ? list[list.length - 1].ts : -Infinity;
  for (const row of rows) if (row.ts > lastTs) list.push(row);
  // keep what the window shows: older samples (a previous server's too) fall off
  const newest = list.length ? list[list.length - 1].ts : Date.now() / 1000;
  const horizon = Math.max(Date.now() / 1000, newest) - body.step_seconds * body.keep;
  const firstKept = list.findIndex((r) => r.ts >= horizon);
  if (firstKept > 0) list.splice(0, firstKept);
  else if (firstKept === -1) list.length = 0;
}

async function refreshHistory(full) {
  if (state.historyLoading) return;
  state.historyLoading = true;
  try {
    const wanted = ["fine"];
    if (full || Date.now() - state.lastCoarseFetch > state.step.coarse * 1000) wanted.push("coarse");
    for (const cadence of wanted) {
      const list = state.history[cadence];
      const since = !full && list.length ? `&since=${list[list.length - 1].ts}` : "";
      addRows(cadence, await api(`api/history?cadence=${cadence}${since}`));
      if (cadence === "coarse") state.lastCoarseFetch = Date.now();
    }
    drawCharts();
  } catch {
    /* shown by the live status; retried on the next tick */
  } finally {
    state.historyLoading = false;
  }
}

function lastMinuteRate(name) {
  // the same samples the throughput chart draws: total over the last minute / its length
  const rows = state.history.fine;
  if (!rows.length) return null;
  // measured on the server's clock (the newest sample), not the browser's
  const since = rows[rows.length - 1].ts - 60;
  let count = 0;
  let seconds = 0;
  for (const r of rows) {
    if (r.ts < since) continue;
    count += r[`${name}_per_s`] * r.interval_seconds;
    seconds += r.interval_seconds;
  }
  return seconds > 0 ? count / seconds : null;
}

// ------------------------------------------------------------------ live updates

function setLive(kind, text) {
  const node = $("live-status");
  node.dataset.state = kind;
  node.textContent = text;
}

function fillList(id, ids, total) {
  const list = $(id);
  list.replaceChildren();
  if (!ids.length) {
    list.append(el("li", { class: "muted" }, "none"));
    return;
  }
  for (const cid of ids) {
    const item = el("li", { "data-client-id": cid }, cid);
    item.addEventListener("click", () => openClient(cid));
    list.append(item);
  }
  if (total > ids.length) list.append(el("li", { class: "muted" }, `+${total - ids.length} more`));
}

function onRealtime(m) {
  const cb = m.circuit_breaker;
  setText("breaker-closed", fmtInt(cb.closed));
  setText("breaker-half-open", fmtInt(cb.half_open));
  setText("breaker-open", fmtInt(cb.open));
  setText("cb-opens", fmtInt(cb.opens));
  setText("cb-half-opens", fmtInt(cb.half_opens));
  setText("cb-closes", fmtInt(cb.closes));
  fillList("open-clients", m.open_clients, cb.open);
  fillList("half-open-clients", m.half_open_clients, cb.half_open);
  const c = m.connections;
  setText("conn-active", fmtInt(c.active));
  setText("conn-total", fmtInt(c.total));
  setText("conn-reconnections", fmtInt(c.reconnections));
  setText("conn-failed", fmtInt(c.failed));
  setText("conn-timeouts", fmtInt(c.timeouts));
  const q = m.queue;
  setText("queue-current", fmtInt(q.current_size));
  setText("queue-max", fmtInt(q.max_size));
  setText("queue-overflows", fmtInt(q.overflows));
  setText("queue-oldest", q.current_size ? fmtAge(q.oldest_pending_age_seconds) : "–");
  setText("queue-dead", fmtInt(q.dead_letters));
  const r = m.retry;
  setText("retry-rate", r.attempts ? `${(r.success_rate * 100).toFixed(1)} %` : "–");
  setText("retry-attempts", fmtInt(r.attempts));
  setText("retry-successes", fmtInt(r.successes));
  setText("retry-failures", fmtInt(r.failures));
  setText("clients-connected", `${fmtInt(c.active)} connected of ${fmtInt(m.memory.tracked_clients)} tracked`);
  if (m.uptime_seconds !== undefined) setText("uptime", fmtAge(m.uptime_seconds));
  if (m.health) showHealth(m.health);
  if (m.messages) showTotals(m.messages);
  refreshClients(false);
  refreshHistory(false);
  refreshChannels(false);
  if (q.dead_letters !== state.lastDead) {
    state.lastDead = q.dead_letters;
    refreshDeadLetters();
  }
}

function showTotals(messages) {
  const body = $("totals-body");
  body.replaceChildren();
  for (const [name, value] of Object.entries(messages)) {
    const rate = ["delivered", "queued", "failed", "dropped"].includes(name) ? lastMinuteRate(name) : null;
    body.append(el("tr", { "data-metric": name }, el("td", {}, name.replace("_", " ")), el("td", {}, fmtInt(value)),
      el("td", {}, rate === null ? "" : fmtNum(rate, 2))));
  }
  setText("totals-window", "(rates: last minute)");
}

function showHealth(h) {
  const node = $("health");
  node.dataset.status = h.status;
  node.textContent = h.status === "ok" ? "healthy" : `${h.status}: ${h.reasons.join("; ")}`;
  node.title = h.reasons.join("\n");
}

function onHello(m) {
  state.cadence = m.cadence;
  setText("version", m.version);
  if (state.session && state.session !== m.session) {
    // a restarted hub: its counters begin again; the charts keep the old history
    state.clients.offset = 0;
  }
  state.session = m.session;
  setText("session", m.session.slice(0, 8));
  refreshHistory(true);
}

function onMessage(event) {
  let m;
  try {
    m = JSON.parse(event.data);
  } catch {
    return;
  }
  state.lastUpdate = Date.now();
  state.everLive = true;
  checkStale();
  if (m.type === "hello") onHello(m);
  else if (m.type === "realtime") onRealtime(m);
  // "performance" and "aggregate" frames are for other consumers: the page draws from the
  // history and the realtime frame only, one source per figure
}

function wsUrl() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const query = state.token ? `?token=${encodeURIComponent(state.token)}` : "";
  return `${scheme}//${location.host}${BASE}ws/live${query}`;
}

function connect() {
  clearTimeout(state.reconnectTimer);
  state.reconnectTimer = null;
  if (state.needToken) return;
  setLive(state.everLive ? "reconnecting" : "connecting", state.everLive ? "reconnecting…" : "connecting…");
  let ws;
  try {
    ws = new WebSocket(wsUrl());
  } catch {
    scheduleReconnect();
    return;
  }
  state.ws = ws;
  ws.addEventListener("open", () => {
    state.attempt = 0;
    setLive("live", "live");
    refreshClients(true);
    refreshDeadLetters();
    refreshChannels(true);
    refreshHealth();
  });
  ws.addEventListener("message", onMessage);
  ws.addEventListener("close", () => {
    if (state.ws !== ws) return;
    state.ws = null;
    scheduleReconnect();
  });
}

async function scheduleReconnect() {
  if (state.reconnectTimer || state.needToken) return;
  // A refused handshake looks like any network error to a browser; an HTTP probe tells
  // a missing token (ask once) from a server that is down (retry with backoff).
  try {
    await api("health");
  } catch (error) {
    if (error instanceof Unauthorized) return;
  }
  const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** state.attempt);
  state.attempt += 1;
  const delay = ceiling / 2 + Math.random() * (ceiling / 2); // jitter: tabs don't reconnect in lockstep
  setLive("reconnecting", `reconnecting in ${(delay / 1000).toFixed(1)} s`);
  state.reconnectTimer = setTimeout(connect, delay);
}

// An HTTP probe before the first handshake: a missing token then shows as one 401 and
// the token form, rather than as a refused WebSocket.
async function start() {
  try {
    await api("health");
  } catch (error) {
    if (error instanceof Unauthorized) return;
  }
  connect();
}

function checkStale() {
  const node = $("stale");
  if (!state.everLive) return;
  const age = (Date.now() - state.lastUpdate) / 1000;
  const stale = age > 2 * state.cadence.realtime;
  if (stale) setText("stale-age", Math.floor(age));
  if (node.hidden === stale) node.hidden = !stale;
  node.dataset.stale = String(stale);
  document.body.dataset.stale = String(stale);
}

// ------------------------------------------------------------------ health, clients, dead letters

async function refreshHealth() {
  // once when the feed (re)connects; afterwards every realtime frame carries the health
  try {
    showHealth(await api("health"));
  } catch {
    /* the live status already says the server is unreachable */
  }
}

function clientQuery() {
  const params = new URLSearchParams({ limit: String(PAGE_SIZE), offset: String(state.clients.offset), sort: $("client-sort").value });
  const filter = $("client-filter").value.trim();
  if (filter) params.set("q", filter);
  if ($("client-state").value) params.set("state", $("client-state").value);
  if ($("client-connected").value) params.set("connected", $("client-connected").value);
  return "api/clients?" + params.toString();
}

async function refreshClients(force) {
  const c = state.clients;
  if (c.loading) {
    c.queued = c.queued || force;
    return;
  }
  if (!force && Date.now() - c.lastFetch < state.cadence.realtime * 1000 * 0.9) return;
  c.loading = true;
  c.lastFetch = Date.now();
  try {
    const page = await api(clientQuery());
    renderClients(page);
    if (state.selected) await loadDetail(state.selected);
  } catch {
    /* shown by the live status; retried on the next tick */
  } finally {
    c.loading = false;
    if (c.queued) {
      c.queued = false;
      refreshClients(true);
    }
  }
}

function renderClients(page) {
  const c = state.clients;
  c.total = page.total;
  setText("clients-total", `${fmtInt(page.total)} matching`);
  const body = $("clients-body");
  body.replaceChildren();
  if (!page.items.length) {
    body.append(el("tr", {}, el("td", { colspan: "9", class: "muted" }, "no clients match")));
  }
  for (const row of page.items) {
    const tr = el("tr", {
      "data-testid": "client-row",
      "data-client-id": row.client_id,
      "data-state": row.state || "closed",
      class: row.client_id === state.selected ? "selected" : null,
    },
    el("td", { class: "id", "data-label": "client" }, row.client_id),
    el("td", { "data-label": "breaker" }, stateBadge(row.state)),
    el("td", { "data-label": "connected", "data-testid": "client-connected", "data-connected": String(row.connected) },
      el("span", { class: row.connected ? "conn yes" : "conn no", "aria-hidden": "true" }, row.connected ? "●" : "○"), row.connected ? " yes" : " no"),
    el("td", { class: "num", "data-label": "pending" }, fmtInt(row.pending)),
    el("td", { class: "num", "data-label": "sent" }, fmtInt(row.messages_sent)),
    el("td", { class: "num", "data-label": "delivered" }, fmtInt(row.messages_delivered)),
    el("td", { class: "num", "data-label": "failed" }, fmtInt(row.messages_failed)),
    el("td", { class: "num", "data-label": "dead" }, fmtInt(row.dead_letters)),
    el("td", { "data-label": "last activity" }, fmtAgo(row.last_activity)));
    tr.addEventListener("click", () => openClient(row.client_id));
    body.append(tr);
  }
  const last = Math.min(page.total, page.offset + page.items.length);
  setText("page-info", page.total ? `${page.offset + 1}–${last} of ${fmtInt(page.total)}` : "0");
  $("page-prev").disabled = page.offset === 0;
  $("page-next").disabled = page.next_offset === null;
}

async function openClient(id) {
  state.selected = id;
  for (const row of document.querySelectorAll("#clients-body tr")) {
    row.classList.toggle("selected", row.dataset.clientId === id);
  }
  await loadDetail(id);
  $("client-detail").scrollIntoView({ block: "nearest" });
}

async function loadDetail(id) {
  const panel = $("client-detail");
  let info;
  try {
    info = await api("api/clients/" + encodeURIComponent(id));
  } catch (error) {
    if (error instanceof Unauthorized) return;
    panel.hidden = false;
    panel.dataset.clientId = id;
    setText("detail-title", `${id}: gone (evicted or never seen)`);
    $("detail-stats").replaceChildren();
    $("detail-outbox").replaceChildren();
    $("detail-dead").replaceChildren();
    return;
  }
  if (state.selected !== id) return;
  panel.hidden = false;
  panel.dataset.clientId = id;
  const title = $("detail-title");
  title.replaceChildren(stateBadge(info.state), " ", id);
  const stats = [
    ["connected", info.connected ? `yes (${info.mode})` : "no"],
    ["pending", fmtInt(info.outbox.pending)],
    ["in flight", fmtInt(info.outbox.in_flight)],
    ["oldest pending", fmtAge(info.outbox.oldest_age_seconds)],
    ["consecutive failures", fmtInt(info.consecutive_failures)],
    ["sent", fmtInt(info.messages_sent)],
    ["delivered", fmtInt(info.messages_delivered)],
    ["failed", fmtInt(info.messages_failed)],
    ["dropped", fmtInt(info.messages_dropped)],
    ["retries", `${fmtInt(info.retry_successes)} / ${fmtInt(info.retry_attempts)}`],
    ["breaker opens", fmtInt(info.circuit_breaker_opens)],
    ["reconnections", fmtInt(info.connections_reconnections)],
    ["next seq", fmtInt(info.next_seq)],
    ["acked", fmtInt(info.acked)],
    ["groups", (info.groups || []).join(", ") || "–"],
    ["last activity", fmtAgo(info.last_activity)],
  ];
  $("detail-stats").replaceChildren(...stats.map(([k, v]) => el("div", {}, el("dt", {}, k), el("dd", {}, v))));
  const outbox = $("detail-outbox");
  outbox.replaceChildren(...info.outbox.head.map((e) =>
    el("tr", {}, el("td", {}, e.message_id), el("td", {}, e.seq ?? "–"), el("td", {}, e.critical ? "yes" : "no"),
      el("td", {}, fmtInt(e.attempts)), el("td", {}, fmtAge(e.age_seconds)), el("td", {}, fmtInt(e.size_bytes)))));
  if (!info.outbox.head.length) outbox.append(el("tr", {}, el("td", { colspan: "6", class: "muted" }, "empty")));
  const dead = $("detail-dead");
  dead.replaceChildren(...info.dead_letters.slice(-20).reverse().map((d) =>
    el("tr", {}, el("td", {}, d.message_id), el("td", {}, fmtInt(d.attempts)), el("td", {}, d.reason), el("td", {}, fmtAgo(d.failed_at)))));
  if (!info.dead_letters.length) dead.append(el("tr", {}, el("td", { colspan: "4", class: "muted" }, "none")));
}

async function refreshDeadLetters() {
  let page;
  try {
    page = await api("api/dead-letters?limit=50");
  } catch {
    return;
  }
  setText("dead-total", fmtInt(page.total));
  const body = $("dead-body");
  body.replaceChildren();
  if (!page.items.length) body.append(el("tr", {}, el("td", { colspan: "6", class: "muted" }, "none")));
  for (const d of page.items) {
    const tr = el("tr", { "data-testid": "dead-letter-row", "data-client-id": d.client_id },
      el("td", { class: "id", "data-label": "client" }, d.client_id), el("td", { "data-label": "failed" }, fmtAgo(d.failed_at)),
      el("td", { "data-label": "message" }, d.message_id), el("td", { "data-label": "attempts" }, fmtInt(d.attempts)),
      el("td", { "data-label": "reason" }, d.reason), el("td", { class: "data", "data-label": "data", title: d.data }, d.data));
    tr.addEventListener("click", () => openClient(d.client_id));
    body.append(tr);
  }
}

// ------------------------------------------------------------------ channels

const channelSeen = new Map(); // name -> {offset, at, epoch}: the publish rate between two reads
let channelsReadAt = -Infinity;

async function refreshChannels(force) {
  const now = performance.now();
  if (!force && now - channelsReadAt < 2000) return; // the list costs the store a read: at most every 2 s
  channelsReadAt = now;
  let page;
  try {
    page = await api("api/channels");
  } catch {
    return;
  }
  setText("channels-total", fmtInt(page.channels.length));
  const body = $("channels-body");
  body.replaceChildren();
  if (!page.channels.length) body.append(el("tr", {}, el("td", { colspan: "5", class: "muted" }, "none")));
  for (const c of page.channels) {
    const seen = channelSeen.get(c.name);
    let rate = "–";
    if (seen && seen.epoch === c.epoch && now > seen.at) rate = fmtNum((c.offset - seen.offset) / ((now - seen.at) / 1000)) + "/s";
    channelSeen.set(c.name, { offset: c.offset, at: now, epoch: c.epoch });
    body.append(el("tr", { "data-testid": "channel-row", "data-channel": c.name },
      el("td", { class: "id", "data-label": "channel" }, c.name),
      el("td", { "data-label": "subscribers here", "data-testid": "channel-subscribers" }, fmtInt(c.subscribers)),
      el("td", { "data-label": "last offset" }, fmtInt(c.offset)),
      el("td", { "data-label": "history", "data-testid": "channel-depth" }, fmtInt(c.depth)),
      el("td", { "data-label": "rate" }, rate)));
  }
}

// ------------------------------------------------------------------ wiring

function debounce(fn, ms) {
  let timer = null;
  return (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
}

function init() {
  loadToken();
  const refilter = () => {
    state.clients.offset = 0;
    refreshClients(true);
  };
  $("client-filter").addEventListener("input", debounce(refilter, 200));
  for (const id of ["client-state", "client-connected", "client-sort"]) $(id).addEventListener("change", refilter);
  $("page-prev").addEventListener("click", () => {
    state.clients.offset = Math.max(0, state.clients.offset - PAGE_SIZE);
    refreshClients(true);
  });
  $("page-next").addEventListener("click", () => {
    state.clients.offset += PAGE_SIZE;
    refreshClients(true);
  });
  $("detail-close").addEventListener("click", () => {
    state.selected = null;
    $("client-detail").hidden = true;
    for (const row of document.querySelectorAll("#clients-body tr.selected")) row.classList.remove("selected");
  });
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.token = $("token-input").value.trim();
    sessionStorage.setItem(TOKEN_KEY, state.token);
    $("token-input").value = "";
    $("token-form").hidden = true;
    state.needToken = false;
    state.attempt = 0;
    start();
  });
  for (const button of document.querySelectorAll("[data-range]")) {
    button.addEventListener("click", () => {
      state.range = button.dataset.range;
      for (const b of document.querySelectorAll("[data-range]")) b.setAttribute("aria-pressed", String(b === button));
      drawCharts();
    });
  }
  window.addEventListener("resize", debounce(drawCharts, 150));
  setInterval(checkStale, 500);
  drawCharts();
  start();
}

init();
