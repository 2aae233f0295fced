/* FLUX playground: submits through POST /jobs, follows /jobs/{id}/events (Server-Sent Events read with
   fetch so an Authorization header can go along; EventSource cannot send one), cancels with DELETE.
   The API key lives in sessionStorage (this tab only); the history of images in localStorage. */
"use strict";

const KEY_STORE = "flux.apiKey";
const HISTORY_STORE = "flux.history";
const ACTIVE_STORE = "flux.activeJob";
const HISTORY_MAX = 60;
const SIDE = { min: 256, max: 2048, multiple: 16, maxPixels: 4000000 };

const $ = (id) => document.getElementById(id);
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
};

const state = {
  job: null,            // {id, controller, started, body, route}
  last: null,           // last finished request: {body, result, elapsed}
  features: { loras: [], image: false, mask: false, strength: false },
  defaultSteps: null,
};

/* ---------------------------------------------------------------- API key and requests */
function apiKey() { return sessionStorage.getItem(KEY_STORE) || ""; }

function headers(extra = {}) {
  const h = { ...extra };
  const key = apiKey();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

class ApiError extends Error {
  constructor(status, body, retryAfter) {
    const err = (body && body.error) || {};
    super(err.message || `HTTP ${status}`);
    this.status = status;
    this.code = err.code || `http_${status}`;
    this.field = err.field || null;
    this.retryable = !!err.retryable;
    this.retryAfter = retryAfter;
    this.requestId = err.request_id || null;
  }
}

async function api(method, path, body, signal) {
  const init = { method, headers: headers(body ? { "Content-Type": "application/json" } : {}), signal };
  if (body) init.body = JSON.stringify(body);
  const resp = await fetch(path, init);
  const text = await resp.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = null; }
  if (!resp.ok) throw new ApiError(resp.status, data, resp.headers.get("Retry-After"));
  return data;
}

/* ---------------------------------------------------------------- messages */
function explain(err) {
  if (!(err instanceof ApiError)) {
    return { title: "The server could not be reached", detail: String(err.message || err) };
  }
  const wait = err.retryAfter ? ` Retry after ${err.retryAfter} s.` : "";
  const titles = {
    401: "An API key is required", 403: "Not allowed", 404: "Not found", 413: "The request is too large",
    422: "The request was refused", 429: "Too many requests", 502: "No worker could answer",
    503: "The service is busy", 504: "The request took too long",
  };
  let title = titles[err.status] || `Error ${err.status}`;
  if (err.status === 401) title += apiKey() ? ": the key was not accepted" : ": enter one at the top";
  if (err.status === 503 && err.code === "not_ready") title = "The model is still loading";
  if (err.status === 503 && err.code === "draining") title = "The worker is shutting down";
  if (err.status === 503 && err.code === "out_of_memory") title = "The GPU ran out of memory; try a smaller size";
  const parts = [err.message + (/[.!?]$/.test(err.message) ? "" : ".") + wait];
  const detail = `${err.code}${err.requestId ? ` · request ${err.requestId}` : ""}`;
  return { title, message: parts.join(" "), detail };
}

function showError(err) {
  const box = $("error");
  const { title, message, detail } = explain(err);
  box.replaceChildren(el("strong", { text: title }));
  if (message) box.append(el("span", { class: "message", text: message }));
  if (detail) box.append(el("div", { class: "detail", text: detail }));
  box.hidden = false;
  const field = err instanceof ApiError && err.field ? document.querySelector(`[name="${CSS.escape(err.field)}"]`) : null;
  if (field) { field.setAttribute("aria-invalid", "true"); field.focus(); }
  if (err instanceof ApiError && err.status === 401) $("api-key").focus();
}

function clearError() {
  $("error").hidden = true;
  document.querySelectorAll('[aria-invalid="true"]').forEach((n) => n.removeAttribute("aria-invalid"));
}

let toastTimer;
function toast(text) {
  $("toast").textContent = text;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { $("toast").textContent = ""; }, 2500);
}

/* ---------------------------------------------------------------- the form */

function readForm() {
  const body = { prompt: $("prompt").value };
  const num = (id, key, parse = Number) => { const v = $(id).value.trim(); if (v !== "") body[key] = parse(v); };
  num("width", "width");
  num("height", "height");
  num("steps", "num_inference_steps");
  num("guidance", "guidance_scale");
  num("seed", "seed");
  if ($("format").value) body.output_format = $("format").value;
  if (["jpeg", "webp"].includes($("format").value)) num("quality", "output_quality");
  const loras = [...document.querySelectorAll(".lora-item")]
    .filter((row) => row.querySelector("input[type=checkbox]").checked)
    .map((row) => ({ name: row.dataset.name, scale: Number(row.querySelector("input[type=number]").value || 1) }));
  if (loras.length) body.loras = loras;
  if (state.features.image && state.inputImage) {
    body.image = state.inputImage;
    if (state.features.strength) body.strength = Number($("strength").value);
    if (state.features.mask && state.maskImage) body.mask = state.maskImage;
  }
  return body;
}

/* Checks the browser can make before asking the server (the server's own answer is shown as it is). */
function localProblem(body) {
  if (!body.prompt.trim()) return { field: "prompt", message: "prompt: write something to draw" };
  return null;
}

function fillForm(body, route) {
  $("prompt").value = body.prompt || "";
  // the precision route it was made on, where this deployment still offers the choice
  if (typeof route === "string" && !$("route-field").hidden && [...$("route").options].some((o) => o.value === route)) {
    $("route").value = route;
  }
  $("width").value = body.width ?? 1024;
  $("height").value = body.height ?? 1024;
  syncPreset();
  $("steps").value = body.num_inference_steps ?? "";
  $("guidance").value = body.guidance_scale ?? "";
  $("seed").value = body.seed ?? "";
  $("format").value = body.output_format || "";
  if (body.output_quality) $("quality").value = body.output_quality;
  $("quality-field").hidden = !["jpeg", "webp"].includes($("format").value);
  for (const row of document.querySelectorAll(".lora-item")) {
    const hit = (body.loras || []).find((l) => l.name === row.dataset.name);
    row.querySelector("input[type=checkbox]").checked = !!hit;
    if (hit) row.querySelector("input[type=number]").value = hit.scale;
  }
  $("prompt").focus();
}

function syncPreset() {
  const v = `${$("width").value}x${$("height").value}`;
  const known = [...$("size-preset").options].some((o) => o.value === v);
  $("size-preset").value = known ? v : "custom";
}

function endpointFor(route) { return route ? `/generate/${route}` : "/jobs"; }

function curlFor(body, route) {
  const json = JSON.stringify(body).replace(/'/g, "'\\''");
  const lines = [`curl -s ${location.origin}${endpointFor(route)}`, "-H 'Content-Type: application/json'"];
  if (apiKey()) lines.push('-H "Authorization: Bearer $FLUX_API_KEY"');
  lines.push(`-d '${json}'`);
  return lines.join(" \\\n     ");
}

async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    const area = el("textarea", { class: "visually-hidden" });
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  window.lastCopied = text;
}

/* ---------------------------------------------------------------- job display */
function setJobView(status, detail, fraction) {
  const appearing = $("job").hidden;
  $("job").hidden = false;
  if (appearing) $("job").scrollIntoView({ block: "nearest" });  // on a phone the form is above it
  $("empty").hidden = true;
  const pill = $("job-state");
  pill.className = `pill ${status}`;
  pill.textContent = status;
  $("job-detail").textContent = detail || "";
  const bar = $("progress");
  bar.classList.toggle("indeterminate", fraction === null);
  if (fraction !== null && fraction !== undefined) {
    const pct = Math.round(Math.max(0, Math.min(1, fraction)) * 100);
    bar.setAttribute("aria-valuenow", String(pct));
    bar.firstElementChild.style.width = `${pct}%`;
  }
  $("cancel").hidden = !["queued", "running", "submitting"].includes(status);
}

function eta(s) {
  if (s === null || s === undefined) return "";
  return s < 1 ? " · ETA <1 s" : ` · ETA ${s < 90 ? Math.round(s) + " s" : Math.round(s / 60) + " min"}`;
}

function onJobUpdate(job) {
  if (!state.job || job.job_id !== state.job.id) return;
  if (job.status === "queued") {
    setJobView("queued", `Position ${job.position ?? "?"} in the queue${eta(job.eta_s)}`, 0);
  } else if (job.status === "running") {
    const frac = job.total_steps ? job.step / job.total_steps : 0;
    setJobView("running", `Step ${job.step ?? 0} of ${job.total_steps ?? "?"}${job.cancelling ? " · cancelling" : eta(job.eta_s)}`, frac);
  }
}

function finishJob(job) {
  const current = state.job;
  state.job = null;
  sessionStorage.removeItem(ACTIVE_STORE);
  $("generate").disabled = false;
  if (!current) return;  // cancel() got there first and showed the outcome
  if (job.status === "succeeded") {
    setJobView("succeeded", "", 1);
    showResult(current.body, job.result, (performance.now() - current.started) / 1000, current.route);
  } else {
    setJobView(job.status, job.status === "cancelled" ? "Cancelled." : "", 0);
    if (job.status !== "cancelled" && job.error) showError(new ApiError(500, { error: job.error }, null));
  }
}

function showResult(body, result, elapsed, route) {
  state.last = { body, result, elapsed, route };
  $("seed-reuse").disabled = false;
  $("result").hidden = false;
  $("empty").hidden = true;
  const url = safeUrl(result.image_url) || "";
  $("result-img").src = url;
  $("result-img").alt = `Generated image: ${body.prompt.slice(0, 120)}`;
  $("result-link").href = url;
  $("download").href = url;
  $("download").setAttribute("download", imageName(url));
  const facts = [
    ["Seed", result.seed], ["Size", `${result.width} × ${result.height}`], ["Steps", result.num_inference_steps],
    ["Guidance", result.guidance_scale], ["Precision", result.precision], ["Model", result.model],
    ["GPU", result.gpu ?? "cpu"], ["Format", result.output_format || "png"],
    ["Queue", `${(result.queue_ms / 1000).toFixed(2)} s`],
    ["Generation", result.generate_ms == null ? "–" : `${(result.generate_ms / 1000).toFixed(2)} s`],
    ["Total (browser)", `${elapsed.toFixed(2)} s`],
  ];
  $("result-meta").replaceChildren(...facts.map(([k, v]) => el("div", {}, el("dt", { text: k }), el("dd", { text: String(v) }))));
  addHistory({ body: { ...body, seed: result.seed }, result, elapsed, route, at: Date.now() });
}

/* ---------------------------------------------------------------- SSE over fetch */
async function followEvents(id, signal) {
  const resp = await fetch(`/jobs/${encodeURIComponent(id)}/events`, { headers: headers({ Accept: "text/event-stream" }), signal });
  if (!resp.ok || !resp.body) throw new ApiError(resp.status, await resp.json().catch(() => null), resp.headers.get("Retry-After"));
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let final = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value.replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (event === "done") return final;
      if (!data.length) continue;
      const job = JSON.parse(data.join("\n"));
      if (["succeeded", "failed", "cancelled"].includes(job.status)) final = job;
      else onJobUpdate(job);
    }
  }
  return final;
}

/* Polling, for when the event stream breaks (a proxy that buffers, a dropped connection). */
async function pollUntilDone(id, signal) {
  for (;;) {
    const job = await api("GET", `/jobs/${encodeURIComponent(id)}`, null, signal);
    if (["succeeded", "failed", "cancelled"].includes(job.status)) return job;
    onJobUpdate(job);
    await new Promise((r) => setTimeout(r, 500));
  }
}

/* ---------------------------------------------------------------- submit and cancel */
async function submit(ev) {
  ev?.preventDefault();
  if (state.job) return;
  clearError();
  const body = readForm();
  const problem = localProblem(body);
  if (problem) { showError(new ApiError(422, { error: { code: "invalid_request", ...problem } }, null)); return; }
  const route = $("route-field").hidden ? "" : $("route").value;
  const mine = { id: null, controller: new AbortController(), started: performance.now(), body, route };
  state.job = mine;
  $("generate").disabled = true;
  $("result").hidden = true;
  setJobView("submitting", "Sending…", route ? null : 0);
  await run(mine, async (signal) => {
    if (route) {
      setJobView("running", `Rendering on the ${route} pool…`, null);
      const result = await api("POST", endpointFor(route), body, signal);
      mine.id = result.job_id;
      return { job_id: result.job_id, status: "succeeded", result };
    }
    const job = await api("POST", "/jobs", body, signal);
    mine.id = job.job_id;
    // a reload of the page picks the job up again (this tab only)
    sessionStorage.setItem(ACTIVE_STORE, JSON.stringify({ id: job.job_id, body, at: Date.now() }));
    onJobUpdate(job);
    return follow(job.job_id, signal);
  });
}

/* The job's end: from the event stream, else (a stream that broke) by polling. */
async function follow(id, signal) {
  let final = null;
  try {
    final = await followEvents(id, signal);
  } catch (err) {
    if (signal.aborted) throw err;
  }
  return final || pollUntilDone(id, signal);
}

async function run(mine, work) {
  const { controller } = mine;
  try {
    const final = await work(controller.signal);
    finishJob(final);
  } catch (err) {
    if (state.job !== mine && state.job !== null) return;  // a newer job owns the view
    const aborted = controller.signal.aborted;
    const settled = state.job === null;  // cancel() already showed the outcome
    state.job = null;
    sessionStorage.removeItem(ACTIVE_STORE);
    $("generate").disabled = false;
    if (aborted) { if (!settled) setJobView("cancelled", "Cancelled.", 0); return; }
    $("job").hidden = true;
    $("empty").hidden = !$("result").hidden;
    if (!(err instanceof ApiError && err.status === 404 && mine.resumed)) showError(err);  // expired: nothing to say
  }
}

/* A job this tab started before a reload: follow it to its end. */
async function resume() {
  let saved = null;
  try { saved = JSON.parse(sessionStorage.getItem(ACTIVE_STORE) || "null"); } catch { saved = null; }
  if (!saved || typeof saved.id !== "string" || !saved.body) return;
  const mine = { id: saved.id, controller: new AbortController(), body: saved.body, route: "", resumed: true,
                 started: performance.now() - Math.max(0, Date.now() - saved.at) };
  state.job = mine;
  $("generate").disabled = true;
  fillForm(saved.body);
  setJobView("submitting", "Reconnecting…", 0);
  await run(mine, (signal) => follow(saved.id, signal));
}

async function cancel() {
  const job = state.job;
  if (!job) return;
  $("cancel").disabled = true;
  try {
    if (!job.id) { job.controller.abort(); return; }  // sync routes: hanging up cancels on the worker
    const answer = await api("DELETE", `/jobs/${encodeURIComponent(job.id)}`);
    if (["cancelled", "failed", "succeeded"].includes(answer.status) && state.job === job) {
      job.controller.abort();
      finishJob(answer);
    }
  } catch (err) {
    showError(err);
  } finally {
    $("cancel").disabled = false;
  }
}

/* ---------------------------------------------------------------- history */
/* An image URL the page may show and link: http(s) only (an absolute one from the object store, or ours). */
function safeUrl(url) {
  try { return ["http:", "https:"].includes(new URL(url, location.href).protocol) ? url : null; } catch { return null; }
}

/* The file name to save an image under: the URL's last path segment (a presigned URL's query is no name). */
function imageName(url) {
  try { return decodeURIComponent(new URL(url, location.href).pathname.split("/").pop()) || "image"; } catch { return "image"; }
}

/* The stored history as this page can show it: whatever else is under the key (another version of the page,
   a hand edit, a full quota's leftovers) is dropped rather than break the page. */
function loadHistory() {
  let items;
  try { items = JSON.parse(localStorage.getItem(HISTORY_STORE) || "[]"); } catch { return []; }
  if (!Array.isArray(items)) return [];
  return items.filter((it) => it && typeof it === "object" && it.body && typeof it.body === "object"
    && typeof it.body.prompt === "string" && it.result && typeof it.result === "object"
    && typeof it.result.image_url === "string" && safeUrl(it.result.image_url));
}

function addHistory(entry) {
  // input images stay out of the history: base64 images would fill the storage quota in a few entries
  const { image, mask, ...body } = entry.body;
  const items = [{ ...entry, body }, ...loadHistory()].slice(0, HISTORY_MAX);
  try { localStorage.setItem(HISTORY_STORE, JSON.stringify(items)); } catch { /* full or disabled: keep in page */ }
  renderHistory(items);
}

function renderHistory(items = loadHistory()) {
  $("history").replaceChildren(...items.map((item, i) => {
    const img = el("img", { src: item.result.image_url, alt: item.body.prompt.slice(0, 120), loading: "lazy" });
    img.addEventListener("error", () => img.replaceWith(el("div", { class: "gone", text: "expired on the server" })));
    const when = new Date(item.at).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    return el("li", {},
      el("a", { href: item.result.image_url, target: "_blank", rel: "noopener" }, img),
      el("div", { class: "cap" },
        el("p", { title: item.body.prompt, text: item.body.prompt }),
        el("small", { text: `${item.result.width}×${item.result.height} · seed ${item.result.seed} · ${when}` }),
        el("div", { class: "actions" },
          el("button", { type: "button", class: "small", text: "Use settings", onclick: () => fillForm(item.body, item.route) }),
          el("a", { class: "button small", href: item.result.image_url, download: imageName(item.result.image_url), text: "Download" }),
          el("button", { type: "button", class: "small", "aria-label": `Remove image ${i + 1} from the history`, text: "×",
            onclick: () => { const all = loadHistory(); all.splice(i, 1); try { localStorage.setItem(HISTORY_STORE, JSON.stringify(all)); } catch { /* off */ } renderHistory(all); } }))));
  }));
}

/* ---------------------------------------------------------------- what the deployment offers */
async function probeService() {
  try {
    const info = await api("GET", "/");
    $("service").className = `pill ${info.state}`;
    $("service").textContent = `${info.model} · ${info.precision} · ${info.state}`;
    state.defaultSteps = info.default_steps;
    state.info = info;
    if (info.default_steps) $("steps").placeholder = `default ${info.default_steps}`;
  } catch (err) {
    $("service").className = "pill down";
    $("service").textContent = "service unreachable";
  }
  try {
    const fleet = await fetch("/dashboard/workers.json").then((r) => (r.ok ? r.json() : null));
    const precisions = new Set((fleet?.workers || []).map((w) => w.precision));
    const fast = precisions.has("fp4") || precisions.has("fp8");
    $("route-field").hidden = !(fast && precisions.has("bf16"));
    if (precisions.size > 1 && state.info) {
      $("service").textContent = `${state.info.model} · ${[...precisions].join(" + ")} · ${state.info.state}`;
    }
  } catch { $("route-field").hidden = true; }
  await probeFeatures();
}

/* LoRA and input-image controls appear only when the API offers them: GET /loras for the list, and the
   request schema (OpenAPI) for the image, mask and strength fields. */
async function probeFeatures() {
  let props = {};
  try {
    const spec = await api("GET", "/openapi.json");
    props = spec?.components?.schemas?.GenerateRequest?.properties || {};
  } catch { props = {}; }
  state.features.image = "image" in props;
  state.features.mask = "mask" in props;
  state.features.strength = "strength" in props;
  $("image-field").hidden = !state.features.image;
  $("mask-wrap").hidden = !state.features.mask;
  $("strength-wrap").hidden = !state.features.strength;

  let loras = [];
  try {
    const data = await api("GET", "/loras");
    const list = Array.isArray(data) ? data : (data?.loras || data?.data || []);
    loras = list.map((l) => (typeof l === "string" ? { name: l } : l)).filter((l) => l && l.name);
  } catch { loras = []; }
  state.features.loras = loras;
  $("lora-field").hidden = loras.length === 0;
  $("lora-list").replaceChildren(...loras.map((l, i) => {
    const id = `lora-${i}`;
    return el("div", { class: "lora-item", "data-name": l.name },
      el("input", { type: "checkbox", id }),
      el("label", { for: id, text: l.name, title: l.description || l.name }),
      el("input", { type: "number", min: "-2", max: "2", step: "0.05", value: String(l.default_scale ?? 1), "aria-label": `${l.name} scale` }));
  }));
}

function readFileBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1] || "");
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

/* ---------------------------------------------------------------- wiring */
function init() {
  $("api-key").value = apiKey();
  $("api-key").addEventListener("change", () => {
    const v = $("api-key").value.trim();
    if (v) sessionStorage.setItem(KEY_STORE, v); else sessionStorage.removeItem(KEY_STORE);
    clearError();
    probeFeatures();
  });
  $("key-form").addEventListener("submit", (e) => { e.preventDefault(); $("api-key").dispatchEvent(new Event("change")); });
  $("key-clear").addEventListener("click", () => { $("api-key").value = ""; sessionStorage.removeItem(KEY_STORE); toast("Key forgotten"); });

  $("size-preset").addEventListener("change", () => {
    const v = $("size-preset").value;
    if (v === "custom") { $("width").focus(); return; }
    const [w, h] = v.split("x");
    $("width").value = w;
    $("height").value = h;
  });
  for (const id of ["width", "height"]) $(id).addEventListener("input", syncPreset);
  $("format").addEventListener("change", () => { $("quality-field").hidden = !["jpeg", "webp"].includes($("format").value); });
  $("seed-random").addEventListener("click", () => { $("seed").value = ""; toast("The server will draw a seed"); });
  $("seed-reuse").addEventListener("click", () => { if (state.last) $("seed").value = state.last.result.seed; });
  $("strength").addEventListener("input", () => { $("strength-out").textContent = Number($("strength").value).toFixed(2); });
  $("init-image").addEventListener("change", async () => {
    const f = $("init-image").files[0];
    state.inputImage = f ? await readFileBase64(f) : null;
  });
  $("mask-image").addEventListener("change", async () => {
    const f = $("mask-image").files[0];
    state.maskImage = f ? await readFileBase64(f) : null;
  });

  $("gen-form").addEventListener("submit", submit);
  $("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) submit(e); });
  $("cancel").addEventListener("click", cancel);
  $("copy-curl-form").addEventListener("click", async () => {
    await copyText(curlFor(readForm(), $("route-field").hidden ? "" : $("route").value));
    toast("curl command copied");
  });
  $("copy-curl").addEventListener("click", async () => {
    if (!state.last) return;
    await copyText(curlFor(state.last.body, state.last.route));
    toast("curl command copied");
  });
  $("reuse").addEventListener("click", () => state.last && fillForm({ ...state.last.body, seed: state.last.result.seed }, state.last.route));
  $("history-clear").addEventListener("click", () => { localStorage.removeItem(HISTORY_STORE); renderHistory([]); });

  renderHistory();
  probeService();
  resume();
}

init();
