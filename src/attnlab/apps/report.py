"""Self-contained HTML pages for answers and summaries (no scripts, no external files;
the pages' Content-Security-Policy lets neither be added).

Each answer shows the sentence in its paragraph's context, the ranking signals, and the
question and passage words shaded by their integrated-gradients relevance, with the
strongest word pairs listed; a summary shows every sentence shaded by its salience, the
chosen ones marked.

Example:
    >>> import tempfile
    >>> from attnlab.apps.summarize import Summary
    >>> p = summary_html(Summary(["A b.", "C d."], [0.6, 0.4], [0]), tempfile.mkdtemp() + "/s.html")
    >>> "<mark" in p.read_text()
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from pathlib import Path

from attnlab._io import atomic_write_text, decode_text, no_script_csp
from attnlab.apps.ask import Answer
from attnlab.apps.summarize import Summary

__all__ = ["answers_html", "summary_html"]

# no pictures: the policy allows the page's styles and nothing else (no script runs)
_HEAD = f"<!doctype html><meta charset=utf-8>{no_script_csp(images=False)}"
_STYLE = (
    "body{font:15px/1.5 system-ui,sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
    ".a{border:1px solid #ccc;border-radius:6px;padding:.5em 1em;margin:1em 0}"
    ".ctx{color:#666}.hit{color:#000;font-weight:600}small{color:#555}"
    "span.w{padding:0 2px;border-radius:3px;unicode-bidi:isolate}mark{background:#fde68a}"
)


def _shade(tokens: Sequence[str], values: Sequence[float]) -> str:
    """Words as spans whose background is green for positive, red for negative values."""
    top = max((abs(v) for v in values), default=0.0) or 1.0
    out = []
    for t, v in zip(tokens, values, strict=True):
        if t in ("[CLS]", "[SEP]"):
            continue
        a = min(abs(v) / top, 1.0) * 0.6
        rgb = "22,163,74" if v >= 0 else "220,38,38"
        out.append(
            f'<span class="w" style="background:rgba({rgb},{a:.2f})" '
            f'title="{v:+.4f}">{escape(t)}</span>'
        )
    return " ".join(out)


def _answer(rank: int, a: Answer) -> str:
    ctx = " ".join(
        f'<span class="hit">{escape(t)}</span>' if t == a.sentence.text else escape(t)
        for t in a.context
    )
    sig = ", ".join(f"{k} {v:.3f}" for k, v in a.signals.items())
    where = escape(f"{a.sentence.doc} / {a.sentence.section}".rstrip(" /"))
    html = f'<div class="a"><p><b>{rank}.</b> <small>{where}</small></p>'
    html += f'<p class="ctx">{ctx}</p><p><small>score {a.score:.3f}: {sig}</small></p>'
    m = a.matches
    if m is not None:
        pairs = "; ".join(
            f"{escape(q)} &harr; {escape(p)} ({v:+.4f})" for q, p, v in m.top_pairs(6)
        )
        q_ig, p_ig = _shade(m.question, m.question_ig), _shade(m.passage, m.passage_ig)
        html += f"<p><small>question (integrated gradients):</small> {q_ig}</p>"
        html += f"<p><small>passage:</small> {p_ig}</p>"
        html += f"<p><small>matched word pairs (share of the cosine {m.cosine:.3f}):</small> "
        html += f"{pairs}</p>"
    return html + "</div>"


def answers_html(question: str, answers: Sequence[Answer], out: str | Path) -> Path:
    """Write the answers to ``question`` as one HTML page at ``out`` (atomic)."""
    body = "".join(_answer(i + 1, a) for i, a in enumerate(answers))
    page = (
        f"{_HEAD}<title>attnlab ask</title><style>{_STYLE}</style><h1>{escape(question)}</h1>{body}"
    )
    return _write(out, page)


def summary_html(summary: Summary, out: str | Path, title: str = "attnlab summarize") -> Path:
    """Write every sentence shaded by its salience, the chosen ones marked (atomic)."""
    top = max(summary.salience, default=1.0) or 1.0
    parts = []
    for i, (s, v) in enumerate(zip(summary.sentences, summary.salience, strict=True)):
        a = 0.6 * v / top
        text = f"<mark>{escape(s)}</mark>" if i in summary.chosen else escape(s)
        parts.append(
            f'<span class="w" style="background:rgba(22,163,74,{a:.2f})" '
            f'title="salience {v:.4f}">{text}</span>'
        )
    page = (
        f"{_HEAD}<title>{escape(title)}</title><style>{_STYLE}</style>"
        f"<h1>{escape(title)}</h1><p>{' '.join(parts)}</p>"
    )
    return _write(out, page)


def _write(out: str | Path, page: str) -> Path:
    """Write ``page`` atomically, a name from a file name that is not UTF-8 (lone
    surrogates, which UTF-8 cannot write) shown with U+FFFD."""
    return atomic_write_text(out, decode_text(page)[0])
