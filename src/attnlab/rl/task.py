"""Agents as tasks of ``attnlab train``: PPO through the same trainer as every other task
(checkpoints, ``--resume``, Ctrl-C, time limits, progress).

One PPO *iteration* collects a rollout (``n_envs`` environments, ``rollout_steps`` steps
each), then makes ``ppo_epochs`` passes over it in minibatches of whole environment
segments: the trainer's ``batch_size`` is the number of environments per minibatch and
its batch indices (a seeded shuffle per pass) pick them, so one iteration is
``ppo_epochs * (n_envs // batch_size)`` optimizer steps. The trainer tells the task each
step's number (:meth:`AgentTask.begin_step`); :meth:`AgentTask.batch` collects the next
rollout when a new iteration begins. Every rollout is a pure function of
``(seed, iteration, weights)``: its environments are restarted from a seed made of both.
A checkpoint taken partway through an iteration's steps (Ctrl-C, a time limit, an
evaluation between iterations) holds that rollout too (:meth:`AgentTask.task_state`), and
the minibatches are a pure function of the trainer's seed and step; so a run resumed from
any checkpoint takes exactly the steps of one that never stopped.

Example:
    >>> task = AgentTask(n_envs=2, rollout_steps=4, ppo_epochs=1, eval_episodes=2, d_model=16)
    >>> model = task.build_model()
    >>> task.begin_step(model, 0)
    >>> batch = task.batch(torch.tensor([1]))  # one environment per minibatch
    >>> tuple(batch.obs.shape), task.steps_per_iteration(1)
    ((1, 4, 984), 2)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn

from attnlab._validate import plain_fields, positive_int, validate_flag
from attnlab.rl.env import OBS_DIM, GridEnvs
from attnlab.rl.policy import POLICIES, AgentPolicy, build_policy
from attnlab.rl.ppo import PPOConfig, Rollout, check_policy, check_seed, collect, ppo_loss

__all__ = ["AgentTask", "EvalResult", "run_episodes"]

MEMORY_ENV, DOORKEY_ENV = "MiniGrid-MemoryS11-v0", "MiniGrid-DoorKey-5x5-v0"
EVAL_SEED = 1_000_000  # evaluation episodes never share a seed with training ones
# the defaults: 16 environments x 128 steps per rollout, 4 passes in minibatches of 4
N_ENVS, ROLLOUT_STEPS, PPO_EPOCHS, MINIBATCH_ENVS = 16, 128, 4, 4
# rollout i is seeded with seed * SEED_STRIDE + i; a seed below 2**TASK_SEED_BITS keeps that
# below 2**52 + i, well inside the int64 of torch's generator (2**62 overflowed at step 0)
SEED_STRIDE, TASK_SEED_BITS = 1_000_003, 32


@dataclass
class EvalResult:
    """One episode per environment: return, success (reward > 0) and length of each."""

    returns: list[float]
    success: list[bool]
    lengths: list[int]

    def summary(self) -> dict[str, float]:
        n = max(1, len(self.returns))
        return {
            "success": round(100 * sum(self.success) / n, 2),
            "return": round(sum(self.returns) / n, 4),
            "length": round(sum(self.lengths) / n, 1),
        }


@torch.no_grad()
def run_episodes(
    policy: AgentPolicy,
    env_id: str,
    episodes: int,
    *,
    seed: int = EVAL_SEED,
    greedy: bool = False,
) -> EvalResult:
    """Run ``episodes`` episodes in parallel, one per environment, each to its end;
    actions sampled from the policy (by a generator seeded with ``seed``, an int in
    ``[0, 2**63)``) or greedy. The policy must fit ``env_id``
    (:func:`~attnlab.rl.ppo.check_policy`): both are checked before any step.

    Example:
        >>> pol = build_policy("mlp", OBS_DIM, 3, d_model=8)
        >>> len(run_episodes(pol, MEMORY_ENV, 2).returns)
        2
    """
    greedy, seed = validate_flag("greedy", greedy), check_seed(seed)  # ("no" acted greedily)
    envs = GridEnvs(env_id, positive_int("episodes", episodes), seed=seed)
    policy = check_policy(policy, envs)
    obs, state, gen = (
        envs.reset(),
        policy.initial_state(envs.n),
        torch.Generator().manual_seed(seed),
    )
    starts, live = envs.starts.clone(), torch.ones(envs.n, dtype=torch.bool)
    ret, length = torch.zeros(envs.n), torch.zeros(envs.n, dtype=torch.long)
    success = torch.zeros(envs.n, dtype=torch.bool)
    while bool(live.any()):
        logits, _, state = policy.step(obs, starts, state)
        probs = torch.softmax(logits, -1)
        act = logits.argmax(-1) if greedy else torch.multinomial(probs, 1, generator=gen)[:, 0]
        obs, reward, done = envs.step(act, active=live)
        ret += reward * live
        length += live.long()
        success |= live & done & (reward > 0)
        live &= ~done
        starts = done
    return EvalResult(ret.tolist(), success.tolist(), length.tolist())


_SIZES = ("n_envs", "rollout_steps", "ppo_epochs", "d_model", "context", "eval_episodes")


@dataclass
class AgentTask:
    """A PPO agent of one policy kind in one MiniGrid environment (see the module doc).

    Attributes:
        env_id: a MiniGrid Memory or DoorKey environment.
        policy: ``"attention"``, ``"lstm"`` or ``"mlp"``.
        context: steps the attention policy sees (itself included).
        eval_episodes: episodes per evaluation during training (the final report: 100).
        seed: seeds the rollouts' environments and actions, an int in ``[0, 2**32)``
            (rollout ``i`` is seeded with ``seed * 1_000_003 + i``, which must fit in an
            int64); None draws it from torch's generator when the model is built, which the
            trainer has just seeded with ``TrainConfig.seed`` (so ``attnlab train --seed``
            sets it); a drawn seed resumes as the checkpoint's (:meth:`load_task_state`).

    Example:
        >>> task = AgentTask(policy="mlp", n_envs=2, rollout_steps=4, ppo_epochs=1, d_model=8,
        ...                  seed=0)
        >>> model = task.build_model()
        >>> model.kind, task.steps_per_iteration(batch_size=1), task.config()["ppo"]["clip"]
        ('mlp', 2, 0.2)
        >>> task.begin_step(model, 0)  # what the trainer does before each step
        >>> batch = task.batch(torch.tensor([0, 1]))  # collects the first rollout
        >>> tuple(batch.obs.shape), task.loss(model, batch).dim()
        ((2, 4, 984), 0)
    """

    env_id: str = MEMORY_ENV
    policy: str = "attention"
    n_envs: int = N_ENVS
    rollout_steps: int = ROLLOUT_STEPS
    ppo_epochs: int = PPO_EPOCHS
    d_model: int = 64
    context: int = 64
    eval_episodes: int = 32
    seed: int | None = None
    ppo: PPOConfig = field(default_factory=PPOConfig)
    name: str = "memory-agent"

    def __post_init__(self) -> None:
        plain_fields(self)  # numpy scalars as Python's: the config stays JSON-able
        if not isinstance(self.ppo, PPOConfig):  # (a dict failed in config(): asdict())
            raise TypeError(f"ppo must be a PPOConfig, got {type(self.ppo).__name__}")
        for k in _SIZES:
            positive_int(k, getattr(self, k))
        if self.seed is not None:
            why = f"each rollout's seed, seed * {SEED_STRIDE} + iteration, must fit in an int64"
            check_seed(self.seed, TASK_SEED_BITS, why)
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {sorted(POLICIES)}, got {self.policy!r}")
        self.envs = GridEnvs(self.env_id, self.n_envs, seed=self.seed or 0)
        self._drawn = self.seed is None  # drawn from the trainer's seed in build_model
        self._rollout: tuple[int, Rollout] | None = None
        self._per_iteration = 0  # optimizer steps per rollout, as of the last batch
        self._step, self._model = 0, cast(AgentPolicy | None, None)
        self.train_log: dict[str, float] = {}

    def steps_per_iteration(self, batch_size: int) -> int:
        """Optimizer steps per rollout when minibatches hold ``batch_size`` environments."""
        return self.ppo_epochs * max(1, self.n_envs // positive_int("batch_size", batch_size))

    def build_model(self) -> AgentPolicy:
        if self.seed is None:  # from the trainer's seed: one stream for weights and rollouts
            self.seed = int(torch.randint(0, 2**31 - 1, ()))
        opts: dict[str, Any] = {"d_model": self.d_model}
        if self.policy == "attention":
            opts["context"] = self.context
        return build_policy(self.policy, OBS_DIM, self.envs.num_actions, **opts)

    def config(self) -> dict[str, Any]:
        keys = ("env_id", "policy", *_SIZES, "seed")
        return {"task": self.name, **{k: getattr(self, k) for k in keys}, "ppo": asdict(self.ppo)}

    def num_train(self) -> int:
        return self.n_envs

    def begin_step(self, model: nn.Module, step: int) -> None:
        """Remember the model and the number of the step about to be taken."""
        self._model, self._step = _policy(model), step

    def batch(self, indices: Tensor) -> Rollout:
        """The segments of environments ``indices`` (the trainer's shuffled minibatch) from
        the rollout of the current iteration, collected first if it is a new one."""
        if self._model is None:
            raise RuntimeError("AgentTask.batch needs begin_step first (the trainer calls it)")
        self._per_iteration = self.steps_per_iteration(len(indices))
        it = self._step // self._per_iteration
        if self._rollout is None or self._rollout[0] != it:
            self._model.eval()
            seed = (self.seed or 0) * SEED_STRIDE + it
            ro = collect(self._model, self.envs, self.rollout_steps, seed=seed, cfg=self.ppo)
            self._model.train()
            self._rollout = (it, ro)
            self.train_log = _rollout_summary(self.envs)
        return self._rollout[1].select(indices)

    def task_state(self) -> dict[str, Any]:
        """What a checkpoint needs to go on exactly (the trainer saves it): while steps of
        the current iteration remain, its rollout's tensors, its number and its summary;
        nothing at an iteration's end (the next step collects a new rollout).

        Example:
            >>> task = AgentTask(policy="mlp", n_envs=2, rollout_steps=4, d_model=8, seed=0)
            >>> task.begin_step(task.build_model(), 0)
            >>> _ = task.batch(torch.tensor([0]))  # step 0 of 8 (4 passes x 2 minibatches)
            >>> state = task.task_state()
            >>> state["rollout_iteration"], tuple(state["rollout.obs"].shape)
            (0, (2, 4, 984))
        """
        if self._rollout is None or (self._step + 1) // self._per_iteration != self._rollout[0]:
            return {}
        it, ro = self._rollout
        tensors = {f"rollout.{k}": getattr(ro, k) for k in ro.__dataclass_fields__}
        if bool(((ro.obs == 0) | (ro.obs == 1)).all()):  # one-hot: a quarter of the bytes
            tensors["rollout.obs"] = ro.obs.bool()
        return {"rollout_iteration": it, "train_log": self.train_log, **tensors}

    def load_task_state(self, state: dict[str, Any], config: dict[str, Any]) -> None:
        """Take up a checkpoint's run (the trainer calls it on resume, with what
        :meth:`task_state` saved and the checkpoint's config): a seed drawn from the
        trainer's becomes the checkpoint's, so a resume under another ``--seed`` goes on
        with the run's rollouts; and a rollout saved partway through its steps is taken up
        where it stopped. (A checkpoint older than this holds no rollout: the iteration's
        rollout is then collected again, with the weights of the step it stopped at.)"""
        if self._drawn and isinstance(config.get("seed"), int):
            self.seed = config["seed"]
        same_run = json.loads(json.dumps(self.config())) == config  # (else refused after)
        if "rollout_iteration" in state and same_run:
            ro = _saved_rollout(state, (self.n_envs, self.rollout_steps))
            self._rollout = (int(state["rollout_iteration"]), ro)
            self.train_log = dict(state["train_log"])

    def loss(self, model: nn.Module, batch: Rollout) -> Tensor:
        return ppo_loss(_policy(model), batch, self.ppo)[0]

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        res = run_episodes(_policy(model), self.env_id, self.eval_episodes).summary()
        score = round(res["success"] / 100, 4)  # a fraction (46.88 / 100 = 0.46880000000000005)
        return {"score": score, **res, **self.train_log}


def _policy(model: nn.Module) -> AgentPolicy:
    if not isinstance(model, AgentPolicy):
        raise TypeError(f"model must be an attnlab.rl policy, got {type(model).__name__}")
    return model


def _saved_rollout(state: dict[str, Any], shape: tuple[int, int]) -> Rollout:
    """The :class:`Rollout` that :meth:`AgentTask.task_state` saved (observations back to
    float32), checked to be ``(n_envs, rollout_steps)`` segments."""
    fields: dict[str, Tensor] = {}
    for k in Rollout.__dataclass_fields__:
        x = state.get(f"rollout.{k}")
        if not isinstance(x, Tensor) or tuple(x.shape[:2]) != shape:
            raise ValueError(f"its rollout.{k} is not a tensor of {shape} segments")
        fields[k] = x
    fields["obs"] = fields["obs"].float()
    return Rollout(**fields)


def _rollout_summary(envs: GridEnvs) -> dict[str, float]:
    """Mean return and success (%) of the episodes the last rollout began: those its end
    cut off count as failures with their return so far. Counting finished episodes only
    would count successes only where the time limit is longer than a rollout (DoorKey:
    250 steps, rollouts of 128), which read 100% whatever the policy."""
    r = envs.log.returns
    episodes = len(r) + envs.running()
    n = max(1, episodes)
    return {
        "train_return": round(sum(r) / n, 4),
        "train_success": round(100 * sum(envs.log.success) / n, 2),
        "train_episodes": episodes,
    }
