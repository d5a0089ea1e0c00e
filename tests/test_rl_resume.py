"""attnlab.rl resumes bit for bit wherever a run stopped: a checkpoint taken partway through
a rollout's optimizer steps (a time limit, Ctrl-C, an evaluation between iterations) holds
that rollout, so the resumed run does not collect it again with other weights; an older
checkpoint without it still resumes; ``attnlab train AGENT --resume --seed S`` goes on with
the checkpoint's rollouts, as a changed ``--seed`` goes on for every task."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("minigrid")

from attnlab.cli import main
from attnlab.rl import AgentTask, TrainConfig, Trainer
from attnlab.train import load_checkpoint, save_checkpoint

# 2 passes x 2 minibatches of 2 environments: 4 optimizer steps per rollout, 8 in all
STEPS, PER_ROLLOUT = 8, 4


def tiny_task(**kw: object) -> AgentTask:
    opts: dict = dict(n_envs=4, rollout_steps=8, ppo_epochs=2, eval_episodes=2, d_model=16)
    return AgentTask(env_id="MiniGrid-MemoryS7-v0", context=8, **(opts | kw))


def config(out: Path, **kw: object) -> TrainConfig:
    opts: dict = dict(steps=STEPS, batch_size=2, eval_every=PER_ROLLOUT, warmup=0)
    return TrainConfig(progress=False, out_dir=str(out), **(opts | kw))


def weights(tr: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in tr.model.state_dict().items()}


def stop_by_time_limit(out: Path) -> int:
    """A time limit: a last evaluation and checkpoint after step 1."""
    tr = Trainer(tiny_task(), config(out, time_limit=1e-9))
    tr.fit()
    return tr.step


def stop_at_an_evaluation_between_iterations(out: Path) -> int:
    """eval_every 3 with 4 steps per rollout (the defaults' 400 with --batch-size 8)."""
    tr = Trainer(tiny_task(), config(out, eval_every=3, target=-1.0))  # stop at the first
    tr.fit()
    return tr.step


def stop_by_ctrl_c(out: Path) -> int:
    """What the trainer does on SIGINT after a step: save last.safetensors."""
    tr = Trainer(tiny_task(), config(out))
    for _ in range(2):
        tr.train_step()
    tr._save("last.safetensors")
    return tr.step


@pytest.mark.parametrize(
    "stop", [stop_by_time_limit, stop_at_an_evaluation_between_iterations, stop_by_ctrl_c]
)
def test_resume_partway_through_a_rollout_takes_the_same_steps(stop, tmp_path) -> None:  # type: ignore[no-untyped-def]
    straight = Trainer(tiny_task(), config(tmp_path / "a"))
    straight.fit()
    at = stop(tmp_path / "b")
    assert at % PER_ROLLOUT != 0  # partway through the first rollout's steps
    saved = load_checkpoint(tmp_path / "b" / "last.safetensors").state
    resumed = Trainer(tiny_task(), config(tmp_path / "b", resume=True))
    assert resumed.step == at
    resumed.fit()
    want, got = weights(straight), weights(resumed)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    train_metrics = ("train_return", "train_success", "train_episodes")
    assert {k: resumed.history[-1][k] for k in train_metrics} == {
        k: straight.history[-1][k] for k in train_metrics
    }
    assert saved["task.rollout_iteration"] == 0  # the rollout went into the checkpoint,
    assert saved["task.rollout.obs"].dtype == torch.bool  # one-hot observations as bools


def test_a_checkpoint_between_rollouts_holds_none(tmp_path) -> None:  # type: ignore[no-untyped-def]
    tr = Trainer(tiny_task(), config(tmp_path, steps=PER_ROLLOUT))
    tr.fit()
    saved = load_checkpoint(tmp_path / "last.safetensors").state
    assert not [k for k in saved if k.startswith("task.")]  # the next step collects anew


def test_an_older_checkpoint_without_the_rollout_still_resumes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    stop_by_ctrl_c(tmp_path)
    path = tmp_path / "last.safetensors"
    ck = load_checkpoint(path)
    ck.state = {k: v for k, v in ck.state.items() if not k.startswith("task.")}
    save_checkpoint(path, ck)  # as written before checkpoints held a task's state
    resumed = Trainer(tiny_task(), config(tmp_path, resume=True))
    assert resumed.fit()[-1]["step"] == STEPS  # its rollout collected again


def test_a_damaged_rollout_is_a_checkpoint_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    stop_by_ctrl_c(tmp_path)
    path = tmp_path / "last.safetensors"
    ck = load_checkpoint(path)
    ck.state["task.rollout.actions"] = ck.state["task.rollout.actions"][:1]
    save_checkpoint(path, ck)
    with pytest.raises(ValueError, match="holds task state this task cannot take up"):
        Trainer(tiny_task(), config(tmp_path, resume=True))


def test_resume_keeps_the_run_seed_and_refuses_another_given_one(tmp_path) -> None:  # type: ignore[no-untyped-def]
    first = tiny_task()
    Trainer(first, config(tmp_path, steps=2, eval_every=2)).fit()
    again = tiny_task()  # drawn from the trainer's seed, now 1: the checkpoint's goes on
    with pytest.warns(UserWarning, match="seed 1 is not the checkpoint's 0: the resumed run"):
        Trainer(again, config(tmp_path, resume=True, seed=1))
    assert again.seed == first.seed
    with pytest.raises(ValueError, match="holds another configuration"):  # a seed given
        Trainer(tiny_task(seed=(first.seed or 0) + 1), config(tmp_path, resume=True))


def test_cli_resume_with_another_seed_goes_on(tmp_path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # the report's closing episodes (100; 18.8 s under cProfile, untrained) are not what
    # this test is about; tests/test_rl.py runs the command with all of them
    monkeypatch.setattr("attnlab.rl.report.FINAL_EPISODES", 4)
    out = tmp_path / "run"
    argv = ["train", "doorkey-agent-mlp", "--train-size", "2", "--batch-size", "1"]
    argv += ["--eval-every", "2", "--out", str(out), "--no-progress"]
    assert main([*argv, "--steps", "2"]) == 0
    seed = load_checkpoint(out / "last.safetensors").config["seed"]
    capsys.readouterr()
    code = main([*argv, "--steps", "4", "--resume", "--seed", "1"])
    err = capsys.readouterr().err
    assert code == 0, err  # it was 1: "unexpected error" naming the derived rollout seeds
    ck = load_checkpoint(out / "last.safetensors")
    assert ck.state["step"] == 4 and ck.config["seed"] == seed
