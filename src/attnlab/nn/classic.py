"""The classic attentions of RNN encoder-decoders: Bahdanau, Luong, and attention pooling.

Each module computes its own parametric scores ``(B, Lq, Lk)`` and hands the last three
steps (mask, normalize, weighted sum) to :func:`attnlab.attend` with one head::

    scores  = score(query, keys)            # additive, dot, general, concat
    weights = normalize(mask(scores))       # attnlab.attend, layout (B, 1, Lq, Lk)
    context = weights @ values

Masks accepted by every ``forward`` here (True = may attend):

* an :mod:`attnlab.masks` mask, evaluated on ``(B, 1, Lq, Lk)`` (e.g.
  ``masks.padding(key_lengths)``);
* a bool tensor ``(B, Lk)``: key padding, the same keys hidden for every query;
* a bool tensor ``(B, Lq, Lk)``: one row of allowed keys per query.

A batch of 1 in a bool tensor broadcasts. Fully masked rows give context 0 and weights 0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from attnlab import masks
from attnlab._validate import positive_int, same_dtype, validate_flag
from attnlab.functional import AttentionOutput, attend
from attnlab.normalize import get_normalizer

__all__ = ["AttentionPooling", "BahdanauAttention", "LuongAttention"]

LUONG_METHODS = ("dot", "general", "concat")


# ---------------------------------------------------------------------------------------
# validation and the shared attend step


def _normalizer_name(normalize: object) -> str:
    """A registered normalizer name (validated now, not at the first forward)."""
    get_normalizer(normalize)
    return str(normalize)


def _float_tensor(name: str, x: object, ranks: tuple[int, ...], layout: str) -> Tensor:
    """A floating-point tensor whose rank is one of ``ranks``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(x).__name__}")
    if x.dim() not in ranks:
        raise ValueError(f"{name} must have shape {layout}, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    return x


def _last_dim(name: str, x: Tensor, dim: int, symbol: str) -> None:
    if x.shape[-1] != dim:
        raise ValueError(
            f"{name} has last dim {x.shape[-1]} (shape {tuple(x.shape)}) but the module "
            f"was built with {symbol}={dim}"
        )


def _key_mask(mask: object, batch: int, lq: int, lk: int) -> masks.Mask | None:
    """Coerce a module-level mask into an :mod:`attnlab.masks` mask on ``(B, 1, Lq, Lk)``."""
    if mask is None or isinstance(mask, masks.Mask):
        return mask
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        seen = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(
            f"mask must be an attnlab.masks.Mask, a bool tensor (True = may attend) or "
            f"None, got {seen}"
        )
    want = (batch, lk) if mask.dim() == 2 else (batch, lq, lk)
    if mask.dim() not in (2, 3) or any(
        s not in (1, w) for s, w in zip(mask.shape, want, strict=True)
    ):
        raise ValueError(
            f"mask tensor must have shape (B, Lk) = {(batch, lk)} (key padding) or "
            f"(B, Lq, Lk) = {(batch, lq, lk)}, got shape {tuple(mask.shape)}"
        )
    dense = mask[:, None, None, :] if mask.dim() == 2 else mask[:, None]  # (B, 1, ., Lk)
    return masks.tensor(dense)


def _attend(scores: Tensor, values: Tensor, mask: object, normalize: str) -> tuple[Tensor, Tensor]:
    """Mask, normalize and mix one-head scores ``(B, Lq, Lk)`` with values ``(B, Lk, Dv)``.

    Returns:
        ``(context (B, Lq, Dv), weights (B, Lq, Lk))``.
    """
    b, lq, lk = scores.shape
    r = attend(
        scores[:, None],  # (B, 1, Lq, Lk)
        values[:, None],  # (B, 1, Lk, Dv)
        mask=_key_mask(mask, b, lq, lk),
        normalize=normalize,
        return_weights=True,
    )
    if not isinstance(r, AttentionOutput) or r.weights is None:
        raise RuntimeError("attnlab.attend(return_weights=True) returned no weights")
    return r.out[:, 0], r.weights[:, 0]  # (B, Lq, Dv), (B, Lq, Lk)


# ---------------------------------------------------------------------------------------
# Bahdanau and Luong: one forward, two score functions


class _ScoredAttention(nn.Module):
    """Shared forward of :class:`BahdanauAttention` and :class:`LuongAttention`.

    Subclasses define :meth:`project_keys` (the query-independent part of the score) and
    :meth:`score`, and set ``query_dim``, ``key_dim``, ``projected_dim`` and ``normalize``.
    """

    query_dim: int
    key_dim: int
    projected_dim: int
    normalize: str

    def project_keys(self, keys: Tensor) -> Tensor:
        """Query-independent part of the score: ``(B, Lk, Dk) -> (B, Lk, projected_dim)``.

        Compute it once per source sentence and pass it to every decoder step as
        ``forward(..., projected_keys=...)``.
        """
        raise NotImplementedError

    def score(self, query: Tensor, projected_keys: Tensor) -> Tensor:
        """Scores ``(B, Lq, Lk)`` of queries ``(B, Lq, Dq)`` against projected keys."""
        raise NotImplementedError

    def forward(
        self,
        query: Tensor,
        keys: Tensor,
        values: Tensor | None = None,
        *,
        mask: masks.Mask | Tensor | None = None,
        projected_keys: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Attend from one decoder state (or a sequence of them) over the encoder states.

        Args:
            query: ``(B, Dq)`` one state per batch item, or ``(B, Lq, Dq)``.
            keys: ``(B, Lk, Dk)`` encoder states.
            values: ``(B, Lk, Dv)``; default ``keys``.
            mask: an :mod:`attnlab.masks` mask, a bool ``(B, Lk)`` key-padding tensor or
                a bool ``(B, Lq, Lk)`` tensor (True = may attend); see the module doc.
            projected_keys: ``project_keys(keys)`` computed earlier, reused as is.

        Returns:
            ``(context, weights)``: ``(B, Dv)`` and ``(B, Lk)`` for a ``(B, Dq)`` query,
            ``(B, Lq, Dv)`` and ``(B, Lq, Lk)`` for a ``(B, Lq, Dq)`` one. Weights sum to
            1 over the allowed keys; fully masked rows give context 0 and weights 0.
        """
        q = _float_tensor("query", query, (2, 3), "(B, Dq) or (B, Lq, Dq)")
        _last_dim("query", q, self.query_dim, "query_dim")  # (shape as passed, not (B, 1, Dq))
        single = q.dim() == 2
        q = q[:, None] if single else q  # (B, Lq, Dq)
        k, v = self._keys_values(q, keys, values)  # (B, Lk, Dk), (B, Lk, Dv)
        pk = (
            self.project_keys(k)
            if projected_keys is None
            else self._check_projected(projected_keys, k)
        )  # (B, Lk, P)
        context, weights = _attend(self.score(q, pk), v, mask, self.normalize)
        return (context[:, 0], weights[:, 0]) if single else (context, weights)

    def _keys_values(self, q: Tensor, keys: object, values: object) -> tuple[Tensor, Tensor]:
        """Validate keys ``(B, Lk, Dk)`` and values ``(B, Lk, Dv)`` against ``q``."""
        k = _float_tensor("keys", keys, (3,), "(B, Lk, Dk)")
        _last_dim("keys", k, self.key_dim, "key_dim")
        if k.shape[0] != q.shape[0]:
            raise ValueError(
                f"query and keys must have the same batch size B; got query batch "
                f"{q.shape[0]} and keys {tuple(k.shape)}"
            )
        v = k if values is None else _float_tensor("values", values, (3,), "(B, Lk, Dv)")
        if v.shape[:2] != k.shape[:2]:
            raise ValueError(
                f"values must have shape (B, Lk, Dv) with (B, Lk) = {tuple(k.shape[:2])} "
                f"as in keys, got shape {tuple(v.shape)}"
            )
        params = [p.dtype for p in self.parameters()]  # (Luong's dot has none: the keys')
        for name, t in (("query", q), ("keys", k), ("values", v)):  # (torch: "mat1 and
            same_dtype(name, t, params[0] if params else k.dtype)  # mat2 must have the same")
        return k, v

    def _check_projected(self, projected_keys: object, k: Tensor) -> Tensor:
        """``projected_keys`` must be ``(B, Lk, projected_dim)`` for these keys."""
        pk = _float_tensor("projected_keys", projected_keys, (3,), "(B, Lk, P)")
        want = (k.shape[0], k.shape[1], self.projected_dim)
        if tuple(pk.shape) != want:
            raise ValueError(
                f"projected_keys must have shape (B, Lk, P) = {want} (project_keys(keys)), "
                f"got shape {tuple(pk.shape)}"
            )
        return same_dtype("projected_keys", pk, k.dtype)


class BahdanauAttention(_ScoredAttention):
    """Additive attention (Bahdanau, Cho & Bengio, 2015).

    ``e_ij = v^T tanh(W1 q_i + W2 k_j)``; ``W2 k`` is the query-independent part
    (:meth:`project_keys`), so a decoder loop computes it once per source sentence.

    Args:
        query_dim: ``Dq``, size of a decoder state.
        key_dim: ``Dk``, size of an encoder state.
        hidden_dim: size of the additive hidden layer.
        normalize: ``"softmax"``, ``"sparsemax"`` or ``"entmax15"``.
        bias: whether ``W1`` has a bias.

    Attributes:
        query_proj: ``W1``, ``Linear(query_dim, hidden_dim, bias=bias)``.
        key_proj: ``W2``, ``Linear(key_dim, hidden_dim, bias=False)``.
        v: ``Linear(hidden_dim, 1, bias=False)``.

    Example:
        >>> import torch
        >>> attn = BahdanauAttention(query_dim=6, key_dim=4, hidden_dim=8)
        >>> state, enc = torch.randn(2, 6), torch.randn(2, 5, 4)
        >>> keep = torch.tensor([[True] * 5, [True, True, True, False, False]])
        >>> context, weights = attn(state, enc, mask=keep)
        >>> context.shape, weights.shape, weights[1, 3:].tolist()
        (torch.Size([2, 4]), torch.Size([2, 5]), [0.0, 0.0])
    """

    def __init__(
        self,
        query_dim: int,
        key_dim: int,
        hidden_dim: int,
        *,
        normalize: str = "softmax",
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.query_dim = positive_int("query_dim", query_dim)
        self.key_dim = positive_int("key_dim", key_dim)
        self.projected_dim = positive_int("hidden_dim", hidden_dim)
        self.normalize = _normalizer_name(normalize)
        self.query_proj = nn.Linear(query_dim, hidden_dim, bias=validate_flag("bias", bias))
        self.key_proj = nn.Linear(key_dim, hidden_dim, bias=False)
        self.v = nn.Linear(hidden_dim, 1, bias=False)

    def project_keys(self, keys: Tensor) -> Tensor:
        """``W2 k``: ``(B, Lk, Dk) -> (B, Lk, hidden_dim)``."""
        k = _float_tensor("keys", keys, (3,), "(B, Lk, Dk)")
        _last_dim("keys", k, self.key_dim, "key_dim")
        return self.key_proj(k)

    def score(self, query: Tensor, projected_keys: Tensor) -> Tensor:
        """``v^T tanh(W1 q_i + W2 k_j)``: ``(B, Lq, Dq), (B, Lk, H) -> (B, Lq, Lk)``."""
        pq = self.query_proj(query)  # (B, Lq, H)
        hidden = torch.tanh(pq[:, :, None] + projected_keys[:, None])  # (B, Lq, Lk, H)
        return self.v(hidden).squeeze(-1)

    def extra_repr(self) -> str:
        return (
            f"query_dim={self.query_dim}, key_dim={self.key_dim}, "
            f"hidden_dim={self.projected_dim}, normalize={self.normalize!r}"
        )


class LuongAttention(_ScoredAttention):
    """Multiplicative and concat attention (Luong, Pham & Manning, 2015).

    * ``"dot"``: ``q^T k``; no parameters, needs ``query_dim == key_dim``.
    * ``"general"``: ``q^T W k``; ``key_proj = Linear(key_dim, query_dim, bias=False)``.
    * ``"concat"``: ``v^T tanh(W [q; k])``; ``proj = Linear(query_dim + key_dim, hidden,
      bias=False)`` and ``v = Linear(hidden, 1, bias=False)``.

    The query-independent part (``k``, ``W k``, or the key half of ``W [q; k]``) is
    :meth:`project_keys`.

    Args:
        query_dim: ``Dq``, size of a decoder state.
        key_dim: ``Dk``, size of an encoder state; default ``query_dim``.
        method: ``"dot"``, ``"general"`` or ``"concat"``.
        hidden_dim: hidden size of ``"concat"`` (default ``query_dim``); only for concat.
        normalize: ``"softmax"``, ``"sparsemax"`` or ``"entmax15"``.

    Example:
        >>> import torch
        >>> attn = LuongAttention(6, 4, method="general")
        >>> states, enc = torch.randn(2, 3, 6), torch.randn(2, 5, 4)
        >>> context, weights = attn(states, enc, mask=torch.tensor([[True] * 5] * 2))
        >>> context.shape, weights.shape, torch.allclose(weights.sum(-1), torch.ones(2, 3))
        (torch.Size([2, 3, 4]), torch.Size([2, 3, 5]), True)
    """

    def __init__(
        self,
        query_dim: int,
        key_dim: int | None = None,
        *,
        method: str = "general",
        hidden_dim: int | None = None,
        normalize: str = "softmax",
    ) -> None:
        super().__init__()
        self.query_dim = positive_int("query_dim", query_dim)
        self.key_dim = query_dim if key_dim is None else positive_int("key_dim", key_dim)
        self.method = _luong_method(method, self.query_dim, self.key_dim, hidden_dim)
        self.normalize = _normalizer_name(normalize)
        self.projected_dim = self.key_dim if method == "dot" else self.query_dim
        if method == "general":
            self.key_proj = nn.Linear(self.key_dim, query_dim, bias=False)
        elif method == "concat":
            hidden = query_dim if hidden_dim is None else positive_int("hidden_dim", hidden_dim)
            self.projected_dim = hidden
            self.proj = nn.Linear(query_dim + self.key_dim, hidden, bias=False)
            self.v = nn.Linear(hidden, 1, bias=False)

    def project_keys(self, keys: Tensor) -> Tensor:
        """``k`` (dot), ``W k`` (general) or the key half of ``W [q; k]`` (concat).

        ``(B, Lk, Dk) -> (B, Lk, P)`` with ``P`` = ``Dk``, ``Dq`` or ``hidden_dim``.
        """
        k = _float_tensor("keys", keys, (3,), "(B, Lk, Dk)")
        _last_dim("keys", k, self.key_dim, "key_dim")
        if self.method == "dot":
            return k
        if self.method == "general":
            return self.key_proj(k)
        return self._concat_half(k, query=False)  # (B, Lk, hidden)

    def score(self, query: Tensor, projected_keys: Tensor) -> Tensor:
        """Scores ``(B, Lq, Lk)`` of queries ``(B, Lq, Dq)`` against projected keys."""
        if self.method != "concat":
            return torch.einsum("bqd,bkd->bqk", query, projected_keys)
        pq = self._concat_half(query, query=True)  # (B, Lq, hidden)
        hidden = torch.tanh(pq[:, :, None] + projected_keys[:, None])  # (B, Lq, Lk, hidden)
        return self.v(hidden).squeeze(-1)

    def _concat_half(self, x: Tensor, *, query: bool) -> Tensor:
        """``x (..., Dq or Dk)`` through the query or key half of concat's ``W [q; k]``:
        a slice of ``W``, or where ``proj.weight`` is no tensor (quantized) ``proj`` itself
        on ``x`` padded with zeros for the other half."""
        w, dq = self.proj.weight, self.query_dim
        if isinstance(w, Tensor):
            return x @ (w[:, :dq] if query else w[:, dq:]).T  # (..., hidden)
        zeros = x.new_zeros(*x.shape[:-1], self.key_dim if query else dq)
        return self.proj(torch.cat((x, zeros) if query else (zeros, x), dim=-1))

    def extra_repr(self) -> str:
        return (
            f"query_dim={self.query_dim}, key_dim={self.key_dim}, method={self.method!r}, "
            f"normalize={self.normalize!r}"
        )


def _luong_method(method: object, query_dim: int, key_dim: int, hidden_dim: object) -> str:
    """Validate Luong's ``method`` against the sizes it needs."""
    if not isinstance(method, str) or method not in LUONG_METHODS:
        raise ValueError(
            f"method={method!r} is not a Luong score; expected one of "
            f"{', '.join(map(repr, LUONG_METHODS))}"
        )
    if method == "dot" and query_dim != key_dim:
        raise ValueError(
            f"method='dot' needs query_dim == key_dim, got query_dim={query_dim} and "
            f"key_dim={key_dim}; use method='general' for different sizes"
        )
    if hidden_dim is not None and method != "concat":
        raise ValueError(
            f"hidden_dim={hidden_dim!r} is only used by method='concat', got "
            f"method={method!r}; leave hidden_dim=None"
        )
    return method


# ---------------------------------------------------------------------------------------
# attention pooling (HAN)


class AttentionPooling(nn.Module):
    """Attention pooling of a sequence with a learned context vector (Yang et al., 2016).

    The attention layer of hierarchical attention networks::

        u_t     = tanh(W h_t + b)
        alpha_t = normalize(u_t^T u_w)   over the unmasked t
        s       = sum_t alpha_t h_t

    Args:
        input_dim: ``D``, size of each ``h_t``.
        attn_dim: size of ``u_t`` and of the context vector ``u_w``; default ``input_dim``.
        normalize: ``"softmax"``, ``"sparsemax"`` or ``"entmax15"``.

    Attributes:
        proj: ``Linear(input_dim, attn_dim)`` (``W``, ``b``).
        context: ``u_w``, a parameter ``(attn_dim,)``.

    Example:
        >>> import torch
        >>> pool = AttentionPooling(8)
        >>> h, keep = torch.randn(2, 5, 8), torch.tensor([[True] * 5, [False] * 5])
        >>> pooled, weights = pool(h, keep)
        >>> pooled.shape, weights[1].tolist(), pooled[1].abs().sum().item()
        (torch.Size([2, 8]), [0.0, 0.0, 0.0, 0.0, 0.0], 0.0)
    """

    def __init__(
        self, input_dim: int, attn_dim: int | None = None, *, normalize: str = "softmax"
    ) -> None:
        super().__init__()
        self.input_dim = positive_int("input_dim", input_dim)
        self.attn_dim = input_dim if attn_dim is None else positive_int("attn_dim", attn_dim)
        self.normalize = _normalizer_name(normalize)
        self.proj = nn.Linear(input_dim, self.attn_dim)
        self.context = nn.Parameter(torch.empty(self.attn_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw the context vector again, ``N(0, 1 / attn_dim)`` as when built (``proj``
        is a torch ``Linear`` with its own)."""
        nn.init.normal_(self.context, std=1 / math.sqrt(self.attn_dim))

    def forward(self, h: Tensor, mask: masks.Mask | Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Pool ``h`` over its length.

        Args:
            h: ``(B, L, D)``.
            mask: bool ``(B, L)``, True = a real item (or an :mod:`attnlab.masks` mask on
                ``(B, 1, 1, L)``); None = all real.

        Returns:
            ``(pooled (B, D), weights (B, L))``; a row with every item masked gives 0s.
        """
        x = _float_tensor("h", h, (3,), "(B, L, D)")
        _last_dim("h", x, self.input_dim, "input_dim")
        same_dtype("h", x, self.context.dtype)  # (torch's "mat1 and mat2 must have the same")
        u = torch.tanh(self.proj(x))  # (B, L, A)
        scores = (u @ self.context)[:, None]  # (B, 1, L)
        pooled, weights = _attend(scores, x, mask, self.normalize)  # (B, 1, D), (B, 1, L)
        return pooled[:, 0], weights[:, 0]

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}, attn_dim={self.attn_dim}, normalize={self.normalize!r}"
