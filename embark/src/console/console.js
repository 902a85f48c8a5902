// EmbArk operator console: the page's script (plain ES2020, no build step).
// Served at /console/console.js by embark/src/console.rs on the operator port.
//
// Keys are attacker-controlled strings: the DOM is only ever built with
// createElement / textContent / setAttribute, never from HTML strings.
"use strict";

(() => {
  const REFRESH_MS = 5000;
  const NEAR_THRESHOLD = { image: 0.7, text: 0.85 };
  const HIT_SOURCES = ["cache", "store"];
  const OOV_SOURCES = ["oov_pending", "oov_failed", "oov_unavailable"];
  const DASH = "—";

  // ---------------------------------------------------------------------
  // Prometheus text exposition format

  const METRIC_NAME = /[a-zA-Z_:][a-zA-Z0-9_:]*/y;
  const LABEL_NAME = /[a-zA-Z_][a-zA-Z0-9_]*/y;

  /** Parses a Prometheus text scrape into `[{name, labels, value}]`; lines it
   *  does not understand (comments, garbage) are skipped. */
  function parseMetrics(text) {
    const samples = [];
    for (const rawLine of String(text).split(/\r?\n/)) {
      const line = rawLine.trim();
      if (line === "" || line.startsWith("#")) continue;
      const sample = parseSampleLine(line);
      if (sample !== null) samples.push(sample);
    }
    return samples;
  }

  function matchAt(regex, text, pos) {
    regex.lastIndex = pos;
    const m = regex.exec(text);
    return m === null ? null : m[0];
  }

  function skipSpaces(text, pos) {
    while (pos < text.length && (text[pos] === " " || text[pos] === "\t")) pos++;
    return pos;
  }

  /** One `name{label="value",...} value [timestamp]` line, or null. */
  function parseSampleLine(line) {
    const name = matchAt(METRIC_NAME, line, 0);
    if (name === null) return null;
    let pos = name.length;
    const labels = {};
    if (line[pos] === "{") {
      pos++;
      for (;;) {
        pos = skipSpaces(line, pos);
        if (line[pos] === "}") { pos++; break; }
        const labelName = matchAt(LABEL_NAME, line, pos);
        if (labelName === null) return null;
        pos = skipSpaces(line, pos + labelName.length);
        if (line[pos] !== "=") return null;
        pos = skipSpaces(line, pos + 1);
        if (line[pos] !== "\"") return null;
        pos++;
        let value = "";
        for (;;) {
          if (pos >= line.length) return null; // unterminated string
          const c = line[pos++];
          if (c === "\"") break;
          if (c === "\\") {
            if (pos >= line.length) return null;
            const escaped = line[pos++];
            value += escaped === "n" ? "\n" : escaped; // \\ \" \n
          } else {
            value += c;
          }
        }
        labels[labelName] = value;
        pos = skipSpaces(line, pos);
        if (line[pos] === ",") pos++;
        else if (line[pos] !== "}") return null;
      }
    } else if (pos < line.length && line[pos] !== " " && line[pos] !== "\t") {
      return null;
    }
    const fields = line.slice(pos).trim().split(/\s+/);
    if (fields[0] === "") return null;
    const value = parseSampleValue(fields[0]);
    if (value === null) return null;
    return { name, labels, value };
  }

  function parseSampleValue(text) {
    switch (text) {
      case "NaN": return NaN;
      case "+Inf": case "Inf": return Infinity;
      case "-Inf": return -Infinity;
      default: {
        const n = Number(text);
        return Number.isNaN(n) ? null : n;
      }
    }
  }

  function labelsMatch(labels, wanted) {
    return Object.keys(wanted).every((k) => labels[k] === wanted[k]);
  }

  function selectSamples(samples, name, wanted = {}) {
    return samples.filter((s) => s.name === name && labelsMatch(s.labels, wanted));
  }

  /** Sum of the (non-NaN) values of the series of `name` whose labels include `wanted`. */
  function sumMetric(samples, name, wanted = {}) {
    return selectSamples(samples, name, wanted)
      .reduce((sum, s) => (Number.isNaN(s.value) ? sum : sum + s.value), 0);
  }

  function hasMetric(samples, name) {
    return samples.some((s) => s.name === name);
  }

  function seriesKey(sample) {
    const labels = Object.keys(sample.labels).sort().map((k) => [k, sample.labels[k]]);
    return JSON.stringify([sample.name, labels]);
  }

  // ---------------------------------------------------------------------
  // Small DOM and formatting helpers

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs = {}, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === "className") node.className = v;
      else node.setAttribute(k, v);
    }
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function formatCount(n) {
    if (!Number.isFinite(n)) return String(n);
    return String(Math.round(n));
  }

  function formatPercent(fraction) {
    return `${(fraction * 100).toFixed(1)}%`;
  }

  function isHttpUrl(key) {
    return typeof key === "string" && (key.startsWith("http://") || key.startsWith("https://"));
  }

  function showsImage(key, image) {
    return image === true && isHttpUrl(key);
  }

  async function fetchOk(url) {
    const response = await fetch(url, { cache: "no-store", credentials: "same-origin" });
    if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
    return response;
  }

  async function readJsonBody(response) {
    const text = await response.text();
    try {
      const body = JSON.parse(text);
      return body !== null && typeof body === "object" ? body : {};
    } catch (_) {
      return { error: text.trim() || `HTTP ${response.status}` };
    }
  }

  // ---------------------------------------------------------------------
  // Overview

  let models = []; // last /console/api/models list
  let modelsLoaded = false;
  let resolveModelsReady;
  const modelsReady = new Promise((resolve) => { resolveModelsReady = resolve; });
  const firstSamples = new Map(); // seriesKey -> value at the first scrape it appeared in
  let firstScrapeDone = false;

  /** Remembers the first sample of each series; returns the increase since. */
  function increaseSinceOpened(sample) {
    const key = seriesKey(sample);
    if (!firstSamples.has(key)) {
      // Series present when the page opened count from their value then;
      // series created later (counters appear on first increment) from 0.
      firstSamples.set(key, firstScrapeDone ? 0 : sample.value);
    }
    let base = firstSamples.get(key);
    if (sample.value < base) { // counter reset (restart): count from 0
      base = 0;
      firstSamples.set(key, 0);
    }
    return sample.value - base;
  }

  function ratioCell(field, part, total) {
    const td = el("td", { "data-field": field, className: "num" });
    if (total > 0) {
      const fraction = part / total;
      td.setAttribute("data-value", String(fraction));
      td.textContent = formatPercent(fraction);
    } else {
      td.setAttribute("data-value", "");
      td.textContent = DASH;
    }
    return td;
  }

  function failuresCell(samples, model) {
    const td = el("td", { "data-field": "failures" });
    const byCode = new Map(); // code -> {total, recent}
    for (const s of selectSamples(samples, "kfc_embed_failures_total", { model })) {
      const code = s.labels.code ?? "";
      const entry = byCode.get(code) || { total: 0, recent: 0 };
      entry.total += s.value;
      entry.recent += increaseSinceOpened(s);
      byCode.set(code, entry);
    }
    if (byCode.size === 0) {
      td.textContent = "none";
      td.classList.add("muted");
      return td;
    }
    for (const code of [...byCode.keys()].sort()) {
      const { total, recent } = byCode.get(code);
      const span = el("span", { className: "failure", "data-code": code },
        `${code}: ${formatCount(total)} (+${formatCount(recent)} since opened)`);
      if (recent > 0) span.classList.add("failure-recent");
      td.append(span, " ");
    }
    return td;
  }

  function modelRow(model, samples) {
    const name = String(model.name);
    const tr = el("tr", { "data-model": name });

    tr.append(el("td", { "data-field": "name", className: "model-name" }, name));
    tr.append(el("td", { "data-field": "kind" }, String(model.kind ?? DASH)));

    const version = el("td", { "data-field": "version" });
    version.append(el("span", { className: "version" }, String(model.version ?? DASH)));
    if (model.current === true) {
      version.append(" ", el("span", { className: "badge badge-current" }, "current"));
    }
    tr.append(version);

    tr.append(el("td", { "data-field": "dim", className: "num" }, String(model.dim ?? DASH)));

    const coverage = model.coverage;
    tr.append(el("td", {
      "data-field": "coverage",
      className: "num",
      title: coverage === null || coverage === undefined ? "unknown: Similar disabled" : "vectors indexed",
    }, coverage === null || coverage === undefined ? DASH : formatCount(Number(coverage))));

    const keys = (source) => sumMetric(samples, "embark_lookup_keys_total", { model: name, source });
    const total = sumMetric(samples, "embark_lookup_keys_total", { model: name });
    const hits = HIT_SOURCES.reduce((sum, s) => sum + keys(s), 0);
    const oov = OOV_SOURCES.reduce((sum, s) => sum + keys(s), 0);
    tr.append(el("td", { "data-field": "lookups", className: "num" }, formatCount(total)));
    tr.append(ratioCell("hit_rate", hits, total));
    tr.append(ratioCell("oov_share", oov, total));

    const filled = sumMetric(samples, "kfc_filled_total", { model: name, outcome: "vector" });
    tr.append(el("td", { "data-field": "filled", className: "num" }, formatCount(filled)));

    tr.append(failuresCell(samples, name));
    return tr;
  }

  function renderModelsTable(samples) {
    const tbody = $("models-table").tBodies[0];
    const rows = models.map((m) => modelRow(m, samples));
    if (rows.length === 0) {
      const tr = el("tr", { className: "placeholder-row" });
      tr.append(el("td", { colspan: "10" }, "no models configured"));
      rows.push(tr);
    }
    tbody.replaceChildren(...rows);
  }

  function setFillField(field, text, state) {
    const dd = document.querySelector(`#fill-path dd[data-field="${field}"]`);
    dd.textContent = text;
    if (state) dd.setAttribute("data-state", state);
    else dd.removeAttribute("data-state");
  }

  function renderFillPath(samples) {
    setFillField("backlog", hasMetric(samples, "embark_miss_queue_depth")
      ? formatCount(sumMetric(samples, "embark_miss_queue_depth"))
      : `${DASH} (misses go to Kafka; see KFC's metrics)`);
    setFillField("in_flight", hasMetric(samples, "kfc_in_flight_misses")
      ? formatCount(sumMetric(samples, "kfc_in_flight_misses")) : DASH);
    setFillField("delayed", hasMetric(samples, "kfc_delayed_misses")
      ? formatCount(sumMetric(samples, "kfc_delayed_misses")) : DASH);
    if (hasMetric(samples, "embark_store_breaker_open")) {
      const open = sumMetric(samples, "embark_store_breaker_open") >= 1;
      setFillField("breaker", open ? "open" : "closed", open ? "open" : "closed");
    } else {
      setFillField("breaker", DASH);
    }
  }

  function setRefreshed(date) {
    const time = $("refreshed-at");
    time.dateTime = date.toISOString();
    time.textContent = `refreshed ${date.toLocaleTimeString()}`;
  }

  function showOverviewError(message) {
    const p = $("overview-error");
    if (message === null) {
      p.hidden = true;
      p.textContent = "";
      return;
    }
    const last = $("refreshed-at").dateTime
      ? `; showing data from ${new Date($("refreshed-at").dateTime).toLocaleTimeString()}`
      : "";
    p.textContent = `Refresh failed at ${new Date().toLocaleTimeString()}: ${message}${last}`;
    p.hidden = false;
  }

  async function refreshOverview() {
    try {
      const [modelsBody, metricsText] = await Promise.all([
        fetchOk("/console/api/models").then((r) => r.json()),
        fetchOk("/metrics").then((r) => r.text()),
      ]);
      if (!modelsBody || !Array.isArray(modelsBody.models)) {
        throw new Error("/console/api/models: no \"models\" list in the response");
      }
      models = modelsBody.models.filter((m) => m && typeof m.name === "string");
      const samples = parseMetrics(metricsText);
      renderModelsTable(samples);
      renderFillPath(samples);
      firstScrapeDone = true;
      updateModelSelect();
      setRefreshed(new Date());
      showOverviewError(null);
      document.body.dataset.overviewLoaded = "true";
      if (!modelsLoaded) {
        modelsLoaded = true;
        resolveModelsReady();
      }
    } catch (err) {
      showOverviewError(err && err.message ? err.message : String(err));
    } finally {
      setTimeout(refreshOverview, REFRESH_MS);
    }
  }

  // ---------------------------------------------------------------------
  // Near-duplicate explorer

  let searchSeq = 0; // ignores responses of superseded searches
  let shownNeighbours = []; // [{item, score, identical}] of the current results
  let lastSelectSignature = "";

  function modelKind(name) {
    const m = models.find((x) => x.name === name);
    return m ? m.kind : undefined;
  }

  function defaultThreshold(kind) {
    return kind === "text" ? NEAR_THRESHOLD.text : NEAR_THRESHOLD.image;
  }

  function resetThresholdForModel() {
    const kind = modelKind($("explore-model").value);
    $("explore-threshold").value = defaultThreshold(kind).toFixed(2);
    remarkResults();
  }

  function modelOption(m) {
    const label = `${m.name} (${m.kind}${m.dim ? `, ${m.dim}d` : ""})`
      + (m.coverage === null || m.coverage === undefined ? " — Similar disabled" : "");
    return el("option", { value: m.name }, label);
  }

  /** (Re)fills the model select, image models first, keeping the selection. */
  function updateModelSelect() {
    const sorted = models
      .map((m, i) => ({ m, i }))
      .sort((a, b) => ((a.m.kind === "image" ? 0 : 1) - (b.m.kind === "image" ? 0 : 1)) || a.i - b.i)
      .map(({ m }) => m);
    const signature = JSON.stringify(sorted.map((m) => [m.name, m.kind, m.dim, m.coverage === null]));
    if (signature === lastSelectSignature) return;
    lastSelectSignature = signature;
    const select = $("explore-model");
    const previous = select.value;
    const options = sorted.map(modelOption);
    if (previous && !sorted.some((m) => m.name === previous)) {
      options.push(el("option", { value: previous }, `${previous} (unknown model)`));
    }
    select.replaceChildren(...options);
    if (previous) select.value = previous;
    else if (options.length > 0) resetThresholdForModel();
  }

  /** Selects `name`, adding an option for it when the server does not list it
   *  (the search then reports the server's error). */
  function selectModel(name) {
    const select = $("explore-model");
    if (![...select.options].some((o) => o.value === name)) {
      select.append(el("option", { value: name }, `${name} (unknown model)`));
    }
    select.value = name;
    resetThresholdForModel();
  }

  function currentThreshold() {
    const value = Number.parseFloat($("explore-threshold").value);
    return Number.isFinite(value) ? value : defaultThreshold(modelKind($("explore-model").value));
  }

  const MARK_TEXT = { identical: "identical", near: "near-duplicate", distant: "not a duplicate" };

  function markFor(score, identical, threshold) {
    if (identical) return "identical";
    return Number.isFinite(score) && score >= threshold ? "near" : "distant";
  }

  function applyMark(entry, threshold) {
    const mark = markFor(entry.score, entry.identical, threshold);
    entry.item.setAttribute("data-mark", mark);
    entry.badge.setAttribute("data-mark", mark);
    entry.badge.textContent = MARK_TEXT[mark];
  }

  function remarkResults() {
    const threshold = currentThreshold();
    for (const entry of shownNeighbours) applyMark(entry, threshold);
  }

  /** An `<img>` for an http(s) key, reporting its load state in data-loaded. */
  function imageFor(key, className) {
    const img = document.createElement("img");
    img.className = className;
    img.setAttribute("alt", key);
    img.setAttribute("referrerpolicy", "no-referrer");
    img.setAttribute("loading", "lazy");
    img.setAttribute("decoding", "async");
    img.addEventListener("load", () => { img.setAttribute("data-loaded", "true"); });
    img.addEventListener("error", () => {
      img.setAttribute("data-loaded", "false");
      img.classList.add("broken");
      const box = img.parentElement;
      if (box && !box.querySelector(".image-unavailable")) {
        box.append(el("span", { className: "image-unavailable" }, "image unavailable"));
      }
    });
    img.setAttribute("src", key);
    return img;
  }

  function renderQueryCard(query) {
    const card = $("explore-query-card");
    const key = query && typeof query.key === "string" ? query.key : "";
    const children = [];
    if (showsImage(key, query && query.image)) {
      const box = el("div", { className: "thumb-box query-box" });
      box.append(imageFor(key, "query-image"));
      children.push(box);
    } else {
      children.push(el("blockquote", { className: "query-text", title: key }, key));
    }
    const caption = el("figcaption", {});
    caption.append(el("span", { className: "caption-label" }, "query"), " ",
      el("span", { className: "caption-key", title: key }, key));
    children.push(caption);
    card.replaceChildren(...children);
    card.hidden = false;
  }

  function neighbourItem(n, rank) {
    const key = typeof n.key === "string" ? n.key : String(n.key);
    const score = typeof n.score === "number" ? n.score : Number.parseFloat(n.score);
    const identical = n.identical === true;
    const image = showsImage(key, n.image);

    const item = el("li", {
      className: image ? "neighbour neighbour-image" : "neighbour neighbour-text",
      "data-key": key,
      "data-score": Number.isFinite(score) ? String(score) : "",
    });

    if (image) {
      const box = el("div", { className: "thumb-box" });
      box.append(imageFor(key, "thumb"));
      item.append(box);
    } else {
      item.append(el("p", { className: "neighbour-text-body", title: key }, key));
    }

    const meta = el("div", { className: "neighbour-meta" });
    meta.append(
      el("span", { className: "rank" }, `#${rank}`),
      el("span", { className: "score", title: "cosine similarity" },
        Number.isFinite(score) ? score.toFixed(3) : DASH),
    );
    const badge = el("span", { className: "mark" });
    meta.append(badge);
    item.append(meta);

    if (image) item.append(el("p", { className: "caption", title: key }, key));

    return { item, badge, score, identical };
  }

  function renderResults(body) {
    renderQueryCard(body.query || {});
    const neighbours = Array.isArray(body.neighbours) ? body.neighbours.filter((n) => n && n.key !== undefined) : [];
    shownNeighbours = neighbours.map((n, i) => neighbourItem(n, i + 1));
    remarkResults();
    $("explore-results").replaceChildren(...shownNeighbours.map((e) => e.item));
    const count = `${neighbours.length} neighbour${neighbours.length === 1 ? "" : "s"}`;
    const how = body.exact_search === true ? "exact search" : "approximate search: HNSW";
    setStatus("ok", `${count} (${how})`);
  }

  function clearResults() {
    shownNeighbours = [];
    $("explore-results").replaceChildren();
    const card = $("explore-query-card");
    card.replaceChildren();
    card.hidden = true;
  }

  function setStatus(state, message) {
    const status = $("explore-status");
    status.setAttribute("data-state", state);
    status.textContent = message;
    $("explore-retry").hidden = state !== "pending";
  }

  function readK() {
    const k = Number.parseInt($("explore-k").value, 10);
    const clamped = Number.isFinite(k) ? Math.min(100, Math.max(1, k)) : 12;
    $("explore-k").value = String(clamped);
    return clamped;
  }

  async function runSearch() {
    const model = $("explore-model").value;
    const query = $("explore-query").value;
    const k = readK();
    if (!model || query === "") {
      setStatus("error", !model ? "No model to search (is the models list loaded?)" : "Enter an image URL or a text key.");
      return;
    }

    const params = `model=${encodeURIComponent(model)}&q=${encodeURIComponent(query)}&k=${k}`;
    history.replaceState(null, "", `/console?${params}`);

    const seq = ++searchSeq;
    document.body.dataset.explorerLoaded = "false";
    $("explore-form").setAttribute("aria-busy", "true");
    setStatus("running", "Searching…");

    try {
      const response = await fetch(`/console/api/similar?${params}`, {
        cache: "no-store",
        credentials: "same-origin",
        headers: { Accept: "application/json" },
      });
      const body = await readJsonBody(response);
      if (seq !== searchSeq) return;
      if (response.ok) {
        renderResults(body);
      } else {
        clearResults();
        const message = typeof body.error === "string" && body.error !== "" ? body.error : `HTTP ${response.status}`;
        setStatus(response.status === 409 ? "pending" : "error", message);
      }
    } catch (err) {
      if (seq !== searchSeq) return;
      clearResults();
      setStatus("error", `Search failed: ${err && err.message ? err.message : String(err)}`);
    }
    $("explore-form").removeAttribute("aria-busy");
    document.body.dataset.explorerLoaded = "true";
  }

  /** `/console?model=M&q=...&k=K`: fill the form and search once models are known. */
  async function searchFromUrl() {
    const params = new URLSearchParams(location.search);
    const model = params.get("model");
    const query = params.get("q");
    if (!model || query === null || query === "") return;
    $("explore-query").value = query;
    if (params.has("k")) $("explore-k").value = params.get("k");
    document.body.dataset.explorerLoaded = "false";
    setStatus("running", "Waiting for the models list…");
    await modelsReady;
    selectModel(model);
    await runSearch();
  }

  // ---------------------------------------------------------------------
  // Start-up

  function init() {
    $("page-host").textContent = location.host;
    $("explore-form").addEventListener("submit", (event) => {
      event.preventDefault();
      runSearch();
    });
    $("explore-retry").addEventListener("click", () => { runSearch(); });
    $("explore-model").addEventListener("change", resetThresholdForModel);
    $("explore-threshold").addEventListener("input", remarkResults);
    refreshOverview();
    searchFromUrl();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();

  // Exposed for debugging from the browser console and for tests.
  window.EmbArkConsole = Object.freeze({ parseMetrics });
})();
