"""Adversarial training and attention regularizers against their formulas, unrolled here
in float64: each closes a gap a mutation audit found (the code could ascend instead of
descend, drop a term, ignore an option, and only "the loss goes down" tests ran).

SMART (Jiang et al. 2020): noise start, one sign-ascent step on the symmetric KL,
projection. PGD's ``clean=True`` adds the clean loss. FreeLB's ``norm="linf"`` steps along
the gradient's sign. An input-site perturbation stays inside its ``bounds``. The entropy
regularizer's ``target`` and ``layers=``, the supervised-attention ``weight``; Jain &
Wallace's permutation test shuffles only real positions.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.interpret import capture
from attnlab.nn import MultiHeadAttention


class Tiny(nn.Module):
    """Embeddings, tanh, mean over the length, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.tanh(self.embed(ids)).mean(1))


class Att(nn.Module):
    """Embeddings and one or two residual attention layers ``a`` (and ``b``)."""

    def __init__(self, layers: int = 1) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(6, 8), nn.Linear(8, 2)
        self.a = MultiHeadAttention(8, 2)
        self.b = MultiHeadAttention(8, 2) if layers == 2 else None

    def forward(self, ids: Tensor) -> Tensor:
        x = self.embed(ids)
        x = x + self.a(x)
        if self.b is not None:
            x = x + self.b(x)
        return self.head(x.mean(1))


def _tiny_batch() -> tuple[Tiny, Tensor, Tensor]:
    torch.manual_seed(0)
    return Tiny().double(), torch.randint(0, 10, (6, 5)), torch.randint(0, 3, (6,))


def _att_batch(layers: int = 1) -> tuple[Att, Tensor, Tensor]:
    torch.manual_seed(0)
    return Att(layers).double(), torch.tensor([[1, 2, 3], [4, 5, 1]]), torch.tensor([0, 1])


def _sym_kl(p: Tensor, q: Tensor) -> Tensor:
    lp, lq = F.log_softmax(p, -1), F.log_softmax(q, -1)
    kl = F.kl_div(lq, lp, log_target=True, reduction="none").sum(-1)
    return (kl + F.kl_div(lp, lq, log_target=True, reduction="none").sum(-1)).mean()


def _entropy(w: Tensor) -> Tensor:
    """Mean entropy per head ``(H,)`` of weights ``(B, H, L, L)``."""
    return -(w * w.clamp_min(1e-300).log()).sum(-1).mean((0, 2))


def test_smart_equals_its_unrolled_formula() -> None:
    from attnlab.robust import SMART

    model, ids, y = _tiny_batch()
    eps, noise = 0.3, 0.05
    emb = model.embed(ids).detach()

    def logits(delta: Tensor) -> Tensor:
        return model.head(torch.tanh(model.embed(ids) + delta).mean(1))

    def loss_fn(m: nn.Module, b: Tensor) -> Tensor:
        return F.cross_entropy(m(b), y)

    torch.manual_seed(5)
    d0 = (torch.randn_like(emb) * noise).requires_grad_(True)
    clean = logits(torch.zeros_like(emb))
    (g,) = torch.autograd.grad(_sym_kl(logits(d0), clean.detach()), d0)
    d1 = (d0.detach() + eps * g.sign()).clamp(-eps, eps)
    term = float(_sym_kl(logits(d1), clean).detach())
    want = float(loss_fn(model, ids)) + term
    torch.manual_seed(5)
    got = float(SMART(lambda m, b: m(b), epsilon=eps, noise=noise).step(model, ids, loss_fn))
    assert term > 1e-4, term  # the smoothness term is not 0
    assert abs(got - want) < 1e-9 * term  # float64 logits: its symmetric KL in float64


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_symmetric_kl_keeps_float64_and_widens_half(dtype: torch.dtype) -> None:
    """SMART's regime, a small perturbation: float64 logits were cast to float32 (rel err
    1.2e-4 against the fp64 formula); now within 2x of the formula's error on the same
    (rounded) logits in float32 at least."""
    from attnlab.robust import symmetric_kl

    torch.manual_seed(0)
    p = torch.randn(64, 10, dtype=torch.float64) * 3
    q = p + 1e-2 * torch.randn_like(p)
    want = float(_sym_kl(p, q))
    got = symmetric_kl(p.to(dtype), q.to(dtype))
    wide = torch.promote_types(dtype, torch.float32)
    plain = float(_sym_kl(p.to(dtype).to(wide), q.to(dtype).to(wide)))
    assert got.dtype == wide
    # + a float64 floor of 1e-14: the fp64 formula is itself 2e-15 to 4e-15 off the exact
    # value (mpmath, 50 digits) by CPU (AVX2 / AVX-512), attnlab's 6e-16 to 3e-15, and the
    # float64 case's plain error is 0 (the same formula): 1e-15 failed under AVX2 (4.1e-20)
    assert abs(float(got) - want) <= 2 * abs(plain - want) + 1e-14 * want


def test_pgd_clean_adds_the_clean_loss() -> None:
    from attnlab.robust import PGD

    model, ids, y = _tiny_batch()

    def loss_fn(m: nn.Module, b: Tensor) -> Tensor:
        return F.cross_entropy(m(b), y)

    adv = PGD(0.3, steps=2, random_start=False).step(model, ids, loss_fn)
    both = PGD(0.3, steps=2, random_start=False, clean=True).step(model, ids, loss_fn)
    assert float(both - adv) == pytest.approx(float(loss_fn(model, ids)), rel=1e-9)


def test_freelb_linf_steps_along_the_sign_and_projects() -> None:
    from attnlab.robust import FreeLB

    model, ids, y = _tiny_batch()
    emb = model.embed(ids).detach()

    def loss_at(delta: Tensor) -> Tensor:
        return F.cross_entropy(model.head(torch.tanh(model.embed(ids) + delta).mean(1)), y)

    eps, alpha = 0.2, 0.15
    d = torch.zeros_like(emb, requires_grad=True)
    first = loss_at(d) / 2
    (g,) = torch.autograd.grad(first, d)
    want = float(first) + float(loss_at((alpha * g.sign()).clamp(-eps, eps)) / 2)
    got = FreeLB(eps, steps=2, alpha=alpha, init_epsilon=0, norm="linf").step(
        model, ids, lambda m, b: F.cross_entropy(m(b), y)
    )
    assert float(got) == pytest.approx(want, rel=1e-9)


def test_an_input_site_perturbation_stays_inside_its_bounds() -> None:
    from attnlab.robust import FGM

    torch.manual_seed(0)
    lin = nn.Linear(4, 2).double()
    seen: list[Tensor] = []
    lin.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    model = nn.Sequential(nn.Flatten(), lin)
    x, y = torch.rand(5, 1, 2, 2, dtype=torch.float64), torch.tensor([0, 1, 0, 1, 1])
    attack = FGM(0.5, norm="linf", site="input", bounds=(0, 1), embedding="0")
    attack.step(model, x, lambda m, b: F.cross_entropy(m(b), y))
    assert len(seen) == 2  # the clean pass, then the perturbed one
    assert float(seen[1].min()) >= 0 and float(seen[1].max()) <= 1
    assert float((seen[1] - seen[0]).abs().max()) > 0.1  # it did move


@pytest.mark.parametrize("target", [None, 0.3])
def test_the_entropy_regularizer_uses_its_target_and_only_its_layers(target: float | None) -> None:
    from attnlab.robust import EntropyRegularizer

    model, ids, y = _att_batch(layers=2)

    def loss(m: nn.Module, b: Tensor) -> Tensor:
        return F.cross_entropy(m(b), y)

    with capture(model, grad=True) as cap:
        base = loss(model, ids)
    ent = _entropy(cap.weights("a")[0].double())  # layer b is not named
    term = -ent.mean() if target is None else ((ent - target) ** 2).mean()
    got = EntropyRegularizer(0.1, target=target, layers=["a"]).step(model, ids, loss)
    assert float(got) == pytest.approx(float(base + 0.1 * term), rel=1e-9)


def test_a_0_dim_target_is_one_number_over_layers_of_different_heads() -> None:
    """A 2-head layer (uniform over 4 keys: entropy log 4) and a 1-head pooling (uniform
    over 2: log 2); the 0-dim target was expanded to the first layer's 2 heads."""
    from attnlab.robust import entropy_term

    f64 = torch.float64
    w = [torch.full((1, 2, 3, 4), 0.25, dtype=f64), torch.full((1, 1, 1, 2), 0.5, dtype=f64)]
    by_hand = (2 * (math.log(4) - 1.0) ** 2 + (math.log(2) - 1.0) ** 2) / 3
    for target in (1.0, torch.tensor(1.0, dtype=f64)):
        got = entropy_term(w, target)
        assert float(got) == pytest.approx(by_hand, rel=1e-12)


def test_supervised_attention_adds_its_weight_times_the_cross_entropy() -> None:
    from attnlab.robust import SupervisedAttention

    model, ids, y = _att_batch()

    def loss(m: nn.Module, b: Tensor) -> Tensor:
        return F.cross_entropy(m(b), y)

    target = torch.eye(3, dtype=torch.float64).expand(2, 3, 3)  # attend to yourself
    with capture(model, grad=True) as cap:
        base = loss(model, ids)
    w = cap.weights("a")[0].double()  # (B, H, L, L)
    ce = -(target[:, None] * torch.log(w + 1e-9)).sum(-1).mean()
    got = SupervisedAttention("a", lambda b: target, weight=0.25).step(model, ids, loss)
    assert float(got) == pytest.approx(float(base + 0.25 * ce), rel=1e-9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_supervised_attention_with_a_masked_key_is_finite_in_low_precision(
    dtype: torch.dtype,
) -> None:
    """A masked key (weight 0) beside a one-hot target: in float16 ``1e-9`` rounded to 0
    and ``0 * log 0`` gave NaN; the fp64 formula gives log 2."""
    from attnlab.robust import supervised_attention_term

    w, t = torch.tensor([[0.5, 0.5, 0.0]]), torch.tensor([[1.0, 0.0, 0.0]])
    ref = -(t.double() * torch.log(w.double() + 1e-9)).sum()
    got = supervised_attention_term(w.to(dtype), t)
    assert got.dtype == dtype
    assert float(got) == pytest.approx(float(ref), abs=torch.finfo(dtype).eps)


def test_supervised_attention_gradient_in_float16_follows_float64() -> None:
    """Targets on keys whose float16 weight rounds to 0 (scores 20 and 30 below the top):
    the float32 ``-t / (w + 1e-9)`` was -1e9, -inf once cast back to float16, then
    softmax's backward ``0 * inf`` NaN. The gradient of the scores is bounded by 1; here
    it is compared with the fp64 formula with ``eps`` at float16's smallest normal."""
    from attnlab.robust import supervised_attention_term

    scores = torch.tensor([[0.0, 20.0, 0.0, 0.0], [30.0, 0.0, 1.0, 2.0], [0.0, 3.0, 1.0, 0.5]])
    target = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.5, 0.0, 0.5, 0.0]])
    eps = torch.finfo(torch.float16).tiny
    s64 = scores.double().requires_grad_(True)
    w64 = torch.softmax(s64, -1)
    (-(target.double() * torch.log(w64 + eps)).sum(-1).mean()).backward()
    s16 = scores.half().requires_grad_(True)
    supervised_attention_term(torch.softmax(s16, -1), target.half()).backward()
    assert s16.grad is not None and s64.grad is not None
    assert torch.isfinite(s16.grad).all(), s16.grad
    torch.testing.assert_close(s16.grad.double(), s64.grad, atol=2e-3, rtol=0)


@pytest.mark.parametrize("lk", [1024, 4096])
def test_attention_entropy_in_float16_is_within_2x_plain_torch(lk: int) -> None:
    """Long float16 rows hold weights below float16's smallest normal (6.1e-5); the clamp
    at that floor scored them as ``w log 6.1e-5``: 4x (Lk 1024) to 15x (Lk 4096) plain
    PyTorch's float16 ``xlogy`` error against fp64 of the same rounded rows."""
    from attnlab.robust import attention_entropy

    torch.manual_seed(0)
    w = torch.softmax(torch.randn(16, lk, dtype=torch.float64) * 3, -1).half()
    ref = -torch.special.xlogy(w.double(), w.double()).sum(-1)
    plain = float((-torch.special.xlogy(w, w).sum(-1).double() - ref).abs().max())
    got = attention_entropy(w)
    assert got.dtype == torch.float16
    err = float((got.double() - ref).abs().max())
    assert err <= 2 * plain, f"error {err:.3g}, plain float16 torch {plain:.3g}"


def test_the_permutation_test_shuffles_only_real_positions() -> None:
    """Every real position holds the same vector, so any shuffle among them leaves the
    output as it was (TVD 0); a shuffle that moved weight onto padding would not."""
    from attnlab.nn import AttentionPooling
    from attnlab.robust import permutation_test

    torch.manual_seed(1)
    pool, head = AttentionPooling(6), nn.Linear(6, 3)
    h = torch.randn(10, 7, 6)
    h[:, :5] = torch.randn(6)  # real positions, all alike
    keep = torch.ones(10, 7, dtype=torch.bool)
    keep[:, 5:] = False
    model = nn.ModuleDict({"pool": pool, "head": head})
    r = permutation_test(model, pool, lambda m: head(pool(h, keep)[0]), permutations=8)
    assert float(r["median_tvd"].max()) < 1e-6, r["median_tvd"]
