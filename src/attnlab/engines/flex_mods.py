"""What the flex engine hands FlexAttention and repairs in what it hands back: the mask
and the bias as ``mask_mod`` and ``score_mod`` (with their tensors on the call's device),
and the logsumexp of rows that FlexAttention's base-2 conversion overflowed to -inf."""

from __future__ import annotations

import copy
import itertools
import math
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from attnlab._devices import to_device
from attnlab._eager import unreadable
from attnlab._grid import Grid
from attnlab.bias.base import Bias
from attnlab.engines._versions import tensor_versions
from attnlab.engines.base import AttentionRequest
from attnlab.masks.base import Mask

__all__ = ["bias_on", "finite_lse", "mask_mod", "moved", "score_mod"]

#: the most (row, key) pairs :func:`finite_lse` evaluates at once: 4 MB of float32
ROWS_BY_KEYS = 2**20
#: the most values a bias may hold for :func:`finite_lse` to ask its bound on the host
BOUND_NUMEL = 2**16


def moved(obj: Any, device: torch.device, depth: int = 0) -> Any:
    """``obj`` (a mask, or a tuple or list in one) with every tensor it holds on
    ``device``: itself where they all are there, else a shallow copy holding moved ones.
    A compiled ``mask_mod`` cannot move a tensor between devices (masks keep theirs on
    the CPU and move them to each grid's device as they evaluate). Copies from the host
    to CUDA go through pinned memory without blocking (a pageable one was a host-device
    sync per block mask built, and the transformers backend makes a mask per forward).

    Example:
        >>> from attnlab import masks
        >>> m = masks.causal() & masks.padding([3, 2])
        >>> moved(m, torch.device("cpu")) is m, moved(m, torch.device("meta")).parts[1].kl.device
        (True, device(type='meta'))
    """
    if isinstance(obj, Tensor):
        return to_device(obj, device)  # (itself where it is there; pinned to CUDA)
    if depth > 4:
        return obj
    if type(obj) in (tuple, list):
        items = [moved(x, device, depth + 1) for x in obj]
        return obj if all(a is b for a, b in zip(items, obj, strict=True)) else type(obj)(items)
    if type(obj) is dict:  # a cache of tables by length (random blocks)
        new_items = {k: moved(v, device, depth + 1) for k, v in obj.items()}
        return obj if all(new_items[k] is v for k, v in obj.items()) else new_items
    if not isinstance(obj, Mask):
        return obj
    own = vars(obj)
    changed = {k: moved(v, device, depth + 1) for k, v in own.items()}
    changed = {k: v for k, v in changed.items() if v is not own[k]}
    if not changed:
        return obj
    new = copy.copy(obj)
    new.__dict__.update(changed)
    return new


def bias_on(bias: Bias, device: torch.device) -> Bias:
    """``bias`` with its tables and buffers on ``device``: itself where they are there,
    else a copy (the caller's module stays where it is), kept for the next call while
    ``bias`` holds the same tensors, unchanged and wanting no gradient. Copying ALiBi's
    slopes to an H200 on every call made two host-device syncs per call.

    Example:
        >>> from attnlab.bias import alibi
        >>> slopes = alibi(4)
        >>> on = bias_on(slopes, torch.device("meta"))
        >>> on is not slopes, on.slopes.is_meta, bias_on(slopes, torch.device("meta")) is on
        (True, True, True)
    """
    tensors = tuple(itertools.chain(bias.parameters(), bias.buffers()))
    if all(t.device == device for t in tensors):
        return bias
    stamp = _stamp(bias, tensors)
    kept = _MOVED.get(bias)
    if kept is not None and kept[0] == device and kept[2] == stamp and _same(kept[1], tensors):
        return kept[3]
    moved = copy.deepcopy(bias).to(device)
    if not any(t.requires_grad for t in tensors):  # a copy of a parameter gets no gradient
        _MOVED[bias] = (device, tensors, stamp, moved)
    return moved


def _stamp(bias: Bias, tensors: tuple[Tensor, ...]) -> tuple:
    """What a kept copy of ``bias`` must still match: its mode, its tensors' versions and
    storages (``p.data = new`` keeps the version), and its plain settings (an attribute
    set since). A change through ``.data`` in place is not seen: make a new bias then."""
    plain = (bool, int, float, str, type(None))
    settings = tuple((k, v) for k, v in vars(bias).items() if type(v) in plain)
    return bias.training, settings, tensor_versions(tensors)


def _same(a: tuple[Tensor, ...], b: tuple[Tensor, ...]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


#: each bias's copy on another device, with the tensors and versions it was copied from
_MOVED: weakref.WeakKeyDictionary[Bias, tuple[Any, ...]] = weakref.WeakKeyDictionary()


def mask_mod(mask: Mask, lq: int, lk: int) -> Callable[..., Tensor]:
    """``mask`` as a FlexAttention ``mask_mod``: query row ``i`` is position
    ``i + lk - lq`` (attnlab's bottom-right alignment)."""

    def mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return mask(Grid(b, h, q_idx + (lk - lq), kv_idx, lq, lk))

    return mod


def score_mod(req: AttentionRequest) -> Callable[..., Tensor] | None:
    """Soft-capping, then the bias, as a FlexAttention ``score_mod`` (or None).

    The bias is added in float32 (float64 for float64 q), the dtype FlexAttention
    computes the scores in, whatever its own dtype: not in ``s.dtype``, which torch
    traces ``score_mod`` with as q's (a bfloat16 ``s``, 0-dim), so that a cast to it
    rounded the bias to bfloat16 inside the float32 scores (uncompiled: 3.2e-2 off
    float64 where torch's SDPA with the same float32 bias was 7.6e-3, bias std 3, E=32;
    compiled, a float64 bias alike).

    Example:
        >>> from attnlab.engines.base import AttentionRequest
        >>> q = torch.zeros(1, 1, 2, 16, dtype=torch.bfloat16)
        >>> from attnlab.bias import tensor
        >>> req = AttentionRequest(q, q, q, None, tensor(torch.ones(2, 2)), 1.0, "dot",
        ...                        "softmax", 0.0, return_weights=False, return_lse=False)
        >>> i = torch.tensor(0)
        >>> score_mod(req)(torch.zeros((), dtype=torch.bfloat16), i, i, i, i).dtype
        torch.float32
    """
    cap, lq, lk = req.softcap, req.lq, req.lk
    bias = None if req.bias is None else bias_on(req.bias, req.q.device)
    if cap is None and bias is None:
        return None
    work = torch.float64 if req.q.dtype == torch.float64 else torch.float32  # the scores'

    def mod(s: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        if cap is not None:
            s = cap * torch.tanh(s / cap)
        if bias is not None:
            grid = Grid(b, h, q_idx + (lk - lq), kv_idx, lq, lk, dtype=work)
            s = s + bias(grid).to(work)  # (not s.dtype: traced as q's, see above)
        return s

    return mod


def finite_lse(lse: Tensor, req: AttentionRequest) -> Tensor:
    """``lse (B, Hq, Lq)`` from FlexAttention with each row it overflowed to -inf set to
    its value; rows that no key reaches stay -inf.

    FlexAttention keeps the logsumexp in base 2 and multiplies it by ``ln 2`` at the end:
    a row whose logsumexp lies below ``-finfo.max * ln 2`` (a bias of
    ``finfo(float32).min`` on every key it sees, the additive-mask convention for a padded
    row) came back -inf, though the row has keys and an output (the reference engine:
    -3.4e38). Only a bias reaches that far, and there each score is its bias (``q . k``
    is far under half an ulp, 2**103 in float32) and the log of the sum rounds away too:
    the logsumexp is the row's largest bias over the keys its mask leaves.
    """
    if req.bias is None or unreadable(lse) or _cannot_overflow(req):
        return lse
    dead = torch.isneginf(lse)  # (B, Hq, Lq)
    if not bool(dead.any()):  # (a host-device sync on a GPU: only where no bound tells)
        return lse
    rows = dead.nonzero(as_tuple=True)  # 3 x (N,)
    step = max(1, ROWS_BY_KEYS // req.lk)
    parts = zip(*(i.split(step) for i in rows), strict=True)
    top = torch.cat([_largest_bias(req, b, h, r, lse.dtype) for b, h, r in parts])
    return lse.index_put(rows, top)


def _cannot_overflow(req: AttentionRequest) -> bool:
    """Whether a bound on ``|bias|`` known on the host keeps every row's logsumexp far
    above the overflow at ``-finfo(float32).max * ln 2`` (ALiBi: slope times distance),
    so that ``finite_lse`` need not read the rows back (a sync per call on a GPU). Asked
    only of a bias that holds its tensors on the CPU, at most :data:`BOUND_NUMEL` values
    (a dense bias's bound is a pass over it); half the threshold leaves the scores room."""
    assert req.bias is not None
    tensors = list(itertools.chain(req.bias.parameters(), req.bias.buffers()))
    if not all(t.is_cpu for t in tensors) or sum(t.numel() for t in tensors) > BOUND_NUMEL:
        return False
    bound = req.bias.magnitude_bound(req.lq, req.lk)  # (NaN compares False)
    cap = 0.0 if req.softcap is None else abs(req.softcap)
    return bound is not None and bound + cap < _OVERFLOW / 2


#: where FlexAttention's base-2 logsumexp overflows to -inf once multiplied by ln 2
_OVERFLOW = torch.finfo(torch.float32).max * math.log(2)


def _largest_bias(
    req: AttentionRequest, b: Tensor, h: Tensor, r: Tensor, dtype: torch.dtype
) -> Tensor:
    """``(n,)``: each row's largest bias (soft-capped 0 plus the bias, as ``score_mod``
    adds it) over the keys the mask leaves it, -inf where none; rows of item ``b``, query
    head ``h`` and query row ``r`` (``(n,)`` each)."""
    keys = torch.arange(req.lk, device=req.q.device).view(1, -1)  # (1, Lk)
    b, h, r = b.view(-1, 1), h.view(-1, 1), r.view(-1, 1)  # (n, 1)
    add = score_mod(req)
    assert add is not None  # (a bias)
    s = add(torch.zeros((), dtype=dtype, device=keys.device), b, h, r, keys)
    s = torch.broadcast_to(s, (b.shape[0], req.lk))  # (n, Lk)
    if req.mask is not None:
        allowed = mask_mod(moved(req.mask, keys.device), req.lq, req.lk)(b, h, r, keys)
        s = s.masked_fill(~torch.broadcast_to(allowed, s.shape), float("-inf"))
    return s.amax(dim=-1)
