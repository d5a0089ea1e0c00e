"""One self-contained HTML file to explore a model's attention in any browser, offline.

The page holds everything inline (no CDN, no network): a layer x head grid of thumbnails,
a line view where hovering a token (or reaching it with Tab and the arrow keys) draws its
attention to the other tokens, token saliency rows (rollout, gradient relevance,
integrated gradients...), and PNG pictures.

Each query row keeps its ``top_k`` strongest keys per head (weights quantized to 1/255),
so a 512-token, 6-layer, 12-head model stays around a megabyte and draws at once.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from numbers import Real
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from attnlab._io import atomic_write_text, decode_text, png_data_uri
from attnlab._scalars import plain
from attnlab.interpret.plot import check_png_path, check_tokens

__all__ = ["KEYS_JS", "report"]

# the tokens' keyboard focus, inlined here and served by the explorer as /static/keys.js
KEYS_JS = Path(__file__).with_name("keys.js")

_MAX_TOKENS = 65535  # key indices are stored as uint16


def _per_layer(attentions: Sequence[Tensor]) -> list[Tensor]:
    """Validate per-layer ``(H, n, n)`` (or ``(1, H, n, n)``) weights of one example."""
    if not isinstance(attentions, Sequence) or not attentions:
        raise ValueError("attentions must be a non-empty list of per-layer (H, n, n) tensors")
    out: list[Tensor] = []
    for i, a in enumerate(attentions):
        if not isinstance(a, Tensor):
            raise TypeError(f"attentions[{i}] must be a Tensor, got {type(a).__name__}")
        a = a[0] if a.dim() == 4 and a.shape[0] == 1 else a
        # (0 tokens wrote a page that threw on load: createImageData(0, 0))
        square = a.dim() == 3 and a.shape[-1] == a.shape[-2] and min(a.shape[0], a.shape[-1]) > 0
        if not square or (out and a.shape != out[0].shape):
            raise ValueError(
                f"attentions[{i}] has shape {tuple(a.shape)}; expected (H, n, n) self-attention "
                "of one example (H >= 1 heads, n >= 1 tokens), the same for every layer"
            )
        if not a.is_floating_point():  # (ints, bools and complex were drawn as weights)
            raise TypeError(f"attentions[{i}] must hold floating weights, got {a.dtype}")
        if not bool(torch.isfinite(a).all()):  # (NaN weights drew as blanks, said nothing)
            raise ValueError(f"attentions[{i}] holds NaN or infinite weights")
        if a.numel() and not (bool(a.min() >= 0) and bool(a.max() <= 1 + 1e-3)):
            raise ValueError(  # (drawn clamped to [0, 1]: 5.0 showed as 1.00)
                f"attentions[{i}] holds weights in [{float(a.min()):.4g}, {float(a.max()):.4g}]"
                ", expected attention weights in [0, 1]"
            )
        out.append(a.detach().float().cpu())
    return out


def _top_keys(layers: list[Tensor], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per layer, head (plus the head mean as a last head) and query: the ``k`` strongest
    keys ``(L, H + 1, n, k)`` as uint16 indices and uint8 weights (x 255)."""
    stacked = torch.stack([torch.cat([a, a.mean(0, keepdim=True)]) for a in layers])
    vals, idx = stacked.topk(k, dim=-1)  # (L, H + 1, n, k)
    q = (vals.clamp(0, 1) * 255).round().to(torch.uint8)
    return idx.to(torch.int32).numpy().astype("<u2"), q.numpy()


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode()


def report(
    path: str | os.PathLike[str],
    tokens: Sequence[str],
    attentions: Sequence[Tensor],
    *,
    title: str = "attnlab attention report",
    text: str = "",
    note: str = "",
    saliency: Mapping[str, Sequence[float] | Tensor] | None = None,
    pictures: Sequence[str | Path] = (),
    top_k: int = 8,
) -> Path:
    """Write the interactive attention page for one example.

    Args:
        path: the ``.html`` file to write (atomically); a str or path-like, not a folder,
            checked before any work.
        tokens: the ``n`` token strings.
        attentions: per-layer ``(H, n, n)`` weights (queries as rows), in layer order.
        title, text: the heading and a line under it (e.g. the input text), shown
            isolated from what follows it: a right-to-left override in it reversed the rest
            of the line.
        note: words after ``text`` on its line (e.g. what was explained).
        saliency: method name -> ``n`` scores per token (e.g. ``{"rollout": r[0]}``).
        pictures: PNG files to inline at the end.
        top_k: keys kept per query and head.

    Returns:
        The path written.

    Example:
        >>> import tempfile, torch
        >>> attns = [torch.rand(2, 3, 3).softmax(-1) for _ in range(2)]
        >>> p = report(tempfile.mkdtemp() + "/r.html", ["a", "b", "c"], attns, top_k=2)
        >>> page = p.read_text()
        >>> "<script src" in page, "attnlab attention report" in page
        (False, True)
    """
    out = check_png_path(path, "an HTML")  # (None or a folder failed at the write, after the work)
    _check_texts(tokens, title, text, note)
    layers = _per_layer(attentions)
    n = layers[0].shape[-1]
    if n > _MAX_TOKENS:  # (it said "tokens has 70000 entries but the weights are 70000 x ...")
        raise ValueError(
            f"attentions are {n} x {n}: a report shows at most {_MAX_TOKENS} tokens (its key "
            "indices are stored as uint16); cut the text"
        )
    if len(tokens) != n:
        raise ValueError(f"tokens has {len(tokens)} entries but the weights are {n} x {n}")
    k = plain(top_k)  # (np.int64 was refused)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    idx, val = _top_keys(layers, min(k, n))
    if saliency is not None and not isinstance(saliency, Mapping):
        raise TypeError(f"saliency must be a dict of name -> scores, got {type(saliency).__name__}")
    sal = {_name(name): _scores(name, s, n) for name, s in (saliency or {}).items()}
    data = {
        "tokens": list(tokens),
        "layers": len(layers),
        "heads": layers[0].shape[0],
        "k": idx.shape[-1],
        "idx": _b64(idx),
        "val": _b64(val),
        "saliency": sal,
    }
    page = _page(title, (text, note), data, _pictures(pictures))
    # a text or picture name from bytes that were not UTF-8 (lone surrogates, which UTF-8
    # cannot write: the page was lost after all the work) shown with U+FFFD
    return atomic_write_text(out, decode_text(page)[0])


def _check_texts(tokens: object, title: object, text: object, note: object) -> None:
    """``tokens`` a list of str, ``title``, ``text`` and ``note`` str (None's ``.replace``
    failed)."""
    check_tokens("tokens", tokens)  # (None: "no len()")
    assert isinstance(tokens, Sequence)
    bad = next((i for i, t in enumerate(tokens) if not isinstance(t, str)), None)
    if bad is not None:
        raise TypeError(f"tokens[{bad}] must be a str, got {type(tokens[bad]).__name__}")
    for name, value in (("title", title), ("text", text), ("note", note)):
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a str, got {type(value).__name__}")


def _name(name: object) -> str:
    if not isinstance(name, str):
        raise TypeError(f"saliency's names must be str, got {type(name).__name__} {name!r}")
    return name


def _pictures(pictures: object) -> list[tuple[Path, bytes]]:
    """``pictures`` as paths of PNG files, each checked (a str was read letter by letter),
    with their bytes, each file opened and read once (its header was read for the check,
    then the whole file again for the page); one that is not a PNG is read no further."""
    if isinstance(pictures, (str, bytes)) or not isinstance(pictures, Sequence):
        raise TypeError(f"pictures must be a list of PNG paths, got {type(pictures).__name__}")
    out = []
    for i, p in enumerate(pictures):
        if not isinstance(p, (str, Path)):
            raise TypeError(f"pictures[{i}] must be a path, got {type(p).__name__}")
        try:
            with open(p, "rb") as f:
                head = f.read(8)
                data = head + f.read() if head == b"\x89PNG\r\n\x1a\n" else b""
        except OSError as e:
            raise ValueError(f"pictures[{i}] cannot be read: {p} ({e.strerror})") from None
        if not data:
            raise ValueError(f"pictures[{i}] is not a PNG file: {p}")
        out.append((Path(p), data))
    return out


def _scores(name: str, scores: Sequence[float] | Tensor, n: int) -> list[float]:
    got = type(scores).__name__
    if isinstance(scores, (Tensor, np.ndarray)):
        if len(scores.shape) != 1:
            raise ValueError(
                f"saliency[{name!r}] has shape {tuple(scores.shape)}, expected ({n},): one "
                "score per token"
            )
        numbers, got = _real_dtype(scores), f"{got} of {scores.dtype}"
    else:
        numbers = (
            isinstance(scores, Sequence)
            and not isinstance(scores, str)
            and all(isinstance(v, Real) and not isinstance(v, (bool, np.bool_)) for v in scores)
        )
    if not numbers:
        raise TypeError(
            f"saliency[{name!r}] must be {n} numbers (a list, or a 1-D tensor or array), got {got}"
        )
    vals = [float(v) for v in scores]
    if len(vals) != n:
        raise ValueError(f"saliency[{name!r}] has {len(vals)} scores, expected one per token ({n})")
    bad = next((i for i, v in enumerate(vals) if not math.isfinite(v)), None)
    if bad is not None:  # JSON has no NaN or infinity: the page could not read its data
        raise ValueError(
            f"saliency[{name!r}] has {vals[bad]} at token {bad}, expected finite scores"
        )
    return [float(f"{v:.6g}") for v in vals]  # six digits: round(v, 6) zeroed 3.2e-7


def _real_dtype(scores: Tensor | np.ndarray) -> bool:
    """Whether a tensor or array holds real numbers: not bools (drawn as 0 and 1, where a
    list of bools was refused), not complex, not objects or strings."""
    if isinstance(scores, Tensor):
        return scores.dtype != torch.bool and not scores.is_complex()
    return scores.dtype.kind in "iuf"


def _page(
    title: str, line: tuple[str, str], data: dict[str, object], pictures: list[tuple[Path, bytes]]
) -> str:
    # every "<" escaped: "</script>", and "<!--" before "<script" (which would make the
    # HTML parser skip the real end tag), cannot occur inside the script element
    blob = json.dumps(data, allow_nan=False).replace("<", "\\u003c")
    imgs = "<h2>Pictures</h2>" * bool(pictures) + "".join(
        f"<figure><img alt='{html.escape(p.stem)}' src='{png_data_uri(png)}'>"
        f"<figcaption>{html.escape(p.stem)}</figcaption></figure>"
        for p, png in pictures
    )
    template = (Path(__file__).parent / "report.html").read_text(encoding="utf-8")
    template = template.replace("%KEYS%", KEYS_JS.read_text(encoding="utf-8"))
    text, note = (html.escape(t) for t in line)  # each isolated: its bidi controls end with it
    fill = {"TITLE": html.escape(title), "PICTURES": imgs, "DATA": blob, "CSP": _csp(template)}
    fill["TEXT"] = f"<bdi>{text}</bdi>" + f"  <bdi>{note}</bdi>" * bool(note)
    return re.sub(r"%(CSP|TITLE|TEXT|PICTURES|DATA)%", lambda m: fill[m.group(1)], template)


def _csp(template: str) -> str:
    """A Content-Security-Policy meta that lets only the template's own scripts run (by
    their sha256, taken before any text is filled in), loads nothing from anywhere and
    images only from data URIs: escaping is the first guard, this the second."""
    bodies = re.findall(r"<script>(.*?)</script>", template, flags=re.S)
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(b.encode()).digest()).decode() + "'"
        for b in bodies
    )
    policy = f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src {hashes}"
    return f'<meta http-equiv="Content-Security-Policy" content="{policy}">'
