"""``GET /``: the status page. One self-contained HTML document (inline CSS, JavaScript and
SVG plots; no external asset, works offline, no build step) that fetches ``v2/status``
(``server.status``) every ``REFRESH_MS`` and redraws itself. Everything from the server is
inserted as text (``textContent``), never as markup: model names and error messages come
from the repository and from models."""

from __future__ import annotations

REFRESH_MS = 2000

CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
"""The page may talk to its own server only."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Shoal status</title>
<style>
:root { --fg: #1d2330; --muted: #667085; --line: #e4e7ec; --bg: #f8f9fb; --card: #fff;
  --ok: #12805c; --warn: #b54708; --bad: #c01048; --p50: #2e6ee6; --p99: #9e3fd6; --rps: #12805c; }
@media (prefers-color-scheme: dark) {
  :root { --fg: #e6e8ee; --muted: #98a2b3; --line: #2b3140; --bg: #12151c; --card: #1a1e27;
    --ok: #32d583; --warn: #fdb022; --bad: #f63d68; --p50: #6aa2ff; --p99: #d39bff; --rps: #32d583; }
}
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  color: var(--fg); background: var(--bg); }
header { display: flex; flex-wrap: wrap; gap: 12px; align-items: baseline; padding: 14px 20px;
  border-bottom: 1px solid var(--line); background: var(--card); position: sticky; top: 0; z-index: 1; }
header h1 { font-size: 18px; margin: 0; }
header .muted { color: var(--muted); }
main { padding: 8px 20px 40px; max-width: 1400px; }
h2 { font-size: 15px; margin: 22px 0 8px; }
h2 small { color: var(--muted); font-weight: normal; }
table { border-collapse: collapse; width: 100%; background: var(--card); border: 1px solid var(--line); }
th, td { text-align: left; padding: 5px 10px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { font-weight: 600; color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .03em; }
td.num { font-variant-numeric: tabular-nums; text-align: right; }
td.reason { color: var(--muted); max-width: 60ch; overflow-wrap: anywhere; }
.state { font-weight: 600; }
.state-READY { color: var(--ok); }
.state-LOADING, .state-STARTING, .state-RESTARTING, .state-DRAINING, .state-UNLOADING { color: var(--warn); }
.state-UNAVAILABLE, .state-FAILED, .state-STOPPED { color: var(--bad); }
.badge { padding: 1px 8px; border-radius: 10px; font-size: 12px; font-weight: 600; color: #fff; }
.badge.ok { background: var(--ok); } .badge.bad { background: var(--bad); }
#error { background: var(--bad); color: #fff; padding: 8px 20px; }
.models { display: grid; gap: 10px; }
.model { background: var(--card); border: 1px solid var(--line); padding: 8px 10px;
  display: flex; flex-wrap: wrap; gap: 6px 16px; align-items: flex-start; }
.model h3 { font-size: 14px; margin: 0; width: 160px; overflow-wrap: anywhere; }
.plots { display: flex; flex-wrap: wrap; gap: 10px 18px; }
svg.plot { width: 280px; height: 96px; overflow: visible; }
svg.plot text { font-size: 10px; fill: var(--muted); }
svg.plot text.title { fill: var(--fg); font-weight: 600; }
svg.plot .axis { stroke: var(--line); stroke-width: 1; }
svg.plot polyline { fill: none; stroke-width: 1.6; stroke-linejoin: round; }
svg.plot .rps { stroke: var(--rps); } svg.plot .failures { stroke: var(--bad); }
svg.plot .p50 { stroke: var(--p50); } svg.plot .p99 { stroke: var(--p99); }
svg.plot .avg { stroke: var(--muted); stroke-dasharray: 3 2; } svg.plot .pending { stroke: var(--warn); }
ul#events { list-style: none; padding: 0; margin: 0; background: var(--card); border: 1px solid var(--line); }
ul#events li { padding: 5px 10px; border-bottom: 1px solid var(--line); }
ul#events .when { color: var(--muted); font-variant-numeric: tabular-nums; margin-right: 8px; }
ul#events .kind { font-weight: 600; color: var(--bad); margin-right: 8px; }
.empty { color: var(--muted); padding: 6px 10px; }
</style>
</head>
<body>
<header>
  <h1>Shoal</h1>
  <span id="server" class="muted"></span>
  <span id="ready" class="badge"></span>
  <span>queue <b id="queue">-</b></span>
  <span id="updated" class="muted"></span>
</header>
<div id="error" hidden></div>
<main>
  <h2>Models</h2>
  <table id="models"><thead><tr><th>model</th><th>version</th><th>state</th><th>reason</th></tr></thead>
    <tbody></tbody></table>
  <h2>Traffic <small id="window"></small></h2>
  <div id="plots" class="models"></div>
  <h2>Workers</h2>
  <table id="workers"><thead><tr><th>model</th><th>version</th><th>instance</th><th>state</th><th>pid</th>
    <th>device</th><th>restarts</th><th>outstanding</th><th>reason</th></tr></thead><tbody></tbody></table>
  <h2>Recent load failures and worker exits</h2>
  <ul id="events"></ul>
</main>
<script>
"use strict";
const REFRESH_MS = __REFRESH_MS__;
const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}

function svgEl(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = text;
  return e;
}

function fmt(v) {
  if (v === null || v === undefined || Number.isNaN(v)) return "-";
  const a = Math.abs(v);
  if (a >= 1000) return v.toFixed(0);
  if (a >= 100) return v.toFixed(1);
  if (a >= 1) return v.toFixed(2);
  if (a === 0) return "0";
  return v.toPrecision(2);
}

function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * p) return m * p;
  return 10 * p;
}

function clock(t) {
  return new Date(t * 1000).toLocaleTimeString([], {hour12: false});
}

// one small plot: lines [{key, cls, label}] of series s over [t1 - span, t1]
function plot(model, kind, title, unit, s, lines, t1, span) {
  const W = 280, H = 96, L = 4, R = 4, T = 16, B = 14;
  const root = svgEl("svg", {class: "plot", viewBox: `0 0 ${W} ${H}`, "data-model": model, "data-kind": kind});
  let max = 0, points = 0;
  for (const line of lines) for (const v of s[line.key] || []) if (v !== null && v > max) max = v;
  max = niceMax(max);
  const x = (t) => L + (W - L - R) * (1 - (t1 - t) / span);
  const y = (v) => T + (H - T - B) * (1 - v / max);
  root.append(svgEl("line", {class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B}));
  root.append(svgEl("line", {class: "axis", x1: L, x2: W - R, y1: T, y2: T}));
  root.append(svgEl("text", {class: "title", x: L, y: 11}, title));
  root.append(svgEl("text", {x: W - R, y: T - 3, "text-anchor": "end"}, `${fmt(max)} ${unit}`));
  const ago = span >= 120 ? `-${Math.round(span / 60)} min` : `-${Math.round(span)} s`;
  root.append(svgEl("text", {x: L, y: H - 2}, ago));
  const legend = [];
  for (const line of lines) {
    const values = s[line.key] || [];
    let seg = [];
    const flush = () => {
      if (seg.length === 1) seg.push(seg[0].replace(/^([0-9.]+)/, (m) => String(Number(m) + 1)));
      if (seg.length) root.append(svgEl("polyline", {class: line.cls, points: seg.join(" ")}));
      seg = [];
    };
    let last = null;
    values.forEach((v, i) => {
      const t = s.t[i];
      if (v === null || t < t1 - span) { flush(); return; }
      seg.push(`${x(t).toFixed(1)},${y(v).toFixed(1)}`);
      points += 1;
      last = v;
    });
    flush();
    legend.push(`${line.label} ${fmt(last)}`);
  }
  root.append(svgEl("text", {x: W - R, y: H - 2, "text-anchor": "end"}, legend.join("  ")));
  root.setAttribute("data-points", String(points));
  return root;
}

function row(tbody, cells) {
  const tr = document.createElement("tr");
  for (const [text, cls] of cells) tr.append(el("td", cls, text));
  tbody.append(tr);
  return tr;
}

function render(st) {
  const srv = st.server;
  $("server").textContent = `${srv.id} ${srv.version} · up ${Math.round(srv.uptime_s)} s`;
  const ready = $("ready");
  ready.textContent = srv.ready ? "ready" : "not ready";
  ready.className = "badge " + (srv.ready ? "ok" : "bad");
  $("queue").textContent = String(st.queue.pending);
  $("updated").textContent = "updated " + clock(srv.time);
  $("window").textContent = `last ${Math.round(st.history_s / 60)} min, one point every ${st.interval_s} s`;

  const models = $("models").tBodies[0];
  models.replaceChildren();
  for (const m of st.models) {
    const tr = row(models, [[m.name, "name"], [m.version || "", "num"], [m.state || "not loaded", "state"],
      [m.reason || "", "reason"]]);
    tr.dataset.model = m.name;
    tr.cells[2].classList.add("state-" + (m.state || "none"));
  }
  if (!st.models.length) models.append(el("tr", "empty", "no models in the repository"));

  const plots = $("plots");
  plots.replaceChildren();
  for (const [name, s] of Object.entries(st.series)) {
    // the time axis covers what there is, from one minute up to the whole history
    const span = Math.min(st.history_s, Math.max(60, s.t.length ? srv.time - s.t[0] : 0));
    const card = el("div", "model");
    card.dataset.model = name;
    card.append(el("h3", "", name));
    const box = el("div", "plots");
    box.append(plot(name, "throughput", "requests/s", "/s", s,
      [{key: "rps", cls: "rps", label: "ok"}, {key: "failures", cls: "failures", label: "failed"}], srv.time, span));
    box.append(plot(name, "latency", "latency", "ms", s,
      [{key: "p50_ms", cls: "p50", label: "p50"}, {key: "p99_ms", cls: "p99", label: "p99"},
       {key: "avg_ms", cls: "avg", label: "mean"}], srv.time, span));
    box.append(plot(name, "queue", "queued requests", "", s,
      [{key: "pending", cls: "pending", label: "now"}], srv.time, span));
    card.append(box);
    plots.append(card);
  }
  if (!plots.children.length) plots.append(el("div", "empty", "no model loaded"));

  const workers = $("workers").tBodies[0];
  workers.replaceChildren();
  for (const w of st.workers) {
    const tr = row(workers, [[w.model], [w.version, "num"], [w.instance], [w.state, "state"], [w.pid, "num pid"],
      [w.device], [w.restarts, "num"], [w.outstanding, "num"], [w.reason || "", "reason"]]);
    tr.dataset.model = w.model;
    tr.dataset.instance = w.instance;
    tr.cells[3].classList.add("state-" + w.state);
  }
  if (!st.workers.length) workers.append(el("tr", "empty", "no worker processes"));

  const list = $("events");
  list.replaceChildren();
  for (const e of st.events) {
    const li = el("li");
    li.dataset.kind = e.kind;
    li.append(el("span", "when", clock(e.time)), el("span", "kind", e.kind));
    let where = `${e.model}` + (e.version ? ` v${e.version}` : "") + (e.instance ? ` ${e.instance}` : "");
    if (e.pid) where += ` (pid ${e.pid})`;
    li.append(el("b", "", where + ": "), el("span", "message", e.message));
    list.append(li);
  }
  if (!st.events.length) list.append(el("li", "empty", "none since the server started"));
}

async function refresh() {
  try {
    const resp = await fetch("v2/status", {cache: "no-store"});
    if (!resp.ok) {
      let msg = `HTTP ${resp.status}`;
      try { msg += ": " + (await resp.json()).error; } catch (_) { /* not JSON */ }
      throw new Error(msg);
    }
    render(await resp.json());
    $("error").hidden = true;
    document.body.dataset.loaded = String(Date.now());
  } catch (err) {
    $("error").textContent = "Cannot read the server's status: " + err.message;
    $("error").hidden = false;
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}
refresh();
</script>
</body>
</html>
""".replace("__REFRESH_MS__", str(REFRESH_MS))

PAGE_BYTES = PAGE.encode()
