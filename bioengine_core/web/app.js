// BioEngine web page: plain JavaScript, no build step, nothing loaded from the network.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { models: [], input: null, inputBitmap: null, output: null, outputBytes: null, counts: [], errors: [], lastTotal: null, lastErrors: 0 };

// ---------------------------------------------------------------- API
function authHeaders() {
  const token = $("token").value.trim();
  return token ? { Authorization: "Bearer " + token } : {};
}

async function api(path, options = {}) {
  const resp = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  if (!resp.ok) {
    let text = resp.status + " " + resp.statusText;
    try { const body = await resp.json(); if (body.error) text = body.error; } catch (e) { /* not JSON */ }
    throw new Error(text);
  }
  return resp;
}

function showMessage(text) {
  const el = $("message");
  el.textContent = text || "";
  el.hidden = !text;
}

// ---------------------------------------------------------------- views
function showView(name) {
  for (const button of document.querySelectorAll("nav button")) {
    if (button.dataset.view === name) button.setAttribute("aria-current", "page");
    else button.removeAttribute("aria-current");
  }
  for (const section of document.querySelectorAll("main section")) section.hidden = section.id !== "view-" + name;
  showMessage("");
  if (name === "status") pollStatus();
}

document.querySelectorAll("nav button").forEach((b) => b.addEventListener("click", () => showView(b.dataset.view)));
$("token").value = sessionStorage.getItem("bioengine-token") || "";
$("token").addEventListener("change", () => { sessionStorage.setItem("bioengine-token", $("token").value); loadModels(); });

// ---------------------------------------------------------------- models
function text(tag, content, cls) {
  const el = document.createElement(tag);
  el.textContent = content;
  if (cls) el.className = cls;
  return el;
}

function tensorLine(t) {
  const shape = (t.shape || []).map((s) => (s < 0 ? "?" : s));
  return `${t.id}: ${t.dtype} [${(t.axes || []).map((a, i) => a + "=" + shape[i]).join(", ")}]`;
}

async function loadModels() {
  const q = $("search").value.trim();
  try {
    const resp = await api("/bioengine/models?q=" + encodeURIComponent(q));
    state.models = await resp.json();
  } catch (e) {
    showMessage("Cannot list models: " + e.message);
    return;
  }
  const list = $("model-list");
  list.replaceChildren();
  for (const m of state.models) {
    const li = document.createElement("li");
    li.className = "card";
    li.dataset.model = m.id;
    li.append(text("h3", m.name || m.id));
    li.append(text("p", m.description || ""));
    const tags = document.createElement("p");
    for (const t of m.tags || []) tags.append(text("span", t, "tag"));
    li.append(tags);
    for (const t of m.inputs || []) li.append(text("div", "in  " + tensorLine(t), "tensor"));
    for (const t of m.outputs || []) li.append(text("div", "out " + tensorLine(t), "tensor"));
    const p = document.createElement("p");
    p.append(text("span", `id ${m.id} · ${m.weight_format || ""} · ${m.state || ""} `));
    const tryButton = text("button", "Try it");
    tryButton.type = "button";
    tryButton.addEventListener("click", () => { $("try-model").value = m.id; showView("try"); });
    p.append(tryButton);
    const detailsButton = text("button", "Details");
    detailsButton.type = "button";
    detailsButton.setAttribute("aria-expanded", "false");
    detailsButton.addEventListener("click", () => showDetails(m.id, li, detailsButton));
    p.append(" ", detailsButton);
    li.append(p);
    list.append(li);
  }
  if (!state.models.length) list.append(text("li", "No model matches."));
  for (const select of [$("try-model"), $("test-model")]) {
    const current = select.value;
    select.replaceChildren(...state.models.map((m) => { const o = text("option", m.id); o.value = m.id; return o; }));
    if (current && state.models.some((m) => m.id === current)) select.value = current;
  }
}

async function showDetails(id, li, button) {
  const old = li.querySelector(".details");
  if (old) { old.remove(); button.setAttribute("aria-expanded", "false"); return; }
  try {
    const d = (await (await api("/bioengine/models/" + encodeURIComponent(id))).json()).description || {};
    const box = document.createElement("dl");
    box.className = "details";
    const names = (list) => (list || []).map((a) => (typeof a === "string" ? a : a.name || "")).filter(Boolean).join("; ");
    for (const [label, value] of [["Authors", names(d.authors)], ["License", d.license],
      ["Format", d.format_version], ["Cite", names(d.cite && d.cite.map((c) => ({ name: c.text || c.doi || c.url })))],
      ["Documentation", typeof d.documentation === "string" ? d.documentation : ""]]) {
      if (!value) continue;
      box.append(text("dt", label), text("dd", String(value)));
    }
    li.append(box);
    button.setAttribute("aria-expanded", "true");
  } catch (e) { showMessage("Cannot read the description of " + id + ": " + e.message); }
}

$("search-form").addEventListener("submit", (ev) => { ev.preventDefault(); loadModels(); });

// ---------------------------------------------------------------- .npy
const DTYPES = { f4: Float32Array, f8: Float64Array, i1: Int8Array, u1: Uint8Array, i2: Int16Array, u2: Uint16Array, i4: Int32Array, u4: Uint32Array, b1: Uint8Array };

function parseNpy(buffer) {
  const bytes = new Uint8Array(buffer);
  if (bytes[0] !== 0x93 || String.fromCharCode(...bytes.slice(1, 6)) !== "NUMPY") throw new Error("not a .npy file");
  const major = bytes[6];
  const view = new DataView(buffer);
  const headerLen = major === 1 ? view.getUint16(8, true) : view.getUint32(8, true);
  const start = major === 1 ? 10 : 12;
  const header = new TextDecoder().decode(bytes.slice(start, start + headerLen));
  const descr = /'descr':\s*'([<>|=])(\w\d)'/.exec(header);
  const shapeText = /'shape':\s*\(([^)]*)\)/.exec(header);
  if (!descr || !shapeText) throw new Error("unreadable .npy header");
  if (/'fortran_order':\s*True/.test(header)) throw new Error("Fortran-ordered .npy is not shown");
  const shape = shapeText[1].split(",").map((s) => s.trim()).filter(Boolean).map(Number);
  const offset = start + headerLen;
  let data;
  if (descr[2] === "i8" || descr[2] === "u8") {
    const big = new (descr[2] === "i8" ? BigInt64Array : BigUint64Array)(buffer.slice(offset));
    data = Float64Array.from(big, Number);
  } else {
    const Kind = DTYPES[descr[2]];
    if (!Kind) throw new Error("dtype " + descr[2] + " is not shown");
    data = new Kind(buffer.slice(offset));
  }
  return { shape, data };
}

// ---------------------------------------------------------------- drawing
const CMAPS = {
  gray: (t) => [t * 255, t * 255, t * 255],
  viridis: (t) => [255 * (0.267 + t * (0.993 - 0.267) * t), 255 * (0.005 + 0.9 * t), 255 * (0.33 + 0.4 * Math.sin(Math.PI * t) - 0.2 * t)],
  magma: (t) => [255 * Math.min(1, 1.3 * t), 255 * t * t, 255 * (0.4 + 0.6 * Math.sin(Math.PI * t * 0.9))],
};

function slices(arr) {
  const s = arr.shape;
  const h = s[s.length - 2] || 1, w = s[s.length - 1] || 1;
  return { h, w, n: Math.max(1, arr.data.length / (h * w)) };
}

function plane(arr, index) {
  const { h, w, n } = slices(arr);
  const k = Math.min(index, n - 1);
  return { h, w, values: arr.data.subarray(k * h * w, (k + 1) * h * w) };
}

function range(values) {
  let lo = Infinity, hi = -Infinity;
  for (const v of values) { if (v < lo) lo = v; if (v > hi) hi = v; }
  return [lo, hi];
}

function draw(canvas, arr, index, maskArr) {
  const ctx = canvas.getContext("2d");
  const { h, w, values } = plane(arr, index);
  canvas.width = w; canvas.height = h;
  const [lo, hi0] = range(values);
  const hi = lo + (hi0 - lo) * Number($("contrast").value) / 100;
  const cmap = CMAPS[$("cmap").value];
  const img = ctx.createImageData(w, h);
  const alpha = Number($("overlay").value) / 100;
  const mask = maskArr ? plane(maskArr, index) : null;
  const [mlo, mhi] = mask ? range(mask.values) : [0, 1];
  for (let i = 0; i < values.length; i++) {
    const t = hi > lo ? Math.min(1, Math.max(0, (values[i] - lo) / (hi - lo))) : 0;
    let [r, g, b] = cmap(t);
    if (mask && mask.values.length === values.length && alpha > 0) {
      const m = mhi > mlo ? (mask.values[i] - mlo) / (mhi - mlo) : 0;
      if (m > 0.5) { r = r * (1 - alpha) + 255 * alpha; g *= 1 - alpha; b *= 1 - alpha; }
    }
    img.data[4 * i] = r; img.data[4 * i + 1] = g; img.data[4 * i + 2] = b; img.data[4 * i + 3] = 255;
  }
  ctx.putImageData(img, 0, 0);
}

function redraw() {
  const index = Number($("slice").value);
  const inCanvas = $("in-canvas");
  if (state.input) draw(inCanvas, state.input, index, state.output);
  else if (state.inputBitmap) {
    inCanvas.width = state.inputBitmap.width; inCanvas.height = state.inputBitmap.height;
    inCanvas.getContext("2d").drawImage(state.inputBitmap, 0, 0);
  }
  if (state.output) draw($("out-canvas"), state.output, index, null);
}

for (const id of ["cmap", "contrast", "overlay", "slice"]) $(id).addEventListener("input", redraw);

// ---------------------------------------------------------------- try it
function setSlices() {
  const n = Math.max(state.input ? slices(state.input).n : 1, state.output ? slices(state.output).n : 1);
  $("slice").max = String(n - 1);
  if (Number($("slice").value) > n - 1) $("slice").value = "0";
  $("slice-label").hidden = n <= 1;
}

async function runTry(buffer, name) {
  const model = $("try-model").value;
  if (!model) { showMessage("Choose a model first."); return; }
  showMessage("");
  state.output = null; state.outputBytes = null; state.input = null; state.inputBitmap = null;
  $("download").disabled = true;
  $("download-tiff").disabled = true;
  $("out-shape").textContent = "";
  try { state.input = parseNpy(buffer); } catch (e) {
    try { state.inputBitmap = await createImageBitmap(new Blob([buffer])); } catch (e2) { /* TIFF: no preview */ }
  }
  $("in-shape").textContent = state.input ? "[" + state.input.shape.join(", ") + "]" : name;
  setSlices(); redraw();
  $("try-state").textContent = "Running " + model + " on " + name + " ...";
  try {
    const resp = await api("/bioengine/models/" + encodeURIComponent(model) + "/try", {
      method: "POST", body: buffer, headers: { "Content-Type": "application/octet-stream" },
    });
    state.outputBytes = await resp.arrayBuffer();
    state.output = parseNpy(state.outputBytes);
    $("out-shape").textContent = (resp.headers.get("X-Output-Id") || "") + " [" + state.output.shape.join(", ") + "]";
    $("download").disabled = false;
    $("download-tiff").disabled = false;
    $("try-state").textContent = "Done: " + model + " on " + name + ".";
    setSlices(); redraw();
  } catch (e) {
    $("try-state").textContent = "Failed.";
    showMessage("The model could not run on " + name + ": " + e.message);
  }
}

$("use-sample").addEventListener("click", async () => {
  const model = $("try-model").value;
  try {
    const resp = await api("/bioengine/models/" + encodeURIComponent(model) + "/sample");
    await runTry(await resp.arrayBuffer(), "test input of " + model);
  } catch (e) { showMessage("No test input: " + e.message); }
});

$("upload").addEventListener("change", async () => {
  const file = $("upload").files[0];
  if (file) await runTry(await file.arrayBuffer(), file.name);
  $("upload").value = "";
});

$("download").addEventListener("click", () => {
  if (state.outputBytes) save(state.outputBytes, ($("try-model").value || "result") + "-output.npy");
});

// A float32 TIFF of the result, one page per 2D plane (uncompressed, little-endian).
function tiffBytes(arr) {
  const { h, w, n } = slices(arr);
  const ifdSize = 2 + 10 * 12 + 4 + 2; // padded: the float data starts on a 4-byte boundary
  const planeBytes = h * w * 4;
  const buffer = new ArrayBuffer(8 + n * (ifdSize + planeBytes));
  const view = new DataView(buffer);
  view.setUint16(0, 0x4949); view.setUint16(2, 42, true); view.setUint32(4, 8, true);
  let at = 8;
  for (let k = 0; k < n; k++) {
    const data = at + ifdSize;
    const tags = [[256, 4, w], [257, 4, h], [258, 3, 32], [259, 3, 1], [262, 3, 1],
      [273, 4, data], [277, 3, 1], [278, 4, h], [279, 4, planeBytes], [339, 3, 3]];
    view.setUint16(at, tags.length, true);
    tags.forEach(([tag, type, value], i) => {
      const e = at + 2 + 12 * i;
      view.setUint16(e, tag, true); view.setUint16(e + 2, type, true); view.setUint32(e + 4, 1, true);
      if (type === 3) view.setUint16(e + 8, value, true); else view.setUint32(e + 8, value, true);
    });
    const next = k + 1 < n ? data + planeBytes : 0;
    view.setUint32(at + 2 + 12 * tags.length, next, true);
    new Float32Array(buffer, data, h * w).set(plane(arr, k).values);
    at = data + planeBytes;
  }
  return buffer;
}

function save(bytes, name) {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(new Blob([bytes], { type: "application/octet-stream" }));
  a.download = name;
  document.body.append(a); a.click(); a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
}

$("download-tiff").addEventListener("click", () => {
  if (state.output) save(tiffBytes(state.output), ($("try-model").value || "result") + "-output.tif");
});

// ---------------------------------------------------------------- test
$("run-test").addEventListener("click", async () => {
  const model = $("test-model").value;
  const result = $("test-result"), table = $("test-table");
  table.hidden = true;
  result.className = "";
  result.textContent = "Testing " + model + " ...";
  $("run-test").disabled = true;
  try {
    const report = await (await api("/bioengine/models/" + encodeURIComponent(model) + "/test", { method: "POST" })).json();
    result.className = report.passed ? "passed" : "failed";
    result.textContent = `${model}: ${report.passed ? "passed" : "failed"}` +
      (report.execution_time ? ` in ${report.execution_time.toFixed(2)} s` : "") + (report.error ? " - " + report.error : "");
    const body = table.querySelector("tbody");
    body.replaceChildren();
    for (const [id, o] of Object.entries(report.outputs || {})) {
      const tr = document.createElement("tr");
      for (const v of [id, o.passed ? "passed" : "failed", o.max_abs_error, o.max_rel_error, o.mismatched_elements ?? o.error])
        tr.append(text("td", typeof v === "number" ? v.toExponential(2) : String(v ?? "")));
      body.append(tr);
    }
    table.hidden = !Object.keys(report.outputs || {}).length;
  } catch (e) {
    result.textContent = "";
    showMessage("The test could not run: " + e.message);
  } finally { $("run-test").disabled = false; }
});

// ---------------------------------------------------------------- status
let statusTimer = null;

async function pollStatus() {
  clearTimeout(statusTimer);
  if ($("view-status").hidden) return;
  try {
    const s = await (await api("/bioengine/status")).json();
    $("status-summary").textContent = `${s.ready_replicas ?? "?"} of ${s.target_replicas ?? "?"} replicas ready · deployment ${s.deployment ?? ""}`;
    const rows = $("replica-rows");
    rows.replaceChildren();
    for (const r of s.replicas || []) {
      const tr = document.createElement("tr");
      tr.className = "replica";
      for (const v of [r.id, r.state + (r.reason ? " (" + r.reason + ")" : ""), r.routed]) tr.append(text("td", String(v ?? "")));
      rows.append(tr);
    }
    const models = $("status-models");
    models.replaceChildren(...(s.models || []).map((m) => text("li", typeof m === "string" ? m : `${m.id ?? m.name} ${m.state ?? ""}`)));
    try {
      const metrics = await (await api("/metrics")).text();
      const m = readMetrics(metrics);
      if (state.lastTotal !== null) {
        state.counts.push(Math.max(0, m.total - state.lastTotal));
        state.errors.push(Math.max(0, m.errors - state.lastErrors));
      }
      state.lastTotal = m.total;
      state.lastErrors = m.errors;
      state.counts = state.counts.slice(-60);
      state.errors = state.errors.slice(-60);
      $("latency").textContent = m.count
        ? `${m.total} requests, ${m.errors} errors since start; latency p50 ≤ ${m.p50} s, p95 ≤ ${m.p95} s`
        : "no requests yet";
      plot();
    } catch (e) { /* metrics need the admin role */ }
  } catch (e) {
    showMessage("Cannot read the status: " + e.message);
  }
  statusTimer = setTimeout(pollStatus, 2000);
}

// Request and error totals and latency percentiles (upper bucket bounds) from /metrics.
function readMetrics(text) {
  let total = 0, errors = 0;
  const buckets = new Map();
  for (const line of text.split("\n")) {
    const value = Number(line.split(" ").pop()) || 0;
    if (line.startsWith("bioengine_requests_total{")) {
      total += value;
      if (line.includes('status="error"')) errors += value;
    } else if (line.startsWith("bioengine_request_latency_seconds_bucket{")) {
      const le = /le="([^"]+)"/.exec(line);
      if (le) buckets.set(le[1], (buckets.get(le[1]) || 0) + value);
    }
  }
  const bounds = [...buckets.keys()].sort((a, b) => Number(a) - Number(b));
  const count = buckets.get("+Inf") || 0;
  const quantile = (q) => bounds.find((b) => buckets.get(b) >= q * count) || "?";
  return { total, errors, count, p50: quantile(0.5), p95: quantile(0.95) };
}

function plot() {
  const svg = $("plot");
  const n = state.counts.length;
  const max = Math.max(1, ...state.counts);
  const line = (series, colour) => `<polyline fill="none" stroke="${colour}" stroke-width="1.5" points="` +
    series.map((c, i) => `${(i / Math.max(1, n - 1)) * 290 + 5},${75 - (c / max) * 65}`).join(" ") + '"/>';
  svg.innerHTML = line(state.counts, "#0b3d5c") + line(state.errors, "#c0392b") +
    `<text x="5" y="10" font-size="8">requests (blue), errors (red); max ${max} per 2 s</text>`;
}

loadModels();
