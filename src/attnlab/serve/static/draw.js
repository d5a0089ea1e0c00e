// attnlab serve: the small drawing canvas for image models (a digit for vision, a scene of
// shapes for captioning) and picture uploads, both sent as the canvas's PNG.
"use strict";

function drawCanvas() {
  const c = document.getElementById("draw");
  return [c, c.getContext("2d")];
}

function clearDrawing() {
  const [c, g] = drawCanvas();
  g.fillStyle = "#000";
  g.fillRect(0, 0, c.width, c.height);
}

// A shape of the captioning scenes, centred at (x, y).
function stamp(g, shape, x, y, r, colour) {
  g.fillStyle = colour;
  g.beginPath();
  if (shape === "circle") g.arc(x, y, r, 0, 2 * Math.PI);
  else if (shape === "square") g.rect(x - r, y - r, 2 * r, 2 * r);
  else { g.moveTo(x, y - r); g.lineTo(x + r, y + r); g.lineTo(x - r, y + r); g.closePath(); }
  g.fill();
}

// Something to run at once when an image model is picked.
function sampleDrawing(task) {
  const [c, g] = drawCanvas();
  clearDrawing();
  if (task === "captioning") {
    stamp(g, "circle", c.width * 0.27, c.height / 2, c.width * 0.17, "#e62828");
    stamp(g, "square", c.width * 0.73, c.height / 2, c.width * 0.15, "#3c64ff");
    return;
  }
  g.strokeStyle = "#fff"; g.lineWidth = c.width / 9; g.lineCap = "round"; g.lineJoin = "round";
  g.beginPath();  // a 7
  g.moveTo(c.width * 0.25, c.height * 0.2); g.lineTo(c.width * 0.75, c.height * 0.2);
  g.lineTo(c.width * 0.4, c.height * 0.85);
  g.stroke();
}

function wireDrawing() {
  const [c, g] = drawCanvas();
  let last = null;
  const at = e => {
    const r = c.getBoundingClientRect();
    return [(e.clientX - r.left) * c.width / r.width, (e.clientY - r.top) * c.height / r.height];
  };
  const pen = () => [document.getElementById("pen-shape").value,
    document.getElementById("pen-colour").value];
  c.addEventListener("pointerdown", e => {
    const [shape, colour] = pen(), p = at(e);
    if (shape !== "pen") { stamp(g, shape, p[0], p[1], c.width * 0.15, colour); return; }
    c.setPointerCapture(e.pointerId);
    last = p;
    g.fillStyle = colour;
    g.beginPath(); g.arc(p[0], p[1], c.width / 18, 0, 2 * Math.PI); g.fill();
  });
  c.addEventListener("pointermove", e => {
    if (!last) return;
    const p = at(e);
    g.strokeStyle = pen()[1]; g.lineWidth = c.width / 9; g.lineCap = "round";
    g.beginPath(); g.moveTo(last[0], last[1]); g.lineTo(p[0], p[1]); g.stroke();
    last = p;
  });
  const end = () => { last = null; };
  c.addEventListener("pointerup", end);
  c.addEventListener("pointercancel", end);
  document.getElementById("clear").addEventListener("click", clearDrawing);
  document.getElementById("upload").addEventListener("change", e => {
    const file = e.target.files[0];
    if (file) upload(file, c, g);
  });
  clearDrawing();
}

// The uploaded picture, fitted into the canvas on black (what the models were trained on).
function upload(file, c, g) {
  const url = URL.createObjectURL(file), img = new Image();
  img.onload = () => {
    clearDrawing();
    const s = Math.min(c.width / img.width, c.height / img.height);
    const w = img.width * s, h = img.height * s;
    g.drawImage(img, (c.width - w) / 2, (c.height - h) / 2, w, h);
    URL.revokeObjectURL(url);
  };
  img.onerror = () => { showError(`upload: ${file.name} is not an image the browser can read`); };
  img.src = url;
}
