/* FLUX fleet dashboard: polls every worker listed in workers.json through nginx (/workers/<id>/queue-stats,
   /workers/<id>/) and nginx's stub_status, keeps 15 minutes of figures in the page and draws them.
   Read-only; it never asks for or shows prompts. */
"use strict";

const POLL_MS = 2000;
const TIMEOUT_MS = 2500;
const INFO_EVERY_MS = 30000;
const WINDOW_MS = 15 * 60 * 1000;
const GAP_MS = 10000;
const KEY_STORE = "flux.apiKey";
const SERIES_STORE = "flux.dashboard.series";  // the charts' figures (numbers only), kept across reloads
const PALETTE = ["#6366f1", "#14b8a6", "#f59e0b", "#ec4899", "#22c55e", "#0ea5e9", "#a855f7", "#ef4444"];

const $ = (id) => document.getElementById(id);
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k === "style") node.style.cssText = v;  // CSSOM, which the page's CSP allows (style attributes it does not)
    else node.setAttribute(k, v);
  }
  node.append(...children);
  return node;
};

const fleet = { workers: [], byId: new Map(), nginx: null, events: [], needKey: false };

function headers() {
  const key = sessionStorage.getItem(KEY_STORE);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function getJSON(url) {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), TIMEOUT_MS);
  try {
    const resp = await fetch(url, { headers: headers(), signal: controller.signal, cache: "no-store" });
    const text = await resp.text();
    let body = null;
    try { body = JSON.parse(text); } catch { body = null; }
    return { status: resp.status, body, text };
  } catch {
    return { status: 0, body: null, text: "" };
  } finally {
    clearTimeout(timer);
  }
}

function addEvent(kind, text) {
  fleet.events.unshift({ t: Date.now(), kind, text });
}

/* ---------------------------------------------------------------- polling */
async function pollWorker(w, now) {  // now: the tick's time, shared by every worker's point
  const stats = await getJSON(`/workers/${encodeURIComponent(w.id)}/queue-stats`);
  const wasDown = w.down;
  if (stats.status === 401) { fleet.needKey = true; }
  if (stats.status === 200 && stats.body && typeof stats.body === "object") {
    const s = stats.body;
    if (w.stats && typeof s.failed === "number" && s.failed > w.stats.failed) {
      const n = s.failed - w.stats.failed;
      w.failures.push({ t: now, n });
      addEvent("bad", `worker ${w.id}: ${n} request${n > 1 ? "s" : ""} failed`);
    }
    if (w.stats && s.completed < w.stats.completed) addEvent("info", `worker ${w.id}: counters reset (restarted)`);
    w.stats = s;
    w.down = false;
    w.series.push({ t: now, ipm: s.images_last_minute ?? 0, depth: (s.queued ?? 0) + (s.running ?? 0) });
    if (!w.info || wasDown || now - w.infoAt > INFO_EVERY_MS) {
      const info = await getJSON(`/workers/${encodeURIComponent(w.id)}/`);
      if (info.status === 200 && info.body) { w.info = info.body; w.infoAt = now; }
    }
  } else {
    w.down = true;
    w.downReason = stats.status === 401 ? "needs an API key" : stats.status ? `HTTP ${stats.status}` : "no answer";
    w.series.push({ t: now, ipm: null, depth: null });
  }
  if (w.down && wasDown === false) addEvent("bad", `worker ${w.id} is down (${w.downReason})`);
  if (!w.down && wasDown === true) addEvent("ok", `worker ${w.id} is back`);
  while (w.series.length && w.series[0].t < now - WINDOW_MS) w.series.shift();
  while (w.failures.length && w.failures[0].t < now - WINDOW_MS) w.failures.shift();
}

async function pollNginx() {
  const r = await fetch("/dashboard/nginx_status", { cache: "no-store" }).then((x) => (x.ok ? x.text() : null)).catch(() => null);
  if (!r) { fleet.nginx = null; return; }
  const active = Number((/Active connections:\s*(\d+)/.exec(r) || [])[1]);
  const nums = (/\n\s*(\d+)\s+(\d+)\s+(\d+)\s*\n/.exec(r) || []).slice(1).map(Number);
  const now = Date.now();
  const prev = fleet.nginx;
  const requests = nums[2];
  let rps = null;
  if (prev && prev.requests != null && requests != null && now > prev.t) rps = (requests - prev.requests) / ((now - prev.t) / 1000);
  fleet.nginx = { t: now, active, requests, rps };
}

async function tick() {
  const now = Date.now();
  await Promise.all([...fleet.workers.map((w) => pollWorker(w, now)), pollNginx()]);
  while (fleet.events.length && fleet.events[fleet.events.length - 1].t < Date.now() - WINDOW_MS) fleet.events.pop();
  render();
  saveSeries();
  setTimeout(tick, POLL_MS);
}

function saveSeries() {
  const data = Object.fromEntries(fleet.workers.map((w) => [w.id, w.series]));
  try { localStorage.setItem(SERIES_STORE, JSON.stringify(data)); } catch { /* storage full or off */ }
}

function restoreSeries() {
  let data = {};
  try { data = JSON.parse(localStorage.getItem(SERIES_STORE) || "{}"); } catch { data = {}; }
  if (!data || typeof data !== "object") data = {};  // whatever else is stored there: start afresh
  const since = Date.now() - WINDOW_MS;
  const figure = (v) => v === null || (typeof v === "number" && Number.isFinite(v));
  for (const w of fleet.workers) {
    const points = Array.isArray(data[w.id]) ? data[w.id] : [];
    w.series = points.filter((p) => p && typeof p.t === "number" && p.t >= since && figure(p.ipm) && figure(p.depth));
  }
}

/* ---------------------------------------------------------------- rendering */
const fmt = (v, digits = 0) => (v === null || v === undefined || Number.isNaN(v) ? "–" : Number(v).toFixed(digits));

function meter(pct, label) {
  if (pct === null || pct === undefined) return el("span", { class: "muted", text: "n/a" });
  return el("span", { class: "meter" },
    el("span", { class: "bar", "aria-hidden": "true" }, el("span", { style: `width:${Math.max(0, Math.min(100, pct))}%` })),
    el("small", { text: label }));
}

function cell(key, content, cls = "") {
  const td = el("td", { "data-k": key, class: cls });
  td.append(content instanceof Node ? content : document.createTextNode(String(content)));
  return td;
}

function renderRow(w) {
  const s = w.down ? {} : (w.stats || {});
  const info = w.info || {};
  const state = w.down ? "down" : (s.state || "unknown");
  const used = s.gpu_memory_used_mb, total = s.gpu_memory_total_mb;
  const memPct = used != null && total ? (100 * used) / total : null;
  const failed15 = w.failures.reduce((a, f) => a + f.n, 0);
  const tr = el("tr", { "data-worker": w.id, class: w.down ? "down" : "" });
  const name = el("span", {}, el("span", { class: "swatch", style: `background:${w.colour}`, "aria-hidden": "true" }), `${w.id}`);
  tr.append(
    cell("id", name),
    cell("state", el("span", { class: `pill ${state}`, title: w.down ? w.downReason : "", text: state })),
    cell("precision", info.precision || w.precision || "–"),
    cell("model", info.model || "–"),
    cell("gpu", meter(s.gpu_utilization_pct, s.gpu_utilization_pct == null ? "" : `${s.gpu_utilization_pct}%`)),
    cell("memory", memPct === null ? el("span", { text: w.down ? "–" : "n/a (CPU)" }) : meter(memPct, `${fmt(used / 1024, 1)} / ${fmt(total / 1024, 0)} GiB`)),
    cell("queued", fmt(s.queued), "num"),
    cell("running", fmt(s.running), "num"),
    cell("ipm", fmt(s.images_last_minute), "num"),
    cell("spi", fmt(s.seconds_per_image, 2), "num"),
    cell("completed", fmt(s.completed), "num"),
    cell("failed", w.down ? "–" : `${fmt(s.failed)}${failed15 ? ` (+${failed15})` : ""}`, "num"),
  );
  return tr;
}

function render() {
  const up = fleet.workers.filter((w) => !w.down && w.stats);
  const sum = (k) => up.reduce((a, w) => a + (Number(w.stats[k]) || 0), 0);
  $("t-up").textContent = `${up.length} / ${fleet.workers.length}`;
  $("t-up").classList.toggle("bad", up.length < fleet.workers.length);
  $("t-queued").textContent = sum("queued");
  $("t-running").textContent = sum("running");
  $("t-ipm").textContent = sum("images_last_minute");
  $("t-completed").textContent = sum("completed");
  const errors = fleet.workers.reduce((a, w) => a + w.failures.reduce((b, f) => b + f.n, 0), 0);
  $("t-errors").textContent = errors;
  $("t-errors").classList.toggle("bad", errors > 0);
  $("t-conn").textContent = fleet.nginx ? fmt(fleet.nginx.active) : "–";
  $("t-rps").textContent = fleet.nginx && fleet.nginx.rps != null ? fmt(fleet.nginx.rps, 1) : "–";

  document.querySelector("#workers tbody").replaceChildren(...fleet.workers.map(renderRow));
  $("events").replaceChildren(...fleet.events.slice(0, 50).map((e) =>
    el("li", { class: e.kind }, el("time", { text: new Date(e.t).toLocaleTimeString() }), el("span", { text: e.text }))));
  $("updated").className = `pill ${up.length === fleet.workers.length ? "ok" : "degraded"}`;
  $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  $("key-form").hidden = !fleet.needKey;
  drawChart($("chart-throughput"), "ipm", $("legend-throughput"));
  drawChart($("chart-queue"), "depth", $("legend-queue"));
}

/* The fleet's sum at each poll: every worker's point of the same tick, 0 for a worker that was down. */
function totalSeries(key) {
  const rounds = new Map();
  for (const w of fleet.workers) {
    for (const p of w.series) {
      rounds.set(p.t, { t: p.t, v: (rounds.get(p.t)?.v || 0) + (p[key] || 0) });
    }
  }
  return [...rounds.values()].sort((a, b) => a.t - b.t).map((r) => ({ t: r.t, [key]: r.v }));
}

function niceMax(v) {
  if (v <= 4) return 4;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

function drawChart(canvas, key, legend) {
  const css = getComputedStyle(document.documentElement);
  const dpr = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 600;
  const height = canvas.clientHeight || 220;
  if (canvas.width !== Math.round(width * dpr)) canvas.width = Math.round(width * dpr);
  if (canvas.height !== Math.round(height * dpr)) canvas.height = Math.round(height * dpr);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, width, height);
  const pad = { l: 36, r: 10, t: 10, b: 22 };
  const now = Date.now();
  const x = (t) => pad.l + ((t - (now - WINDOW_MS)) / WINDOW_MS) * (width - pad.l - pad.r);
  let max = 0;
  for (const w of fleet.workers) for (const p of w.series) if (p[key] != null) max = Math.max(max, p[key]);
  if (fleet.workers.length > 1) for (const p of totalSeries(key)) max = Math.max(max, p[key]);
  max = niceMax(max);
  const y = (v) => height - pad.b - (v / max) * (height - pad.t - pad.b);

  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = css.getPropertyValue("--muted").trim();
  ctx.strokeStyle = css.getPropertyValue("--border").trim();
  ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const v = (max * i) / 4;
    const yy = Math.round(y(v)) + 0.5;
    ctx.beginPath(); ctx.moveTo(pad.l, yy); ctx.lineTo(width - pad.r, yy); ctx.stroke();
    ctx.textAlign = "right"; ctx.textBaseline = "middle";
    ctx.fillText(String(+v.toFixed(1)), pad.l - 6, yy);
  }
  ctx.textAlign = "center"; ctx.textBaseline = "top";
  for (const m of [15, 10, 5, 0]) ctx.fillText(m ? `-${m} min` : "now", Math.min(x(now - m * 60000), width - pad.r - 14), height - pad.b + 6);

  const lines = fleet.workers.map((w) => ({ colour: w.colour, series: w.series }));
  if (fleet.workers.length > 1) lines.push({ colour: css.getPropertyValue("--muted").trim(), series: totalSeries(key), dash: [5, 4] });
  for (const w of lines) {
    ctx.setLineDash(w.dash || []);
    ctx.strokeStyle = w.colour;
    ctx.lineWidth = 2;
    ctx.lineJoin = "round";
    ctx.beginPath();
    let pen = false;
    let last = 0;
    for (const p of w.series) {
      // a gap where the worker was down, or the page was closed
      if (p[key] == null || p.t - last > GAP_MS) pen = false;
      last = p.t;
      if (p[key] == null) continue;
      if (pen) ctx.lineTo(x(p.t), y(p[key])); else ctx.moveTo(x(p.t), y(p[key]));
      pen = true;
    }
    ctx.stroke();
  }
  ctx.setLineDash([]);
  const items = fleet.workers.map((w) => el("span", { style: `--c:${w.colour}`, text: `${w.id} ${w.precision || ""}` }));
  if (fleet.workers.length > 1) items.push(el("span", { class: "total", text: "all workers" }));
  legend.replaceChildren(...items);
}

/* ---------------------------------------------------------------- start */
async function start() {
  const keyForm = $("key-form");
  keyForm.addEventListener("submit", (e) => {
    e.preventDefault();
    const v = $("api-key").value.trim();
    if (v) sessionStorage.setItem(KEY_STORE, v); else sessionStorage.removeItem(KEY_STORE);
    fleet.needKey = false;
  });
  $("interval").textContent = String(POLL_MS / 1000);
  const list = await getJSON("/dashboard/workers.json");
  if (list.status !== 200 || !list.body || !Array.isArray(list.body.workers)) {
    $("error").hidden = false;
    $("error").replaceChildren(el("strong", { text: "No worker list" }),
      el("span", { text: "/dashboard/workers.json did not load: is nginx running with the rendered config?" }));
    return;
  }
  fleet.workers = list.body.workers.map((w, i) => ({
    id: String(w.id), precision: w.precision, colour: PALETTE[i % PALETTE.length],
    stats: null, info: null, infoAt: 0, down: null, downReason: "", series: [], failures: [],
  }));
  restoreSeries();
  window.addEventListener("resize", () => render());
  tick();
}

start();
