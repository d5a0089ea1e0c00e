"""A small, deterministic training loop: AdamW, warmup + cosine, clipping, evaluation,
early stop, atomic safetensors checkpoints, exact resume, and a clean stop on Ctrl-C or
SIGTERM (a final checkpoint, then :class:`~attnlab.train.interrupt.TrainingInterrupted`).

Batches are a pure function of ``(seed, step)`` (a seeded permutation per epoch), the
learning rate a pure function of the step, and the torch RNG state (dropout) is saved in
every checkpoint: a resumed run takes the same steps as one that never stopped.
"""

from __future__ import annotations

import math
import numbers
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

from attnlab._validate import (
    instance_of,
    nonnegative_int,
    plain_fields,
    positive_int,
    validate_flag,
)
from attnlab.train._best import model_digest, resumed_best
from attnlab.train._progress import check_threads, flush_denormal, num_threads, progress_bar
from attnlab.train.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    load_model_state,
    load_optimizer_state,
    restore_task_state,
    save_checkpoint,
    task_state,
)
from attnlab.train.interrupt import TrainingInterrupted, say_complete, stop_requests
from attnlab.train.protocols import LossFn, Plugin, Task, eval_score
from attnlab.train.resume import kept_message, resumed_config

__all__ = ["LossFn", "Plugin", "Task", "TrainConfig", "Trainer", "lr_factor", "num_threads"]


MAX_SEED = 2**32 - 1  # numpy's and the epochs' seeds stay in range


@dataclass
class TrainConfig:
    """Training settings.

    Attributes:
        steps: optimizer steps at most.
        batch_size: examples per step.
        lr, weight_decay, warmup, clip: AdamW, linear warmup steps then cosine decay to
            ``min_lr_ratio * lr``, gradient-norm clipping (0 = off).
        eval_every: steps between evaluations (and checkpoints).
        target: stop once the task's ``score`` (its ``evaluate()``'s) reaches it.
        patience: stop after this many evaluations without a better score.
        time_limit: stop (after a last evaluation) at the first step past this many seconds.
        seed: seeds the model init, the batch order and what the steps draw from torch's
            (CPU) RNG, such as dropout and a task's random shifts: the first step starts
            from the RNG as :class:`Trainer` left it, whatever drew from it in between.
        out_dir: where ``last.safetensors`` and ``best.safetensors`` go (None: no files;
            ``""`` is refused).
        resume: continue from ``out_dir/last.safetensors`` if it exists, with the
            checkpoint's seed, batch_size, lr, weight_decay, warmup, min_lr_ratio and clip
            (a warning names each given otherwise; see :mod:`attnlab.train.resume`).
        progress: show a rich progress bar with loss and throughput.
        flush_denormal: treat denormal floats as 0 during :meth:`Trainer.fit`
            (``torch.set_flush_denormal``; switched off again afterwards). Adam's
            second moments of rarely-used weights decay into denormals, which the CPU
            computes tens of times slower: on the translation task this halves the step time.
        threads: ``torch.set_num_threads`` for the run (None: leave it). Models made of
            many small steps (RNN decoders) run faster on one thread, and a shared CPU
            stalls torch's thread pool. On one thread a run is the same bit for bit each
            time; on more, the blocked engine's backward sums its key and value gradients
            in an order that varies (last bits) unless
            ``torch.use_deterministic_algorithms(True)`` is set.

    Raises:
        TypeError, ValueError: a field of the wrong type or out of range, named (e.g.
            ``steps must be a positive int, got -5``).

    Example:
        >>> TrainConfig(steps=100, eval_every=10).warmup  # the others keep their defaults
        100
        >>> TrainConfig(steps=-5)
        Traceback (most recent call last):
        ValueError: steps must be a positive int, got -5
    """

    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 100
    min_lr_ratio: float = 0.05
    clip: float = 1.0
    eval_every: int = 250
    target: float | None = None
    patience: int | None = None
    time_limit: float | None = None
    seed: int = 0
    out_dir: str | None = None
    resume: bool = False
    progress: bool = True
    flush_denormal: bool = True
    threads: int | None = None

    def __post_init__(self) -> None:
        plain_fields(self)  # numpy scalars as Python's: the config stays JSON-able
        # each field keeps the validator's plain int/float: a numpy scalar kept as given
        # failed the first checkpoint's JSON (float32) or torch's manual_seed (int64)
        for name in ("steps", "batch_size", "eval_every"):
            setattr(self, name, positive_int(name, getattr(self, name)))
        for name in ("warmup", "seed"):
            setattr(self, name, nonnegative_int(name, getattr(self, name)))
        if self.seed > MAX_SEED:  # the epoch seeds overflowed torch's generator at 1.8e14
            raise ValueError(f"seed must be an int in [0, {MAX_SEED}], got {self.seed}")
        for name in ("resume", "progress", "flush_denormal"):  # resume="no" resumed
            setattr(self, name, validate_flag(name, getattr(self, name)))
        if self.patience is not None:
            self.patience = positive_int("patience", self.patience)
        self.threads = check_threads(self.threads)  # (bounded: torch overflowed at 10**12)
        self.lr = _real("lr", self.lr, low=0.0, open_low=True)
        self.weight_decay = _real("weight_decay", self.weight_decay, low=0.0)
        self.min_lr_ratio = _real("min_lr_ratio", self.min_lr_ratio, low=0.0, high=1.0)
        self.clip = _real("clip", self.clip, low=0.0)
        if self.time_limit is not None:
            self.time_limit = _real("time_limit", self.time_limit, low=0.0, open_low=True)
        if self.target is not None:
            self.target = _real("target", self.target)
        if self.out_dir is not None and not isinstance(self.out_dir, str | Path):
            raise TypeError(
                f"out_dir must be a str, a Path or None, got {type(self.out_dir).__name__}"
            )
        if self.out_dir == "":  # (it wrote no files, and resume=True resumed nothing)
            raise ValueError("out_dir must be a directory path or None (no files), got ''")
        if isinstance(self.out_dir, Path):
            self.out_dir = str(self.out_dir)  # checkpoints store the config as JSON


def _real(
    name: str,
    value: object,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    open_low: bool = False,
) -> float:
    """``value`` as a finite float in ``[low, high]`` (``(low, high]`` if ``open_low``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    v = float(value)
    if not math.isfinite(v) or v < low or v > high or (open_low and v == low):
        lo = "(" if open_low else "["
        raise ValueError(f"{name} must be a finite number in {lo}{low}, {high}], got {value!r}")
    return v


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to 1, then cosine decay to ``min_lr_ratio``.

    Example:
        >>> cfg = TrainConfig(steps=100, warmup=10)
        >>> lr_factor(4, cfg), lr_factor(10, cfg), round(lr_factor(100, cfg), 3)
        (0.5, 1.0, 0.05)
    """
    step = nonnegative_int("step", step)
    instance_of("cfg", cfg, TrainConfig, "a TrainConfig")
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cos


class Trainer:
    """Train ``task``'s model under ``cfg``; :meth:`fit` returns the evaluation history.

    ``on_eval`` receives each evaluation record (step, loss, seconds, task metrics).
    ``plugins`` change how each step's gradients are computed (:class:`Plugin`); with
    none, a step is ``task.loss(model, batch).backward()``.

    Example:
        >>> from attnlab.tasks.translation import TranslationTask
        >>> task = TranslationTask(train_size=128, test_size=8, d_model=32)
        >>> cfg = TrainConfig(steps=3, batch_size=16, eval_every=3, progress=False)
        >>> hist = Trainer(task, cfg).fit()
        >>> hist[-1]["step"]
        3
    """

    def __init__(
        self,
        task: Task,
        cfg: TrainConfig,
        *,
        on_eval: Callable[[dict[str, float]], None] | None = None,
        plugins: Sequence[Plugin] = (),
    ) -> None:
        instance_of("cfg", cfg, TrainConfig, "a TrainConfig")
        _check_task(task)
        if on_eval is not None and not callable(on_eval):  # (failed at the first evaluation)
            raise TypeError(f"on_eval must be a callable or None, got {type(on_eval).__name__}")
        self.loss_fn = _with_plugins(task.loss, plugins)
        check_threads(cfg.threads)
        last = Path(cfg.out_dir or ".") / "last.safetensors"
        self._fresh = not (cfg.resume and cfg.out_dir and last.exists())  # (see _save)
        ckpt = None if self._fresh else load_checkpoint(last)
        changed: dict[str, tuple[object, object]] = {}
        if ckpt is not None:  # the run's seed, batch size, lr, ... (each given otherwise:
            cfg, changed = resumed_config(cfg, ckpt.state, last)  # a warning, below)
        self.task, self.cfg, self.on_eval = task, cfg, on_eval
        torch.manual_seed(cfg.seed)
        with num_threads(cfg.threads):  # init may compute (spectral norm): same bits as fit's
            self.model = task.build_model()
        instance_of("task.build_model()", self.model, nn.Module, "a torch.nn.Module")
        groups = getattr(task, "param_groups", None)  # optional: per-group lr_scale, betas
        params = groups(self.model) if groups is not None else self.model.parameters()
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.step, self.best, self.bad_evals = 0, -math.inf, 0
        self.best_step: int | None = None  # of the best model so far, and its weights'
        self.best_digest: str | None = None  # digest (what best.safetensors must hold)
        self.history: list[dict[str, float]] = []
        self._perm: tuple[int, Tensor] | None = None
        if ckpt is not None:
            self._resume(ckpt, last)
            _say_kept(changed, last)  # once sure the resume goes on (it may be refused)
        self.first_step = self.step  # where this run began (a resumed run: past 0)
        self._rng: Tensor | None = torch.get_rng_state()  # the first step starts from it
        self.stop_reason: str | None = None  # why fit() stopped before ``steps``, if it did
        self.eval_seconds = 0.0  # spent in the task's evaluate (a scorer's first training too)

    def _indices(self, step: int) -> Tensor:
        """The example indices of ``step``: a seeded permutation per epoch."""
        n, bs = self.task.num_train(), self.cfg.batch_size
        per_epoch = max(1, n // bs)
        epoch, pos = divmod(step, per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch)
            self._perm = (epoch, torch.randperm(n, generator=g))
        return self._perm[1][pos * bs : (pos + 1) * bs]

    def train_step(self) -> float:
        """One optimizer step; returns the loss. The first one after ``__init__`` starts
        from torch's RNG as ``__init__`` left it (seeded, or the checkpoint's): a draw made
        between ``Trainer(...)`` and :meth:`fit` changes no dropout mask or random shift."""
        if self._rng is not None:
            torch.set_rng_state(self._rng)
            self._rng = None
        self.model.train()
        for group in self.opt.param_groups:
            group["lr"] = self.cfg.lr * group.get("lr_scale", 1.0) * lr_factor(self.step, self.cfg)
        begin = getattr(self.task, "begin_step", None)
        if begin is not None:  # tasks whose data depends on the model (RL rollouts)
            begin(self.model, self.step)
        batch = self.task.batch(self._indices(self.step))
        self.opt.zero_grad(set_to_none=True)  # before: plug-ins may accumulate gradients
        loss = self.loss_fn(self.model, batch)
        value = float(loss.detach())
        if not math.isfinite(value):  # (it went on, and wrote NaN scores and "loss": NaN)
            raise FloatingPointError(
                f"the loss is {value} at step {self.step + 1}: training diverged; the "
                f"model is left as the step before it (try a lower lr than {self.cfg.lr:g})"
            )
        loss.backward()
        if self.cfg.clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip)
        self.opt.step()
        self.step += 1
        return value

    def fit(self) -> list[dict[str, float]]:
        """Train until ``steps``, the target, patience or the time limit ends it (on
        ``cfg.threads`` threads, restored afterwards).

        Raises:
            TrainingInterrupted: a SIGINT/SIGTERM stopped the run before its end (after a
                final checkpoint). A signal during the step that ends the run (its last
                step, an early stop) stops nothing: the run is complete and returns.
        """
        with num_threads(self.cfg.threads), flush_denormal(self.cfg.flush_denormal):
            return self._fit()

    def _fit(self) -> list[dict[str, float]]:
        start = time.perf_counter()
        progress = progress_bar(self.cfg.progress, self.cfg.steps, self.step)
        with progress as advance, stop_requests(saving=bool(self.cfg.out_dir)) as requested:
            cut = False  # whether the signal cut the run short (not its last step, early stop)
            while self.step < self.cfg.steps:
                if requested() is not None:
                    cut = True
                    break
                examples = len(self._indices(self.step))  # < batch_size: a small set
                t0 = time.perf_counter()
                loss = self.train_step()
                advance(loss, examples / (time.perf_counter() - t0))
                elapsed = time.perf_counter() - start
                out_of_time = self.cfg.time_limit is not None and elapsed >= self.cfg.time_limit
                at_eval = self.step % self.cfg.eval_every == 0 or self.step == self.cfg.steps
                if (at_eval or out_of_time) and self._evaluate(loss, elapsed):
                    break
            signum = requested()
            if signum is not None and not cut:  # in the step that ended the run: complete
                say_complete(signum, self.step)  # (it said "interrupted"; resume was refused)
            elif signum is not None:  # saved while a second signal still stops at once
                self._save("last.safetensors")
                raise TrainingInterrupted(self.step, self._path("last.safetensors"), signum)
        return self.history

    def _path(self, name: str) -> Path | None:
        return Path(self.cfg.out_dir) / name if self.cfg.out_dir else None

    def _evaluate(self, loss: float, elapsed: float) -> bool:
        """Evaluate, checkpoint, and say whether to stop."""
        self.model.eval()
        t0 = time.perf_counter()
        with torch.no_grad():
            metrics = self.task.evaluate(self.model)
        self.eval_seconds += time.perf_counter() - t0
        record = {"step": self.step, "loss": loss, "seconds": round(elapsed, 1), **metrics}
        self.history.append(record)
        if self.on_eval is not None:
            self.on_eval(record)
        score = eval_score(metrics, loss, first=len(self.history) == 1)
        improved = score > self.best
        self.best, self.bad_evals = max(self.best, score), 0 if improved else self.bad_evals + 1
        if improved:
            self.best_step, self.best_digest = self.step, model_digest(self.model.state_dict())
        self._save("last.safetensors")  # first: a crash before the best is saved leaves a
        if improved:  # last that is the best, and the resume writes best from it (_best)
            self._save("best.safetensors")
        self.stop_reason = self._stop_reason(score, elapsed)
        return self.stop_reason is not None

    def _stop_reason(self, score: float, elapsed: float) -> str | None:
        """Why training should stop after this evaluation (target, patience, time limit),
        or None: decided afresh at each evaluation."""
        cfg = self.cfg
        if cfg.target is not None and score >= cfg.target:
            return f"score {score:.4g} reached the target {cfg.target:g}"
        if cfg.patience is not None and self.bad_evals >= cfg.patience:
            return f"{self.bad_evals} evaluations without a better score (patience)"
        if cfg.time_limit is not None and elapsed >= cfg.time_limit:
            return f"the time limit of {cfg.time_limit:g} s"
        return None

    def _save(self, name: str) -> None:
        if not self.cfg.out_dir:
            return
        state = {
            "step": self.step,
            "best": self.best,
            "best_step": self.best_step,
            "best_digest": self.best_digest,
            "bad_evals": self.bad_evals,
            "history": self.history,
            "train": asdict(self.cfg),
            "train_size": self.task.num_train(),  # a resume on other data is refused
            "rng_torch": torch.get_rng_state(),
            **task_state(self.task),  # what the task holds between steps (a rollout)
        }
        ckpt = Checkpoint(self.model.state_dict(), self.task.config(), self.opt.state_dict(), state)
        if self._fresh and name == "last.safetensors":  # first: an earlier run's best is never
            (Path(self.cfg.out_dir) / "best.safetensors").unlink(missing_ok=True)  # beside ours
        save_checkpoint(Path(self.cfg.out_dir) / name, ckpt)
        self._fresh = self._fresh and name != "best.safetensors"  # (serve opened the old one)

    def _resume(self, ckpt: Checkpoint, path: Path) -> None:
        restore_task_state(self.task, ckpt, path)  # and checks it is the checkpoint's run
        load_model_state(self.model, ckpt, path)
        load_optimizer_state(self.opt, ckpt, path)
        st = ckpt.state
        try:
            self.step, self.best = int(st["step"]), float(st["best"])
            self.bad_evals = int(st["bad_evals"])
            self.best_step = st.get("best_step")
            self.history = list(st.get("history", []))
            torch.set_rng_state(st["rng_torch"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:  # (a bare KeyError)
            raise CheckpointError(
                f"checkpoint {str(path)!r} holds no training state ({type(e).__name__}: {e}); "
                "it was not written by a Trainer"
            ) from e
        self._resume_best(ckpt, path.with_name("best.safetensors"))

    def _resume_best(self, last: Checkpoint, path: Path) -> None:
        """Take up the run's best model (:func:`resumed_best`: after a crash between the
        saves of ``last`` and ``best``, the best of step 20 stayed where step 50's was
        recorded, for good); if ``path`` lost it, say so, and the next evaluation writes one."""
        best = resumed_best(path, last)
        if best is not None:
            self.best_step, self.best_digest = best
            return
        had = "" if self.best_step is None else f" (the best model was step {self.best_step}'s)"
        warnings.warn(
            f"resume: {path} was not this run's best model{had}; it was removed, and the "
            "next evaluation writes a new best",
            stacklevel=4,
        )
        self.best, self.best_step, self.best_digest = -math.inf, None, None


def _say_kept(changed: dict[str, tuple[object, object]], path: Path) -> None:
    """A warning for each :data:`~attnlab.train.resume.RUN_SETTINGS` entry that a resumed
    run keeps from its checkpoint though its config gave another (a new lr, seed or batch
    size went on without a word, and weight_decay was silently the checkpoint's: AdamW
    loads its param_groups)."""
    for name, (kept, given) in changed.items():
        msg = kept_message(name, kept, given, "resume=False trains afresh")
        warnings.warn(f"resume: {path}: {msg}", stacklevel=3)


def _check_task(task: object) -> None:
    """``task`` has the :class:`Task` methods (None raised "has no attribute 'loss'")."""
    missing = [m for m in _TASK_METHODS if not callable(getattr(task, m, None))]
    if missing:
        raise TypeError(
            f"task must be a Task (with {', '.join(_TASK_METHODS)}), got "
            f"{type(task).__name__} without {missing[0]}"
        )


_TASK_METHODS = ("build_model", "num_train", "batch", "loss", "evaluate")


def _with_plugins(loss_fn: LossFn, plugins: Sequence[Plugin]) -> LossFn:
    """``loss_fn`` wrapped by each plug-in in turn (the last one outermost)."""
    if not isinstance(plugins, list | tuple):  # (one plug-in: "'FGM' object is not iterable")
        raise TypeError(
            f"plugins must be a list of plug-ins (objects with step(model, batch, loss_fn)), "
            f"got {type(plugins).__name__}: pass [plugin]"
        )
    for plugin in plugins:
        if not callable(getattr(plugin, "step", None)):
            raise TypeError(
                f"plugins must hold objects with a step(model, batch, loss_fn) method, got "
                f"{type(plugin).__name__}"
            )
        loss_fn = partial(plugin.step, loss_fn=loss_fn)
    return loss_fn
