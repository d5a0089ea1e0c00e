"""Agents that attend over what they have seen: PPO on MiniGrid with an attention policy
(a causal transformer over the last steps, with a rolling key/value cache), and LSTM and
MLP baselines.

- :mod:`~attnlab.rl.env`: MiniGrid environments as batched one-hot tensors.
- :mod:`~attnlab.rl.policy`: the three policies, each with a whole-segment pass for
  training and a one-step pass for acting that agree exactly.
- :mod:`~attnlab.rl.ppo`: rollouts, generalized advantage estimation, the clipped loss.
- :mod:`~attnlab.rl.task`: PPO as a task of :class:`attnlab.train.Trainer`, evaluation.
- :mod:`~attnlab.rl.report`: the final evaluation and the picture of where the agent
  looks back; :mod:`~attnlab.rl.specs`: the ``attnlab train`` entries.

Needs the ``rl`` extra (gymnasium, minigrid): ``pip install 'attnlab[rl]'``.

Example:
    >>> from attnlab.rl import AgentTask, Trainer, TrainConfig
    >>> task = AgentTask(n_envs=4, rollout_steps=8, eval_episodes=2, d_model=16)
    >>> cfg = TrainConfig(steps=16, eval_every=16, progress=False, warmup=0)
    >>> Trainer(task, cfg).fit()[-1]["step"]
    16
"""

from __future__ import annotations

from attnlab.rl.env import GridEnvs, encode
from attnlab.rl.policy import AttentionPolicy, LSTMPolicy, MLPPolicy, build_policy
from attnlab.rl.ppo import PPOConfig, Rollout, collect, gae, ppo_loss
from attnlab.rl.task import AgentTask, run_episodes
from attnlab.train import TrainConfig, Trainer

__all__ = [
    "AgentTask",
    "AttentionPolicy",
    "GridEnvs",
    "LSTMPolicy",
    "MLPPolicy",
    "PPOConfig",
    "Rollout",
    "TrainConfig",
    "Trainer",
    "build_policy",
    "collect",
    "encode",
    "gae",
    "ppo_loss",
    "run_episodes",
]
