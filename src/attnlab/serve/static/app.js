// attnlab serve: the page's state and its calls to the JSON API (its schema: /openapi.json).
// Test hooks on <body>: data-ready="1" once the first result is drawn; data-busy="1" while
// any request or job is in flight; data-done counts the times the page became idle;
// data-job is the last job's state. Drawing lives in views.js, the
// compare mode in compare.js, the explanation jobs in explain.js.
"use strict";

const $ = sel => document.querySelector(sel);
const S = {
  limits: {}, models: new Map(), mode: "explore", method: "attention",
  stack: null, layer: 0, head: 0,
  ran: null,        // the input of the last run: {model, text} or {model, image}
  res: null,        // the last /api/attend response (thumbs kept across head changes)
  cmp: null,        // the last /api/compare response
  job: null,        // the id of the job being polled
  want: 0,          // counts dropped jobs: a job started before the last drop is cancelled
  seq: 0,           // the latest head request; older answers are dropped
};
const VIEW = {};    // HeadViews and MatrixViews, made once in init()
const METHODS = { attention: "raw attention", rollout: "rollout", flow: "attention flow",
  gradient: "gradient relevance", integrated: "integrated gradients" };

// --- requests -------------------------------------------------------------------------

let inflight = 0, idle = 0;
function busy(d) {
  inflight += d;
  document.body.dataset.busy = inflight > 0 ? "1" : "0";
  if (inflight === 0) document.body.dataset.done = String(++idle);
}

class ApiError extends Error {}

// FastAPI's own validation errors come as a list; ours as one line.
function detailText(detail) {
  if (Array.isArray(detail))
    return detail.map(d => `${(d.loc || []).join(".")}: ${d.msg}`).join("; ");
  return typeof detail === "string" ? detail : JSON.stringify(detail);
}

async function api(method, path, body) {
  busy(+1);
  try {
    const init = { method, headers: {} };
    if (body !== undefined) {
      init.headers["content-type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const r = await fetch(path, init);
    let data = null;
    try { data = await r.json(); } catch (e) { data = null; }
    if (!r.ok) {
      const why = data && data.detail !== undefined ? detailText(data.detail) : r.statusText;
      throw new ApiError(`${r.status}: ${why}`);
    }
    return data;
  } finally {
    busy(-1);
  }
}

// A user action: one busy span, its error shown as one line on the page.
async function action(fn) {
  busy(+1);
  try {
    showError(null);
    await fn();
  } catch (e) {
    showError(e instanceof ApiError ? e.message : `error: ${e.message || e}`);
  } finally {
    busy(-1);
  }
}

function showError(msg) {
  const e = $("#error");
  e.hidden = !msg;
  e.textContent = msg || "";
}

// Seconds as the page shows them (3 decimals), "?" when the answer has none.
const secs = x => (typeof x === "number" ? x.toFixed(3) : "?");
const sleep = ms => new Promise(r => setTimeout(r, ms));
const model = () => S.models.get($("#model").value);
// A number box's value as typed (0 or -3 is the server's 422 to show, not 16 or 1); an
// empty one: 16, or its max (the server's limit) if lower.
const numberIn = el => (el.value.trim() === "" ? Math.min(16, +el.max || 16) : +el.value);
const topK = () => numberIn($("#topk"));

// --- explore: attend, heads, explanations ---------------------------------------------

function currentInput() {
  const m = model();
  if (m.input === "image") return { model: m.name, image: $("#draw").toDataURL("image/png") };
  return { model: m.name, text: $("#text").value };
}

async function run() {
  if (S.mode === "compare") return compare();
  const input = currentInput();
  if (!S.ran || S.ran.model !== input.model) { S.stack = null; S.layer = 0; S.head = 0; }
  S.ran = input;  // the same model keeps its stack, layer and head for a new text
  await attend(true);
  if (S.method === "attention") return;
  if (methodOk(S.method)) await explain();
  else $("#saliency").textContent = $("#method-note").textContent || "not for this model";
}

async function attend(withThumbs) {
  const seq = ++S.seq, input = S.ran;
  // a head of an input whose answer has not been drawn (a head picked while a new text
  // ran) asks for that input's thumbnails: the shown ones were the previous text's
  const thumbs = withThumbs || !S.res || S.res.input !== input;
  const body = { ...input, stack: S.stack, layer: S.layer, head: S.head, top_k: topK(),
    thumbs };
  const r = await api("POST", "/api/attend", body);
  if (seq !== S.seq) return;  // a newer head was asked for meanwhile
  r.input = input;
  if (!thumbs) r.thumbs = S.res.thumbs;
  r.runSeconds = thumbs ? r.seconds : S.res.runSeconds;
  S.res = r; S.stack = r.stack; S.layer = r.head.layer; S.head = r.head.head;
  drawAttend(r);
  loaded(r.model);
  document.body.dataset.ready = "1"; document.body.dataset.stale = "0";
}

function stackOf(r) {
  return r.stacks.find(s => s.name === r.stack) || r.stacks[0];
}

function drawAttend(r) {
  const st = stackOf(r);
  fillStacks(r.stacks, r.stack);
  fillHeads(st.layers, st.heads);
  if (r.thumbs) drawThumbs($("#thumbs"), r.thumbs, [S.layer, S.head]);
  VIEW.head.set(st.queries, st.keys, r.head, `layer ${S.layer}, head ${S.head}`);
  $("#timing").textContent = r.runSeconds === r.seconds ? `attention ${secs(r.seconds)} s`
    : `attention ${secs(r.runSeconds)} s, this head ${secs(r.seconds)} s`;
  $("#timing").dataset.seconds = String(r.seconds);
  drawOutput(r);
  drawImage(r);
  flowLimit(st.queries.length);
}

function drawOutput(r) {
  const panel = $("#seq2seq");
  panel.hidden = r.output === null && !r.alignment;
  $("#output").textContent = r.output === null ? "" : r.output;
  $("#alignment").hidden = !r.alignment;
  if (r.alignment) {
    const a = r.alignment;
    VIEW.alignment.setDense(a.queries, a.keys, a.weights, { what: "mean cross-attention" });
  }
}

function drawImage(r) {
  $("#image").hidden = !r.image;
  if (!r.image) return;
  drawOverlays($("#overlays"), r.image);
  $("#image-note").textContent = `${r.image.pixels.length} x ${r.image.pixels[0].length} pixels, ` +
    `${r.image.grid} x ${r.image.grid} patches`;
}

// A model that answered is loaded now; the note says so.
function loaded(name) {
  const m = S.models.get(name);
  if (m && !m.loaded) { m.loaded = true; noteModel(m); }
}

function fillStacks(stacks, chosen) {
  const s = $("#stack");
  s.textContent = "";
  for (const st of stacks) s.add(new Option(`${st.name} (${st.kind})`, st.name));
  s.value = chosen;
  $("#stack-label").hidden = stacks.length < 2;
}

function fillHeads(layers, heads) {
  const fill = (sel, n, v) => {
    if (sel.options.length !== n) {
      sel.textContent = "";
      for (let i = 0; i < n; i++) sel.add(new Option(String(i), String(i)));
    }
    sel.value = String(v);
  };
  fill($("#layer"), layers, S.layer);
  fill($("#head"), heads, S.head);
}

// Layer and head from a thumbnail, the selects or the divergence table.
async function selectHead(l, h) {
  S.layer = l; S.head = h;
  for (const c of document.querySelectorAll("#thumbs canvas"))
    c.classList.toggle("sel", +c.dataset.layer === l && +c.dataset.head === h);
  if (S.mode === "compare") return compare();
  if (S.ran) await attend(false);
}

// An explanation (not raw attention) of a text is what the page shows.
function explained() {
  return S.mode === "explore" && S.method !== "attention" && !!S.ran &&
    S.ran.text !== undefined && methodOk(S.method);
}

function methodOk(m) {
  return methodAvailable(m) && (m !== "flow" || S.flowOk !== false);
}

function flowLimit(n) {
  const max = S.limits.max_flow_tokens;
  S.flowOk = !(max && n > max);
  const why = S.flowOk ? "" : `attention flow: ${n} tokens, more than max_flow_tokens = ${max}`;
  setMethod("flow", methodAvailable("flow") && S.flowOk, why || undefined);
  $("#method-note").textContent = why;
}

function methodAvailable(m) {
  const info = model();
  return m === "attention" || (info.input === "text" && info.methods.includes(m));
}

function setMethod(m, enabled, why) {
  const input = document.querySelector(`input[name=method][value=${m}]`);
  input.disabled = !enabled;
  input.parentElement.classList.toggle("off", !enabled);
  const off = why || `${METHODS[m]} is not available for this model`;
  input.parentElement.title = enabled ? "" : off;
}

function chooseMethod(m) {
  S.method = m;
  dropJob();
  const raw = m === "attention";
  $("#attention").hidden = !raw;
  $("#explain").hidden = raw;
  if (!raw) {
    $("#saliency").textContent = "";
    $("#saliency-status").textContent = "";
    $("#explain-matrix").hidden = true;
    $("#timing-explain").textContent = "";
    if (S.ran && S.ran.text !== undefined) action(explain);
  }
}

// --- models and input -----------------------------------------------------------------

function onModel() {
  const m = model();
  const image = m.input === "image";
  $("#text-input").hidden = image;
  $("#image-input").hidden = !image;
  $("#mode-compare").disabled = image;
  if (image && S.mode === "compare") setMode("explore", false);
  for (const k of Object.keys(METHODS)) setMethod(k, methodAvailable(k));
  if (!methodAvailable(S.method)) {
    document.querySelector("input[name=method][value=attention]").checked = true;
    chooseMethod("attention");
  }
  noteModel(m);
  action(async () => {
    if (!m.loaded || (!image && !m.example)) await loadModel(m);
    if (image) sampleDrawing(m.task);
    else {
      const examples = [...S.models.values()].filter(x => x !== m).map(x => x.example);
      const box = $("#text");
      if (!box.value.trim() || examples.includes(box.value)) box.value = m.example;
    }
    chars();
    await run();
  });
}

// GET /api/models/{name}: the model loaded now, its example text filled in.
async function loadModel(m) {
  $("#model-note").textContent += " (loading\u2026)";
  const path = m.name.split("/").map(encodeURIComponent).join("/");
  try {
    Object.assign(m, await api("GET", `/api/models/${path}`));
  } catch (e) {  // the views of the model before are not this one's: hidden (app.css)
    S.ran = null; document.body.dataset.stale = "1";
    throw e;
  } finally {
    noteModel(m);  // not "(loading…)" after a model that fails to load
  }
}

function noteModel(m) {
  if (model() !== m) return;
  $("#model-note").textContent = `${m.kind}${m.task ? " / " + m.task : ""}` +
    (m.loaded ? "" : " (loads on first use)");
}

function setMode(mode, rerun = true) {
  S.mode = mode;
  if (mode === "compare") dropJob();
  for (const b of document.querySelectorAll("#modes button"))
    b.classList.toggle("on", b.dataset.mode === mode);
  $("#explore").hidden = mode !== "explore";
  $("#compare").hidden = mode !== "compare";
  $("#compare-input").hidden = mode !== "compare";
  $("#methods").hidden = mode === "compare";
  if (mode === "compare" && !$("#text-b").value) $("#text-b").value = $("#text").value;
  if (rerun) action(mode === "compare" ? compare : run);
}

function chars() {
  const n = [...$("#text").value].length, max = S.limits.max_chars;  // code points, as the server
  $("#chars").textContent = max ? `${n} / ${max} chars` : `${n} chars`;
}

function fillModels(list, def) {
  const a = $("#model"), b = $("#model-b");
  for (const m of list) {
    S.models.set(m.name, m);
    a.add(new Option(`${m.name} (${m.task || m.kind})`, m.name));
    if (m.input === "text") b.add(new Option(`${m.name} (${m.task || m.kind})`, m.name));
  }
  a.value = def; b.value = def;
}

function wire() {
  const enter = e => {  // (not the Enter that commits an input method's composition)
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing && e.keyCode !== 229) {
      e.preventDefault(); action(run);
    }
  };
  $("#text").addEventListener("keydown", enter);
  $("#text-b").addEventListener("keydown", enter);
  $("#text").addEventListener("input", chars);
  $("#run").addEventListener("click", () => action(run));
  $("#run-image").addEventListener("click", () => action(run));
  $("#model").addEventListener("change", onModel);
  $("#model-b").addEventListener("change", () => S.mode === "compare" && action(compare));
  $("#stack").addEventListener("change", () => {
    S.stack = $("#stack").value; S.layer = 0; S.head = 0;
    action(S.mode === "compare" ? compare : () => attend(true));
  });
  $("#layer").addEventListener("change",
    () => action(() => selectHead(+$("#layer").value, S.head)));
  $("#head").addEventListener("change",
    () => action(() => selectHead(S.layer, +$("#head").value)));
  // top k: the head again, and a shown explanation (its matrix keeps the top k) too; steps:
  // integrated gradients again when shown (both used to wait for Run, the view unchanged)
  $("#topk").addEventListener("change", () => S.ran && action(S.mode === "compare" ? compare
    : async () => { await attend(false); if (explained()) await explain(); }));
  $("#steps").addEventListener("change",
    () => explained() && S.method === "integrated" && action(explain));
  const pickThumb = e => {
    const c = e.target.closest("canvas");
    if (c && (e.type === "click" || e.key === "Enter" || e.key === " ")) {
      e.preventDefault();
      action(() => selectHead(+c.dataset.layer, +c.dataset.head));
    }
  };
  $("#thumbs").addEventListener("click", pickThumb);
  $("#thumbs").addEventListener("keydown", pickThumb);
  $("#divergence").addEventListener("click", e => {
    const td = e.target.closest("td");
    if (td) action(() => selectHead(+td.dataset.layer, +td.dataset.head));
  });
  for (const r of document.querySelectorAll("input[name=method]"))
    r.addEventListener("change", () => r.checked && chooseMethod(r.value));
  $("#cancel").addEventListener("click", () => S.job && cancelJob(S.job));
  for (const b of document.querySelectorAll("#modes button"))
    b.addEventListener("click", () => !b.disabled && setMode(b.dataset.mode));
  wireDrawing();
}

async function init() {
  VIEW.head = new HeadView($("#headview"));
  VIEW.a = new HeadView($("#cmp-a"), linkHover("b"));
  VIEW.b = new HeadView($("#cmp-b"), linkHover("a"));
  VIEW.alignment = new MatrixView($("#alignment"));
  VIEW.explain = new MatrixView($("#explain-matrix"));
  VIEW.diff = new MatrixView($("#diff"));
  wire();
  await action(async () => {
    const [limits, models] = await Promise.all(
      [api("GET", "/api/limits"), api("GET", "/api/models")]);
    S.limits = limits;
    for (const [id, cap] of [["#topk", limits.max_top_k], ["#steps", limits.max_steps]]) {
      $(id).max = cap;  // the value too: a server with max_top_k=8 refused the page's 16
      $(id).value = Math.min(numberIn($(id)), cap);
    }
    fillModels(models.models, models.default);
  });
  if (S.models.size) onModel();
}

init();
