"""Actor-critic policies over a stream of observations: attention over the recent past
(with a rolling key/value cache), an LSTM, and an MLP that sees only the present.

Every policy has two entry points that agree exactly:

- :meth:`~AgentPolicy.forward` ``(obs (B, T, D), starts (B, T))`` runs whole segments
  (training), where ``starts[b, t]`` marks the first step of an episode;
- :meth:`~AgentPolicy.step` ``(obs (B, D), starts (B,), state)`` acts one step at a time
  (collecting experience), carrying its memory in ``state``.

:class:`AttentionPolicy` is a causal transformer whose step ``t`` attends to steps
``t - context + 1 .. t`` of the same episode. In :meth:`step` each layer keeps its keys
and values in a ring buffer of ``context`` slots, so acting costs one step of work, not
``context``; its positions (the step within the episode, sinusoidal, added to the input)
travel inside the cached keys, so slot order does not matter.

Example:
    >>> pol = AttentionPolicy(984, 3, context=8, d_model=32, num_heads=2)
    >>> obs, starts = torch.randn(2, 5, 984), torch.zeros(2, 5, dtype=torch.bool)
    >>> starts[:, 0] = True
    >>> logits, values = pol(obs, starts)
    >>> tuple(logits.shape), tuple(values.shape)
    ((2, 5, 3), (2, 5))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from attnlab import masks
from attnlab._validate import instance_of, nonnegative_int, positive_int, same_dtype
from attnlab.functional import AttentionOutput, attention
from attnlab.nn._weights import weight_dtype
from attnlab.positional import sinusoidal_table

__all__ = [
    "POLICIES",
    "AgentPolicy",
    "AttentionPolicy",
    "LSTMPolicy",
    "MLPPolicy",
    "RingCache",
    "build_policy",
    "episode_steps",
]


def episode_steps(starts: Tensor) -> Tensor:
    """Step index within the episode ``(B, T)`` of each position, from episode starts
    ``(B, T)`` (a segment's first position counts as a start).

    Example:
        >>> episode_steps(torch.tensor([[1, 0, 0, 1, 0]]).bool()).tolist()
        [[0, 1, 2, 0, 1]]
    """
    if not isinstance(starts, Tensor) or starts.dtype != torch.bool or starts.dim() != 2:
        seen = _seen(starts)
        raise TypeError(f"starts must be a bool tensor (B, T), got {seen}")
    if starts.shape[1] == 0:  # (IndexError: no first step to mark)
        raise ValueError(f"starts must hold at least 1 step (T >= 1), got {_seen(starts)}")
    b, t = starts.shape
    idx = torch.arange(t).expand(b, t)
    first = starts.clone()
    first[:, 0] = True
    last_start = torch.where(first, idx, torch.zeros_like(idx)).cummax(1).values  # (B, T)
    return idx - last_start


def _seen(x: object) -> str:
    """What an error says was passed: a tensor's dtype and shape, else the type's name."""
    return f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__


class AgentPolicy(nn.Module):
    """Shared parts: an observation encoder, a policy head and a value head."""

    kind = "base"

    def __init__(self, obs_dim: int, num_actions: int, d_model: int) -> None:
        super().__init__()
        self.obs_dim, self.num_actions = positive_int("obs_dim", obs_dim), num_actions
        self.d_model = positive_int("d_model", d_model)
        positive_int("num_actions", num_actions)
        self.encoder = nn.Sequential(nn.Linear(obs_dim, d_model), nn.ReLU())
        self.pi = nn.Sequential(
            nn.Linear(d_model, d_model), nn.Tanh(), nn.Linear(d_model, num_actions)
        )
        self.v = nn.Sequential(nn.Linear(d_model, d_model), nn.Tanh(), nn.Linear(d_model, 1))

    def forward(self, obs: Tensor, starts: Tensor) -> Any:
        """Logits ``(B, T, A)`` and values ``(B, T)`` of whole segments."""
        raise NotImplementedError

    def initial_state(self, n: int) -> Any:
        """The memory of ``n`` environments before their first step (``n``: an int >= 0)."""
        raise NotImplementedError

    def step(self, obs: Tensor, starts: Tensor, state: Any) -> tuple[Tensor, Tensor, Any]:
        """Logits ``(B, A)``, values ``(B,)`` and the new state after one step."""
        raise NotImplementedError

    def heads(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits (..., A), values (...))`` of core states ``(..., d_model)``."""
        return self.pi(h), self.v(h).squeeze(-1)

    def _check(self, obs: Tensor, starts: Tensor, dims: int) -> None:
        """An error naming ``obs`` or ``starts`` unless ``obs`` is a floating-point tensor
        of the model's dtype, ``(B, T, D)`` with ``T >= 1`` (``dims`` 3) or ``(B, D)``,
        and ``starts`` a bool tensor of its leading shape (an int64 ``obs`` or ``T = 0``
        reached torch's own errors)."""
        shape = "(B, T, D)" if dims == 3 else "(B, D)"
        if not isinstance(obs, Tensor) or not obs.is_floating_point():
            raise TypeError(f"obs must be a floating-point tensor {shape}, got {_seen(obs)}")
        if obs.dim() != dims or obs.shape[-1] != self.obs_dim:
            raise ValueError(f"obs must be {shape} with D={self.obs_dim}, got {tuple(obs.shape)}")
        if dims == 3 and obs.shape[1] == 0:
            raise ValueError(f"obs must hold at least 1 step (T >= 1), got {tuple(obs.shape)}")
        same_dtype("obs", obs, weight_dtype(self.pi[-1]))
        error = f"starts must be bool {tuple(obs.shape[:-1])}, got {_seen(starts)}"
        if not isinstance(starts, Tensor):
            raise TypeError(error)
        if starts.dtype != torch.bool or starts.shape != obs.shape[:-1]:
            raise ValueError(error)

    def config(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "obs_dim": self.obs_dim,
            "num_actions": self.num_actions,
            "d_model": self.d_model,
        }


class MLPPolicy(AgentPolicy):
    """Sees only the current observation (no memory).

    Example:
        >>> p = MLPPolicy(obs_dim=5, num_actions=3, d_model=8)
        >>> logits, values = p(torch.rand(2, 4, 5), torch.zeros(2, 4, dtype=torch.bool))
        >>> tuple(logits.shape), tuple(values.shape), p.initial_state(2)  # no state to carry
        ((2, 4, 3), (2, 4), None)
    """

    kind = "mlp"

    def __init__(self, obs_dim: int, num_actions: int, *, d_model: int = 64) -> None:
        super().__init__(obs_dim, num_actions, d_model)
        self.core = nn.Sequential(nn.Linear(d_model, d_model), nn.ReLU())

    def forward(self, obs: Tensor, starts: Tensor) -> tuple[Tensor, Tensor]:
        self._check(obs, starts, 3)
        return self.heads(self.core(self.encoder(obs)))

    def initial_state(self, n: int) -> None:
        nonnegative_int("n", n)  # (a policy with memory needs it; the same check here)
        return None

    def step(self, obs: Tensor, starts: Tensor, state: None) -> tuple[Tensor, Tensor, None]:
        self._check(obs, starts, 2)
        if state is not None:  # (another policy's state was ignored)
            raise TypeError(f"state must be None (initial_state: no memory), got {_seen(state)}")
        logits, values = self.heads(self.core(self.encoder(obs)))
        return logits, values, None


class LSTMPolicy(AgentPolicy):
    """An LSTM over the episode so far; its state is zeroed at each episode start.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> p = LSTMPolicy(obs_dim=5, num_actions=3, d_model=8)
        >>> obs, starts = torch.rand(1, 3, 5), torch.tensor([[True, False, False]])
        >>> logits, _ = p(obs, starts)  # the whole segment at once
        >>> state = p.initial_state(1)
        >>> for t in range(3):  # one step at a time, as when acting
        ...     step_logits, _, state = p.step(obs[:, t], starts[:, t], state)
        >>> torch.allclose(step_logits, logits[:, -1], atol=1e-6)
        True
    """

    kind = "lstm"

    def __init__(self, obs_dim: int, num_actions: int, *, d_model: int = 64) -> None:
        super().__init__(obs_dim, num_actions, d_model)
        self.cell = nn.LSTMCell(d_model, d_model)

    def initial_state(self, n: int) -> tuple[Tensor, Tensor]:
        z = torch.zeros(nonnegative_int("n", n), self.d_model, dtype=self.cell.weight_hh.dtype)
        return z, z.clone()

    def _cell(
        self, x: Tensor, starts: Tensor, state: tuple[Tensor, Tensor]
    ) -> tuple[Tensor, Tensor]:
        keep = (~starts).unsqueeze(-1).to(x.dtype)  # (B, 1)
        return self.cell(x, (state[0] * keep, state[1] * keep))

    def forward(self, obs: Tensor, starts: Tensor) -> tuple[Tensor, Tensor]:
        self._check(obs, starts, 3)
        x = self.encoder(obs)  # (B, T, d)
        state, outs = self.initial_state(obs.shape[0]), []
        for t in range(obs.shape[1]):
            state = self._cell(x[:, t], starts[:, t], state)
            outs.append(state[0])
        return self.heads(torch.stack(outs, 1))  # (B, T, A), (B, T)

    def step(
        self, obs: Tensor, starts: Tensor, state: tuple[Tensor, Tensor]
    ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
        self._check(obs, starts, 2)
        want = (obs.shape[0], self.d_model)
        if not isinstance(state, tuple) or len(state) != 2:
            raise TypeError(f"state must be a pair (h, c) of tensors {want}, got {_seen(state)}")
        if any(not isinstance(x, Tensor) or tuple(x.shape) != want for x in state):
            seen = ", ".join(_seen(x) for x in state)
            raise ValueError(f"state must be a pair (h, c) of tensors {want}, got {seen}")
        state = self._cell(self.encoder(obs), starts, state)
        logits, values = self.heads(state[0])
        return logits, values, state


@dataclass
class RingCache:
    """Per layer, keys and values of the last ``context`` steps ``(B, H, context, E)``,
    and which slots hold a step of the current episode ``(B, context)``."""

    keys: list[Tensor]
    values: list[Tensor]
    valid: Tensor  # (B, C) bool
    steps: Tensor  # (B,) the step within the episode of the next observation
    slot_steps: Tensor  # (B, C) the episode step each slot holds (-1 when empty)


class _Block(nn.Module):
    """Pre-norm self-attention and feed-forward; attention through attnlab.attention."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.h = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.ReLU(), nn.Linear(2 * d, d))

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(B, L, d)`` -> queries, keys, values ``(B, H, L, d/H)``."""
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        return q, k, v

    def finish(self, x: Tensor, att: Tensor) -> Tensor:
        """Residual of the attention output ``(B, H, L, E)``, then the feed-forward."""
        b, h, n, e = att.shape
        x = x + self.out(att.transpose(1, 2).reshape(b, n, h * e))
        return x + self.ff(self.norm2(x))


class AttentionPolicy(AgentPolicy):
    """A causal transformer over the last ``context`` steps of the episode.

    Example:
        >>> p = AttentionPolicy(obs_dim=5, num_actions=3, context=2, d_model=8, num_heads=2)
        >>> starts = torch.tensor([[True, False, False, True]])  # a new episode at step 3
        >>> p.segment_mask(starts).dense(4, 4)[0, 0].int().tolist()  # 2 steps, one episode
        [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 1]]
        >>> logits, values, weights = p(torch.rand(1, 4, 5), starts, return_weights=True)
        >>> tuple(logits.shape), len(weights), tuple(weights[0].shape)
        ((1, 4, 3), 1, (1, 2, 4, 4))
    """

    kind = "attention"
    pos: Tensor  # (max_steps, d_model) sinusoidal table

    def __init__(
        self,
        obs_dim: int,
        num_actions: int,
        *,
        context: int = 32,
        d_model: int = 64,
        num_heads: int = 4,
        num_layers: int = 1,
        max_steps: int = 4096,
    ) -> None:
        super().__init__(obs_dim, num_actions, d_model)
        self.context, self.num_heads = positive_int("context", context), num_heads
        if d_model % positive_int("num_heads", num_heads):
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
        self.blocks = nn.ModuleList(
            _Block(d_model, num_heads) for _ in range(positive_int("num_layers", num_layers))
        )
        self.norm = nn.LayerNorm(d_model)
        max_steps = positive_int("max_steps", max_steps)  # (0: IndexError at the first step)
        self.register_buffer("pos", sinusoidal_table(max_steps, d_model), persistent=False)
        self.max_steps = max_steps

    def _apply(self, fn: Any, recurse: bool = True) -> AttentionPolicy:
        """Move or cast as usual, then make the position table again (no state dict holds
        it): ``to_empty`` after a build on the meta device left it uninitialized."""
        super()._apply(fn, recurse)
        p = self.pos
        # in its own dtype: a float64 policy's angles were float32's, cast up (1.8e-5 off)
        self.pos = sinusoidal_table(*p.shape, dtype=p.dtype, device=p.device)
        return self

    def config(self) -> dict[str, Any]:
        return super().config() | {
            "context": self.context,
            "num_heads": self.num_heads,
            "num_layers": len(self.blocks),
            "max_steps": self.max_steps,  # (left out: a rebuilt policy took 4096)
        }

    def _blocks(self) -> list[_Block]:
        return [cast(_Block, b) for b in self.blocks]

    def _embed(self, obs: Tensor, steps: Tensor) -> Tensor:
        return self.encoder(obs) + self.pos[steps.clamp(max=self.max_steps - 1)]

    def segment_mask(self, starts: Tensor) -> masks.Mask:
        """Causal, within ``context`` steps, within one episode."""
        episodes = starts.long().cumsum(1)  # (B, T)
        return masks.causal() & masks.window(self.context - 1) & masks.documents(episodes)

    def forward(self, obs: Tensor, starts: Tensor, *, return_weights: bool = False) -> Any:
        """Logits ``(B, T, A)`` and values ``(B, T)`` (and, with ``return_weights``, each
        layer's weights ``(B, H, T, T)``)."""
        self._check(obs, starts, 3)
        x, mask, weights = self._embed(obs, episode_steps(starts)), self.segment_mask(starts), []
        for blk in self._blocks():
            q, k, v = blk.qkv_heads(x)
            if return_weights:
                res = attention(q, k, v, mask=mask, return_weights=True)
                assert isinstance(res, AttentionOutput) and res.weights is not None
                x = blk.finish(x, res.out)
                weights.append(res.weights)
            else:
                x = blk.finish(x, attention(q, k, v, mask=mask))
        logits, values = self.heads(self.norm(x))
        return (logits, values, weights) if return_weights else (logits, values)

    def initial_state(self, n: int) -> RingCache:
        n = nonnegative_int("n", n)  # (-1: torch's RuntimeError, 2.0: its TypeError)
        e, c = self.d_model // self.num_heads, self.context
        dtype = self.norm.weight.dtype
        empty = [torch.zeros(n, self.num_heads, c, e, dtype=dtype) for _ in self.blocks]
        return RingCache(
            empty,
            [t.clone() for t in empty],
            torch.zeros(n, c, dtype=torch.bool),
            torch.zeros(n, dtype=torch.long),
            torch.full((n, c), -1, dtype=torch.long),
        )

    def step(
        self, obs: Tensor, starts: Tensor, state: RingCache
    ) -> tuple[Tensor, Tensor, RingCache]:
        """One step for each of ``B`` environments; ``state`` is updated in place."""
        self._check(obs, starts, 2)
        st = instance_of("state", state, RingCache, "a RingCache (from initial_state)")
        slots = (obs.shape[0], self.context)
        if tuple(st.valid.shape) != slots or len(st.keys) != len(self.blocks):
            raise ValueError(
                f"state must be this policy's initial_state({obs.shape[0]}) for obs's batch: "
                f"slots {slots} in {len(self.blocks)} layer(s), got "
                f"slots {tuple(st.valid.shape)} in {len(st.keys)}"
            )
        st.steps = torch.where(starts, torch.zeros_like(st.steps), st.steps)
        st.valid = st.valid & ~starts.unsqueeze(1)  # a new episode forgets the old one
        slot = st.steps % self.context  # (B,)
        rows = torch.arange(obs.shape[0])
        st.valid[rows, slot] = True
        st.slot_steps[rows, slot] = st.steps
        x = self._embed(obs, st.steps).unsqueeze(1)  # (B, 1, d)
        for i, blk in enumerate(self._blocks()):
            q, k, v = blk.qkv_heads(x)  # (B, H, 1, E)
            st.keys[i][rows, :, slot] = k[:, :, 0]
            st.values[i][rows, :, slot] = v[:, :, 0]
            mask = st.valid[:, None, None, :]  # (B, 1, 1, C)
            att = attention(q, st.keys[i], st.values[i], mask=mask)
            x = blk.finish(x, att)
        st.steps = st.steps + 1
        logits, values = self.heads(self.norm(x[:, 0]))
        return logits, values, st


POLICIES: dict[str, type[AgentPolicy]] = {
    "attention": AttentionPolicy,
    "lstm": LSTMPolicy,
    "mlp": MLPPolicy,
}


def build_policy(kind: str, obs_dim: int, num_actions: int, **options: Any) -> AgentPolicy:
    """A policy of ``kind`` (one of :data:`POLICIES`) with its options.

    Example:
        >>> build_policy("lstm", 984, 3, d_model=16).kind
        'lstm'
    """
    if kind not in POLICIES:
        raise ValueError(f"policy must be one of {sorted(POLICIES)}, got {kind!r}")
    return POLICIES[kind](obs_dim, num_actions, **options)
