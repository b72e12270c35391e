"use strict";
// A run's page: its header, the curves, its results (an LR range test, a loss landscape: results.js),
// the gradient-flow heatmap and the alert list, kept
// live by the collector's event stream (each message: what changed since the last one).
// In a report written by `gradwatch report`, the same page draws `GRADWATCH_REPORT` once.

const page = {
  name: decodeURIComponent(location.pathname.split("/").pop() || ""),
  run: null, // the run's /api/runs entry
  curves: { width: 1, step: [], skipped: [], nonfinite: [], curves: {} },
  layers: null, // {rows, origin, step, max}; cells as Float32Array
  markers: [], // replaced (not changed in place) when markers arrive
  results: {}, // the newest of each kind: {lr_find, landscape}
  markersShown: null,
  pending: false,
};

/** `into` holds `from` entries of the old array, then `fresh`. */
function patch(into, from, fresh) {
  into.length = Math.min(into.length, from);
  while (into.length < from) into.push(null);
  for (const v of fresh) into.push(v);
  return into;
}

function patchCells(old, from, fresh) {
  const cells = new Float32Array(from + fresh.length);
  cells.set(old.subarray(0, from));
  cells.set(fresh, from);
  return cells;
}

function applyCurves(delta) {
  if (delta.reset) page.curves = { width: delta.width, step: [], skipped: [], nonfinite: [], curves: {} };
  const c = page.curves;
  c.width = delta.width;
  c.origin = delta.origin;
  patch(c.step, delta.from, delta.step);
  patch(c.skipped, delta.from, delta.skipped);
  patch(c.nonfinite, delta.from, delta.nonfinite);
  for (const [name, columns] of Object.entries(delta.curves)) {
    const curve = (c.curves[name] ||= { min: [], max: [], last: [] });
    for (const which of ["min", "max", "last"]) patch(curve[which], delta.from, columns[which].map(gw.num));
  }
}

function applyLayers(delta) {
  if (delta.reset) {
    page.layers = { rows: delta.rows, origin: delta.origin, step: [], max: new Float32Array(0) };
  }
  const layers = page.layers;
  if (!layers) return; // a delta before any full matrix: the next reset brings it
  const rows = layers.rows.length;
  patch(layers.step, delta.from, delta.step);
  layers.max = patchCells(layers.max, delta.from * rows, decodeCells(delta.max));
}

/** One message of the stream (or a report): `RunSeries.since` plus the run's entry. */
function apply(message) {
  if (!performance.getEntriesByName("gradwatch:data").length) performance.mark("gradwatch:data");
  if (message.reset) {
    page.layers = null;
    page.markers = [];
    page.results = {};
  }
  page.results = { ...page.results, ...(message.results || {}) };
  applyCurves(message.curves);
  if (message.layers) applyLayers(message.layers);
  if (message.markers.length) page.markers = [...page.markers, ...message.markers];
  if (message.run) page.run = message.run;
  if (!page.pending) {
    page.pending = true;
    requestAnimationFrame(render);
  }
}

const charts = new Charts(document.getElementById("charts"));
const results = new Results();
const heatmap = new Heatmap(document.getElementById("heatmap"), document.getElementById("flow-tip"),
  document.getElementById("flow-scale"));

/** [first, last] step of the run: buckets hold their last step, the origin is the first. */
function stepRange() {
  const steps = [page.curves.origin, ...page.curves.step, ...(page.layers ? [page.layers.origin, ...page.layers.step] : [])];
  const known = steps.filter((s) => s !== null && s !== undefined);
  return known.length ? [Math.min(...known), Math.max(...known)] : null;
}

// A report is read later: its times are dates, not "5 s ago".
const when = (seconds) => (window.GRADWATCH_REPORT ? gw.when(seconds) : gw.ago(seconds));

function renderHeader() {
  const run = page.run || { name: page.name };
  document.title = `gradwatch: ${run.name}`;
  document.getElementById("name").textContent = run.name;
  const status = document.getElementById("status");
  status.textContent = run.status || "";
  status.className = `status ${run.status || ""}`;
  const fact = (label, value) => gw.el("span", {}, `${label} `, gw.el("b", {}, value));
  const facts = [
    fact("step", String(run.last_step ?? "–")),
    fact("steps/s", gw.fmt(gw.num(run.steps_per_second), 3)),
    fact("loss", gw.fmt(gw.num(run.last_loss))),
    fact("open alerts", run.open_alerts ? `${run.open_alerts} (${run.worst_severity})` : "0"),
    gw.el("span", { title: gw.when(run.started) }, `started ${when(run.started)}`),
    gw.el("span", { title: gw.when(run.last_seen) }, `last seen ${when(run.last_seen)}`),
    ...Object.entries(run.tags || {}).map(([k, v]) => gw.el("span", {}, `${k}=${v}`)),
  ];
  document.getElementById("facts").replaceChildren(...facts);
}

function renderAlerts() {
  if (page.markersShown === page.markers) return; // unchanged since last drawn
  page.markersShown = page.markers;
  const rows = [...page.markers].reverse().map((m) => {
    const event = m.event === "action" ? `action ${m.action}` : m.event === "ack" ? `${m.action} ${m.outcome}` : m.event;
    return gw.el("tr", { class: m.event },
      gw.el("td", { class: "num" }, String(m.step)),
      gw.el("td", {}, event),
      gw.el("td", {}, m.kind),
      gw.el("td", {}, gw.el("span", { class: `sev ${m.severity}` }, m.severity)),
      gw.el("td", {}, m.layer || ""),
      gw.el("td", {}, m.message),
      gw.el("td", { class: "hint" }, m.hint || ""),
    );
  });
  document.getElementById("alerts").replaceChildren(...rows);
  document.getElementById("no-alerts").hidden = rows.length > 0;
  const fired = page.markers.filter((m) => m.event === "fired").length;
  document.getElementById("alert-count").textContent = `(${fired} fired)`;
}

function render() {
  page.pending = false;
  renderHeader();
  charts.update(page.curves, page.markers);
  results.update(page.results, page.run, page.curves);
  heatmap.update(page.layers, stepRange());
  renderAlerts();
  // For bench/page_load.py and the browser tests: when the page first showed data.
  if (!performance.getEntriesByName("gradwatch:drawn").length) performance.mark("gradwatch:drawn");
}

function showError(text) {
  document.getElementById("charts").replaceChildren(gw.el("p", { class: "note" }, text));
}

if (window.GRADWATCH_REPORT) {
  const report = window.GRADWATCH_REPORT;
  document.getElementById("back").hidden = true;
  apply({ ...report.series, run: report.run });
  document.getElementById("live").textContent = `report written ${gw.when(report.written)}`;
} else {
  const stream = gw.follow(`/api/runs/${encodeURIComponent(page.name)}/stream`, apply);
  stream.addEventListener("error", async () => {
    if (stream.readyState !== EventSource.CLOSED) return;
    const answer = await fetch(`/api/runs/${encodeURIComponent(page.name)}/series`).catch(() => null);
    const body = answer ? await answer.json().catch(() => ({})) : {};
    showError(body.error || "The collector cannot be reached.");
  });
  window.addEventListener("resize", () => {
    heatmap.draw();
    results.redraw();
  });
}
