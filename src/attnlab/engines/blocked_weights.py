"""The blocked engine's weights, recomputed block by block (``return_weights=True`` where
its compiled forward does not write them, and :meth:`BlockedEngine.weights`, which
``capture`` and ``request_weights`` call for some heads and rows): each query block holds
all keys its rows may see, so its softmax is complete on its own, and only the asked-for
heads, rows and blocks are computed."""

from __future__ import annotations

import torch
from torch import Tensor

from attnlab.engines.base import AttentionRequest, sink_rows, with_sinks
from attnlab.engines.blocked_autograd import (
    acc_dtype,
    block_tile,
    cap_scores,
    take,
)
from attnlab.engines.blocked_plan import Block, Plan
from attnlab.engines.zeros import lazy_zeros
from attnlab.normalize import softmax_rows
from attnlab.scores import scores_of

__all__ = ["weights"]


def weights(
    req: AttentionRequest,
    plan: Plan,
    heads: list[int] | None = None,
    rows: tuple[int, int] | None = None,
) -> Tensor:
    """Normalized weights ``(B, len(heads), r1 - r0, Lk)`` recomputed block by block: each
    query block holds all keys its rows may see, so its softmax is complete on its own;
    only the blocks that overlap ``rows`` are computed."""
    r_lo, r_hi = rows if rows is not None else (0, req.lq)
    hs = list(range(req.heads)) if heads is None else heads
    acc = acc_dtype(req.q.dtype)
    sinks = None if req.sinks is None else sink_rows(req.sinks).to(acc)[:, hs]  # (., H', .)
    per_row = req.sinks is not None and req.sinks.dim() == 3  # (B or 1, H', Lq)
    with torch.no_grad():
        q, k = req.q.to(acc), req.k.to(acc)
        w = lazy_zeros((req.batch, len(hs), r_hi - r_lo, req.lk), req.q)
        for blk in plan.blocks:
            a, b = max(blk.rows[0], r_lo), min(blk.rows[1], r_hi)
            if a >= b:
                continue
            s = _block_scores(req, blk, q, k, heads, (a, b))  # (B, len(hs), b - a, Ks)
            p, lse = softmax_rows(s, want_lse=sinks is not None)  # (B, len(hs), b - a, Ks)
            if sinks is not None and lse is not None:  # the sinks take their share
                p, _ = with_sinks(p, lse, sinks[..., a:b] if per_row else sinks)
            _put(w[:, :, a - r_lo : b - r_lo], blk, p)
    return w


def _block_scores(
    req: AttentionRequest,
    blk: Block,
    q: Tensor,
    k: Tensor,
    heads: list[int] | None = None,
    rows: tuple[int, int] | None = None,
) -> Tensor:
    """Scaled, soft-capped, biased and masked scores ``(B, H', T', Ks)`` of one block's
    ``heads`` (None: all) and ``rows`` (None: the block's); -inf where the tile masks a
    pair, even a hidden NaN key's (NaN + -inf made its row NaN). Only those heads and rows
    are multiplied: ``capture(heads=[0])`` computed all eight and kept one."""
    r0, r1 = blk.rows
    a, b = rows if rows is not None else (r0, r1)
    qs, ks = q[:, :, a:b], take(k, blk.keys)  # (B, Hq, T', E), (B, Hkv, Ks, E)
    if heads is not None:
        group = q.shape[1] // k.shape[1]
        qs, ks = qs[:, heads], ks[:, [h // group for h in heads]]
    s = scores_of(qs, ks, req.scale)  # (B, H', T', Ks)
    s = cap_scores(s, req.softcap)
    tile, _ = block_tile(req, blk, blk.key_index(q.device), q.dtype)  # (Bt, Ht, T, Ks)
    if tile is None:
        return s
    tile = tile[:, :, a - r0 : b - r0]
    tile = tile[:, heads] if heads is not None and tile.shape[1] > 1 else tile
    return s.add_(tile).masked_fill_(torch.isneginf(tile), -torch.inf)


def _put(dst: Tensor, blk: Block, p: Tensor) -> None:
    """Write a block's probabilities ``p (B, H, T, Ks)`` into its key columns of
    ``dst (B, H, T, Lk)``."""
    if isinstance(blk.keys, slice):
        dst[..., blk.keys].copy_(p)
    else:
        dst.index_copy_(-1, blk.keys.to(dst.device), p.to(dst.dtype))
