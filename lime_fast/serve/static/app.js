// The page at /: pick a picture, optionally draw or upload a mask, POST /v1/edit (JSON answer), show
// input, RoI overlay, heatmap and result; then fix the region (click segments, brush) and POST
// /v1/refine with the answer's session. No framework, no build step, nothing loaded from elsewhere.
"use strict";
const $ = (id) => document.getElementById(id);
let secondsPerBatch = null;  // the server's recent seconds per batch (/healthz), for the progress estimate
let maskDrawn = false;

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function showWarnings(messages) {
  // what the server adjusted in this edit (a shrunk picture, how a mask was read, ...)
  const list = $("warnings");
  list.replaceChildren(...messages.map((m) => Object.assign(document.createElement("li"), { textContent: m })));
  list.hidden = !messages.length;
}

// A picture is shown only once it has loaded: one with no source, or one that fails to load (a file
// the browser cannot read), stays hidden and its grey frame shows instead of a broken-image icon.
const PICS = ["input", "overlay", "heatmap", "result", "fixinput", "segids", "before", "refined"];
for (const id of PICS) {
  $(id).addEventListener("load", () => { $(id).hidden = false; });
  $(id).addEventListener("error", () => { $(id).hidden = true; });
}

function setPic(id, src) {
  const img = $(id);
  img.hidden = true;
  if (src) img.src = src; else img.removeAttribute("src");
}

const png = (b64) => (b64 ? "data:image/png;base64," + b64 : "");

function clearResults() {
  for (const id of ["overlay", "heatmap", "result"]) setPic(id, "");
  showWarnings([]);
  $("info").textContent = "";
  $("fix").hidden = true;
}

function authHeaders() {
  const t = $("token").value.trim();
  return t ? { Authorization: "Bearer " + t } : {};
}

async function refreshHealth() {
  try {
    const h = await (await fetch("/healthz")).json();
    $("model").textContent = h.model;
    secondsPerBatch = h.seconds_per_batch;
    $("token").hidden = $("tokenlabel").hidden = !h.auth;
    return h;
  } catch (e) {
    showError("the server does not answer /healthz: " + e);
    return null;
  }
}

async function loadDefaults() {
  if (!$("token").hidden && !$("token").value.trim()) return;  // asked again once a token is typed
  const r = await fetch("/v1/models", { headers: authHeaders() });
  if (!r.ok) return;  // 401 before a token is typed: defaults stay as placeholders
  const cfg = (await r.json()).data[0].default_config;
  for (const name of ["steps", "seed", "text_guidance", "image_guidance", "top_k"]) $(name).placeholder = cfg[name];
}

// --- the input picture and the mask canvas (same pixel size as the picture) ---
$("image").addEventListener("change", () => {
  const file = $("image").files[0];
  if (!file) return;
  const img = $("input");
  img.onload = () => {
    const c = $("maskcanvas");
    c.width = img.naturalWidth;
    c.height = img.naturalHeight;
    maskDrawn = false;
  };
  img.onerror = () => showError("the browser cannot show this file as a picture; the server may refuse it too");
  showError("");
  setPic("input", URL.createObjectURL(file));
  clearResults();
});

function canvasPoint(ev, c = $("maskcanvas")) {
  // the canvas is shown 'contain'-fitted in a square: map the pointer to its pixels
  const r = c.getBoundingClientRect();
  const scale = Math.min(r.width / c.width, r.height / c.height);
  const ox = (r.width - c.width * scale) / 2, oy = (r.height - c.height * scale) / 2;
  return [(ev.clientX - r.left - ox) / scale, (ev.clientY - r.top - oy) / scale];
}

let drawing = false;
function paint(ev) {
  if (!drawing || !$("draw").checked) return;
  dot($("maskcanvas"), ev, Number($("brush").value), "rgb(255, 40, 40)");
  maskDrawn = true;
}
$("maskcanvas").addEventListener("pointerdown", (ev) => { drawing = true; paint(ev); });
$("maskcanvas").addEventListener("pointermove", paint);
window.addEventListener("pointerup", () => { drawing = false; });
$("clearmask").addEventListener("click", () => {
  const c = $("maskcanvas");
  c.getContext("2d").clearRect(0, 0, c.width, c.height);
  maskDrawn = false;
  $("maskfile").value = "";
});

function dot(c, ev, radiusSetting, colour) {
  // one brush dot at the pointer; the radius is in 256ths of the picture's long side
  const ctx = c.getContext("2d");
  const [x, y] = canvasPoint(ev, c);
  ctx.fillStyle = colour;
  ctx.beginPath();
  ctx.arc(x, y, Math.max(0.5, radiusSetting * Math.max(c.width, c.height) / 256), 0, 2 * Math.PI);
  ctx.fill();
}

function drawnMaskBlob(c = $("maskcanvas")) {
  // painted pixels -> white, the rest black, as a PNG of the canvas's (the picture's) size
  const src = c.getContext("2d").getImageData(0, 0, c.width, c.height);
  const out = document.createElement("canvas");
  out.width = c.width;
  out.height = c.height;
  const octx = out.getContext("2d");
  const dst = octx.createImageData(c.width, c.height);
  for (let i = 0; i < src.data.length; i += 4) {
    const v = src.data[i + 3] > 0 ? 255 : 0;
    dst.data[i] = dst.data[i + 1] = dst.data[i + 2] = v;
    dst.data[i + 3] = 255;
  }
  octx.putImageData(dst, 0, 0);
  return new Promise((resolve) => out.toBlob(resolve, "image/png"));
}

// --- submitting ---
function post(form) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/v1/edit?format=json");
    for (const [k, v] of Object.entries(authHeaders())) xhr.setRequestHeader(k, v);
    xhr.responseType = "json";
    xhr.upload.onprogress = (ev) => {
      if (ev.lengthComputable) setProgress(0.1 * ev.loaded / ev.total, "uploading");
    };
    xhr.onload = () => resolve(xhr);
    xhr.onerror = () => reject(new Error("the request failed (is the server running?)"));
    xhr.send(form);
  });
}

function setProgress(value, text) {
  $("bar").value = value;
  $("status").textContent = text;
}

$("form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  showError("");
  const file = $("image").files[0];
  if (!file) return showError("choose a picture first");
  setProgress(0, "sending…");  // at once: the previous edit's "done" or "failed" is not this one's
  const form = new FormData();
  form.append("image", file);
  form.append("instruction", $("instruction").value);
  if ($("maskfile").files[0]) form.append("mask", $("maskfile").files[0]);
  else if (maskDrawn) form.append("mask", await drawnMaskBlob(), "mask.png");
  for (const name of ["steps", "seed", "text_guidance", "image_guidance", "top_k", "roi_words"]) {
    const v = $(name).value.trim();
    if (v) form.append(name, v);
  }
  $("submit").disabled = true;
  clearResults();  // a failed edit must not leave the previous one's pictures looking like its result
  const t0 = performance.now();
  // No per-step progress comes from the server: the bar is an estimate from its recent seconds per
  // batch (the time one request takes once it runs), and the elapsed time is shown as it is.
  const timer = setInterval(() => {
    const s = (performance.now() - t0) / 1000;
    const est = secondsPerBatch ? Math.max(secondsPerBatch, 0.5) : null;
    const frac = est ? Math.min(0.95, 0.1 + 0.9 * s / est) : 0.5;
    setProgress(frac, `editing… ${s.toFixed(1)} s` + (est ? ` (usually ~${est.toFixed(1)} s)` : ""));
  }, 100);
  try {
    const xhr = await post(form);
    const body = xhr.response || {};
    if (xhr.status !== 200) throw new Error(`${xhr.status}: ${body.error || xhr.statusText}`);
    setPic("overlay", png(body.overlay_png));
    setPic("heatmap", png(body.heatmap_png));
    setPic("result", png(body.image_png));
    showWarnings(body.warnings || []);
    const words = body.tokens.length ? body.tokens.join(", ") : "(none: " + (body.fallback || "mask given") + ")";
    $("info").textContent = `content words: ${words}; silenced: ${body.silenced.join(", ") || "-"}; ` +
      `RoI ${(100 * body.roi_area).toFixed(1)}% of the picture; batch of ${body.batch_size}; ` +
      `waited ${body.queue_seconds.toFixed(2)} s, edit ${body.timings.total.toFixed(2)} s; ${body.unet_evals} UNet evaluations`;
    setProgress(1, `done in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
    startFix(body, true);
  } catch (e) {
    setProgress(0, "failed");
    clearResults();
    showError(e.message);
  } finally {
    clearInterval(timer);
    $("submit").disabled = false;
    refreshHealth();
  }
});

// --- fixing the region: POST /v1/refine with the last answer's session ---
// fix: the last answer (its session, segment grid [gh][gw] of ids, RoI grid [gh][gw] of 0/1 and RoI
// segments) and the changes made here: `selected` starts as the RoI's segments; a click toggles one.
// What is sent is the difference: add = selected - base, remove = base - selected, as refine takes it.
// window.limePage shows it (the tests and the console read it).
const fix = { session: null, grid: null, roi: null, base: new Set(), selected: new Set(), brushed: null,
              imagePng: null, first: null, last: null };
window.limePage = fix;

function fixTool() {
  return document.querySelector('input[name="fixtool"]:checked').value;  // click, add or cut
}

function cellAt(c, x, y) {
  // canvas pixel -> [row, col] of the grid: cell (floor(y * gh / H), floor(x * gw / W)), as the server says
  const gh = fix.roi.length, gw = fix.roi[0].length;
  return [Math.min(gh - 1, Math.floor(y * gh / c.height)), Math.min(gw - 1, Math.floor(x * gw / c.width))];
}

function inRegion(gy, gx) {
  // the region after this page's changes: a toggled segment is wholly in or out, the rest as the RoI says
  if (fix.grid) {
    const s = fix.grid[gy][gx];
    if (fix.selected.has(s) && !fix.base.has(s)) return true;
    if (!fix.selected.has(s) && fix.base.has(s)) return false;
  }
  return fix.roi[gy][gx] === 1;
}

function drawRegion() {
  // the region tinted red, the segments' borders as thin dark lines
  const c = $("regioncanvas"), ctx = c.getContext("2d");
  const img = ctx.createImageData(c.width, c.height);
  const seg = (gy, gx) => (fix.grid ? fix.grid[gy][gx] : 0);
  for (let y = 0; y < c.height; y++) {
    for (let x = 0; x < c.width; x++) {
      const [gy, gx] = cellAt(c, x, y), i = 4 * (y * c.width + x);
      const [ry, rx] = cellAt(c, Math.min(c.width - 1, x + 1), Math.min(c.height - 1, y + 1));
      if (seg(gy, rx) !== seg(gy, gx) || seg(ry, gx) !== seg(gy, gx)) img.data.set([20, 20, 20, 210], i);
      else if (inRegion(gy, gx)) img.data.set([255, 30, 30, 150], i);
    }
  }
  ctx.putImageData(img, 0, 0);
}

function describeFix() {
  const added = [...fix.selected].filter((s) => !fix.base.has(s)).sort((a, b) => a - b);
  const removed = [...fix.base].filter((s) => !fix.selected.has(s)).sort((a, b) => a - b);
  const parts = [fix.grid ? `region segments: ${[...fix.selected].sort((a, b) => a - b).join(", ") || "none"}`
                          : "this edit used a painted mask, so nothing was segmented: use the brush"];
  if (added.length) parts.push(`adding ${added.join(", ")}`);
  if (removed.length) parts.push(`removing ${removed.join(", ")}`);
  if (fix.brushed) parts.push(`the brush ${fix.brushed === "add" ? "adds" : "cuts"} what it painted`);
  $("fixinfo").textContent = parts.join("; ");
  return { added, removed };
}

function clearBrush() {
  const c = $("fixbrush");
  c.getContext("2d").clearRect(0, 0, c.width, c.height);
  fix.brushed = null;
}

function startFix(body, first) {
  // a new answer to fix: its session, grids and picture; the first answer also sizes the canvases
  Object.assign(fix, { session: body.session, grid: body.segment_grid, roi: body.roi_grid, imagePng: body.image_png,
                       base: new Set(body.roi_segments || []), last: body });
  fix.selected = new Set(fix.base);
  if (first) {
    fix.first = body;
    const long = Math.max(body.width, body.height), k = Math.min(512, Math.max(256, long)) / long;
    Object.assign($("regioncanvas"), { width: Math.round(body.width * k), height: Math.round(body.height * k) });
    Object.assign($("fixbrush"), { width: body.width, height: body.height });  // the mask sent: the input's size
    setPic("fixinput", $("input").src);
    setPic("before", "");
    setPic("refined", "");
  }
  setPic("segids", png(body.segment_ids_png));
  $("toolclick").disabled = !fix.grid;
  if (!fix.grid && fixTool() === "click") $("tooladd").checked = true;
  $("fixstage").classList.toggle("brushing", fixTool() !== "click");
  clearBrush();
  drawRegion();
  describeFix();
  $("fix").hidden = !body.session;
}

$("regioncanvas").addEventListener("click", (ev) => {
  if (!fix.grid || fixTool() !== "click") return;
  const c = $("regioncanvas"), [x, y] = canvasPoint(ev, c);
  if (x < 0 || y < 0 || x >= c.width || y >= c.height) return;  // the frame's margin, not the picture
  const [gy, gx] = cellAt(c, x, y), s = fix.grid[gy][gx];
  if (fix.selected.has(s)) fix.selected.delete(s); else fix.selected.add(s);
  drawRegion();
  describeFix();
});

let fixPainting = false;
function paintFix(ev) {
  if (!fixPainting || fixTool() === "click") return;
  dot($("fixbrush"), ev, Number($("fixsize").value), fixTool() === "add" ? "rgb(40, 200, 80)" : "rgb(30, 60, 220)");
  fix.brushed = fixTool();
  describeFix();
}
$("fixbrush").addEventListener("pointerdown", (ev) => { fixPainting = true; paintFix(ev); });
$("fixbrush").addEventListener("pointermove", paintFix);
window.addEventListener("pointerup", () => { fixPainting = false; });
for (const id of ["toolclick", "tooladd", "toolcut"]) {
  $(id).addEventListener("change", () => {
    const tool = fixTool();
    $("fixstage").classList.toggle("brushing", tool !== "click");
    // one painted mask per apply, which either adds or cuts: strokes of the other kind are dropped
    if (tool !== "click" && fix.brushed && fix.brushed !== tool) clearBrush();
    describeFix();
  });
}
$("fixreset").addEventListener("click", () => {
  fix.selected = new Set(fix.base);
  clearBrush();
  drawRegion();
  describeFix();
});

$("apply").addEventListener("click", async () => {
  showError("");
  const { added, removed } = describeFix();
  const form = new FormData();
  form.append("session", fix.session);
  if (added.length) form.append("add", added.join(","));
  if (removed.length) form.append("remove", removed.join(","));
  if (fix.brushed) {
    form.append("mask", await drawnMaskBlob($("fixbrush")), "region.png");
    form.append("mask_mode", fix.brushed);
  }
  $("apply").disabled = true;
  setProgress(0.5, "refining…");
  const t0 = performance.now();
  try {
    const r = await fetch("/v1/refine?format=json", { method: "POST", body: form, headers: authHeaders() });
    const body = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error(`${r.status}: ${body.error || r.statusText}`);
    setPic("before", png(fix.imagePng));  // what this refinement started from, next to what it made
    setPic("refined", png(body.image_png));
    showWarnings(body.warnings || []);
    startFix(body, false);
    setProgress(1, `refined in ${((performance.now() - t0) / 1000).toFixed(1)} s (${body.unet_evals} UNet evaluations)`);
  } catch (e) {
    setProgress(0, "refine failed");
    showError(e.message);
  } finally {
    $("apply").disabled = false;
  }
});

$("token").addEventListener("change", loadDefaults);
refreshHealth().then(loadDefaults);
