"""Multi-head attention: self and cross, MHA / GQA / MQA, RoPE, qk-norm and a KV cache.

Inputs are batch-first ``(B, L, D)``; inside, heads are ``(B, H, L, E)`` and every call
goes through :func:`attnlab.attention`, so any mask, bias, normalizer and engine of the
core works here. Parameter names follow ``torch.nn.MultiheadAttention``
(``in_proj_weight``, ``in_proj_bias``, ``out_proj``), so loading its weights is a mapping.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, TypedDict, cast, overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab._observe import unobserved
from attnlab._validate import (
    positive_int,
    same_dtype,
    validate_flag,
    validate_scale,
    validate_score,
)
from attnlab.bias import Bias
from attnlab.functional import AttentionOutput, attention, unsupported_by
from attnlab.masks import Mask
from attnlab.nn._fused import linear, module_linear
from attnlab.nn._inputs import check_input, check_positions, check_residual, is_self_attention
from attnlab.nn._weights import weight_dtype
from attnlab.nn.cache import KVCache
from attnlab.nn.config import check_attention_options, check_heads, check_rope
from attnlab.nn.seeded import affine_init
from attnlab.scores import ScoreFn

if TYPE_CHECKING:
    from attnlab.positional import RotaryEmbedding

__all__ = ["MultiHeadAttention"]


class _OutProj(nn.Linear):
    """The output projection: torch's ``Linear`` with its bias 0 when built and by its own
    ``reset_parameters`` (a meta-device build reaches it after the layer's)."""

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        if generator is None:
            super().reset_parameters()
        else:
            affine_init(self, generator)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class MultiHeadAttention(nn.Module):
    """Multi-head attention with separate query and key/value head counts.

    ``num_kv_heads == num_heads`` is multi-head attention, ``1`` is multi-query, anything
    dividing ``num_heads`` is grouped-query attention.

    Args:
        embed_dim: model width ``D`` of the query input and the output.
        num_heads: query heads ``H``.
        num_kv_heads: key/value heads ``Hkv`` (default ``num_heads``); ``H % Hkv == 0``.
        head_dim: ``E`` (default ``embed_dim // num_heads``).
        kdim, vdim: widths of the key and value inputs (default ``embed_dim``).
        bias: whether the input and output projections have a bias.
        dropout: dropout on the attention weights while training.
        qk_norm: RMS-normalize each head's queries and keys (learned gain) before RoPE.
        rope: a :class:`attnlab.positional.RotaryEmbedding` applied to self-attention's
            queries and keys, at positions offset by the KV cache's length.
        scale, score, normalize, engine: passed to :func:`attnlab.attention`.

    Example:
        >>> import torch
        >>> from attnlab import masks
        >>> mha = MultiHeadAttention(64, 8, num_kv_heads=2)
        >>> x = torch.randn(2, 10, 64)
        >>> out, w = mha(x, mask=masks.causal(), need_weights=True)
        >>> tuple(out.shape), tuple(w.shape)
        ((2, 10, 64), (2, 8, 10, 10))
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        kdim: int | None = None,
        vdim: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        qk_norm: bool = False,
        rope: RotaryEmbedding | None = None,
        scale: float | None = None,
        score: str | ScoreFn = "dot",
        normalize: str = "softmax",
        engine: str = "auto",
    ) -> None:
        super().__init__()
        embed_dim, num_heads, hkv, head_dim = check_heads(
            embed_dim, num_heads, num_kv_heads, head_dim
        )
        check_attention_options(dropout, normalize, engine)
        validate_score(score)
        validate_scale(scale)  # these failed at the first call, or took "no" as True
        validate_flag("bias", bias)
        validate_flag("qk_norm", qk_norm)
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, hkv
        self.head_dim = head_dim
        check_rope(rope, self.head_dim)
        self.kdim = embed_dim if kdim is None else positive_int("kdim", kdim)
        self.vdim = embed_dim if vdim is None else positive_int("vdim", vdim)
        self.dropout, self.scale, self.score = float(dropout), scale, score
        self.normalize, self.engine, self.rope = normalize, engine, rope
        self._init_projections(bias)
        self.q_norm = nn.RMSNorm(self.head_dim) if qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim) if qk_norm else None

    @property
    def _qkv_same_embed_dim(self) -> bool:
        return self.kdim == self.embed_dim and self.vdim == self.embed_dim

    def _init_projections(self, bias: bool) -> None:
        d, hq, hk = (
            self.embed_dim,
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
        )
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty(hq + 2 * hk, d))
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(hq, d))
            self.k_proj_weight = nn.Parameter(torch.empty(hk, self.kdim))
            self.v_proj_weight = nn.Parameter(torch.empty(hk, self.vdim))
        self.in_proj_bias = nn.Parameter(torch.zeros(hq + 2 * hk)) if bias else None
        self.out_proj = _OutProj(hq, d, bias=bias)
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Initialize the input projections as when built (Xavier-uniform weights, zero
        bias), e.g. after a build on the meta device and ``to_empty``, as torch's layers
        do; ``out_proj`` has its own (zero bias too). ``generator``: draw from it, not
        from torch's global RNG."""
        for w in self._proj_weights():
            nn.init.xavier_uniform_(w, generator=generator)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)

    def _proj_weights(self) -> list[Tensor]:
        if self._qkv_same_embed_dim:
            return [self.in_proj_weight]
        return [self.q_proj_weight, self.k_proj_weight, self.v_proj_weight]

    def _weight(self, part: str) -> tuple[Tensor, Tensor | None]:
        """Weight and bias of the ``"q"``, ``"k"``, ``"v"`` or ``"kv"`` projection."""
        hq, hk = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        lo, hi = {"q": (0, hq), "k": (hq, hq + hk), "v": (hq + hk, hq + 2 * hk)}.get(
            part, (hq, hq + 2 * hk)
        )
        b = None if self.in_proj_bias is None else self.in_proj_bias[lo:hi]
        if self._qkv_same_embed_dim:
            return self.in_proj_weight[lo:hi], b
        return cast(Tensor, getattr(self, f"{part}_proj_weight")), b

    @overload
    def forward(
        self,
        query: Tensor,
        key: Tensor | None = ...,
        value: Tensor | None = ...,
        *,
        mask: Mask | Tensor | None = ...,
        bias: Bias | Tensor | None = ...,
        cache: KVCache | None = ...,
        need_weights: Literal[False] = ...,
        average_weights: bool = ...,
        positions: Tensor | None = ...,
        residual: Tensor | None = ...,
    ) -> Tensor: ...

    @overload
    def forward(
        self,
        query: Tensor,
        key: Tensor | None = ...,
        value: Tensor | None = ...,
        *,
        mask: Mask | Tensor | None = ...,
        bias: Bias | Tensor | None = ...,
        cache: KVCache | None = ...,
        need_weights: Literal[True],
        average_weights: bool = ...,
        positions: Tensor | None = ...,
        residual: Tensor | None = ...,
    ) -> tuple[Tensor, Tensor]: ...

    @overload
    def forward(
        self,
        query: Tensor,
        key: Tensor | None = ...,
        value: Tensor | None = ...,
        *,
        mask: Mask | Tensor | None = ...,
        bias: Bias | Tensor | None = ...,
        cache: KVCache | None = ...,
        need_weights: bool = ...,
        average_weights: bool = ...,
        positions: Tensor | None = ...,
        residual: Tensor | None = ...,
    ) -> Tensor | tuple[Tensor, Tensor]: ...

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        *,
        mask: Mask | Tensor | None = None,
        bias: Bias | Tensor | None = None,
        cache: KVCache | None = None,
        need_weights: bool = False,
        average_weights: bool = False,
        positions: Tensor | None = None,
        residual: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Attend from ``query`` over ``key``/``value`` (self-attention when key is None).

        Args:
            query: ``(B, Lq, D)``.
            key, value: ``(B, Lk, kdim)`` and ``(B, Lk, vdim)`` for cross-attention;
                ``value`` defaults to ``key``. Leave both None (or pass ``query`` as both)
                for self-attention; ``key=query`` with another ``value`` attends over
                that value, as torch's layer does.
            mask: a mask or bool tensor broadcastable to ``(B, H, Lq, Lk)`` (True = may
                attend); query rows are aligned bottom-right, so ``masks.causal()`` also
                holds for a cached decoding step.
            bias: an additive bias (ALiBi, T5 buckets, a tensor).
            cache: a :class:`KVCache`. Self-attention appends this call's keys and values;
                cross-attention fills it on the first call and reuses it afterwards (the
                ``key`` argument is then ignored).
            need_weights: also return the attention weights (from any engine: an engine
                that cannot return them computes the output, and the weights are
                recomputed without autograd by one that can).
            average_weights: average the weights over heads, as torch's layer does.
            positions: RoPE positions ``(L,)`` or ``(B, L)`` of this call's queries and new
                keys (default: the cache length onward); a ValueError in a layer
                without RoPE or in cross-attention, which would ignore them.
            residual: ``(B, Lq, D)`` added to the output (a residual layer's sum, done in
                the output projection's epilogue at CPU inference).

        Returns:
            ``(B, Lq, D)``, or with ``need_weights`` a pair with the weights
            ``(B, H, Lq, Lk)`` (``(B, Lq, Lk)`` when averaged).
        """
        check_input("query", query, self.embed_dim)
        for name, t in (("query", query), ("key", key), ("value", value)):  # (float64 into a
            if isinstance(t, Tensor):  # float32 layer: "mat1 and mat2 must have the same dtype")
                same_dtype(name, t, weight_dtype(self.out_proj))
        need_weights = validate_flag("need_weights", need_weights)  # ("no" is truthy)
        average_weights = validate_flag("average_weights", average_weights)
        if residual is not None:  # (torch: "The size of tensor a (8) must match ...")
            check_residual(residual, query)
        if cache is not None and not isinstance(cache, KVCache):
            raise TypeError(f"cache must be an attnlab.nn.KVCache, got {type(cache).__name__}")
        is_self = is_self_attention(query, key, value, self.rope, cache)
        check_positions(positions, self.rope is not None, is_self)
        q, k, v = self._heads(query, None if is_self else key, value, cache, positions)
        res = self._attend(q, k, v, mask, bias, need_weights)
        out = res.out if isinstance(res, AttentionOutput) else res  # (B, H, Lq, E)
        b, h, lq, e = out.shape
        out = out.transpose(1, 2).reshape(b, lq, h * e)  # (B, Lq, H E)
        out = module_linear(self.out_proj, out, residual=residual)  # (B, Lq, D)
        if not need_weights:
            return out
        w = cast(AttentionOutput, res).weights
        assert w is not None
        return out, (w.mean(1) if average_weights else w)

    def _heads(
        self,
        x: Tensor,
        key: Tensor | None,
        value: Tensor | None,
        cache: KVCache | None,
        positions: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Project to ``q (B, H, Lq, E)``, ``k, v (B, Hkv, Lk, E)``, using the cache."""
        if key is None:
            q, k, v = self._project_self(x)
            offset = 0 if cache is None else cache.length
            q = self._prep(q, self.q_norm, positions, offset)
            k = self._prep(k, self.k_norm, positions, offset)
            return (q, *cache.append(k, v)) if cache is not None else (q, k, v)
        q = self._split(F.linear(x, *self._weight("q")), self.num_heads)
        q = self._prep(q, self.q_norm, None, None)  # no RoPE across two sequences
        if cache is not None and cache.length:
            cache._check_kind(cross=True)  # (a self-attention cache was read as the memory)
            assert cache.keys is not None and cache.values is not None
            return q, cache.keys, cache.values
        # key and value checked before their batch (a list key: "no attribute 'dim'")
        k, v = self._project_kv(key, key if value is None else value)  # (B, Hkv, Lk, E)
        if key.shape[0] not in (1, x.shape[0]):
            raise ValueError(  # (it said "batch sizes of q, k, v must match or be 1")
                f"key must have query's batch size {x.shape[0]} (or 1), got key "
                f"{tuple(key.shape)} for query {tuple(x.shape)}"
            )
        k = self._prep(k, self.k_norm, None, None)
        return (q, *cache.set(k, v)) if cache is not None else (q, k, v)

    def _project_self(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        hq, hk = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if not self._qkv_same_embed_dim:
            if self.kdim != self.embed_dim or self.vdim != self.embed_dim:
                raise ValueError(  # (it said "key must be (B, L, 8)" of a key not given)
                    f"key: none given, so this is self-attention, which needs kdim = vdim = "
                    f"embed_dim={self.embed_dim}; this layer has kdim={self.kdim}, "
                    f"vdim={self.vdim}: pass key and value"
                )
            q = self._split(F.linear(x, *self._weight("q")), self.num_heads)  # (B, H, L, E)
            return (q, *self._project_kv(x, x))
        qkv = linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, L, (H + 2Hkv) E)
        q, k, v = qkv.split([hq, hk, hk], dim=-1)
        return (
            self._split(q, self.num_heads),
            self._split(k, self.num_kv_heads),
            self._split(v, self.num_kv_heads),
        )

    def _project_kv(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        check_input("key", key, self.kdim)
        check_input("value", value, self.vdim)
        if key.shape[:-1] != value.shape[:-1]:  # (it named the head-split k and v)
            raise ValueError(
                f"key and value must have the same batch and length (B, Lk, .), got key "
                f"{tuple(key.shape)} and value {tuple(value.shape)}"
            )
        if self._qkv_same_embed_dim and key is value:
            kv = F.linear(key, *self._weight("kv"))  # (B, Lk, 2 Hkv E)
            k, v = kv.chunk(2, dim=-1)
        else:
            k, v = F.linear(key, *self._weight("k")), F.linear(value, *self._weight("v"))
        return self._split(k, self.num_kv_heads), self._split(v, self.num_kv_heads)

    def _split(self, x: Tensor, heads: int) -> Tensor:
        b, n, _ = x.shape
        return x.view(b, n, heads, self.head_dim).transpose(1, 2)  # (B, heads, L, E)

    def _prep(
        self, x: Tensor, norm: nn.Module | None, positions: Tensor | None, offset: int | None
    ) -> Tensor:
        """qk-norm, then RoPE at ``positions`` (or from ``offset``) unless offset is None."""
        x = x if norm is None else norm(x)
        if self.rope is None or offset is None:
            return x
        return self.rope(x, positions if positions is not None else offset)

    def _attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Mask | Tensor | None,
        bias: Bias | Tensor | None,
        need_weights: bool,
    ) -> Tensor | AttentionOutput:
        """:func:`attnlab.attention` on ``(B, H, L, E)`` heads; weights from any engine."""
        kw = _Call(
            mask=mask, bias=bias, scale=self.scale, score=self.score, normalize=self.normalize
        )
        p = self.dropout if self.training else 0.0

        def run(engine: str, weights: bool, p: float) -> Tensor | AttentionOutput:
            return attention(q, k, v, **kw, dropout_p=p, engine=engine, return_weights=weights)

        direct = need_weights and (
            self.engine == "auto"
            or unsupported_by(self.engine, q, k, v, **kw, return_weights=True) is None
        )
        res = run(self.engine, direct, p)
        if not need_weights or direct:
            return res
        with torch.no_grad(), unobserved():  # the engine gave none: recompute them (a
            w = cast(AttentionOutput, run("auto", True, 0.0)).weights  # capture has the call)
        return AttentionOutput(cast(Tensor, res), w, None)

    @classmethod
    def from_torch(cls, module: nn.MultiheadAttention) -> MultiHeadAttention:
        """A copy of a ``torch.nn.MultiheadAttention`` (its weights, heads and dropout, on
        its device, in its dtype and its train or eval mode).

        The copy is batch-first whatever ``module.batch_first`` says.

        Example:
            >>> import torch
            >>> ref = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()
            >>> x = torch.randn(2, 5, 32)
            >>> ours = MultiHeadAttention.from_torch(ref)
            >>> torch.allclose(ours(x), ref(x, x, x)[0], atol=1e-6)
            True
        """
        if not isinstance(module, nn.MultiheadAttention):
            raise TypeError(f"module must be torch.nn.MultiheadAttention, got {type(module)}")
        if module.bias_k is not None or module.add_zero_attn:
            raise ValueError("add_bias_kv and add_zero_attn are not supported by from_torch")
        ours = cls(
            module.embed_dim,
            module.num_heads,
            kdim=module.kdim,
            vdim=module.vdim,
            bias=module.in_proj_bias is not None,
            dropout=module.dropout,
        )
        w = module.out_proj.weight  # moved first: loaded into float32, float64 was rounded
        ours.to(w.device, w.dtype).train(module.training).load_state_dict(module.state_dict())
        return ours


class _Call(TypedDict):
    """The :func:`attnlab.attention` arguments a layer fixes for one call."""

    mask: Mask | Tensor | None
    bias: Bias | Tensor | None
    scale: float | None
    score: str | ScoreFn
    normalize: str
