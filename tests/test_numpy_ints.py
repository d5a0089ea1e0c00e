"""numpy's ints where a function takes a count, an index or a size: taken as Python's
(``top_k=np.int64(5)`` from a numpy computation was a ValueError "must be a positive
int"), and what is returned or stored is Python's int, so JSON and torch take it. Each
call is compared with the same call given the Python int (the control); bool, numpy's
bool, floats and strings are still refused, naming the argument.
(:mod:`tests.test_numpy_scalars` does the same for config constructors.)"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from attnlab import distributed as D
from attnlab.interpret import capture, integrated_gradients
from attnlab.interpret.image import patch_grid
from attnlab.interpret.report import report
from attnlab.serve.limits import Limits

Case = Callable[[Any], object]


def _shards(v: Any) -> list[list[int]]:
    """Both ranks' shards along ``dim=v`` and the whole put back together."""
    x = torch.arange(10).view(1, 1, 10, 1)  # (B, H, L, E)
    parts = [D.shard(x, r, 2, dim=v) for r in range(2)]
    return [p.flatten().tolist() for p in parts] + [D.unshard(parts, dim=v).flatten().tolist()]


def _capture(v: Any) -> object:
    from attnlab.nn import Encoder, EncoderLayer, LayerConfig

    torch.manual_seed(0)
    enc = Encoder(EncoderLayer(LayerConfig(8, 2, 16, dropout=0.0)), 1).eval()
    with capture(enc, rows=(0, v)) as cap:
        enc(torch.randn(1, 4, 8))
    return json.dumps(cap.rows), cap.records[0].weights.tolist()


def _ig(v: Any) -> list[float]:
    x = torch.tensor([[1.0, 2.0, 3.0]])
    ig = integrated_gradients(lambda t: (t**2).sum(-1), x, steps=v, internal_batch_size=v)
    return ig.attributions[0].tolist()


def _report(v: Any, tmp: Path) -> str:
    torch.manual_seed(0)
    attns = [torch.rand(2, 3, 3).softmax(-1) for _ in range(2)]
    return report(tmp / f"r{type(v).__name__}.html", ["a", "b", "c"], attns, top_k=v).read_text()


def _explain(v: Any, tmp: Path) -> object:
    from attnlab.interpret.text import _toy, explain_text

    torch.manual_seed(0)
    out = tmp / f"e{type(v).__name__}.html"
    ex = explain_text(_toy(16), "a toy text", out, steps=v, flow_tokens=v, log=lambda s: None)
    return ex.saliency


def _summarize(v: Any) -> list[int]:
    from attnlab.apps import summarize
    from attnlab.models.sentence import _toy_encoder

    text = "Cats purr. Cats purr when content. Taxes rose. Dogs bark at night."
    return summarize(text, v, encoder=_toy_encoder()).chosen


def _edits(v: Any) -> str:
    from attnlab.robust.study_dates import AdversarialEditsTask

    task = AdversarialEditsTask(train_size=8, test_size=2, locales=("fr_FR",), k=v)
    return json.dumps({"k": task.k, "data_k": task.data_options["k"]})


def _folder_sizes(v: Any) -> tuple[int, int]:
    """(internal: these read config.json files, whose numbers are never numpy's)"""
    from attnlab.models.sentence_folder import _length, _size

    return _length("max_seq_length", v), _size(Path("config.json"), {"in": v}, "in")


# name -> (the call, the int it is given, the argument its error names)
CASES: dict[str, tuple[Case, int, str]] = {
    "Limits": (lambda v: json.dumps(Limits(max_top_k=v).as_dict()), 8, "max_top_k"),
    "pieces n": (lambda v: json.dumps(D.pieces(v, 1, 2)), 8, "n"),  # (json: no np.int64)
    "pieces rank": (lambda v: json.dumps(D.pieces(8, v, 2)), 1, "rank"),
    "pieces world": (lambda v: json.dumps(D.pieces(8, 0, v)), 2, "world"),
    "shard_lengths": (lambda v: json.dumps(D.shard_lengths(10, v)), 4, "world"),
    "positions": (lambda v: D.positions(8, 0, v).tolist(), 2, "world"),
    "shard, unshard": (_shards, 2, "dim"),
    "capture rows": (_capture, 3, "rows"),
    "integrated_gradients": (_ig, 4, "steps"),
    "patch_grid": (lambda v: patch_grid(torch.arange(8.0).view(2, 4), v).tolist(), 2, "grid"),
    "summarize": (_summarize, 2, "sentences"),
    "AdversarialEditsTask": (_edits, 3, "k"),
    "sentence_folder": (_folder_sizes, 3, "max_seq_length"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_numpy_ints_are_taken_as_python_ints(name: str) -> None:
    call, n, _ = CASES[name]
    assert call(np.int64(n)) == call(n)  # (the control: the Python int)


@pytest.mark.parametrize("kind", ["report", "explain_text"])
def test_numpy_ints_are_taken_by_the_reports(kind: str, tmp_path: Path) -> None:
    """``report(top_k=)``, ``explain_text(steps=, flow_tokens=)``: the same page and scores."""
    call = _report if kind == "report" else _explain
    n = 2 if kind == "report" else 8  # (8 flow tokens: the toy text's 5 have a flow)
    assert call(np.int64(n), tmp_path) == call(n, tmp_path)


@pytest.mark.parametrize("bad", [True, np.bool_(True), 2.0, "2"], ids=repr)
@pytest.mark.parametrize("name", list(CASES))
def test_bools_floats_and_strings_are_still_refused(name: str, bad: object) -> None:
    call, _, arg = CASES[name]
    if name == "sentence_folder" and bad == 2.0:
        pytest.skip("a whole float is a valid token limit in a config file")
    with pytest.raises(ValueError, match=rf"\b{arg} must be"):
        call(bad)


@pytest.mark.parametrize("bad", [True, np.bool_(True), 2.0], ids=repr)
def test_the_reports_still_refuse_bools_and_floats(bad: object, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        _report(bad, tmp_path)
    with pytest.raises(ValueError, match=r"steps must be an int >= 2"):
        _explain(bad, tmp_path)
