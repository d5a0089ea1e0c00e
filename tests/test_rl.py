"""attnlab.rl: the environment wrapper against gymnasium, GAE and the clipped loss against
formulas written out, the cached policy step against the whole-segment pass, the pictured
attention against an fp64 recomputation, training through the Trainer (resume, a loss
that goes down), and bad settings."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("minigrid")

import gymnasium as gym

from attnlab.rl import (
    AgentTask,
    AttentionPolicy,
    GridEnvs,
    LSTMPolicy,
    MLPPolicy,
    PPOConfig,
    TrainConfig,
    Trainer,
    build_policy,
    collect,
    encode,
    gae,
    ppo_loss,
)
from attnlab.rl.report import decision_attention, plot_decision, trace_episode

S7 = "MiniGrid-MemoryS7-v0"


def one_hot_reference(image: np.ndarray, direction: int) -> torch.Tensor:
    """The 984 features written cell by cell with torch's one_hot."""
    f = torch.nn.functional.one_hot
    cells = []
    for x in range(7):
        for y in range(7):
            o, c, s = (int(v) for v in image[x, y])
            cells += [f(torch.tensor(o), 11), f(torch.tensor(c), 6), f(torch.tensor(s), 3)]
    return torch.cat([*cells, f(torch.tensor(direction), 4)]).float()


@pytest.mark.parametrize(
    ("env_id", "minigrid_actions"),
    [(S7, [0, 1, 2]), ("MiniGrid-DoorKey-5x5-v0", [0, 1, 2, 3, 5])],
)
def test_env_wrapper_matches_gymnasium(env_id: str, minigrid_actions: list[int]) -> None:
    envs = GridEnvs(env_id, 1, seed=5)
    raw = gym.make(env_id)
    rng = np.random.default_rng(5)  # the wrapper seeds each episode from this generator
    obs = envs.reset()
    o, _ = raw.reset(seed=int(rng.integers(2**31)))
    actions = torch.randint(0, envs.num_actions, (60,), generator=torch.Generator().manual_seed(0))
    for a in actions.tolist():
        assert torch.equal(obs[0], one_hot_reference(o["image"], o["direction"]))
        obs, reward, done = envs.step(torch.tensor([a]))
        o, r, term, trunc, _ = raw.step(minigrid_actions[a])
        assert float(reward[0]) == pytest.approx(r) and bool(done[0]) == (term or trunc)
        if term or trunc:
            o, _ = raw.reset(seed=int(rng.integers(2**31)))


def test_inactive_environments_stand_still() -> None:
    envs = GridEnvs(S7, 2, seed=0)
    first = envs.reset()
    obs, reward, done = envs.step(torch.tensor([2, 2]), active=torch.tensor([True, False]))
    assert torch.equal(obs[1], first[1]) and float(reward[1]) == 0.0 and not bool(done[1])
    assert envs.envs[1].unwrapped.step_count == 0 and envs.envs[0].unwrapped.step_count == 1


def test_encode_batches_and_rejects_bad_views() -> None:
    img = np.random.default_rng(0).integers(0, 3, (2, 3, 7, 7, 3))
    dirs = np.array([[0, 1, 2], [3, 0, 1]])
    x = encode(img, dirs)
    assert x.shape == (2, 3, 984)
    assert torch.equal(x[1, 2], one_hot_reference(img[1, 2], 1))
    with pytest.raises(ValueError, match=r"image must be \(\.\.\., 7, 7, 3\)"):
        encode(np.zeros((5, 5, 3)), 0)


def gae_reference(r, v, d, last, gamma, lam):  # type: ignore[no-untyped-def]
    """A_t = sum_l (gamma lam)^l delta_{t+l}, summed until the episode ends, in fp64."""
    b, t = r.shape
    out = torch.zeros(b, t, dtype=torch.float64)
    for i in range(b):
        vals = [*v[i].tolist(), float(last[i])]
        for s in range(t):
            total, scale = 0.0, 1.0
            for u in range(s, t):
                live = 0.0 if d[i, u] else 1.0
                delta = float(r[i, u]) + gamma * vals[u + 1] * live - vals[u]
                total += scale * delta
                if not live:
                    break
                scale *= gamma * lam
            out[i, s] = total
    return out


def test_gae_matches_the_sum_of_discounted_residuals() -> None:
    g = torch.Generator().manual_seed(1)
    r, v = torch.rand(3, 9, generator=g), torch.rand(3, 9, generator=g)
    d = torch.rand(3, 9, generator=g) < 0.25
    last = torch.rand(3, generator=g)
    adv, ret = gae(r, v, d, last, gamma=0.9, lam=0.8)
    ref = gae_reference(r, v, d, last, 0.9, 0.8)
    torch.testing.assert_close(adv.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ret, adv + v)


def test_gae_keeps_float64() -> None:
    """It returned float32 advantages for float64 inputs (6.9e-9 off a float64 sum)."""
    g = torch.Generator().manual_seed(2)
    r, v = (torch.rand(3, 9, generator=g, dtype=torch.float64) for _ in range(2))
    v = v + 0.123456789012345  # digits a float32 would lose
    d = torch.rand(3, 9, generator=g) < 0.25
    last = torch.rand(3, generator=g, dtype=torch.float64)
    adv, ret = gae(r, v, d, last, gamma=0.99, lam=0.95)
    assert adv.dtype == ret.dtype == torch.float64 and adv.device == v.device
    torch.testing.assert_close(adv, gae_reference(r, v, d, last, 0.99, 0.95), rtol=0, atol=1e-12)
    adv32, _ = gae(r.float(), v.float(), d, last.float(), gamma=0.99, lam=0.95)
    assert adv32.dtype == torch.float32  # the positive control


def test_ppo_loss_matches_the_written_formula() -> None:
    torch.manual_seed(0)
    pol = MLPPolicy(984, 3, d_model=8).double()
    task = AgentTask(env_id=S7, policy="mlp", n_envs=2, rollout_steps=6, d_model=8)
    ro = collect(pol.float(), task.envs, 6, seed=3, cfg=PPOConfig())
    pol.double()
    ro.obs = ro.obs.double()
    ro.logp = ro.logp.double() + 0.3 * torch.randn_like(ro.logp.double())  # ratios far from 1
    cfg = PPOConfig(clip=0.1, value_coef=0.7, entropy_coef=0.05)
    loss, parts = ppo_loss(pol, ro, cfg)
    logits, values = pol(ro.obs, ro.starts)
    p = torch.softmax(logits, -1).detach().numpy()
    a, old = ro.actions.numpy(), ro.logp.numpy()
    adv = ro.advantages.double().numpy()
    adv = (adv - adv.mean()) / (adv.std(ddof=1) + 1e-8)
    total_pi, total_ent = 0.0, 0.0
    for i, j in np.ndindex(a.shape):
        ratio = math.exp(math.log(p[i, j, a[i, j]]) - old[i, j])
        clipped = min(max(ratio, 0.9), 1.1)
        total_pi += min(ratio * adv[i, j], clipped * adv[i, j])
        total_ent += -sum(q * math.log(q) for q in p[i, j])
    n = a.size
    value = 0.5 * ((values.detach().numpy() - ro.returns.double().numpy()) ** 2).mean()
    expected = -total_pi / n + 0.7 * value - 0.05 * total_ent / n
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)
    assert parts["entropy"] == pytest.approx(total_ent / n, rel=1e-6)


def test_ppo_trains_on_a_minibatch_of_one_step() -> None:
    """(``adv.std()`` of one element is NaN: a valid one-environment, one-step rollout
    stopped with "the loss is nan at step 1: training diverged".)"""
    task = AgentTask(env_id=S7, n_envs=1, rollout_steps=1, ppo_epochs=1, eval_episodes=1,
                     d_model=8, policy="mlp", seed=0)  # fmt: skip
    tr = Trainer(task, TrainConfig(steps=1, batch_size=1, eval_every=1, progress=False))
    assert math.isfinite(tr.train_step())


def test_the_score_prints_without_float_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    """(An evaluation line printed ``"score": 0.46880000000000005`` for 46.88% success.)"""
    import attnlab.rl.task as rl_task

    class Log:
        def summary(self) -> dict[str, float]:
            return {"success": 46.88, "return": 0.3, "length": 9.0}

    monkeypatch.setattr(rl_task, "run_episodes", lambda *a, **k: Log())
    task = AgentTask(env_id=S7, policy="mlp", n_envs=1, rollout_steps=1, d_model=8)
    res = task.evaluate(task.build_model())
    assert repr(res["score"]) == "0.4688" and res["success"] == 46.88


def segments(b: int, t: int, starts_at: dict[int, list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    obs = torch.randn(b, t, 984, dtype=torch.float64)
    starts = torch.zeros(b, t, dtype=torch.bool)
    starts[:, 0] = True
    for i, ts in starts_at.items():
        starts[i, ts] = True
    return obs, starts


@pytest.mark.parametrize(
    "policy",
    [
        lambda: AttentionPolicy(984, 3, context=4, d_model=16, num_heads=2, num_layers=2),
        lambda: LSTMPolicy(984, 3, d_model=16),
        lambda: MLPPolicy(984, 3, d_model=16),
    ],
    ids=["attention", "lstm", "mlp"],
)
def test_cached_step_equals_the_whole_segment_pass(policy) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    pol = policy().double()
    obs, starts = segments(3, 13, {0: [6], 1: [3, 4]})  # episodes longer than the context
    logits, values = pol(obs, starts)
    state, step_logits, step_values = pol.initial_state(3), [], []
    for t in range(13):
        lo, va, state = pol.step(obs[:, t], starts[:, t], state)
        step_logits.append(lo)
        step_values.append(va)
    torch.testing.assert_close(torch.stack(step_logits, 1), logits, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.stack(step_values, 1), values, rtol=0, atol=1e-12)


def test_attention_weights_match_an_fp64_recomputation() -> None:
    torch.manual_seed(0)
    pol = AttentionPolicy(984, 3, context=5, d_model=16, num_heads=2).double()
    obs, starts = segments(2, 12, {1: [7]})
    _, _, weights = pol(obs, starts, return_weights=True)
    blk = pol.blocks[0]
    x = pol.encoder(obs) + pol.pos[torch.tensor([list(range(12)), [*range(7), *range(5)]])]
    q, k, _ = blk.qkv(blk.norm1(x)).chunk(3, -1)
    q, k = (z.view(2, 12, 2, 8).transpose(1, 2) for z in (q, k))
    scores = q @ k.transpose(-1, -2) / math.sqrt(8)  # (B, H, T, T)
    i, j = torch.arange(12)[:, None], torch.arange(12)[None]
    episode = starts.long().cumsum(1)
    allowed = (j <= i) & (j > i - 5) & (episode[:, None, :, None] == episode[:, None, None, :])
    ref = torch.softmax(scores.masked_fill(~allowed, -math.inf), -1)
    torch.testing.assert_close(weights[0], ref, rtol=0, atol=1e-12)


def test_decision_picture_shows_the_last_layers_weights(tmp_path) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    pol = AttentionPolicy(984, 3, context=64, d_model=16, num_heads=2)
    walk = [2] * 6 + [0, 2]  # forward to the split (and into the wall), left, forward
    trace = trace_episode(pol, S7, seed=1, frames=True, actions=walk)
    assert len(trace.frames) == len(trace.cue_seen) == trace.obs.shape[0]
    row = decision_attention(pol, trace)
    assert row is not None and trace.decision is not None
    t = trace.decision
    w = pol(trace.obs[None], trace.starts[None], return_weights=True)[2][-1]  # (1, H, T, T)
    torch.testing.assert_close(row, w[0, :, t, : t + 1])  # (H, t + 1)
    torch.testing.assert_close(row.sum(-1), torch.ones(2))
    assert trace.positions[t] == (5, 3)  # the split of MemoryS7
    path = plot_decision(trace, row, tmp_path / "d.png", "t")
    assert path.stat().st_size > 1000


def tiny_task(**kw):  # type: ignore[no-untyped-def]
    return AgentTask(
        env_id=S7,
        n_envs=4,
        rollout_steps=8,
        ppo_epochs=2,
        eval_episodes=2,
        d_model=16,
        context=8,
        **kw,
    )


def test_ppo_steps_lower_the_loss_on_a_fixed_rollout() -> None:
    torch.manual_seed(0)
    task = tiny_task()
    model = task.build_model()
    task.begin_step(model, 0)
    batch = task.batch(torch.arange(4))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = task.loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.05


def test_resume_takes_the_same_steps(tmp_path) -> None:  # type: ignore[no-untyped-def]
    def run(steps: int, out: str, resume: bool = False) -> dict[str, torch.Tensor]:
        cfg = TrainConfig(
            steps=8,
            batch_size=2,  # 2 passes x 2 minibatches of 2 environments: 4 steps per rollout
            eval_every=4,
            warmup=0,
            progress=False,
            out_dir=out,
            resume=resume,
            target=-1.0 if steps == 4 else None,  # stop at the first evaluation (a checkpoint)
        )
        tr = Trainer(tiny_task(), cfg)
        tr.fit()
        return {k: v.clone() for k, v in tr.model.state_dict().items()}

    straight = run(8, str(tmp_path / "a"))
    run(4, str(tmp_path / "b"))
    resumed = run(8, str(tmp_path / "b"), resume=True)
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=0, atol=0)


def test_train_success_counts_the_episodes_a_rollout_cut_off() -> None:
    """DoorKey's episodes time out after 250 steps, longer than a rollout: the episodes a
    rollout finishes are all successes, so the rate counts the ones it cut off too."""
    from types import SimpleNamespace

    from attnlab.rl.env import EpisodeLog
    from attnlab.rl.task import _rollout_summary

    envs = GridEnvs("MiniGrid-DoorKey-5x5-v0", 4, seed=0)
    envs.reset()
    assert envs.running() == 0
    envs.step(torch.tensor([2, 2, 2, 2]), active=torch.tensor([True, True, True, False]))
    assert envs.running() == 3  # the fourth stood still: no episode begun
    fake = SimpleNamespace(log=EpisodeLog(returns=[0.9]), running=lambda: 3)
    row = _rollout_summary(fake)  # type: ignore[arg-type]
    assert row == {"train_return": 0.225, "train_success": 25.0, "train_episodes": 4}


def test_the_trainer_seed_seeds_the_rollouts() -> None:
    seeds = []
    for s in (3, 3, 4):
        task = tiny_task()
        Trainer(task, TrainConfig(steps=1, seed=s, progress=False))
        seeds.append(task.seed)
    assert seeds[0] == seeds[1] != seeds[2]
    assert tiny_task(seed=7).config()["seed"] == 7


def test_bad_settings_name_the_argument() -> None:
    with pytest.raises(ValueError, match="policy must be one of"):
        tiny_task(policy="gru")
    with pytest.raises(ValueError, match="env_id must be a MiniGrid Memory or DoorKey"):
        AgentTask(env_id="CartPole-v1")
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        tiny_task().steps_per_iteration(0)
    with pytest.raises(ValueError, match="actions must be 2 ints in"):
        GridEnvs(S7, 2).step(torch.tensor([0, 7]))
    for floats in ([0.0, 1.0], [0.5, 1.0]):  # 0.0 indexed the action tuple: a TypeError
        with pytest.raises(ValueError, match=r"actions must be 2 ints in \[0, 3\), got \[0"):
            GridEnvs(S7, 2).step(torch.tensor(floats))
    with pytest.raises(ValueError, match="actions must be 2 ints in"):
        GridEnvs(S7, 2).step(torch.tensor([False, True]))
    with pytest.raises(ValueError, match="gamma must be in"):
        PPOConfig(gamma=1.5)
    for name in ("clip", "value_coef", "entropy_coef"):  # inf: clipping off or an inf loss
        for bad in (math.inf, math.nan, -0.1):
            with pytest.raises(ValueError, match=rf"{name} must be finite, >= 0, got {bad}"):
                PPOConfig(**{name: bad})
        PPOConfig(**{name: 0.0})  # the control
    pol = MLPPolicy(984, 3, d_model=8)
    with pytest.raises(ValueError, match=r"obs must be \(B, D\) with D=984, got \(2, 3, 984\)"):
        pol.step(torch.zeros(2, 3, 984), torch.zeros(2, 3, dtype=torch.bool), None)
    with pytest.raises(ValueError, match="starts must be bool"):
        pol(torch.zeros(2, 3, 984), torch.zeros(2, 3))
    ok = tiny_task()  # the positive control
    assert ok.steps_per_iteration(2) == 4 and ok.steps_per_iteration(64) == 2


def test_cli_trains_an_agent_and_rejects_a_bad_size(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cmd = [str(Path(sys.executable).parent / "attnlab"), "train", "doorkey-agent-mlp"]
    bad = subprocess.run(
        [*cmd, "--train-size", "0", "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "--train-size" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    out = tmp_path / "run"
    ok = subprocess.run(
        [
            *cmd,
            "--train-size",
            "4",
            "--steps",
            "4",
            "--eval-every",
            "4",
            "--out",
            str(out),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    assert "100 evaluation episodes" in ok.stdout
    assert (out / "last.safetensors").is_file() and (out / "report" / "report.html").is_file()


def test_cli_refuses_more_environments_than_fit_before_any_work(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    """A million environments went on building (~15 GiB, minutes) toward a rollout whose
    observations alone would take 469 GiB."""
    from attnlab.cli import main
    from attnlab.rl.specs import AGENT_TASKS, MAX_ENVS

    assert {s.max_train_size for s in AGENT_TASKS.values()} == {MAX_ENVS}
    assert MAX_ENVS * 128 * 984 * 4 <= 2**30  # a default rollout's observations: <= 1 GiB
    for size in (1_000_000, MAX_ENVS + 1):
        code = main(["train", "memory-agent", "--train-size", str(size), "--out", str(tmp_path)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        assert f"argument --train-size: is {size}; memory-agent makes at most {MAX_ENVS}" in err[0]


@pytest.mark.parametrize(
    ("env_id", "split", "cue_in_view"),
    [
        (S7, (5, 3), True),
        ("MiniGrid-MemoryS11-v0", (9, 5), False),
    ],
)
def test_only_s11_hides_the_cue_from_the_split(
    env_id: str, split: tuple[int, int], cue_in_view: bool
) -> None:
    """Why the memory task is S11: looking back from the split, S7's agent sees the
    start-room object and both end objects at once (no memory needed); S11's does not."""
    env = gym.make(env_id).unwrapped
    env.reset(seed=0)
    env.agent_pos, env.agent_dir = np.array(split), 2  # at the split, facing west
    h = env.height
    assert env.agent_sees(split[0], h // 2 - 2) and env.agent_sees(split[0], h // 2 + 2)
    assert env.agent_sees(1, h // 2 - 1) == cue_in_view


def test_a_float64_attention_policy_has_float64_sinusoids() -> None:
    """(``.double()`` rebuilt the position table in float32 and cast it up: 1.8e-5 off
    the float64 sinusoids, the logits 7e-6 off at step 3000.)"""
    import math

    policy = AttentionPolicy(5, 3, d_model=8, num_heads=2, context=4).double()
    steps = torch.arange(policy.max_steps, dtype=torch.float64)[:, None]  # (T, 1)
    freq = torch.tensor([10000.0 ** (-i / 8) for i in range(0, 8, 2)], dtype=torch.float64)
    angle = steps * freq  # (T, 4), the paper's formula in float64
    want = torch.stack((angle.sin(), angle.cos()), -1).flatten(1)  # sin, cos interleaved
    assert policy.pos.dtype == torch.float64
    torch.testing.assert_close(policy.pos, want, atol=1e-12, rtol=0)
    assert math.isclose(float(policy.float().pos[3000, 0]), math.sin(3000.0), abs_tol=1e-3)


def test_inputs_the_rl_audit_found() -> None:
    """(int 0/1 dones gave wrong advantages, ~0 = -1; an int active froze every
    environment; max_steps=0, steps=0, an int env_id, gamma="0.9" and ppo={...} failed
    with bare torch or attribute errors, or later in config().)"""
    r = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    v, last = torch.full((1, 4), 0.5), torch.tensor([0.3])
    d = torch.tensor([[False, False, True, False]])
    want, running, nxt = [0.0] * 4, 0.0, 0.3  # a hand-written fp64 loop
    for i in reversed(range(4)):
        live = 0.0 if d[0, i] else 1.0
        running = r[0, i].item() + 0.9 * nxt * live - 0.5 + 0.9 * 0.8 * live * running
        want[i], nxt = running, 0.5
    adv = gae(r, v, d, last, gamma=0.9, lam=0.8)[0]
    torch.testing.assert_close(adv[0].double(), torch.tensor(want, dtype=torch.float64))
    with pytest.raises(TypeError, match="dones must be a bool tensor of the rewards' shape"):
        gae(r, v, d.long(), last, gamma=0.9, lam=0.8)
    envs = GridEnvs("MiniGrid-DoorKey-5x5-v0", 2)
    envs.reset(0)
    with pytest.raises(TypeError, match=r"active must be a bool tensor \(2,\) or None"):
        envs.step(torch.tensor([2, 2]), active=torch.ones(2, dtype=torch.long))
    envs.step(torch.tensor([2, 2]), active=torch.ones(2, dtype=torch.bool))  # the control
    for call, error, match in (
        (lambda: AttentionPolicy(984, 3, max_steps=0), ValueError, "max_steps must be a positive"),
        (lambda: collect(MLPPolicy(984, 3), envs, 0, seed=0, cfg=PPOConfig()), ValueError, "steps"),
        (lambda: GridEnvs(3, 1), TypeError, "env_id must be a str, got int"),
        (lambda: PPOConfig(gamma="0.9"), TypeError, r"gamma must be in \[0, 1\], got str"),
        (lambda: AgentTask(ppo={"gamma": 0.9}), TypeError, "ppo must be a PPOConfig, got dict"),
    ):
        with pytest.raises(error, match=match):
            call()  # type: ignore[arg-type]


def test_ppo_entry_points_check_flags_config_and_gae_inputs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """(greedy="no" acted greedily in collect and run_episodes; collect(cfg={...}) ran the
    whole rollout, then raised AttributeError; gae took gamma=2.0 and lam=-1, and a values
    or last_value of the wrong shape raised torch's bare size error.)"""
    from attnlab.rl.task import run_episodes

    torch.manual_seed(0)
    pol, envs = MLPPolicy(984, 3, d_model=8), GridEnvs(S7, 2)
    ro = collect(pol, envs, 5, seed=0, cfg=PPOConfig(), greedy=True)  # the positive control
    assert torch.equal(ro.actions, pol(ro.obs, ro.starts)[0].argmax(-1))
    monkeypatch.setattr(envs, "step", lambda *a, **k: pytest.fail("stepped before the check"))
    z, cut, last = torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool), torch.zeros(2)
    for call, error, match in (
        (
            lambda: collect(pol, envs, 4, seed=0, cfg=PPOConfig(), greedy="no"),
            TypeError,
            "greedy must be a bool, got str",
        ),
        (lambda: run_episodes(pol, S7, 2, greedy="no"), TypeError, "greedy must be a bool"),
        (lambda: trace_episode(pol, S7, seed=0, frames="no"), TypeError, "frames must be a bool"),
        (
            lambda: collect(pol, envs, 4, seed=0, cfg={"gamma": 0.9}),
            TypeError,
            "cfg must be a PPOConfig, got dict",
        ),
        (lambda: ppo_loss(pol, ro, {"clip": 0.2}), TypeError, "cfg must be a PPOConfig, got dict"),
        (
            lambda: gae(z, torch.zeros(2, 4), cut, last, gamma=0.9, lam=0.9),
            ValueError,
            r"values must have shape \(2, 3\) .*got \(2, 4\)",
        ),
        (
            lambda: gae(z, z, cut, torch.zeros(2, 1), gamma=0.9, lam=0.9),
            ValueError,
            r"last_value must have shape \(2,\) .*got \(2, 1\)",
        ),
        (
            lambda: gae(z[0], z[0], cut[0], last, gamma=0.9, lam=0.9),
            ValueError,
            r"rewards must be a tensor \(B, T\), got shape \(3,\)",
        ),
        (
            lambda: gae(z, z, cut, [0.0, 0.0], gamma=0.9, lam=0.9),
            TypeError,
            "last_value must be a tensor",
        ),
        (
            lambda: gae(z, z, cut, last, gamma="0.9", lam=0.9),
            TypeError,
            r"gamma must be in \[0, 1\], got str",
        ),
        (
            lambda: gae(z, z, cut, last, gamma=2.0, lam=0.9),
            ValueError,
            r"gamma must be in \[0, 1\], got 2.0",
        ),
        (
            lambda: gae(z, z, cut, last, gamma=0.9, lam=-1.0),
            ValueError,
            r"lam must be in \[0, 1\], got -1.0",
        ),
    ):
        with pytest.raises(error, match=match):
            call()  # type: ignore[arg-type]


def test_encode_refuses_values_outside_minigrids_ranges() -> None:
    """(object 12 was clipped into object 10, the agent; -1 into 0; direction 5 wrapped
    into direction 1: valid one-hots of something else.)"""
    img = np.zeros((2, 7, 7, 3), dtype=np.int64)
    img[1, 3, 4] = (10, 5, 2)  # the largest valid object, colour and state
    x = encode(img, np.array([0, 3]))  # the positive control
    assert torch.equal(x[1], one_hot_reference(img[1], 3))
    for channel, limit in enumerate((11, 6, 3)):
        for value in (limit, -1):
            bad = img.copy()
            bad[1, 3, 4, channel] = value
            with pytest.raises(ValueError, match=rf"image\[\.\.\., {channel}\] .* got {value}$"):
                encode(bad, np.array([0, 3]))
    for direction in (4, 5, -1):
        with pytest.raises(ValueError, match=rf"direction must .* \[0, 4\), got {direction}$"):
            encode(img, np.array([0, direction]))


@pytest.mark.parametrize("kind", [AttentionPolicy, LSTMPolicy, MLPPolicy])
def test_policies_name_a_bad_obs_starts_or_state(kind: type) -> None:
    """(An int64 obs, T = 0, a state for another batch or None reached torch's errors:
    "mat1 and mat2 must have the same dtype", IndexError, AttributeError.)"""
    from attnlab.rl.policy import episode_steps

    torch.manual_seed(0)
    opts = {"context": 3, "num_heads": 2} if kind is AttentionPolicy else {}
    pol = kind(5, 3, d_model=8, **opts)
    obs, starts = torch.randn(2, 4, 5), torch.zeros(2, 4, dtype=torch.bool)
    logits = pol(obs, starts)[0]  # the positive control: step by step equals the segment
    state = pol.initial_state(2)
    for t in range(4):
        step_logits, _, state = pol.step(obs[:, t], starts[:, t], state)
    torch.testing.assert_close(step_logits, logits[:, -1], rtol=1e-5, atol=1e-6)
    wrong_state = {AttentionPolicy: None, LSTMPolicy: None, MLPPolicy: (torch.zeros(2, 8),) * 2}
    for call, error, match in (
        (
            lambda: pol(obs.long(), starts),
            TypeError,
            r"obs must be a floating-point tensor \(B, T, D\), got torch.int64",
        ),
        (lambda: pol(obs.double(), starts), TypeError, "obs must be of the model's dtype"),
        (lambda: pol(obs[:, :0], starts[:, :0]), ValueError, r"obs must hold at least 1 step"),
        (lambda: pol(obs, starts.tolist()), TypeError, r"starts must be bool \(2, 4\), got list"),
        (
            lambda: pol.step(obs[:, 0].long(), starts[:, 0], pol.initial_state(2)),
            TypeError,
            r"obs must be a floating-point tensor \(B, D\)",
        ),
        (lambda: pol.step(obs[:, 0], starts[:, 0], wrong_state[kind]), TypeError, "state must"),
        (lambda: episode_steps(starts.long()), TypeError, "starts must be a bool tensor"),
        (lambda: episode_steps(starts[:, :0]), ValueError, r"starts must hold at least 1 step"),
    ):
        with pytest.raises(error, match=match):
            call()  # type: ignore[arg-type]
    if kind is not MLPPolicy:
        with pytest.raises(ValueError, match=r"state must .*initial_state\(3\)|state must .*\(3,"):
            pol.step(torch.randn(3, 5), torch.ones(3, dtype=torch.bool), pol.initial_state(2))


def test_a_policy_rebuilt_from_its_config_acts_the_same() -> None:
    """``config()`` left out ``max_steps``: ``build_policy(**config())`` got 4096 and its
    logits differed from step ``max_steps`` on (positions clamp there)."""
    torch.manual_seed(0)
    pol = AttentionPolicy(5, 3, context=8, d_model=8, num_heads=2, max_steps=4).double()
    cfg = pol.config()
    again = build_policy(cfg.pop("kind"), **cfg).double()
    again.load_state_dict(pol.state_dict())
    obs, starts = torch.randn(2, 10, 5, dtype=torch.float64), torch.zeros(2, 10, dtype=torch.bool)
    starts[:, 0] = True
    torch.testing.assert_close(again(obs, starts)[0], pol(obs, starts)[0], rtol=0, atol=0)
    # the positive control: a policy that clamps nowhere differs from step 4 on only
    other = AttentionPolicy(5, 3, context=8, d_model=8, num_heads=2).double()
    other.load_state_dict(pol.state_dict())
    diff = (other(obs, starts)[0] - pol(obs, starts)[0]).abs().amax((0, 2))  # (T,)
    assert diff[:4].max() == 0 and diff[4:].min() > 0


@pytest.mark.parametrize("kind", [AttentionPolicy, LSTMPolicy, MLPPolicy])
def test_initial_state_names_a_bad_n(kind: type) -> None:
    """(-1 gave torch's RuntimeError, 2.0 its TypeError, neither naming ``n``.)"""
    opts = {"context": 3, "num_heads": 2} if kind is AttentionPolicy else {}
    pol = kind(5, 3, d_model=8, **opts)
    pol.initial_state(0)  # the positive control: no environments is an empty state
    for bad, error, match in ((-1, ValueError, "got -1$"), (2.0, TypeError, r"got 2\.0 \(float\)")):
        with pytest.raises(error, match=rf"^n must be an int >= 0, {match}"):
            pol.initial_state(bad)


@pytest.mark.parametrize(
    ("env_id", "needs", "wrong"), [("MiniGrid-DoorKey-5x5-v0", 5, 3), (S7, 3, 5)]
)
def test_a_policy_must_fit_the_environment_before_any_step(
    env_id: str, needs: int, wrong: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(A 3-action policy ran DoorKey, 5 actions, silently: 0% success, the key never
    picked up; a 5-action one failed on Memory only when it sampled action 3 or 4, as
    "actions must be 4 ints in [0, 3)"; a policy of 100 observation features failed inside
    its step; a str policy with an AttributeError.)"""
    from attnlab.rl.task import run_episodes

    torch.manual_seed(0)
    ok = MLPPolicy(984, needs, d_model=8)  # the positive controls
    assert collect(ok, GridEnvs(env_id, 2), 3, seed=0, cfg=PPOConfig()).actions.shape == (2, 3)
    assert len(trace_episode(ok, env_id, seed=0, max_steps=3).positions) == 3
    assert len(run_episodes(ok, env_id, 1).returns) == 1
    monkeypatch.setattr(GridEnvs, "step", lambda *a, **k: pytest.fail("stepped before the check"))
    entry_points = (
        lambda p: run_episodes(p, env_id, 2),
        lambda p: collect(p, GridEnvs(env_id, 2), 4, seed=0, cfg=PPOConfig()),
        lambda p: trace_episode(p, env_id, seed=0),
    )
    for pol, error, match in (
        (
            MLPPolicy(984, wrong, d_model=8),
            ValueError,
            f"^policy has {wrong} actions, {env_id} needs {needs}$",
        ),
        (
            MLPPolicy(100, needs, d_model=8),
            ValueError,
            f"^policy takes 100 observation features, {env_id} gives 984$",
        ),
        ("mlp", TypeError, r"^policy must be an attnlab.rl policy \(AgentPolicy\), got str$"),
    ):
        for call in entry_points:
            with pytest.raises(error, match=match):
                call(pol)
    with pytest.raises(TypeError, match=r"^envs must be a GridEnvs, got str$"):
        collect(ok, env_id, 4, seed=0, cfg=PPOConfig())  # type: ignore[arg-type]


def test_seeds_are_checked_before_use_with_a_bound_every_derived_seed_fits() -> None:
    """(collect seeded its generator before checking seed: 1.5, "3" and True gave torch's
    bare "manual_seed expected a long"; collect and run_episodes took 2**64 to torch's
    "Overflow when unpacking long long"; AgentTask(seed=2**62) was taken, then its first
    rollout's seed, seed * 1000003, overflowed.)"""
    from attnlab.rl.task import run_episodes

    torch.manual_seed(0)
    pol, envs = MLPPolicy(984, 3, d_model=8), GridEnvs(S7, 2)
    largest = 2**63 - 1  # the positive controls: the largest seeds each takes
    ro = collect(pol, envs, 2, seed=largest, cfg=PPOConfig())
    assert torch.equal(ro.actions, collect(pol, envs, 2, seed=largest, cfg=PPOConfig()).actions)
    assert len(run_episodes(pol, S7, 1, seed=largest).returns) == 1
    task = tiny_task(seed=2**32 - 1)
    task.begin_step(task.build_model(), 0)
    assert task.batch(torch.tensor([0, 1])).obs.shape == (2, 8, 984)
    for bad, error, match in (
        (1.5, TypeError, r"^seed must be an int >= 0, got 1\.5 \(float\)$"),
        ("3", TypeError, r"^seed must be an int >= 0, got '3' \(str\)$"),
        (True, TypeError, r"^seed must be an int >= 0, got True \(bool\)$"),
        (-1, ValueError, r"^seed must be an int >= 0, got -1$"),
        (2**63, ValueError, rf"^seed must be an int in \[0, 2\*\*63\) .*int64\), got {2**63}$"),
        (2**64, ValueError, rf"^seed must be an int in \[0, 2\*\*63\) .*int64\), got {2**64}$"),
    ):
        with pytest.raises(error, match=match):
            collect(pol, envs, 2, seed=bad, cfg=PPOConfig())  # type: ignore[arg-type]
        with pytest.raises(error, match=match):
            run_episodes(pol, S7, 1, seed=bad)  # type: ignore[arg-type]
    for bad in (2**32, 2**62):
        with pytest.raises(
            ValueError, match=rf"^seed must be an int in \[0, 2\*\*32\) .*, got {bad}$"
        ):
            tiny_task(seed=bad)


def test_encode_takes_ints_of_matching_shapes_and_an_empty_batch() -> None:
    """(A float view 1.7 and direction 2.9 were truncated: encoded as 1 and 2; a direction
    of the wrong shape gave numpy's bare broadcast error; 0 views its bare reshape error,
    though every policy steps on 0 environments.)"""
    img = np.random.default_rng(1).integers(0, 3, (2, 7, 7, 3)).astype(np.uint8)
    want = torch.stack([one_hot_reference(img[0], 2), one_hot_reference(img[1], 2)])
    for view, direction in (  # the positive controls: numpy, torch, one direction for all
        (img, np.array([2, 2])),
        (torch.from_numpy(img), torch.tensor([2, 2])),
        (img.astype(np.int32), 2),
    ):
        assert torch.equal(encode(view, direction), want)
    assert torch.equal(encode(img[0], np.int64(2)), want[0])
    for views, lead in (((0, 7, 7, 3), (0,)), ((3, 0, 7, 7, 3), (3, 0))):
        x = encode(np.zeros(views, np.uint8), np.zeros(lead, np.int64))
        assert x.shape == (*lead, 984) and x.dtype == torch.float32
        assert encode(np.zeros(views, np.uint8), 1).shape == (*lead, 984)
    pol = MLPPolicy(984, 3, d_model=8)
    empty = encode(np.zeros((0, 7, 7, 3), np.uint8), np.zeros(0, np.int64))
    assert pol.step(empty, torch.zeros(0, dtype=torch.bool), pol.initial_state(0))[0].shape == (
        0,
        3,
    )
    for view, direction, error, match in (
        (np.full((7, 7, 3), 1.7), 2, TypeError, r"^image must hold .* as ints, got dtype float64$"),
        (torch.ones(7, 7, 3), 2, TypeError, r"^image must hold .* as ints, got dtype float32$"),
        (img > 0, np.array([0, 1]), TypeError, r"^image must hold .* as ints, got dtype bool$"),
        (img[0], 2.9, TypeError, r"^direction must hold .* as ints, got dtype float64$"),
        (img[0], True, TypeError, r"^direction must hold .* as ints, got dtype bool$"),
        (
            img,
            np.array([0, 1, 2]),
            ValueError,
            r"^direction must have the views' leading shape \(2,\) .* got shape \(3,\)$",
        ),
        (
            img,
            np.array([[0, 1]]),
            ValueError,
            r"^direction must have the views' leading shape \(2,\) .* got shape \(1, 2\)$",
        ),
    ):
        with pytest.raises(error, match=match):
            encode(view, direction)  # type: ignore[arg-type]


def test_step_before_reset_says_to_call_reset() -> None:
    """(Without active, gymnasium's ResetNeeded "Cannot call env.step() before calling
    env.reset()"; with active, a bare IndexError "list index out of range".)"""
    for active in (None, torch.tensor([False, False]), torch.tensor([True, False])):
        envs = GridEnvs(S7, 2)
        with pytest.raises(RuntimeError, match=r"^GridEnvs.step needs reset\(\) first"):
            envs.step(torch.tensor([0, 1]), active=active)
        first = envs.reset()  # the positive control
        obs = envs.step(torch.tensor([0, 1]), active=active)[0]
        assert obs.shape == (2, 984) and (active is None or torch.equal(obs[1], first[1]))
