// attnlab serve: the page's compare mode (app.js holds the state and the rest): two inputs
// side by side, their position-by-position difference and the per-head divergence table.
"use strict";

async function compare() {
  const a = { model: $("#model").value, text: $("#text").value };
  const b = { model: $("#model-b").value, text: $("#text-b").value };
  const seq = ++S.seq, pair = `${a.model}\n${b.model}`;  // other models: other layers, heads
  if (S.pair && S.pair !== pair) { S.stack = null; S.layer = 0; S.head = 0; }
  S.pair = pair;
  const r = await api("POST", "/api/compare",
    { a, b, stack: S.stack, layer: S.layer, head: S.head, top_k: topK() });
  if (seq !== S.seq) return;
  S.cmp = r;
  const sa = stackOf(r.a), sb = stackOf(r.b), where = `layer ${S.layer}, head ${S.head}`;
  fillStacks(r.a.stacks, r.a.stack);
  fillHeads(Math.min(sa.layers, sb.layers), Math.min(sa.heads, sb.heads));
  VIEW.a.set(sa.queries, sa.keys, r.a.head, where);
  VIEW.b.set(sb.queries, sb.keys, r.b.head, where);
  const title = (side, x) => `${side}: ${x.model}` +
    (x.output !== null ? ` \u2192 ${x.output}` : "");
  $("#cmp-a-title").textContent = title("A", r.a);
  $("#cmp-b-title").textContent = title("B", r.b);
  $("#timing-compare").textContent = `compare ${secs(r.seconds)} s`;
  $("#timing-compare").dataset.seconds = String(r.seconds);
  drawDiff(r, sa, sb);
  document.body.dataset.ready = "1"; document.body.dataset.stale = "0";
}

function drawDiff(r, sa, sb) {
  $("#diff").hidden = !r.diff;
  $("#diff-note").textContent = r.same_tokens ? "" : r.diff
    ? "position by position: A and B have as many tokens, but not the same ones"
    : `A has ${sa.queries.length} tokens and B ${sb.queries.length}, not the same ones: ` +
      "no position-by-position difference";
  if (r.diff) VIEW.diff.setTop(sa.queries, sa.keys, r.diff.top, { diverging: true, what: "A - B" });
  const t = $("#divergence");
  t.textContent = "";
  $("#divergence-title").hidden = !r.divergence;
  if (!r.divergence) return;
  const top = Math.max(1e-12, ...r.divergence.flat());
  const head = t.insertRow();
  head.appendChild(el("th"));
  r.divergence[0].forEach((_, h) => head.appendChild(el("th", null, `h${h}`)));
  r.divergence.forEach((row, l) => {
    const tr = t.insertRow();
    tr.appendChild(el("th", null, `L${l}`));
    row.forEach((v, h) => {
      const td = tr.insertCell();
      td.textContent = v.toFixed(3);
      td.dataset.layer = l; td.dataset.head = h; td.dataset.value = String(v);
      td.style.background = rgba(RED, 0.85 * v / top);
      td.classList.toggle("sel", l === S.layer && h === S.head);
    });
  });
}

// Hovering a token on one side shows the same position on the other when the shapes match.
function linkHover(to) {
  return (i, j) => {
    if (S.cmp && (S.cmp.same_shape || S.cmp.same_tokens)) VIEW[to].hover(i, j, false);
  };
}
