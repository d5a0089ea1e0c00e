// attnlab serve: the drawing parts of the page (no state of the app, no requests).
// HeadView: one head as lines between query and key tokens plus its matrix;
// MatrixView: a heatmap with token labels; thumbnails, saliency bars, image overlays.
"use strict";

const ROW = 18;          // px per token row in the lines view (matches --row in app.css)
const LINES_W = 140;     // px between the query and key columns
const MATRIX_PX = 320;   // the matrix's longest side, at most
let readouts = 0;        // ids of the readout lines, which tokens name in aria-describedby
const BLUE = [31, 111, 180], RED = [192, 57, 43], GREEN = [42, 157, 71], ORANGE = [230, 126, 34];

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

// A token as shown: visible whitespace, never an empty box.
function tokenLabel(t) {
  return t === "" ? "\u2423" : String(t).replace(/ /g, "\u00b7");
}

// A readout: strings as text, each token ([t]) in its own <bdi>, so that a right-to-left
// token cannot move its quotes and the numbers beside it (bidi isolation).
const readLine = (root, ...parts) => root.replaceChildren(
  ...parts.map(p => (Array.isArray(p) ? el("bdi", null, tokenLabel(p[0])) : p)));

function rgba(c, a) {
  return `rgba(${c[0]},${c[1]},${c[2]},${Math.max(0, Math.min(1, a)).toFixed(3)})`;
}

// White -> colour c at v in [0, 1], as [r, g, b].
function mix(c, v) {
  const t = Math.max(0, Math.min(1, v));
  return [255 - (255 - c[0]) * t, 255 - (255 - c[1]) * t, 255 - (255 - c[2]) * t];
}

// Sized for the device's pixels, drawn in CSS pixels.
function sizeCanvas(c, w, h) {
  const dpr = window.devicePixelRatio || 1;
  c.width = Math.max(1, Math.round(w * dpr));
  c.height = Math.max(1, Math.round(h * dpr));
  c.style.width = w + "px";
  c.style.height = h + "px";
  const g = c.getContext("2d");
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  return g;
}

// A heatmap of an nq x nk matrix with token labels, hover readout and a marked cell.
class MatrixView {
  constructor(root) {
    this.root = root;
    root.textContent = "";
    this.canvas = el("canvas");
    this.status = el("div", "m-status");
    this.status.id = `m-status-${++readouts}`;
    root.append(this.canvas, this.status);
    this.canvas.addEventListener("mousemove", e => this.onMove(e));
    this.canvas.addEventListener("mouseleave", () => this.rest());
    this.mark = null;
    this.vals = null;
    this.cursor = [0, 0];  // the cell the keyboard is on
    keyCells(this.canvas, { label: "heatmap: query rows, key columns", readout: this.status,
      onFocus: () => this.rest(), onLeave: () => this.highlight(-1, -1),
      onMove: (di, dj) => this.step(di, dj) });
  }

  focused() { return document.activeElement === this.canvas; }

  rest() {  // the mouse gone: the keyboard's cell while the matrix has focus, else no mark
    if (this.focused() && this.vals) this.show(...this.cursor); else this.highlight(-1, -1);
  }

  step(di, dj) {
    if (!this.vals) return;
    const clamp = (v, n) => Math.max(0, Math.min(n - 1, v));
    const [i, j] = this.cursor;
    this.show(...(this.cursor = [clamp(i + di, this.q.length), clamp(j + dj, this.k.length)]));
  }

  // rows: per query [[key, value], ...] (a top-k list); keys not listed are 0.
  setTop(queries, keys, rows, opts = {}) {
    const nq = queries.length, nk = keys.length;
    const vals = new Float32Array(nq * nk), has = new Uint8Array(nq * nk);
    rows.forEach((row, i) => row.forEach(([j, w]) => {
      vals[i * nk + j] = w;
      has[i * nk + j] = 1;
    }));
    this.set(queries, keys, vals, has, opts);
  }

  // rows: a dense nq x nk list of lists.
  setDense(queries, keys, rows, opts = {}) {
    const nq = queries.length, nk = keys.length;
    const vals = new Float32Array(nq * nk), has = new Uint8Array(nq * nk).fill(1);
    rows.forEach((row, i) => row.forEach((w, j) => { vals[i * nk + j] = w; }));
    this.set(queries, keys, vals, has, opts);
  }

  set(queries, keys, vals, has, opts) {
    this.q = queries; this.k = keys; this.vals = vals; this.has = has;
    this.diverging = !!opts.diverging;
    this.what = opts.what || "weight";
    let top = 0;
    for (const v of vals) top = Math.max(top, Math.abs(v));
    this.top = top || 1;
    this.mark = null;
    this.cursor = [0, 0];
    this.layout();
    Object.assign(this.canvas.dataset, { left: this.left, top: this.topPad, cell: this.cell });
    this.paint();
    this.render();
    const scale = this.diverging ? `\u221a(|${this.what}| / ${this.top.toPrecision(3)}), red > 0`
      : `\u221a(${this.what} / ${this.top.toPrecision(3)})`;
    this.status.textContent = `${queries.length} x ${keys.length}, colour ${scale}; ` +
      "hover a cell, or Tab to the matrix and use the arrow keys";
    if (this.focused()) this.show(...this.cursor);
  }

  layout() {
    const n = Math.max(this.q.length, this.k.length);
    this.cell = Math.max(0.25, Math.min(22, MATRIX_PX / n));
    this.labels = this.cell >= 9;
    const g = this.canvas.getContext("2d");
    g.font = "10px monospace";
    const width = t => g.measureText(tokenLabel(t)).width;
    const widest = ts => Math.min(90, Math.max(0, ...ts.map(width)) + 6);
    this.left = this.labels ? widest(this.q) : 2;
    this.topPad = this.labels ? widest(this.k) : 2;
    this.w = this.left + this.k.length * this.cell + 2;
    this.h = this.topPad + this.q.length * this.cell + 2;
  }

  // The matrix at one pixel per cell, kept offscreen and scaled when drawn.
  paint() {
    const nq = this.q.length, nk = this.k.length;
    this.off = document.createElement("canvas");
    this.off.width = nk; this.off.height = nq;
    const g = this.off.getContext("2d"), img = g.createImageData(nk, nq);
    for (let p = 0; p < nq * nk; p++) {
      const v = this.vals[p] / this.top, a = Math.sqrt(Math.abs(v));  // faint cells stay visible
      const c = mix(this.diverging && v < 0 ? BLUE : this.diverging ? RED : BLUE, a);
      img.data[4 * p] = c[0]; img.data[4 * p + 1] = c[1]; img.data[4 * p + 2] = c[2];
      img.data[4 * p + 3] = 255;
    }
    g.putImageData(img, 0, 0);
  }

  render() {
    if (!this.vals) return;
    const g = sizeCanvas(this.canvas, this.w, this.h), c = this.cell;
    g.imageSmoothingEnabled = false;
    g.drawImage(this.off, this.left, this.topPad, this.k.length * c, this.q.length * c);
    if (this.labels) this.drawLabels(g);
    if (this.mark) {
      const [i, j] = this.mark;
      g.strokeStyle = rgba(ORANGE, 1); g.lineWidth = 1.5;
      if (i >= 0) g.strokeRect(this.left, this.topPad + i * c, this.k.length * c, c);
      if (j >= 0) g.strokeRect(this.left + j * c, this.topPad, c, this.q.length * c);
    }
    if (this.focused()) {  // the keyboard's cell, as the focus ring of the matrix
      const [i, j] = this.cursor;
      g.strokeStyle = rgba(BLUE, 1); g.lineWidth = 2;
      g.strokeRect(this.left + j * c - 1, this.topPad + i * c - 1, c + 2, c + 2);
    }
  }

  drawLabels(g) {
    const c = this.cell;
    g.font = `${Math.min(11, c - 1)}px monospace`;
    g.fillStyle = "#333"; g.textBaseline = "middle"; g.textAlign = "right";
    this.q.forEach((t, i) =>
      g.fillText(tokenLabel(t), this.left - 3, this.topPad + (i + .5) * c, 84));
    g.save();
    g.rotate(-Math.PI / 2);
    g.textAlign = "left";
    this.k.forEach((t, j) =>
      g.fillText(tokenLabel(t), -this.topPad + 3, this.left + (j + .5) * c, 84));
    g.restore();
  }

  // Outline query row i and/or key column j (-1: none).
  highlight(i, j) { this.mark = i < 0 && j < 0 ? null : [i, j]; this.render(); }

  onMove(e) {
    if (!this.vals) return;
    const r = this.canvas.getBoundingClientRect();
    const j = Math.floor((e.clientX - r.left - this.left) / this.cell);
    const i = Math.floor((e.clientY - r.top - this.topPad) / this.cell);
    if (i < 0 || j < 0 || i >= this.q.length || j >= this.k.length) return;
    this.show(i, j);
  }

  // The readout of cell (query i, key j), from the mouse or the keyboard alike.
  show(i, j) {
    const p = i * this.k.length + j;
    const v = this.has[p] ? this.vals[p].toFixed(3) : "below the top k";
    readLine(this.status, "\"", [this.q[i]], `" (${i}) \u2192 "`, [this.k[j]], `" (${j}): ${v}`);
    this.highlight(i, j);
  }
}

// One head: bertviz-style lines (opacity = weight) and the matrix, with hover; the tokens
// take keyboard focus too (keys.js) and show the same readout.
class HeadView {
  constructor(root, onHover) {
    root.textContent = "";
    const main = el("div", "hv-main");
    this.status = el("div", "hv-status");
    this.status.id = `hv-status-${++readouts}`;
    this.cols = el("div", "hv-cols");
    this.leftCol = el("div", "hv-col hv-left");
    this.canvas = el("canvas", "hv-lines");
    this.rightCol = el("div", "hv-col hv-right");
    this.cols.append(this.leftCol, this.canvas, this.rightCol);
    main.append(this.status, this.cols);
    const m = el("div", "matrix");
    root.append(main, m);
    this.matrix = new MatrixView(m);
    this.onHover = onHover || null;
    this.hq = -1; this.hk = -1; this.lit = []; this.focused = null;
    this.leftCol.addEventListener("mouseover", e => this.pointed(e, true));
    this.rightCol.addEventListener("mouseover", e => this.pointed(e, false));
    this.cols.addEventListener("mouseleave", () => this.held(this.focused));
  }

  // The readout of a focused token ([0, i] a query, [1, j] a key), or none (null).
  held(f) {
    this.focused = f;
    this.hover(f && f[0] === 0 ? f[1] : -1, f && f[0] === 1 ? f[1] : -1, true);
  }

  pointed(e, isQuery) {
    const t = e.target.closest(".tok");
    if (!t) return;
    const i = +t.dataset.index;
    this.hover(isQuery ? i : -1, isQuery ? -1 : i, true);
  }

  // queries, keys: token strings; head: the API's HeadView; where: "layer 1, head 2".
  set(queries, keys, head, where) {
    this.q = queries; this.k = keys; this.head = head; this.where = where;
    this.left = this.column(this.leftCol, queries, "q");
    this.right = this.column(this.rightCol, keys, "k");
    this.byKey = keys.map(() => []);
    head.top.forEach((row, i) => row.forEach(([j, w]) => this.byKey[j].push([i, w])));
    this.byKey.forEach(list => list.sort((a, b) => b[1] - a[1]));
    this.focused = null;
    keyTokens([this.left, this.right], { vertical: true, readout: this.status,
      labels: ["query tokens: where each looks", "key tokens: who looks at each"],
      onFocus: (r, i) => this.held([r, i]), onLeave: () => this.held(null) });
    this.matrix.setTop(queries, keys, head.top);
    this.hq = -1; this.hk = -1; this.lit = [];
    this.draw();
  }

  column(root, tokens, cls) {
    root.textContent = "";
    return tokens.map((t, i) => {
      const d = el("div", `tok ${cls}`, tokenLabel(t));
      d.dataset.index = i; d.title = `${t} (${i})`;
      root.appendChild(d);
      return d;
    });
  }

  hover(i, j, fromUser) {
    this.hq = i; this.hk = j;
    this.draw();
    this.matrix.highlight(i, j);
    if (fromUser && this.onHover) this.onHover(i, j);
  }

  line(g, i, j, w, width) {
    g.globalAlpha = Math.max(0, Math.min(1, w));
    g.lineWidth = width;
    g.beginPath();
    g.moveTo(0, i * ROW + ROW / 2);
    g.lineTo(LINES_W, j * ROW + ROW / 2);
    g.stroke();
  }

  light(d, cls, bg) {
    if (cls) d.classList.add(cls);
    if (bg) d.style.background = bg;
    this.lit.push(d);
  }

  draw() {
    const t0 = performance.now();
    for (const d of this.lit) { d.classList.remove("hover", "argmax"); d.style.background = ""; }
    this.lit = [];
    const g = sizeCanvas(this.canvas, LINES_W, Math.max(this.q.length, this.k.length) * ROW);
    g.strokeStyle = rgba(BLUE, 1);
    let lines = 0;
    if (this.hq >= 0) lines = this.drawQuery(g, this.hq);
    else if (this.hk >= 0) lines = this.drawKey(g, this.hk);
    else {
      this.head.top.forEach((row, i) => row.forEach(([j, w]) => {
        if (w >= 0.01) { this.line(g, i, j, w, 1); lines++; }
      }));
      const size = `${this.q.length} queries x ${this.k.length} keys`;
      this.status.textContent = `${this.where}: ${size}, top ${this.head.top_k} keys each; ` +
        "hover a token, or Tab to one and use the arrow keys";
    }
    g.globalAlpha = 1;
    const body = document.body.dataset;
    body.drawMs = (performance.now() - t0).toFixed(1);
    body.lines = String(lines);
  }

  drawQuery(g, i) {
    const row = this.head.top[i], best = this.head.argmax[i];
    this.light(this.left[i], "hover");
    for (const [j, w] of row) {
      this.line(g, i, j, w, 1 + 3 * w);
      this.light(this.right[j], null, rgba(BLUE, w));
    }
    this.light(this.right[best], "argmax");
    this.say(["\"", [this.q[i]], `" (${i}) looks at`], row.slice(0, 5), this.k);
    return row.length;
  }

  drawKey(g, j) {
    const list = this.byKey[j];
    this.light(this.right[j], "hover");
    for (const [i, w] of list) {
      this.line(g, i, j, w, 1 + 3 * w);
      this.light(this.left[i], null, rgba(BLUE, w));
      if (this.head.argmax[i] === j) this.light(this.left[i], "argmax");
    }
    const who = list.length
      ? `looked at by ${list.length} queries (in their top ${this.head.top_k}):`
      : "in no query's top keys";
    this.say(["\"", [this.k[j]], `" (${j}) is ${who}`], list.slice(0, 5), this.q);
    return list.length;
  }

  // The status line: a sentence (readLine's parts), then up to 5 tokens with their weights.
  say(lead, pairs, tokens) {
    readLine(this.status, `${this.where}: `, ...lead, " ");
    for (const [idx, w] of pairs) {
      const s = el("span", "w"); readLine(s, [tokens[idx]], ` ${w.toFixed(3)}`);
      s.dataset.index = idx; s.dataset.weight = String(w);
      this.status.append(s, " ");
    }
  }
}

// Thumbnails: one small canvas per layer x head, each normalized to its own maximum.
function drawThumbs(root, thumbs, selected) {
  root.textContent = "";
  const heads = thumbs[0] ? thumbs[0].length : 0;
  root.style.gridTemplateColumns = `24px repeat(${heads}, 26px)`;
  root.appendChild(el("span"));
  for (let h = 0; h < heads; h++) root.appendChild(el("span", "lab", String(h)));
  thumbs.forEach((layer, l) => {
    root.appendChild(el("span", "lab", `L${l}`));
    layer.forEach((grid, h) => root.appendChild(thumbnail(grid, l, h, selected)));
  });
}

function thumbnail(grid, l, h, selected) {
  const c = el("canvas"), dq = grid.length, dk = grid[0].length;
  c.width = dk; c.height = dq;
  c.dataset.layer = l; c.dataset.head = h; c.title = `layer ${l}, head ${h}`;
  c.tabIndex = 0;  // Tab to a head, Enter or Space picks it
  c.setAttribute("role", "button"); c.setAttribute("aria-label", c.title);
  if (l === selected[0] && h === selected[1]) c.classList.add("sel");
  const g = c.getContext("2d"), img = g.createImageData(dk, dq);
  const top = Math.max(1e-9, ...grid.flat());
  grid.flat().forEach((v, p) => {
    const rgb = mix(BLUE, Math.sqrt(v / top));
    img.data.set([rgb[0], rgb[1], rgb[2], 255], 4 * p);
  });
  g.putImageData(img, 0, 0);
  return c;
}

// Per-token saliency: a bar per token (height = |value| / max, green >= 0, red < 0); a
// token hovered or focused shows its value in the readout line.
function drawSaliency(root, tokens, values, readout) {
  root.textContent = "";
  const hint = "hover a token, or Tab to one and use the arrow keys, for its value";
  const say = i => (i < 0 ? readLine(readout, hint)
    : readLine(readout, "\"", [tokens[i]], `" (${i}): ${values[i].toPrecision(4)}`));
  say(-1);
  const top = Math.max(1e-12, ...values.map(Math.abs));
  tokens.forEach((t, i) => {
    const v = values[i], box = el("div", "sal-tok"), bars = el("div", "bars");
    const bar = el("div", "bar");
    bar.style.height = (40 * Math.abs(v) / top).toFixed(1) + "px";
    bar.style.background = rgba(v >= 0 ? GREEN : RED, 0.35 + 0.65 * Math.abs(v) / top);
    bars.appendChild(bar);
    box.append(bars, el("span", "t", tokenLabel(t)));
    box.dataset.index = i; box.dataset.value = String(v);
    box.title = `${t} (${i}): ${v}`;
    box.addEventListener("mouseenter", () => say(i));
    root.appendChild(box);
  });
  root.onmouseleave = () => say(root.contains(document.activeElement)
    ? +document.activeElement.dataset.index : -1);
  keyTokens([[...root.children]], { vertical: false, readout, labels: ["saliency per token"],
    onFocus: (_, i) => say(i), onLeave: () => say(-1) });
}

// The image as the model saw it (h x w grey or h x w x 3 colour, in 0..1), then one copy
// per overlay map.
function drawOverlays(root, image) {
  root.textContent = "";
  const h = image.pixels.length, w = image.pixels[0].length;
  const scale = Math.max(1, Math.floor(160 / Math.max(h, w)));
  const grey = document.createElement("canvas");
  grey.width = w; grey.height = h;
  const gi = grey.getContext("2d").createImageData(w, h);
  const byte = v => Math.round(255 * Math.max(0, Math.min(1, v)));
  image.pixels.flat().forEach((v, p) => {  // grey v, or [r, g, b] for colour images
    const rgb = Array.isArray(v) ? v.map(byte) : [byte(v), byte(v), byte(v)];
    gi.data.set([...rgb, 255], 4 * p);
  });
  grey.getContext("2d").putImageData(gi, 0, 0);
  const figure = (label, map) => {
    const f = el("figure"), c = el("canvas");
    c.width = w * scale; c.height = h * scale;
    const g = c.getContext("2d");
    g.imageSmoothingEnabled = false;
    g.drawImage(grey, 0, 0, c.width, c.height);
    if (map) g.drawImage(overlayCanvas(map), 0, 0, c.width, c.height);
    f.append(c, el("figcaption", null, label));
    f.dataset.label = label;
    root.appendChild(f);
  };
  figure("input", null);
  for (const o of image.overlays) figure(o.label, o.map);
}

// A map as orange over the picture, from its minimum (clear) to its maximum (strongest).
function overlayCanvas(map) {
  const n = map.length, m = map[0].length, c = document.createElement("canvas");
  c.width = m; c.height = n;
  const g = c.getContext("2d"), img = g.createImageData(m, n);
  const flat = map.flat(), lo = Math.min(...flat), span = Math.max(1e-12, Math.max(...flat) - lo);
  flat.forEach((v, p) => img.data.set([...ORANGE, Math.round(200 * (v - lo) / span)], 4 * p));
  g.putImageData(img, 0, 0);
  return c;
}
