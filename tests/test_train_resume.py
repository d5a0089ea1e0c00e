"""What a resumed run takes from its checkpoints: the best model after a crash between
the saves of one evaluation, and refusals and warnings for a run that is not the same."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from attnlab.train import (
    Checkpoint,
    CheckpointError,
    TrainConfig,
    Trainer,
    load_checkpoint,
    save_checkpoint,
)
from attnlab.train import loop as loopmod
from attnlab.train.checkpoint import restore_task_state
from tests.test_train import LinearTask


class Crash(Exception):
    """The process dies here (a SIGKILL, the OOM killer): nothing after it runs."""


class ScoredTask(LinearTask):
    """:class:`LinearTask` whose evaluations score ``scores`` in turn."""

    def __init__(self, *scores: float) -> None:
        super().__init__()
        self.scores = list(scores)

    def evaluate(self, m: torch.nn.Module) -> dict[str, float]:
        return {"score": self.scores.pop(0)}


def _cfg(out: Path, **kw: Any) -> TrainConfig:
    base = {"steps": 8, "batch_size": 8, "warmup": 1, "eval_every": 2, "lr": 0.01}
    return TrainConfig(**base | kw, out_dir=str(out), progress=False)


def _crash_at(monkeypatch: pytest.MonkeyPatch, name: str, nth: int, *, after: bool) -> None:
    """Die at the ``nth`` save of ``name``: before it is written, or just ``after``."""
    real, seen = loopmod.save_checkpoint, []

    def save(path: Path, ckpt: Checkpoint) -> Path:
        seen.extend([1] if Path(path).name == name else [])
        if len(seen) == nth and not after:
            raise Crash(path)
        out = real(path, ckpt)
        if len(seen) == nth and after:
            raise Crash(path)
        return out

    monkeypatch.setattr(loopmod, "save_checkpoint", save)


@contextmanager
def _no_warning() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def _weights(ckpt: Checkpoint) -> list[torch.Tensor]:
    return [ckpt.model[k] for k in sorted(ckpt.model)]


def test_a_crash_between_the_saves_of_last_and_best_keeps_the_best_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(Killed after ``last`` of step 4, which recorded its score 0.2 as the best, before
    ``best`` of step 4 was written: the resumed run kept step 2's model as the best for
    good, since no later score beat 0.2.) The resume writes ``best`` from ``last``."""
    _crash_at(monkeypatch, "best.safetensors", 2, after=False)  # the best of step 4
    with pytest.raises(Crash):
        Trainer(ScoredTask(0.1, 0.2), _cfg(tmp_path)).fit()
    monkeypatch.undo()
    at_crash = load_checkpoint(tmp_path / "last.safetensors")
    assert at_crash.state["step"] == 4 and at_crash.state["best"] == 0.2
    assert load_checkpoint(tmp_path / "best.safetensors").state["step"] == 2  # stale
    with _no_warning():
        resumed = Trainer(ScoredTask(0.15, 0.1), _cfg(tmp_path, resume=True))
    resumed.fit()
    best = load_checkpoint(tmp_path / "best.safetensors")
    assert best.state["step"] == 4 and best.state["history"][-1]["score"] == 0.2
    assert all(map(torch.equal, _weights(best), _weights(at_crash)))
    assert resumed.best == 0.2 and resumed.best_step == 4


def test_a_fresh_run_killed_at_its_first_save_never_keeps_the_earlier_runs_best(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(A fresh run over a folder removed the earlier run's ``best`` only after writing its
    own ``last``: killed in between, and resumed, the folder's best was seed 5's model
    beside the seed-0 run's last.)"""
    Trainer(ScoredTask(0.9, 0.8, 0.7, 0.6), _cfg(tmp_path, seed=5)).fit()
    assert load_checkpoint(tmp_path / "best.safetensors").state["train"]["seed"] == 5
    _crash_at(monkeypatch, "last.safetensors", 1, after=True)
    with pytest.raises(Crash):
        Trainer(ScoredTask(0.3), _cfg(tmp_path)).fit()
    monkeypatch.undo()
    assert not (tmp_path / "best.safetensors").exists()  # removed before last was written
    Trainer(ScoredTask(0.2, 0.1, 0.1), _cfg(tmp_path, resume=True)).fit()
    best = load_checkpoint(tmp_path / "best.safetensors")
    assert (best.state["train"]["seed"], best.state["step"], best.state["best"]) == (0, 2, 0.3)


def test_a_best_that_is_not_the_runs_is_removed_and_written_anew(tmp_path: Path) -> None:
    """A ``best`` that holds no model the run recorded (another run's, put there by hand)
    cannot be recovered: a warning names it, and the next evaluation writes a new best
    (it was kept, and only a score above the lost one's replaced it)."""
    Trainer(ScoredTask(0.5, 0.1), _cfg(tmp_path, steps=4)).fit()
    save_checkpoint(tmp_path / "best.safetensors", Checkpoint(torch.nn.Linear(3, 1).state_dict()))
    msg = r"best\.safetensors was not this run's best model \(the best model was step 2's\); it"
    with pytest.warns(UserWarning, match=msg + " was removed, and the next evaluation writes"):
        resumed = Trainer(ScoredTask(0.2, 0.1), _cfg(tmp_path, steps=8, resume=True))
    assert not (tmp_path / "best.safetensors").exists() and resumed.best == float("-inf")
    resumed.fit()
    best = load_checkpoint(tmp_path / "best.safetensors")
    assert (best.state["step"], best.state["best"]) == (6, 0.2)
    with _no_warning():  # the control: resumed again, its best is its own
        Trainer(ScoredTask(), _cfg(tmp_path, steps=10, resume=True))
    assert (tmp_path / "best.safetensors").exists()


def test_a_checkpoint_from_before_the_best_was_recorded_keeps_its_best(tmp_path: Path) -> None:
    """``last`` files written before they recorded the best model's digest resume as they
    did: the best file found is taken as the run's."""
    Trainer(ScoredTask(0.5, 0.1), _cfg(tmp_path, steps=4)).fit()
    last = load_checkpoint(tmp_path / "last.safetensors")
    for key in ("best_step", "best_digest"):
        del last.state[key]
    save_checkpoint(tmp_path / "last.safetensors", last)
    with _no_warning():
        resumed = Trainer(ScoredTask(0.2, 0.1), _cfg(tmp_path, steps=8, resume=True))
    assert (resumed.best, resumed.best_step) == (0.5, 2)
    resumed.fit()
    assert load_checkpoint(tmp_path / "best.safetensors").state["step"] == 2


def test_a_resume_keeps_the_runs_settings_and_names_each_given_otherwise(
    tmp_path: Path,
) -> None:
    """(``Trainer(task, TrainConfig(..., resume=True))`` took another lr, seed and batch
    size without a word, and weight_decay 0.3 was silently the checkpoint's 0.01: AdamW
    loads the saved param_groups.) It goes on as the run would have, as ``attnlab train
    --resume`` does, and warns of each setting given otherwise."""
    run = {"batch_size": 8, "lr": 0.01, "weight_decay": 0.01, "warmup": 1, "seed": 0}
    run |= {"min_lr_ratio": 0.05, "clip": 1.0}
    other = {"batch_size": 4, "lr": 0.05, "weight_decay": 0.3, "warmup": 3, "seed": 7}
    other |= {"min_lr_ratio": 0.5, "clip": 0.1}
    straight = Trainer(ScoredTask(*[0.5] * 4), _cfg(tmp_path / "straight", **run))
    straight.fit()
    Trainer(ScoredTask(0.5), _cfg(tmp_path, **run, target=0.5)).fit()  # stops at step 2
    asked = _cfg(tmp_path, **other, resume=True)
    another = ScoredTask()
    another.config = lambda: {"task": "another"}  # type: ignore[method-assign]
    with _no_warning(), pytest.raises(CheckpointError, match="another configuration"):
        Trainer(another, asked)  # refused: no word of its settings first
    with pytest.warns(UserWarning) as caught:
        resumed = Trainer(ScoredTask(0.5, 0.5, 0.5), asked)
    last = tmp_path / "last.safetensors"
    assert [str(w.message) for w in caught] == [
        f"resume: {last}: {k} {other[k]} is not the checkpoint's {run[k]}: the resumed run "
        f"keeps {run[k]} (resume=False trains afresh with {other[k]})"
        for k in ("seed", "batch_size", "lr", "weight_decay", "warmup", "min_lr_ratio", "clip")
    ]
    assert all(getattr(resumed.cfg, k) == v for k, v in run.items())
    assert asked.lr == 0.05  # the caller's config is left as it was
    assert resumed.opt.param_groups[0]["weight_decay"] == 0.01
    resumed.fit()
    for a, b in zip(resumed.model.parameters(), straight.model.parameters(), strict=True):
        assert torch.equal(a, b)  # the steps of the run never stopped
    with _no_warning():  # the control: its own settings, no word
        Trainer(ScoredTask(), _cfg(tmp_path, **run, steps=10, resume=True))


def _tasks() -> dict[str, Any]:
    """Per task: its tiny build, one data or loss option changed, what the refusal says."""
    from attnlab.models.gan import GANConfig
    from attnlab.models.vae import VAEConfig
    from attnlab.tasks.captioning import CaptioningTask
    from attnlab.tasks.classification import DocumentTask
    from attnlab.tasks.dates import DatesTask
    from attnlab.tasks.generation import GenerationTask
    from attnlab.tasks.generative import digits
    from attnlab.tasks.generative_task import GANTask, VAETask
    from attnlab.tasks.translation import TranslationTask
    from attnlab.tasks.vision import DigitsTask

    gan, vae = GANConfig(latent_dim=4, channels=8), VAEConfig(latent_dim=4, channels=8)
    other_images = {"train_size": None, "images": digits()[0][64:128]}  # 64 other ones
    return {
        "vision": (
            lambda **k: DigitsTask(100, d_model=16, **k),
            {"label_smoothing": 0.2},
            "data.label_smoothing: 0.1 -> 0.2",
        ),
        "translation": (
            lambda **k: TranslationTask(128, 8, d_model=32, **k),
            {"seed": 1},
            "data.seed: 1234 -> 1",
        ),
        "dates": (
            lambda **k: DatesTask(20, 5, locales=("de_DE",), **k),
            {"eval_size": 4},
            "data.eval_size: 500 -> 4",
        ),
        "generation": (
            lambda **k: GenerationTask(60, 10, d_model=16, **k),
            {"seed": 1},
            "data.seed: 1234 -> 1",
        ),
        "captioning": (
            lambda **k: CaptioningTask(20, 4, **k),
            {"held_out": 0.3},
            "data.held_out: 0.2 -> 0.3",
        ),
        "classification": (
            lambda **k: DocumentTask(40, **{"test_size": 8} | k),
            {"test_size": 9},
            "data.test_size: 8 -> 9",
        ),
        "gan": (
            lambda **k: GANTask(cfg=gan, **{"train_size": 64} | k),
            {"samples": 99},
            "data.samples: 1437 -> 99",
        ),
        "vae": (
            lambda **k: VAETask(cfg=vae, **{"train_size": 64} | k),
            other_images,
            "data.images: None -> '",  # their digest
        ),
    }


NAMES = ["captioning", "classification", "dates", "gan", "generation", "translation", "vae"]


@pytest.mark.parametrize("name", [*NAMES, "vision"])
def test_a_resume_on_other_data_or_another_loss_is_refused(name: str) -> None:
    """(A task's data seed, held-out share, evaluation size, label smoothing, ... were not
    in its config: DigitsTask(seed=1) resumed a seed-0 checkpoint and trained on 292 of
    the 360 images it had held out, TranslationTask(seed=1) one of seed 1234 sharing 109
    of its 512 training pairs.) Each is in config()["data"], and a resume names it."""
    pytest.importorskip("babel"), pytest.importorskip("sklearn")
    build, changed, says = _tasks()[name]
    ours, other = build(), build(**changed)
    assert ours.num_train() == other.num_train()  # the size check cannot see it
    ckpt = Checkpoint({}, ours.config(), state={"train_size": ours.num_train()})
    restore_task_state(build(), ckpt, "last.safetensors")  # the control: the same task
    with pytest.raises(CheckpointError, match=r"another configuration .*: " + re.escape(says)):
        restore_task_state(other, ckpt, "last.safetensors")


def test_a_checkpoint_from_before_the_data_options_resumes_a_task_with_the_defaults(
    tmp_path: Path,
) -> None:
    """A ``last`` whose config has no ``data`` (saved before the options were named) meant
    the task's defaults: it resumes a task built with them, and no other."""
    pytest.importorskip("sklearn")
    from attnlab.tasks.vision import DigitsTask

    def task(**kw: Any) -> DigitsTask:
        return DigitsTask(100, d_model=16, num_heads=2, layers=1, dim_feedforward=16, **kw)

    Trainer(task(), _cfg(tmp_path, steps=2)).fit()
    last = load_checkpoint(tmp_path / "last.safetensors")
    assert last.config.pop("data") == {"test_fraction": 0.2, "seed": 0, "label_smoothing": 0.1}
    save_checkpoint(tmp_path / "last.safetensors", last)  # as the older code wrote it
    assert Trainer(task(), _cfg(tmp_path, steps=4, resume=True)).step == 2
    with pytest.raises(CheckpointError, match=r"another configuration .*: data\.seed: 0 -> 1;"):
        Trainer(task(seed=1), _cfg(tmp_path, steps=4, resume=True))
