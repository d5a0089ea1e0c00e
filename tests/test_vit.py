"""ViT, the digits task and the image-attention picture, against independent computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.interpret.image import image_attention, patch_grid
from attnlab.models.vit import PatchEmbedding, ViT, ViTConfig
from attnlab.tasks.vision import DigitsTask, cls_rollout, confusion, load_split, shift_images
from attnlab.train import TrainConfig, Trainer

from .conftest import check_and_control

TINY = ViTConfig(d_model=16, num_heads=2, layers=2, dim_feedforward=32, dropout=0.0)


def test_patch_embedding_matches_manual_patches() -> None:
    pe = PatchEmbedding(8, 2, 3, 5)
    x = torch.randn(2, 3, 8, 8)
    w, b = pe.proj.weight.reshape(5, -1), pe.proj.bias
    manual = torch.stack(
        [
            x[:, :, i : i + 2, j : j + 2].reshape(2, -1) @ w.T + b
            for i in range(0, 8, 2)
            for j in range(0, 8, 2)
        ],
        dim=1,
    )  # (B, 16, 5), row-major patches
    torch.testing.assert_close(pe(x), manual, rtol=1e-5, atol=1e-5)


def _torch_vit(vit: ViT) -> tuple[nn.ModuleList, nn.LayerNorm]:
    """torch.nn.TransformerEncoderLayer copies of the ViT's layers, and its final norm."""
    cfg = vit.cfg
    layers = nn.ModuleList()
    for ours in vit.encoder.layers:
        ref = nn.TransformerEncoderLayer(
            cfg.d_model,
            cfg.num_heads,
            cfg.dim_feedforward,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        state = {k.replace("ff.", ""): v for k, v in ours.state_dict().items()}
        ref.load_state_dict(state)
        layers.append(ref.eval())
    assert isinstance(vit.encoder.norm, nn.LayerNorm)
    return layers, vit.encoder.norm


def _reference_logits(vit: ViT, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    """ViT logits with unfold + matmul patches and torch's encoder layers; also each
    layer's per-head attention (B, H, T, T) from torch's MultiheadAttention."""
    p = vit.cfg.patch_size
    cols = F.unfold(x, kernel_size=p, stride=p).transpose(1, 2)  # (B, N, C*p*p)
    w = vit.patches.proj.weight.reshape(vit.cfg.d_model, -1)
    h = cols @ w.T + vit.patches.proj.bias  # (B, N, D)
    h = torch.cat([vit.cls.expand(len(x), -1, -1), h], 1) + vit.pos.weight  # (B, T, D)
    layers, norm = _torch_vit(vit)
    attns = []
    for layer in layers:
        a = layer.norm1(h)
        _, wts = layer.self_attn(a, a, a, need_weights=True, average_attn_weights=False)
        attns.append(wts)
        h = layer(h)
    return vit.head(norm(h)[:, 0]), attns


def test_vit_matches_torch_encoder_layers() -> None:
    vit = ViT(TINY).eval()
    x = torch.rand(3, 1, 8, 8)
    ref, _ = _reference_logits(vit, x)
    torch.testing.assert_close(vit(x), ref, rtol=1e-4, atol=1e-5)


def test_cls_rollout_matches_manual_rollout() -> None:
    vit = ViT(TINY).eval()
    x = torch.rand(2, 1, 8, 8)
    _, attns = _reference_logits(vit, x)
    eye = torch.eye(vit.num_tokens)
    r = eye.expand(2, -1, -1)
    for a in attns:  # Abnar & Zuidema: normalize(0.5 A + 0.5 I), multiplied up the layers
        m = 0.5 * a.mean(1) + 0.5 * eye
        r = (m / m.sum(-1, keepdim=True)) @ r
    want = r[:, 0, 1:] / r[:, 0, 1:].sum(-1, keepdim=True)
    got = cls_rollout(vit, x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got.sum(-1), torch.ones(2))


def test_shift_images_matches_slicing() -> None:
    x = torch.randn(2, 1, 5, 6)
    got = shift_images(x, torch.tensor([[1, -2], [0, 0]]))
    want = torch.zeros_like(x[0])
    want[:, 1:, :-2] = x[0, :, :-1, 2:]  # down 1, left 2
    torch.testing.assert_close(got[0], want)
    torch.testing.assert_close(got[1], x[1])


def test_split_is_stratified_and_disjoint() -> None:
    from sklearn.datasets import load_digits

    tx, ty, vx, vy = load_split(0.2, seed=0)
    counts = np.bincount(load_digits().target)
    assert len(ty) + len(vy) == counts.sum()
    assert np.all(np.abs(np.bincount(vy.numpy()) - 0.2 * counts) <= 1)
    # no test image is a training image (digits holds no exact duplicates across the split)
    train_rows = {tuple(r) for r in tx.flatten(1).tolist()}
    assert not any(tuple(r) in train_rows for r in vx.flatten(1).tolist())


def test_confusion_matches_sklearn() -> None:
    from sklearn.metrics import confusion_matrix

    g = torch.Generator().manual_seed(1)
    pred, target = (
        torch.randint(0, 10, (200,), generator=g),
        torch.randint(0, 10, (200,), generator=g),
    )
    want = confusion_matrix(target.numpy(), pred.numpy(), labels=range(10))
    assert confusion(pred, target).tolist() == want.tolist()


def test_training_lowers_the_loss_and_evaluates() -> None:
    task = DigitsTask(
        train_size=256,
        patch_size=4,
        d_model=32,
        num_heads=2,
        layers=1,
        dim_feedforward=64,
        max_shift=0,
    )
    trainer = Trainer(task, TrainConfig(steps=40, batch_size=64, lr=3e-3, warmup=5, progress=False))
    batch = task.batch(torch.arange(256))
    with torch.no_grad():
        before = float(task.loss(trainer.model.eval(), batch))
    trainer.fit()
    with torch.no_grad():
        after = float(task.loss(trainer.model.eval(), batch))
    assert after < before - 0.5
    acc = task.evaluate(trainer.model)
    assert acc["score"] > 0.3 and acc["accuracy"] == pytest.approx(100 * acc["score"], abs=0.01)


def test_patch_grid_maps_and_picture(tmp_path: object) -> None:
    from PIL import Image

    w = torch.softmax(torch.randn(3, 16), -1)
    maps = patch_grid(w, 4)
    assert maps[1, 2, 3] == w[1, 11]  # row-major: patch 11 is row 2, column 3
    p1 = image_attention(torch.rand(8, 8), maps[:1], ["one"], f"{tmp_path}/a.png")
    p3 = image_attention(torch.rand(8, 8, 3), maps, ["a", "b", "c"], f"{tmp_path}/b.png")
    w1, w3 = Image.open(p1).size[0], Image.open(p3).size[0]
    assert w3 == pytest.approx(2 * w1, rel=0.05)  # 4 panels vs 2


def test_bad_input_errors(tmp_path: object) -> None:
    vit = ViT(TINY)
    check_and_control(
        lambda: vit(torch.rand(2, 1, 6, 6)),
        lambda: vit(torch.rand(2, 1, 8, 8)),
        ValueError,
        r"images must have shape \(B, C, H, W\) = \(B, 1, 8, 8\), got shape \(2, 1, 6, 6\)",
    )
    check_and_control(
        lambda: vit(torch.ones(2, 1, 8, 8, dtype=torch.long)),
        lambda: vit(torch.ones(2, 1, 8, 8)),
        TypeError,
        "images must be a floating-point tensor",
    )
    with pytest.raises(ValueError, match="image_size=8 must be a multiple of patch_size=3"):
        ViT(ViTConfig(patch_size=3))
    # (nn.Dropout refused first: "'<' not supported between instances of 'str' and 'int'",
    # "dropout probability has to be between 0 and 1", neither naming ViTConfig.dropout)
    for bad, exc, match in (("0.1", TypeError, "got str"), (1.5, ValueError, "got 1.5")):
        check_and_control(
            lambda bad=bad: ViT(ViTConfig(dropout=bad)),  # type: ignore[arg-type]
            lambda: ViT(ViTConfig(dropout=0.5)),
            exc,
            rf"^dropout must be (a float )?in \[0, 1\), {match}",
        )
    with pytest.raises(ValueError, match="train_size=5000 is more than the 1437"):
        DigitsTask(train_size=5000)
    with pytest.raises(ValueError, match=r"N = len\(titles\) = 2, got shape \(3, 4, 4\)"):
        image_attention(torch.rand(8, 8), torch.rand(3, 4, 4), ["a", "b"], f"{tmp_path}/x.png")
    with pytest.raises(ValueError, match=r"image must have shape \(H, W\) or \(H, W, 3\)"):
        image_attention(torch.rand(8, 8, 4), torch.rand(1, 4, 4), ["a"], f"{tmp_path}/x.png")
