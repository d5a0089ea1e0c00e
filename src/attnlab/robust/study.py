"""What the robustness studies share: training one row from scratch, the table, the report.

A study is a list of rows; each row trains its model from scratch with the same seed and
settings (only the plug-ins differ), then is measured on held-out data. The table is a
JSON list of rows and a Markdown table; the report is a self-contained HTML page
(:func:`attnlab.tasks.report.write_html`, pictures inlined), all written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attnlab._cpu import cpu_info
from attnlab._io import atomic_write_text
from attnlab.train import Plugin, Task, TrainConfig, Trainer

__all__ = ["Row", "bar_chart", "check_methods", "markdown_table", "train_row", "write_outputs"]


@dataclass
class Row:
    """One trained variant: its name, its measurements and its training time."""

    method: str
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def line(self) -> str:
        """One line for the terminal.

        Example:
            >>> Row("plain", {"clean": 97.5, "pgd@0.1": 5.6}, 129.0).line()
            'plain: clean 97.5, pgd@0.1 5.6 (trained in 129 s)'
        """
        cells = ", ".join(f"{k} {_cell(v)}" for k, v in self.metrics.items())
        return f"{self.method}: {cells} (trained in {self.seconds:.0f} s)"


def check_methods(name: str, methods: object, known: Sequence[str]) -> tuple[str, ...]:
    """``methods`` as a tuple of distinct names from ``known``, or a TypeError/ValueError
    naming ``name``: a study checks every row before the first one trains for minutes.

    Example:
        >>> check_methods("methods", ["plain", "fgm"], ("plain", "fgm", "pgd"))
        ('plain', 'fgm')
    """
    if isinstance(methods, str) or not isinstance(methods, Sequence):
        raise TypeError(
            f"{name} must be a sequence of names from {tuple(known)}, got {methods!r} "
            f"({type(methods).__name__})"
        )
    if not methods:
        raise ValueError(f"{name} must name at least one of {tuple(known)}, got none")
    for m in methods:
        if m not in known:
            raise ValueError(f"{name} must hold names from {tuple(known)}, got {m!r}")
    if len(set(methods)) < len(methods):
        raise ValueError(f"{name} must name each row once, got {list(methods)}")
    return tuple(methods)


def train_row(
    task: Task, cfg: TrainConfig, plugins: Sequence[Plugin] = ()
) -> tuple[nn.Module, float]:
    """Train ``task``'s model from scratch under ``cfg`` with ``plugins``; the model (in
    eval mode) and the seconds it took. On a terminal each row shows a progress bar (a
    study's rows showed nothing for minutes)."""
    t0 = time.perf_counter()
    if not cfg.progress and sys.stdout.isatty():
        cfg = dataclasses.replace(cfg, progress=True)
    trainer = Trainer(task, cfg, plugins=plugins)
    trainer.fit()
    return trainer.model.eval(), time.perf_counter() - t0


def markdown_table(rows: Sequence[Row], columns: Sequence[str]) -> str:
    """A Markdown table: one line per row, ``columns`` from its metrics (then seconds).

    Example:
        >>> print(markdown_table([Row("plain", {"clean": 97.5}, 12.0)], ["clean"]))
        | method | clean | train s |
        |---|---|---|
        | plain | 97.5 | 12 |
    """
    head = "| method | " + " | ".join(columns) + " | train s |"
    lines = [head, "|" + "---|" * (len(columns) + 2)]
    for r in rows:
        cells = [_cell(r.metrics.get(c)) for c in columns]
        lines.append(f"| {r.method} | " + " | ".join(cells) + f" | {r.seconds:.0f} |")
    return "\n".join(lines)


def _cell(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}" if abs(v) < 1 else f"{v:.1f}"


def bar_chart(rows: Sequence[Row], columns: Sequence[str], path: Path, title: str) -> Path:
    """Grouped bars: one group per column, one bar per row (method), value labels on top."""
    from attnlab.interpret.plot import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(columns), 3.2))
    width = 0.8 / max(1, len(rows))
    for i, r in enumerate(rows):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(columns))]
        vals = [r.metrics.get(c, 0.0) for c in columns]
        bars = ax.bar(xs, vals, width, label=r.method)
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
    ax.set_xticks(range(len(columns)), list(columns), fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return save_figure(fig, path, dpi=100)


def write_outputs(
    folder: Path,
    title: str,
    rows: Sequence[Row],
    columns: Sequence[str],
    notes: Sequence[str],
    pictures: Sequence[Path] = (),
    settings: dict[str, Any] | None = None,
) -> Path:
    """``table.json``, ``table.md``, ``table.png`` (the table as bars) and a self-contained
    ``report.html`` in ``folder``, each written atomically."""
    from attnlab.tasks.report import Section, write_html

    folder.mkdir(parents=True, exist_ok=True)
    info = cpu_info()
    cpu = {"cpu_capability": info.capability, "cpu": info.cpu_name, "torch": torch.__version__}
    meta = {**cpu, **(settings or {})}
    data = {"title": title, "settings": meta, "rows": [r.__dict__ for r in rows]}
    atomic_write_text(folder / "table.json", json.dumps(data, indent=1) + "\n")
    table = markdown_table(rows, columns)
    atomic_write_text(folder / "table.md", f"# {title}\n\n{table}\n\n" + "\n".join(notes) + "\n")
    sections = [Section("Table", table, preformatted=True)]  # it was escaped: "<pre>" shown
    sections.append(Section("What the numbers mean", " ".join(notes)))
    chart = bar_chart(rows, columns, folder / "table.png", title)
    sections.append(Section("Pictures", "", [chart, *pictures]))
    settings_line = {k: float(v) for k, v in meta.items() if isinstance(v, int | float)}
    return write_html(folder / "report.html", title, settings_line, sections)
