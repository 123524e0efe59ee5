// The try-it page: pick a photo, choose a style or an upscaler, watch the async job, compare.
//
// Only the public API is used, as any client would: GET /styles for the gallery,
// POST /stylize | /upscale with ?mode=async, then GET /jobs/{id} (202 while queued or running,
// then the image or a JSON error). Optional controls (strength, keep_colors, mix, max_side,
// model) are sent only when the user moved them off their default, so the page also works
// against an API that does not know them yet.
//
// body[data-state] is idle | busy | done | error: a hook for styling and for the browser tests.

const $ = (id) => document.getElementById(id);

const FORMATS_TEXT = "PNG, JPEG, WebP, GIF, BMP, TIFF or PPM";
const POLL_FIRST_MS = 250;
const POLL_MAX_MS = 1000;
const EXTENSIONS = { "image/png": "png", "image/jpeg": "jpg", "image/webp": "webp" };
const STATUS_TEXT = { queued: "Queued, waiting for a worker", running: "Running" };

const state = {
  file: null, // Blob of the photo to send
  fileName: "",
  previewUrl: "",
  resultUrl: "",
  catalog: { styles: [], upscalers: [] },
  busy: false,
};

/** An answer of the API that is not the image: its JSON error, status and Retry-After. */
class ApiError extends Error {
  constructor(status, code, detail, retryAfter, body) {
    super(`${status} ${code}`);
    this.status = status;
    this.code = code;
    this.detail = detail;
    this.retryAfter = retryAfter;
    this.body = body;
  }
}

// A service with AUTH_REQUIRED wants a key on job routes: asked for on the first 401, kept for
// this tab only (sessionStorage) and sent as a Bearer header, never in a URL.
const KEY_STORAGE = "imgsvc-api-key";

function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORAGE);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function askForKey(code) {
  const question = code === "invalid_api_key"
    ? "This API key was not accepted. Enter another key:"
    : "This service needs an API key. Enter yours:";
  const key = window.prompt(question);
  if (key) sessionStorage.setItem(KEY_STORAGE, key.trim());
  else sessionStorage.removeItem(KEY_STORAGE);
  return Boolean(key);
}

/** A problem the user can fix before anything is sent (no photo chosen, no style). */
class UserError extends Error {}

// --- small helpers -----------------------------------------------------------------------------

function formatBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} kB`;
  return `${(n / (1024 * 1024)).toFixed(1)} MB`;
}

/** Byte counts in the API's messages ("limited to 20971520 bytes") made readable. */
function humanizeBytes(text) {
  return text.replace(/\b(\d{4,}) bytes\b/g, (_, n) => formatBytes(Number(n)));
}

function displayName(name) {
  return name.replace(/_/g, " ");
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function setState(value) {
  document.body.dataset.state = value;
}

function setStatus(text) {
  $("status").textContent = text;
}

function stem(fileName) {
  const base = fileName.split(/[\\/]/).pop() || "image";
  const dot = base.lastIndexOf(".");
  return dot > 0 ? base.slice(0, dot) : base;
}

function detailText(detail) {
  if (Array.isArray(detail)) {
    // FastAPI validation errors: [{loc: ["query", "factor"], msg: "..."}]
    return detail
      .map((item) => {
        const where = Array.isArray(item.loc) ? item.loc.filter((p) => p !== "query").join(".") : "";
        return where ? `${where}: ${item.msg}` : String(item.msg ?? JSON.stringify(item));
      })
      .join("; ");
  }
  return humanizeBytes(String(detail ?? ""));
}

async function toApiError(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  const retry = Number.parseFloat(response.headers.get("Retry-After") ?? "");
  return new ApiError(
    response.status,
    body?.error ?? `http_${response.status}`,
    body?.detail ?? response.statusText,
    Number.isFinite(retry) ? retry : null,
    body,
  );
}

/** What to tell the user about an error: a sentence, the API's own words, and whether a plain
 *  retry can help. */
function describeError(err) {
  if (err instanceof UserError) return { message: err.message, detail: "", retry: false };
  if (!(err instanceof ApiError)) {
    return {
      message: "The service cannot be reached. Check the connection and try again.",
      detail: String(err?.message ?? err),
      retry: true,
    };
  }
  const detail = detailText(err.detail);
  const code = `(${err.code}, HTTP ${err.status})`;
  const later = err.retryAfter !== null ? ` Try again in ${err.retryAfter} s.` : "";
  const messages = {
    upload_too_large: `This file is too large (${formatBytes(state.file?.size ?? 0)}).`,
    image_too_large: "This image has too many pixels for this operation.",
    unsupported_image: `This file is not an image in a supported format (${FORMATS_TEXT}).`,
    unsupported_media_type: `This file is not an image in a supported format (${FORMATS_TEXT}).`,
    corrupt_image: "This image file is damaged or truncated.",
    empty_body: "This file is empty.",
    queue_full: `The service is busy: its queue is full.${later}`,
    queue_busy: `The service is busy: this image would wait too long in the queue.${later}`,
    queue_unavailable: `The service is temporarily unavailable.${later}`,
    manifest_unavailable: "The service cannot read its model list right now.",
    timeout: "The job took too long and was cancelled.",
    job_expired: "The job waited too long in the queue and was dropped.",
    job_failed: "The service could not process this image.",
    unknown_style: "This style is not available (any more). Reload the page for the current list.",
    unknown_model: "This model is not available (any more). Reload the page for the current list.",
    unknown_job: "The result has expired. Run it again.",
    invalid_factor: "This upscaling factor is not supported.",
    invalid_request: "The service did not accept these settings.",
    job_too_expensive: "This image is too large to process in time. Try a smaller one.",
    job_cancelled: "The job was cancelled.",
    request_timeout: "The upload was too slow and was cut off. Check the connection.",
    rate_limited: `Too many requests with this key.${later}`,
    missing_api_key: "This service needs an API key.",
    invalid_api_key: "The API key was not accepted.",
    forbidden: "This API key may not do that.",
  };
  const message = messages[err.code] ?? `The request failed.`;
  const retry = ["queue_full", "queue_busy", "queue_unavailable", "timeout", "job_expired", "unknown_job",
    "rate_limited", "missing_api_key", "invalid_api_key", "request_timeout"]
    .includes(err.code) || err.status >= 500;
  return { message, detail: `${detail} ${code}`.trim(), retry };
}

function showError(err) {
  const { message, detail, retry } = describeError(err);
  $("error-message").textContent = message;
  $("error-detail").textContent = detail;
  $("retry").hidden = !retry;
  $("error").hidden = false;
  setStatus("");
  setState("error");
}

function clearError() {
  $("error").hidden = true;
  $("error-message").textContent = "";
  $("error-detail").textContent = "";
}

// --- the photo -------------------------------------------------------------------------------

function setFile(blob, name) {
  if (!blob) return;
  state.file = blob;
  state.fileName = name || blob.name || "image";
  if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
  state.previewUrl = URL.createObjectURL(blob);
  const preview = $("preview");
  const info = `${state.fileName} · ${formatBytes(blob.size)}`;
  $("file-info").textContent = info;
  preview.hidden = false;
  preview.alt = `Selected photo: ${state.fileName}`;
  preview.onload = () => {
    $("file-info").textContent = `${info} · ${preview.naturalWidth}×${preview.naturalHeight}`;
  };
  preview.onerror = () => {
    // TIFF, PPM or not an image at all: the browser cannot show it; the service will judge.
    preview.hidden = true;
    $("file-info").textContent = `${info} · no preview in this browser`;
  };
  preview.src = state.previewUrl;
  $("drop").dataset.state = "ready";
  $("drop-hint").textContent = "Drop or paste another image to replace it";
  clearError();
  if (!state.busy) setState("idle");
}

function firstImageFile(list) {
  const files = Array.from(list ?? []);
  return files.find((f) => f.type.startsWith("image/")) ?? files[0] ?? null;
}

function wireDropAndPaste() {
  const drop = $("drop");
  let depth = 0; // dragenter/leave fire for every child: count them
  document.addEventListener("dragenter", (event) => {
    if (!event.dataTransfer?.types?.includes("Files")) return;
    depth += 1;
    drop.classList.add("dragging");
  });
  document.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (depth === 0) drop.classList.remove("dragging");
  });
  document.addEventListener("dragover", (event) => {
    event.preventDefault(); // allow dropping anywhere instead of the browser opening the file
  });
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    depth = 0;
    drop.classList.remove("dragging");
    const file = firstImageFile(event.dataTransfer?.files);
    if (file) setFile(file, file.name);
  });
  document.addEventListener("paste", (event) => {
    const file = firstImageFile(event.clipboardData?.files);
    if (file) {
      event.preventDefault();
      setFile(file, file.name || "pasted.png");
    }
  });
}

function wireFileInputs() {
  $("pick").addEventListener("click", () => $("file").click());
  for (const id of ["file", "capture"]) {
    $(id).addEventListener("change", (event) => {
      const file = event.target.files?.[0];
      if (file) setFile(file, file.name);
      event.target.value = ""; // choosing the same file again still fires "change"
    });
  }
  $("sample").addEventListener("click", async () => {
    try {
      const response = await fetch("/static/sample.jpg");
      if (!response.ok) throw await toApiError(response);
      setFile(await response.blob(), "sample.jpg");
    } catch (err) {
      showError(err);
    }
  });
}

// --- the camera --------------------------------------------------------------------------------

let cameraStream = null;

function closeCamera() {
  cameraStream?.getTracks().forEach((track) => track.stop());
  cameraStream = null;
  $("camera").hidden = true;
}

async function openCamera() {
  // Phones: the native camera through <input capture> is the better experience.
  const coarse = window.matchMedia?.("(pointer: coarse)").matches;
  if (coarse || !navigator.mediaDevices?.getUserMedia) {
    $("capture").click();
    return;
  }
  try {
    cameraStream = await navigator.mediaDevices.getUserMedia({
      video: { facingMode: "environment", width: { ideal: 1920 } },
      audio: false,
    });
  } catch (err) {
    showError(new UserError(`No camera available (${err?.name ?? err}). Choose a file instead.`));
    return;
  }
  $("camera-video").srcObject = cameraStream;
  $("camera").hidden = false;
  $("camera-snap").focus();
}

function snapCamera() {
  const video = $("camera-video");
  if (!video.videoWidth) return;
  const canvas = document.createElement("canvas");
  canvas.width = video.videoWidth;
  canvas.height = video.videoHeight;
  canvas.getContext("2d").drawImage(video, 0, 0);
  canvas.toBlob(
    (blob) => {
      const stamp = new Date().toISOString().replace(/[:.]/g, "-").slice(0, 19);
      setFile(blob, `camera-${stamp}.jpg`);
      closeCamera();
      $("go").focus();
    },
    "image/jpeg",
    0.92,
  );
}

// --- the catalog and the controls ------------------------------------------------------------

function operation() {
  return document.querySelector('input[name="op"]:checked')?.value ?? "stylize";
}

function selectedStyle() {
  return document.querySelector('input[name="style"]:checked')?.value ?? "";
}

function selectedFactor() {
  return Number(document.querySelector('input[name="factor"]:checked')?.value ?? 4);
}

function styleCard(entry, checked) {
  const label = document.createElement("label");
  label.className = "style-card";
  if (entry.description) label.title = entry.description;
  const input = document.createElement("input");
  input.type = "radio";
  input.name = "style";
  input.value = entry.name;
  input.checked = checked;
  const img = document.createElement("img");
  img.alt = "";
  img.width = 128;
  img.height = 128;
  img.decoding = "async";
  img.src = `/styles/${encodeURIComponent(entry.name)}/thumbnail`;
  img.addEventListener("error", () => {
    // No thumbnail made for this style yet: its initials instead of a broken image.
    const placeholder = document.createElement("span");
    placeholder.className = "placeholder";
    placeholder.textContent = entry.name.slice(0, 2).toUpperCase();
    img.replaceWith(placeholder);
  });
  const caption = document.createElement("span");
  caption.textContent = displayName(entry.name);
  label.append(input, img, caption);
  return label;
}

function renderGallery() {
  const gallery = $("gallery");
  const styles = state.catalog.styles;
  gallery.replaceChildren();
  gallery.removeAttribute("aria-busy");
  if (!styles.length) {
    gallery.textContent = "This service has no style models.";
    return;
  }
  const initial = styles.some((s) => s.name === "mosaic") ? "mosaic" : styles[0].name;
  for (const entry of styles) gallery.append(styleCard(entry, entry.name === initial));
  renderMixChoices();
}

function renderMixChoices() {
  const select = $("mix-style");
  const previous = select.value;
  const first = selectedStyle();
  const others = state.catalog.styles.filter((s) => s.name !== first);
  select.replaceChildren(
    ...others.map((s) => new Option(displayName(s.name), s.name, false, s.name === previous)),
  );
  $("mix-on").disabled = others.length === 0;
}

function renderUpscalers() {
  const factors = new Set(state.catalog.upscalers.map((m) => m.factor));
  for (const input of document.querySelectorAll('input[name="factor"]')) {
    input.disabled = !factors.has(Number(input.value));
  }
  const checked = document.querySelector('input[name="factor"]:checked');
  if (checked?.disabled) {
    const enabled = document.querySelector('input[name="factor"]:not(:disabled)');
    if (enabled) enabled.checked = true;
  }
  renderModelChoices();
}

/** The model the service uses for `factor` when the request names none (GET /styles marks it). */
function defaultUpscaler(factor) {
  return state.catalog.upscalers.find((m) => m.factor === factor && m.default)?.name;
}

function renderModelChoices() {
  const factor = selectedFactor();
  const models = state.catalog.upscalers.filter((m) => m.factor === factor);
  const preferred = defaultUpscaler(factor) ?? models[0]?.name;
  const losses = { pixel: "pixel loss, highest PSNR", feat: "feature loss, sharper detail" };
  $("sr-model").replaceChildren(
    ...models.map((m) => {
      const kind = losses[m.loss] ? ` – ${losses[m.loss]}` : "";
      const suffix = m.default ? " (default)" : "";
      return new Option(`${m.name}${kind}${suffix}`, m.name, false, m.name === preferred);
    }),
  );
  updateModelNote();
}

function updateModelNote() {
  const entry = state.catalog.upscalers.find((m) => m.name === $("sr-model").value);
  $("sr-model-note").textContent = entry?.description ?? "";
}

function updateOperation() {
  const op = operation();
  $("stylize-panel").hidden = op !== "stylize";
  $("upscale-panel").hidden = op !== "upscale";
  $("go").textContent = op === "stylize" ? "Stylise" : `Upscale ×${selectedFactor()}`;
}

async function loadCatalog() {
  try {
    const response = await fetch("/styles", { cache: "no-store" });
    if (!response.ok) throw await toApiError(response);
    const body = await response.json();
    state.catalog = { styles: body.styles ?? [], upscalers: body.upscalers ?? [] };
  } catch (err) {
    $("gallery").textContent = "The list of styles could not be loaded.";
    showError(err);
    return;
  }
  renderGallery();
  renderUpscalers();
  updateOperation();
}

/** Labels that echo a control's value. Also run at start: a browser that restores form
 *  values on "back" would otherwise show 100% next to a slider it put at 40%. */
function syncOutputs() {
  const percent = (id) => `${Math.round(Number($(id).value) * 100)}%`;
  $("strength-out").textContent = percent("strength");
  $("mix-weight-out").textContent = percent("mix-weight");
  $("mix-controls").hidden = !$("mix-on").checked;
}

function wireControls() {
  for (const input of document.querySelectorAll('input[name="op"]')) {
    input.addEventListener("change", updateOperation);
  }
  for (const input of document.querySelectorAll('input[name="factor"]')) {
    input.addEventListener("change", () => {
      renderModelChoices(); // the models of the new factor, its default chosen
      updateOperation();
    });
  }
  $("gallery").addEventListener("change", renderMixChoices);
  $("strength").addEventListener("input", syncOutputs);
  $("mix-weight").addEventListener("input", syncOutputs);
  $("mix-on").addEventListener("change", syncOutputs);
  $("sr-model").addEventListener("change", updateModelNote);
  $("go").addEventListener("click", run);
  $("retry").addEventListener("click", run);
  $("camera-open").addEventListener("click", openCamera);
  $("camera-snap").addEventListener("click", snapCamera);
  $("camera-close").addEventListener("click", closeCamera);
  $("compare-slider").addEventListener("input", (event) => {
    $("compare").style.setProperty("--pos", `${event.target.value}%`);
  });
}

// --- the request -----------------------------------------------------------------------------

function round2(x) {
  return String(Math.round(x * 100) / 100);
}

/** The route, its query and the tag for the download's file name, from the controls.
 *  A control at its default adds nothing to the query. */
function buildRequest() {
  const query = new URLSearchParams();
  if (operation() === "upscale") {
    const factor = selectedFactor();
    const model = $("sr-model").value;
    query.set("factor", String(factor));
    if (model && model !== defaultUpscaler(factor)) query.set("model", model);
    return { path: "/upscale", query, tag: model || defaultUpscaler(factor) || `x${factor}` };
  }
  const style = selectedStyle();
  if (!style) throw new UserError("Choose a style first.");
  let tag = style;
  if ($("mix-on").checked && $("mix-style").value) {
    const other = $("mix-style").value;
    const weight = Number($("mix-weight").value);
    query.set("mix", `${style}:${round2(weight)},${other}:${round2(1 - weight)}`);
    tag = `${style}+${other}`;
  } else {
    query.set("style", style);
  }
  const strength = Number($("strength").value);
  if (strength !== 1) query.set("strength", round2(strength));
  if ($("keep-colors").checked) query.set("keep_colors", "true");
  if ($("max-side").value) query.set("max_side", $("max-side").value);
  return { path: "/stylize", query, tag };
}

function setBusy(busy) {
  state.busy = busy;
  $("go").disabled = busy;
  $("retry").disabled = busy;
  $("progress").hidden = !busy;
  $("go").setAttribute("aria-busy", String(busy));
  if (busy) setState("busy");
}

/** Poll the job until it is done; returns the response that carries the image. */
async function waitForJob(statusUrl, started) {
  let delay = POLL_FIRST_MS;
  for (;;) {
    const response = await fetch(statusUrl, { cache: "no-store", headers: authHeaders() });
    if (response.status !== 202) {
      if (!response.ok) throw await toApiError(response);
      return response;
    }
    const body = await response.json().catch(() => ({}));
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    setStatus(`${STATUS_TEXT[body.status] ?? body.status ?? "Waiting"}… ${seconds} s`);
    const hint = Number.parseFloat(response.headers.get("Retry-After") ?? "");
    await sleep(Number.isFinite(hint) ? Math.min(delay, hint * 1000) : delay);
    delay = Math.min(delay * 1.5, POLL_MAX_MS);
  }
}

async function run() {
  if (state.busy) return;
  clearError();
  let request;
  try {
    if (!state.file) throw new UserError("Choose a photo first (or use the sample photo).");
    request = buildRequest();
  } catch (err) {
    showError(err);
    return;
  }
  request.query.set("mode", "async");
  const form = new FormData();
  form.append("image", state.file, state.fileName);
  const started = performance.now();
  setBusy(true);
  setStatus("Uploading…");
  try {
    const response = await fetch(`${request.path}?${request.query}`, {
      method: "POST",
      body: form,
      headers: authHeaders(),
    });
    let imageResponse = response;
    if (response.status === 202) {
      const job = await response.json();
      setStatus("Queued, waiting for a worker…");
      imageResponse = await waitForJob(job.status_url, started);
    } else if (!response.ok) {
      throw await toApiError(response);
    }
    await showResult(imageResponse, request.tag, started);
  } catch (err) {
    showError(err);
    if (err instanceof ApiError && err.status === 401) askForKey(err.code);
  } finally {
    setBusy(false);
  }
}

function serverTimingText(header) {
  // "queue;dur=1.2, compute;dur=40.0, encode;dur=3.1" -> "queue 1 ms · compute 40 ms · ..."
  return (header ?? "")
    .split(",")
    .map((part) => part.trim().match(/^([\w-]+);dur=([\d.]+)/))
    .filter((m) => m && ["queue", "compute", "encode"].includes(m[1]))
    .map((m) => `${m[1]} ${Math.round(Number(m[2]))} ms`)
    .join(" · ");
}

/** The original under the slider; a format the browser cannot show (TIFF, PPM) leaves the
 *  result alone on screen, without a slider that would compare it with nothing. */
async function showBefore(url) {
  const before = $("before");
  if (before.src !== url) before.src = url;
  const shown = await before.decode().then(() => true, () => false);
  $("compare").dataset.single = String(!shown);
}

async function showResult(response, tag, started) {
  const blob = await response.blob();
  if (state.resultUrl) URL.revokeObjectURL(state.resultUrl);
  state.resultUrl = URL.createObjectURL(blob);
  const after = $("after");
  after.src = state.resultUrl;
  await after.decode().catch(() => undefined);
  await showBefore(state.previewUrl);
  const seconds = ((performance.now() - started) / 1000).toFixed(1);
  const extension = EXTENSIONS[blob.type] ?? "png";
  const download = $("download");
  download.href = state.resultUrl;
  download.download = `${stem(state.fileName)}.${tag}.${extension}`;
  const parts = [
    `${after.naturalWidth}×${after.naturalHeight}`,
    extension.toUpperCase(),
    formatBytes(blob.size),
    `${seconds} s`,
  ];
  const timing = serverTimingText(response.headers.get("Server-Timing"));
  if (timing) parts.push(timing);
  if (response.headers.get("X-Input-Frames") === "first") {
    parts.push("animated input: first frame only");
  }
  $("result-info").textContent = parts.join(" · ");
  $("result").hidden = false;
  setStatus(`Done in ${seconds} s.`);
  setState("done");
  $("result").scrollIntoView({ block: "nearest", behavior: "smooth" });
}

// --- start -----------------------------------------------------------------------------------

setState("idle");
wireDropAndPaste();
wireFileInputs();
wireControls();
syncOutputs();
updateOperation();
loadCatalog();
