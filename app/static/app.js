// The page in front of the service's HTTP API (API.md): plain JavaScript, no build step, no dependencies.
"use strict";

(() => {
  const KEY_STORAGE = "wbc.apiKey";
  const MAX_RETRIES = 3;          // for 503 answers (queue full, model loading)
  const JSON_BATCH = 8;           // images per measuring request: results show up chunk by chunk
  const ZIP_BATCH = 64;           // images per ZIP, the service's default limit; both halve on a 413
  const OVERLAY_CONCURRENCY = 2;
  const REGIONS = [["nucleus", "Nucleus"], ["cytoplasm", "Cytoplasm"], ["cell", "Cell"]];

  const $ = (id) => document.getElementById(id);
  const el = {
    serviceState: $("service-state"), serviceText: $("service-text"),
    pixelSize: $("pixel-size"), pixelSizeError: $("pixel-size-error"), apiKey: $("api-key"),
    dropZone: $("drop-zone"), fileInput: $("file-input"),
    status: $("status"), alert: $("alert"), alertTitle: $("alert-title"), alertDetail: $("alert-detail"),
    results: $("results"), summary: $("summary"), table: $("results-table"), cards: $("cards"),
    downloadZip: $("download-zip"), rerun: $("rerun"), clear: $("clear"),
  };
  const state = {
    files: [], results: [], previews: [], overlays: [], pixelSize: null,
    jsonBatch: JSON_BATCH, zipBatch: ZIP_BATCH, run: 0, downloading: false,
  };

  const intFmt = new Intl.NumberFormat(undefined, { maximumFractionDigits: 0 });
  const areaFmt = new Intl.NumberFormat(undefined, { minimumFractionDigits: 1, maximumFractionDigits: 1 });
  const ratioFmt = new Intl.NumberFormat(undefined, { minimumFractionDigits: 2, maximumFractionDigits: 2 });
  const pctFmt = new Intl.NumberFormat(undefined, { style: "percent", minimumFractionDigits: 1, maximumFractionDigits: 1 });

  class ApiError extends Error {
    constructor(status, title, detail) {
      super(detail || title);
      this.status = status;
      this.title = title;
      this.detail = detail;
    }
  }

  // ---------------------------------------------------------------- talking to the service

  function authHeaders() {
    const key = el.apiKey.value.trim();
    return key ? { "X-API-Key": key } : {};
  }

  function apiUrl(path, params = {}) {
    const url = new URL(path, document.baseURI);
    for (const [name, value] of Object.entries(params)) {
      if (value !== null && value !== undefined) url.searchParams.set(name, String(value));
    }
    return url;
  }

  async function problemOf(response) {
    let title = response.statusText || `HTTP ${response.status}`;
    let detail = "";
    try {
      const body = await response.json();
      title = body.title || title;
      detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail ?? "");
    } catch (_) {
      // Not JSON: the status line is all there is.
    }
    return new ApiError(response.status, title, detail);
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  function retryAfterSeconds(response) {
    const value = Number(response.headers.get("Retry-After"));
    return Number.isFinite(value) && value >= 0 ? Math.min(value, 30) : 2;
  }

  /** POST a form, retrying a few times on 503; resolves to the Response or rejects with an ApiError. */
  async function post(path, params, form) {
    for (let attempt = 0; ; attempt += 1) {
      let response;
      try {
        response = await fetch(apiUrl(path, params), { method: "POST", headers: authHeaders(), body: form });
      } catch (_) {
        throw new ApiError(0, "The service could not be reached",
          "Check that it is still running, then try again.");
      }
      if (response.status === 503 && attempt < MAX_RETRIES) {
        const wait = retryAfterSeconds(response);
        setStatus(`The service is busy; trying again in ${wait} s…`);
        await sleep(wait * 1000);
        continue;
      }
      if (!response.ok) throw await problemOf(response);
      return response;
    }
  }

  function filesForm(field, files) {
    const form = new FormData();
    for (const file of files) form.append(field, file, file.name);
    return form;
  }

  /** Segment `files` through the batch endpoint; splits the batch when the service says it is too large. */
  async function segmentBatch(files, pixelSize) {
    const params = { format: "json", pixel_size_um: pixelSize };
    try {
      const response = await post("v1/segment/batch", params, filesForm("files", files));
      return (await response.json()).results;
    } catch (err) {
      if (!(err instanceof ApiError) || err.status === 0 || err.status === 401) throw err;
      if (err.status === 413 && files.length > 1) {
        const half = Math.ceil(files.length / 2);
        state.jsonBatch = Math.max(1, Math.min(state.jsonBatch, half));
        return [...await segmentBatch(files.slice(0, half), pixelSize),
          ...await segmentBatch(files.slice(half), pixelSize)];
      }
      if (err.status >= 500) throw err;
      // The request as a whole was refused (a file over the size limit, say): report it per file.
      return files.map((file) => ({ filename: file.name, error: { status: err.status, title: err.title, detail: err.detail } }));
    }
  }

  async function fetchOverlay(file) {
    const response = await post("v1/segment", { format: "overlay" }, filesForm("file", [file]));
    return response.blob();
  }

  async function checkService(attempt = 0) {
    try {
      const response = await fetch(apiUrl("health/ready"));
      const body = await response.json().catch(() => ({}));
      if (response.ok) {
        el.serviceState.dataset.state = "ready";
        const model = [body.model, body.version && `v${body.version}`].filter(Boolean).join(" ");
        const provider = (body.provider || "").replace("ExecutionProvider", "");
        el.serviceText.textContent = `Ready · ${model}${provider ? ` · ${provider}` : ""}`;
        return;
      }
      el.serviceState.dataset.state = "waiting";
      el.serviceText.textContent = "The model is loading…";
    } catch (_) {
      el.serviceState.dataset.state = "down";
      el.serviceText.textContent = "The service cannot be reached";
    }
    if (attempt < 60) setTimeout(() => checkService(attempt + 1), 3000);
  }

  // ---------------------------------------------------------------- inputs

  /** The pixel size in µm, null when empty, undefined (with the field marked) when invalid. */
  function readPixelSize() {
    const raw = el.pixelSize.value.trim();
    const value = Number(raw);
    const invalid = raw !== "" && !(Number.isFinite(value) && value > 0);
    el.pixelSize.setAttribute("aria-invalid", String(invalid));
    el.pixelSizeError.hidden = !invalid;
    el.pixelSizeError.textContent = invalid ? "Enter a number greater than 0, such as 0.1, or leave it empty." : "";
    if (invalid) {
      el.pixelSize.focus();
      return undefined;
    }
    return raw === "" ? null : value;
  }

  function restoreApiKey() {
    try {
      el.apiKey.value = sessionStorage.getItem(KEY_STORAGE) || "";
    } catch (_) {
      // Storage can be disabled; the field still works for this page.
    }
  }

  function storeApiKey() {
    try {
      const key = el.apiKey.value.trim();
      if (key) sessionStorage.setItem(KEY_STORAGE, key);
      else sessionStorage.removeItem(KEY_STORAGE);
    } catch (_) {
      // See restoreApiKey.
    }
  }

  // ---------------------------------------------------------------- messages

  function setStatus(text) {
    el.status.textContent = text;
  }

  function showAlert(title, detail) {
    el.alertTitle.textContent = title;
    el.alertDetail.textContent = detail || "";
    el.alert.hidden = false;
  }

  function hideAlert() {
    el.alert.hidden = true;
  }

  function explain(err) {
    if (err.status === 401) {
      showAlert("The service needs a valid API key",
        `${err.detail || err.title} Enter the key in the “API key” field, then choose “Segment again”.`);
      el.apiKey.focus();
    } else {
      showAlert(err.title || "Something went wrong", err.detail || String(err.message || err));
    }
  }

  // ---------------------------------------------------------------- rendering

  function make(tag, props = {}, children = []) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(props)) {
      if (name === "text") node.textContent = value;
      else if (name === "class") node.className = value;
      else node.setAttribute(name, value);
    }
    for (const child of children) if (child) node.append(child);
    return node;
  }

  const fmtArea = (value, fmt) => (value === null || value === undefined ? "–" : fmt.format(value));
  const fmtRatio = (value) => (value === null || value === undefined ? "n/a" : ratioFmt.format(value));

  function rowFor(file, result, index) {
    const row = make("tr", { "data-index": String(index) });
    row.append(make("th", { scope: "row", class: "file", title: file.name, text: file.name }));
    const columns = state.pixelSize ? 8 : 5;
    if (!result) {
      row.append(make("td", { colspan: String(columns), class: "pending", text: "Waiting…" }));
    } else if (result.error) {
      row.classList.add("failed");
      row.append(make("td", { colspan: String(columns), class: "error-cell" }, [
        make("strong", { text: `Rejected: ${result.error.title}` }),
        result.error.detail ? ` ${result.error.detail}` : "",
      ]));
    } else {
      row.append(make("td", { class: "num", text: `${result.width} × ${result.height}` }));
      for (const [key] of REGIONS) row.append(make("td", { class: "num", text: fmtArea(result.areas_px[key], intFmt) }));
      if (state.pixelSize) {
        for (const [key] of REGIONS) {
          row.append(make("td", { class: "num um", text: fmtArea(result.areas_um2 && result.areas_um2[key], areaFmt) }));
        }
      }
      row.append(make("td", { class: "num nc", text: fmtRatio(result.nc_ratio) }));
    }
    return row;
  }

  function renderTable() {
    el.table.classList.toggle("with-um", Boolean(state.pixelSize));
    const body = el.table.tBodies[0];
    body.replaceChildren(...state.files.map((file, i) => rowFor(file, state.results[i], i)));
  }

  function measures(file, result) {
    const withUm = Boolean(result.areas_um2);
    const head = make("tr", {}, [make("th", { scope: "col", text: "Region" }),
      make("th", { scope: "col", class: "num", text: "px" }),
      withUm && make("th", { scope: "col", class: "num", text: "µm²" }),
      make("th", { scope: "col", class: "num", text: "of image" })]);
    const rows = REGIONS.map(([key, label]) => make("tr", { "data-region": key }, [
      make("th", { scope: "row", text: label }),
      make("td", { class: "num px", text: fmtArea(result.areas_px[key], intFmt) }),
      withUm && make("td", { class: "num um2", text: fmtArea(result.areas_um2[key], areaFmt) }),
      make("td", { class: "num", text: result.fractions ? pctFmt.format(result.fractions[key]) : "–" }),
    ]));
    return make("table", { class: "mini" }, [
      make("caption", { class: "visually-hidden", text: `Areas in ${file.name}` }),
      make("thead", {}, [head]), make("tbody", {}, rows),
    ]);
  }

  function figure(caption, img) {
    return make("figure", {}, [make("div", { class: "frame" }, [img]), make("figcaption", { text: caption })]);
  }

  function previewImage(index) {
    const file = state.files[index];
    if (!state.previews[index]) state.previews[index] = URL.createObjectURL(file);
    const img = make("img", { src: state.previews[index], alt: `${file.name} as uploaded`, class: "original" });
    img.addEventListener("error", () => {
      // Browsers cannot show TIFF, for one; the overlay next to it still can.
      img.replaceWith(make("p", { class: "no-preview", text: "No preview for this file type in the browser." }));
    }, { once: true });
    return img;
  }

  /** The overlay slot of a card: the image once fetched, else a note of where it stands. */
  function overlaySlot(index) {
    const file = state.files[index];
    const overlay = state.overlays[index];
    const slot = make("div", { class: "overlay-slot" });
    if (overlay && overlay.url) {
      slot.append(make("img", { class: "overlay", src: overlay.url,
        alt: `${file.name} with nucleus and cytoplasm drawn over it` }));
    } else {
      slot.append(make("p", { class: "loading", text: overlay ? `No overlay: ${overlay.error}` : "Drawing the overlay…" }));
    }
    return slot;
  }

  function cardFor(index) {
    const file = state.files[index];
    const result = state.results[index];
    const card = make("li", { class: "card", "data-index": String(index) });
    card.append(make("h3", { class: "card-title", text: file.name }));
    if (result.error) {
      card.classList.add("failed");
      card.append(make("p", { class: "card-error" }, [
        make("strong", { text: `Rejected (${result.error.status}): ${result.error.title}` }),
        make("br"), result.error.detail || "",
      ]));
      return card;
    }
    card.append(make("div", { class: "pair" }, [figure("Image", previewImage(index)), figure("Overlay", overlaySlot(index))]));
    card.append(make("p", { class: "dims" }, [
      `${result.width} × ${result.height} px · N:C `, make("strong", { class: "nc", text: fmtRatio(result.nc_ratio) }),
    ]));
    card.append(measures(file, result));
    return card;
  }

  function renderCards() {
    const cards = [];
    state.results.forEach((result, i) => { if (result) cards.push(cardFor(i)); });
    el.cards.replaceChildren(...cards);
  }

  function renderSummary() {
    const done = state.results.filter(Boolean);
    const failed = done.filter((r) => r.error).length;
    const parts = [`${state.files.length} ${state.files.length === 1 ? "image" : "images"}`,
      `${done.length - failed} segmented`];
    if (failed) parts.push(`${failed} rejected`);
    if (done.length < state.files.length) parts.push(`${state.files.length - done.length} waiting`);
    el.summary.textContent = parts.join(" · ");
  }

  function render() {
    renderTable();
    renderCards();
    renderSummary();
  }

  function releaseUrls() {
    for (const url of state.previews) if (url) URL.revokeObjectURL(url);
    for (const overlay of state.overlays) if (overlay && overlay.url) URL.revokeObjectURL(overlay.url);
    state.previews = [];
    state.overlays = [];
  }

  // ---------------------------------------------------------------- the work

  /** Fetch the overlays not fetched yet, a few at a time, each shown as it arrives. */
  async function loadOverlays(run) {
    const queue = state.results.map((r, i) => (r && !r.error && !(state.overlays[i] && state.overlays[i].url) ? i : -1))
      .filter((i) => i >= 0);
    const worker = async () => {
      while (queue.length && run === state.run) {
        const i = queue.shift();
        const file = state.files[i];
        try {
          const blob = await fetchOverlay(file);
          if (state.files[i] !== file) return;   // new files were chosen meanwhile
          state.overlays[i] = { url: URL.createObjectURL(blob) };
        } catch (err) {
          if (state.files[i] !== file) return;
          state.overlays[i] = { error: err.detail || err.title || String(err) };
        }
        const slot = el.cards.querySelector(`li[data-index="${i}"] .overlay-slot`);
        if (slot) slot.replaceWith(overlaySlot(i));
      }
    };
    await Promise.all(Array.from({ length: OVERLAY_CONCURRENCY }, worker));
  }

  /** Measure every file through the batch endpoint, rendering as each chunk comes back. */
  async function measureAll(run, pixelSize, fresh) {
    const files = state.files;
    // Measuring the same files again (a new pixel size) keeps what is shown until the new numbers come.
    if (fresh || state.results.length !== files.length) state.results = new Array(files.length).fill(null);
    state.pixelSize = pixelSize;
    render();
    for (let start = 0; start < files.length;) {
      const chunk = files.slice(start, start + state.jsonBatch);
      setStatus(`Segmenting ${start + 1}–${start + chunk.length} of ${files.length}…`);
      const results = await segmentBatch(chunk, pixelSize);
      if (run !== state.run) return false;
      results.forEach((result, k) => { state.results[start + k] = result; });
      render();
      start += chunk.length;
    }
    const failed = state.results.filter((r) => r && r.error).length;
    setStatus(failed
      ? `Done: ${files.length - failed} of ${files.length} segmented, ${failed} rejected (see the table).`
      : `Done: ${files.length} ${files.length === 1 ? "image" : "images"} segmented.`);
    return true;
  }

  /** Segment the chosen files (new ones, or the same again), then fetch their overlays. */
  async function segmentFiles(files, { keepOverlays = false } = {}) {
    const pixelSize = readPixelSize();
    if (pixelSize === undefined || !files.length) return;
    const current = ++state.run;
    hideAlert();
    const fresh = files !== state.files || !keepOverlays;
    if (fresh) releaseUrls();
    state.files = files;
    el.results.hidden = false;
    el.downloadZip.disabled = state.downloading;
    el.results.setAttribute("aria-busy", "true");
    try {
      if (await measureAll(current, pixelSize, fresh)) await loadOverlays(current);
    } catch (err) {
      if (current !== state.run) return;
      setStatus("Stopped.");
      explain(err);
    } finally {
      if (current === state.run) el.results.setAttribute("aria-busy", "false");
    }
  }

  function filenameOf(response, fallback) {
    const header = response.headers.get("Content-Disposition") || "";
    const match = /filename\*?=(?:UTF-8'')?"?([^";]+)"?/i.exec(header);
    return match ? decodeURIComponent(match[1]) : fallback;
  }

  function save(blob, name) {
    const url = URL.createObjectURL(blob);
    const link = make("a", { href: url, download: name });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
  }

  /** The batch endpoint's ZIP (masks, overlays, results.csv, results.json), in as few parts as it takes. */
  async function downloadZip() {
    const pixelSize = readPixelSize();
    if (pixelSize === undefined || !state.files.length || state.downloading) return;
    hideAlert();
    state.downloading = true;
    el.downloadZip.disabled = true;
    const queue = [];
    for (let i = 0; i < state.files.length; i += state.zipBatch) queue.push(state.files.slice(i, i + state.zipBatch));
    let saved = 0;
    try {
      while (queue.length) {
        const part = queue.shift();
        setStatus(saved || queue.length ? `Preparing download part ${saved + 1}…` : "Preparing the download…");
        let response;
        try {
          response = await post("v1/segment/batch", { format: "zip", overlay: true, pixel_size_um: pixelSize },
            filesForm("files", part));
        } catch (err) {
          if (err.status !== 413 || part.length < 2) throw err;
          const half = Math.ceil(part.length / 2);   // too many files or bytes for one request
          state.zipBatch = half;
          queue.unshift(part.slice(0, half), part.slice(half));
          continue;
        }
        saved += 1;
        const blob = await response.blob();
        save(blob, saved > 1 || queue.length ? `segmentation-part${saved}.zip` : filenameOf(response, "segmentation.zip"));
      }
      setStatus(saved > 1
        ? `Downloaded ${saved} ZIP files: the service takes at most ${state.zipBatch} images per request.`
        : "Downloaded the ZIP: masks, overlays, results.csv and results.json.");
    } catch (err) {
      setStatus("The download failed.");
      explain(err);
    } finally {
      state.downloading = false;
      el.downloadZip.disabled = false;
    }
  }

  function clearAll() {
    state.run += 1;
    releaseUrls();
    state.files = [];
    state.results = [];
    el.cards.replaceChildren();
    el.table.tBodies[0].replaceChildren();
    el.results.hidden = true;
    hideAlert();
    setStatus("Cleared.");
    el.fileInput.focus();
  }

  // ---------------------------------------------------------------- wiring

  el.fileInput.addEventListener("change", () => {
    const files = Array.from(el.fileInput.files || []);
    el.fileInput.value = "";   // so that choosing the same files again is noticed
    segmentFiles(files);
  });

  for (const type of ["dragenter", "dragover"]) {
    el.dropZone.addEventListener(type, (event) => {
      event.preventDefault();
      event.dataTransfer.dropEffect = "copy";
      el.dropZone.classList.add("dragging");
    });
  }
  for (const type of ["dragleave", "dragend"]) {
    el.dropZone.addEventListener(type, (event) => {
      if (!el.dropZone.contains(event.relatedTarget)) el.dropZone.classList.remove("dragging");
    });
  }
  el.dropZone.addEventListener("drop", (event) => {
    event.preventDefault();
    el.dropZone.classList.remove("dragging");
    segmentFiles(Array.from(event.dataTransfer.files || []));
  });
  // A file dropped beside the zone must not replace the page with the image.
  for (const type of ["dragover", "drop"]) window.addEventListener(type, (event) => event.preventDefault());

  el.apiKey.addEventListener("input", storeApiKey);
  // A new pixel size only changes the measurements: the overlays already shown stay.
  const applyPixelSize = () => {
    const pixelSize = readPixelSize();
    if (pixelSize !== undefined && pixelSize !== state.pixelSize && state.files.length) {
      segmentFiles(state.files, { keepOverlays: true });
    }
  };
  el.pixelSize.addEventListener("change", applyPixelSize);
  el.rerun.addEventListener("click", () => segmentFiles(state.files));
  el.downloadZip.addEventListener("click", downloadZip);
  el.clear.addEventListener("click", clearAll);
  document.getElementById("settings").addEventListener("submit", (event) => {
    event.preventDefault();   // Enter in a field applies it instead of reloading the page
    storeApiKey();
    applyPixelSize();
  });

  restoreApiKey();
  checkService();
})();
