"""Proximal policy optimization (Schulman et al. 2017) on segments of experience.

:func:`collect` runs a policy in :class:`~attnlab.rl.env.GridEnvs` for ``T`` steps and
returns a :class:`Rollout` of ``(B, T)`` tensors; :func:`gae` computes generalized
advantage estimates (Schulman et al. 2016); :func:`ppo_loss` is the clipped surrogate
objective with a value loss and an entropy bonus, over whole segments so recurrent and
attending policies see each step's past.

Example:
    >>> rewards = torch.tensor([[0.0, 0.0, 1.0]])
    >>> values = torch.zeros(1, 3)
    >>> dones = torch.tensor([[False, False, True]])
    >>> adv, ret = gae(rewards, values, dones, torch.zeros(1), gamma=0.5, lam=1.0)
    >>> adv.tolist()
    [[0.25, 0.5, 1.0]]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from attnlab._validate import (
    instance_of,
    nonnegative_int,
    plain_fields,
    positive_int,
    real_where,
    validate_flag,
)
from attnlab.rl.env import OBS_DIM, GridEnvs
from attnlab.rl.policy import AgentPolicy

__all__ = [
    "SEED_BITS",
    "PPOConfig",
    "Rollout",
    "check_policy",
    "check_seed",
    "collect",
    "gae",
    "ppo_loss",
]

SEED_BITS = 63  # a seed of torch.Generator.manual_seed held in an int64


@dataclass(frozen=True)
class PPOConfig:
    """PPO's settings: discount ``gamma``, GAE ``lam``, the ratio clip, the value-loss and
    entropy weights.

    Example:
        >>> PPOConfig(gamma=0.9).clip
        0.2
        >>> PPOConfig(lam=1.5)
        Traceback (most recent call last):
        ...
        ValueError: lam must be in [0, 1], got 1.5
    """

    gamma: float = 0.99
    lam: float = 0.95
    clip: float = 0.2
    value_coef: float = 0.5
    entropy_coef: float = 0.01

    def __post_init__(self) -> None:  # ("0.9" failed as "'<=' not supported ... 'str'")
        plain_fields(self)  # numpy scalars as Python's: the config stays JSON-able
        for name in ("gamma", "lam"):
            _rate(name, getattr(self, name))
        for name in ("clip", "value_coef", "entropy_coef"):  # (inf: no clipping, an inf loss)
            real_where(name, getattr(self, name), lambda x: 0.0 <= x < math.inf, "finite, >= 0")


@dataclass
class Rollout:
    """``T`` steps of ``B`` environments: inputs ``obs (B, T, D)``, ``starts (B, T)``,
    the actions taken, their log-probabilities and values at the time, the rewards and
    ``dones`` (the episode ended after that step), and the advantages and returns.

    Example:
        >>> z = torch.zeros(3, 4)  # 3 environments, 4 steps
        >>> r = Rollout(torch.zeros(3, 4, 5), z.bool(), z.long(), z, z, z, z.bool(), z, z)
        >>> part = r.select(torch.tensor([0, 2]))  # a minibatch of environments 0 and 2
        >>> tuple(part.obs.shape), tuple(part.actions.shape)
        ((2, 4, 5), (2, 4))
    """

    obs: Tensor
    starts: Tensor
    actions: Tensor
    logp: Tensor
    values: Tensor
    rewards: Tensor
    dones: Tensor
    advantages: Tensor
    returns: Tensor

    def select(self, envs: Tensor) -> Rollout:
        """The segments of environments ``envs`` (a minibatch)."""
        return Rollout(*(getattr(self, f)[envs] for f in self.__dataclass_fields__))


def gae(
    rewards: Tensor, values: Tensor, dones: Tensor, last_value: Tensor, *, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimates and returns ``(B, T)``.

    ``delta_t = r_t + gamma * V_{t+1} * (1 - done_t) - V_t`` and
    ``A_t = delta_t + gamma * lam * (1 - done_t) * A_{t+1}``, with ``V_T = last_value``
    (the segment's cut is bootstrapped, an episode's end is not); returns ``A + V``, in
    the inputs' dtype (float64 stays float64) and on their device.

    Example:
        >>> cut = torch.zeros(1, 3, dtype=torch.bool)  # no episode ends: V_3 = last_value
        >>> adv, ret = gae(torch.zeros(1, 3), torch.ones(1, 3), cut, torch.ones(1),
        ...                gamma=0.5, lam=1.0)
        >>> adv.tolist(), ret.tolist()  # lam = 1: returns are the discounted last_value
        ([[-0.875, -0.75, -0.5]], [[0.125, 0.25, 0.5]])
        >>> gae(torch.zeros(1, 3), torch.ones(1, 3), cut, torch.ones(1), gamma=2.0, lam=1.0)
        Traceback (most recent call last):
        ...
        ValueError: gamma must be in [0, 1], got 2.0
    """
    _check_gae(rewards, values, last_value, gamma=gamma, lam=lam)
    if not isinstance(dones, Tensor) or dones.dtype != torch.bool or dones.shape != rewards.shape:
        seen = f"{dones.dtype} {tuple(dones.shape)}" if isinstance(dones, Tensor) else dones
        raise TypeError(  # (int 0/1: ~0 = -1 and ~1 = -2 weighed the steps, no error)
            f"dones must be a bool tensor of the rewards' shape {tuple(rewards.shape)}, got {seen}"
        )
    b, t = rewards.shape
    dtype = torch.promote_types(torch.result_type(rewards, values), last_value.dtype)
    if not dtype.is_floating_point:  # (integer rewards and values)
        dtype = torch.get_default_dtype()
    adv = torch.zeros(b, t, dtype=dtype, device=values.device)
    running, next_value = adv.new_zeros(b), last_value
    for i in reversed(range(t)):
        live = (~dones[:, i]).to(dtype)
        delta = rewards[:, i] + gamma * next_value * live - values[:, i]
        running = delta + gamma * lam * live * running
        adv[:, i], next_value = running, values[:, i]
    return adv, adv + values


def _check_gae(rewards: object, values: object, last_value: object, **rates: object) -> None:
    """Raise a TypeError/ValueError naming the argument unless ``rewards`` is a tensor
    ``(B, T)``, ``values`` one of its shape, ``last_value`` one of shape ``(B,)`` and each
    of ``rates`` (gamma, lam) in [0, 1], by the check :class:`PPOConfig` uses (a mismatched
    shape raised torch's bare size error, gamma=2.0 was taken)."""
    r = _tensor("rewards", rewards, "(B, T)")
    if r.dim() != 2:
        raise ValueError(f"rewards must be a tensor (B, T), got shape {tuple(r.shape)}")
    for name, x, want in (("values", values, r.shape), ("last_value", last_value, r.shape[:1])):
        got = _tensor(name, x, str(tuple(want))).shape
        if got != want:
            raise ValueError(
                f"{name} must have shape {tuple(want)} (rewards (B, T) = {tuple(r.shape)}), "
                f"got {tuple(got)}"
            )
    for name, rate in rates.items():
        _rate(name, rate)


def _rate(name: str, x: object) -> None:
    """A discount or GAE rate (``gamma``, ``lam``): a real number in [0, 1], or an error
    naming ``name``."""
    real_where(name, x, lambda v: 0.0 <= v <= 1.0, "in [0, 1]")


def _tensor(name: str, x: object, shape: str) -> Tensor:
    """``x`` if a tensor, or a TypeError naming ``name`` and the ``shape`` expected."""
    return instance_of(name, x, Tensor, f"a tensor {shape}")


def check_policy(policy: object, envs: object) -> AgentPolicy:
    """``policy`` if it can act in ``envs``: an :class:`AgentPolicy` with their number of
    actions and observation features; a TypeError/ValueError naming both otherwise (a
    3-action policy ran DoorKey, 5 actions, silently and never picked up the key; a
    5-action one failed on Memory only once it sampled action 3, blaming ``actions``).

    Example:
        >>> from attnlab.rl.policy import build_policy
        >>> check_policy(build_policy("mlp", OBS_DIM, 3, d_model=8),
        ...              GridEnvs("MiniGrid-DoorKey-5x5-v0", 1))
        Traceback (most recent call last):
        ...
        ValueError: policy has 3 actions, MiniGrid-DoorKey-5x5-v0 needs 5
    """
    pol = instance_of("policy", policy, AgentPolicy, "an attnlab.rl policy (AgentPolicy)")
    env = instance_of("envs", envs, GridEnvs, "a GridEnvs")
    if pol.num_actions != env.num_actions:
        raise ValueError(
            f"policy has {pol.num_actions} actions, {env.env_id} needs {env.num_actions}"
        )
    if pol.obs_dim != OBS_DIM:
        raise ValueError(
            f"policy takes {pol.obs_dim} observation features, {env.env_id} gives {OBS_DIM}"
        )
    return pol


def check_seed(
    seed: object, bits: int = SEED_BITS, why: str = "a torch generator's seed must fit in an int64"
) -> int:
    """``seed`` as an int in ``[0, 2**bits)`` (``why`` says what bounds it), or a
    TypeError/ValueError naming ``seed`` (1.5, "3" and True reached torch's bare "manual_seed
    expected a long", 2**64 its "Overflow when unpacking long long").

    Example:
        >>> check_seed(2**63 - 1) == 2**63 - 1
        True
        >>> check_seed(2**63)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: seed must be an int in [0, 2**63) (a torch generator's seed must fit ...
    """
    value = nonnegative_int("seed", seed)
    if value >= 2**bits:
        raise ValueError(f"seed must be an int in [0, 2**{bits}) ({why}), got {value}")
    return value


@torch.no_grad()
def collect(
    policy: AgentPolicy,
    envs: GridEnvs,
    steps: int,
    *,
    seed: int,
    cfg: PPOConfig,
    greedy: bool = False,
) -> Rollout:
    """Run ``policy`` for ``steps`` steps in ``envs`` started afresh from ``seed``, an int
    in ``[0, 2**63)``; actions sampled by a generator seeded with ``seed`` (or the most
    likely one, ``greedy``). The policy must fit the environments (:func:`check_policy`):
    both are checked before any step.

    Example:
        >>> from attnlab.rl.env import OBS_DIM
        >>> from attnlab.rl.policy import build_policy
        >>> pol = build_policy("mlp", OBS_DIM, 3, d_model=8)
        >>> envs = GridEnvs("MiniGrid-MemoryS11-v0", 2)
        >>> r = collect(pol, envs, 4, seed=0, cfg=PPOConfig())
        >>> tuple(r.obs.shape), tuple(r.actions.shape), tuple(r.advantages.shape)
        ((2, 4, 984), (2, 4), (2, 4))
        >>> torch.equal(r.actions, collect(pol, envs, 4, seed=0, cfg=PPOConfig()).actions)
        True
    """
    steps = positive_int("steps", steps)  # (0: "stack expects a non-empty TensorList")
    cfg = instance_of("cfg", cfg, PPOConfig, "a PPOConfig")  # (a dict: after the rollout)
    greedy = validate_flag("greedy", greedy)  # ("no" acted greedily)
    seed, policy = check_seed(seed), check_policy(policy, envs)
    gen = torch.Generator().manual_seed(seed)
    obs, state = envs.reset(seed), policy.initial_state(envs.n)
    starts = envs.starts.clone()
    cols: dict[str, list[Tensor]] = {k: [] for k in ("obs", "starts", "act", "logp", "v", "r", "d")}
    for _ in range(steps):
        logits, value, state = policy.step(obs, starts, state)
        logp_all = torch.log_softmax(logits, -1)  # (B, A)
        act = (
            logits.argmax(-1)
            if greedy
            else torch.multinomial(logp_all.exp(), 1, generator=gen)[:, 0]
        )
        logp = logp_all.gather(1, act[:, None])[:, 0]  # (B,)
        next_obs, reward, done = envs.step(act)
        for k, x in zip(cols, (obs, starts, act, logp, value, reward, done), strict=True):
            cols[k].append(x)
        obs, starts = next_obs, done
    last_value = policy.step(obs, starts, state)[1]
    obs_t, starts_t, act_t, logp_t, v_t, r_t, d_t = (torch.stack(cols[k], 1) for k in cols)
    adv, ret = gae(r_t, v_t, d_t, last_value, gamma=cfg.gamma, lam=cfg.lam)
    return Rollout(obs_t, starts_t, act_t, logp_t, v_t, r_t, d_t, adv, ret)


def ppo_loss(
    policy: AgentPolicy, batch: Rollout, cfg: PPOConfig
) -> tuple[Tensor, dict[str, float]]:
    """The clipped PPO loss of ``batch`` (advantages normalized over the batch):
    ``-E[min(rho A, clip(rho, 1-eps, 1+eps) A)] + c_v E[(V - R)^2] / 2 - c_e E[H(pi)]``,
    ``rho = exp(log pi(a) - log pi_old(a))``; and its parts as floats.

    Example:
        >>> from attnlab.rl.env import OBS_DIM
        >>> from attnlab.rl.policy import build_policy
        >>> pol = build_policy("mlp", OBS_DIM, 3, d_model=8)
        >>> r = collect(pol, GridEnvs("MiniGrid-MemoryS11-v0", 2), 4, seed=0, cfg=PPOConfig())
        >>> loss, parts = ppo_loss(pol, r, PPOConfig())
        >>> sorted(parts), loss.requires_grad
        (['entropy', 'policy', 'value'], True)
        >>> abs(parts["policy"]) < 1e-6  # the policy that collected r: every ratio is 1
        True
    """
    cfg = instance_of("cfg", cfg, PPOConfig, "a PPOConfig")
    logits, values = policy(batch.obs, batch.starts)  # (B, T, A), (B, T)
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(-1, batch.actions[..., None])[..., 0]  # (B, T)
    adv = batch.advantages
    spread = adv.std() if adv.numel() > 1 else adv.new_zeros(())  # (NaN of one element)
    adv = (adv - adv.mean()) / (spread + 1e-8)
    ratio = torch.exp(logp - batch.logp)
    surrogate = torch.min(ratio * adv, ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * adv)
    policy_loss = -surrogate.mean()
    value_loss = 0.5 * (values - batch.returns).pow(2).mean()
    entropy = -(logp_all.exp() * logp_all).sum(-1).mean()
    loss = policy_loss + cfg.value_coef * value_loss - cfg.entropy_coef * entropy
    parts = {
        k: float(x.detach())
        for k, x in (("policy", policy_loss), ("value", value_loss), ("entropy", entropy))
    }
    return loss, parts
