"""Does attention help small generative models? SAGAN and an attending-decoder VAE on
scikit-learn's 8x8 digits, each against the same model without attention (the anchor) at
the same budget (steps, batch size, learning rates, seed).

Training is ``attnlab train gan | gan-plain | vae | vae-plain``'s (the Trainer, its
defaults, simultaneous G/D updates; :mod:`attnlab.tasks.generative_task`), without the
evaluations in between, which do not change it: with the same ``--seed`` and one thread
this prints the figures that ``attnlab train TASK --seed S`` prints. Quality is scored as
:mod:`attnlab.tasks.generative` states: the Fréchet distance between the vision task's ViT
features (pooled CLS state before the head) of the training images and of ``--samples``
generated images, and the share of the 10 classes that the ViT assigns to at least 5% of
the samples. A ``real`` line scores the held-out test images the same way: the floor that
a perfect generator would reach with that many images.

Each line is JSON: model, attention, steps, frechet, coverage, train_s, and for the
attention line the anchor's figures beside it and ``frechet_ratio`` (ours / anchor; < 0.9
means attention improved the distance by more than 10%).

python benchmarks/bench_generative.py            # full size, a few minutes per model
python benchmarks/bench_generative.py --smoke    # tiny, for CI
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import torch

from attnlab.cli._args import int_in, parse_smoke, script_parser
from attnlab.models.gan import GANConfig
from attnlab.models.vae import VAEConfig
from attnlab.tasks.generative import DigitsScorer, digits, train_feature_vit
from attnlab.tasks.generative_task import TrainResult, train_gan, train_vae
from attnlab.tasks.vision import load_split


def parse() -> argparse.Namespace:
    p = script_parser(__doc__)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
    p.add_argument("--gan-steps", type=int_in(1), default=2000)
    p.add_argument("--vae-steps", type=int_in(1), default=3000)
    p.add_argument("--vit-steps", type=int_in(1), default=600)
    p.add_argument("--samples", type=int_in(1), default=1437)
    p.add_argument(
        "--seed", type=int_in(0), default=0, help="training seed (split and scoring ViT: seed 0)"
    )
    p.add_argument("--threads", type=int_in(1), default=1)
    return parse_smoke(p, None, {"gan_steps": 3, "vae_steps": 3, "vit_steps": 3, "samples": 64})


def train(kind: str, attention: bool, args: argparse.Namespace, x: torch.Tensor) -> TrainResult:
    """One model of ``kind`` ("gan" or "vae") with or without attention."""
    small = args.smoke
    if kind == "gan":
        gcfg = GANConfig(latent_dim=8 if small else 32, channels=8 if small else 64)
        gcfg.attention = attention
        return train_gan(gcfg, x, steps=args.gan_steps, batch_size=64, seed=args.seed)
    vcfg = VAEConfig(latent_dim=4 if small else 16, channels=8 if small else 32)
    vcfg.attention = attention
    return train_vae(vcfg, x, steps=args.vae_steps, batch_size=64, seed=args.seed)


def samples(r: TrainResult, n: int) -> torch.Tensor:
    """``n`` images from the noise seed that attnlab train's evaluation uses."""
    return r.model.sample(n, generator=torch.Generator().manual_seed(1))


def line(kind: str, attention: bool, r: TrainResult, scores: dict[str, float]) -> dict[str, Any]:
    steps = len(r.losses)
    return {"model": kind, "attention": attention, "steps": steps, **scores,
            "train_s": round(r.seconds, 2)}  # fmt: skip


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    common = {
        "cpu": torch.backends.cpu.get_cpu_capability(),
        "threads": args.threads,
        "load_1min": os.getloadavg()[0],
    }
    t0 = time.perf_counter()
    vit = train_feature_vit(args.vit_steps, seed=0)  # as attnlab train's scorer
    x = digits()[0]  # (1437, 1, 8, 8) in [-1, 1]
    scorer = DigitsScorer(vit, x)
    test_x = load_split(0.2, 0)[2] * 2 - 1  # held-out images in [-1, 1]
    real = {"model": "real", **scorer.score(test_x), "vit_train_s": time.perf_counter() - t0}
    print(json.dumps({**real, **common}), flush=True)
    for kind in ("gan", "vae"):
        anchor = train(kind, False, args, x)
        a_scores = scorer.score(samples(anchor, args.samples))
        print(json.dumps({**line(kind, False, anchor, a_scores), **common}), flush=True)
        ours = train(kind, True, args, x)
        o_scores = scorer.score(samples(ours, args.samples))
        ratio = o_scores["frechet"] / max(a_scores["frechet"], 1e-12)
        out = {
            **line(kind, True, ours, o_scores),
            "anchor_frechet": a_scores["frechet"],
            "anchor_coverage": a_scores["coverage"],
            "anchor_train_s": round(anchor.seconds, 2),
            "frechet_ratio": round(ratio, 3),
        }
        print(json.dumps({**out, **common}), flush=True)


if __name__ == "__main__":
    main()
