"""Cost of a training step under each adversarial plug-in, against plain training.

The anchor is a plain step (``task.loss(model, batch).backward()`` then AdamW) of the same
:class:`attnlab.train.Trainer` on the same batches; each plug-in's step is timed
interleaved with it (``--repeat`` rounds of ``--steps`` steps each, alternating plain and
plug-in, median per round), so a shared machine slows both alike. ``ratio`` is
``ours_ms / anchor_ms``: the plug-in's cost in plain steps (FGM ~2, PGD-k ~k+1, FreeLB-k
~k, SMART-k ~k+3 forwards and k+1 backwards).

Models: the ViT on 8x8 digits (patch embeddings perturbed) and the hierarchical
document classifier (word embeddings perturbed).

python benchmarks/bench_robust.py            # both models, all plug-ins
python benchmarks/bench_robust.py --smoke    # tiny, for CI
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from attnlab.cli._args import int_in, parse_smoke, script_parser
from attnlab.robust import FGM, PGD, SMART, FreeLB
from attnlab.train import Plugin, TrainConfig, Trainer


def plugins(outputs: Callable[[Any, Any], torch.Tensor]) -> dict[str, Plugin]:
    """The plug-ins timed: each at its usual setting."""
    return {
        "fgm": FGM(0.1),
        "pgd3": PGD(0.1, steps=3),
        "freelb3": FreeLB(0.1, steps=3),
        "smart1": SMART(outputs, epsilon=0.01),
    }


def tasks(smoke: bool) -> dict[str, tuple[Any, Callable[[Any, Any], torch.Tensor]]]:
    """Each model's task and its ``outputs(model, batch) -> logits``."""
    from attnlab.tasks.classification import DocumentTask
    from attnlab.tasks.vision import DigitsTask

    small = dict(d_model=16, num_heads=2, layers=1, dim_feedforward=32) if smoke else {}
    return {
        "vit_digits": (DigitsTask(256, **small), lambda m, b: m(b.images)),  # type: ignore[arg-type]
        "han_documents": (
            DocumentTask(256, 8) if smoke else DocumentTask(2000, 8),
            lambda m, b: m(b.ids).logits,
        ),
    }


def time_steps(trainer: Trainer, steps: int) -> float:
    """Median milliseconds of ``steps`` training steps."""
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    p = script_parser(__doc__)
    p.add_argument("--steps", type=int_in(1), default=10)
    p.add_argument("--repeat", type=int_in(1), default=3)
    p.add_argument("--batch-size", type=int_in(1), default=64)
    p.add_argument("--smoke", action="store_true")
    a = parse_smoke(p, None, {"steps": 2, "repeat": 1, "batch_size": 8})
    steps, repeat, bs = a.steps, a.repeat, a.batch_size
    torch.set_num_threads(1)
    cap = torch.backends.cpu.get_cpu_capability()
    for model_name, (task, outputs) in tasks(a.smoke).items():
        cfg = TrainConfig(steps=10**6, batch_size=bs, progress=False, warmup=1)
        for name, plugin in plugins(outputs).items():
            plain, ours = Trainer(task, cfg), Trainer(task, cfg, plugins=[plugin])
            rounds = [(time_steps(plain, steps), time_steps(ours, steps)) for _ in range(repeat)]
            anchor_ms = statistics.median(r[0] for r in rounds)
            ours_ms = statistics.median(r[1] for r in rounds)
            row = {
                "bench": "robust_step",
                "model": model_name,
                "plugin": name,
                "batch_size": bs,
                "anchor": "plain step",
                "anchor_ms": round(anchor_ms, 2),
                "ours_ms": round(ours_ms, 2),
                "ratio": round(ours_ms / anchor_ms, 2),
                "cpu": cap,
                "threads": 1,
            }
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
