"""Captioning: Pillow-drawn scenes of two shapes, captioned with their spatial relation.

A scene holds two different objects (a shape in {circle, square, triangle} drawn in one
of four colours) side by side or one over the other, on a black ``32 x 32`` canvas. Its
caption names them in a fixed order, the object first in (shape, colour) order being the
subject, and the subject's relation to the other: ``"a red circle left of a blue
square"``, ``"a green square below a green triangle"``. The caption is therefore a
function of the picture.

Held out: a fixed, seeded 20% of the 264 possible captions (object pair x relation).
Test scenes show only those combinations, so no test caption ever occurs in training;
every colour, shape and relation does. The score is exact caption match.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab._validate import limit_or, nonnegative_int, positive_int, real_where
from attnlab.interpret import capture
from attnlab.models.captioner import Captioner, CaptionerConfig
from attnlab.tasks.options import DataOptions
from attnlab.tasks.registry import TaskSpec
from attnlab.tasks.report import Section, write_html
from attnlab.tasks.text import Vocab, pad_batch

__all__ = [
    "COLOURS",
    "RELATIONS",
    "SHAPES",
    "SPEC",
    "CaptionBatch",
    "CaptioningTask",
    "Scene",
    "Thing",
    "all_captions",
    "finish",
    "random_scene",
    "render",
    "word_attention",
]

SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (60, 100, 255),
    "yellow": (240, 220, 40),
}
RELATIONS = ("left of", "right of", "above", "below")


@dataclass(frozen=True)
class Thing:
    """One object: ``shape`` in :data:`SHAPES`, ``colour`` in :data:`COLOURS`, centre
    ``(x, y)`` in pixels (y grows downward) and half-size ``r``."""

    shape: str
    colour: str
    x: int
    y: int
    r: int

    @property
    def key(self) -> tuple[int, int]:
        """Caption order: the object with the smaller key is the subject."""
        return SHAPES.index(self.shape), list(COLOURS).index(self.colour)

    def words(self) -> str:
        return f"a {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """Two different objects, apart along ``axis`` (``"x"``: side by side, ``"y"``: one
    over the other)."""

    a: Thing
    b: Thing
    axis: str

    def caption(self) -> str:
        """``"a <colour> <shape> <relation> a <colour> <shape>"``, subject first.

        Example:
            >>> s = Scene(Thing("square", "blue", 8, 16, 5), Thing("circle", "red", 24, 16, 5), "x")
            >>> s.caption()
            'a red circle right of a blue square'
        """
        s, o = sorted((self.a, self.b), key=lambda t: t.key)
        if self.axis == "x":
            rel = "left of" if s.x < o.x else "right of"
        else:
            rel = "above" if s.y < o.y else "below"
        return f"{s.words()} {rel} {o.words()}"


def all_captions() -> list[str]:
    """Every possible caption (264), in a fixed order.

    Example:
        >>> caps = all_captions()
        >>> len(caps), caps[0]
        (264, 'a red circle left of a green circle')
    """
    things = [(s, c) for s in SHAPES for c in COLOURS]
    out = []
    for i, (s1, c1) in enumerate(things):
        for s2, c2 in things[i + 1 :]:
            out += [f"a {c1} {s1} {rel} a {c2} {s2}" for rel in RELATIONS]
    return out


def _parse(caption: str) -> tuple[tuple[str, str], str, tuple[str, str]]:
    """``((colour, shape), relation, (colour, shape))`` of a caption."""
    w = caption.split()
    rel = " ".join(w[3:-3])
    return (w[1], w[2]), rel, (w[-2], w[-1])


MIN_SIZE = 29  # the smallest canvas where any two objects fit apart: 2 * 7 + 6 + 6 + 2 + 1


def random_scene(caption: str, rng: random.Random, size: int = 32) -> Scene:
    """A random layout of ``caption``: sizes, positions and which side is which.

    Objects have half-size 4 to 6 and lie inside the canvas; along the relation's axis
    their centres are at least ``r_a + r_b + 2`` apart, across it at most half that.

    Example:
        >>> random_scene("a red circle above a blue square", random.Random(0)).caption()
        'a red circle above a blue square'
    """
    (c1, s1), rel, (c2, s2) = _parse(caption)
    if size < MIN_SIZE:  # the positions were drawn again forever
        raise ValueError(f"size must be >= {MIN_SIZE} (two objects of half-size up to 6 "
                         f"apart along one axis), got {size}")  # fmt: skip
    ra, rb = rng.randint(4, 6), rng.randint(4, 6)
    lo, hi = max(ra, rb) + 1, size - max(ra, rb) - 2
    while True:
        p = [rng.randint(lo, hi) for _ in range(4)]  # along_a, along_b, across_a, across_b
        gap = abs(p[0] - p[1])
        if gap >= ra + rb + 2 and abs(p[2] - p[3]) <= gap // 2:
            break
    first = rel in ("right of", "below")  # the subject has the larger coordinate
    sub_along, obj_along = (
        (max(p[0], p[1]), min(p[0], p[1])) if first else (min(p[0], p[1]), max(p[0], p[1]))
    )
    axis = "x" if rel in ("left of", "right of") else "y"
    sa = (sub_along, p[2]) if axis == "x" else (p[2], sub_along)
    oa = (obj_along, p[3]) if axis == "x" else (p[3], obj_along)
    return Scene(Thing(s1, c1, *sa, ra), Thing(s2, c2, *oa, rb), axis)


def render(scene: Scene, size: int = 32) -> np.ndarray:
    """The scene drawn with Pillow: ``(size, size, 3)`` uint8 RGB on black.

    Example:
        >>> img = render(random_scene("a red circle left of a blue square", random.Random(0)))
        >>> img.shape, img.dtype
        ((32, 32, 3), dtype('uint8'))
    """
    try:
        from PIL import Image, ImageDraw
    except ImportError as e:  # (it said "No module named 'PIL'", naming no extra)
        raise ImportError("the captioning task needs Pillow: pip install 'attnlab[tasks]'") from e
    im = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(im)
    for t in (scene.a, scene.b):
        fill = COLOURS[t.colour]
        box = (t.x - t.r, t.y - t.r, t.x + t.r, t.y + t.r)
        if t.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif t.shape == "square":
            draw.rectangle(box, fill=fill)
        else:  # triangle, apex up
            draw.polygon(
                [(t.x, t.y - t.r), (t.x - t.r, t.y + t.r), (t.x + t.r, t.y + t.r)], fill=fill
            )
    return np.asarray(im, dtype=np.uint8).copy()


def _images(scenes: list[Scene], size: int) -> Tensor:
    """``(N, 3, size, size)`` uint8 images of ``scenes``."""
    arr = np.stack([render(s, size) for s in scenes])  # (N, H, W, 3)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


@dataclass
class CaptionBatch:
    images: Tensor  # (B, 3, H, W) float in [0, 1]
    words_in: Tensor  # (B, Lt): BOS + caption
    words_out: Tensor  # (B, Lt): caption + EOS, 0 = padding


class CaptioningTask(DataOptions):
    """Two-shape scenes -> captions, for :class:`attnlab.train.Trainer`.

    Args:
        train_size, test_size: scenes in each split.
        held_out: share of the 264 captions kept for testing only.
        eval_size: test scenes captioned at each periodic evaluation (all at the end).
        image_size: canvas side in pixels.
        seed: picks the held-out captions and draws the scenes.
        d_model, hidden_dim, dropout: model size (see :class:`CaptionerConfig`).

    Example:
        >>> task = CaptioningTask(train_size=20, test_size=4)
        >>> task.test_captions[0] in task.train_captions, tuple(task.train_images.shape)
        (False, (20, 3, 32, 32))
    """

    name = "captioning"

    def __init__(
        self,
        train_size: int = 20_000,
        test_size: int = 1000,
        *,
        held_out: float = 0.2,
        eval_size: int = 500,
        image_size: int = 32,
        seed: int = 0,
        d_model: int = 64,
        hidden_dim: int = 128,
        dropout: float = 0.0,
    ) -> None:
        seed = nonnegative_int("seed", seed)  # (random.Random gave -7 seed 7's scenes)
        real_where("held_out", held_out, lambda h: 0 < h < 1, "a number in (0, 1)")
        if positive_int("image_size", image_size) < MIN_SIZE:
            raise ValueError(f"image_size must be >= {MIN_SIZE} (two objects must fit apart), "
                             f"got {image_size}")  # fmt: skip
        self.eval_size = positive_int("eval_size", eval_size)
        sizes = CaptionerConfig(  # checked before drawing the scenes (it was in build_model)
            1, image_size=image_size, d_model=d_model, hidden_dim=hidden_dim, dropout=dropout
        )
        sizes.layer_config()
        rng = random.Random(seed)
        caps = all_captions()
        rng.shuffle(caps)
        k = round(held_out * len(caps))
        if not 0 < k < len(caps):  # an empty pool divided by zero
            raise ValueError(f"held_out={held_out} leaves {k} of {len(caps)} captions for "
                             "testing; both sides need at least one")  # fmt: skip
        self.test_pool, self.train_pool = caps[:k], caps[k:]
        self.image_size = image_size
        self.train_scenes = self._scenes(
            self.train_pool, positive_int("train_size", train_size), rng
        )
        self.test_scenes = self._scenes(self.test_pool, positive_int("test_size", test_size), rng)
        self.train_captions = [s.caption() for s in self.train_scenes]
        self.test_captions = [s.caption() for s in self.test_scenes]
        self.vocab = Vocab.build(all_captions())
        self.train_images = _images(self.train_scenes, image_size)
        self.test_images = _images(self.test_scenes, image_size)
        self.model_cfg = replace(sizes, vocab_size=len(self.vocab))
        self.data_options = {"test_size": len(self.test_scenes), "held_out": float(held_out)}
        self.data_options |= {"eval_size": self.eval_size, "seed": seed}
        self._words = [self.vocab.encode(c) for c in self.train_captions]

    def _scenes(self, pool: list[str], n: int, rng: random.Random) -> list[Scene]:
        """``n`` random scenes whose captions cycle through ``pool``."""
        return [random_scene(pool[i % len(pool)], rng, self.image_size) for i in range(n)]

    def build_model(self) -> nn.Module:
        return Captioner(self.model_cfg)

    def config(self) -> dict[str, Any]:
        model, data = self.model_cfg.__dict__, self.data_options
        return {"task": self.name, "model": model, "vocab": self.vocab.tokens, "data": data}

    def num_train(self) -> int:
        return len(self._words)

    def batch(self, indices: Tensor) -> CaptionBatch:
        idx = indices.tolist()
        words_in, _ = pad_batch([[1, *self._words[i]] for i in idx])
        words_out, _ = pad_batch([[*self._words[i], 2] for i in idx])
        return CaptionBatch(self.train_images[indices].float() / 255.0, words_in, words_out)

    def loss(self, model: nn.Module, batch: CaptionBatch) -> Tensor:
        logits = model(batch.images, batch.words_in)  # (B, Lt, V)
        return F.cross_entropy(logits.flatten(0, 1), batch.words_out.flatten(), ignore_index=0)

    def caption(self, model: Captioner, images: Tensor, batch_size: int = 500) -> list[str]:
        """Greedy captions of uint8 ``images (N, 3, H, W)``, ``batch_size`` (>= 1) at a time."""
        batch_size = positive_int("batch_size", batch_size)  # 0 failed inside split
        out: list[str] = []
        for x in images.split(batch_size):
            out += [self.vocab.decode(r) for r in model.generate(x.float() / 255.0)]
        return out

    def evaluate(self, model: nn.Module, *, limit: int | None = None) -> dict[str, float]:
        """Exact caption match (%) on held-out scenes; ``score`` is exact / 100."""
        assert isinstance(model, Captioner)
        n = limit_or(limit, self.eval_size)
        hyps = self.caption(model, self.test_images[:n])
        hits = sum(h == r for h, r in zip(hyps, self.test_captions[:n], strict=True))
        return {"exact": round(100 * hits / len(hyps), 2), "score": hits / len(hyps)}


def word_attention(model: Captioner, image: Tensor) -> tuple[list[int], Tensor]:
    """Greedy caption ids of one uint8 image ``(3, H, W)`` and the attention of each
    decoding step over the patch grid: ``(T + 1, gh, gw)`` (the last row is EOS's step,
    or fewer rows if decoding hit its length limit)."""
    from attnlab.interpret.image import patch_grid

    with capture(model, layers=["attention"]) as cap:
        ids = model.generate(image[None].float() / 255.0)[0]
    w = torch.cat([c.weights[0, 0] for c in cap.records])  # (steps, N)
    return ids, patch_grid(w, model.patches.grid)


def write_report(
    task: CaptioningTask, model: Captioner, scores: dict[str, float], folder: Path, n: int = 6
) -> Path:
    """Per-word attention PNGs of the first ``n`` test scenes and ``report.html``."""
    from attnlab.interpret.image import image_attention

    folder.mkdir(parents=True, exist_ok=True)
    sections = []
    for i in range(min(n, len(task.test_scenes))):
        ids, maps = word_attention(model, task.test_images[i])
        hyp, ref = task.vocab.decode(ids), task.test_captions[i]
        words = [task.vocab.tokens[j] for j in ids] + ["<eos>"]
        words = words[: len(maps)]
        png = image_attention(
            task.test_images[i].permute(1, 2, 0),
            maps[: len(words)],
            words,
            folder / f"caption_{i}.png",
            title=hyp,
        )
        ok = "correct" if hyp == ref else f"expected: {ref}"
        sections.append(Section(f"test scene {i}", f"{hyp} ({ok})", [png]))
    return write_html(folder / "report.html", "Show, attend and tell: shapes", scores, sections)


def finish(task: CaptioningTask, model: nn.Module, folder: Path) -> dict[str, float]:
    """Exact match on every held-out scene, samples, per-word attention pictures, report."""
    assert isinstance(model, Captioner)
    hyps = task.caption(model, task.test_images)
    ok = [h == r for h, r in zip(hyps, task.test_captions, strict=True)]
    exact = 100.0 * sum(ok) / len(ok)
    scores = {"exact": round(exact, 2), "test_scenes": float(len(ok))}
    scores["held_out_captions"] = float(len(task.test_pool))
    print(
        f"held-out scores ({len(ok)} scenes of {len(task.test_pool)} unseen captions):",
        json.dumps(scores),
    )
    for h, r, good in list(zip(hyps, task.test_captions, ok, strict=True))[:6]:
        print(f"  {'ok ' if good else 'BAD'} {h}" + ("" if good else f"  (expected: {r})"))
    write_report(task, model, scores, folder)
    return scores


SPEC = TaskSpec(
    summary="Show, attend and tell on Pillow-drawn shapes, per-word attention maps",
    build=lambda n: CaptioningTask(20_000 if n is None else n),
    defaults={
        "steps": 2400,
        "batch_size": 64,
        "lr": 2e-3,
        "warmup": 100,
        "eval_every": 400,
        "threads": 1,
    },
    finish=finish,
    score_range=(0.0, 1.0),
)
