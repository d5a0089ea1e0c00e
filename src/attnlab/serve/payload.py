"""Request bodies of the explorer's API and the answers built from an inspection.

Request fields are strict: a string where an int belongs is a 422 naming the field, not
a silent conversion.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr, StringConstraints
from torch import Tensor

from attnlab.serve.limits import ApiError, check_range
from attnlab.serve.views import divergence, head_view, rounded, thumbs, top_rows
from attnlab.tasks.inspect import AttentionStack, Inspection

__all__ = ["AttendIn", "CompareIn", "ExplainIn", "Side", "attend", "compare", "one_line"]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


# a model's name; left out (not "", which silently ran the default model) for the default
ModelName = Annotated[str, StringConstraints(strict=True, min_length=1)]


class Side(_Body):
    """One input: a model (left out: the default) and a text or an image data URL."""

    model: ModelName | None = None
    text: StrictStr | None = None
    image: StrictStr | None = None


class View(_Body):
    stack: StrictStr | None = None
    layer: StrictInt = 0
    head: StrictInt = 0
    top_k: StrictInt = 16  # left out: 16 or max_top_k, the lower


class AttendIn(Side, View):
    """``POST /api/attend``."""

    thumbs: StrictBool = True


class CompareIn(View):
    """``POST /api/compare``: inputs ``a`` and ``b``, one view of both."""

    a: Side
    b: Side


class ExplainIn(_Body):
    """``POST /api/explain``."""

    model: ModelName | None = None
    text: StrictStr
    method: StrictStr
    steps: StrictInt = 16  # integrated gradients only; left out: 16 or max_steps, the lower
    top_k: StrictInt = 16  # left out: 16 or max_top_k, the lower
    image: None = None


def one_line(errors: Any, total: int | None = None) -> str:
    """FastAPI's validation errors as one line: ``field: message (got value)``; ``total``:
    how many there are when ``errors`` lists only the first (at least six of them)."""
    parts = []
    for i, err in enumerate(errors):
        if i == 5:  # a body with thousands of unknown keys: the detail stays one line
            parts.append(f"and {(len(errors) if total is None else total) - 5} more")
            break
        if err.get("type") == "json_invalid":
            why = err.get("ctx", {}).get("error", "")
            parts.append(f"body is not valid JSON ({why} at character {err['loc'][-1]})")
            continue
        where = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
        got = f" (got {err['input']!r:.60})" if "input" in err and err["type"] != "missing" else ""
        parts.append(f"{where}: {err.get('msg', 'invalid')}{got}")
    return "; ".join(parts) or "invalid request"


def pick(ins: Inspection, view: View, side: str = "") -> tuple[AttentionStack, Tensor]:
    """The chosen stack and head ``(Lq, Lk)``; ApiError 422 for a stack, layer or head
    that the inspection does not have, naming ``side`` (a compare's ``"b: model 'x'"``:
    a smaller model B said "layer must be in 0..1", as if A were)."""
    names = [s.name for s in ins.stacks]
    name = names[0] if view.stack is None else view.stack  # "" is no stack's name
    if name not in names:
        of = f" ({side})" if side else ""
        raise ApiError(422, f"stack must be one of {names}{of}, got {name!r}")
    stack = ins.stacks[names.index(name)]
    where = f"{side}, stack {name!r}" if side else f"stack {name!r}"
    check_range("layer", view.layer, 0, len(stack.weights) - 1, where)
    check_range("head", view.head, 0, stack.weights[view.layer].shape[0] - 1, where)
    return stack, stack.weights[view.layer][view.head]


def stacks(ins: Inspection) -> list[dict[str, Any]]:
    return [
        {
            "name": s.name,
            "kind": s.kind,
            "layers": len(s.weights),
            "heads": s.weights[0].shape[0],
            "queries": s.queries,
            "keys": s.keys,
        }
        for s in ins.stacks
    ]


def attend(ins: Inspection, body: AttendIn | View, *, model: str, show: bool = True) -> dict:
    """The answer of ``POST /api/attend`` (thumbnails when ``body.thumbs`` and ``show``)."""
    stack, w = pick(ins, body)
    want = show and getattr(body, "thumbs", False)
    align = ins.alignment
    aligned = None
    if align is not None:
        aligned = {"queries": align.queries, "keys": align.keys}
        aligned["weights"] = rounded(align.weights[0][0])  # (Lq, Lk): one layer, one head
    return {
        "model": model,
        "output": ins.output,
        "stacks": stacks(ins),
        "stack": stack.name,
        "thumbs": thumbs(stack.weights) if want else None,
        "head": head_view(w, layer=body.layer, head=body.head, top_k=body.top_k),
        "alignment": None
        if align is None
        else {
            "queries": align.queries,
            "keys": align.keys,
            "weights": rounded(align.weights[0][0]),
        },
        "image": _image(ins),
    }


def _image(ins: Inspection) -> dict[str, Any] | None:
    if ins.pixels is None:
        return None
    return {
        "grid": ins.grid,
        "pixels": rounded(ins.pixels),
        "overlays": [{"label": o.label, "map": rounded(o.map)} for o in ins.overlays],
    }


def compare(a: Inspection, b: Inspection, body: CompareIn, default: str) -> dict[str, Any]:
    """The answer of ``POST /api/compare``: the difference and the divergence come when
    the two stacks have the same shapes (position by position; ``same_tokens`` says
    whether the tokens are the same too)."""
    sa, wa = pick(a, body, f"a: model {body.a.model or default!r}")
    sb, wb = pick(b, body, f"b: model {body.b.model or default!r}")
    same_shape = [w.shape for w in sa.weights] == [w.shape for w in sb.weights]
    return {
        "a": attend(a, body, model=body.a.model or default, show=False),
        "b": attend(b, body, model=body.b.model or default, show=False),
        "same_tokens": same_shape and sa.queries == sb.queries and sa.keys == sb.keys,
        "same_shape": same_shape,
        "diff": {"top": top_rows(wa - wb, body.top_k, by_magnitude=True)} if same_shape else None,
        "divergence": divergence(sa.weights, sb.weights) if same_shape else None,
    }
