"use strict";
// Shared by the run list and the run page. Run names, layer names, tags and alert texts come
// from the network: they are only ever set as text (textContent, attribute values), never
// parsed as HTML.

const gw = {};

/** An element with properties and children; strings become text nodes. */
gw.el = function (tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
};

/** A number as the collector's JSON carries it: null (none), a number, or "Infinity". */
gw.num = function (v) {
  if (typeof v === "number") return v;
  if (v === "Infinity") return Infinity;
  if (v === "-Infinity") return -Infinity;
  if (v === "NaN") return NaN;
  return null;
};

gw.fmt = function (v, digits = 4) {
  if (v === null || v === undefined) return "–";
  if (!Number.isFinite(v)) return Number.isNaN(v) ? "NaN" : v > 0 ? "inf" : "-inf";
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a >= 1e5 || a < 1e-3) return v.toExponential(digits - 1).replace("e+", "e");
  return String(Number(v.toPrecision(digits)));
};

gw.ago = function (seconds) {
  if (!seconds) return "–";
  const d = Date.now() / 1000 - seconds;
  if (d < 5) return "now";
  if (d < 90) return `${Math.round(d)} s ago`;
  if (d < 5400) return `${Math.round(d / 60)} min ago`;
  if (d < 86400 * 2) return `${Math.round(d / 3600)} h ago`;
  return `${Math.round(d / 86400)} d ago`;
};

gw.when = (seconds) => (seconds ? new Date(seconds * 1000).toLocaleString() : "");

gw.runUrl = (name) => `/runs/${encodeURIComponent(name)}`;

gw.SEVERITY_RANK = { info: 1, warning: 2, critical: 3 };

/**
 * Follows a server-sent event stream: `onData` gets each message's parsed JSON. The browser
 * reconnects by itself (sending the last event id, so the collector can send only what
 * changed); `#live` says whether the stream is up.
 */
gw.follow = function (url, onData) {
  const live = document.getElementById("live");
  const source = new EventSource(url);
  const show = (up, text) => {
    if (!live) return;
    live.className = up ? "on" : "off";
    live.textContent = text;
  };
  source.onopen = () => show(true, "live");
  source.onerror = () => show(false, source.readyState === EventSource.CLOSED ? "disconnected" : "reconnecting…");
  source.onmessage = (event) => onData(JSON.parse(event.data));
  return source;
};
