// Tokens and heatmap cells that take keyboard focus as they take the mouse: shared by the
// report (inlined into report.html) and the explorer (served as /static/keys.js).
// Each row is one Tab stop (a roving tabindex); the arrow keys along a row move in it,
// the arrow keys across it go to the same place in the next row, Home and End to its ends.
// A token that takes focus calls onFocus(row, index), which shows what hovering it shows;
// focus leaving every row calls onLeave(). For screen readers each row is a listbox named
// by its label and each token an option described by the readout element.
"use strict";

// rows: per row, its token elements (children of one container each); opts: {vertical,
// labels (one per row), readout (an element with an id), onFocus(row, i), onLeave()}.
function keyTokens(rows, opts) {
  const along = opts.vertical ? ["ArrowUp", "ArrowDown"] : ["ArrowLeft", "ArrowRight"];
  const across = opts.vertical ? ["ArrowLeft", "ArrowRight"] : ["ArrowUp", "ArrowDown"];
  const all = new Set(rows.flat()), current = rows.map(() => 0);
  const pick = (r, i) => {
    const old = rows[r][current[r]];
    old.tabIndex = -1; old.setAttribute("aria-selected", "false");
    rows[r][i].tabIndex = 0; rows[r][i].setAttribute("aria-selected", "true");
    current[r] = i;
  };
  const move = (e, r, i) => {
    if (e.altKey || e.ctrlKey || e.metaKey) return;  // Alt+Left is the browser's Back
    let to = r, at = i;
    if (e.key === along[0] || e.key === along[1]) at += e.key === along[0] ? -1 : 1;
    else if (e.key === across[0] || e.key === across[1]) to += e.key === across[0] ? -1 : 1;
    else if (e.key === "Home" || e.key === "End") at = e.key === "Home" ? 0 : Infinity;
    else return;
    e.preventDefault();  // the arrows move between tokens, not the page
    if (to < 0 || to >= rows.length || !rows[to].length) return;
    rows[to][Math.max(0, Math.min(rows[to].length - 1, at))].focus();
  };
  rows.forEach((row, r) => {
    if (!row.length) return;
    const box = row[0].parentElement;
    box.setAttribute("role", "listbox");
    box.setAttribute("aria-label", opts.labels[r]);
    box.setAttribute("aria-orientation", opts.vertical ? "vertical" : "horizontal");
    row.forEach((t, i) => {
      t.setAttribute("role", "option");
      t.setAttribute("aria-selected", String(i === 0));
      t.setAttribute("aria-describedby", opts.readout.id);
      t.tabIndex = i === 0 ? 0 : -1;
      t.addEventListener("focus", () => { pick(r, i); opts.onFocus(r, i); });
      t.addEventListener("blur", e => { if (!all.has(e.relatedTarget)) opts.onLeave(); });
      t.addEventListener("keydown", e => move(e, r, i));
    });
  });
}

// A heatmap drawn on one element (a canvas) whose cells take keyboard focus: the element is
// one Tab stop, the arrow keys move the focused cell, Home and End to the ends of its row.
// opts: {label, readout (an element with an id), onMove(di, dj) (a step; +-Infinity for
// Home/End), onFocus(), onLeave()}; the caller keeps the cell and shows the hover's readout.
function keyCells(el, opts) {
  const steps = {ArrowUp: [-1, 0], ArrowDown: [1, 0], ArrowLeft: [0, -1], ArrowRight: [0, 1],
    Home: [0, -Infinity], End: [0, Infinity]};
  el.tabIndex = 0;
  el.setAttribute("role", "application");
  el.setAttribute("aria-roledescription", "heatmap");
  el.setAttribute("aria-label", opts.label);
  el.setAttribute("aria-describedby", opts.readout.id);
  opts.readout.setAttribute("aria-live", "polite");
  el.addEventListener("focus", () => opts.onFocus());
  el.addEventListener("blur", () => opts.onLeave());
  el.addEventListener("keydown", e => {
    if (!(e.key in steps) || e.altKey || e.ctrlKey || e.metaKey) return;  // as keyTokens
    e.preventDefault();  // the arrows move between cells, not the page
    opts.onMove(...steps[e.key]);
  });
}
