"""Generative attention: SAGAN's pieces against directly written formulas, the Fréchet
distance against an independent eigenvalue computation, tiny trainings whose loss goes
down, and clear errors for bad settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from attnlab.models.gan import (
    GAN,
    Discriminator,
    GANConfig,
    SelfAttention2d,
    d_hinge_loss,
    g_hinge_loss,
    sn,
)
from attnlab.models.vae import VAE, VAEConfig, VAEOutput, vae_loss
from attnlab.tasks.generative import class_coverage, digits, frechet_distance
from attnlab.tasks.generative_task import gan_losses, train_gan, train_vae

from .conftest import check_and_control


def test_hinge_losses_match_formulas() -> None:
    real, fake = torch.randn(37), torch.randn(41)
    d_want = (
        sum(max(0.0, 1 - r) for r in real.tolist()) / 37
        + sum(max(0.0, 1 + f) for f in fake.tolist()) / 41
    )
    g_want = -sum(fake.tolist()) / 41
    torch.testing.assert_close(float(d_hinge_loss(real, fake)), d_want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(float(g_hinge_loss(fake)), g_want, rtol=1e-6, atol=1e-6)


def test_hinge_losses_refuse_an_empty_batch() -> None:
    """(A mean over no logit: d_hinge_loss and g_hinge_loss returned NaN.)"""
    one, none = torch.tensor([0.5]), torch.zeros(0)
    check_and_control(
        lambda: d_hinge_loss(none, one),
        lambda: d_hinge_loss(one, one),
        ValueError,
        r"real_logits must hold at least 1 logit, got shape \(0,\)",
    )
    with pytest.raises(ValueError, match=r"fake_logits must hold at least 1 logit"):
        d_hinge_loss(one, none)
    check_and_control(
        lambda: g_hinge_loss(none),
        lambda: g_hinge_loss(one),
        ValueError,
        r"fake_logits must hold at least 1 logit, got shape \(0,\)",
    )
    with pytest.raises(TypeError, match="fake_logits must be a floating-point tensor"):
        g_hinge_loss(torch.tensor([1, 2]))
    assert float(d_hinge_loss(one, one)) == pytest.approx(0.5 + 1.5)  # by hand


def _weight(module: nn.Module) -> torch.Tensor:
    """The (possibly parametrized) weight of ``module``, ``(out, in, ...)``."""
    w = module.weight
    assert isinstance(w, torch.Tensor)
    return w


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_spectral_norm_gives_unit_largest_singular_value(kind: str) -> None:
    # seeded here: power iteration's speed depends on the weight's spectrum, and modules
    # built at collection time drew whatever the random state was (a 1.0011 run failed)
    torch.manual_seed(0)
    module = nn.Linear(12, 7) if kind == "linear" else nn.Conv2d(3, 5, 3)
    with torch.no_grad():
        _weight(module).mul_(5.0)
    raw = torch.linalg.svdvals(_weight(module).detach().flatten(1))[0]
    assert raw > 1.5  # positive control: the raw weight is far from unit norm
    m = sn(module)
    for _ in range(100):  # power iteration: one step per training forward
        m(torch.randn(2, 12) if isinstance(m, nn.Linear) else torch.randn(2, 3, 6, 6))
    m.eval()
    sigma = torch.linalg.svdvals(_weight(m).detach().flatten(1))[0]
    assert abs(float(sigma) - 1.0) < 1e-3
    assert not hasattr(sn(nn.Linear(3, 3), enabled=False), "parametrizations")  # disabled


def _direct_attention(att: SelfAttention2d, x: torch.Tensor) -> torch.Tensor:
    """``x + gamma * W_o concat_h(softmax(q_h^T k_h) v_h)`` written per image with matrices."""
    b, c, h, w = x.shape
    wq, wk = _weight(att.query)[:, :, 0, 0], _weight(att.key)[:, :, 0, 0]  # (H*E, C)
    wv, wo = _weight(att.value)[:, :, 0, 0], _weight(att.out)[:, :, 0, 0]  # (C, C)
    hh, e, ev = att.heads, att.key_dim, c // att.heads
    outs = []
    for i in range(b):
        xi = x[i].reshape(c, h * w)  # (C, L)
        q, k, v = wq @ xi, wk @ xi, wv @ xi
        heads = []
        for j in range(hh):
            qj, kj = q[j * e : (j + 1) * e], k[j * e : (j + 1) * e]  # (E, L)
            p = torch.softmax(qj.T @ kj, dim=-1)  # (L, L): row = query position
            heads.append(v[j * ev : (j + 1) * ev] @ p.T)  # (Ev, L)
        outs.append(xi + att.gamma * (wo @ torch.cat(heads)))
    return torch.stack(outs).view(b, c, h, w)


def test_self_attention_matches_direct_softmax_qkv_in_fp64() -> None:
    att = SelfAttention2d(8, heads=2, key_dim=3, spectral=False).double()
    x = torch.randn(3, 8, 4, 5, dtype=torch.float64)
    with torch.no_grad():
        att.gamma.fill_(0.7)
    torch.testing.assert_close(att(x), _direct_attention(att, x), rtol=1e-10, atol=1e-10)
    assert (att(x) - x).abs().max() > 1e-3  # gamma != 0 changes the input
    w = att.weights(x)  # (B, H, L, L)
    torch.testing.assert_close(w.sum(-1), torch.ones(3, 2, 20, dtype=torch.float64))


def test_self_attention_is_identity_when_gamma_is_zero() -> None:
    att = SelfAttention2d(16, heads=2)
    x = torch.randn(2, 16, 8, 8)
    assert torch.equal(att(x), x)
    with torch.no_grad():
        att.gamma.fill_(1.0)
    assert not torch.equal(att(x), x)  # positive control


def _frechet_eig(a: np.ndarray, b: np.ndarray) -> float:
    """Independent route: ``tr sqrtm(S_a S_b) = sum sqrt(eig(A^1/2 S_b A^1/2))``."""
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    vals, vecs = np.linalg.eigh(sa)
    root_a = vecs @ np.diag(np.sqrt(np.clip(vals, 0, None))) @ vecs.T
    mid = np.linalg.eigvalsh(root_a @ sb @ root_a)
    mean = ((a.mean(0) - b.mean(0)) ** 2).sum()
    return float(mean + np.trace(sa) + np.trace(sb) - 2 * np.sqrt(np.clip(mid, 0, None)).sum())


def test_frechet_distance_against_eigenvalue_route() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 6))
    b = rng.normal(size=(150, 6)) @ rng.normal(size=(6, 6)) * 0.5 + 0.3
    want = _frechet_eig(a, b)
    assert want > 1.0
    assert abs(frechet_distance(a, b) - want) < 1e-6 * max(1.0, want)
    assert abs(frechet_distance(torch.tensor(a), torch.tensor(a))) < 1e-6
    # a pure shift of the mean by s costs exactly ||s||^2
    assert abs(frechet_distance(a, a + 2.0) - 4.0 * 6) < 1e-6
    x, y = a[:, :1], b[:, :1]  # one feature (np.cov gave 0-d arrays: a matmul error)
    want1 = (x.mean() - y.mean()) ** 2 + (x.std(ddof=1) - y.std(ddof=1)) ** 2
    assert abs(frechet_distance(x, y) - want1) < 1e-9 * max(1.0, want1)


def test_class_coverage_definition() -> None:
    pred = torch.tensor([0] * 50 + [1] * 45 + [2] * 5)  # 3 classes at >= 5%
    assert class_coverage(pred) == 0.3
    assert class_coverage(torch.arange(10).repeat(10)) == 1.0
    assert class_coverage(torch.tensor([0] * 96 + [1] * 4)) == 0.1  # 4% does not count


def test_class_coverage_checks_its_arguments() -> None:
    """Ids past ``classes`` grew bincount: [0, 1, 11] of 10 classes scored 2 of 12 (0.25),
    [5] * 10 of 2 classes 1/6 with no class of 2 predicted; threshold="0.1" failed
    comparing a str."""
    ok = lambda: class_coverage(torch.tensor([0, 1, 9]), classes=10)  # noqa: E731
    check_and_control(
        lambda: class_coverage(torch.tensor([0, 1, 11]), classes=10),
        ok,
        ValueError,
        r"pred must hold class ids in \[0, 10\) \(classes=10\), got ids from 0 to 11",
    )
    check_and_control(
        lambda: class_coverage(torch.tensor([5] * 10), classes=2),
        lambda: class_coverage(torch.tensor([1] * 10), classes=2),
        ValueError,
        r"in \[0, 2\) \(classes=2\), got ids from 5 to 5",
    )
    check_and_control(
        lambda: class_coverage(torch.tensor([-1, 0]), classes=2), ok, ValueError, "from -1 to 0"
    )
    check_and_control(
        lambda: class_coverage(torch.tensor([0, 1]), 10, "0.1"),  # type: ignore[arg-type]
        ok,
        TypeError,
        "threshold must be a number, got str '0.1'",
    )
    check_and_control(
        lambda: class_coverage(torch.tensor([0, 1]), 10, 1.5), ok, ValueError, "threshold"
    )
    assert ok() == 0.3 and class_coverage(torch.tensor([], dtype=torch.long)) == 0.0


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_frechet_distance_names_non_finite_features(bad: float) -> None:
    """sqrtm failed with 'Internal error in scipy.linalg.sqrtm: -102' (or returned NaN)."""
    a = np.random.default_rng(0).normal(size=(20, 3))
    b = a.copy()
    b[0, 0] = bad
    check_and_control(
        lambda: frechet_distance(a, b),
        lambda: frechet_distance(a, a + 1),
        ValueError,
        "fake must be finite features, got 1 NaN or inf of 60",
    )
    with pytest.raises(ValueError, match="real must be finite"):
        frechet_distance(torch.tensor(b), a)


def test_train_gan_checks_its_learning_rates() -> None:
    """lr_d=0 divided by zero, lr_g=0 named g_lr_scale, lr_g="1e-4" failed dividing a str."""
    x, cfg = digits(16)[0], GANConfig(latent_dim=4, channels=8)
    ok = lambda: train_gan(cfg, x, steps=1, batch_size=4, lr_g=2e-4, lr_d=1e-3)  # noqa: E731
    for kw, exc, match in [
        ({"lr_d": 0.0}, ValueError, "lr_d must be a finite number > 0, got 0.0"),
        ({"lr_d": float("nan")}, ValueError, "lr_d must be a finite number > 0, got nan"),
        ({"lr_g": 0.0}, ValueError, "lr_g must be a finite number > 0, got 0.0"),
        ({"lr_g": -1e-4}, ValueError, "lr_g must be a finite number > 0"),
        ({"lr_g": "1e-4"}, TypeError, "lr_g must be a number, got str '1e-4'"),
    ]:
        check_and_control(lambda k=kw: train_gan(cfg, x, steps=1, **k), ok, exc, match)  # type: ignore[arg-type]
    assert len(ok().losses) == 1


@pytest.mark.parametrize("attention", [True, False])
def test_gan_trains_discriminator_loss_goes_down(attention: bool) -> None:
    """The discriminator's hinge loss on a fixed batch of real images and latents."""
    x = digits(300)[0]
    cfg = GANConfig(latent_dim=8, channels=8, attention=attention)
    real, z = x[:64], torch.randn(64, 8)
    with torch.no_grad():
        first = float(gan_losses(GAN(cfg).eval(), real, z)[0])
    r = train_gan(cfg, x, steps=30, batch_size=32, seed=0)
    assert isinstance(r.model, GAN) and len(r.losses) == 30
    with torch.no_grad():
        last = float(gan_losses(r.model.eval(), real, z)[0])
    assert first > 1.5  # an untrained discriminator sits near the hinge loss of 2
    assert last < 0.75 * first
    assert r.model.sample(4).abs().max() <= 1.0


@pytest.mark.parametrize("attention", [True, False])
def test_vae_trains_loss_goes_down(attention: bool) -> None:
    x = digits(300)[0]
    r = train_vae(VAEConfig(latent_dim=4, channels=8, attention=attention), x, steps=40)
    assert np.mean(r.losses[-5:]) < 0.8 * np.mean(r.losses[:5])
    vae = r.model
    assert isinstance(vae, VAE)
    out = vae(x[:8])
    loss, rec, kl = vae_loss(out, x[:8], vae.cfg.sigma)
    torch.testing.assert_close(loss, rec + kl)
    want_rec = ((x[:8] - out.recon) ** 2).sum() / (2 * vae.cfg.sigma**2) / 8
    torch.testing.assert_close(rec, want_rec)


def test_vae_kl_matches_closed_form_per_dimension() -> None:
    mu, logvar = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    out = VAEOutput(torch.zeros(3, 1, 8, 8, dtype=torch.float64), mu, logvar)
    var = logvar.exp()
    want = (0.5 * (var + mu**2 - 1 - torch.log(var))).sum() / 3  # KL(N(mu, var) || N(0, 1))
    torch.testing.assert_close(vae_loss(out, out.recon, 1.0)[2], want)


def test_bad_settings_name_the_argument() -> None:
    check_and_control(
        lambda: GANConfig(channels=0), lambda: GANConfig(channels=8), ValueError, "channels"
    )
    check_and_control(
        lambda: GANConfig(latent_dim=2.5),  # type: ignore[arg-type]
        lambda: GANConfig(latent_dim=2),
        TypeError,
        "latent_dim",
    )
    check_and_control(lambda: VAEConfig(heads=-1), lambda: VAEConfig(heads=2), ValueError, "heads")
    check_and_control(
        lambda: VAEConfig(sigma=0.0), lambda: VAEConfig(sigma=0.1), ValueError, "sigma"
    )
    d = Discriminator(GANConfig(channels=8))
    check_and_control(
        lambda: d(torch.zeros(2, 1, 7, 7)), lambda: d(torch.zeros(2, 1, 8, 8)), ValueError, "images"
    )
    vae = VAE(VAEConfig(latent_dim=4, channels=8))
    check_and_control(
        lambda: vae.decode(torch.zeros(2, 5)),
        lambda: vae.decode(torch.zeros(2, 4)),
        ValueError,
        "z",
    )
    x = digits(16)[0]
    check_and_control(
        lambda: train_vae(VAEConfig(channels=8), x, steps=0),
        lambda: train_vae(VAEConfig(channels=8), x, steps=1),
        ValueError,
        "steps",
    )
    check_and_control(
        lambda: train_gan(GANConfig(channels=8), x[:, :, :4], steps=1),
        lambda: train_gan(GANConfig(channels=8), x, steps=1, batch_size=4),
        ValueError,
        "images",
    )
    check_and_control(
        lambda: frechet_distance(np.zeros((5, 3)), np.zeros((5, 4))),
        lambda: frechet_distance(np.eye(5, 3), np.eye(5, 3) + 1),
        ValueError,
        "feature width",
    )


def test_inputs_the_generative_audit_found() -> None:
    """(float64 latents or images into a float32 model failed in torch's matmul; float
    predictions failed in bincount; a VAEConfig built a GAN task.)"""
    from attnlab.tasks.generative_task import GANTask, VAETask

    gan, vae = GAN(GANConfig()), VAE(VAEConfig())
    z = torch.randn(2, GANConfig().latent_dim, dtype=torch.float64)
    images = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    for call, name in (
        (lambda: gan.generator(z), "z"),
        (lambda: vae.decode(z[:, : VAEConfig().latent_dim]), "z"),
        (lambda: gan.discriminator(images), "images"),
        (lambda: vae(images), "images"),
    ):
        check_and_control(
            call, lambda c=call: None, TypeError,
            f"{name} must be of the model's dtype torch.float32, got torch.float64",
        )  # fmt: skip
    assert gan.discriminator(images.float()).shape == (2,)  # the control
    with pytest.raises(TypeError, match="pred must be an integer tensor of class ids"):
        class_coverage(torch.tensor([0.0, 1.0]), 10)
    with pytest.raises(TypeError, match="cfg must be a GANConfig, got VAEConfig"):
        GANTask(64, cfg=VAEConfig())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="cfg must be a VAEConfig, got dict"):
        VAETask(64, cfg={"latent_dim": 4})  # type: ignore[arg-type]
