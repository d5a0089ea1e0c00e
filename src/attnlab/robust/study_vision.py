"""The vision study: the ViT on 8x8 digits, plain against FGM, PGD and FreeLB training,
measured by clean accuracy and accuracy under PGD (L-infinity, 10 steps) at three budgets.

Pixels are in [0, 1] (sklearn's 0..16 grey levels divided by 16), so one grey level is
1/16 = 0.0625. The budgets are 0.05, 0.1 and 0.2 (0.8, 1.6 and 3.2 grey levels on every
pixel at once); adversarial training uses the middle one, in pixel space (the patch
embedding's input, kept in [0, 1]).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from attnlab.robust.adversarial import FGM, PGD, FreeLB
from attnlab.robust.attacks import pgd_pixels
from attnlab.robust.study import Row, check_methods, train_row, write_outputs
from attnlab.tasks.vision import DigitsTask
from attnlab.train import Plugin, TrainConfig

__all__ = ["BUDGETS", "METHODS", "evaluate_vision", "vision_plugins", "vision_study"]

BUDGETS = (0.05, 0.1, 0.2)
METHODS = ("plain", "fgm", "pgd", "pgd_mixed", "freelb")
_PIXELS = {"site": "input", "bounds": (0.0, 1.0), "norm": "linf"}


def vision_plugins(method: str, epsilon: float = BUDGETS[1]) -> list[Plugin]:
    """The plug-ins of ``method`` (one of :data:`METHODS`) at training budget ``epsilon``.

    Example:
        >>> [type(p).__name__ for p in vision_plugins("pgd")]
        ['PGD']
    """
    if method == "plain":
        return []
    if method == "fgm":  # FGSM with a random start would be "fast AT"; this is plain FGSM
        return [FGM(epsilon, **_PIXELS)]  # type: ignore[arg-type]
    if method in ("pgd", "pgd_mixed"):  # mixed: the clean loss added to the adversarial one
        return [PGD(epsilon, steps=5, clean=method == "pgd_mixed", **_PIXELS)]  # type: ignore[arg-type]
    if method == "freelb":
        return [FreeLB(epsilon, steps=3, alpha=epsilon / 2, **_PIXELS)]  # type: ignore[arg-type]
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def evaluate_vision(
    task: DigitsTask, model: torch.nn.Module, budgets: Sequence[float] = BUDGETS
) -> dict[str, float]:
    """Clean accuracy and accuracy under PGD-10 L-inf at each budget (%, all test images)."""
    x, y = task.test_x, task.test_y
    out = {"clean": 100.0 * float((task.predict(model, x) == y).float().mean())}
    for eps in budgets:
        adv = pgd_pixels(model, x, y, epsilon=eps, steps=10, seed=0)
        out[f"pgd@{eps:g}"] = 100.0 * float((task.predict(model, adv) == y).float().mean())
    return {k: round(v, 2) for k, v in out.items()}


def vision_study(
    methods: Sequence[str] = METHODS,
    *,
    steps: int = 800,
    seed: int = 0,
    smoke: bool = False,
    out: Path | None = None,
) -> list[Row]:
    """Train each method from scratch (same seed, steps and settings) and measure it.

    ``smoke``: 300 training images, a small model, 20 steps (checks the pipeline only).
    """
    methods = check_methods("methods", methods, METHODS)
    if smoke:
        task = DigitsTask(300, d_model=16, num_heads=2, layers=1, dim_feedforward=32)
        steps = 20
    else:
        task = DigitsTask()
    cfg = TrainConfig(
        steps=steps, batch_size=128, lr=2e-3, warmup=min(150, steps // 10), seed=seed,
        eval_every=steps, progress=False, threads=1,
    )  # fmt: skip
    rows = []
    for method in methods:
        model, seconds = train_row(task, cfg, vision_plugins(method))
        rows.append(Row(method, evaluate_vision(task, model), round(seconds, 1)))
        print(rows[-1].line(), flush=True)
    if out is not None:
        columns = ["clean", *(f"pgd@{e:g}" for e in BUDGETS)]
        notes = [
            f"Accuracy (%) on the {len(task.test_y)} held-out test images, clean and under "
            "PGD (L-infinity, 10 steps, step 2.5 eps / 10, random start) at budgets "
            f"{', '.join(f'{e:g}' for e in BUDGETS)} on pixels in [0, 1] (one grey level = "
            "0.0625). Adversarial training at 0.1 in pixel space; every row trained from "
            f"scratch with seed {seed}, {steps} steps of 128 images."
        ]
        write_outputs(out, "ViT on digits under PGD", rows, columns, notes, settings=cfg.__dict__)
    return rows
