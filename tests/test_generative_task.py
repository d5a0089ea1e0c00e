"""``attnlab train gan | vae`` (and the ``-plain`` twins) on the Trainer: the one-backward
loss split against two optimizers written directly, the command line (checkpoints, exact
resume, one-line errors), the scoring ViT's cache, and the pictures' attention weights
against an fp64 recomputation from the layer's own projections."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.nn.utils import parametrize

from attnlab.cli import main
from attnlab.models.gan import GAN, GANConfig, SelfAttention2d, d_hinge_loss, g_hinge_loss
from attnlab.models.vae import VAE, VAEConfig
from attnlab.models.vit import ViT
from attnlab.tasks import generative, spec
from attnlab.tasks.generative_report import (
    QUERIES,
    attention_of,
    mosaic,
    write_attention,
    write_samples,
)
from attnlab.tasks.generative_task import (
    GAN_DEFAULTS,
    GANTask,
    VAETask,
    gan_losses,
)
from attnlab.train import TrainConfig, Trainer

from .conftest import check_and_control

TINY_GAN = GANConfig(latent_dim=4, channels=16, heads=2)


@pytest.fixture
def tiny_scorer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A 2-step scoring ViT cached under ``tmp_path`` (the default takes 600 steps)."""
    monkeypatch.setenv("ATTNLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(generative, "FEATURE_VIT_STEPS", 2)
    monkeypatch.setattr(generative, "_FEATURE_VITS", {})
    return tmp_path / "cache"


def _grads(module: nn.Module) -> list[Tensor]:
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in module.parameters()]


def test_one_backward_equals_the_two_optimizer_gradients() -> None:
    """L_D + L_G through one backward gives D exactly dL_D/dD and G exactly dL_G/dG."""
    gan = GAN(TINY_GAN)
    real, z = generative.digits(16)[0], torch.randn(16, 4)
    one, ref, leaky = copy.deepcopy(gan), copy.deepcopy(gan), copy.deepcopy(gan)
    d_one, g_one = gan_losses(one, real, z)
    (d_one + g_one).backward()
    fake = ref.generator(z)  # written directly, as with two optimizers
    d_loss = d_hinge_loss(ref.discriminator(real), ref.discriminator(fake.detach()))
    d_want = torch.autograd.grad(d_loss, list(ref.discriminator.parameters()))
    g_loss = g_hinge_loss(ref.discriminator(fake))
    g_want = torch.autograd.grad(g_loss, list(ref.generator.parameters()), allow_unused=True)
    for got, want in zip(_grads(one.discriminator), d_want, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    for got, want_g in zip(_grads(one.generator), g_want, strict=True):
        torch.testing.assert_close(got, torch.zeros_like(got) if want_g is None else want_g)
    # positive control: without the frozen copy, L_G's gradient leaks into D
    fake = leaky.generator(z)
    d_loss = d_hinge_loss(leaky.discriminator(real), leaky.discriminator(fake.detach()))
    (d_loss + g_hinge_loss(leaky.discriminator(fake))).backward()
    gap = max((a - b).abs().max() for a, b in zip(_grads(leaky.discriminator), d_want, strict=True))
    assert gap > 1e-4


def test_one_trainer_step_equals_two_adam_steps_with_ttur() -> None:
    task = GANTask(64, cfg=TINY_GAN)
    cfg = TrainConfig(**(GAN_DEFAULTS | {"steps": 5, "batch_size": 16, "progress": False}))
    trainer = Trainer(task, cfg)
    ref = copy.deepcopy(trainer.model)
    assert isinstance(ref, GAN)
    rng = torch.get_rng_state()
    trainer.train_step()
    torch.set_rng_state(rng)
    batch = task.batch(trainer._indices(0))  # the step's batch and latents
    opt_g = torch.optim.Adam(ref.generator.parameters(), lr=1e-4, betas=(0.0, 0.9))
    opt_d = torch.optim.Adam(ref.discriminator.parameters(), lr=4e-4, betas=(0.0, 0.9))
    fake = ref.generator(batch.z)
    d_loss = d_hinge_loss(ref.discriminator(batch.real), ref.discriminator(fake.detach()))
    g_loss = g_hinge_loss(ref.discriminator(fake))
    d_grads = torch.autograd.grad(d_loss, list(ref.discriminator.parameters()))
    g_grads = torch.autograd.grad(g_loss, list(ref.generator.parameters()), allow_unused=True)
    pairs = [*zip(ref.discriminator.parameters(), d_grads, strict=True)]
    pairs += [*zip(ref.generator.parameters(), g_grads, strict=True)]
    for p, g in pairs:
        p.grad = torch.zeros_like(p) if g is None else g
    opt_d.step()
    opt_g.step()
    want_state = ref.state_dict().values()
    for (name, got), want in zip(trainer.model.state_dict().items(), want_state, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=name)
    lrs = [g["lr"] for g in trainer.opt.param_groups]
    assert lrs == pytest.approx([1e-4, 4e-4])  # positive control of the lr_scale hook


def test_trainer_builds_the_model_on_its_own_thread_count() -> None:
    """Spectral norm's power iteration runs at construction: a model built on the
    process's threads would start from other bits than ``cfg.threads`` gives (and the GAN
    would end elsewhere), so the trainer builds it on ``cfg.threads``."""

    def built(process_threads: int) -> dict[str, Tensor]:
        torch.set_num_threads(process_threads)
        cfg = TrainConfig(**(GAN_DEFAULTS | {"steps": 1, "progress": False, "threads": 1}))
        return Trainer(GANTask(64), cfg).model.state_dict()

    torch.manual_seed(0)
    one = GAN(GANConfig()).state_dict()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    two = GAN(GANConfig()).state_dict()
    if all(torch.equal(one[k], two[k]) for k in one):
        pytest.skip("this CPU computes the init alike on 1 and 2 threads: nothing to show")
    a, b = built(2), built(1)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _train(task: str, out: Path, *extra: str) -> int:
    argv = ["train", task, "--steps", "4", "--eval-every", "2", "--batch-size", "16"]
    return main([*argv, "--no-progress", "--out", str(out), *extra])


def test_cli_trains_checkpoints_and_resumes_exactly(
    tiny_scorer: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _train("gan", tmp_path / "straight") == 0
    out, err = capsys.readouterr()
    assert err.count("attnlab: training the scoring ViT") == 1  # the first run trains it
    assert '"step": 4' in out and "frechet" in out and "held-out real test images" in out
    assert any(tiny_scorer.glob("feature_vit-v2-s2-*.safetensors"))
    report = tmp_path / "straight" / "report"
    assert {"samples.png", "attention.png", "report.html"} <= {p.name for p in report.iterdir()}
    # stop at the first step (time limit), then resume: the same weights as the straight run
    assert _train("gan", tmp_path / "cut", "--time-limit", "1e-9") == 0
    assert '"step": 1,' in capsys.readouterr().out
    assert _train("gan", tmp_path / "cut", "--resume") == 0
    assert "scoring ViT" not in capsys.readouterr().err  # trained once: not again
    a = load_file(tmp_path / "straight" / "last.safetensors")
    b = load_file(tmp_path / "cut" / "last.safetensors")
    models = [k for k in a if k.startswith("model.")]
    assert models and all(torch.equal(a[k], b[k]) for k in models)


def test_cli_plain_vae_and_bad_settings(
    tiny_scorer: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _train("vae-plain", tmp_path / "v", "--train-size", "64") == 0
    assert "attention.png" not in {p.name for p in (tmp_path / "v" / "report").iterdir()}
    capsys.readouterr()
    cases = [
        ("w", ["--train-size", "5000"], "--train-size", "is 5000; vae makes at most 1437"),
        ("v", ["--resume"], "--resume", "checkpoint of task 'vae-plain', not 'vae'"),
    ]
    for folder, extra, named, why in cases:
        assert _train("vae", tmp_path / folder, *extra) == 2
        lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
        assert len(lines) == 1 and named in lines[0] and why in lines[0], lines


def test_task_arguments_are_checked() -> None:
    check_and_control(
        lambda: GANTask(64, g_lr_scale=0.0), lambda: GANTask(64), ValueError, "g_lr_scale"
    )
    check_and_control(
        lambda: VAETask(64, images=torch.zeros(4, 1, 8, 8)),
        lambda: VAETask(images=torch.zeros(4, 1, 8, 8)),
        ValueError,
        "train_size or images",
    )
    check_and_control(
        lambda: GANTask(images=torch.zeros(4, 1, 7, 7)),
        lambda: GANTask(images=torch.zeros(4, 1, 8, 8)),
        ValueError,
        "images",
    )
    assert spec("gan-plain").build(8).name == "gan-plain"


def test_feature_vit_is_cached_deterministically(
    tiny_scorer: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = torch.get_rng_state()
    first = generative.feature_vit(3)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG is left alone
    (path,) = tiny_scorer.glob("feature_vit-v2-s3-*.safetensors")
    fresh = generative.train_feature_vit(3)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, first.state_dict()[k]), k
    monkeypatch.setattr(generative, "_FEATURE_VITS", {})
    path.write_bytes(b"corrupt")  # a damaged cache is retrained, not an error
    again = generative.feature_vit(3)
    assert again is not first and torch.equal(again.head.weight, first.head.weight)
    assert path.stat().st_size > 1000  # rewritten
    monkeypatch.setattr(generative, "_FEATURE_VITS", {})
    raw = bytearray(path.read_bytes())  # bytes of its weights damaged, the header intact:
    raw[-2000:-1000] = b"\xff" * 1000  # they loaded as NaN weights (FD failed in sqrtm)
    path.write_bytes(bytes(raw))
    third = generative.feature_vit(3)
    assert torch.equal(third.head.weight, first.head.weight)
    assert all(torch.isfinite(p).all() for p in third.parameters())


def test_training_the_scoring_vit_is_announced_once_on_stderr(
    tiny_scorer: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """(The first evaluation of a GAN or VAE trained the ViT silently: the progress bar sat
    at its step for 30-50 s.) The line comes before the training, and not from the cache."""
    said: list[bool] = []  # whether the line was out when each training began
    real = generative.train_feature_vit

    def train(steps: int, **kw: int) -> ViT:
        said.append("training the scoring ViT" in capfd.readouterr().err)
        return real(steps, **kw)

    monkeypatch.setattr(generative, "train_feature_vit", train)
    generative.feature_vit(2)
    assert said == [True] and capfd.readouterr().err == ""  # one line, before, once
    monkeypatch.setattr(generative, "_FEATURE_VITS", {})
    generative.feature_vit(2)  # from the file cache
    generative.feature_vit(2)  # from memory
    assert said == [True] and capfd.readouterr().err == ""
    (path,) = tiny_scorer.glob("feature_vit-v2-s2-*.safetensors")
    path.write_bytes(b"damaged")  # retrained: said again
    monkeypatch.setattr(generative, "_FEATURE_VITS", {})
    generative.feature_vit(2)
    assert said == [True, True]
    generative._say_training(600, path)  # the default's line: its time, the file
    assert capfd.readouterr().err == (
        "attnlab: training the scoring ViT for the Fréchet distance (once, ~30-50 s; "
        f"cached in {path})\n"
    )


def test_a_cache_that_cannot_be_written_is_a_warning_not_a_failure(
    tiny_scorer: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cache write that fails (here ``$ATTNLAB_CACHE`` is a file) raised a WriteError
    ("File exists") after the ViT had trained; the model is kept in memory instead."""
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("ATTNLAB_CACHE", str(tmp_path / "file"))
    with pytest.warns(RuntimeWarning, match="kept in memory only, not cached: could not write"):
        vit = generative.feature_vit(2)
    assert not vit.training and vit is generative.feature_vit(2)
    assert (tmp_path / "file").read_text() == "not a folder"


@pytest.mark.parametrize(
    ("where", "named"),
    [("file", "is a file, not a folder"), ("file/sub", "cannot create"), ("cache", "")],
)
def test_an_attnlab_cache_that_cannot_be_a_folder_is_refused_before_any_work(
    tmp_path: Path,
    where: str,
    named: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """It was found after the GAN and the scoring ViT had trained (2 min 51 s, then
    "File exists", exit 1); now every command checks it first, exit 2 naming it. The
    last case is the positive control: a folder that can be made reaches the work."""

    def stop(*args: object, **kwargs: object) -> None:
        raise RuntimeError("work started")

    monkeypatch.setattr("attnlab.cli.train.run_task", stop)
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("ATTNLAB_CACHE", str(tmp_path / where))
    out = tmp_path / "g1"
    code = main(["train", "gan", "--steps", "2", "--eval-every", "1", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    if not named:
        assert code == 1 and "work started" in err, err
        return
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("attnlab train: error: ATTNLAB_CACHE: ") and named in err, err
    assert not out.exists() and (tmp_path / "file").read_text() == "not a folder"


def _fp64_weights(att: SelfAttention2d, x: Tensor) -> Tensor:
    """``softmax(q k^T)`` per head ``(H, L, L)`` from the layer's 1x1 projections in fp64,
    for one feature map ``x (1, C, h, w)``; no scale, as SAGAN."""
    xs = x[0].double().flatten(1)  # (C, L)
    wq, wk = att.query.weight, att.key.weight  # spectral-normalized when the layer is
    assert isinstance(wq, Tensor) and isinstance(wk, Tensor)
    wq, wk = wq.detach().double()[:, :, 0, 0], wk.detach().double()[:, :, 0, 0]  # (H * E, C)
    q = (wq @ xs).view(att.heads, att.key_dim, -1).transpose(1, 2)  # (H, L, E)
    k = (wk @ xs).view(att.heads, att.key_dim, -1).transpose(1, 2)
    return torch.softmax(q @ k.transpose(1, 2), dim=-1)  # (H, L, L)


def _sharpen(att: SelfAttention2d, scale: float = 10.0) -> None:
    """Large plain query/key projections: an untrained layer attends almost uniformly,
    which any recomputation would match."""
    for proj in (att.query, att.key):
        if parametrize.is_parametrized(proj):
            parametrize.remove_parametrizations(proj, "weight")
        w = proj.weight
        assert isinstance(w, Tensor)
        with torch.no_grad():
            w.normal_().mul_(scale)


@pytest.mark.parametrize(("kind", "sharpen"), [("gan", 10.0), ("vae", 40.0)])
def test_pictured_attention_matches_fp64_recomputation(
    kind: str, sharpen: float, tmp_path: Path
) -> None:
    # key_dim 4 (with key_dim 1, softmax(q_i k_j) sends every query to the same key)
    model: GAN | VAE = (
        GAN(GANConfig(latent_dim=4, channels=64)) if kind == "gan" else VAE(VAEConfig(4, 32))
    )
    model.eval()
    att = model.generator.attn if isinstance(model, GAN) else model.attn
    assert isinstance(att, SelfAttention2d)
    _sharpen(att, sharpen)  # the VAE decoder's features are smaller
    seen: list[Tensor] = []
    att.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    path, maps = write_attention(model, tmp_path / "a.png", "t")
    assert maps.amax(dim=(1, 2)).min() > 4 / 64  # far from uniform: the comparison can fail
    want = _fp64_weights(att, seen[0]).mean(0)  # (L, L), mean over heads
    rows = [r * 8 + c for r, c in QUERIES]
    torch.testing.assert_close(maps.double(), want[rows].view(-1, 8, 8), rtol=1e-5, atol=1e-6)
    wrong = want.T[rows].view(-1, 8, 8)  # who attends to the query, not where it attends
    assert (wrong - maps).abs().max() > 0.1  # so the comparison can fail
    image = pytest.importorskip("matplotlib.image").imread(path)
    assert image.shape[1] > image.shape[0] > 100 and image.std() > 0.05


@pytest.mark.parametrize("kind", ["gan", "vae"])
def test_pictured_attention_runs_in_eval_mode_and_leaves_the_model_as_it_was(
    kind: str, tmp_path: Path
) -> None:
    """A GAN in training mode (as the Trainer leaves it) was run as it was: its one sample
    normalized by its own batch statistics, the running statistics (and spectral norm's
    power-iteration vectors) overwritten. (The VAE has no such layer: a control.)"""
    torch.manual_seed(0)
    model: GAN | VAE = GAN(TINY_GAN) if kind == "gan" else VAE(VAEConfig(4, 8))
    before = {k: b.clone() for k, b in model.named_buffers()}
    assert kind == "vae" or any("running_var" in k for k in before)
    z = torch.randn(1, 4)
    img, w = attention_of(model, z)
    write_attention(model, tmp_path / "a.png", "t")
    assert all(m.training for m in model.modules())
    for k, b in model.named_buffers():
        assert torch.equal(b, before[k]), k
    img_eval, w_eval = attention_of(model.eval(), z)  # the picture of the model in eval mode
    assert torch.equal(img, img_eval) and torch.equal(w, w_eval)
    assert not any(m.training for m in model.modules())  # eval stays eval


def test_samples_picture_places_every_image(tmp_path: Path) -> None:
    imgs = torch.rand(10, 1, 8, 8) * 2 - 1
    m = mosaic(imgs, cols=4)
    assert m.shape == (3 * 9 - 1, 4 * 9 - 1)
    np.testing.assert_allclose(m[9:17, 9:17], (imgs[5, 0].numpy() + 1) / 2, rtol=1e-6)
    assert np.isnan(m[8]).all() and np.isnan(m[18:, 18:]).all()  # gaps and the empty tail
    png = write_samples(imgs, imgs.flip(0), tmp_path / "s.png", "t")
    assert png.stat().st_size > 1000


def test_cache_dir_reads_a_home_tilde_and_ignores_a_relative_xdg_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """(ATTNLAB_CACHE="~/models" cached under a folder named "~" in the working directory,
    and XDG_CACHE_HOME="rel" under ./rel, which the XDG rule says to ignore.)"""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("ATTNLAB_CACHE", "~/models")
    assert generative.cache_dir() == tmp_path / "models"
    monkeypatch.setenv("ATTNLAB_CACHE", "")
    monkeypatch.setenv("XDG_CACHE_HOME", "rel")
    assert generative.cache_dir() == tmp_path / ".cache" / "attnlab"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # the control: an absolute one
    assert generative.cache_dir() == tmp_path / "xdg" / "attnlab"
