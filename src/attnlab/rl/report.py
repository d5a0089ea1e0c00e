"""What an agent run ends with: 100 evaluation episodes, and for the attention policy a
picture of where it looks back at the moment it has to remember.

In the memory task that moment is the split at the end of the hallway: the agent must
turn towards the object that matches the one it saw in the start room, which is out of
sight by then. :func:`trace_episode` replays one episode step by step and
:func:`decision_attention` returns, for the step at the split, the attention of the
last layer, per head, over the episode's earlier steps, with the steps at
which the start-room object was in view.

Example:
    >>> from attnlab.rl.policy import AttentionPolicy
    >>> pol = AttentionPolicy(984, 3, context=16, d_model=16, num_heads=2)
    >>> tr = trace_episode(pol, "MiniGrid-MemoryS7-v0", seed=3, max_steps=12)
    >>> tuple(tr.obs.shape)[1], len(tr.cue_seen) == len(tr.obs)
    (984, True)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from attnlab._validate import validate_flag
from attnlab.rl.env import GridEnvs
from attnlab.rl.policy import AgentPolicy, AttentionPolicy
from attnlab.rl.ppo import check_policy

__all__ = ["Trace", "decision_attention", "finish", "plot_decision", "trace_episode"]

FINAL_EPISODES = 100


@dataclass
class Trace:
    """One episode: features ``obs (T, 984)``, ``starts (T,)``, the agent's cell, whether
    the start-room object was in view, the reward, and rendered frames when asked."""

    obs: Tensor
    starts: Tensor
    positions: list[tuple[int, int]]
    cue_seen: list[bool]
    reward: float
    decision: int | None  # the first step taken at the split, if the episode got there
    frames: list[np.ndarray] = field(default_factory=list)


@torch.no_grad()
def trace_episode(
    policy: AgentPolicy,
    env_id: str,
    *,
    seed: int,
    max_steps: int = 1000,
    frames: bool = False,
    actions: Sequence[int] | None = None,
) -> Trace:
    """Run one greedy episode of ``policy`` and record what it saw (see :class:`Trace`);
    with ``actions``, take those instead (the policy still runs, as it would have seen them).
    The policy must fit ``env_id`` (:func:`~attnlab.rl.ppo.check_policy`)."""
    frames = validate_flag("frames", frames)
    envs = GridEnvs(env_id, 1, seed=seed)
    policy = check_policy(policy, envs)
    env, obs = envs.envs[0].unwrapped, envs.reset()
    state, rows, reward = policy.initial_state(1), [], 0.0
    starts = envs.starts.clone()
    trace = Trace(obs, starts, [], [], 0.0, None)
    cue = (1, env.height // 2 - 1)  # where the Memory task puts the start-room object
    split = (int(env.success_pos[0]), env.height // 2) if "Memory" in env_id else None
    for t in range(max_steps if actions is None else min(max_steps, len(actions))):
        pos = (int(env.agent_pos[0]), int(env.agent_pos[1]))
        trace.positions.append(pos)
        trace.cue_seen.append(bool(env.agent_sees(*cue)))
        if trace.decision is None and pos == split:
            trace.decision = t
        if frames:
            trace.frames.append(env.get_frame(highlight=True, tile_size=16))
        rows.append((obs, starts))
        logits, _, state = policy.step(obs, starts, state)
        act = logits.argmax(-1) if actions is None else torch.tensor([actions[t]])
        obs, r, done = envs.step(act)
        starts, reward = done, reward + float(r[0])
        if bool(done[0]):
            break
    trace.obs = torch.cat([o for o, _ in rows])  # (T, 984)
    trace.starts = torch.cat([s for _, s in rows])  # (T,)
    trace.reward = reward
    return trace


@torch.no_grad()
def decision_attention(policy: AttentionPolicy, trace: Trace) -> Tensor | None:
    """The last layer's weights of the split step over steps ``0..t``, per head
    ``(H, t + 1)``, from the full pass; None if the episode never reached the split."""
    if trace.decision is None:
        return None
    t = trace.decision
    _, _, weights = policy(trace.obs[None], trace.starts[None], return_weights=True)
    return weights[-1][0, :, t, : t + 1]  # (H, t + 1)


def plot_decision(trace: Trace, rows: Tensor, path: Path, title: str) -> Path:
    """The split step's attention over the past steps, one row per head (steps with the
    start-room object in view marked in orange), above the frames of the three steps most
    attended by the head that looks at that object most, and of the split."""
    from attnlab.interpret.plot import pyplot, save_figure

    plt = pyplot()
    h, t = rows.shape[0], rows.shape[1] - 1
    cue = [i for i in range(t + 1) if trace.cue_seen[i]]
    focus = rows[:, cue].sum(1) if cue else rows.amax(1)  # (H,)
    head = int(focus.argmax())  # the head that looks at the object most (or most focused)
    row = rows[head]
    order = [int(i) for i in row.argsort(descending=True) if int(i) != t and row[i] > 0.01]
    top = sorted(order[:3])
    picks = [*top, t]
    fig = plt.figure(figsize=(max(6.0, 0.3 * (t + 1) + 2), 5.6))
    grid = fig.add_gridspec(2, len(picks), height_ratios=[1.0, 1.3])
    ax = fig.add_subplot(grid[0, :])
    im = ax.imshow(rows.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.scatter(cue, [h - 0.5] * len(cue), marker="^", color="tab:orange", s=60, clip_on=False)
    ax.set_yticks(range(h), [f"head {i}" for i in range(h)])
    ax.set_xlabel("step of the episode (orange: start-room object in view)")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03)
    for j, i in enumerate(picks):
        sub = fig.add_subplot(grid[1, j])
        if trace.frames:
            sub.imshow(trace.frames[i])
        label = " (split)" if i == t else f": head {head} {float(row[i]):.2f}"
        sub.set_title(f"step {i}{label}", fontsize=8)
        sub.axis("off")
    return save_figure(fig, path)


def finish(task: Any, model: nn.Module, folder: Path) -> dict[str, float]:
    """100 evaluation episodes (printed and returned), the attention picture for the
    attention policy, and the HTML report."""
    from attnlab.rl.task import run_episodes
    from attnlab.tasks.report import Section, write_html

    assert isinstance(model, AgentPolicy)
    scores = run_episodes(model, task.env_id, FINAL_EPISODES).summary()
    print(
        f"{FINAL_EPISODES} evaluation episodes ({task.env_id}, {task.policy} policy):",
        json.dumps(scores),
    )
    folder.mkdir(parents=True, exist_ok=True)
    sections = []
    if isinstance(model, AttentionPolicy) and "Memory" in task.env_id:
        pic = _decision_picture(task, model, folder)
        if pic is not None:
            sections.append(Section("Where the agent looks back at the split", "", [pic]))
    write_html(folder / "report.html", f"{task.name}: {task.policy} policy", scores, sections)
    return scores


def _decision_picture(task: Any, model: AttentionPolicy, folder: Path) -> Path | None:
    """The picture of the first of 20 greedy episodes that reaches the split."""
    for seed in range(20):
        trace = trace_episode(model, task.env_id, seed=seed, frames=True)
        row = decision_attention(model, trace)
        if row is not None:
            outcome = "success" if trace.reward > 0 else "failure"
            title = f"{task.env_id}, episode seed {seed} ({outcome}): the split step's attention"
            return plot_decision(trace, row, folder / "decision_attention.png", title)
    return None
