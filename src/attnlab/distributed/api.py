"""The entry point :func:`attention`: validate on every rank at once, plan, dispatch.

Before any data moves, every rank shares a small table of its shapes, dtype, options and
whether its own arguments were valid; every rank then checks the same table, so a bad
call raises on every rank (each with the message) instead of leaving some rank waiting.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any

import torch
from torch import Tensor

from attnlab._validate import (
    _broadcast_batch,
    _no_heads,
    autocast_inputs,
    broadcast_batch_size,
    validate_scale,
)
from attnlab.bias import Bias, TensorBias, as_bias
from attnlab.distributed.comm import Group, gather_meta, meta_dtype
from attnlab.distributed.layout import LAYOUTS, shard_lengths, validate_layout
from attnlab.distributed.plan import choose
from attnlab.distributed.ring import FUNCTIONS
from attnlab.distributed.setup import Setup, make_setup
from attnlab.distributed.ulysses import ulysses
from attnlab.engines._leaves import HIDES_GRAD, hides_grad
from attnlab.engines._versions import held_code, held_tensors, raw_bytes
from attnlab.masks import Mask, TensorMask, as_mask

__all__ = ["STRATEGIES", "attention", "prepare"]

STRATEGIES = ("ring", "all-gather", "ulysses", "auto")


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Mask | None = None,
    bias: Bias | None = None,
    scale: float | None = None,
    group: Any = None,
    layout: str = "zigzag",
    strategy: str = "ring",
    engine: str = "auto",
) -> Tensor:
    """Exact softmax attention of a sequence sharded over the ranks of ``group``.

    Every rank passes its shard (as :func:`attnlab.distributed.shard` cuts it) and gets
    its shard of the output; forward and backward equal :func:`attnlab.attention` on the
    whole sequence. Masks and biases are evaluated at global positions. Second-order
    gradients (``create_graph=True``) are exact with ``strategy="ulysses"`` and
    ``engine="reference"``; the ring and all-gather strategies refuse them by name.

    Args:
        q: this rank's queries ``(B, Hq, L_r, E)``.
        k: this rank's keys ``(B, Hkv, L_r, E)``; ``Hq % Hkv == 0``.
        v: this rank's values ``(B, Hkv, L_r, Ev)``.
        mask: an :mod:`attnlab.masks` mask over the whole sequence (not a dense tensor:
            that would put the whole ``N x N`` on every rank).
        bias: an :mod:`attnlab.bias` bias (not a dense tensor), learnable ones included.
        scale: score multiplier; default ``1/sqrt(E)``.
        group: a ``torch.distributed`` process group (default: the world).
        layout: ``"zigzag"`` (each rank holds chunks ``r`` and ``2P-1-r``: balanced
            causal work) or ``"contiguous"``.
        strategy: ``"ring"`` (keys and values travel, step by step, between the ranks
            that need them; sends overlap compute) or ``"all-gather"`` (one collective
            gathers every shard's keys and values first: fewer, larger messages, best
            with few key/value heads); both return gradients of keys and values to their
            owners point to point. ``"ulysses"`` (DeepSpeed-Ulysses: one all-to-all turns
            sequence shards into head shards, each rank attends its ``Hq/P`` query heads
            over the whole sequence, one all-to-all brings the output back; needs
            ``Hq % P == 0`` and ``Hkv % P == 0``, else ``ValueError`` on every rank).
            ``"auto"`` asks the cost model (``plan(..., strategy="auto")`` names its pick):
            ulysses when the heads divide by ``P`` and its busiest rank moves fewer bytes
            than the ring's; else all-gather when there are fewer key/value heads than
            query heads (GQA/MQA) and the mask skips no rank pair; else ring.
        engine: the local engine of each step (``"auto"``: the blocked kernel on CPU).

    Returns:
        This rank's output shard ``(B, Hq, L_r, Ev)``.

    Example (run under ``torchrun --nproc-per-node 2``)::

        from attnlab import masks
        from attnlab.distributed import attention, shard
        r, p = dist.get_rank(), dist.get_world_size()
        qs, ks, vs = (shard(t, r, p) for t in (q, k, v))
        out = attention(qs, ks, vs, mask=masks.causal() & masks.window(512))

    On a group of one rank, in this process, it is the whole sequence's attention:

        >>> import torch.distributed as dist
        >>> from attnlab import attention as whole, masks
        >>> from attnlab.distributed import shard
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> _ = torch.manual_seed(0)
        >>> q, k, v = torch.randn(3, 1, 2, 8, 4).unbind(0)
        >>> out = attention(*(shard(t, 0, 1) for t in (q, k, v)), mask=masks.causal(),
        ...                 engine="reference")  # "auto": the C++ kernel, built on first use
        >>> dist.destroy_process_group()
        >>> torch.allclose(out, whole(q, k, v, mask=masks.causal()), atol=1e-6)
        True
    """
    s = prepare(
        q,
        k,
        v,
        mask=mask,
        bias=bias,
        scale=scale,
        group=group,
        layout=layout,
        strategy=strategy,
        engine=engine,
    )
    q, k, v = (t.contiguous() for t in _broadcast_batch(q, k, v))  # a batch of 1 broadcasts
    if s.scale == 0.0:  # every score 0 (plus the bias): the steps divided by the scale, and
        # torch's flash op gave NaN for it
        q, s = q * 0.0, dataclasses.replace(s, scale=1.0)
    if s.strategy == "ulysses":
        return ulysses(s, q, k, v)
    # under torch.autocast in its dtype, as one process's attention and Ulysses return it
    # (computed as before, from the inputs as given; it was float32 beside their bfloat16)
    (out,) = autocast_inputs(_ring(s, q, k, v))
    return out


def _ring(s: Setup, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The ring or all-gather strategy's output shard ``(B, Hq, L_r, Ev)``."""
    if not s.sizes[0]:  # an empty batch on every rank (checked): nothing to exchange
        return q.new_zeros((*q.shape[:3], v.shape[-1])) + 0 * (q.sum() + k.sum() + v.sum())
    leaves = [] if s.bias is None else _leaves(s.bias)
    out: Tensor = FUNCTIONS[s.strategy].apply(q, k, v, s, *leaves)
    return out


def prepare(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Mask | None,
    bias: Bias | None,
    scale: float | None,
    group: Any,
    layout: str,
    strategy: str,
    engine: str,
) -> Setup:
    """Validate a call on every rank at once and return its plan (a :class:`Setup`)."""
    g = Group.of(group)
    try:
        mask_, bias_ = _structured(mask, bias)
        _local_checks(q, k, v, layout, strategy)
        _option_checks(scale, engine, q)
        _ulysses_checks(q, k, strategy, g.world)
        _hidden_grad_checks(bias_, strategy)
        local_error: Exception | None = None
    except (TypeError, ValueError) as e:
        local_error, mask_, bias_ = e, None, None
    flags = (
        int(local_error is not None),
        LAYOUTS.index(layout) if layout in LAYOUTS else -1,
        STRATEGIES.index(strategy) if strategy in STRATEGIES else -1,
        _fingerprint(mask_, bias_, scale, engine),
        int(_backward_follows(q, k, v, bias_)),
    )
    meta = gather_meta(g, *_shape_probe(q, k, v), flags).cpu()
    if local_error is not None:
        raise local_error
    n = _check_table(meta, g, layout)
    dim = q.shape[-1]
    batch = broadcast_batch_size(q, k, v)
    sizes = (batch, q.shape[1], k.shape[1], dim, v.shape[-1])
    scale_ = (dim**-0.5 if dim else 1.0) if scale is None else float(scale)  # E = 0: no score
    s = make_setup(g, n, layout, strategy, mask_, bias_, scale_, engine, sizes)
    picked = choose(s) if strategy == "auto" else strategy
    return dataclasses.replace(s, strategy=picked, cpu=q.device.type == "cpu")


def _structured(mask: object, bias: object) -> tuple[Mask | None, Bias | None]:
    """The mask and bias, refusing dense tensors (they need the whole sequence)."""
    if isinstance(mask, Tensor | TensorMask):
        raise ValueError(
            f"mask must be a structured attnlab.masks mask evaluated at global positions, "
            f"got a dense tensor mask ({_describe(mask)}): it needs the whole N x N on one "
            f"rank; use masks.custom(fn) or masks.documents(ids) instead"
        )
    if isinstance(bias, Tensor | TensorBias):
        raise ValueError(
            "bias must be an attnlab.bias bias evaluated at global positions, got a dense "
            "tensor bias: it needs the whole N x N on one rank; use bias.custom(fn)"
        )
    if mask is not None and not isinstance(mask, Mask):
        raise TypeError(
            f"mask must be an attnlab.masks mask (at global positions) or None, got "
            f"{type(mask).__name__}"
        )
    return as_mask(mask), as_bias(bias)  # type: ignore[arg-type]


def _local_checks(q: Tensor, k: Tensor, v: Tensor, layout: str, strategy: str) -> None:
    validate_layout(layout)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a (B, H, L_r, E) shard, got {_describe(t)}")
    if q.shape[2] != k.shape[2] or k.shape[2] != v.shape[2]:
        raise ValueError(
            f"q, k and v shards must have the same length (self-attention over one "
            f"sharded sequence), got {q.shape[2]}, {k.shape[2]}, {v.shape[2]}"
        )
    if not q.shape[1] or not k.shape[1]:  # (Hq % 0 raised ZeroDivisionError)
        raise _no_heads("q", q.shape[1], "k", k.shape[1])
    if q.shape[1] % k.shape[1] or k.shape[1] != v.shape[1] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit: "
            "need Hq % Hkv == 0, k and v with the same heads, q and k with the same E"
        )
    _broadcast_batch(q, k, v)  # a ValueError unless the batches match or are 1
    if q.dtype != k.dtype or k.dtype != v.dtype or not q.is_floating_point():
        raise TypeError(f"q, k, v must share one float dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


# the engines that return the logsumexp each step is merged by
STEP_ENGINES = ("auto", "blocked", "reference", "flex")


def _option_checks(scale: object, engine: object, q: object) -> None:
    """The scale and the local engine, checked before any data moves (a step that
    failed on them would leave the other ranks' messages posted)."""
    validate_scale(scale)
    if not isinstance(engine, str):
        raise TypeError(f"engine must be a str, got {type(engine).__name__}")
    if engine not in STEP_ENGINES:
        raise ValueError(
            f"engine={engine!r} cannot run a context-parallel step, which merges each "
            f"step's logsumexp; expected one of {STEP_ENGINES}"
        )
    if engine == "flex" and isinstance(q, Tensor) and q.device.type == "cpu":
        raise ValueError(  # (each step failed on it, after the first messages had moved)
            "engine='flex' cannot run a context-parallel step on the CPU: torch's compiled "
            "FlexAttention returns no logsumexp there, which each step is merged by; use "
            "'auto' (the blocked engine) or 'blocked'"
        )


def _ulysses_checks(q: Tensor, k: Tensor, strategy: str, world: int) -> None:
    """Ulysses splits heads over ranks: both head counts must divide by ``world``."""
    if strategy != "ulysses" or not isinstance(q, Tensor) or not isinstance(k, Tensor):
        return
    if q.dim() == 4 and k.dim() == 4 and (q.shape[1] % world or k.shape[1] % world):
        raise ValueError(
            f"strategy='ulysses' splits heads over the {world} ranks, so query heads and "
            f"key/value heads must both divide by {world}; got Hq={q.shape[1]}, "
            f"Hkv={k.shape[1]}; use strategy='ring', 'all-gather' or 'auto'"
        )


def _hidden_grad_checks(bias: Bias | None, strategy: str) -> None:
    """Ring and all-gather steps take a bias's gradient through its parameters and buffers
    only: a function's closed-over tensor that requires grad got none, silently."""
    if strategy != "ulysses" and hides_grad(bias):
        raise ValueError(
            f"{HIDES_GRAD}; the ring and all-gather steps reach only those: pass an "
            "nn.Module holding it to bias.custom, or use strategy='ulysses'"
        )


def _describe(t: object) -> str:
    return f"shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__


def _backward_follows(q: object, k: object, v: object, bias: Bias | None) -> bool:
    """Whether autograd records the call: every rank's backward exchanges gradients."""
    ts = [t for t in (q, k, v) if isinstance(t, Tensor)]
    ts += [] if bias is None else _leaves(bias)
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


def _shape_probe(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Tensors whose shapes describe the call (zeros of rank 4 where an input is broken)."""
    ok = all(isinstance(t, Tensor) and t.dim() == 4 for t in (q, k, v))
    if ok:
        return q, k, v
    z = torch.zeros(0, 0, 0, 0, device=q.device if isinstance(q, Tensor) else "cpu")
    return z, z, z


def _fingerprint(mask: Mask | None, bias: Bias | None, scale: object, engine: object) -> int:
    """A checksum of what every rank must agree on beyond the shapes: ranks with other
    masks planned other messages, and gloo aborted the process ("Received data size
    doesn't match"); another bias or scale gave each rank another attention."""
    text = f"{None if mask is None else mask.spec()}|{bias!r}|{scale!r}|{engine!r}"
    held = [*held_tensors(mask)] if mask is not None else []
    held += [] if bias is None else [*bias.parameters(), *bias.buffers(), *held_tensors(bias)]
    # the values too: a spec names documents(...) by its count, a bias by its class (other
    # ids on two ranks aborted the process, or gave a wrong result silently), and a custom
    # mask by its function's name (other code or closed-over numbers did the same)
    code = [*held_code(mask), *held_code(bias)]
    return zlib.crc32("|".join([text, *map(_content, held), *code]).encode())


def _content(t: Tensor) -> str:
    """A checksum of ``t``'s values: its bytes on the CPU, two sums elsewhere."""
    t = t.detach()
    if t.device.type == "cpu":
        return f"{t.dtype}{tuple(t.shape)}{zlib.crc32(raw_bytes(t))}"
    x = t.double().reshape(-1)
    sums = torch.stack([x.sum(), (x * torch.arange(1, x.numel() + 1, device=x.device)).sum()])
    return f"{t.dtype}{tuple(t.shape)}{sums.tolist()}"


def _check_table(meta: Tensor, g: Group, layout: str) -> int:
    """The global length, after checking every rank's row; the same error everywhere."""
    bad = meta[:, 7].nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"invalid arguments on rank(s) {bad} of the group (see their error)")
    names = (
        "batch",
        "query heads",
        "key/value heads",
        None,
        "head dim",
        "value dim",
        "dtype",
        None,
        "layout",
        "strategy",
        "mask, bias, scale or engine (each rank must pass the same global ones)",
        "backward (grad mode on and an input or bias that requires grad: a rank without "
        "one left the others' backward waiting)",
    )
    for col, name in enumerate(names):
        if name is not None and bool((meta[:, col] != meta[0, col]).any()):
            raise ValueError(f"ranks disagree on the {name}: {_per_rank(name, meta[:, col])}")
    lengths = meta[:, 3].tolist()
    n = int(sum(lengths))
    want = shard_lengths(n, g.world, layout)
    if lengths != want:
        raise ValueError(
            f"shards have lengths {lengths} over ranks 0..{g.world - 1}, but the {layout} "
            f"layout of {n} positions over {g.world} ranks gives {want}; cut the sequence "
            f"with attnlab.distributed.shard(x, rank, {g.world}, layout={layout!r})"
        )
    return n


def _per_rank(name: str, codes: Tensor) -> str:
    """The table's ``name`` column over the ranks, a dtype, layout or strategy code by
    name ("rank 0: float32, rank 1: float64"; the codes were printed as ``[1, 0]``)."""
    values = codes.tolist()
    if name not in ("dtype", "layout", "strategy"):
        return f"{values} over ranks 0..{len(values) - 1}"
    return ", ".join(f"rank {r}: {_code_name(name, c)}" for r, c in enumerate(values))


def _code_name(name: str, code: int) -> str:
    """The dtype, layout or strategy (``name``) that ``code`` stands for."""
    if name == "dtype":
        return meta_dtype(code)
    choices = LAYOUTS if name == "layout" else STRATEGIES
    return choices[code] if 0 <= code < len(choices) else "an invalid one"


def _leaves(bias: Bias) -> list[Tensor]:
    """The tensors of ``bias`` that autograd should reach (parameters and grad buffers)."""
    return [t for t in (*bias.parameters(), *bias.buffers()) if t.requires_grad]
