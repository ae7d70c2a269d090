// The page in front of the service's HTTP API (API.md): plain JavaScript, no build step, no dependencies.
// Everything runs from this file (no inline script or handlers), so a `script-src 'self'` policy fits.
"use strict";

(() => {
  const KEY_STORAGE = "wbc.apiKey";
  const MAX_RETRIES = 3;          // for 503 answers (queue full, model loading)
  const JSON_BATCH = 8;           // images per measuring request: results show up chunk by chunk
  const ZIP_BATCH = 64;           // images per ZIP, the service's default limit; both halve on a 413
  const OVERLAY_CONCURRENCY = 2;
  const MAX_PIXEL_SIZE_UM = 10000;        // the service's limits of the two query parameters
  const MAX_CELL_DIAMETER_PX = 100000;
  const REGIONS = [["nucleus", "Nucleus"], ["cytoplasm", "Cytoplasm"], ["cell", "Cell"]];
  // cells.csv as the batch ZIP holds it: app/engine/report.py CELL_COLUMNS, write_csv and its formula guard.
  const CELL_COLUMNS = ["filename", "cell_id", "bbox_x", "bbox_y", "bbox_width", "bbox_height", "centroid_x",
    "centroid_y", ...REGIONS.map(([r]) => `area_${r}_px`), ...REGIONS.map(([r]) => `area_${r}_um2`), "nc_ratio",
    "touches_border", "score", "primary"];
  const CSV_FORMULA_START = ["=", "+", "-", "@", "\t", "\r"];
  const FIGURE_HEIGHT = [240, 360];   // px: how tall an image and its overlay are shown, at least and at most

  const $ = (id) => document.getElementById(id);
  const el = {
    serviceState: $("service-state"), serviceText: $("service-text"),
    pixelSize: $("pixel-size"), pixelSizeError: $("pixel-size-error"),
    cellDiameter: $("cell-diameter"), cellDiameterError: $("cell-diameter-error"), apiKey: $("api-key"),
    dropZone: $("drop-zone"), fileInput: $("file-input"),
    status: $("status"), alert: $("alert"), alertTitle: $("alert-title"), alertDetail: $("alert-detail"),
    results: $("results"), summary: $("summary"), table: $("results-table"), cards: $("cards"),
    downloadZip: $("download-zip"), downloadCells: $("download-cells"), rerun: $("rerun"), clear: $("clear"),
  };
  const state = {
    files: [], results: [], previews: [], overlays: [], cards: [], geojsonBusy: new Set(),
    params: { pixel_size_um: null, cell_diameter_px: null },   // those the results shown were made with
    jsonBatch: JSON_BATCH, zipBatch: ZIP_BATCH, run: 0, downloading: false,
  };

  const intFmt = new Intl.NumberFormat(undefined, { maximumFractionDigits: 0 });
  const areaFmt = new Intl.NumberFormat(undefined, { minimumFractionDigits: 1, maximumFractionDigits: 1 });
  const ratioFmt = new Intl.NumberFormat(undefined, { minimumFractionDigits: 2, maximumFractionDigits: 2 });
  const sizeFmt = new Intl.NumberFormat(undefined, { maximumSignificantDigits: 6 });

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
  async function segmentBatch(files, params) {
    try {
      const response = await post("v1/segment/batch", { format: "json", ...params }, filesForm("files", files));
      return (await response.json()).results;
    } catch (err) {
      if (!(err instanceof ApiError) || err.status === 0 || err.status === 401) throw err;
      if (err.status === 413 && files.length > 1) {
        const half = Math.ceil(files.length / 2);
        state.jsonBatch = Math.max(1, Math.min(state.jsonBatch, half));
        return [...await segmentBatch(files.slice(0, half), params),
          ...await segmentBatch(files.slice(half), params)];
      }
      if (err.status >= 500) throw err;
      // The request as a whole was refused (a file over the size limit, say): report it per file.
      return files.map((file) => ({ filename: file.name, error: { status: err.status, title: err.title, detail: err.detail } }));
    }
  }

  /** The overlay PNG: classes, and each cell outlined and numbered with the ids of the JSON. */
  async function fetchOverlay(file, params) {
    const response = await post("v1/segment", { format: "overlay", cell_diameter_px: params.cell_diameter_px },
      filesForm("file", [file]));
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

  /** A positive number up to `max` from `input`: null when empty, undefined (field marked) when invalid. */
  function readPositive(input, errorNode, max, message) {
    const raw = input.value.trim();
    const value = Number(raw);
    const invalid = raw !== "" && !(Number.isFinite(value) && value > 0 && value <= max);
    input.setAttribute("aria-invalid", String(invalid));
    errorNode.hidden = !invalid;
    errorNode.textContent = invalid ? message : "";
    if (invalid) return undefined;
    return raw === "" ? null : value;
  }

  /** The query parameters of the settings form; undefined (and the first bad field focused) when invalid. */
  function readParams() {
    const pixelSize = readPositive(el.pixelSize, el.pixelSizeError, MAX_PIXEL_SIZE_UM,
      "Enter a number greater than 0, such as 0.1, or leave it empty.");
    const diameter = readPositive(el.cellDiameter, el.cellDiameterError, MAX_CELL_DIAMETER_PX,
      "Enter a diameter in pixels greater than 0, such as 80, or leave it empty.");
    if (pixelSize === undefined) el.pixelSize.focus();
    else if (diameter === undefined) el.cellDiameter.focus();
    if (pixelSize === undefined || diameter === undefined) return undefined;
    return { pixel_size_um: pixelSize, cell_diameter_px: diameter };
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
      if (value === undefined || value === null || value === false) continue;
      if (name === "text") node.textContent = value;
      else if (name === "class") node.className = value;
      else node.setAttribute(name, value);
    }
    for (const child of children) if (child !== null && child !== undefined && child !== false) node.append(child);
    return node;
  }

  const fmtArea = (value, fmt) => (value === null || value === undefined ? "–" : fmt.format(value));
  const fmtRatio = (value) => (value === null || value === undefined ? "n/a" : ratioFmt.format(value));
  const plural = (n, one, many) => `${intFmt.format(n)} ${n === 1 ? one : many}`;
  const segmented = (result) => Boolean(result && !result.error);
  const cellsOf = (result) => (segmented(result) && Array.isArray(result.cells) ? result.cells : []);

  /** Where the µm² of a result came from, in words; null without a pixel size. */
  function scaleNote(result) {
    if (!result.pixel_size_um) return null;
    const size = `${sizeFmt.format(result.pixel_size_um)} µm per pixel`;
    return result.pixel_size_source === "file" ? `${size}, read from the image file` : `${size}, as entered`;
  }

  function rowFor(file, result, index) {
    const row = make("tr", { "data-index": String(index) });
    row.append(make("th", { scope: "row", class: "file", title: file.name }, [segmented(result)
      ? make("a", { href: `#card-${index}`, "data-focus-key": `file-${index}`, text: file.name })
      : file.name]));
    const columns = el.table.classList.contains("with-um") ? 9 : 6;
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
      row.append(make("td", { class: "num count", text: intFmt.format(result.cell_count ?? cellsOf(result).length) }));
      for (const [key] of REGIONS) row.append(make("td", { class: "num", text: fmtArea(result.areas_px[key], intFmt) }));
      for (const [key] of REGIONS) {
        row.append(make("td", { class: "num um", text: fmtArea(result.areas_um2 && result.areas_um2[key], areaFmt) }));
      }
      row.append(make("td", { class: "num nc", text: fmtRatio(result.nc_ratio) }));
    }
    return row;
  }

  function renderTable() {
    el.table.classList.toggle("with-um", state.results.some((r) => segmented(r) && r.areas_um2));
    const body = el.table.tBodies[0];
    body.replaceChildren(...state.files.map((file, i) => rowFor(file, state.results[i], i)));
  }

  /** The table of one image's cells, numbered as in its overlay; a total row when there are several. */
  function cellsTable(file, result) {
    const cells = cellsOf(result);
    const withUm = cells.some((c) => c.areas_um2);
    const groups = [make("colgroup", { span: "1" }), make("colgroup", { span: "3" }),
      withUm && make("colgroup", { span: "3" }), make("colgroup", { span: "3" })];
    const top = make("tr", {}, [
      make("th", { scope: "col", rowspan: "2", text: "Cell" }),
      make("th", { scope: "colgroup", colspan: "3", class: "group", text: "Area (px)" }),
      withUm && make("th", { scope: "colgroup", colspan: "3", class: "group", text: "Area (µm²)" }),
      make("th", { scope: "col", rowspan: "2", class: "num", text: "N:C" }),
      make("th", { scope: "col", rowspan: "2", text: "Edge" }),
      make("th", { scope: "col", rowspan: "2", class: "num", text: "Score" }),
    ]);
    const units = withUm ? ["px", "um2"] : ["px"];
    const sub = make("tr", {}, units.flatMap(() => REGIONS.map(([, label]) => make("th", { scope: "col", class: "num", text: label }))));
    const areaCells = (areasPx, areasUm2) => units.flatMap((unit) => REGIONS.map(([key]) => make("td", {
      class: "num", "data-area": `${key}_${unit}`,
      text: unit === "px" ? fmtArea(areasPx[key], intFmt) : fmtArea(areasUm2 && areasUm2[key], areaFmt),
    })));
    const rows = cells.map((cell) => {
      const primary = cell.id === result.primary_cell_id;
      return make("tr", { class: primary ? "primary" : undefined, "data-cell-id": String(cell.id) }, [
        make("th", { scope: "row", class: "cell-id" }, [
          String(cell.id),
          primary && make("span", { class: "badge", title: "The cell at the centre of the image", text: "primary" }),
        ]),
        ...areaCells(cell.areas_px, cell.areas_um2),
        make("td", { class: "num nc", text: fmtRatio(cell.nc_ratio) }),
        make("td", { class: cell.touches_border ? "edge cut" : "edge", text: cell.touches_border ? "cut by edge" : "inside" }),
        make("td", { class: "num score", text: ratioFmt.format(cell.score) }),
      ]);
    });
    const total = cells.length > 1 && make("tfoot", {}, [make("tr", { class: "total" }, [
      make("th", { scope: "row", text: "All" }),
      ...areaCells(result.areas_px, result.areas_um2),
      make("td", { class: "num nc", text: fmtRatio(result.nc_ratio) }),
      make("td"), make("td"),
    ])]);
    return make("table", { class: "cells" }, [
      make("caption", { class: "visually-hidden", text: `Leukocytes in ${file.name}, numbered as in the overlay` }),
      ...groups, make("thead", {}, [top, sub]), make("tbody", {}, rows), total,
    ]);
  }

  /** How wide a figure of a `width` × `height` image is shown: at its own size within FIGURE_HEIGHT, a
   *  small crop at most twice its size (and the page makes two side by side fit the card). */
  function figureWidth(width, height) {
    const shown = Math.min(Math.max(height, FIGURE_HEIGHT[0]), FIGURE_HEIGHT[1]);
    return Math.round(Math.min(shown * (width / height), 2 * width));
  }

  function figure(caption, content, result) {
    const frame = make("div", { class: "frame" }, [content]);
    const node = make("figure", {}, [frame, make("figcaption", {}, caption)]);
    frame.style.aspectRatio = `${result.width} / ${result.height}`;
    node.style.setProperty("--figure-width", `${figureWidth(result.width, result.height)}px`);
    return node;
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
        alt: `${file.name} with nucleus and cytoplasm drawn over it and each leukocyte outlined and numbered` }));
    } else {
      slot.append(make("p", { class: "loading", text: overlay ? `No overlay: ${overlay.error}` : "Drawing the overlay…" }));
    }
    return slot;
  }

  /** The caption under the overlay, with a link to it at full size once it is there. */
  function overlayCaption(index) {
    const overlay = state.overlays[index];
    const parts = ["Overlay"];
    if (overlay && overlay.url) {
      parts.push(" · ", make("a", { href: overlay.url, target: "_blank", rel: "noopener",
        "data-focus-key": `full-${index}` }, ["full size", make("span", { class: "visually-hidden",
        text: ` overlay of ${state.files[index].name}` })]));
    }
    return make("span", { class: "overlay-caption" }, parts);
  }

  function cardFor(index) {
    const file = state.files[index];
    const result = state.results[index];
    const card = make("li", { class: "card", id: `card-${index}`, "data-index": String(index),
      "aria-labelledby": `card-title-${index}` });
    const head = make("div", { class: "card-head" }, [
      make("h3", { class: "card-title", id: `card-title-${index}`, text: file.name })]);
    card.append(head);
    if (result.error) {
      card.classList.add("failed");
      card.append(make("p", { class: "card-error" }, [
        make("strong", { text: `Rejected (${result.error.status}): ${result.error.title}` }),
        make("br"), result.error.detail || "",
      ]));
      return card;
    }
    const cells = cellsOf(result);
    if (cells.length) {
      const button = make("button", { type: "button", class: "button small geojson", "data-index": String(index),
        "data-focus-key": `geojson-${index}` }, ["Download GeoJSON",
        make("span", { class: "visually-hidden", text: ` of ${file.name}` })]);
      button.addEventListener("click", () => downloadGeojson(index, button));
      head.append(button);
    }
    card.append(make("div", { class: "pair" }, [
      figure(["Image"], previewImage(index), result),
      figure([overlayCaption(index)], overlaySlot(index), result),
    ]));
    const count = result.cell_count ?? cells.length;
    const facts = [`${result.width} × ${result.height} px`];
    if (count) facts.push(" · ", make("strong", { class: "cell-count", text: plural(count, "leukocyte", "leukocytes") }));
    if (count > 1) facts.push(" · N:C of all ", make("strong", { class: "nc", text: fmtRatio(result.nc_ratio) }));
    card.append(make("p", { class: "dims" }, facts));
    if (!count) {
      card.append(make("p", { class: "no-cells", text: "No leukocyte found" }));
      return card;
    }
    const note = scaleNote(result);
    card.append(make("p", { class: "scale-note" }, note
      ? ["Areas in µm² at ", make("span", { class: "pixel-size", text: note }), "."]
      : ["No pixel size: areas in pixels only."]));
    card.append(make("div", { class: "table-scroll" }, [cellsTable(file, result)]));
    return card;
  }

  /** Put `nodes` in `parent` in order, moving only those out of place (a focused node that stays keeps focus). */
  function syncChildren(parent, nodes) {
    nodes.forEach((node, k) => {
      if (parent.children[k] !== node) parent.insertBefore(node, parent.children[k] || null);
    });
    while (parent.children.length > nodes.length) parent.lastElementChild.remove();
  }

  function renderCards() {
    const nodes = [];
    state.results.forEach((result, i) => {
      if (!result) return;
      const cached = state.cards[i];
      if (!cached || cached.result !== result || cached.file !== state.files[i]) {
        state.cards[i] = { result, file: state.files[i], node: cardFor(i) };
      }
      nodes.push(state.cards[i].node);
    });
    syncChildren(el.cards, nodes);
  }

  function renderSummary() {
    const done = state.results.filter(Boolean);
    const failed = done.filter((r) => r.error).length;
    const parts = [`${state.files.length} ${state.files.length === 1 ? "image" : "images"}`,
      `${done.length - failed} segmented`];
    if (failed) parts.push(`${failed} rejected`);
    if (done.length < state.files.length) parts.push(`${state.files.length - done.length} waiting`);
    const cells = done.reduce((sum, r) => sum + cellsOf(r).length, 0);
    if (done.length > failed) parts.push(plural(cells, "leukocyte", "leukocytes"));
    el.summary.textContent = parts.join(" · ");
    el.downloadCells.disabled = !done.some(segmented);
  }

  function render() {
    const focusKey = document.activeElement && document.activeElement.dataset
      ? document.activeElement.dataset.focusKey : undefined;
    renderTable();
    renderCards();
    renderSummary();
    if (focusKey && !document.activeElement.isConnected) {
      const again = document.querySelector(`[data-focus-key="${focusKey}"]`);
      if (again) again.focus();
    }
  }

  function releaseUrls() {
    for (const url of state.previews) if (url) URL.revokeObjectURL(url);
    for (const overlay of state.overlays) if (overlay && overlay.url) URL.revokeObjectURL(overlay.url);
    state.previews = [];
    state.overlays = [];
    state.cards = [];
  }

  // ---------------------------------------------------------------- the work

  /** Fetch the overlays not fetched yet, a few at a time, each shown as it arrives. */
  async function loadOverlays(run) {
    const queue = state.results.map((r, i) => (segmented(r) && !(state.overlays[i] && state.overlays[i].url) ? i : -1))
      .filter((i) => i >= 0);
    const params = state.params;
    const worker = async () => {
      while (queue.length && run === state.run) {
        const i = queue.shift();
        const file = state.files[i];
        try {
          const blob = await fetchOverlay(file, params);
          if (state.files[i] !== file) return;   // new files were chosen meanwhile
          state.overlays[i] = { url: URL.createObjectURL(blob) };
        } catch (err) {
          if (state.files[i] !== file) return;
          state.overlays[i] = { error: err.detail || err.title || String(err) };
        }
        const card = el.cards.querySelector(`li[data-index="${i}"]`);
        const slot = card && card.querySelector(".overlay-slot");
        if (slot) slot.replaceWith(overlaySlot(i));
        const caption = card && card.querySelector(".overlay-caption");
        if (caption) caption.replaceWith(overlayCaption(i));
      }
    };
    await Promise.all(Array.from({ length: OVERLAY_CONCURRENCY }, worker));
  }

  /** Measure every file through the batch endpoint, rendering as each chunk comes back. */
  async function measureAll(run, params, fresh) {
    const files = state.files;
    // Measuring the same files again (a new pixel size) keeps what is shown until the new numbers come.
    if (fresh || state.results.length !== files.length) state.results = new Array(files.length).fill(null);
    state.params = params;
    render();
    for (let start = 0; start < files.length;) {
      const chunk = files.slice(start, start + state.jsonBatch);
      setStatus(`Segmenting ${start + 1}–${start + chunk.length} of ${files.length}…`);
      const results = await segmentBatch(chunk, params);
      if (run !== state.run) return false;
      results.forEach((result, k) => { state.results[start + k] = result; });
      render();
      start += chunk.length;
    }
    const failed = state.results.filter((r) => r && r.error).length;
    const cells = state.results.reduce((sum, r) => sum + cellsOf(r).length, 0);
    const found = `${plural(cells, "leukocyte", "leukocytes")} found`;
    setStatus(failed
      ? `Done: ${files.length - failed} of ${files.length} segmented, ${failed} rejected (see the table); ${found}.`
      : `Done: ${files.length} ${files.length === 1 ? "image" : "images"} segmented; ${found}.`);
    return true;
  }

  /** Segment the chosen files (new ones, or the same again), then fetch their overlays. */
  async function segmentFiles(files, { keepOverlays = false } = {}) {
    const params = readParams();
    if (params === undefined || !files.length) return;
    const current = ++state.run;
    hideAlert();
    const fresh = files !== state.files || !keepOverlays;
    if (fresh) releaseUrls();
    state.files = files;
    el.results.hidden = false;
    el.downloadZip.disabled = state.downloading;
    el.results.setAttribute("aria-busy", "true");
    try {
      if (await measureAll(current, params, fresh)) await loadOverlays(current);
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

  /** The batch endpoint's ZIP (masks, instance masks, overlays, results.csv, cells.csv, results.json),
   *  in as few parts as it takes. */
  async function downloadZip() {
    const params = readParams();
    if (params === undefined || !state.files.length || state.downloading) return;
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
          response = await post("v1/segment/batch", { format: "zip", overlay: true, ...params },
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
        : "Downloaded the ZIP: masks, instance masks, overlays, results.csv, cells.csv and results.json.");
    } catch (err) {
      setStatus("The download failed.");
      explain(err);
    } finally {
      state.downloading = false;
      el.downloadZip.disabled = false;
    }
  }

  /** A float as Python's csv module writes it (repr: `1.0`, `1e-05`), so that cells.csv reads the same. */
  function pyFloat(value) {
    const abs = Math.abs(value);
    if (abs !== 0 && (abs < 1e-4 || abs >= 1e16)) {
      const [mantissa, exponent] = value.toExponential().split("e");
      return `${mantissa}e${exponent[0]}${exponent.slice(1).padStart(2, "0")}`;
    }
    return Number.isInteger(value) ? `${value}.0` : String(value);
  }

  /** One CSV field: empty for null, a leading apostrophe on text a spreadsheet would run as a formula. */
  function csvField(value, float = false) {
    let text;
    if (value === null || value === undefined) text = "";
    else if (typeof value === "boolean") text = value ? "True" : "False";
    else if (typeof value === "number") text = float ? pyFloat(value) : String(value);
    else {
      text = String(value);
      if (CSV_FORMULA_START.some((start) => text.startsWith(start))) text = `'${text}`;
    }
    return /[",\r\n]/.test(text) ? `"${text.replaceAll('"', '""')}"` : text;
  }

  /** cells.csv of every image segmented, row for row what the batch ZIP's cells.csv holds. */
  function cellsCsv() {
    const lines = [CELL_COLUMNS.join(",")];
    for (const result of state.results) {
      for (const cell of cellsOf(result)) {
        const [x, y, w, h] = cell.bbox;
        const fields = [csvField(result.filename), csvField(cell.id), ...[x, y, w, h].map((v) => csvField(v)),
          csvField(cell.centroid[0], true), csvField(cell.centroid[1], true),
          ...REGIONS.map(([r]) => csvField(cell.areas_px[r])),
          ...REGIONS.map(([r]) => csvField(cell.areas_um2 ? cell.areas_um2[r] : null, true)),
          csvField(cell.nc_ratio, true), csvField(cell.touches_border), csvField(cell.score, true),
          csvField(cell.id === result.primary_cell_id)];
        lines.push(fields.join(","));
      }
    }
    return `${lines.join("\n")}\n`;
  }

  function downloadCells() {
    const images = state.results.filter(segmented).length;
    const cells = state.results.reduce((sum, r) => sum + cellsOf(r).length, 0);
    save(new Blob([cellsCsv()], { type: "text/csv;charset=utf-8" }), "cells.csv");
    setStatus(`Downloaded cells.csv: ${plural(cells, "cell", "cells")} of ${plural(images, "image", "images")}.`);
  }

  /** The QuPath GeoJSON of one image, made with the settings of the results shown (same cell numbers). */
  async function downloadGeojson(index, button) {
    const file = state.files[index];
    if (state.geojsonBusy.has(file)) return;
    state.geojsonBusy.add(file);
    button.setAttribute("aria-disabled", "true");
    hideAlert();
    setStatus(`Preparing the GeoJSON of ${file.name}…`);
    try {
      const response = await post("v1/segment", { format: "geojson", ...state.params }, filesForm("file", [file]));
      const blob = await response.blob();
      const stem = file.name.replace(/\.[^.]*$/, "") || "image";
      save(blob, filenameOf(response, `${stem}.geojson`));
      setStatus(`Downloaded the GeoJSON of ${file.name}.`);
    } catch (err) {
      setStatus("The download failed.");
      explain(err);
    } finally {
      state.geojsonBusy.delete(file);
      button.removeAttribute("aria-disabled");
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
  // A new pixel size only changes the measurements: the overlays already shown stay. A new cell diameter
  // can change which cells are found, so everything is segmented again.
  const applySettings = () => {
    const params = readParams();
    if (params === undefined || !state.files.length) return;
    if (params.cell_diameter_px !== state.params.cell_diameter_px) segmentFiles(state.files);
    else if (params.pixel_size_um !== state.params.pixel_size_um) segmentFiles(state.files, { keepOverlays: true });
  };
  el.pixelSize.addEventListener("change", applySettings);
  el.cellDiameter.addEventListener("change", applySettings);
  el.rerun.addEventListener("click", () => segmentFiles(state.files));
  el.downloadZip.addEventListener("click", downloadZip);
  el.downloadCells.addEventListener("click", downloadCells);
  el.clear.addEventListener("click", clearAll);
  document.getElementById("settings").addEventListener("submit", (event) => {
    event.preventDefault();   // Enter in a field applies it instead of reloading the page
    storeApiKey();
    applySettings();
  });

  restoreApiKey();
  checkService();
})();
