"use strict";
// The run list: one row per run the collector knows, live, sortable by any column.

const STATUS_ORDER = { running: 0, degraded: 1, lost: 2, crashed: 3, stopped: 4, finished: 5 };
const ENDED = new Set(["finished", "stopped", "crashed", "lost"]);
let runs = null; // until the first message
let sort = { key: "started", descending: true };

function sortValue(run, key) {
  if (key === "status") return STATUS_ORDER[run.status] ?? 9;
  if (key === "open_alerts") return (run.open_alerts || 0) * 10 + (gw.SEVERITY_RANK[run.worst_severity] || 0);
  const v = run[key];
  return typeof v === "string" ? v.toLowerCase() : v ?? -Infinity;
}

function row(run) {
  const alerts = run.open_alerts
    ? gw.el("span", { class: `sev ${run.worst_severity || ""}`, title: `worst: ${run.worst_severity}` },
        `${run.open_alerts} ${run.worst_severity || ""}`)
    : "0";
  return gw.el("tr", { class: ENDED.has(run.status) ? "ended" : "" },
    gw.el("td", { class: "name" }, gw.el("a", { href: gw.runUrl(run.name) }, run.name)),
    gw.el("td", {}, gw.el("span", { class: `status ${run.status}` }, run.status)),
    gw.el("td", { class: "num" }, String(run.last_step ?? "–")),
    gw.el("td", { class: "num" }, gw.fmt(gw.num(run.steps_per_second), 3)),
    gw.el("td", { class: "num" }, gw.fmt(gw.num(run.last_loss))),
    gw.el("td", { class: "num" }, alerts),
    gw.el("td", { title: gw.when(run.started) }, gw.ago(run.started)),
    gw.el("td", { title: gw.when(run.last_seen) }, gw.ago(run.last_seen)),
  );
}

function render() {
  if (runs === null) return;
  const sign = sort.descending ? -1 : 1;
  const sorted = [...runs].sort((a, b) => {
    const x = sortValue(a, sort.key), y = sortValue(b, sort.key);
    return x < y ? -sign : x > y ? sign : 0;
  });
  document.querySelector("#runs tbody").replaceChildren(...sorted.map(row));
  for (const th of document.querySelectorAll("#runs th")) {
    if (th.dataset.key === sort.key) th.setAttribute("aria-sort", sort.descending ? "descending" : "ascending");
    else th.removeAttribute("aria-sort");
  }
  document.getElementById("empty").hidden = runs.length > 0;
  const running = runs.filter((r) => !ENDED.has(r.status)).length;
  document.getElementById("summary").textContent = `${runs.length} runs, ${running} live`;
  if (!performance.getEntriesByName("gradwatch:drawn").length) performance.mark("gradwatch:drawn");
}

for (const th of document.querySelectorAll("#runs th")) {
  th.addEventListener("click", () => {
    sort = { key: th.dataset.key, descending: sort.key === th.dataset.key ? !sort.descending : th.dataset.key !== "name" };
    render();
  });
}

gw.follow("/api/runs/stream", (data) => {
  runs = data;
  render();
});
// Relative times ("12 s ago") age between messages.
setInterval(render, 5000);
