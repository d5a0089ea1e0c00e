"""The agent tasks of ``attnlab train``: each environment with each policy.

``memory-agent`` is the attention policy on ``MiniGrid-MemoryS11-v0``: at the end of a
hallway it must turn to the object that matches the one in the start room, out of sight
by then. (In the smaller S7 and S9 the start-room object is in view from the split when
the agent looks back, so a policy without memory can solve them; S11 is the smallest that
needs memory.) ``doorkey-agent`` is the same on ``MiniGrid-DoorKey-5x5-v0``, where
everything the agent needs is in view. ``-lstm`` and ``-mlp`` name the baselines, trained
with the same budget.

Example:
    >>> sorted(AGENT_TASKS)[:2]
    ['doorkey-agent', 'doorkey-agent-lstm']
    >>> MEMORY_AGENT.defaults["eval_every"] % 16
    0
"""

from __future__ import annotations

from typing import Any

from attnlab.rl.report import finish
from attnlab.rl.task import (
    DOORKEY_ENV,
    MEMORY_ENV,
    MINIBATCH_ENVS,
    N_ENVS,
    PPO_EPOCHS,
    ROLLOUT_STEPS,
    AgentTask,
)
from attnlab.tasks.registry import TaskSpec
from attnlab.train.loop import Task

__all__ = ["AGENT_TASKS", "MAX_ENVS", "agent_spec"]

FRAMES = {MEMORY_ENV: 2_000_000, DOORKEY_ENV: 300_000}  # the default budget, in env steps
# --train-size (environments) at most: 64x the default. A rollout's observations take
# 128 x 984 float32 per environment (0.5 MB), so 1024 take about 0.5 GiB (a million:
# 469 GiB, after minutes of building ~15 GiB of environments)
MAX_ENVS = 1024


def agent_spec(name: str, env_id: str, policy: str) -> TaskSpec:
    """The :class:`TaskSpec` of a PPO agent: ``--train-size`` sets the number of parallel
    environments (at most :data:`MAX_ENVS`), ``--batch-size`` the environments per
    minibatch; ``--steps`` counts optimizer steps (16 per rollout of 16 x 128 steps at the
    defaults).

    Example:
        >>> agent_spec("memory-agent", MEMORY_ENV, "attention").max_train_size
        1024
    """
    per_iteration = PPO_EPOCHS * (N_ENVS // MINIBATCH_ENVS)
    iterations = FRAMES[env_id] // (N_ENVS * ROLLOUT_STEPS)
    defaults: dict[str, Any] = {
        "steps": iterations * per_iteration,
        "batch_size": MINIBATCH_ENVS,  # environments per minibatch
        "lr": 1e-3,
        "warmup": 0,
        "clip": 0.5,
        "weight_decay": 0.0,
        "eval_every": 25 * per_iteration,
        "threads": 1,
    }

    def build(n: int | None) -> Task:
        return AgentTask(env_id=env_id, policy=policy, name=name, n_envs=n or N_ENVS)

    summary = f"PPO agent, {policy} policy, on {env_id} ({FRAMES[env_id] // 1000}k frames)"
    return TaskSpec(
        summary=summary,
        build=build,
        defaults=defaults,
        finish=finish,
        max_train_size=MAX_ENVS,
        score_range=(0.0, 1.0),  # the success rate, a fraction
    )


AGENT_TASKS: dict[str, TaskSpec] = {
    f"{prefix}{suffix}": agent_spec(f"{prefix}{suffix}", env, policy)
    for prefix, env in (("memory-agent", MEMORY_ENV), ("doorkey-agent", DOORKEY_ENV))
    for suffix, policy in (("", "attention"), ("-lstm", "lstm"), ("-mlp", "mlp"))
}
MEMORY_AGENT = AGENT_TASKS["memory-agent"]
MEMORY_AGENT_LSTM = AGENT_TASKS["memory-agent-lstm"]
MEMORY_AGENT_MLP = AGENT_TASKS["memory-agent-mlp"]
DOORKEY_AGENT = AGENT_TASKS["doorkey-agent"]
DOORKEY_AGENT_LSTM = AGENT_TASKS["doorkey-agent-lstm"]
DOORKEY_AGENT_MLP = AGENT_TASKS["doorkey-agent-mlp"]
