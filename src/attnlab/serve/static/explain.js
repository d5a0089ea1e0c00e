// attnlab serve: the explanations as jobs (app.js holds the state and the rest): start
// one, poll it, draw its result; cancel the one the page no longer wants.
"use strict";

async function explain() {
  dropJob();
  const m = S.method, want = S.want;
  $("#explain-title").textContent = METHODS[m];
  const body = { model: S.ran.model, text: S.ran.text, method: m, top_k: topK() };
  if (m === "integrated") body.steps = numberIn($("#steps"));  // the others have none
  jobShow({ state: "queued", progress: 0, message: "", seconds: 0 });
  let start;
  try {
    start = await api("POST", "/api/explain", body);
  } catch (e) {  // refused (a limit, too many jobs): the error line says why
    if (S.want !== want) return;  // unless the page stopped wanting it meanwhile
    jobShow({ state: "error", progress: 0, message: "", seconds: 0 });
    throw e;
  }
  const id = start.job;
  if (S.want !== want) return void cancelJob(id);  // dropped while it was being started
  S.job = id;
  if (start.tokens) flowLimit(start.tokens);  // known now, even if the job is cancelled
  for (;;) {
    await sleep(200);
    if (S.job !== id) return;
    let j;
    try { j = await api("GET", `/api/jobs/${encodeURIComponent(id)}`); } catch (e) {
      if (S.job !== id) return;  // a poll of a dropped job: its failure is no one's
      throw e;
    }
    if (S.job !== id) return;
    jobShow(j);
    if (j.state === "done") drawExplain(j);
    if (j.state === "error") showError(`${METHODS[m]}: ${j.error}`);
    if (["done", "error", "cancelled"].includes(j.state)) break;
  }
  S.job = null;
}

// The page no longer wants its job (another method, raw attention, compare mode): its
// polling stops, a start in flight is cancelled once answered, and the server cancels it.
function dropJob() {
  const old = S.job;
  S.job = null; S.want++;
  if (old) cancelJob(old);
}

function jobShow(j) {
  $("#job").hidden = false;
  $("#progress").value = j.progress;
  $("#job-state").textContent = j.message ? `${j.state}: ${j.message}` : j.state;
  $("#job-seconds").textContent = `${secs(j.seconds)} s`;
  $("#cancel").disabled = !["queued", "running"].includes(j.state);
  document.body.dataset.job = j.state;
}

// DELETE the job; what it answers (or its error) is shown only for the page's own job.
async function cancelJob(id) {
  try {
    const j = await api("DELETE", `/api/jobs/${encodeURIComponent(id)}`);
    if (S.job !== id) return;
    $("#job-state").textContent = j.state;
    document.body.dataset.job = j.state;
  } catch (e) {
    if (S.job === id) showError(e.message);
  }
}

function drawExplain(j) {
  const r = j.result;
  drawSaliency($("#saliency"), r.tokens, r.saliency, $("#saliency-status"));
  $("#explain-matrix").hidden = !r.matrix;
  if (r.matrix) VIEW.explain.setTop(r.tokens, r.tokens, r.matrix.top, { what: r.method });
  const t = $("#timing-explain");
  t.textContent = `${r.method} ${secs(r.seconds)} s (job ${secs(j.seconds)} s)`;
  t.dataset.seconds = String(r.seconds);
}
