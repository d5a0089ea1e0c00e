"""Tests for attnlab.nn.classic: Bahdanau, Luong (dot, general, concat), AttentionPooling.

References are written from the papers' formulas in float64 with plain torch ops on the
module's own parameters (einsum, tanh, an explicit concatenation for Luong's concat,
torch.softmax on masked scores), and the ``entmax`` package for sparse normalizers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import entmax
import pytest
import torch
from torch import Tensor

from attnlab import masks
from attnlab.nn.classic import AttentionPooling, BahdanauAttention, LuongAttention
from tests.conftest import check_and_control

B, LQ, LK, DQ, DK, DV, HID = 3, 4, 7, 6, 5, 3, 8
KINDS = ["bahdanau", "dot", "general", "concat"]
RefScore = Callable[[Any, Tensor, Tensor], Tensor]


# ---------------------------------------------------------------------------- references


def _ref_bahdanau(m: Any, q: Tensor, k: Tensor) -> Tensor:
    """e_bqk = v . tanh(W1 q + b1 + W2 k), q (B, Lq, Dq), k (B, Lk, Dk)."""
    w1, b1 = m.query_proj.weight, m.query_proj.bias
    w2, v = m.key_proj.weight, m.v.weight[0]
    hq = torch.einsum("bqd,hd->bqh", q, w1)  # (B, Lq, H)
    hq = hq if b1 is None else hq + b1
    hk = torch.einsum("bkd,hd->bkh", k, w2)  # (B, Lk, H)
    return torch.einsum("bqkh,h->bqk", torch.tanh(hq[:, :, None] + hk[:, None]), v)


def _ref_dot(m: Any, q: Tensor, k: Tensor) -> Tensor:
    return torch.einsum("bqd,bkd->bqk", q, k)


def _ref_general(m: Any, q: Tensor, k: Tensor) -> Tensor:
    return torch.einsum("bqd,de,bke->bqk", q, m.key_proj.weight, k)


def _ref_concat(m: Any, q: Tensor, k: Tensor) -> Tensor:
    """v . tanh(W [q; k]) with the concatenation built explicitly."""
    lq, lk = q.shape[1], k.shape[1]
    qk = torch.cat([q[:, :, None].expand(-1, -1, lk, -1), k[:, None].expand(-1, lq, -1, -1)], -1)
    hidden = torch.tanh(torch.einsum("bqkc,hc->bqkh", qk, m.proj.weight))
    return torch.einsum("bqkh,h->bqk", hidden, m.v.weight[0])


def _make(kind: str, normalize: str = "softmax") -> tuple[Any, RefScore, int]:
    """(module, reference score, query dim) of one kind."""
    if kind == "bahdanau":
        return BahdanauAttention(DQ, DK, HID, normalize=normalize), _ref_bahdanau, DQ
    if kind == "dot":
        return LuongAttention(DK, method="dot", normalize=normalize), _ref_dot, DK
    hid = {"hidden_dim": HID} if kind == "concat" else {}
    ref = _ref_general if kind == "general" else _ref_concat
    return LuongAttention(DQ, DK, method=kind, normalize=normalize, **hid), ref, DQ


def _ref_weights(scores: Tensor, allowed: Tensor, normalize: str = "softmax") -> Tensor:
    """Masked normalizer along Lk; fully masked rows give 0."""
    if normalize == "softmax":
        w = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    else:
        fn = {"sparsemax": entmax.sparsemax, "entmax15": entmax.entmax15}[normalize]
        w = fn(scores.masked_fill(~allowed, -1e9), dim=-1)
    return torch.where(allowed.any(-1, keepdim=True), w, torch.zeros_like(w))


def _lengths() -> Tensor:
    return torch.tensor([LK, 3, 5])


def _masks(kind: str) -> tuple[object, Tensor]:
    """(mask as passed to forward, dense allowed (B, Lq, Lk)) of one mask form."""
    lengths = _lengths()
    pad = torch.arange(LK)[None] < lengths[:, None]  # (B, Lk)
    per_query = torch.rand(B, LQ, LK) < 0.6
    per_query[:, :, 0] = True
    return {
        "none": (None, torch.ones(B, LQ, LK, dtype=torch.bool)),
        "key_padding": (pad, pad[:, None].expand(B, LQ, LK)),
        "per_query": (per_query, per_query),
        "attnlab_padding": (masks.padding(lengths), pad[:, None].expand(B, LQ, LK)),
    }[kind]


def _inputs(dq: int, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor, Tensor]:
    return (
        torch.randn(B, LQ, dq, dtype=dtype),
        torch.randn(B, LK, DK, dtype=dtype),
        torch.randn(B, LK, DV, dtype=dtype),
    )


# --------------------------------------------------------------------- Bahdanau and Luong


@pytest.mark.parametrize("mask_kind", ["none", "key_padding", "per_query", "attnlab_padding"])
@pytest.mark.parametrize("kind", KINDS)
def test_weights_and_context_match_fp64_formula(kind: str, mask_kind: str) -> None:
    module, ref_score, dq = _make(kind)
    module.double()
    q, k, v = _inputs(dq)
    mask, allowed = _masks(mask_kind)
    context, weights = module(q, k, v, mask=mask)
    ref_w = _ref_weights(ref_score(module, q, k), allowed)
    torch.testing.assert_close(weights, ref_w, rtol=0, atol=1e-12)
    torch.testing.assert_close(context, ref_w @ v, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_single_query_rank(kind: str) -> None:
    """A (B, Dq) query gives (B, Dv), (B, Lk), equal to row i of the (B, Lq, Dq) call."""
    module, ref_score, dq = _make(kind)
    module.double()
    q, k, v = _inputs(dq)
    pad, allowed = _masks("key_padding")
    full_c, full_w = module(q, k, v, mask=pad)
    for i in range(LQ):
        context, weights = module(q[:, i], k, v, mask=pad)
        assert context.shape == (B, DV) and weights.shape == (B, LK)
        ref_w = _ref_weights(ref_score(module, q[:, i : i + 1], k), allowed[:, :1])[:, 0]
        torch.testing.assert_close(weights, ref_w, rtol=0, atol=1e-12)
        torch.testing.assert_close(weights, full_w[:, i], rtol=0, atol=1e-12)
        torch.testing.assert_close(context, full_c[:, i], rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_values_default_to_keys(kind: str) -> None:
    module, _, dq = _make(kind)
    q, k, _ = _inputs(dq, torch.float32)
    assert torch.equal(module(q, k)[0], module(q, k, k)[0])


@pytest.mark.parametrize("kind", KINDS)
def test_weights_sum_to_one_and_masked_rows_are_zero(kind: str) -> None:
    module, _, dq = _make(kind)
    q, k, v = _inputs(dq, torch.float32)
    allowed = torch.rand(B, LQ, LK) < 0.5
    allowed[0, 1] = False  # one fully masked query row
    allowed[1, 2] = True
    q.requires_grad_(True)
    context, weights = module(q, k, v, mask=allowed)
    assert torch.all(weights[~allowed] == 0)
    rows = allowed.any(-1)  # (B, Lq)
    torch.testing.assert_close(weights.sum(-1)[rows], torch.ones(int(rows.sum())))
    assert torch.all(weights[0, 1] == 0) and torch.all(context[0, 1] == 0)
    context.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("kind", KINDS)
def test_zero_length_key_padding_gives_zeros(kind: str) -> None:
    module, _, dq = _make(kind)
    q, k, v = _inputs(dq, torch.float32)
    context, weights = module(q[:, 0], k, v, mask=masks.padding([0, 2, LK]))
    assert not torch.isnan(weights).any() and not torch.isnan(context).any()
    assert torch.all(weights[0] == 0) and torch.all(context[0] == 0)
    assert torch.all(weights[1, 2:] == 0)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_every_parameter(kind: str) -> None:
    module, _, dq = _make(kind)
    q, k, v = _inputs(dq, torch.float32)
    q.requires_grad_(True)
    context, _ = module(q, k, v, mask=_masks("key_padding")[0])
    (context * torch.randn_like(context)).sum().backward()
    params = dict(module.named_parameters())
    expected = {
        "bahdanau": {"query_proj.weight", "query_proj.bias", "key_proj.weight", "v.weight"},
        "dot": set(),
        "general": {"key_proj.weight"},
        "concat": {"proj.weight", "v.weight"},
    }[kind]
    assert set(params) == expected
    for name, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert q.grad is not None and q.grad.abs().sum() > 0


@pytest.mark.parametrize("normalize", ["sparsemax", "entmax15"])
@pytest.mark.parametrize("kind", KINDS)
def test_sparse_normalizers_match_entmax_package(kind: str, normalize: str) -> None:
    module, ref_score, dq = _make(kind, normalize=normalize)
    module.double()
    q, k, v = _inputs(dq)
    q = q * 3  # spread the scores so that the sparse maps zero some keys out
    mask, allowed = _masks("per_query")
    context, weights = module(q, k, v, mask=mask)
    ref_w = _ref_weights(ref_score(module, q, k), allowed, normalize)
    torch.testing.assert_close(weights, ref_w, rtol=0, atol=1e-10)
    torch.testing.assert_close(context, ref_w @ v, rtol=0, atol=1e-10)
    assert torch.all(weights[~allowed] == 0)


@pytest.mark.parametrize("kind", KINDS)
def test_projected_keys_reuse_equals_plain_call(kind: str) -> None:
    """A decoder loop that projects the keys once gets exactly the plain call's results."""
    module, _, dq = _make(kind)
    q, k, v = _inputs(dq, torch.float32)
    pad = _masks("key_padding")[0]
    pk = module.project_keys(k)
    assert pk.shape == (B, LK, module.projected_dim)
    for t in range(LQ):
        reused = module(q[:, t], k, v, mask=pad, projected_keys=pk)
        plain = module(q[:, t], k, v, mask=pad)
        assert torch.equal(reused[0], plain[0]) and torch.equal(reused[1], plain[1])


def test_luong_concat_hidden_defaults_to_query_dim() -> None:
    module = LuongAttention(DQ, DK, method="concat")
    assert module.proj.weight.shape == (DQ, DQ + DK) and module.projected_dim == DQ


def test_luong_key_dim_defaults_to_query_dim() -> None:
    module = LuongAttention(DQ)
    assert module.key_proj.weight.shape == (DQ, DQ)


def test_bahdanau_without_bias() -> None:
    module = BahdanauAttention(DQ, DK, HID, bias=False)
    assert module.query_proj.bias is None
    q, k, _ = _inputs(DQ)
    module.double()
    weights = module(q, k)[1]
    ref = _ref_weights(_ref_bahdanau(module, q, k), torch.ones(B, LQ, LK, dtype=torch.bool))
    torch.testing.assert_close(weights, ref, rtol=0, atol=1e-12)


def test_bahdanau_bias_must_be_a_bool() -> None:
    """bias="False" was taken as True (a bias was built), as MultiHeadAttention refuses."""
    check_and_control(
        lambda: BahdanauAttention(DQ, DK, HID, bias="False"),  # type: ignore[arg-type]
        lambda: BahdanauAttention(DQ, DK, HID, bias=False),
        TypeError,
        "^bias must be a bool, got str$",
    )


# --------------------------------------------------------------------------- errors


def _luong(**kw: object) -> Callable[[], object]:
    return lambda: LuongAttention(**kw)  # type: ignore[arg-type]


def _call(**overrides: object) -> Callable[[], object]:
    """A Luong(general) forward with one argument replaced."""

    def run() -> object:
        torch.manual_seed(0)
        module = LuongAttention(DQ, DK, method="general")
        args: dict[str, object] = {
            "query": torch.randn(B, LQ, DQ),
            "keys": torch.randn(B, LK, DK),
            "values": torch.randn(B, LK, DV),
        }
        args.update(overrides)
        return module(**args)

    return run


ERRORS: list[tuple[str, Callable[[], object], Callable[[], object], type[Exception], str]] = [
    (  # (float64 into a float32 module: torch's "mat1 and mat2 must have the same dtype")
        "query_float64",
        _call(query=torch.randn(B, LQ, DQ, dtype=torch.float64)),
        _call(query=torch.randn(B, LQ, DQ)),
        TypeError,
        r"query must be of the model's dtype torch.float32, got torch.float64",
    ),
    (
        "bahdanau_query_float64",
        lambda: BahdanauAttention(DQ, DK, HID)(torch.randn(B, DQ).double(), torch.randn(B, LK, DK)),
        lambda: BahdanauAttention(DQ, DK, HID)(torch.randn(B, DQ), torch.randn(B, LK, DK)),
        TypeError,
        r"query must be of the model's dtype torch.float32, got torch.float64",
    ),
    (
        "dot_keys_float64",
        lambda: LuongAttention(DQ, method="dot")(
            torch.randn(B, DQ), torch.randn(B, LK, DQ).double(), torch.randn(B, LK, DV).double()
        ),
        lambda: LuongAttention(DQ, method="dot")(
            torch.randn(B, DQ).double(), torch.randn(B, LK, DQ).double()
        ),
        TypeError,
        r"query must be of the model's dtype torch.float64, got torch.float32",
    ),
    (
        "values_float64",
        _call(values=torch.randn(B, LK, DV, dtype=torch.float64)),
        _call(values=torch.randn(B, LK, DV)),
        TypeError,
        r"values must be of the model's dtype torch.float32, got torch.float64",
    ),
    (
        "unknown_method",
        _luong(query_dim=4, method="bilinear"),
        _luong(query_dim=4, method="general"),
        ValueError,
        r"method='bilinear' is not a Luong score; expected one of 'dot', 'general', 'concat'",
    ),
    (
        "dot_dims",
        _luong(query_dim=4, key_dim=6, method="dot"),
        _luong(query_dim=6, key_dim=6, method="dot"),
        ValueError,
        r"method='dot' needs query_dim == key_dim, got query_dim=4 and key_dim=6",
    ),
    (
        "hidden_not_concat",
        _luong(query_dim=4, method="general", hidden_dim=8),
        _luong(query_dim=4, method="concat", hidden_dim=8),
        ValueError,
        r"hidden_dim=8 is only used by method='concat', got method='general'",
    ),
    (
        "bad_dim",
        _luong(query_dim=0),
        _luong(query_dim=1),
        ValueError,
        r"query_dim must be a positive int, got 0",
    ),
    (
        "normalize",
        _luong(query_dim=4, normalize="softmin"),
        _luong(query_dim=4, normalize="entmax15"),
        ValueError,
        r"normalize='softmin' is not a known normalizer",
    ),
    (
        "query_type",
        _call(query=[[1.0]]),
        _call(),
        TypeError,
        r"query must be a torch.Tensor of shape \(B, Dq\) or \(B, Lq, Dq\), got list",
    ),
    (
        "query_rank",
        _call(query=torch.randn(B, 2, LQ, DQ)),
        _call(query=torch.randn(B, DQ)),
        ValueError,
        r"query must have shape \(B, Dq\) or \(B, Lq, Dq\), got shape \(3, 2, 4, 6\)",
    ),
    (
        "query_dim",
        _call(query=torch.randn(B, LQ, DQ + 1)),
        _call(query=torch.randn(B, LQ, DQ)),
        ValueError,
        r"query has last dim 7 \(shape \(3, 4, 7\)\) but the module was built with query_dim=6",
    ),
    (
        "query_dim_single",  # (it showed the unsqueezed (3, 1, 7))
        _call(query=torch.randn(B, DQ + 1)),
        _call(query=torch.randn(B, DQ)),
        ValueError,
        r"query has last dim 7 \(shape \(3, 7\)\) but the module was built with query_dim=6",
    ),
    (
        "keys_rank",
        _call(keys=torch.randn(LK, DK)),
        _call(keys=torch.randn(B, LK, DK)),
        ValueError,
        r"keys must have shape \(B, Lk, Dk\), got shape \(7, 5\)",
    ),
    (
        "keys_dtype",
        _call(keys=torch.ones(B, LK, DK, dtype=torch.long)),
        _call(keys=torch.ones(B, LK, DK)),
        TypeError,
        r"keys must be a floating-point tensor, got dtype torch.int64",
    ),
    (
        "batch_mismatch",
        _call(keys=torch.randn(B + 1, LK, DK), values=torch.randn(B + 1, LK, DV)),
        _call(keys=torch.randn(B, LK, DK), values=torch.randn(B, LK, DV)),
        ValueError,
        r"query and keys must have the same batch size B; got query batch 3 and "
        r"keys \(4, 7, 5\)",
    ),
    (
        "values_length",
        _call(values=torch.randn(B, LK + 1, DV)),
        _call(values=torch.randn(B, LK, DV + 1)),
        ValueError,
        r"values must have shape \(B, Lk, Dv\) with \(B, Lk\) = \(3, 7\) as in keys, "
        r"got shape \(3, 8, 3\)",
    ),
    (
        "mask_dtype",
        _call(mask=torch.ones(B, LK)),
        _call(mask=torch.ones(B, LK, dtype=torch.bool)),
        TypeError,
        r"mask must be an attnlab.masks.Mask, a bool tensor .* got torch.float32",
    ),
    (
        "mask_shape",
        _call(mask=torch.ones(B, LK + 1, dtype=torch.bool)),
        _call(mask=torch.ones(1, LQ, LK, dtype=torch.bool)),
        ValueError,
        r"mask tensor must have shape \(B, Lk\) = \(3, 7\) \(key padding\) or "
        r"\(B, Lq, Lk\) = \(3, 4, 7\), got shape \(3, 8\)",
    ),
    (
        "mask_rank",
        _call(mask=torch.ones(B, 1, LQ, LK, dtype=torch.bool)),
        _call(mask=masks.tensor(torch.ones(B, 1, LQ, LK, dtype=torch.bool))),
        ValueError,
        r"mask tensor must have shape .* got shape \(3, 1, 4, 7\)",
    ),
    (
        "projected_keys",
        _call(projected_keys=torch.randn(B, LK, DK)),
        _call(projected_keys=torch.randn(B, LK, DQ)),
        ValueError,
        r"projected_keys must have shape \(B, Lk, P\) = \(3, 7, 6\) \(project_keys\(keys\)\), "
        r"got shape \(3, 7, 5\)",
    ),
]


@pytest.mark.parametrize(
    ("bad", "ok", "exc", "match"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS]
)
def test_errors_name_the_argument(
    bad: Callable[[], object], ok: Callable[[], object], exc: type[Exception], match: str
) -> None:
    check_and_control(bad, ok, exc, match)


# ----------------------------------------------------------------------- AttentionPooling


def _ref_pool(m: AttentionPooling, h: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """alpha = softmax(tanh(W h + b) . u_w) over kept t; s = sum alpha h."""
    u = torch.tanh(torch.einsum("bld,ad->bla", h, m.proj.weight) + m.proj.bias)
    w = _ref_weights(torch.einsum("bla,a->bl", u, m.context), keep)
    return torch.einsum("bl,bld->bd", w, h), w


def test_attention_pooling_matches_fp64_formula() -> None:
    pool = AttentionPooling(DK, attn_dim=HID).double()
    h = torch.randn(B, LK, DK, dtype=torch.float64)
    keep = torch.arange(LK)[None] < torch.tensor([LK, 1, 4])[:, None]
    for mask, allowed in ((None, torch.ones_like(keep)), (keep, keep)):
        pooled, weights = pool(h, mask)
        ref_pooled, ref_w = _ref_pool(pool, h, allowed)
        torch.testing.assert_close(weights, ref_w, rtol=0, atol=1e-12)
        torch.testing.assert_close(pooled, ref_pooled, rtol=0, atol=1e-12)


def test_attention_pooling_masking_equals_truncation() -> None:
    """Masked items do not count: pooling with a mask equals pooling the real prefix."""
    pool = AttentionPooling(DK)
    h = torch.randn(B, LK, DK)
    keep = torch.arange(LK)[None] < torch.tensor([LK, 2, 0])[:, None]
    pooled, weights = pool(h, keep)
    assert torch.all(weights[~keep] == 0)
    torch.testing.assert_close(weights[:2].sum(-1), torch.ones(2))
    short_pooled, short_w = pool(h[1:2, :2])
    torch.testing.assert_close(pooled[1:2], short_pooled, rtol=0, atol=1e-6)
    torch.testing.assert_close(weights[1:2, :2], short_w, rtol=0, atol=1e-6)
    assert torch.all(pooled[2] == 0) and torch.all(weights[2] == 0)  # fully masked row


def test_attention_pooling_gradients_and_sparsemax() -> None:
    pool = AttentionPooling(DK, normalize="sparsemax")
    h = torch.randn(B, LK, DK) * 3
    pooled, weights = pool(h)
    ref_w = entmax.sparsemax(
        torch.tanh(h @ pool.proj.weight.T + pool.proj.bias) @ pool.context, dim=-1
    )
    torch.testing.assert_close(weights, ref_w, rtol=0, atol=1e-6)
    (pooled * torch.randn_like(pooled)).sum().backward()
    for name, p in pool.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_attention_pooling_errors() -> None:
    pool = AttentionPooling(DK)
    check_and_control(
        lambda: pool(torch.randn(B, LK, DK + 1)),
        lambda: pool(torch.randn(B, LK, DK)),
        ValueError,
        r"h has last dim 6 \(shape \(3, 7, 6\)\) but the module was built with input_dim=5",
    )
    check_and_control(
        lambda: pool(torch.randn(B, LK, DK), torch.ones(B, LK + 1, dtype=torch.bool)),
        lambda: pool(torch.randn(B, LK, DK), torch.ones(B, LK, dtype=torch.bool)),
        ValueError,
        r"mask tensor must have shape \(B, Lk\) = \(3, 7\)",
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda: (BahdanauAttention(16, 12, 8), (torch.randn(2, 16), torch.randn(2, 5, 12))),
        lambda: (
            LuongAttention(12, 16, method="general"),
            (torch.randn(2, 12), torch.randn(2, 5, 16)),
        ),
        lambda: (AttentionPooling(12), (torch.randn(2, 5, 12),)),
    ],
)
def test_layers_run_under_autocast_as_torch_layers_do(make: Callable[[], Any]) -> None:
    """Under ``torch.autocast`` a Linear's scores come out in bfloat16 beside float32
    values: the layers raised "scores and v must share dtype". Now both are in autocast's
    dtype, and the result is float32's within bfloat16's rounding."""
    torch.manual_seed(0)
    layer, args = make()
    want, want_w = layer(*args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, got_w = layer(*args)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(got_w.float(), want_w, rtol=3e-2, atol=1e-2)
