// The page at /: pick a picture, optionally draw or upload a mask, POST /v1/edit (JSON answer), show
// input, RoI overlay, heatmap and result. No framework, no build step, nothing loaded from elsewhere.
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
const PICS = ["input", "overlay", "heatmap", "result"];
for (const id of PICS) {
  $(id).addEventListener("load", () => { $(id).hidden = false; });
  $(id).addEventListener("error", () => { $(id).hidden = true; });
}

function setPic(id, src) {
  const img = $(id);
  img.hidden = true;
  if (src) img.src = src; else img.removeAttribute("src");
}

function clearResults() {
  for (const id of ["overlay", "heatmap", "result"]) setPic(id, "");
  showWarnings([]);
  $("info").textContent = "";
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

function canvasPoint(ev) {
  // the canvas is shown 'contain'-fitted in a square: map the pointer to picture pixels
  const c = $("maskcanvas"), r = c.getBoundingClientRect();
  const scale = Math.min(r.width / c.width, r.height / c.height);
  const ox = (r.width - c.width * scale) / 2, oy = (r.height - c.height * scale) / 2;
  return [(ev.clientX - r.left - ox) / scale, (ev.clientY - r.top - oy) / scale];
}

let drawing = false;
function paint(ev) {
  if (!drawing || !$("draw").checked) return;
  const c = $("maskcanvas"), ctx = c.getContext("2d");
  const [x, y] = canvasPoint(ev);
  const radius = Number($("brush").value) * Math.max(c.width, c.height) / 256;
  ctx.fillStyle = "rgb(255, 40, 40)";
  ctx.beginPath();
  ctx.arc(x, y, Math.max(0.5, radius), 0, 2 * Math.PI);
  ctx.fill();
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

function drawnMaskBlob() {
  // painted pixels -> white, the rest black, as a PNG of the picture's size
  const c = $("maskcanvas");
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
    const png = (b64) => (b64 ? "data:image/png;base64," + b64 : "");
    setPic("overlay", png(body.overlay_png));
    setPic("heatmap", png(body.heatmap_png));
    setPic("result", png(body.image_png));
    showWarnings(body.warnings || []);
    const words = body.tokens.length ? body.tokens.join(", ") : "(none: " + (body.fallback || "mask given") + ")";
    $("info").textContent = `content words: ${words}; silenced: ${body.silenced.join(", ") || "-"}; ` +
      `RoI ${(100 * body.roi_area).toFixed(1)}% of the picture; batch of ${body.batch_size}; ` +
      `waited ${body.queue_seconds.toFixed(2)} s, edit ${body.timings.total.toFixed(2)} s; ${body.unet_evals} UNet evaluations`;
    setProgress(1, `done in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
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

$("token").addEventListener("change", loadDefaults);
refreshHealth().then(loadDefaults);
