"""Layers and engine options against formulas written here in float64, each one a gap a
mutation audit found: the code could be changed this way and no other test failed.

* the blocked engine's cosine scores (dropping the normalization went unseen);
* cosine attention's default scale of 1;
* ``MultiHeadAttention`` with GQA, qk-norm and RoPE against a hand-written layer (RoPE on
  the queries only went unseen: the layer was only compared with itself);
* ``LinformerAttention`` projecting values with ``proj_v``;
* the ``sdpa`` engine's dropout rate on its causal path;
* Performer's orthogonal blocks oriented uniformly (the Haar sign correction).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import attnlab
from attnlab import masks as M
from tests.conftest import assert_2x_rule, max_err, naive_attention


def naive(q: Tensor, k: Tensor, v: Tensor, scale: float, allowed: Tensor | None = None) -> Tensor:
    """softmax(scale q k^T) v (conftest's plain attention), ``allowed (Lq, Lk)``."""
    return naive_attention(q, k, v, allowed=allowed, scale=scale)[0]


@pytest.mark.parametrize("n", [600, 1100])
def test_blocked_cosine_scores_equal_the_formula_under_the_2x_rule(n: int) -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, n, 32, dtype=torch.float64) for _ in range(3))
    mask = M.causal() & M.window(64)
    allowed = mask.dense(n, n)
    want = naive(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, 8.0, allowed)
    q32, k32, v32 = q.float(), k.float(), v.float()
    plain = naive(F.normalize(q32, dim=-1), F.normalize(k32, dim=-1), v32, 8.0, allowed)
    got = attnlab.attention(q32, k32, v32, score="cosine", scale=8.0, mask=mask, engine="blocked")
    assert_2x_rule(got, plain, want, "blocked cosine")
    assert max_err(got, want) < 1e-5


def test_cosine_attention_defaults_to_scale_one() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 64, dtype=torch.float64) for _ in range(3))
    want = naive(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, 1.0)
    assert max_err(attnlab.attention(q, k, v, score="cosine"), want) < 1e-12


def _complex_rope(x: Tensor, pos: Tensor, base: float = 10000.0) -> Tensor:
    """Half-split RoPE written with complex numbers: pairs ``(x_i, x_{i + E/2})``."""
    e = x.shape[-1]
    inv = base ** (-torch.arange(0, e, 2, dtype=torch.float64) / e)  # (E/2,)
    ang = pos.double()[:, None] * inv[None]  # (L, E/2)
    xc = torch.complex(x[..., : e // 2], x[..., e // 2 :])
    r = xc * torch.polar(torch.ones_like(ang), ang)
    return torch.cat([r.real, r.imag], -1)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_mha_with_gqa_qk_norm_and_rope_equals_a_hand_written_layer(qk_norm: bool) -> None:
    from attnlab.nn import MultiHeadAttention
    from attnlab.positional import RotaryEmbedding

    torch.manual_seed(0)
    d, h, hkv, e, n = 32, 4, 2, 8, 7
    mha = MultiHeadAttention(d, h, num_kv_heads=hkv, rope=RotaryEmbedding(e), qk_norm=qk_norm)
    mha = mha.double().eval()
    if qk_norm:  # gains other than 1
        with torch.no_grad():
            mha.q_norm.weight.uniform_(0.5, 1.5)
            mha.k_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, n, d, dtype=torch.float64)
    w, b = mha.in_proj_weight, mha.in_proj_bias
    assert b is not None
    cuts = [0, h * e, (h + hkv) * e, (h + 2 * hkv) * e]

    def heads(i: int, count: int) -> Tensor:  # (B, count, L, E)
        y = x @ w[cuts[i] : cuts[i + 1]].T + b[cuts[i] : cuts[i + 1]]
        return y.view(2, n, count, e).transpose(1, 2)

    q, k, v = heads(0, h), heads(1, hkv), heads(2, hkv)

    def rms(t: Tensor, g: Tensor) -> Tensor:
        return t / torch.sqrt(t.square().mean(-1, keepdim=True) + torch.finfo(t.dtype).eps) * g

    if qk_norm:
        q, k = rms(q, mha.q_norm.weight), rms(k, mha.k_norm.weight)
    pos = torch.arange(n)
    q, k = _complex_rope(q, pos), _complex_rope(k, pos)
    o = naive(q, k, v, e**-0.5, torch.tril(torch.ones(n, n, dtype=torch.bool)))
    want = mha.out_proj(o.transpose(1, 2).reshape(2, n, d))
    assert max_err(mha(x, mask=M.causal()), want) < 1e-10


def test_linformer_projects_values_with_proj_v() -> None:
    from attnlab.nn import LinformerAttention

    torch.manual_seed(0)
    attn = LinformerAttention(16, 4, max_len=12, proj_dim=5).double()
    x = torch.randn(2, 12, 16, dtype=torch.float64)

    def heads(lin: torch.nn.Linear) -> Tensor:  # (B, 4, 12, 4)
        return lin(x).view(2, 12, 4, 4).transpose(1, 2)

    assert attn.proj_v is not None
    q, k, v = heads(attn.q_proj), heads(attn.k_proj), heads(attn.v_proj)
    o = naive(q, attn.proj_k @ k, attn.proj_v @ v, 0.5)
    want = attn.out_proj(o.transpose(1, 2).reshape(2, 12, 16))
    assert max_err(attn(x), want) < 1e-12


def test_sdpa_causal_dropout_drops_at_its_rate() -> None:
    """Values are the identity, so the output is each row's weights after dropout: the
    share of zeros among the causal entries is the dropout rate."""
    torch.manual_seed(0)
    n = 64
    q = k = torch.zeros(1, 1, n, 8)
    v = torch.eye(n).view(1, 1, n, n)
    allowed = torch.tril(torch.ones(n, n, dtype=torch.bool))
    for p in (0.6, 0.2):
        out = attnlab.attention(q, k, v, mask=M.causal(), dropout_p=p, engine="sdpa")
        zeros = float((out[0, 0][allowed] == 0).double().mean())
        assert abs(zeros - p) < 0.03, (p, zeros)


def test_performer_orthogonal_blocks_are_oriented_uniformly() -> None:
    """Haar-distributed blocks: each diagonal entry of a block's normalized rows is
    symmetric about 0 (without the QR sign correction it is biased positive)."""
    from attnlab.engines.performer import orthogonal_features

    g = torch.Generator().manual_seed(0)
    diag = []
    for _ in range(2000):
        w = orthogonal_features(4, 4, generator=g)
        diag.append((w / w.norm(dim=1, keepdim=True)).diagonal())
    means = torch.stack(diag).mean(0)  # (4,): std of each mean about 0.011
    assert float(means.abs().max()) < 0.05, means
