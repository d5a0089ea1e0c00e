"""attnlab.robust: adversarial plug-ins against directly written formulas, regularizers
against fp64 formulas, attacks within their budgets, faithfulness within its tolerance."""

from __future__ import annotations

import json
import random
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.cli import main
from attnlab.nn import AttentionPooling, MultiHeadAttention
from attnlab.robust import (
    FGM,
    PGD,
    SMART,
    CharEditAttack,
    EntropyRegularizer,
    FreeLB,
    HeadDropout,
    SupervisedAttention,
    adversarial_attention,
    entropy_term,
    find_embedding,
    jsd,
    override_attention,
    permutation_test,
    pgd_pixels,
    project,
    supervised_attention_term,
    tvd,
    uniform_attention,
)
from attnlab.robust.attacks import word_edits
from attnlab.train import TrainConfig, Trainer
from tests.conftest import check_and_control

# ---------------------------------------------------------------------------------------
# a tiny text model and task: is token 1 in the sequence?


class Tiny(nn.Module):
    """Embedding -> 2-head self-attention -> attention pooling -> linear."""

    def __init__(self, vocab: int = 10, d: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.mha = MultiHeadAttention(d, 2)
        self.pool = AttentionPooling(d)
        self.head = nn.Linear(d, 2)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.embed(ids)  # (B, L, D)
        x = x + self.mha(x)
        return self.head(self.pool(x)[0])  # (B, 2)


@dataclass
class Batch:
    ids: Tensor
    y: Tensor


class TinyTask:
    name = "tiny"

    def __init__(self, n: int = 256) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(2, 10, (n, 6), generator=g)
        self.y = torch.randint(0, 2, (n,), generator=g)
        pos = torch.randint(0, 6, (n,), generator=g)
        self.ids[self.y == 1, pos[self.y == 1]] = 1

    def build_model(self) -> nn.Module:
        return Tiny()

    def config(self) -> dict[str, Any]:
        return {}

    def num_train(self) -> int:
        return len(self.y)

    def batch(self, indices: Tensor) -> Batch:
        return Batch(self.ids[indices], self.y[indices])

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        return F.cross_entropy(model(batch.ids), batch.y)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            return {"clean_loss": float(self.loss(model, self.batch(torch.arange(len(self.y)))))}


def _task_loss(model: nn.Module, batch: Batch) -> Tensor:
    return F.cross_entropy(model(batch.ids), batch.y)


def _loss_at(model: Tiny, ids: Tensor, y: Tensor, delta: Tensor) -> Tensor:
    """The tiny model's loss with ``delta`` added to its embeddings, written out."""
    x = model.embed(ids) + delta
    x = x + model.mha(x)
    return F.cross_entropy(model.head(model.pool(x)[0]), y)


def _grads(model: nn.Module) -> list[Tensor]:
    return [
        p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()
    ]


def _setup() -> tuple[Tiny, Tensor, Tensor, Tensor]:
    model = Tiny().double()
    task = TinyTask(16)
    b = task.batch(torch.arange(8))
    emb = model.embed(b.ids).detach()
    return model, b.ids, b.y, emb


def _unit(g: Tensor, norm: str) -> Tensor:
    if norm == "linf":
        return g.sign()
    n = g.flatten(1).norm(dim=1).view(-1, 1, 1)
    return g / n


# ---------------------------------------------------------------------------------------
# FGM, PGD, FreeLB against the formulas


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_fgm_step_is_clean_plus_loss_at_eps_gradient_direction(norm: str) -> None:
    model, ids, y, emb = _setup()
    eps = 0.3
    delta0 = torch.zeros_like(emb, requires_grad=True)
    clean = _loss_at(model, ids, y, delta0)
    (g,) = torch.autograd.grad(clean, delta0)
    adv_delta = eps * _unit(g, norm)  # the formula
    model.zero_grad()
    (_loss_at(model, ids, y, torch.zeros_like(emb)) + _loss_at(model, ids, y, adv_delta)).backward()
    want_loss = float((clean + _loss_at(model, ids, y, adv_delta)).detach())
    want = _grads(model)

    model.zero_grad()
    loss = FGM(eps, norm=norm).step(model, Batch(ids, y), _task_loss)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(want_loss, rel=1e-10)
    for a, b in zip(_grads(model), want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # positive control: a step in another direction gives another loss
    other = float((clean + _loss_at(model, ids, y, -adv_delta)).detach())
    assert abs(other - want_loss) > 1e-6


def test_projection_onto_the_balls() -> None:
    d = (
        torch.randn(5, 3, 4, dtype=torch.float64)
        * torch.tensor([0.01, 1, 10, 0.5, 3.0]).view(5, 1, 1).double()
    )
    p = project(d, 1.0, "l2")
    norms, orig = p.flatten(1).norm(dim=1), d.flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, orig.clamp(max=1.0))
    cos = (p.flatten(1) * d.flatten(1)).sum(1) / (norms * orig)
    torch.testing.assert_close(cos, torch.ones(5, dtype=torch.float64))
    q = project(d, 0.5, "linf")
    assert q.abs().max() <= 0.5
    inside = d.abs() <= 0.5
    assert torch.equal(q[inside], d[inside]) and torch.equal(q[~inside], 0.5 * d[~inside].sign())


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_pgd_attack_equals_unrolled_projected_ascent(norm: str) -> None:
    model, ids, y, emb = _setup()
    eps, alpha = 0.2, 0.15
    delta = torch.zeros_like(emb)
    for _ in range(3):
        d = delta.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(_loss_at(model, ids, y, d), d)
        step = delta + alpha * _unit(g, norm)
        if norm == "l2":
            n = step.flatten(1).norm(dim=1).view(-1, 1, 1)
            delta = step * torch.clamp(eps / n, max=1.0)
        else:
            delta = step.clamp(-eps, eps)
    pgd = PGD(eps, steps=3, alpha=alpha, norm=norm, random_start=False)
    pert = pgd.attack(model, Batch(ids, y), _task_loss)
    assert pert.delta is not None
    torch.testing.assert_close(pert.delta, delta, rtol=1e-9, atol=1e-12)
    norms = delta.flatten(1).norm(dim=1) if norm == "l2" else delta.flatten(1).abs().amax(1)
    assert bool((norms <= eps + 1e-12).all()) and bool((norms > eps - 1e-9).any())


def test_freelb_accumulated_gradient_equals_unrolled_computation() -> None:
    model, ids, y, emb = _setup()
    k, eps, alpha = 3, 0.25, 0.2
    params = list(model.parameters())
    acc = [torch.zeros_like(p) for p in params]
    delta, total = torch.zeros_like(emb), 0.0
    for _ in range(k):
        d = delta.clone().requires_grad_(True)
        loss = _loss_at(model, ids, y, d) / k
        *gp, gd = torch.autograd.grad(loss, [*params, d])
        acc = [a + g for a, g in zip(acc, gp, strict=True)]
        total += float(loss.detach())
        step = delta + alpha * gd / gd.flatten(1).norm(dim=1).view(-1, 1, 1)
        delta = step * torch.clamp(eps / step.flatten(1).norm(dim=1).view(-1, 1, 1), max=1.0)
    model.zero_grad()
    plug = FreeLB(eps, steps=k, alpha=alpha, init_epsilon=0)
    out = plug.step(model, Batch(ids, y), _task_loss)
    out.backward()
    assert float(out.detach()) == pytest.approx(total, rel=1e-10)
    for a, b in zip(_grads(model), acc, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # control: the plain gradient (K = 1) differs from the accumulated one
    model.zero_grad()
    _loss_at(model, ids, y, torch.zeros_like(emb)).backward()
    assert any(not torch.allclose(a, b) for a, b in zip(_grads(model), acc, strict=True))


# ---------------------------------------------------------------------------------------
# regularizers against fp64 formulas


def test_entropy_term_and_gradient_against_fp64_formulas() -> None:
    z = torch.randn(3, 2, 4, 5, dtype=torch.float64)
    keep = torch.ones(3, 2, 4, 5, dtype=torch.bool)
    keep[0, :, 1] = False  # a fully masked row: left out
    keep[1, :, :, 3:] = False  # padding keys
    zz = z.float().requires_grad_(True)
    w = torch.softmax(zz.masked_fill(~keep, -torch.inf), -1).nan_to_num(0.0)
    for target in (None, 1.0):
        term = entropy_term([w], target)
        (g,) = torch.autograd.grad(term, zz, retain_graph=True)
        # fp64 by hand: per row H = -sum p log p; dH/dz_j = -p_j (log p_j + H)
        p = torch.softmax(z.masked_fill(~keep, -torch.inf), -1).nan_to_num(0.0)
        logp = torch.where(p > 0, p.log(), torch.zeros_like(p))
        h = -(p * logp).sum(-1)  # (B, H, Lq)
        real = keep.any(-1).double()
        hbar = (h * real).sum((0, 2)) / real.sum((0, 2))  # (H,)
        dterm_dh = (
            -torch.ones(2, dtype=torch.float64) / 2 if target is None else 2 * (hbar - target) / 2
        )  # d term / d hbar_h
        want_term = -hbar.mean() if target is None else ((hbar - target) ** 2).mean()
        dh_dz = -p * (logp + h[..., None])  # (B, H, Lq, Lk)
        want_g = dterm_dh.view(1, 2, 1, 1) * real[..., None] / real.sum((0, 2)).view(1, 2, 1, 1)
        want_g = want_g * dh_dz
        torch.testing.assert_close(term.double(), want_term, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g.double(), want_g, rtol=1e-4, atol=1e-6)
    zero, one = float(entropy_term([w], 0.0).detach()), float(entropy_term([w], 1.0).detach())
    assert zero != pytest.approx(one)
    # a target as a 0-dim tensor is the number ("size of tensor a (4) must match ... (2)"
    # with two layers), as an (H,) tensor per head; NaN is refused
    for t in (torch.tensor(1.0), torch.tensor([1.0, 1.0])):
        assert float(entropy_term([w, w], t)) == pytest.approx(float(entropy_term([w, w], 1.0)))
    with pytest.raises(ValueError, match="target must be a finite number or"):
        entropy_term([w], torch.tensor(float("nan")))


def test_supervised_attention_term_against_formula() -> None:
    w = torch.softmax(torch.randn(4, 6, dtype=torch.float64), -1)
    t = torch.zeros(4, 6, dtype=torch.float64)
    t[0, 2], t[1, 0], t[2, 5] = 1.0, 1.0, 1.0  # row 3: no target, left out
    want = -(torch.log(w[0, 2]) + torch.log(w[1, 0]) + torch.log(w[2, 5])) / 3
    assert float(supervised_attention_term(w, t)) == pytest.approx(float(want), rel=1e-7)


def test_head_dropout_zeroes_whole_heads_and_scales_the_rest() -> None:
    mha = MultiHeadAttention(8, 4)
    seen: list[Tensor] = []
    mha.out_proj.register_forward_hook(lambda m, a, o: seen.append(a[0]))
    model = nn.Sequential(mha)
    x = torch.randn(16, 3, 8)
    plug = HeadDropout(0.5)
    plug.step(model, x, lambda m, b: m(b).sum())
    mha(x)  # the hook is gone: the plain input
    dropped, plain = seen[0].unflatten(-1, (4, 2)), seen[1].unflatten(-1, (4, 2))
    zero = (dropped == 0).all(-1).all(1)  # (B, H)
    assert 0 < int(zero.sum()) < zero.numel()
    torch.testing.assert_close(
        dropped[~zero[:, None].expand(-1, 3, -1)], 2 * plain[~zero[:, None].expand(-1, 3, -1)]
    )


# ---------------------------------------------------------------------------------------
# every plug-in trains the tiny model


def _plugins() -> dict[str, object]:
    align = lambda b: (b.ids == 1).double()  # noqa: E731
    return {
        "fgm": FGM(0.5),
        "pgd": PGD(0.5, steps=2),
        "freelb": FreeLB(0.5, steps=2),
        "smart": SMART(lambda m, b: m(b.ids), epsilon=0.1),
        "entropy": EntropyRegularizer(0.01, target=0.5, layers=["mha"]),
        "supervised": SupervisedAttention("pool", align, weight=0.5),
        "head_dropout": HeadDropout(0.2),
    }


@pytest.mark.parametrize("name", list(_plugins()))
def test_each_plugin_trains_a_tiny_model(name: str) -> None:
    task = TinyTask()
    cfg = TrainConfig(steps=40, batch_size=32, lr=1e-2, warmup=2, eval_every=40, progress=False)
    trainer = Trainer(task, cfg, plugins=[_plugins()[name]])  # type: ignore[list-item]
    before = task.evaluate(trainer.model)["clean_loss"]
    after = trainer.fit()[-1]["clean_loss"]
    assert after < 0.6 * before, (before, after)


def test_plugins_compose_and_pixel_site() -> None:
    task = TinyTask()
    cfg = TrainConfig(steps=2, batch_size=8, eval_every=2, progress=False)
    hist = Trainer(task, cfg, plugins=[EntropyRegularizer(0.01), FGM(0.1)]).fit()
    assert len(hist) == 1
    # pixels: PGD in pixel space stays in the ball and in [0, 1]
    m = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x, y = torch.rand(6, 1, 4, 4), torch.randint(0, 3, (6,))
    adv = pgd_pixels(m, x, y, epsilon=0.1, steps=5)
    assert (
        float((adv - x).abs().max()) <= 0.1 + 1e-6
        and 0 <= float(adv.min()) <= float(adv.max()) <= 1
    )
    assert F.cross_entropy(m(adv), y) > F.cross_entropy(m(x), y)


# ---------------------------------------------------------------------------------------
# bad settings


def test_bad_settings_name_the_argument() -> None:
    check_and_control(lambda: FGM(-0.1), lambda: FGM(0.1), ValueError, "epsilon")
    check_and_control(lambda: PGD(0.1, steps=0), lambda: PGD(0.1, steps=1), ValueError, "steps")
    check_and_control(lambda: FreeLB(0.1, norm="l3"), lambda: FreeLB(0.1), ValueError, "norm")
    check_and_control(  # its first loss was taken outside the epsilon ball
        lambda: FreeLB(0.1, init_epsilon=1.0),
        lambda: FreeLB(0.1, init_epsilon=0.1),
        ValueError,
        r"init_epsilon must be at most epsilon=0.1",
    )
    lin = nn.Sequential(nn.Linear(3, 2))
    check_and_control(
        lambda: find_embedding(lin), lambda: find_embedding(Tiny()), TypeError, "embedding"
    )
    cfg = TrainConfig(steps=1, progress=False)
    check_and_control(
        lambda: Trainer(TinyTask(8), cfg, plugins=[object()]),  # type: ignore[list-item]
        lambda: Trainer(TinyTask(8), cfg, plugins=[FGM(0.1)]),
        TypeError,
        "plugins",
    )
    check_and_control(
        lambda: CharEditAttack(-1, "ab"), lambda: CharEditAttack(0, "ab"), ValueError, "budget"
    )
    check_and_control(
        lambda: override_attention("pool", lambda w, i: w).__enter__(),  # type: ignore[arg-type]
        lambda: uniform_attention(AttentionPooling(2)).__enter__(),
        TypeError,
        "module",
    )


# ---------------------------------------------------------------------------------------
# attacks within budget, faithfulness within tolerance


def _damerau(a: str, b: str) -> int:
    """Damerau-Levenshtein distance (drops, inserts, substitutions, adjacent swaps; an
    edited substring may be edited again), Lowrance & Wagner's algorithm."""
    big = len(a) + len(b)
    d = [[big] * (len(b) + 2) for _ in range(len(a) + 2)]
    for i in range(len(a) + 1):
        d[i + 1][1] = i
    for j in range(len(b) + 1):
        d[1][j + 1] = j
    last: dict[str, int] = {}
    for i in range(1, len(a) + 1):
        db = 0
        for j in range(1, len(b) + 1):
            k, m = last.get(b[j - 1], 0), db
            cost = int(a[i - 1] != b[j - 1])
            if not cost:
                db = j
            d[i + 1][j + 1] = min(
                d[i][j] + cost,
                d[i + 1][j] + 1,
                d[i][j + 1] + 1,
                d[k][m] + (i - k - 1) + 1 + (j - m - 1),
            )
        last[a[i - 1]] = i
    return d[len(a) + 1][len(b) + 1]


@pytest.mark.parametrize("budget", [1, 2])
def test_char_attack_never_exceeds_its_budget(budget: int) -> None:
    rng = random.Random(0)
    texts = [
        " ".join("".join(rng.choice("abc12.") for _ in range(rng.randint(1, 5))) for _ in range(3))
        for _ in range(30)
    ]
    score = lambda i, ts: torch.tensor([float(zlib.crc32(t.encode()) % 1000) for t in ts])  # noqa: E731
    wrong = lambda i, ts: [t.count("z") > 3 for t in ts]  # noqa: E731  never: every edit spent
    att = CharEditAttack(budget, "xyz", protect=str.isdigit, max_candidates=20)
    for text, r in zip(texts, att.attack(texts, score, wrong), strict=True):
        before, after = text.split(" "), r.text.split(" ")
        assert len(before) == len(after)
        for w0, w1, used in zip(before, after, r.edits, strict=True):
            assert used <= budget and _damerau(w0, w1) <= used
            assert [c for c in w0 if c.isdigit()] == [c for c in w1 if c.isdigit()]
    assert any(sum(r.edits) > 0 for r in att.attack(texts, score, wrong))
    assert _damerau("abcd", "bacd") == 1 and _damerau("b.a.", "b..za") == 2
    assert _damerau("abcd", "dcba") == 3  # the checker can fail
    assert "2111" not in word_edits("21.11", str.isdigit, "x")


def _pooling_model() -> tuple[nn.Module, AttentionPooling, Tensor, Tensor]:
    torch.manual_seed(1)
    pool, head = AttentionPooling(6), nn.Linear(6, 3)
    model = nn.ModuleDict({"pool": pool, "head": head})
    h = torch.randn(10, 7, 6)
    keep = torch.ones(10, 7, dtype=torch.bool)
    keep[:, 5:] = False
    return model, pool, h, keep


@pytest.mark.parametrize("tolerance", [0.01, 0.05])
def test_adversarial_attention_keeps_the_output_within_tolerance(tolerance: float) -> None:
    model, pool, h, keep = _pooling_model()
    run = lambda m: m["head"](m["pool"](h, keep)[0])  # noqa: E731
    r = adversarial_attention(model, pool, run, tolerance=tolerance, steps=60)
    base = run(model).softmax(-1)
    with torch.no_grad(), override_attention(pool, lambda w, i: r.weights[:, i]):
        moved = tvd(run(model).softmax(-1), base)  # recomputed independently
    assert bool((moved <= tolerance + 1e-6).all())
    torch.testing.assert_close(jsd(r.weights[:, 0], r.original[:, 0]), r.jsd)
    assert float(r.jsd.max()) > 0.05  # it found different attention
    assert bool((r.weights[:, 0, 5:] == 0).all())  # padding stays unattended
    perm = permutation_test(model, pool, run, permutations=5)
    assert perm["median_tvd"].shape == (10,) and float(perm["median_tvd"].max()) > 0


# ---------------------------------------------------------------------------------------
# the command


def test_robust_command_rejects_bad_input_before_any_work(tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "r"
    assert main(["robust", "vision", "--method", "plain,magic", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--method" in err and "magic" in err
    assert main(["robust", "dates", "--steps", "0", "--out", str(out)]) == 2
    assert "--steps" in capsys.readouterr().err
    assert not out.exists()


def test_robust_command_writes_table_and_report(tmp_path: Path) -> None:
    out = tmp_path / "r"
    assert main(["robust", "shortcut", "--smoke", "--method", "supervised", "--out", str(out)]) == 0
    table = json.loads((out / "table.json").read_text())
    assert [r["method"] for r in table["rows"]] == ["supervised"]
    assert table["rows"][0]["metrics"]["attn_deciding"] > 50  # supervision moved the attention
    html = (out / "report.html").read_text()
    assert "supervised" in html and "http" not in html.replace("http-equiv", "")
    assert "data:image/png;base64," in html  # the chart, inlined
    assert (out / "table.md").read_text().startswith("# A shortcut cue")
    assert "<pre>| method |" in html and "&lt;pre&gt;" not in html  # the tag was escaped


@pytest.mark.parametrize(
    ("task", "method", "column"),
    [
        ("vision", "fgm", "pgd@0.1"),
        ("dates", "edits", "edits=1"),
        ("faithfulness", "dates", "adv_jsd_median"),
    ],
)
def test_every_study_runs_as_a_smoke(
    tmp_path: Path, task: str, method: str, column: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--seed`` reaches every study's training (faithfulness ignored it: two seeds gave
    one table)."""
    import attnlab.train.loop as loop

    seeds: list[int] = []
    real = loop.Trainer.__init__

    def init(self: Any, task_: Any, cfg: Any, *a: Any, **kw: Any) -> None:
        seeds.append(cfg.seed)
        real(self, task_, cfg, *a, **kw)

    monkeypatch.setattr(loop.Trainer, "__init__", init)
    out = tmp_path / task
    argv = ["robust", task, "--smoke", "--method", method, "--seed", "3", "--out", str(out)]
    assert main(argv) == 0
    rows = json.loads((out / "table.json").read_text())["rows"]
    assert [r["method"] for r in rows] == [method] and column in rows[0]["metrics"]
    assert seeds and set(seeds) == {3}, seeds


class _TinyTransformer(nn.Module):
    """A 2-layer encoder classifier (mean-pooled), for the faithfulness tests on
    multi-head attention."""

    def __init__(self) -> None:
        super().__init__()
        from attnlab.nn import Encoder, EncoderLayer, LayerConfig

        self.encoder = Encoder(EncoderLayer(LayerConfig(16, 2, 32, dropout=0.0)), 2)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(1))  # (B, 3)


def test_faithfulness_on_multi_head_attention() -> None:
    from attnlab.interpret import capture
    from attnlab.robust import adversarial_attention, override_attention, permutation_test

    torch.manual_seed(0)
    model, x = _TinyTransformer().eval(), torch.randn(3, 6, 16)
    site = model.encoder.layers[1].self_attn
    run = lambda m: m(x)  # noqa: E731
    seen: list[tuple[int, ...]] = []

    def keep(w: torch.Tensor, i: int) -> torch.Tensor:
        seen.append((i, *w.shape))
        return w

    with torch.no_grad():
        plain = model(x)
        with override_attention(site, keep):  # the identity: same logits, one call seen
            same = model(x)
        with capture(model) as cap:
            model(x)
        with override_attention(site, lambda w, i: torch.full_like(w, 1 / 6)):
            uniform = model(x)
    assert torch.allclose(plain, same, atol=1e-5) and seen == [(0, 3, 2, 6, 6)]
    assert not torch.allclose(plain, uniform, atol=1e-3)  # the intervention reaches the logits
    assert torch.allclose(cap.weights("encoder.layers.1.self_attn")[0].sum(-1), torch.ones(3, 2, 6))
    found = adversarial_attention(model, site, run, tolerance=0.02, steps=15)
    assert found.weights.shape == (3, 1, 2, 6, 6)
    assert bool((found.tvd <= 0.02).all()) and bool((found.jsd >= 0).all())
    assert torch.allclose(found.weights.sum(-1), torch.ones(3, 1, 2, 6), atol=1e-5)
    with torch.no_grad(), override_attention(site, lambda w, i: found.weights[:, i]):
        moved = (model(x).softmax(-1) - plain.softmax(-1)).abs().sum(-1) / 2  # TVD
    assert torch.allclose(moved, found.tvd, atol=1e-5)  # the reported shift is the real one
    shuffled = permutation_test(model, site, run, permutations=3)
    assert shuffled["median_tvd"].shape == (3,) and bool((shuffled["median_tvd"] > 0).all())


def test_adversarial_edits_train_on_the_hardest_version() -> None:
    from attnlab.robust.study_dates import AdversarialEditsTask, _log_prob, _sources

    torch.manual_seed(0)
    task = AdversarialEditsTask(train_size=40, test_size=4, locales=("fr_FR",), k=5)
    model = task.build_model().eval()
    batch = task.batch(torch.arange(6))
    assert len(batch.texts) == 5 and all(len(t) == 6 for t in batch.texts)
    for versions, e in zip(zip(*batch.texts, strict=True), batch.examples, strict=True):
        digits = [c for c in e.text if c.isdigit()]
        assert all([c for c in v if c.isdigit()] == digits for v in versions)  # answer kept
    scores = torch.stack([_log_prob(model, _sources(task, batch.examples, t)) for t in batch.texts])
    worst = [batch.texts[j][i] for i, j in enumerate(scores.argmin(0).tolist())]
    want = super(AdversarialEditsTask, task).loss(model, _sources(task, batch.examples, worst))
    assert torch.allclose(task.loss(model, batch), want)
    best = [batch.texts[j][i] for i, j in enumerate(scores.argmax(0).tolist())]
    easier = super(AdversarialEditsTask, task).loss(model, _sources(task, batch.examples, best))
    assert bool(want >= easier)  # the chosen versions are the hard ones
    check_and_control(
        lambda: AdversarialEditsTask(train_size=8, test_size=2, locales=("fr_FR",), k=0),
        lambda: AdversarialEditsTask(train_size=8, test_size=2, locales=("fr_FR",), k=1),
        ValueError,
        "k must be",
    )
