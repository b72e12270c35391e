"use strict";
// The gradient-flow heatmap: layers (rows, model order) x steps, each cell the largest
// per-layer gradient norm of its steps on a log colour scale (a negative cell: no value).
// Drawn on a canvas; hovering names the layer, the steps and the value.

const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
const ZERO_RGB = [0, 0, 0];
const NONFINITE_RGB = [255, 0, 200];
const AXIS_HEIGHT = 18; // px under the cells for step labels

function viridis(t) {
  const x = Math.min(1, Math.max(0, t)) * (VIRIDIS.length - 1);
  const i = Math.min(VIRIDIS.length - 2, Math.floor(x));
  const f = x - i;
  return VIRIDIS[i].map((c, k) => Math.round(c + (VIRIDIS[i + 1][k] - c) * f));
}

/** Cells of the collector's `layers` JSON: little-endian float32, base64. */
function decodeCells(b64) {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  return new Float32Array(bytes.buffer);
}

class Heatmap {
  constructor(canvas, tip, scale) {
    Object.assign(this, { canvas, tip, scale, layers: null, columns: [] });
    canvas.addEventListener("mousemove", (e) => this.hover(e));
    canvas.addEventListener("mouseleave", () => { tip.style.display = "none"; });
  }

  /** `layers`: {rows, step, max} (cells as Float32Array); `range`: [first, last] step. */
  update(layers, range) {
    this.layers = layers;
    this.range = range;
    this.draw();
  }

  colourRange() {
    let lo = Infinity, hi = -Infinity;
    for (const v of this.layers.max) {
      if (v > 0 && v < Infinity) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
    }
    if (lo > hi) return [0, 1];
    const [a, b] = [Math.log10(lo), Math.log10(hi)];
    return b - a < 1e-9 ? [a - 0.5, b + 0.5] : [a, b];
  }

  draw() {
    const { canvas, layers } = this;
    const dpr = window.devicePixelRatio || 1;
    const rowCount = layers ? layers.rows.length : 0;
    const height = Math.min(480, Math.max(120, rowCount * 6)) + AXIS_HEIGHT;
    canvas.style.height = `${height}px`;
    const width = canvas.clientWidth;
    canvas.width = Math.round(width * dpr);
    canvas.height = Math.round(height * dpr);
    const ctx = canvas.getContext("2d");
    ctx.scale(dpr, dpr);
    ctx.fillStyle = "#eef0f3";
    ctx.fillRect(0, 0, width, height - AXIS_HEIGHT);
    this.columns = [];
    if (!layers || !layers.rows.length || !this.range) {
      this.legend(null);
      return;
    }
    const rows = layers.rows.length, plotHeight = height - AXIS_HEIGHT;
    const [first, last] = this.range;
    const span = Math.max(1, last - first + 1);
    const x = (step) => ((step - first) / span) * width;
    // Only columns that hold a step are drawn, each from the previous one's step.
    let previous = first - 1;
    layers.step.forEach((step, j) => {
      if (step === null) return;
      this.columns.push({ j, from: previous + 1, step, x0: x(previous + 1), x1: Math.max(x(step + 1), x(previous + 1) + 1) });
      previous = step;
    });
    const [lo, hi] = this.colourRange();
    const image = new ImageData(this.columns.length || 1, rows);
    this.columns.forEach((col, c) => {
      for (let r = 0; r < rows; r++) {
        const v = layers.max[col.j * rows + r];
        if (v < 0) continue; // no value: the background shows
        const rgb = v === Infinity ? NONFINITE_RGB : v <= 0 ? ZERO_RGB : viridis((Math.log10(v) - lo) / (hi - lo));
        const at = (r * image.width + c) * 4;
        image.data.set([...rgb, 255], at);
      }
    });
    const cells = document.createElement("canvas");
    cells.width = image.width;
    cells.height = rows;
    cells.getContext("2d").putImageData(image, 0, 0);
    ctx.imageSmoothingEnabled = false;
    this.columns.forEach((col, c) => ctx.drawImage(cells, c, 0, 1, rows, col.x0, 0, col.x1 - col.x0, plotHeight));
    this.rowHeight = plotHeight / rows;
    this.axis(ctx, first, last, x, height);
    this.legend([lo, hi]);
  }

  axis(ctx, first, last, x, height) {
    ctx.fillStyle = "#67707c";
    ctx.font = "11px system-ui, sans-serif";
    ctx.textBaseline = "bottom";
    const ticks = 6;
    for (let k = 0; k <= ticks; k++) {
      const step = Math.round(first + ((last - first) * k) / ticks);
      ctx.textAlign = k === 0 ? "left" : k === ticks ? "right" : "center";
      ctx.fillText(String(step), x(step), height - 2);
    }
  }

  legend(range) {
    const bar = gw.el("canvas", { width: 160, height: 10 });
    const g = bar.getContext("2d");
    for (let i = 0; i < 160; i++) {
      g.fillStyle = `rgb(${viridis(i / 159).join(",")})`;
      g.fillRect(i, 0, 1, 10);
    }
    const swatch = (rgb, label) => {
      const colour = gw.el("span", { class: "swatch" });
      colour.style.background = `rgb(${rgb.join(",")})`; // CSSOM: the page's CSP refuses style attributes
      return gw.el("span", {}, colour, ` ${label}`);
    };
    const parts = range
      ? [gw.el("span", {}, gw.fmt(10 ** range[0], 2)), bar, gw.el("span", {}, `${gw.fmt(10 ** range[1], 2)} (log scale)`),
        swatch(ZERO_RGB, "zero"), swatch(NONFINITE_RGB, "non-finite"), swatch([238, 240, 243], "no value (frozen, no detail)")]
      : ["No per-layer detail yet."];
    this.scale.replaceChildren(...parts);
  }

  hover(event) {
    const col = this.columns.find((c) => event.offsetX >= c.x0 && event.offsetX < c.x1);
    const row = Math.floor(event.offsetY / (this.rowHeight || 1));
    const rows = this.layers ? this.layers.rows.length : 0;
    if (!col || row < 0 || row >= rows) {
      this.tip.style.display = "none";
      return;
    }
    const max = this.layers.max[col.j * rows + row];
    const steps = col.from === col.step ? `step ${col.step}` : `steps ${col.from}–${col.step}`;
    const value = max < 0 ? "no value" : `grad norm ${gw.fmt(max)}${col.from === col.step ? "" : " (largest)"}`;
    this.tip.textContent = `${this.layers.rows[row]}\n${steps}\n${value}`;
    this.tip.style.display = "block";
    const left = Math.min(event.offsetX + 14, this.canvas.clientWidth - this.tip.offsetWidth);
    this.tip.style.left = `${Math.max(0, left) + 8}px`;
    this.tip.style.top = `${event.offsetY + 14}px`;
  }
}
