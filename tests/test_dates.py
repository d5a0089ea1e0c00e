"""Tests for the dates task (attnlab.tasks.dates) and the Bahdanau GRU (attnlab.models.rnn).

References: Babel's own ``format_date``, ``parse_date`` and month-name tables for the data;
a float64 decoder written from Bahdanau's formulas with plain torch ops (einsum, tanh,
torch.softmax over the real keys only), run one unpadded sentence at a time, for the
model's attention rows and logits.
"""

from __future__ import annotations

import copy
import datetime as dt
import math
from pathlib import Path

import pytest
import torch
from babel.dates import format_date, get_month_names, parse_date
from torch import Tensor

from attnlab.interpret import capture
from attnlab.models import RNNSeq2Seq, RNNSeq2SeqConfig
from attnlab.tasks.dates import (
    FORMATS,
    LOCALES,
    DatesTask,
    alignment_rows,
    date_pattern,
    field_alignment,
    finish,
    render,
    split_dates,
)
from attnlab.train import TrainConfig, Trainer
from tests.conftest import check_and_control

SMALL = {"embed_dim": 8, "hidden": 8, "decoder_hidden": 12, "attn_dim": 8}


def _task(**kw: object) -> DatesTask:
    args: dict = {"train_size": 400, "test_size": 40, "seed": 3} | SMALL | kw
    return DatesTask(**args)


def _model(task: DatesTask, seed: int = 0) -> RNNSeq2Seq:
    torch.manual_seed(seed)
    model = task.build_model()
    assert isinstance(model, RNNSeq2Seq)
    return model.eval()


# ------------------------------------------------------------------------------------ data


def test_data_is_deterministic_and_test_days_never_train() -> None:
    a, b, c = _task(), _task(), _task(seed=4)
    assert [e.text for e in a.train] == [e.text for e in b.train]
    assert [e.text for e in a.test] == [e.text for e in b.test]
    assert [e.text for e in a.train] != [e.text for e in c.train]
    train_days, test_days = split_dates(40, seed=3)
    # the split covers every day of 1900-2099 exactly once
    everything = train_days + test_days
    days = (dt.date(2099, 12, 31) - dt.date(1900, 1, 1)).days + 1
    assert len(everything) == len(set(everything)) == days
    assert {e.date for e in a.test} == set(test_days)
    assert not {e.date for e in a.train} & set(test_days)
    assert all(e.date.isoformat() not in a.test_days for e in a.train)


def test_every_style_is_babels_own_text_and_target() -> None:
    """Field-by-field rendering equals Babel's format_date; the target is the date back."""
    days = [dt.date(1900, 1, 1), dt.date(1907, 3, 4), dt.date(2026, 11, 21), dt.date(2099, 12, 31)]
    for loc in LOCALES:
        for width in FORMATS:
            for day in days:
                ex = render(day, loc, width)
                assert ex.text == format_date(day, date_pattern(loc, width), locale=loc)
                _check_parses_back(ex.text, ex.spans, ex.target, loc)


def _check_parses_back(text: str, spans: dict, target: str, loc: str) -> None:
    """Read ``text`` back with Babel's parser (numeric months) or month-name tables."""
    day = dt.date.fromisoformat(target)
    year, month, dom = (text[slice(*spans[k])] for k in ("year", "month", "day"))
    assert year == str(day.year) and int(dom) == day.day, (text, target)
    if month.isdigit():
        assert parse_date(text, locale=loc) == day, (text, target)
        return
    names = {
        m: {
            str(get_month_names(w, c, locale=loc)[m])
            for w in ("wide", "abbreviated")
            for c in ("format", "stand-alone")
        }
        for m in range(1, 13)
    }
    assert [m for m in names if month in names[m]] == [day.month], (text, target)


def test_two_digit_years_are_widened() -> None:
    assert "yy" not in date_pattern("en_US", "short").replace("yyyy", "")
    assert format_date(dt.date(1926, 5, 1), "short", locale="en_US") == "5/1/26"  # ambiguous
    assert format_date(dt.date(1926, 5, 1), date_pattern("en_US", "short"), locale="en_US") == (
        "5/1/1926"
    )


# ----------------------------------------------------------------------------- the model


def _reference(model: RNNSeq2Seq, src: Tensor, length: int, tgt_in: Tensor) -> tuple[Tensor, ...]:
    """Bahdanau's decoder in float64 on one unpadded sentence: (weights (Lt, Ls), logits).

    ``model`` is converted to float64 in place: pass a copy."""
    m = model.double()
    x = m.src_embed(src[None, :length])  # (1, Ls, E)
    h, last = m.encoder(x)  # (1, Ls, 2H): the unpadded sentence needs no packing
    s = torch.tanh(m.init_state(torch.cat([last[0], last[1]], -1)))  # (1, D)
    a = m.attention
    keys = torch.einsum("bkd,hd->bkh", h, a.key_proj.weight)  # W2 h
    rows, logits = [], []
    for y in tgt_in.tolist():
        q = s @ a.query_proj.weight.T + a.query_proj.bias  # W1 s + b1, (1, A)
        e = torch.einsum("bkh,h->bk", torch.tanh(q[:, None] + keys), a.v.weight[0])  # (1, Ls)
        w = torch.softmax(e, -1)
        ctx = torch.einsum("bk,bkc->bc", w, h)
        emb = m.tgt_embed(torch.tensor([y]))
        s = m.decoder(torch.cat([emb, ctx], -1), s)
        logits.append(m.out(torch.cat([s, ctx, emb], -1))[0])
        rows.append(w[0])
    return torch.stack(rows), torch.stack(logits)


def test_attention_rows_and_logits_match_bahdanau_reference_and_ignore_padding() -> None:
    task = _task()
    model = _model(task)
    batch = task.test_batch(task.test[:6])
    lengths = batch.lengths
    assert len(set(lengths.tolist())) > 1, "the batch must hold different lengths"
    with torch.no_grad(), capture(model, layers=["attention"]) as cap:
        logits = model(batch.src, lengths, batch.tgt_in)
    w = torch.cat([c.weights[:, 0] for c in cap], 1)  # (B, Lt, Ls)
    assert w.shape == (6, batch.tgt_in.shape[1], batch.src.shape[1])
    assert [c.call for c in cap] == list(range(batch.tgt_in.shape[1]))
    torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:2]))
    for i, n in enumerate(lengths.tolist()):
        ref_w, ref_logits = _reference(copy.deepcopy(model), batch.src[i], n, batch.tgt_in[i])
        assert torch.all(w[i, :, n:] == 0)
        torch.testing.assert_close(w[i, :, :n].double(), ref_w, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(logits[i].double(), ref_logits, atol=1e-5, rtol=1e-4)
    # whatever sits in the padding changes nothing
    junk = batch.src.clone()
    pad = torch.arange(junk.shape[1]) >= lengths[:, None]
    junk[pad] = torch.randint(4, len(task.src_vocab), (int(pad.sum()),))
    with torch.no_grad():
        torch.testing.assert_close(model(junk, lengths, batch.tgt_in), logits)


def test_alignment_rows_are_the_captured_weights() -> None:
    task = _task()
    model = _model(task)
    w = alignment_rows(task, model, task.test[:3])
    b = task.test_batch(task.test[:3])
    for i, n in enumerate(b.lengths.tolist()):
        ref_w, _ = _reference(copy.deepcopy(model), b.src[i], n, b.tgt_in[i])
        torch.testing.assert_close(w[i, :, :n].double(), ref_w, atol=1e-5, rtol=1e-4)


def test_field_alignment_counts_attention_on_each_field() -> None:
    """Against masses recomputed with spans found by searching the text itself."""
    task = _task()
    model = _model(task, seed=1)
    exs = [e for e in task.test if e.width == "long"][:12]
    assert any(e.date.day < 10 for e in exs) and any(e.date.day >= 10 for e in exs)
    got = field_alignment(task, model, exs, threshold=0.1)
    w = alignment_rows(task, model, exs)
    year_mass, day_mass = [], []
    for i, e in enumerate(exs):
        y = e.text.rindex(str(e.date.year)) + 1  # +1: the locale token
        year_mass.append(float(w[i, 0:4, y : y + 4].sum(-1).mean()))
        # long dates write the day without a leading zero, before the month ("4 March")
        d = next(k for k, c in enumerate(e.text) if c.isdigit()) + 1
        digits = str(e.date.day)
        rows = w[i, 10 - len(digits) : 10, d : d + len(digits)]  # only written digits count
        day_mass.append(float(rows.sum(-1).mean()))
    assert math.isclose(got["mass_year"], round(sum(year_mass) / len(exs), 3), abs_tol=1e-3)
    assert math.isclose(got["mass_day"], round(sum(day_mass) / len(exs), 3), abs_tol=1e-3)
    assert got["year"] == round(100 * sum(m >= 0.1 for m in year_mass) / len(exs), 2)
    assert got["day"] == round(100 * sum(m >= 0.1 for m in day_mass) / len(exs), 2)
    assert 0 <= got["all"] <= min(got["year"], got["month"], got["day"])


def test_generate_agrees_with_teacher_forcing() -> None:
    task = _task()
    model = _model(task, seed=2)
    b = task.test_batch(task.test[:8])
    with capture(model, layers=["attention"]) as cap_gen:
        ids = model.generate(b.src, b.lengths, max_len=7)
    steps = max(len(r) for r in ids) + 1
    tgt_in = torch.zeros(8, steps, dtype=torch.long)
    tgt_in[:, 0] = 1
    for i, r in enumerate(ids):
        tgt_in[i, 1 : 1 + len(r)] = torch.tensor(r, dtype=torch.long)
    with torch.no_grad(), capture(model, layers=["attention"]) as cap_tf:
        pred = model(b.src, b.lengths, tgt_in).argmax(-1)  # (B, Lt)
    for i, r in enumerate(ids):
        assert pred[i, : len(r)].tolist() == r
        if len(r) < 7:
            assert pred[i, len(r)].item() == model.cfg.eos
    gen_rows = torch.cat([c.weights[:, 0] for c in cap_gen], 1)
    tf_rows = torch.cat([c.weights[:, 0] for c in cap_tf], 1)
    n = min(gen_rows.shape[1], tf_rows.shape[1])
    for i, r in enumerate(ids):  # same inputs up to each row's end -> same attention
        k = min(len(r) + 1, n)
        torch.testing.assert_close(gen_rows[i, :k], tf_rows[i, :k])


# ---------------------------------------------------------------------------- training


def test_loss_goes_down_and_evaluate_scores(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    task = _task(train_size=256, eval_size=20)
    cfg = TrainConfig(steps=25, batch_size=32, lr=1e-2, warmup=1, eval_every=25, progress=False)
    trainer = Trainer(task, cfg)
    batch = task.batch(torch.arange(64))
    with torch.no_grad():
        before = float(task.loss(trainer.model, batch))
    hist = trainer.fit()
    with torch.no_grad():
        after = float(task.loss(trainer.model.eval(), batch))
    assert after < 0.8 * before
    model = trainer.model
    assert isinstance(model, RNNSeq2Seq)
    hyps = task.convert(model, task.test[:20])
    exact = 100 * sum(h == e.target for h, e in zip(hyps, task.test, strict=False)) / 20
    assert hist[-1]["exact"] == round(exact, 2) and hist[-1]["score"] == pytest.approx(exact / 100)
    capsys.readouterr()
    scores = finish(task, model, tmp_path)
    samples = [ln for ln in capsys.readouterr().out.splitlines() if ln[:6] in ("  ok [", "  BAD ")]
    assert len(samples) > 4 and len(set(samples)) == len(samples)  # each example once
    hyps = task.convert(model, task.test)
    exact = 100 * sum(h == e.target for h, e in zip(hyps, task.test, strict=True)) / 40
    assert scores["exact"] == round(exact, 2)
    html = (tmp_path / "report.html").read_text()
    assert html.count("data:image/png;base64") == len(list(tmp_path.glob("alignment_*.png")))
    assert (tmp_path / "alignment_0.png").stat().st_size > 0


# ------------------------------------------------------------------------------ errors


def test_bad_input_errors() -> None:
    task = _task(train_size=8, test_size=4)
    model = _model(task)
    src, lengths = torch.tensor([[5, 6, 7], [5, 6, 0]]), torch.tensor([3, 2])
    tgt = torch.ones(2, 3, dtype=torch.long)
    ok = lambda: model(src, lengths, tgt)  # noqa: E731
    check_and_control(lambda: model(src.float(), lengths, tgt), ok, ValueError, "src must be")
    check_and_control(lambda: model(src, lengths[:1], tgt), ok, ValueError, "lengths must be")
    check_and_control(
        lambda: model(src, torch.tensor([4, 2]), tgt), ok, ValueError, r"lengths must lie in \[1"
    )
    check_and_control(lambda: model(src, lengths, tgt[:1]), ok, ValueError, "tgt_in has batch")
    check_and_control(lambda: model(src.tolist(), lengths, tgt), ok, TypeError, "src must be")
    check_and_control(
        lambda: model.generate(src, lengths, max_len=0),
        lambda: model.generate(src, lengths, max_len=1),
        ValueError,
        "max_len must be a positive int",
    )
    mk = lambda **kw: DatesTask(train_size=4, test_size=2, **kw)  # noqa: E731
    check_and_control(lambda: mk(locales=("xx_QQ",)), mk, ValueError, "locales: 'xx_QQ'")
    check_and_control(lambda: mk(formats=("tiny",)), mk, ValueError, "formats must be")
    check_and_control(lambda: mk(locales="en_US"), mk, ValueError, "locales must be")
    check_and_control(
        lambda: DatesTask(train_size=4, test_size=80_000), mk, ValueError, "test_size must be"
    )
    check_and_control(
        lambda: task.evaluate(torch.nn.Linear(2, 2)),
        lambda: task.evaluate(model, limit=2),
        TypeError,
        "model must be an RNNSeq2Seq",
    )
    check_and_control(
        lambda: RNNSeq2Seq(RNNSeq2SeqConfig(10, 0)),
        lambda: RNNSeq2Seq(RNNSeq2SeqConfig(10, 5)),
        ValueError,
        "tgt_vocab must be a positive int",
    )
