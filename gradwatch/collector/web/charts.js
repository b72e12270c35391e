"use strict";
// The training curves: one uPlot chart per panel, a line per curve (each bucket's last
// value), a bar from its min to its max (so a spike downsampled into a bucket still shows),
// and alert / action markers as vertical lines.

const COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"];
const MARKER_COLOURS = { critical: "#c9302c", warning: "#d68a00", info: "#3a78c2", action: "#6a4fb3" };

// What each panel draws: [curve, label, options]; "lr/*" and "log/*" expand to every such curve.
const PANELS = [
  { title: "Loss", lines: [["loss", "train", { band: true }], ["val_loss", "val", { points: true }],
    ["gap", "val − train", { scale: "gap" }]], nonfinite: true, empty: "No loss yet." },
  { title: "Gradient norm", log: true, lines: [["grad_norm_preclip", "pre-clip", { band: true }],
    ["grad_norm", "post-clip", { band: true }]], nonfinite: true, empty: "No gradient norm yet." },
  { title: "Learning rate", log: true, lines: [["lr/*", "group "]], empty: "No learning rate (no optimizer)." },
  { title: "Update / weight ratio", log: true, lines: [["update_ratio", "‖Δw‖/‖w‖", { band: true }],
    ["weight_norm", "‖w‖", { scale: "w" }]], empty: "Waiting for a per-layer detail step." },
  { title: "AMP loss scale", log: true, lines: [["loss_scale", "scale"]], skipped: true,
    empty: "No loss scale (no GradScaler passed as scaler=)." },
  { title: "Steps per second", lines: [["steps_per_second", "steps/s", { band: true }]], empty: "Not enough steps yet." },
  { title: "Logged values", lines: [["log/*", ""]], optional: true },
];

function panelLines(panel, names) {
  const out = [];
  for (const [curve, label, options] of panel.lines) {
    if (!curve.endsWith("*")) out.push({ curve, label, ...(options || {}) });
    else for (const name of names.filter((n) => n.startsWith(curve.slice(0, -1))).sort()) {
      out.push({ curve: name, label: label + name.slice(curve.length - 1) });
    }
  }
  return out.map((line, i) => ({ ...line, colour: COLOURS[i % COLOURS.length] }));
}

/** Plottable: non-finite as a gap, and non-positive values too on a log axis. */
const plottable = (log) => (v) => (v === null || !Number.isFinite(v) || (log && v <= 0) ? null : v);

function drawOverlays(u, panel, lines, view) {
  const { ctx, bbox } = u;
  const xs = u.data[0];
  ctx.save();
  ctx.beginPath();
  ctx.rect(bbox.left, bbox.top, bbox.width, bbox.height);
  ctx.clip();
  const barWidth = Math.max(1, bbox.width / Math.max(1, xs.length) * 0.9);
  lines.forEach((line, k) => {
    if (!line.band) return;
    const scale = u.series[k + 1].scale;
    ctx.strokeStyle = line.colour + "55";
    ctx.lineWidth = barWidth;
    ctx.beginPath();
    view.band[k].forEach(([lo, hi], i) => {
      if (lo === null || hi === null) return;
      const x = u.valToPos(xs[i], "x", true);
      ctx.moveTo(x, u.valToPos(lo, scale, true));
      ctx.lineTo(x, u.valToPos(hi, scale, true) - 1);
    });
    ctx.stroke();
  });
  const tick = (i, colour) => {
    ctx.fillStyle = colour;
    ctx.fillRect(u.valToPos(xs[i], "x", true) - 1.5, bbox.top + bbox.height - 8, 3, 8);
  };
  view.counts.forEach(({ skipped, nonfinite }, i) => {
    if (panel.skipped && skipped) tick(i, MARKER_COLOURS.warning);
    if (panel.nonfinite && nonfinite) tick(i, MARKER_COLOURS.critical);
  });
  for (const m of view.markers) {
    if (m.event !== "fired" && m.event !== "action") continue;
    const x = u.valToPos(m.step, "x", true);
    ctx.strokeStyle = m.event === "action" ? MARKER_COLOURS.action : MARKER_COLOURS[m.severity] || MARKER_COLOURS.info;
    ctx.lineWidth = 1;
    ctx.globalAlpha = 0.8;
    ctx.setLineDash(m.event === "action" ? [4, 3] : []);
    ctx.beginPath();
    ctx.moveTo(x, bbox.top);
    ctx.lineTo(x, bbox.top + bbox.height);
    ctx.stroke();
  }
  ctx.restore();
}

class Charts {
  constructor(container) {
    this.container = container;
    this.panels = new Map(); // title -> {node, plot, key, view}
    window.addEventListener("resize", () => {
      for (const p of this.panels.values()) if (p.plot) p.plot.setSize(this.size(p.node));
    });
  }

  size(node) {
    return { width: Math.max(200, node.clientWidth - 16), height: 220 };
  }

  /** Draws `curves` (the collector's `curves` JSON, numbers decoded) with `markers`. */
  update(curves, markers) {
    const names = Object.keys(curves.curves);
    const buckets = curves.step.flatMap((s, i) => (s === null ? [] : [i]));
    const xs = buckets.map((i) => curves.step[i]);
    for (const panel of PANELS) {
      const lines = panelLines(panel, names);
      if (panel.optional && !lines.length) continue;
      // A line on a scale of its own (the right axis) is linear.
      const column = (line, which) => {
        const values = curves.curves[line.curve] && curves.curves[line.curve][which];
        const p = plottable(panel.log && !line.scale);
        return buckets.map((i) => (values ? p(values[i]) : null));
      };
      const view = {
        band: lines.map((line) => {
          if (!line.band) return [];
          const [lo, hi] = [column(line, "min"), column(line, "max")];
          return lo.map((v, i) => [v, hi[i]]);
        }),
        counts: buckets.map((i) => ({ skipped: curves.skipped[i], nonfinite: curves.nonfinite[i] })),
        markers,
      };
      const data = [xs, ...lines.map((line) => column(line, "last"))];
      this.show(panel, lines, data, view);
    }
  }

  show(panel, lines, data, view) {
    let entry = this.panels.get(panel.title);
    if (!entry) {
      const node = gw.el("div", { class: "panel" }, gw.el("h3", {}, panel.title));
      const empty = gw.el("div", { class: "empty" }, panel.empty || "");
      node.append(empty);
      this.container.append(node);
      entry = { node, empty, plot: null, key: "" };
      this.panels.set(panel.title, entry);
    }
    entry.view = view;
    const hasData = data.slice(1).some((ys) => ys.some((v) => v !== null));
    entry.empty.hidden = hasData;
    const key = lines.map((l) => l.curve).join(",");
    if (entry.plot && entry.key === key) {
      entry.plot.setData(data);
      return;
    }
    if (entry.plot) entry.plot.destroy();
    entry.key = key;
    entry.plot = new uPlot(this.options(panel, lines, entry), data, entry.node);
  }

  options(panel, lines, entry) {
    // Each scale spans its lines' values and their min-max bars, so a spike sets the range.
    const range = (key, log) => (u, min, max) => {
      lines.forEach((line, k) => {
        if ((line.scale || "y") !== key || !line.band) return;
        for (const [lo, hi] of entry.view.band[k]) {
          if (lo !== null) min = min === null ? lo : Math.min(min, lo);
          if (hi !== null) max = max === null ? hi : Math.max(max, hi);
        }
      });
      if (min === null || max === null) return log ? [1, 10] : [0, 1];
      if (max - min <= 1e-6 * Math.abs(max)) min = max; // a constant with rounding noise: pad it, do not zoom in
      return log ? uPlot.rangeLog(min, max, 10, true) : uPlot.rangeNum(min, max, 0.1, true);
    };
    const log = !!panel.log;
    const scales = { x: { time: false }, y: { range: range("y", log), ...(log ? { distr: 3, log: 10 } : {}) } };
    const logValues = (u, splits) => splits.map((v) => (v === null ? null : gw.fmt(v, 2)));
    const axes = [{}, { scale: "y", size: 60, ...(log ? { values: logValues } : {}) }];
    for (const line of lines) {
      if (line.scale && !scales[line.scale]) {
        scales[line.scale] = { range: range(line.scale, false) };
        axes.push({ scale: line.scale, side: 1, size: 60, grid: { show: false } });
      }
    }
    return {
      ...this.size(entry.node),
      scales,
      axes,
      legend: { live: true },
      cursor: { drag: { x: false, y: false } },
      series: [
        { label: "step", value: (u, v) => (v === null ? "–" : String(v)) },
        ...lines.map((line) => ({
          label: line.label,
          scale: line.scale || "y",
          stroke: line.colour,
          width: 1.5,
          spanGaps: true,
          points: { show: !!line.points, size: 5, fill: line.colour },
          value: (u, v) => gw.fmt(v),
        })),
      ],
      hooks: { draw: [(u) => drawOverlays(u, panel, lines, entry.view)] },
    };
  }
}
