"""Captioning: scenes match their captions pixel by pixel, the held-out split, and the
Show-Attend-Tell decoder against its equations written out by hand."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch
from torch import Tensor

from attnlab.interpret import capture
from attnlab.models.captioner import Captioner, CaptionerConfig
from attnlab.tasks.captioning import (
    COLOURS,
    RELATIONS,
    SHAPES,
    CaptioningTask,
    Scene,
    Thing,
    all_captions,
    random_scene,
    render,
    word_attention,
)
from attnlab.train import TrainConfig, Trainer

from .conftest import check_and_control

TINY = CaptionerConfig(
    vocab_size=17,
    image_size=16,
    d_model=16,
    num_heads=2,
    embed_dim=8,
    hidden_dim=16,
    attention_dim=16,
)


def test_every_caption_is_listed_once() -> None:
    things = list(itertools.product(SHAPES, COLOURS))
    caps = all_captions()
    assert len(caps) == len(set(caps)) == len(list(itertools.combinations(things, 2))) * 4


def _check_thing(img: np.ndarray, t: Thing) -> None:
    """The centre has the thing's colour; the shape shows in its corners."""
    assert tuple(img[t.y, t.x]) == COLOURS[t.colour]
    top_left = tuple(img[t.y - t.r, t.x - t.r])
    inside_corner = tuple(img[t.y - t.r + 1, t.x - t.r + 1])
    if t.shape == "square":
        assert top_left == inside_corner == COLOURS[t.colour]
    else:  # a circle or a triangle leaves its bounding box's top corner empty
        assert top_left == (0, 0, 0)
    if t.shape == "triangle":  # only the apex reaches the top: one pixel in is still empty
        assert inside_corner == (0, 0, 0)
    if t.shape == "triangle":  # apex up, full width at the bottom (no circle is that wide)
        assert tuple(img[t.y - t.r + 1, t.x]) == COLOURS[t.colour]
        assert tuple(img[t.y + t.r, t.x - t.r + 1]) == COLOURS[t.colour]
    if t.shape == "circle":  # round: bottom corners empty too, edge midpoints filled
        assert tuple(img[t.y + t.r, t.x + t.r]) == (0, 0, 0)
        assert tuple(img[t.y, t.x - t.r + 1]) == COLOURS[t.colour]


def test_pixels_agree_with_the_caption() -> None:
    rng = random.Random(3)
    for cap in all_captions():
        scene = random_scene(cap, rng)
        img = render(scene)
        assert scene.caption() == cap
        words = cap.split()
        sub = next(t for t in (scene.a, scene.b) if (t.colour, t.shape) == (words[1], words[2]))
        obj = scene.b if sub is scene.a else scene.a
        assert (obj.colour, obj.shape) == (words[-2], words[-1])
        _check_thing(img, sub)
        _check_thing(img, obj)
        rel = " ".join(words[3:-3])
        assert rel in RELATIONS
        ok = {
            "left of": sub.x < obj.x - sub.r - obj.r,
            "right of": sub.x > obj.x + sub.r + obj.r,
            "above": sub.y < obj.y - sub.r - obj.r,
            "below": sub.y > obj.y + sub.r + obj.r,
        }
        assert ok[rel], (cap, scene)
        coloured = (img.sum(-1) > 0).sum()
        assert coloured < img.shape[0] * img.shape[1] / 2  # the rest is black background


def test_caption_order_is_by_shape_then_colour() -> None:
    left, right = Thing("triangle", "red", 8, 16, 5), Thing("circle", "yellow", 24, 16, 5)
    assert Scene(left, right, "x").caption() == "a yellow circle right of a red triangle"
    top, bottom = Thing("square", "blue", 16, 8, 5), Thing("square", "green", 16, 24, 5)
    assert Scene(top, bottom, "y").caption() == "a green square below a blue square"


def test_rendering_and_split_are_deterministic_and_held_out() -> None:
    a = CaptioningTask(train_size=40, test_size=10, seed=5)
    b = CaptioningTask(train_size=40, test_size=10, seed=5)
    assert torch.equal(a.train_images, b.train_images) and a.test_scenes == b.test_scenes
    assert not set(a.test_pool) & set(a.train_pool)
    assert len(a.test_pool) + len(a.train_pool) == len(all_captions())
    assert not set(a.test_captions) & set(a.train_captions)
    seen = {w for c in a.train_pool for w in c.split()}
    assert all(w in seen for c in a.test_pool for w in c.split())


def _manual_first_step(m: Captioner, images: Tensor, bos: Tensor) -> tuple[Tensor, Tensor]:
    """Show, Attend and Tell's first step written out from its equations."""
    memory = m.encode(images)  # (B, N, D)
    mean = memory.mean(1)
    h, c = torch.tanh(m.init_h(mean)), torch.tanh(m.init_c(mean))
    att = m.attention
    e = att.v(torch.tanh(att.query_proj(h)[:, None] + att.key_proj(memory))).squeeze(-1)
    alpha = torch.softmax(e, -1)  # (B, N)
    z = torch.sigmoid(m.gate(h)) * (alpha[:, :, None] * memory).sum(1)
    emb = m.embed(bos)
    gates = m.cell.weight_ih @ torch.cat([emb, z], -1).T + m.cell.weight_hh @ h.T
    gates = gates.T + m.cell.bias_ih + m.cell.bias_hh
    i, f, g, o = gates.chunk(4, -1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    return m.out(torch.cat([h, z, emb], -1)), alpha


def test_decoder_step_matches_the_equations_and_capture() -> None:
    m = Captioner(TINY).eval()
    images = torch.rand(3, 3, 16, 16)
    words = torch.tensor([[1, 5, 6], [1, 7, 8], [1, 9, 0]])
    with torch.no_grad(), capture(m, layers=["attention"]) as cap:
        logits = m(images, words)
        want_logits, want_alpha = _manual_first_step(m, images, words[:, 0])
    torch.testing.assert_close(logits[:, 0], want_logits, rtol=1e-4, atol=1e-5)
    assert len(cap.records) == 3  # one attention call per word
    torch.testing.assert_close(cap.records[0].weights[:, 0, 0], want_alpha, rtol=1e-4, atol=1e-6)
    for rec in cap.records:  # (B, 1, 1, N) over the 4x4 patch grid, summing to 1
        assert rec.weights.shape == (3, 1, 1, 16)
        torch.testing.assert_close(rec.weights.sum(-1), torch.ones(3, 1, 1))


def test_greedy_generation_agrees_with_teacher_forcing() -> None:
    m = Captioner(TINY).eval()
    images = torch.rand(4, 3, 16, 16)
    out = m.generate(images, max_len=6)
    for img, ids in zip(images, out, strict=True):
        tail = [2] if len(ids) < 6 else []
        logits = m(img[None], torch.tensor([[1, *ids]]))
        assert logits[0].argmax(-1).tolist()[: len(ids) + len(tail)] == [*ids, *tail]


def test_training_lowers_the_loss_and_maps_cover_the_grid() -> None:
    task = CaptioningTask(train_size=256, test_size=16, eval_size=16, d_model=32, hidden_dim=32)
    trainer = Trainer(task, TrainConfig(steps=30, batch_size=64, lr=3e-3, warmup=5, progress=False))
    batch = task.batch(torch.arange(128))
    with torch.no_grad():
        before = float(task.loss(trainer.model.eval(), batch))
    trainer.fit()
    with torch.no_grad():
        after = float(task.loss(trainer.model.eval(), batch))
    assert after < before - 1.0
    scores = task.evaluate(trainer.model)
    assert 0.0 <= scores["score"] <= 1.0
    model = trainer.model
    assert isinstance(model, Captioner)
    ids, maps = word_attention(model, task.test_images[0])
    assert maps.shape[1:] == (8, 8) and len(maps) in (len(ids), len(ids) + 1)
    torch.testing.assert_close(maps.sum((1, 2)), torch.ones(len(maps)))


def test_bad_input_errors() -> None:
    m = Captioner(TINY)
    images = torch.rand(2, 3, 16, 16)
    check_and_control(
        lambda: m(images, torch.ones(3, 4, dtype=torch.long)),
        lambda: m(images, torch.ones(2, 4, dtype=torch.long)),
        ValueError,
        "words has batch size 3 but images has 2",
    )
    check_and_control(
        lambda: m(torch.rand(2, 3, 32, 32), torch.ones(2, 4, dtype=torch.long)),
        lambda: m(images, torch.ones(2, 4, dtype=torch.long)),
        ValueError,
        r"images must have shape \(B, C, H, W\) = \(B, 3, 16, 16\)",
    )
    with pytest.raises(ValueError, match=r"held_out must be a number in \(0, 1\), got 1.5"):
        CaptioningTask(train_size=4, test_size=4, held_out=1.5)
    with pytest.raises(ValueError, match="max_len must be a positive int, got 0"):
        m.generate(images, max_len=0)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"image_size": 24}, "image_size must be >= 29"),  # it drew positions forever
        ({"image_size": 30}, "image_size=30 must be a multiple of patch_size=4"),  # in build_model
        ({"held_out": 0.001}, r"held_out=0.001 leaves 0 of 264 captions"),  # ZeroDivisionError
        ({"held_out": 0.999}, r"held_out=0.999 leaves 264 of 264 captions"),
        ({"eval_size": 0}, "eval_size must be a positive int, got 0"),  # failed in evaluate
        ({"eval_size": -1}, "eval_size must be a positive int, got -1"),  # scored [:-1]
    ],
)
def test_captioning_task_sizes_are_checked(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CaptioningTask(8, 4, **kw)
    with pytest.raises(ValueError, match="size must be >= 29"):
        random_scene("a red circle above a blue square", random.Random(0), size=28)
    assert random_scene("a red circle above a blue square", random.Random(0), size=29)


def test_missing_pillow_and_babel_name_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without them, `attnlab train captioning` and `train dates` said only "No module
    named 'PIL'" / "'babel'", where every other task names the extra to install."""
    import sys

    from attnlab.tasks.dates_data import writing_styles

    scene = random_scene("a red circle left of a blue square", random.Random(0))
    for name in ("PIL", "babel", "babel.core", "babel.dates"):
        monkeypatch.setitem(sys.modules, name, None)  # an import of it fails
    with pytest.raises(
        ImportError, match=r"captioning task needs Pillow: pip install 'attnlab\[tasks\]'"
    ):
        render(scene)
    with pytest.raises(
        ImportError, match=r"dates task needs Babel: pip install 'attnlab\[tasks\]'"
    ):
        writing_styles(["en"], ["short"])
    monkeypatch.undo()
    assert render(scene).shape == (32, 32, 3) and writing_styles(["en"], ["short"])  # control
