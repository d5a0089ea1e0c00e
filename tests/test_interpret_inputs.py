"""attnlab.interpret on inputs its earlier tests missed: a caller under ``no_grad``,
arguments of the wrong kind, and tokens that matplotlib would read as math."""

from __future__ import annotations

import pytest
import torch

from attnlab.interpret import (
    capture,
    fuse_heads,
    gradient_relevance,
    integrated_gradients,
    plot,
    residual_attention,
    rollout,
)
from attnlab.interpret.image import image_attention
from attnlab.interpret.report import report
from attnlab.nn import Encoder, EncoderLayer, LayerConfig


def _encoder() -> Encoder:
    torch.manual_seed(0)
    return Encoder(EncoderLayer(LayerConfig(16, 2, 32, dropout=0.0)), 2).eval().double()


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_gradient_relevance_is_the_same_under_no_grad(context: type) -> None:
    enc = _encoder()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    w = torch.randn(16, dtype=torch.float64)  # (a sum of a LayerNorm's output is constant)
    want = gradient_relevance(enc, lambda: enc(x)[:, 0] @ w)
    if context is torch.inference_mode:  # its tensors cannot join a graph
        with context(), pytest.raises(RuntimeError):
            gradient_relevance(enc, lambda: enc(x)[:, 0] @ w)
        return
    with context():
        got = gradient_relevance(enc, lambda: enc(x)[:, 0] @ w)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert (want - torch.eye(5)).abs().max() > 1e-3


def test_arguments_of_the_wrong_kind_are_named(tmp_path) -> None:
    a = torch.rand(1, 2, 3, 3).softmax(-1)
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        capture("m")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="grad must be a bool"):
        capture(_encoder(), grad="no")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"layer must be a torch\.nn\.Module"):
        integrated_gradients(lambda t: t.sum(-1), torch.ones(1, 3), layer="emb")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="top_k must be a positive int, got True"):
        report(tmp_path / "r.html", list("abc"), [a[0]], top_k=True)
    with pytest.raises(ValueError, match=r"saliency\['s'\] has shape \(1, 3\), expected \(3,\)"):
        report(tmp_path / "r.html", list("abc"), [a[0]], saliency={"s": torch.rand(1, 3)})
    with pytest.raises(TypeError, match="attentions must share dtype"):
        rollout([a, a.double()])
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("token", ["$$", "$_$", "$^$", "$x$"])
def test_tokens_are_drawn_as_written(tmp_path, token: str) -> None:
    plt = plot.pyplot()
    before = plt.get_fignums()
    plot.saliency([token, "b"], [0.5, -0.2], tmp_path / "s.png", title=token)
    plot.heatmap(torch.eye(2), [token, "b"], tmp_path / "h.png")
    image_attention(torch.rand(8, 8), torch.rand(1, 2, 2), [token], tmp_path / "i.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.png", "i.png", "s.png"]
    assert plt.get_fignums() == before  # every figure freed


def test_a_figure_that_fails_to_save_is_freed(tmp_path) -> None:
    plt = plot.pyplot()
    before = plt.get_fignums()
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(OSError):
        plot.saliency(["a"], [1.0], tmp_path / "file" / "s.png")
    assert plt.get_fignums() == before


def test_integer_weights_gradients_of_another_dtype_and_no_attention_are_named() -> None:
    """(``rollout`` of integer weights failed in mean() naming nothing; ``relevance`` with
    float64 gradients for float32 weights raised 'expected scalar type Double'; explaining
    a model that makes no attnlab attention call raised IndexError.)"""
    import tempfile

    from torch import nn

    from attnlab.interpret import relevance
    from attnlab.interpret.text import TextModel, explain_text

    a = torch.rand(1, 2, 3, 3).softmax(-1)
    with pytest.raises(TypeError, match=r"attentions\[0\] must be a floating-point tensor"):
        rollout([torch.ones(1, 1, 2, 2, dtype=torch.long)])
    rollout([a])  # the control
    with pytest.raises(TypeError, match="gradients must have the attentions' dtype and device"):
        relevance([a], [a.double()])
    relevance([a], [a.clone()])  # the control
    toy = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4))
    model = TextModel(
        toy, tokenize=lambda t: [1 + len(w) % 8 for w in t.split()], token_name=str,
        pooled=lambda t: toy(t).mean(1), embed=lambda t: toy(t).mean(1),
        input_embeddings=toy[0], pad_id=0,
    )  # fmt: skip
    with pytest.raises(ValueError, match="model: Sequential made no attnlab attention call"):
        explain_text(model, "a toy text", tempfile.mkdtemp() + "/r.html", log=lambda s: None)


def test_the_report_keeps_six_significant_digits_of_small_scores(tmp_path) -> None:
    """(``round(v, 6)`` stored 2.5e-6 as 3e-06 and 3.2e-7 as 0: gradient relevance of a
    small model is of that size, and the page shades relative to the largest score.)"""
    import json
    import re

    scores = [3.2e-7, 1.23456e-5, -4.4e-7, 2.5e-6, 9.87654e-6]
    a = torch.eye(5)[None]
    page = report(tmp_path / "r.html", list("abcde"), [a], saliency={"s": scores}).read_text()
    blob = re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S)
    assert blob is not None
    assert json.loads(blob.group(1))["saliency"]["s"] == scores


def test_numpy_bools_are_taken_as_bools() -> None:
    """(numpy 2's ``np.bool_`` is named "bool": "residual must be a bool, got bool".)"""
    np = pytest.importorskip("numpy")
    a = torch.rand(1, 2, 3, 3).softmax(-1)
    assert torch.equal(rollout([a], residual=np.bool_(False)), rollout([a], residual=False))
    assert torch.equal(rollout([a], residual=np.bool_(True)), rollout([a], residual=True))


def test_zero_heads_and_nan_weights_are_named_by_the_report_and_the_grid(tmp_path) -> None:
    """(The report wrote a page of NaN or of no heads without a word; head_grid of zero
    heads failed inside matplotlib.)"""
    a = torch.rand(2, 3, 3).softmax(-1)
    nan = a.clone()
    nan[1, 0, 0] = float("nan")
    for bad, match in ((torch.ones(0, 3, 3), r"\(0, 3, 3\).*H >= 1 heads"), (nan, "NaN")):
        with pytest.raises(ValueError, match=match):
            report(tmp_path / "r.html", list("abc"), [bad, bad] if bad.shape[0] == 0 else [a, bad])
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="H >= 1"):
        plot.head_grid([torch.ones(0, 3, 3)], tmp_path / "g.png")
    assert report(tmp_path / "r.html", list("abc"), [a, a]).exists()  # the control
    assert plot.head_grid([a, a], tmp_path / "g.png").exists()


def test_pictures_of_no_tokens_are_named_and_a_failed_drawing_is_freed(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """0 tokens failed inside numpy ("zero-size array to reduction operation maximum"),
    naming no argument, and each failure left its figure open (3 calls: 3 figures)."""
    plt = plot.pyplot()
    before = plt.get_fignums()
    no_tokens = r"weights has shape \({}\), no tokens to draw; expected \(rows, cols\)"
    with pytest.raises(ValueError, match=no_tokens.format("0, 0")):
        plot.heatmap(torch.zeros(0, 0), [], tmp_path / "h.png")
    with pytest.raises(ValueError, match=no_tokens.format("2, 0")):
        plot.alignment(torch.zeros(2, 0), [], ["a", "b"], tmp_path / "a.png")

    def broken(*args: object) -> None:
        raise RuntimeError("drawing failed")

    monkeypatch.setattr(plot, "_label", broken)  # any failure after the figure is made
    with pytest.raises(RuntimeError, match="drawing failed"):
        plot.heatmap(torch.eye(2), ["a", "b"], tmp_path / "h.png")
    assert plt.get_fignums() == before and not list(tmp_path.iterdir())


def test_a_report_of_no_tokens_is_refused_before_the_write(tmp_path) -> None:
    """0 tokens (attentions (H, 0, 0)) wrote a page that threw on load, createImageData(0,
    0), and never drew."""
    out = tmp_path / "r.html"
    with pytest.raises(ValueError, match=r"attentions\[0\] has shape \(2, 0, 0\).*n >= 1 tokens"):
        report(out, [], [torch.zeros(2, 0, 0)])
    with pytest.raises(ValueError, match=r"attentions\[0\] has shape \(1, 0, 0\)"):
        report(out, [], [torch.zeros(1, 1, 0, 0)])
    assert not out.exists()
    assert report(out, ["a"], [torch.ones(2, 1, 1)]).exists()  # the control: one token


def test_what_the_interpret_audit_found(tmp_path) -> None:
    """(against="" was scored as the empty text's embedding but labelled "its own
    direction"; a model in training mode explained a dropout-perturbed score; an
    encoder-decoder's gradient relevance blamed "attentions"; a 512-token heatmap took
    90 s and 20 GB; numpy weights, a stacked tensor, (1, n) scores, grid 0 and tokens None
    were bare AttributeError/RuntimeError.)"""
    import numpy as np
    from PIL import Image

    from attnlab.interpret.image import patch_grid
    from attnlab.interpret.text import TextModel, _toy, explain_text
    from attnlab.nn import MultiHeadAttention, Transformer

    toy = _toy(16)
    quiet = {"steps": 4, "log": lambda s: None}
    for against in ("", "  "):
        with pytest.raises(ValueError, match="against must be a non-empty str"):
            explain_text(toy, "a toy text", tmp_path / "r.html", against=against, **quiet)
    words = torch.nn.Embedding(10, 16)
    net = torch.nn.Sequential(words, torch.nn.Dropout(0.5), MultiHeadAttention(16, 2))
    drop = TextModel(
        net,
        tokenize=lambda s: [1, *(2 + len(w) for w in s.split()), 9],
        token_name=str,
        pooled=lambda t: net(t).mean(1),
        embed=lambda t: torch.nn.functional.normalize(net(t).mean(1), dim=-1),
        input_embeddings=words,
        pad_id=0,
    )
    net.train()
    runs = [explain_text(drop, "a toy text", tmp_path / f"r{i}.html", **quiet) for i in range(2)]
    assert net.training  # left as it was
    net.eval()
    want = explain_text(drop, "a toy text", tmp_path / "e.html", **quiet)
    for ex in runs:  # in eval mode, as encode() embeds
        assert ex.saliency == want.saliency
    torch.manual_seed(0)
    model = Transformer(LayerConfig(16, 2, 32, dropout=0.0), 1, 1).eval()
    src, tgt = torch.randn(1, 5, 16), torch.randn(1, 3, 16)
    with pytest.raises(ValueError, match=r"not one stack of square self-attention .* layers="):
        gradient_relevance(model, lambda: model(src, tgt).sum())
    enc_only = gradient_relevance(model, lambda: model(src, tgt).sum(), layers=["encoder.*"])
    assert enc_only.shape == (1, 5, 5)  # the control
    n = 300
    png = plot.heatmap(
        torch.rand(n, n).softmax(-1), [f"t{i}" for i in range(n)], tmp_path / "h.png"
    )
    assert max(Image.open(png).size) < 4000  # (n=256 drew 12089 x 10758 px)
    for call, error, match in (
        (
            lambda: plot.heatmap(np.eye(3), list("abc"), tmp_path / "x.png"),
            TypeError,
            "weights must be a Tensor",
        ),
        (
            lambda: plot.head_grid(torch.rand(2, 2, 3, 3), tmp_path / "x.png"),
            TypeError,
            "pass list",
        ),
        (
            lambda: plot.saliency(list("abc"), torch.rand(1, 3), tmp_path / "x.png"),
            ValueError,
            r"\(n,\)",
        ),
        (lambda: patch_grid(torch.zeros(2, 0), 0), ValueError, "grid must be a positive int"),
        (
            lambda: report(tmp_path / "x.html", None, [torch.rand(1, 3, 3)]),
            TypeError,
            "tokens must be a list",
        ),
    ):
        with pytest.raises(error, match=match):
            call()
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "x.html").exists()


def test_fuse_heads_and_residual_attention_name_bad_arguments() -> None:
    """(fuse_heads of a (3, 3) tensor took the mean over its keys and returned (3,); and
    residual_attention(residual="yes") took the str as True.)"""
    a = torch.rand(2, 3, 4, 5).softmax(-1)
    for bad in (torch.rand(3, 3), a[0], a.long()):
        with pytest.raises((TypeError, ValueError), match=r"attention must (have shape|be a)"):
            fuse_heads(bad)
    sq = torch.rand(1, 2, 3, 3).softmax(-1)
    with pytest.raises(TypeError, match="residual must be a bool, got str"):
        residual_attention(sq, residual="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"attention must have shape \(B, H, n, n\)"):
        residual_attention(a)
    # the controls: heads fused on dim 1, of a non-square (cross-attention) tensor too
    torch.testing.assert_close(fuse_heads(a), a.mean(1), rtol=0, atol=0)
    torch.testing.assert_close(fuse_heads(a, "max"), a.amax(1), rtol=0, atol=0)
    torch.testing.assert_close(residual_attention(sq, residual=False), sq.mean(1), rtol=0, atol=0)


def test_bool_saliency_and_a_str_of_titles_are_refused(tmp_path) -> None:
    """(A bool tensor or array of saliency was drawn as 0 and 1, where a list of bools was
    refused; image_attention's titles "ab" drew one panel per letter.)"""
    import numpy as np

    a = [torch.full((1, 2, 2), 0.5)]
    for scores in ([True, False], torch.tensor([True, False]), np.array([True, False])):
        with pytest.raises(TypeError, match=r"saliency\['x'\] must be 2 numbers"):
            report(tmp_path / "r.html", ["a", "b"], a, saliency={"x": scores})
    with pytest.raises(TypeError, match=r"got Tensor of torch\.bool"):
        report(tmp_path / "r.html", ["a", "b"], a, saliency={"x": torch.tensor([True, False])})
    with pytest.raises(TypeError, match=r"titles must be a list of str .* got the str 'ab'"):
        image_attention(torch.rand(8, 8), torch.rand(2, 2, 2), "ab", tmp_path / "i.png")
    assert not list(tmp_path.iterdir())
    # the controls: integer scores are numbers; a list of two titles draws two panels
    page = report(tmp_path / "r.html", ["a", "b"], a, saliency={"x": torch.tensor([1, 0])})
    assert '"saliency": {"x": [1.0, 0.0]}' in page.read_text()
    image_attention(torch.rand(8, 8), torch.rand(2, 2, 2), ["a", "b"], tmp_path / "i.png")


def test_report_checks_path_before_any_work(tmp_path, monkeypatch) -> None:
    """(None and 3 were an unnamed TypeError, a folder a WriteError, each at the final
    write after the page was built: about a second for 300 tokens.)"""
    import attnlab.interpret.report as report_mod

    a = [torch.rand(2, 3, 3).softmax(-1)]

    def no_work(*args: object) -> None:
        raise AssertionError("the page was built before path was checked")

    monkeypatch.setattr(report_mod, "_top_keys", no_work)
    for path, error, match in (
        (None, TypeError, r"path must be a str or Path \(an HTML file to write\), got NoneType"),
        (3, TypeError, r"path must be a str or Path .* got int"),
        (tmp_path, ValueError, "path must be an HTML file to write, got the folder"),
        (tmp_path / "r.png", ValueError, r"ends in '.png', but an HTML file is written there"),
    ):
        with pytest.raises(error, match=match):
            report(path, list("abc"), a)
    monkeypatch.undo()
    assert not list(tmp_path.iterdir())

    class Where:  # any os.PathLike, as open() takes
        def __fspath__(self) -> str:
            return str(tmp_path / "r.html")

    assert report(Where(), list("abc"), a) == tmp_path / "r.html"  # the control


def test_report_arguments_and_picture_names_the_explorer_audit_found(tmp_path) -> None:
    """(title/text None and saliency as a list were AttributeError, a str of pictures was
    read letter by letter, a missing picture a bare FileNotFoundError, (1, n) numpy scores a
    bare TypeError; weights of 5.0 drew as 1.00; saliency names "x y" and "x_y" wrote one
    picture, and "a/b" wrote into a new folder.)"""
    import numpy as np

    from attnlab.interpret import write_explanation

    a = [torch.rand(2, 3, 3).softmax(-1)]
    out = tmp_path / "r.html"
    for kwargs, error, match in (
        ({"title": None}, TypeError, "title must be a str, got NoneType"),
        ({"text": None}, TypeError, "text must be a str, got NoneType"),
        ({"saliency": [0.1, 0.2, 0.3]}, TypeError, "saliency must be a dict"),
        ({"saliency": {1: [0, 1, 2]}}, TypeError, "saliency's names must be str, got int 1"),
        ({"saliency": {"s": np.zeros((1, 3))}}, ValueError, r"has shape \(1, 3\), expected"),
        ({"saliency": {"s": [[0.1, 0.2, 0.3]]}}, TypeError, r"saliency\['s'\] must be 3 numbers"),
        ({"saliency": {"s": "abc"}}, TypeError, r"saliency\['s'\] must be 3 numbers"),
        ({"pictures": "a.png"}, TypeError, "pictures must be a list of PNG paths, got str"),
        ({"pictures": [tmp_path / "no.png"]}, ValueError, r"pictures\[0\] cannot be read"),
        ({"pictures": [__file__]}, ValueError, r"pictures\[0\] is not a PNG file"),
    ):
        with pytest.raises(error, match=match):
            report(out, list("abc"), a, **kwargs)
    for weights, error, match in (
        (torch.full((2, 3, 3), 5.0), ValueError, r"in \[5, 5\], expected attention weights"),
        (-a[0], ValueError, "expected attention weights in"),
        (torch.ones(2, 3, 3, dtype=torch.long), TypeError, "must hold floating weights"),
    ):
        with pytest.raises(error, match=match):
            report(out, list("abc"), [weights])
    with pytest.raises(TypeError, match=r"tokens\[1\] must be a str, got int"):
        report(out, ["a", 1, "c"], a)
    assert not out.exists()
    page = report(out, list("abc"), a, saliency={"s": np.array([0.5, 0.25, 0.25])})
    assert '"s": [0.5, 0.25, 0.25]' in page.read_text()  # the control

    roll = a[0].mean(0)
    scores = [0.2, 0.3, 0.5]
    with pytest.raises(ValueError, match="'x y' and 'x_y' would share the picture"):
        write_explanation(out, list("abc"), a, roll, {"x y": scores, "x_y": scores})
    files = write_explanation(tmp_path / "w.html", list("abc"), a, roll, {"a/b": scores})
    assert [f.name for f in files] == ["w.html", "w_heads.png", "w_rollout.png",
                                       "w_saliency_a_b.png"]  # fmt: skip
    assert all(f.parent == tmp_path and f.is_file() for f in files)


def test_a_report_past_its_token_limit_says_the_limit(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past 65535 tokens (uint16 key indices) it said "tokens has 5 entries but the
    weights are 5 x 5", though the two agreed. The limit is lowered to 4 here."""
    import attnlab.interpret.report as report_module

    monkeypatch.setattr(report_module, "_MAX_TOKENS", 4)
    with pytest.raises(ValueError, match=r"attentions are 5 x 5: a report shows at most 4 tokens"):
        report(tmp_path / "r.html", list("abcde"), [torch.full((1, 5, 5), 0.2)])
    with pytest.raises(ValueError, match=r"tokens has 3 entries but the weights are 4 x 4"):
        report(tmp_path / "r.html", list("abc"), [torch.full((1, 4, 4), 0.25)])
    assert report(tmp_path / "r.html", list("abcd"), [torch.full((1, 4, 4), 0.25)]).exists()


def test_pictures_refuse_what_they_cannot_draw_before_drawing(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A str as tokens was drawn letter by letter (report refuses one); a NaN image gave a
    blank panel and negative maps were drawn as 0; alpha=5 failed inside matplotlib; a
    folder as path failed at the write, after the drawing; NaN or inf scores and weights
    drew blanks or a broken scale in plot's PNGs. Each is refused, naming the
    argument, before matplotlib is asked for anything."""
    import attnlab.interpret.image as image_module

    def no_drawing() -> None:
        raise AssertionError("drew before checking")

    img, maps = torch.rand(8, 8), torch.rand(1, 2, 2)
    cases = [
        (lambda: plot.heatmap(torch.eye(3), "abc", tmp_path / "h.png"), TypeError,
         "tokens must be a list of str .* got the str 'abc'"),
        (lambda: plot.alignment(torch.eye(3), list("abc"), "xyz", tmp_path / "h.png"),
         TypeError, "tgt_tokens must be a list of str"),
        (lambda: plot.saliency("ab", [1.0, 2.0], tmp_path / "s.png"), TypeError,
         "tokens must be a list of str"),
        (lambda: plot.head_grid([torch.rand(1, 3, 3)], tmp_path / "g.png", tokens="abc"),
         TypeError, "tokens must be a list of str"),
        (lambda: image_attention(torch.full((8, 8), float("nan")), maps, ["x"], tmp_path / "i.png"),
         ValueError, "image must be finite, got 64 NaN or inf values"),
        (lambda: image_attention(img, -maps, ["x"], tmp_path / "i.png"), ValueError,
         r"maps must be finite and >= 0"),
        (lambda: image_attention(img, maps * float("nan"), ["x"], tmp_path / "i.png"), ValueError,
         r"maps must be finite and >= 0"),
        (lambda: image_attention(img, maps, ["x"], tmp_path / "i.png", alpha=5.0), ValueError,
         r"alpha must be a number in \[0, 1\], got 5.0"),
        (lambda: image_attention(img, maps, ["x"], tmp_path / "i.png", alpha="0.5"), TypeError,
         r"alpha must be a number in \[0, 1\], got str"),
        (lambda: image_attention(img, maps, ["x"], tmp_path), ValueError,
         "path must be a PNG file to write, got the folder"),
        (lambda: plot.heatmap(torch.eye(3), list("abc"), tmp_path), ValueError,
         "path must be a PNG file to write, got the folder"),
        (lambda: plot.heatmap(torch.eye(3), list("abc"), tmp_path / "h.svg"), ValueError,
         r"ends in '.svg', but a PNG file is written there; give a name ending in .png"),
        (lambda: image_attention(img, maps, ["x"], tmp_path / "i.jpg"), ValueError,
         r"ends in '.jpg', but a PNG file is written there"),
        (lambda: plot.saliency(["a"], [1.0], tmp_path), ValueError, "path must be a PNG file"),
        (lambda: plot.head_grid([torch.rand(1, 3, 3)], tmp_path), ValueError,
         "path must be a PNG file"),
        (lambda: plot.saliency(["a", "b"], [0.5, float("nan")], tmp_path / "s.png"), ValueError,
         "scores must be finite, got 1 NaN or inf values"),
        (lambda: plot.saliency(["a"], torch.tensor([float("inf")]), tmp_path / "s.png"),
         ValueError, "scores must be finite, got 1 NaN"),
        (lambda: plot.saliency(["a", "b"], ["1", "x"], tmp_path / "s.png"), TypeError,
         r"scores must be numbers, one per token, got \['1', 'x'\]"),
        (lambda: plot.alignment(torch.eye(2) / 0, list("ab"), list("xy"), tmp_path / "a.png"),
         ValueError, "weights must be finite, got 4 NaN or inf values"),
        (lambda: plot.heatmap(torch.eye(2).log(), list("ab"), tmp_path / "h.png"), ValueError,
         "weights must be finite, got 2 NaN or inf"),
        (lambda: plot.head_grid([torch.rand(1, 2, 2), torch.full((1, 2, 2), float("nan"))],
                                tmp_path / "g.png"), ValueError,
         r"attentions\[1\] must be finite, got 4 NaN"),
    ]  # fmt: skip
    with monkeypatch.context() as m:
        m.setattr(plot, "pyplot", no_drawing)
        m.setattr(image_module, "pyplot", no_drawing)
        for call, error, match in cases:
            with pytest.raises(error, match=match):
                call()
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    # the controls: edges of what is taken
    plot.heatmap(torch.eye(3), ("a", "b", "c"), tmp_path / "h.png")
    plot.saliency(["a", "b"], torch.tensor([-1e30, 0]), tmp_path / "h.png")
    for alpha in (0, 1.0):
        image_attention(img, maps * 0, ["x"], tmp_path / "i.png", alpha=alpha)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.png", "i.png"]


def test_the_report_reads_each_picture_once(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """(Each picture was opened twice: its header for the check, then all of it for the
    page.) The page holds each file's bytes as they are, read once."""
    import base64
    import builtins
    import io
    import re
    from typing import Any

    import matplotlib.pyplot as plt

    pictures = [tmp_path / "first.png", tmp_path / "second.png"]
    for i, p in enumerate(pictures):
        plt.imsave(p, torch.rand(4, 5 + i).numpy())
    opened: list[str] = []
    real = builtins.open

    def counted(file: Any, *a: Any, **kw: Any) -> Any:
        opened.append(str(file))
        return real(file, *a, **kw)

    monkeypatch.setattr(builtins, "open", counted)
    monkeypatch.setattr(io, "open", counted)  # Path.read_bytes opens through io.open
    page = report(tmp_path / "r.html", list("abc"), [torch.rand(2, 3, 3).softmax(-1)],
                  pictures=pictures)  # fmt: skip
    monkeypatch.undo()
    assert [opened.count(str(p)) for p in pictures] == [1, 1]
    inlined = re.findall(r"src='data:image/png;base64,([^']*)'", page.read_text())
    assert [base64.b64decode(s) for s in inlined] == [p.read_bytes() for p in pictures]
