"""MiniGrid environments as batched tensors: ``n`` gymnasium environments stepped together,
each observation encoded as one-hot features, episodes restarted as they end.

The agent sees MiniGrid's partial, egocentric 7x7 view: per cell an (object, colour,
state) triple, and its facing direction. :func:`encode` turns that into a flat float
vector: one-hot object (11), colour (6) and state (3) per cell, then one-hot direction
(4), ``7*7*20 + 4 = 984`` features. Each environment keeps a reduced action set: the
memory task needs only turning and moving; DoorKey adds pick-up and toggle.

Example:
    >>> envs = GridEnvs("MiniGrid-MemoryS11-v0", 2, seed=0)
    >>> obs = envs.reset()
    >>> tuple(obs.shape), envs.num_actions
    ((2, 984), 3)
    >>> obs, reward, done = envs.step(torch.tensor([2, 0]))
    >>> tuple(reward.shape), done.dtype
    ((2,), torch.bool)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from attnlab._validate import nonnegative_int, positive_int

__all__ = ["ACTIONS", "OBS_DIM", "EpisodeLog", "GridEnvs", "encode", "make_env"]

# MiniGrid's action ids kept per environment family (0 left, 1 right, 2 forward,
# 3 pick up, 5 toggle); the agent's action i is ACTIONS[family][i].
ACTIONS: dict[str, tuple[int, ...]] = {"Memory": (0, 1, 2), "DoorKey": (0, 1, 2, 3, 5)}
_OBJECTS, _COLOURS, _STATES, _DIRS = 11, 6, 3, 4
OBS_DIM = 7 * 7 * (_OBJECTS + _COLOURS + _STATES) + _DIRS  # 984


def make_env(env_id: str) -> Any:
    """A gymnasium MiniGrid environment, or a clear error when the ``rl`` extra is missing
    or ``env_id`` is not a registered MiniGrid Memory or DoorKey environment."""
    if not isinstance(env_id, str):
        raise TypeError(f"env_id must be a str, got {type(env_id).__name__}")
    _family(env_id)
    try:
        import gymnasium as gym
        import minigrid  # noqa: F401  (registers the MiniGrid environments)
    except ImportError as e:  # pragma: no cover - depends on the installed extras
        raise ImportError("attnlab.rl needs the rl extra: pip install 'attnlab[rl]'") from e
    if env_id not in gym.registry:
        known = sorted(k for k in gym.registry if k.startswith("MiniGrid-") and _known(k))
        raise ValueError(f"env_id must be one of {known}, got {env_id!r}")
    return gym.make(env_id)


def _known(env_id: str) -> bool:
    return any(f"-{name}" in env_id for name in ACTIONS)


def _family(env_id: str) -> str:
    for name in ACTIONS:
        if env_id.startswith(f"MiniGrid-{name}"):
            return name
    raise ValueError(
        f"env_id must be a MiniGrid Memory or DoorKey environment (e.g. "
        f"'MiniGrid-MemoryS11-v0', 'MiniGrid-DoorKey-5x5-v0'), got {env_id!r}"
    )


def encode(image: np.ndarray | Tensor, direction: int | np.ndarray | Tensor) -> Tensor:
    """One-hot features ``(..., 984)`` of MiniGrid views ``(..., 7, 7, 3)`` and directions
    of their leading shape ``(...)`` (or one direction for all), both of an integer dtype
    (1.7 is no MiniGrid index: it was read as 1). An empty batch ``(0, 7, 7, 3)`` gives
    empty features ``(0, 984)``, as a policy's :meth:`initial_state` takes 0 environments.

    Example:
        >>> img = np.zeros((7, 7, 3), dtype=np.uint8)
        >>> x = encode(img, 1)
        >>> tuple(x.shape), float(x.sum())  # 49 cells x 3 one-hots + 1 direction
        ((984,), 148.0)
        >>> encode(img, 5)
        Traceback (most recent call last):
        ...
        ValueError: direction must hold MiniGrid directions in [0, 4), got 5
    """
    img = np.asarray(image)  # (..., 7, 7, 3)
    if img.shape[-3:] != (7, 7, 3):
        raise ValueError(f"image must be (..., 7, 7, 3), got {tuple(img.shape)}")
    _integers("image", img, "object, colour and state indices")
    lead, dirs = img.shape[:-3], _directions(direction, img.shape)  # dirs (N,)
    n = math.prod(lead)  # (reshape(-1, ...) of 0 views: a bare numpy error)
    flat = img.reshape(n, 49, 3).astype(np.int64)  # (N, 49, 3)
    for i, what in enumerate(("object", "colour", "state")):
        _in_range(f"image[..., {i}]", flat[..., i], f"{what} indices", int(_LIMITS[i]))
    hot = (flat + _OFFSETS).reshape(n, 49 * 3)  # (N, 147) feature indices
    out = np.zeros((n, OBS_DIM), dtype=np.float32)
    rows = np.arange(n)[:, None]
    out[rows, hot] = 1.0
    out[rows[:, 0], OBS_DIM - _DIRS + dirs] = 1.0
    return torch.from_numpy(out.reshape(*lead, OBS_DIM))


def _integers(name: str, x: object, what: str) -> np.ndarray:
    """``x`` as a numpy array of an integer dtype, or a TypeError naming ``name`` (floats
    were truncated: image 1.7 read as object 1, direction 2.9 as 2)."""
    arr = np.asarray(x)
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must hold MiniGrid {what} as ints, got dtype {arr.dtype}")
    return arr


def _directions(direction: object, views: tuple[int, ...]) -> np.ndarray:
    """The directions of views of shape ``views`` ``(..., 7, 7, 3)``, flat ``(N,)``: ints
    of their leading shape or one for all, in ``[0, 4)`` (a direction of another shape gave
    numpy's bare broadcast error)."""
    lead = views[:-3]
    dirs = _integers("direction", direction, "directions")
    if dirs.shape not in ((), lead):
        raise ValueError(
            f"direction must have the views' leading shape {lead} (image {views}) or be one "
            f"direction, got shape {dirs.shape}"
        )
    flat = np.broadcast_to(dirs.astype(np.int64), lead).reshape(math.prod(lead))
    _in_range("direction", flat, "directions", _DIRS)
    return flat


def _in_range(name: str, x: np.ndarray, what: str, limit: int) -> None:
    """A ValueError naming ``name`` unless every value of ``x`` is in ``[0, limit)`` (they
    were clipped or wrapped into the one-hot of another value: direction 5 read as 1)."""
    bad = x[(x < 0) | (x >= limit)]
    if bad.size:
        raise ValueError(f"{name} must hold MiniGrid {what} in [0, {limit}), got {bad.flat[0]}")


_LIMITS = np.array([_OBJECTS, _COLOURS, _STATES])
_WIDTH = _OBJECTS + _COLOURS + _STATES
# feature index of value 0 of each (cell, channel): cell * 20 + channel start
_OFFSETS = np.arange(49)[:, None] * _WIDTH + np.array([0, _OBJECTS, _OBJECTS + _COLOURS])


@dataclass
class EpisodeLog:
    """Returns and successes of the episodes finished so far (success: reward > 0)."""

    returns: list[float] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)

    @property
    def success(self) -> list[bool]:
        return [r > 0 for r in self.returns]


class GridEnvs:
    """``n`` copies of ``env_id`` stepped in lock-step; finished episodes restart at once.

    Every episode is seeded by a generator seeded with ``seed`` (:meth:`reset` may give a
    new one), so a run is a pure function of the seed and the actions. :attr:`log` collects
    finished episodes; :attr:`starts` says which environments began a new episode at the
    current observation.

    Example:
        >>> envs = GridEnvs("MiniGrid-MemoryS11-v0", 2, seed=0)
        >>> first = envs.reset()
        >>> torch.equal(first, envs.reset(seed=0)), envs.starts.tolist()  # seeded episodes
        (True, [True, True])
        >>> _ = envs.step(torch.tensor([0, 1]))  # turn left, turn right
        >>> envs.running(), envs.starts.tolist(), envs.log.returns  # none has ended yet
        (2, [False, False], [])
    """

    def __init__(self, env_id: str, n: int, *, seed: int = 0) -> None:
        if not isinstance(env_id, str):  # (an int: "'int' object has no attribute")
            raise TypeError(f"env_id must be a str, got {type(env_id).__name__}")
        self.env_id, self.n = env_id, positive_int("n", n)
        self.actions = ACTIONS[_family(env_id)]
        self.envs = [make_env(env_id) for _ in range(self.n)]
        self._rng = np.random.default_rng(nonnegative_int("seed", seed))
        self._ret = np.zeros(self.n)
        self._len = np.zeros(self.n, dtype=np.int64)
        self.starts = torch.ones(self.n, dtype=torch.bool)
        self.log = EpisodeLog()
        self._last: list[dict[str, Any]] = []  # the latest raw observations

    @property
    def num_actions(self) -> int:
        return len(self.actions)

    def running(self) -> int:
        """How many environments are inside an episode (one step or more, not finished)."""
        return int((self._len > 0).sum())

    def _reset_one(self, i: int) -> dict[str, Any]:
        obs, _ = self.envs[i].reset(seed=int(self._rng.integers(2**31)))
        self._ret[i], self._len[i] = 0.0, 0
        return obs

    def reset(self, seed: int | None = None) -> Tensor:
        """Start every environment afresh (seeding episodes from ``seed`` when given) and
        clear the log; observations ``(n, 984)``."""
        if seed is not None:
            self._rng = np.random.default_rng(nonnegative_int("seed", seed))
        self.log = EpisodeLog()
        self.starts = torch.ones(self.n, dtype=torch.bool)
        self._last = [self._reset_one(i) for i in range(self.n)]
        return _encode_all(self._last)

    def step(self, actions: Tensor, active: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Act; returns ``(next observations (n, 984), rewards (n,), done (n,))``.

        A done environment's next observation is the first of its new episode. With
        ``active`` (bool ``(n,)``), the others stand still: their observation is repeated,
        with reward 0 and not done. ``actions`` must be of an integer dtype (``0.0`` is
        not an action: a ValueError, as an action out of range is). :meth:`reset` comes first.
        """
        acts = torch.as_tensor(actions).flatten()
        if not _valid_actions(acts, self.n, self.num_actions):
            raise ValueError(
                f"actions must be {self.n} ints in [0, {self.num_actions}), got {acts.tolist()}"
            )
        obs, rewards, dones = [], np.zeros(self.n, dtype=np.float32), np.zeros(self.n, bool)
        if active is not None and not (
            isinstance(active, Tensor) and active.dtype == torch.bool and active.shape == (self.n,)
        ):  # (int 1: ~1 = -2 is truthy, every environment stood still)
            seen = f"{active.dtype} {tuple(active.shape)}" if isinstance(active, Tensor) else active
            raise TypeError(f"active must be a bool tensor ({self.n},) or None, got {seen}")
        if not self._last:  # (gymnasium's ResetNeeded; with active, a bare IndexError)
            raise RuntimeError("GridEnvs.step needs reset() first: no episode has begun")
        skip = [False] * self.n if active is None else (~active).tolist()
        for i, (env, a) in enumerate(zip(self.envs, acts.tolist(), strict=True)):
            if skip[i]:
                obs.append(self._last[i])
                continue
            o, r, term, trunc, _ = env.step(self.actions[a])
            self._ret[i] += r
            self._len[i] += 1
            rewards[i], dones[i] = r, term or trunc
            if dones[i]:
                self.log.returns.append(float(self._ret[i]))
                self.log.lengths.append(int(self._len[i]))
                obs.append(self._reset_one(i))
            else:
                obs.append(o)
        self.starts, self._last = torch.from_numpy(dones.copy()), obs
        return _encode_all(obs), torch.from_numpy(rewards), self.starts.clone()


def _valid_actions(acts: Tensor, n: int, k: int) -> bool:
    """Whether ``acts`` is ``n`` actions in ``[0, k)`` of an integer dtype (floats such as
    ``0.0`` went on to index the action tuple: a bare TypeError)."""
    if acts.is_floating_point() or acts.is_complex() or acts.dtype == torch.bool:
        return False
    return acts.numel() == n and bool(((acts >= 0) & (acts < k)).all())


def _encode_all(obs: list[dict[str, Any]]) -> Tensor:
    """Features ``(n, 984)`` of ``n`` MiniGrid observation dicts."""
    return encode(np.stack([o["image"] for o in obs]), np.array([o["direction"] for o in obs]))
