"use strict";
// A run's one-off results, each on a plain canvas: the LR range test (the loss and its
// smoothed average against the LR on a log axis, the suggested LR and the alternative
// marked, the reason beside it) and the latest loss-landscape slice (a line for one
// direction, a heat grid for two, the centre marked). Reasons come from the network: they
// are set as text only.

const BOX = { left: 56, right: 14, top: 12, bottom: 34 };
const INK = { axis: "#67707c", grid: "#eef0f3", raw: "#1f77b466", smooth: "#1f77b4", suggested: "#c9302c",
  alternative: "#d68a00", centre: "#c9302c", nonfinite: "#d0d4da" };

/** The canvas sized to its box in device pixels; its context draws in CSS pixels. */
function sizedContext(canvas, height) {
  const dpr = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 600;
  canvas.width = Math.round(width * dpr);
  canvas.height = Math.round(height * dpr);
  canvas.style.height = `${height}px`; // CSSOM: the page's CSP refuses style attributes
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, width, height);
  ctx.font = "11px system-ui, sans-serif";
  return { ctx, width, height };
}

const finite = (values) => values.filter((v) => typeof v === "number" && Number.isFinite(v));

/** [lo, hi] of the finite values, widened where they are all equal. */
function extent(values) {
  const known = finite(values);
  if (!known.length) return [0, 1];
  const lo = Math.min(...known), hi = Math.max(...known);
  return lo < hi ? [lo, hi] : [lo - 0.5, hi + 0.5];
}

/** Data to pixels inside the plot box; `logX` for an LR axis. */
function scales(width, height, xRange, yRange, logX) {
  const fx = logX ? Math.log10 : (v) => v;
  const [a, b] = xRange.map(fx);
  const [lo, hi] = yRange;
  return {
    x: (v) => BOX.left + ((fx(v) - a) / (b - a || 1)) * (width - BOX.left - BOX.right),
    y: (v) => height - BOX.bottom - ((v - lo) / (hi - lo || 1)) * (height - BOX.top - BOX.bottom),
  };
}

function ticks([lo, hi], logX) {
  if (logX) {
    const out = [];
    for (let e = Math.ceil(Math.log10(lo)); e <= Math.floor(Math.log10(hi)); e++) out.push(10 ** e);
    return out;
  }
  return [0, 1, 2, 3, 4].map((i) => lo + ((hi - lo) * i) / 4);
}

function drawAxes(ctx, width, height, map, xRange, yRange, logX, xLabel, yLabel, gridLines = true) {
  ctx.strokeStyle = gridLines ? INK.grid : "transparent";
  ctx.fillStyle = INK.axis;
  ctx.lineWidth = 1;
  ctx.textAlign = "center";
  for (const t of ticks(xRange, logX)) {
    const x = map.x(t);
    ctx.beginPath();
    ctx.moveTo(x, BOX.top);
    ctx.lineTo(x, height - BOX.bottom);
    ctx.stroke();
    ctx.fillText(logX ? `1e${Math.round(Math.log10(t))}` : gw.fmt(t, 2), x, height - BOX.bottom + 13);
  }
  ctx.textAlign = "right";
  for (const t of ticks(yRange, false)) {
    ctx.fillText(gw.fmt(t, 3), BOX.left - 4, map.y(t) + 4);
  }
  ctx.textAlign = "center";
  ctx.fillText(xLabel, (BOX.left + width - BOX.right) / 2, height - 4);
  ctx.save();
  ctx.translate(12, (BOX.top + height - BOX.bottom) / 2);
  ctx.rotate(-Math.PI / 2);
  ctx.fillText(yLabel, 0, 0);
  ctx.restore();
  ctx.strokeStyle = INK.axis;
  ctx.strokeRect(BOX.left, BOX.top, width - BOX.left - BOX.right, height - BOX.top - BOX.bottom);
}

function clipToBox(ctx, width, height) {
  ctx.beginPath();
  ctx.rect(BOX.left, BOX.top, width - BOX.left - BOX.right, height - BOX.top - BOX.bottom);
  ctx.clip();
}

/** A polyline through the points whose x and y are both drawable (x > 0 on a log axis); a
gap elsewhere. */
function line(ctx, map, xs, ys, colour, width, logX) {
  ctx.strokeStyle = colour;
  ctx.lineWidth = width;
  ctx.beginPath();
  let open = false;
  xs.forEach((x, i) => {
    const y = ys[i];
    const drawable = (v) => typeof v === "number" && Number.isFinite(v);
    if (!drawable(x) || (logX && x <= 0) || !drawable(y)) {
      open = false;
      return;
    }
    if (open) ctx.lineTo(map.x(x), map.y(y));
    else ctx.moveTo(map.x(x), map.y(y));
    open = true;
  });
  ctx.stroke();
}

function drawLRFind(canvas, test) {
  const { ctx, width, height } = sizedContext(canvas, 280);
  const lrs = test.lrs.map((v) => (typeof v === "number" && v > 0 ? v : null));
  const xRange = extent(lrs.filter((v) => v !== null));
  if (xRange[0] <= 0) return;
  const yRange = lossRange(test);
  const map = scales(width, height, xRange, yRange, true);
  drawAxes(ctx, width, height, map, xRange, yRange, true, "learning rate (log)", "loss");
  ctx.save();
  clipToBox(ctx, width, height);
  line(ctx, map, lrs, test.losses, INK.raw, 1, true);
  line(ctx, map, lrs, test.smoothed, INK.smooth, 2, true);
  const mark = (lr, colour, dash, label, row) => {
    if (typeof lr !== "number" || !(lr > 0)) return;
    const x = map.x(lr);
    ctx.strokeStyle = colour;
    ctx.setLineDash(dash);
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    ctx.moveTo(x, BOX.top);
    ctx.lineTo(x, height - BOX.bottom);
    ctx.stroke();
    ctx.setLineDash([]);
    ctx.fillStyle = colour;
    ctx.textAlign = x > width / 2 ? "right" : "left";
    ctx.fillText(`${label} ${gw.fmt(lr, 3)}`, x + (x > width / 2 ? -4 : 4), BOX.top + 12 + 14 * row);
  };
  mark(test.suggested_lr, INK.suggested, [6, 3], "suggested", 0);
  mark(test.alternative_lr, INK.alternative, [2, 3], "alternative", 1);
  ctx.restore();
}

/** From the lowest loss to half again above the smoothed loss's level before its minimum:
the descent fills the chart, the divergence that ended the test leaves it at the top. */
function lossRange(test) {
  const smoothed = test.smoothed.map((v) => (typeof v === "number" && Number.isFinite(v) ? v : Infinity));
  const at = smoothed.indexOf(Math.min(...smoothed));
  const before = finite(test.smoothed.slice(0, at + 1));
  if (!before.length) return extent(test.losses);
  const [lo, hi] = extent([...before, ...finite(test.losses).filter((v) => v < Math.max(...before))]);
  return [lo, hi + 0.5 * (hi - lo)];
}

/** What the page says beside the curve: the verdict and why, or that it is on its way. */
function lrFindVerdict(test) {
  if (test.pending) return [gw.el("p", { class: "note" }, "The test is running: the verdict comes when it ends.")];
  const lr = (v) => (typeof v === "number" ? gw.fmt(v, 3) : "none");
  return [
    gw.el("p", {}, "suggested lr ", gw.el("b", { class: "suggested" }, lr(test.suggested_lr)),
      "  ·  alternative ", gw.el("b", { class: "alternative" }, lr(test.alternative_lr)),
      ` (the LR at the minimum of the smoothed loss, ${lr(test.min_loss_lr)}, / 10)`),
    gw.el("p", { class: "reason" }, test.reason || ""),
    gw.el("p", { class: "note" }, test.stop_detail ? `stopped: ${test.stop_detail}` : ""),
  ];
}

function drawLandscapeLine(canvas, grid) {
  const { ctx, width, height } = sizedContext(canvas, 260);
  const losses = grid.losses[0];
  const xRange = extent(grid.alphas);
  const yRange = extent([...losses, grid.centre]);
  const map = scales(width, height, xRange, yRange, false);
  drawAxes(ctx, width, height, map, xRange, yRange, false, `${grid.directions[0]} direction`, "loss");
  ctx.save();
  clipToBox(ctx, width, height);
  line(ctx, map, grid.alphas, losses, INK.smooth, 2, false);
  markCentre(ctx, map.x(0), map.y(grid.centre));
  ctx.restore();
}

function drawLandscapeGrid(canvas, grid, scaleNode) {
  const { ctx, width, height } = sizedContext(canvas, 320);
  const values = finite(grid.losses.flat());
  const lo = values.length ? Math.min(...values) : 0;
  // Colours span the lower 90% of the losses: a few far corners would wash out the valley.
  const sorted = [...values].sort((a, b) => a - b);
  const hi = sorted.length ? sorted[Math.floor(0.9 * (sorted.length - 1))] : 1;
  const xRange = extent(grid.alphas), yRange = extent(grid.betas);
  const map = scales(width, height, xRange, yRange, false);
  const cellW = (width - BOX.left - BOX.right) / (grid.alphas.length - 1 || 1);
  const cellH = (height - BOX.top - BOX.bottom) / (grid.betas.length - 1 || 1);
  ctx.save();
  clipToBox(ctx, width, height);
  grid.losses.forEach((row, j) => row.forEach((v, i) => {
    const known = typeof v === "number" && Number.isFinite(v);
    const t = known ? Math.min(1, Math.max(0, (v - lo) / (hi - lo || 1))) : 0;
    ctx.fillStyle = known ? `rgb(${viridis(t).join(",")})` : INK.nonfinite;
    ctx.fillRect(map.x(grid.alphas[i]) - cellW / 2, map.y(grid.betas[j]) - cellH / 2, cellW + 1, cellH + 1);
  }));
  markCentre(ctx, map.x(0), map.y(0));
  ctx.restore();
  drawAxes(ctx, width, height, map, xRange, yRange, false, `${grid.directions[0]} direction`,
    `${grid.directions[1]} direction`, false);
  scaleNode.textContent = `colour: loss from ${gw.fmt(lo, 3)} (dark) to ${gw.fmt(hi, 3)} and above (yellow); ` +
    "grey: not finite";
}

function markCentre(ctx, x, y) {
  ctx.strokeStyle = "#fff";
  ctx.lineWidth = 3;
  ctx.beginPath();
  ctx.arc(x, y, 5, 0, 2 * Math.PI);
  ctx.stroke();
  ctx.strokeStyle = INK.centre;
  ctx.lineWidth = 1.5;
  ctx.stroke();
}

/** An LR-find run's curve from its records, until the verdict arrives. */
function lrFindFromCurves(curves) {
  const lr = curves.curves["lr/0"], loss = curves.curves.loss, smoothed = curves.curves["log/smoothed_loss"];
  if (!lr || !loss) return null;
  return { lrs: lr.last, losses: loss.last, smoothed: smoothed ? smoothed.last : [], pending: true };
}

class Results {
  constructor() {
    this.node = (id) => document.getElementById(id);
    this.shown = { lrFind: null, landscape: null };
  }

  /** Draws what changed: `results` as the series carries them, `run` its /api/runs entry. */
  update(results, run, curves) {
    const lrFindRun = ((run && run.tags) || {}).kind === "lr-find";
    const test = results.lr_find || (lrFindRun ? lrFindFromCurves(curves) : null);
    this.node("lr-find").hidden = !test;
    if (test && (test.pending || test !== this.shown.lrFind)) {
      drawLRFind(this.node("lr-find-chart"), test);
      this.node("lr-find-verdict").replaceChildren(...lrFindVerdict(test));
    }
    this.shown.lrFind = test;
    const grid = results.landscape;
    this.node("landscape").hidden = !grid;
    if (grid && grid !== this.shown.landscape) this.drawLandscape(grid);
    this.shown.landscape = grid;
  }

  drawLandscape(grid) {
    const two = grid.directions.length === 2;
    const shape = two ? `${grid.alphas.length}×${grid.betas.length}` : `${grid.alphas.length} points`;
    this.node("landscape-note").textContent =
      `(step ${grid.step}, ${shape} within ±${gw.fmt(grid.radius, 3)} filter-normalised; centre loss ` +
      `${gw.fmt(gw.num(grid.centre))}, marked ○)`;
    if (two) drawLandscapeGrid(this.node("landscape-chart"), grid, this.node("landscape-scale"));
    else {
      drawLandscapeLine(this.node("landscape-chart"), grid);
      this.node("landscape-scale").textContent = "";
    }
  }

  /** After a resize: everything again. */
  redraw() {
    if (this.shown.lrFind) drawLRFind(this.node("lr-find-chart"), this.shown.lrFind);
    if (this.shown.landscape) this.drawLandscape(this.shown.landscape);
  }
}
