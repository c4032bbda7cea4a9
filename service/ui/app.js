// The status page: watches /prefill_port_table/events (SSE) and re-reads /prefill_port_table
// when something changed, updating the grid in place (no reload, no flicker). Where an event
// stream cannot work (no EventSource, reads that need the token, a server without the feed) it
// polls the table every 2 s instead, and says which on the page. Rows are dp groups, cells are
// (cp, tp, pp); complete rows are collapsed when the group is large so thousands of cells stay
// readable. The pure helpers at the end are exported to Node for tests/test_status_page.py.
"use strict";

const POLL_MS = 2000;
const RECENT_SECONDS = 120;     // a replacement newer than this is highlighted
const EXPAND_LIMIT = 16;        // above this many rows, complete rows start collapsed
const READ_GAP_MS = 250;        // live: at most ~4 table reads a second, however many events
const LIVE_REFRESH_MS = 30000;  // live: re-read anyway, so "replaced recently" ages out
const LIVE_FAILURES = 3;        // stream errors without an open in between before polling
const LIVE_RETRY_MS = 60000;    // polling after failures: try the stream again this often
const EVENT_LIMIT = 20;         // events shown in the recent list
const EVENTS_PATH = "/prefill_port_table/events";
const EVENT_KINDS = ["registered", "moved", "expired", "renewed", "left", "complete",
  "incomplete", "reset", "conflict"];
const token = typeof location === "undefined" ? null
  : new URLSearchParams(location.hash.slice(1)).get("token");
let shape = null;               // topology key the grid was built for
const cellElements = new Map(); // "dp,cp,tp,pp" -> element
const rowElements = new Map();  // dp -> <details>

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function address(ip, port) {
  return ip.includes(":") ? `[${ip}]:${port}` : `${ip}:${port}`;
}

function buildGrid(report) {
  const grid = document.getElementById("grid");
  grid.replaceChildren();
  cellElements.clear();
  rowElements.clear();
  const t = report.topology;
  if (!t) {
    grid.append(el("p", "collapsed", "No rank has registered yet: the topology is unknown."));
    return;
  }
  for (let dp = 0; dp < t.dp_size; dp++) {
    const row = el("details", "row");
    row.dataset.dp = dp;
    row.append(el("summary", "", `dp ${dp}`));
    const cells = el("div", "cells");
    for (let cp = 0; cp < t.attn_cp_size; cp++)
      for (let tp = 0; tp < t.attn_tp_size; tp++)
        for (let pp = 0; pp < t.pp_size; pp++) {
          const cell = el("div", "cell missing");
          cell.dataset.cell = `${dp},${cp},${tp},${pp}`;
          cell.append(el("span", "at", `cp${cp} tp${tp} pp${pp}`), el("span", "where", "missing"));
          cells.append(cell);
          cellElements.set(cell.dataset.cell, cell);
        }
    row.append(cells);
    row.open = t.dp_size <= EXPAND_LIMIT;
    grid.append(row);
    rowElements.set(dp, row);
  }
}

function render(report) {
  const t = report.topology;
  const key = t ? [t.dp_size, t.attn_cp_size, t.attn_tp_size, t.pp_size, report.instance_id].join("/") : "none";
  if (key !== shape) { buildGrid(report); shape = key; }

  const status = document.getElementById("status");
  status.dataset.state = !t ? "empty" : report.complete ? "ready" : "incomplete";
  status.textContent = !t ? "empty" : report.complete ? "ready" : `incomplete: ${report.missing_cells.length} missing`;
  document.getElementById("topology").textContent = t
    ? `dp=${t.dp_size} cp=${t.attn_cp_size} tp=${t.attn_tp_size} pp=${t.pp_size} page_size=${t.page_size} kv=${t.kv_cache_dtype}`
    : "unknown";
  document.getElementById("counts").textContent = `${report.registered_cells} / ${report.expected_cells ?? "?"} cells` +
    (report.expired_cells.length ? ` (${report.expired_cells.length} expired)` : "");
  document.getElementById("instance").textContent = report.instance_id +
    (report.incarnation && report.incarnation !== report.instance_id ? ` (incarnation ${report.incarnation})` : "");
  document.getElementById("updated").textContent = new Date().toLocaleTimeString();
  if (!t) return;

  const now = Date.now() / 1000;
  const seen = new Set();
  for (const c of report.cells) {
    const id = `${c.dp},${c.cp},${c.tp},${c.pp}`;
    const cell = cellElements.get(id);
    if (!cell) continue;
    seen.add(id);
    const recent = c.address_version > 1 && now - c.last_registered_at < RECENT_SECONDS;
    const state = c.state === "expired" || recent ? "warn" : "ok";
    cell.className = `cell ${state}`;
    cell.title = `address version ${c.address_version}` + (c.state === "expired" ? ", lease expired" : "") + (recent ? ", replaced recently" : "");
    cell.lastChild.textContent = address(c.rank_ip, c.rank_port) + (c.state === "expired" ? " (expired)" : "");
  }
  for (const [id, cell] of cellElements) {
    if (seen.has(id)) continue;
    cell.className = "cell missing";
    cell.title = "no rank registered this cell";
    cell.lastChild.textContent = "missing";
  }
  for (const row of report.rows) {
    const details = rowElements.get(row.dp);
    if (!details) continue;
    details.classList.toggle("complete", row.complete);
    details.classList.toggle("incomplete", !row.complete);
    details.firstChild.textContent = `dp ${row.dp}: ${row.registered}/${row.expected}`;
    if (!row.complete && !details.dataset.opened) { details.open = true; details.dataset.opened = "1"; }
  }
}

// ---- reading the table -----------------------------------------------------------------------

let reading = false;            // a read is in flight
let readAgain = false;          // something changed while it was
let lastRead = 0;               // Date.now() when the last read started
let readTimer = null;

async function readTable() {
  const message = document.getElementById("message");
  try {
    const headers = token ? { Authorization: `Bearer ${token}` } : {};
    const response = await fetch("/prefill_port_table", { headers, cache: "no-store" });
    if (response.status === 401) throw new Error("reads need the server's token: open /ui#token=<token>");
    if (!response.ok) throw new Error(`/prefill_port_table answered HTTP ${response.status}`);
    render(await response.json());
    message.hidden = true;
  } catch (error) {
    message.textContent = `Cannot read the table: ${error.message}`;
    message.hidden = false;
    const status = document.getElementById("status");
    status.dataset.state = "error";
    status.textContent = "unreachable";
  }
}

// Re-read the table soon: a burst of events (a 512-rank storm) costs a few reads, not hundreds.
function scheduleRead() {
  if (reading) { readAgain = true; return; }
  if (readTimer !== null) return;
  const wait = Math.max(0, lastRead + READ_GAP_MS - Date.now());
  readTimer = setTimeout(async () => {
    readTimer = null;
    reading = true;
    readAgain = false;
    lastRead = Date.now();
    try { await readTable(); } finally { reading = false; }
    if (readAgain) scheduleRead();
  }, wait);
}

// ---- live (the event stream) or polling ----------------------------------------------------

let source = null;              // the EventSource while live
let failures = 0;               // stream errors since the last successful open
let pollTimer = null;
let refreshTimer = null;

function showMode(mode, why) {
  const node = document.getElementById("mode");
  node.dataset.mode = mode;
  node.textContent = why ? `${mode} (${why})` : mode;
}

function startPolling(why) {
  showMode("polling", why);
  if (pollTimer !== null) return;
  const tick = async () => {
    await readTable();
    pollTimer = setTimeout(tick, POLL_MS);
  };
  tick();
}

function stopPolling() {
  if (pollTimer !== null) clearTimeout(pollTimer);
  pollTimer = null;
}

function onEvent(message) {
  let event;
  try { event = JSON.parse(message.data); } catch { return; }
  event.position = message.lastEventId;  // "<stream>:<seq>": a restarted server reuses seqs
  if (rememberEvent(recentEvents, event, EVENT_LIMIT)) renderEvents();
  scheduleRead();
}

function startLive() {
  const stream = new EventSource(EVENTS_PATH);
  source = stream;
  for (const kind of EVENT_KINDS) stream.addEventListener(kind, onEvent);
  stream.onopen = () => {
    failures = 0;
    stopPolling();
    showMode("live");
    scheduleRead();             // whatever changed while the stream was down
    if (refreshTimer === null) refreshTimer = setInterval(scheduleRead, LIVE_REFRESH_MS);
  };
  stream.onerror = () => {
    failures += 1;
    // CLOSED: the browser gave up (an HTTP error, e.g. a 410 after a server restart, or a
    // server without the feed): a fresh stream starts from now. Otherwise it retries itself.
    if (failures >= LIVE_FAILURES) { goPolling("the event stream keeps failing"); return; }
    if (stream.readyState === EventSource.CLOSED) { stream.close(); startLive(); }
    else showMode("reconnecting");
    scheduleRead();
  };
}

function goPolling(why) {
  if (source !== null) source.close();
  source = null;
  if (refreshTimer !== null) clearInterval(refreshTimer);
  refreshTimer = null;
  startPolling(why);
  setTimeout(() => { failures = 0; startLive(); }, LIVE_RETRY_MS);
}

function start() {
  if (typeof EventSource === "undefined") startPolling("this browser has no EventSource");
  else if (token) startPolling("reads need the token, which an event stream cannot send");
  else { showMode("connecting"); scheduleRead(); startLive(); }
}

// ---- the recent events list --------------------------------------------------------------

const recentEvents = [];        // newest first

function renderEvents() {
  const list = document.getElementById("event-list");
  list.replaceChildren(...recentEvents.map((event) => {
    const shown = describeEvent(event);
    const item = el("li", `event ${event.kind}`);
    item.dataset.seq = event.seq;
    for (const part of ["time", "kind", "cell", "addresses", "version"])
      item.append(el("span", part, shown[part]));
    return item;
  }));
  document.getElementById("events").hidden = recentEvents.length === 0;
}

// Keep `event` in `events` (newest first, at most `limit`); false for one already there (a
// stream resumed with Last-Event-ID never repeats one, but a fresh stream might race a resume).
// Told apart by `position`, the SSE id: a restarted server keeps the instance, not the seqs.
function rememberEvent(events, event, limit) {
  const key = (e) => e.position || `${e.instance_id}:${e.seq}`;
  if (events.some((known) => key(known) === key(event))) return false;
  events.unshift(event);
  events.sort((a, b) => b.at - a.at || b.seq - a.seq);
  events.length = Math.min(events.length, limit);
  return true;
}

// The strings one event is shown with: time, kind, cell, address(es), address version.
function describeEvent(event) {
  const at = new Date(event.at * 1000);
  const pad = (n) => String(n).padStart(2, "0");
  const where = (a) => (a ? address(a.rank_ip, a.rank_port) : "");
  const cell = event.cell
    ? `(dp=${event.cell[0]}, cp=${event.cell[1]}, tp=${event.cell[2]}, pp=${event.cell[3]})`
    : "";
  const addresses = event.previous ? `${where(event.previous)} -> ${where(event.address)}`
    : where(event.address);
  return {
    time: `${pad(at.getHours())}:${pad(at.getMinutes())}:${pad(at.getSeconds())}`,
    kind: event.kind,
    cell,
    addresses: event.detail ? [addresses, event.detail].filter(Boolean).join(" ") : addresses,
    version: event.address_version ? `v${event.address_version}` : "",
  };
}

if (typeof document !== "undefined") start();
if (typeof module !== "undefined") module.exports = { address, describeEvent, rememberEvent };
