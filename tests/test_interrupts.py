"""Ctrl-C (SIGINT) and SIGTERM: ``train`` saves a final checkpoint and says how to resume,
and the resumed run ends with the same weights as one never stopped; a second signal
stops at once and leaves the last checkpoint whole; the other commands stop with one
line and no half-written file."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from attnlab._io import atomic_write_text
from attnlab.cli import main
from attnlab.train import TrainConfig, Trainer, TrainingInterrupted, load_checkpoint
from attnlab.train import checkpoint as ckmod

ATTNLAB = Path(sys.executable).parent / "attnlab"
MAIN_THREAD = pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(),
    reason="signal handlers need the main thread",
)


class Toy:
    """A tiny regression task with dropout (so the RNG state matters); sends ``signals``
    to this process during the loss of step ``at``."""

    name = "toy"

    def __init__(self, at: int | None = None, signals: tuple[int, ...] = ()) -> None:
        self.at, self.signals, self.calls = at, signals, 0
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(64, 4, generator=g), torch.randn(64, 1, generator=g)

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.3), nn.Linear(16, 1))

    def config(self) -> dict[str, Any]:
        return {"task": "toy"}

    def num_train(self) -> int:
        return 64

    def batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        return self.x[indices], self.y[indices]

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        if self.calls == self.at:
            for s in self.signals:
                os.kill(os.getpid(), s)
        self.calls += 1
        return (model(batch[0]) - batch[1]).pow(2).mean()

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {"score": -float((model(self.x) - self.y).pow(2).mean())}


def _cfg(out: Path, **kw: Any) -> TrainConfig:
    base: dict[str, Any] = {"steps": 12, "batch_size": 16, "warmup": 2, "eval_every": 4}
    return TrainConfig(**(base | kw), out_dir=str(out), progress=False)


@MAIN_THREAD
def test_sigterm_saves_a_checkpoint_and_resume_is_exact(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    straight = Trainer(Toy(), _cfg(tmp_path / "a"))
    straight.fit()
    stopped = Trainer(Toy(at=6, signals=(signal.SIGTERM,)), _cfg(tmp_path / "b"))
    with pytest.raises(TrainingInterrupted) as info:
        stopped.fit()
    said = capsys.readouterr().err  # a process manager's SIGTERM: no talk of Ctrl-C first
    assert "SIGTERM: stopping after this step" in said and "(a second signal or Ctrl-C" in said
    assert info.value.step == 7 and info.value.signum == signal.SIGTERM
    assert info.value.checkpoint == tmp_path / "b" / "last.safetensors"
    assert load_checkpoint(info.value.checkpoint).state["step"] == 7  # not an eval step
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers given back
    resumed = Trainer(Toy(), _cfg(tmp_path / "b", resume=True))
    assert resumed.step == 7
    resumed.fit()
    for k, v in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k  # bit-identical


@MAIN_THREAD
def test_a_second_signal_stops_at_once_and_keeps_the_last_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_save = ckmod.save_file
    saves: list[int] = []

    def save(tensors: Any, path: str, metadata: Any = None) -> None:
        saves.append(1)
        if len(saves) == 3:  # the final save after the first Ctrl-C: Ctrl-C again mid-write
            Path(path).write_bytes(b"half")
            os.kill(os.getpid(), signal.SIGINT)
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(ckmod, "save_file", save)
    trainer = Trainer(Toy(at=5, signals=(signal.SIGINT,)), _cfg(tmp_path))
    with pytest.raises(KeyboardInterrupt) as info:
        trainer.fit()
    assert not isinstance(info.value, TrainingInterrupted)  # stopped at once
    assert len(saves) == 3  # last + best at step 4, then the interrupted final save
    assert load_checkpoint(tmp_path / "last.safetensors").state["step"] == 4  # whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.safetensors", "last.safetensors"]
    # two signals at once, during a step: the second raises there, nothing half-written
    with pytest.raises(KeyboardInterrupt) as info:
        Trainer(Toy(at=9, signals=(signal.SIGINT, signal.SIGINT)), _cfg(tmp_path)).fit()
    assert not isinstance(info.value, TrainingInterrupted)
    assert load_checkpoint(tmp_path / "last.safetensors").state["step"] == 8


@MAIN_THREAD
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_second_signal_is_reported_as_that_signal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], signum: int, code: int
) -> None:
    """(A second SIGTERM, a process manager escalating, raised a bare KeyboardInterrupt:
    the command said "interrupted (SIGINT)" and exited 130, not 143.)"""
    from attnlab.cli._errors import run_command

    def run(args: argparse.Namespace) -> int:
        Trainer(Toy(at=5, signals=(signum, signum)), _cfg(tmp_path)).fit()
        return 0

    assert run_command(argparse.Namespace(command="train", run=run)) == code
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"attnlab train: interrupted ({signal.Signals(signum).name})"), err
    assert load_checkpoint(tmp_path / "last.safetensors").state["step"] == 4  # kept whole


@MAIN_THREAD
@pytest.mark.parametrize(("at", "kw"), [(11, {}), (3, {"target": -1e9})])
def test_a_signal_in_the_step_that_ends_the_run_lets_it_finish(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], at: int, kw: dict[str, Any]
) -> None:
    """(A SIGINT during the last step, or one that reached the target, raised
    TrainingInterrupted after the run was complete: the command said "interrupted", exit
    130, and printed a resume command that was refused: the checkpoint was at --steps.)"""
    trainer = Trainer(Toy(at=at, signals=(signal.SIGINT,)), _cfg(tmp_path, **kw))
    try:
        history = trainer.fit()
    except TrainingInterrupted as e:  # (what it raised; uncaught, it would stop pytest)
        pytest.fail(f"the complete run raised {e}")
    assert history[-1]["step"] == at + 1 == trainer.step
    assert load_checkpoint(tmp_path / "last.safetensors").state["step"] == at + 1
    assert f"training is complete at step {at + 1}" in capsys.readouterr().err
    with pytest.raises(TrainingInterrupted):  # the control: one step earlier, it stops
        Trainer(Toy(at=at - 1, signals=(signal.SIGINT,)), _cfg(tmp_path / "b", **kw)).fit()


@MAIN_THREAD
def test_ctrl_c_in_the_last_step_of_train_writes_the_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """(``attnlab train dates --steps 4``, Ctrl-C in step 4: "training stopped by SIGINT at
    step 4", exit 130, and "resume with: ... --resume", which exited 2: "the checkpoint is
    at step 4"; the held-out scores and report/ were never written.)"""
    pytest.importorskip("babel")
    from attnlab.tasks.dates import DatesTask

    real, calls = DatesTask.loss, [0]

    def loss(self: DatesTask, model: nn.Module, batch: Any) -> Tensor:
        calls[0] += 1
        if calls[0] == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, model, batch)

    monkeypatch.setattr(DatesTask, "loss", loss)
    argv = ["train", "dates", "--steps", "4", "--eval-every", "2", "--train-size", "64"]
    assert main([*argv, "--batch-size", "16", "--no-progress", "--out", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "resume with" not in err and "training is complete at step 4" in err
    assert f"report: {tmp_path / 'report'}" in out and (tmp_path / "report").is_dir()


STEPS, EVAL = 80, 20  # Ctrl-C after the eval line at step 20: 60 steps (~3 s) to spare


def _train(out: Path, *extra: str) -> list[str]:
    return [
        str(ATTNLAB), "train", "vision", "--steps", str(STEPS), "--eval-every", str(EVAL),
        "--train-size", "256", "--batch-size", "16", "--no-progress", "--out", str(out), *extra,
    ]  # fmt: skip


def _never_stopped(out: Path) -> dict[str, Tensor]:
    """The weights of the same run, uninterrupted: what ``attnlab train`` runs, in this
    process (on the task's one thread, as there)."""
    from attnlab.tasks import spec, train_config

    s = spec("vision")
    over = {"steps": STEPS, "eval_every": EVAL, "batch_size": 16}
    over["warmup"] = STEPS // 10  # the command's, for vision's default 150 > 80 steps
    cfg = train_config(s, **over, out_dir=str(out), progress=False)
    Trainer(s.build(256), cfg).fit()
    return load_checkpoint(out / "last.safetensors").model


def test_ctrl_c_during_train_then_resume_gives_the_same_weights(tmp_path: Path) -> None:
    """A real ``attnlab train`` process: Ctrl-C after its first evaluation, ``--resume``,
    and the final weights equal those of a run that never stopped, bit for bit."""
    pytest.importorskip("sklearn")
    if not ATTNLAB.exists():
        pytest.skip("attnlab script not installed")
    proc = subprocess.Popen(
        _train(tmp_path / "a"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    killer = threading.Timer(300, proc.kill)
    killer.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(f'{{"step": {EVAL},'):  # training is under way
                proc.send_signal(signal.SIGINT)
                break
        _, err = proc.communicate(timeout=300)
    finally:
        killer.cancel()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "training stopped by SIGINT at step" in err
    assert f"resume with: attnlab train vision --steps {STEPS}" in err and "--resume" in err
    step = load_checkpoint(tmp_path / "a" / "last.safetensors").state["step"]
    assert EVAL <= step < STEPS
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["best.safetensors", "last.safetensors"]  # no temp file, no lock
    resumed = subprocess.run(
        _train(tmp_path / "a", "--resume"), capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr
    got = load_checkpoint(tmp_path / "a" / "last.safetensors")
    want = _never_stopped(tmp_path / "b")
    assert got.state["step"] == STEPS and got.model.keys() == want.keys()
    for k in want:
        assert torch.equal(got.model[k], want[k]), k


def test_sigterm_stops_bench_with_one_line(tmp_path: Path) -> None:
    """SIGTERM while ``attnlab bench`` runs: one line on stderr, exit 143. The CPU kernel
    is built (or found) first, here: a run that started while no build was finished, as
    in a fresh ``make test`` where another worker was still compiling it, printed
    "attnlab: compiling the blocked engine's CPU kernel ..." before its one line."""
    from attnlab.engines import _native

    if not ATTNLAB.exists():
        pytest.skip("attnlab script not installed")
    env = dict(os.environ)
    if _native.kernel() is None:  # waits while another process builds it
        env["ATTNLAB_NO_KERNEL"] = "1"  # no compiler: not its warning line either
    cmd = [str(ATTNLAB), "bench", "--n", "1024", "--heads", "2", "--repeat", "100"]
    proc = subprocess.Popen(
        [*cmd, "--modes", "fwd"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()  # one record measured: the command is running
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert first.startswith('{"case": "window"'), (first, err)
    assert proc.returncode == 143, err
    assert (
        err.strip() == "attnlab bench: interrupted (SIGTERM); files are written whole or not at all"
    )


def test_ctrl_c_in_embed_and_explain_is_one_line_and_leaves_no_half_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import attnlab.cli.embed as embed_cli
    import attnlab.cli.explain as explain_cli

    class Stopped:
        def encode(self, texts: Any, batch_size: int = 32) -> Tensor:
            raise KeyboardInterrupt

        def tokenize(self, texts: list[str]) -> list[list[int]]:  # [CLS] words [SEP]
            return [[101, *range(len(t.split())), 102] for t in texts]

    monkeypatch.setattr(embed_cli, "load_encoder", lambda model: (Stopped(), "toy"))
    assert main(["embed", "hello"]) == 130
    assert capsys.readouterr().err.strip() == (
        "attnlab embed: interrupted (SIGINT); files are written whole or not at all"
    )

    def explain(model: Any, text: str, out: Path, **kw: Any) -> Any:
        atomic_write_text(out.with_name("r_heads.png"), "a whole picture")

        def half(tmp: str) -> None:
            Path(tmp).write_text("<html>half")
            raise KeyboardInterrupt  # Ctrl-C in the middle of writing the report

        from attnlab._io import atomic_write

        atomic_write(out, half)

    monkeypatch.setattr(explain_cli, "load_encoder", lambda model: (Stopped(), "toy"))
    monkeypatch.setattr(explain_cli, "_named_text_model", lambda enc, text: None)
    monkeypatch.setattr(explain_cli, "explain_text", explain)
    assert main(["explain", "hello", "--out", str(tmp_path / "r.html")]) == 130
    err = capsys.readouterr().err.strip()
    assert err == "attnlab explain: interrupted (SIGINT); files are written whole or not at all"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r_heads.png"]  # no half, no lock


def test_resume_keeps_the_checkpoints_seed_batch_size_and_lr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """(``--resume`` under another --seed, --batch-size or --lr, or without the --lr the run
    began with, silently took the command line's: another data order and schedule than
    the run's.)"""
    pytest.importorskip("babel")
    argv = ["train", "dates", "--eval-every", "2", "--train-size", "64", "--no-progress"]
    argv += ["--out", str(tmp_path)]
    assert main([*argv, "--steps", "2", "--seed", "3", "--batch-size", "16", "--lr", "0.01"]) == 0
    capsys.readouterr()
    assert main([*argv, "--steps", "4", "--resume", "--seed", "4", "--batch-size", "8"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "attnlab train: warning: --seed 4 is not the checkpoint's 3: the resumed run keeps 3 "
        "(drop --resume to train afresh with 4)",
        "attnlab train: warning: --batch-size 8 is not the checkpoint's 16: the resumed run "
        "keeps 16 (drop --resume to train afresh with 8)",
    ]  # no word of --lr: not given, the checkpoint's 0.01 goes on (not the task's default)
    state = load_checkpoint(tmp_path / "last.safetensors").state
    assert state["step"] == 4
    assert (state["train"]["seed"], state["train"]["batch_size"], state["train"]["lr"]) == (
        3, 16, 0.01
    )  # fmt: skip
