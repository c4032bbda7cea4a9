// The status page: polls /prefill_port_table and updates the grid in place (no reload, no
// flicker). Rows are dp groups, cells are (cp, tp, pp). Complete rows are collapsed when the
// group is large so thousands of cells stay readable.
"use strict";

const POLL_MS = 2000;
const RECENT_SECONDS = 120;     // a replacement newer than this is highlighted
const EXPAND_LIMIT = 16;        // above this many rows, complete rows start collapsed
const token = new URLSearchParams(location.hash.slice(1)).get("token");
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
  document.getElementById("instance").textContent = report.instance_id;
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

async function poll() {
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
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

poll();
