"""Linformer (Wang et al. 2020): attention over learned length projections of K and V.

Keys and values of length ``N`` are projected to ``proj_dim`` rows by learned matrices
``proj_k, proj_v (proj_dim, max_len)`` (the paper's ``E`` and ``F``); queries attend over
those rows with exact attention, so the cost is ``O(N proj_dim)``::

    out = softmax(q (proj_k k)^T * scale) (proj_v v)        # (B, H, N, E)

A sequence shorter than ``max_len`` uses the first ``N`` columns of the projections.
Linformer mixes positions, so it is non-causal; a padding mask zeroes the padded keys
and values before the projection (as the reference implementation does), which is not
the same as masking them out of a softmax.

Example:
    >>> import torch
    >>> from attnlab.nn import LinformerAttention
    >>> attn = LinformerAttention(64, 4, max_len=512, proj_dim=32)
    >>> tuple(attn(torch.randn(2, 300, 64)).shape)
    (2, 300, 64)
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import Tensor, nn

from attnlab._validate import autocast_inputs, positive_int, same_dtype, validate_flag
from attnlab.engines.approximate import padding_validity
from attnlab.functional import AttentionOutput, attention
from attnlab.masks import Mask
from attnlab.nn._inputs import check_input
from attnlab.nn._weights import weight_dtype
from attnlab.nn.config import check_attention_options

__all__ = ["SHARING", "LinformerAttention", "linformer_attention"]

SHARING = ("none", "headwise", "kv")


def linformer_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    proj_k: Tensor,
    proj_v: Tensor,
    *,
    mask: Mask | None = None,
    dropout_p: float = 0.0,
    engine: str = "auto",
    return_weights: bool = False,
) -> Tensor | AttentionOutput:
    """Attention of ``q`` over the length projections ``proj_k @ k`` and ``proj_v @ v``.

    Args:
        q: queries ``(B, Hq, Lq, E)``.
        k, v: keys ``(B, Hkv, Lk, E)`` and values ``(B, Hkv, Lk, Ev)``; ``Hq % Hkv == 0``.
        proj_k, proj_v: ``(P, max_len)`` shared by the heads, or ``(Hkv, P, max_len)``
            per head, ``max_len >= Lk``; the first ``Lk`` columns are used. Under
            ``torch.autocast`` k, v and the projections are taken in its dtype.
        mask: None or ``masks.padding(...)``: padded keys and values are zeroed before
            the projection, padded query rows give 0.
        dropout_p, engine, return_weights: as in :func:`attnlab.attention` (the weights
            are ``(B, Hq, Lq, P)``, over the projected rows).

    Returns:
        ``(B, Hq, Lq, Ev)``, or an :class:`~attnlab.AttentionOutput` with weights.

    Example:
        >>> q = k = v = torch.randn(1, 2, 8, 4)
        >>> eye = torch.eye(8)   # identity projections: exact attention
        >>> import attnlab
        >>> torch.allclose(linformer_attention(q, k, v, eye, eye), attnlab.attention(q, k, v))
        True
    """
    k, v, proj_k, proj_v = _check_linformer_args(q, k, v, proj_k, proj_v)
    if k.shape[2] != v.shape[2]:  # else 5 keys were mixed with 6 values without a word
        raise ValueError(
            f"k and v must have the same length Lk, got k {tuple(k.shape)} and v {tuple(v.shape)}"
        )
    batch = max(q.shape[0], k.shape[0])  # a batch of 1 broadcasts
    key_valid, query_valid = _padding(mask, batch, k.shape[2], q.shape[2], q.device)
    kp = _project(k, proj_k, key_valid, "proj_k")  # (B, Hkv, P, E)
    vp = _project(v, proj_v, key_valid, "proj_v")  # (B, Hkv, P, Ev)
    res = attention(q, kp, vp, dropout_p=dropout_p, engine=engine, return_weights=return_weights)
    if query_valid is None:
        return res
    if isinstance(res, AttentionOutput):
        w = None if res.weights is None else res.weights * query_valid
        return AttentionOutput(res.out * query_valid, w, None)
    return res * query_valid


def _check_linformer_args(
    q: Tensor, k: Tensor, v: Tensor, pk: Tensor, pv: Tensor
) -> tuple[Tensor, ...]:
    """Tensors of rank 4 (q, k, v), v and float projections of k's dtype, with one ``P``:
    a list was an AttributeError, a float64 projection or v torch's "expected scalar type",
    and projections of other ``P`` blamed k and v for shapes the caller never passed.

    Returns ``k, v, pk, pv``, under ``torch.autocast`` in its dtype (a module's float32
    projections beside its Linear layers' bfloat16 keys were refused)."""
    for name, t in (("q", q), ("k", k), ("v", v), ("proj_k", pk), ("proj_v", pv)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be (B, H, L, E), got shape {tuple(t.shape)}")
    k, v, pk, pv = autocast_inputs(k, v, pk, pv)
    for name, p in (("v", v), ("proj_k", pk), ("proj_v", pv)):
        if p.dtype != k.dtype:
            raise TypeError(f"{name} must be of k's dtype {k.dtype}, got {p.dtype}")
    if pk.dim() >= 2 and pv.dim() >= 2 and pk.shape[-2] != pv.shape[-2]:
        raise ValueError(
            f"proj_k and proj_v must project to the same P rows, got P={pk.shape[-2]} and "
            f"P={pv.shape[-2]} (shapes {tuple(pk.shape)} and {tuple(pv.shape)})"
        )
    return k, v, pk, pv


def _project(x: Tensor, proj: Tensor, valid: Tensor | None, name: str) -> Tensor:
    """``proj[..., :L] @ x`` for ``x (B, Hkv, L, .)``, padded rows zeroed first."""
    length = x.shape[2]
    if proj.dim() not in (2, 3) or proj.shape[-1] < length:
        raise ValueError(
            f"{name} must be (P, max_len) or (Hkv, P, max_len) with max_len >= L={length}, "
            f"got shape {tuple(proj.shape)}"
        )
    if proj.dim() == 3 and proj.shape[0] != x.shape[1]:
        raise ValueError(f"{name} has {proj.shape[0]} heads but k/v have {x.shape[1]}")
    x = x if valid is None else x * valid
    return proj[..., :length] @ x  # (B, Hkv, P, .)


def _padding(
    mask: Mask | None, batch: int, lk: int, lq: int, device: torch.device
) -> tuple[Tensor | None, Tensor | None]:
    """Key and query validity ``(B, 1, L, 1)`` of a padding mask (None: no mask)."""
    if mask is None:
        return None, None
    if not isinstance(mask, Mask):
        raise TypeError(
            f"Linformer takes mask=None or masks.padding(...) only, got {type(mask).__name__}"
        )
    if mask.lengths() is None:
        raise ValueError(
            f"Linformer takes mask=None or masks.padding(...) only, got {mask!r}: its keys "
            f"are projected to mixtures of positions, so a per-pair mask has no meaning"
        )
    mask.check(batch=batch, heads=1, lq=lq, lk=lk)  # one length per batch item
    return padding_validity(mask, lq, lk, device)


class LinformerAttention(nn.Module):
    """Multi-head self- or cross-attention with Linformer's learned length projections.

    Args:
        embed_dim: model width ``D``; ``num_heads`` divides it.
        num_heads: heads ``H``.
        max_len: the longest key length ``N`` (columns of the projections).
        proj_dim: projected length ``P`` (the paper's ``k``).
        sharing: ``"headwise"`` (one ``proj_k`` and one ``proj_v`` for all heads, the
            paper's default), ``"kv"`` (one matrix for keys and values too) or ``"none"``
            (per head).
        bias: biases in the input and output projections.
        dropout: dropout on the attention weights while training.
        engine: the :func:`attnlab.attention` engine for the ``N x P`` attention.

    Example:
        >>> import torch
        >>> from attnlab import masks
        >>> attn = LinformerAttention(32, 4, max_len=128, proj_dim=16, sharing="kv")
        >>> out, w = attn(torch.randn(2, 100, 32), mask=masks.padding([100, 60]),
        ...               need_weights=True)
        >>> tuple(out.shape), tuple(w.shape)
        ((2, 100, 32), (2, 4, 100, 16))
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        max_len: int,
        proj_dim: int = 256,
        *,
        sharing: str = "headwise",
        bias: bool = True,
        dropout: float = 0.0,
        engine: str = "auto",
    ) -> None:
        super().__init__()
        _check_args(embed_dim, num_heads, max_len, proj_dim, sharing)
        check_attention_options(dropout, "softmax", engine)  # (they failed at the first call)
        bias = validate_flag("bias", bias)  # ("False" was taken as True)
        self.embed_dim, self.num_heads, self.max_len = embed_dim, num_heads, max_len
        self.head_dim, self.proj_dim, self.sharing = embed_dim // num_heads, proj_dim, sharing
        self.dropout, self.engine = float(dropout), engine
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            nn.Linear(embed_dim, embed_dim, bias=bias) for _ in range(4)
        )
        shape = (num_heads, proj_dim, max_len) if sharing == "none" else (proj_dim, max_len)
        self.proj_k = nn.Parameter(torch.empty(shape))
        self.proj_v = None if sharing == "kv" else nn.Parameter(torch.empty(shape))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw the length projections again, entries ``N(0, 1/P)`` as when built
        (Johnson-Lindenstrauss scale; the ``Linear`` layers have their own)."""
        for p in (self.proj_k, self.proj_v):
            if p is not None:
                nn.init.normal_(p, std=1 / math.sqrt(p.shape[-2]))

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        *,
        mask: Mask | None = None,
        bias: object = None,
        need_weights: bool = False,
        positions: object = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Attend from ``query (B, Lq, D)`` over ``key``/``value (B, Lk, D)`` (default:
        self-attention), ``Lk <= max_len``.

        The call matches :class:`~attnlab.nn.MultiHeadAttention`'s, so the module can
        replace an :class:`~attnlab.nn.EncoderLayer`'s ``self_attn``; ``bias`` and
        ``positions`` must be None (no bias or RoPE over projected keys).

        Returns:
            ``(B, Lq, D)``, or with ``need_weights`` also the weights ``(B, H, Lq, P)``.
        """
        if bias is not None or positions is not None:
            raise ValueError("LinformerAttention takes no bias and no RoPE positions")
        need_weights = validate_flag("need_weights", need_weights)
        key = query if key is None else key
        value = key if value is None else value
        self._check_inputs(query, key, value)
        q = self._heads(self.q_proj, query)  # (B, H, Lq, E)
        k, v = self._heads(self.k_proj, key), self._heads(self.v_proj, value)  # (B, H, Lk, E)
        res = self._attend(q, k, v, mask, need_weights)
        out = res.out if isinstance(res, AttentionOutput) else res  # (B, H, Lq, E)
        b, h, lq, e = out.shape
        out = self.out_proj(out.transpose(1, 2).reshape(b, lq, h * e))  # (B, Lq, D)
        if isinstance(res, AttentionOutput) and res.weights is not None:
            return out, res.weights
        return out

    def _attend(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Mask | None, need_weights: bool
    ) -> Tensor | AttentionOutput:
        """:func:`linformer_attention` with this module's projections, engine, dropout."""
        proj_v = self.proj_k if self.proj_v is None else self.proj_v
        p = self.dropout if self.training else 0.0
        return linformer_attention(
            q,
            k,
            v,
            self.proj_k,
            proj_v,
            mask=mask,
            dropout_p=p,
            engine=self.engine,
            return_weights=need_weights,
        )

    def _check_inputs(self, query: object, key: object, value: object) -> None:
        """Floating ``(B, L, D)`` tensors of the layer's dtype, named as passed: each was
        "inputs must be (B, L, D)" (a list a ValueError), a key and value of two lengths
        were named by their head-split shapes ``k (B, H, Lk, E)``, a key of another batch
        as ``batch sizes of q, k, v``."""
        for name, t in (("query", query), ("key", key), ("value", value)):
            check_input(name, t, self.embed_dim)  # (float64 into float32: torch said
            same_dtype(name, cast(Tensor, t), weight_dtype(self.q_proj))  # "mat1 and mat2")
        q, k, v = cast(Tensor, query), cast(Tensor, key), cast(Tensor, value)
        if k.shape[:2] != v.shape[:2]:
            raise ValueError(
                f"key and value must have the same batch and length (B, Lk, .), got key "
                f"{tuple(k.shape)} and value {tuple(v.shape)}"
            )
        if 1 != k.shape[0] != q.shape[0] != 1:  # (a batch of 1 broadcasts)
            raise ValueError(
                f"key must have query's batch size {q.shape[0]} (or 1), got key "
                f"{tuple(k.shape)} for query {tuple(q.shape)}"
            )
        if k.shape[1] > self.max_len:  # (it blamed proj_k's shape)
            raise ValueError(
                f"key has length {k.shape[1]}, past this layer's max_len={self.max_len} "
                "(the projections' columns)"
            )

    def _heads(self, proj: nn.Linear, x: Tensor) -> Tensor:
        """``x (B, L, D)`` projected and split into heads ``(B, H, L, E)``."""
        b, n, _ = x.shape
        return proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)


def _check_args(d: int, h: int, max_len: int, proj_dim: int, sharing: str) -> None:
    for name, val in (("embed_dim", d), ("num_heads", h), ("max_len", max_len)):
        positive_int(name, val)
    if d % h:
        raise ValueError(f"embed_dim={d} is not divisible by num_heads={h}")
    positive_int("proj_dim", proj_dim)
    if sharing not in SHARING:
        raise ValueError(f"sharing={sharing!r} is not one of {SHARING}")
