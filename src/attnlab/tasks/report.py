"""One self-contained HTML page per training run: scores, samples and inlined pictures."""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from attnlab._io import atomic_write_text, no_script_csp, png_data_uri

__all__ = ["Section", "write_html"]


@dataclass(frozen=True)
class Section:
    """One heading with a line of text (or, ``preformatted``, lines kept as they are: a
    Markdown table) and optional PNG pictures (inlined as base64)."""

    heading: str
    text: str = ""
    pictures: Sequence[Path] = ()
    preformatted: bool = False


def write_html(
    path: str | Path, title: str, scores: dict[str, float], sections: Sequence[Section]
) -> Path:
    """Write ``path``: a page that needs no network (every picture is inside it) and runs
    no script (its Content-Security-Policy allows none).

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> p = write_html(f"{d}/r.html", "Run", {"exact": 99.5}, [Section("a <b>", "ok")])
        >>> "a &lt;b&gt;" in p.read_text() and "exact 99.5" in p.read_text()
        True
    """
    head = f"<!doctype html><meta charset='utf-8'>{no_script_csp(images=True)}"
    parts = [f"{head}<title>{html.escape(title)}</title>"]
    parts.append("<style>body{font-family:sans-serif;max-width:60em;margin:auto}</style>")
    parts.append(f"<h1>{html.escape(title)}</h1><p>Scores: ")
    parts.append(html.escape(", ".join(f"{k} {v}" for k, v in scores.items())) + "</p>")
    for sec in sections:
        tag = "pre" if sec.preformatted else "p"
        parts.append(f"<h3>{html.escape(sec.heading)}</h3><{tag}>{html.escape(sec.text)}</{tag}>")
        for pic in sec.pictures:
            alt = html.escape(Path(pic).stem.replace("_", " "))
            parts.append(f"<img alt='{alt}' src='{png_data_uri(pic)}'>")
    text = "\n".join(parts)
    return atomic_write_text(path, text)
