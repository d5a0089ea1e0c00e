"""attnlab under ``torch.func.vmap`` and the transforms built on it (``jacrev``,
per-sample gradients as ``vmap(grad(loss))``).

Under vmap no tensor value can be read (``bool()`` raises "data-dependent control
flow"), and every call raised there: the NaN screen and the check for rows without a key
read values. Now the screen answers "may hold NaN" (its NaN-safe path is plain torch
ops), SDPA's mask opens every row as while exporting, the sparse normalizers' autograd
Functions let vmap batch them, and the engines that plan from values or have no batching
rule (blocked, flex, the decoding kernel, the fused linears) step aside, so ``auto`` gives
a call to the reference engine or SDPA. Compared with plain PyTorch written from the
definition (``naive_attention``) in float64, or with per-item autograd.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from torch.func import functional_call, grad, jacrev, vmap

import attnlab
from attnlab import bias as B
from attnlab import masks as M
from attnlab.nn import Encoder, EncoderLayer, LayerConfig
from attnlab.nn.attention import MultiHeadAttention
from attnlab.positional import RotaryEmbedding
from tests.conftest import assert_2x_rule, max_err, naive_attention

# vmap's fallback for an op without a batching rule warns so (and loops over the items)
pytestmark = pytest.mark.filterwarnings("error:There is a performance drop")
L = 40
MASKS: dict[str, Callable[[], M.Mask | None]] = {
    "none": lambda: None,
    "causal": M.causal,
    "window": lambda: M.causal() & M.window(6),
    "two-sided window": lambda: M.window(5, 2),
    "prefix": lambda: M.prefix(7),
    "padding": lambda: M.padding([33], [30]),  # rows past 30 see nothing: 0
    "documents": lambda: M.documents(torch.arange(L) // 9) & M.causal(),
    "global tokens": lambda: M.global_tokens([0, 5]) | M.window(2),
    "dilated": lambda: M.dilated(8, 2),
    "random blocks": lambda: M.block_random(8, 2, seed=3),  # randomness="same"
    "not causal": lambda: ~M.causal(),
}


def _qkv(n: int, lq: int, lk: int, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    """q (n, 4, lq, 8) and k, v (n, 2, lk, 8): n items of a GQA call."""
    g = torch.Generator().manual_seed(0)
    shapes = ((n, 4, lq, 8), (n, 2, lk, 8), (n, 2, lk, 8))
    return [torch.randn(s, generator=g, dtype=dtype) for s in shapes]


def _per_item(**kw: object) -> Callable[..., torch.Tensor]:
    """attention on one item (batch dim added and removed), as vmap calls it."""
    return lambda q, k, v: torch.as_tensor(attnlab.attention(q[None], k[None], v[None], **kw))[0]


@pytest.mark.parametrize("name", list(MASKS))
def test_vmap_over_items_equals_plain_pytorch(name: str) -> None:
    mask = MASKS[name]()
    q, k, v = _qkv(3, L, L)
    got = vmap(_per_item(mask=mask), randomness="same")(q, k, v)  # (3, 4, L, 8)
    allowed = None if mask is None else mask.dense(L, L)
    want, _ = naive_attention(q, k, v, allowed=allowed)
    assert max_err(got, want) < 1e-12


@pytest.mark.parametrize(
    "kw",
    [
        {"normalize": "sparsemax"},
        {"normalize": "entmax15"},
        {"softcap": 2.0},
        {"sinks": torch.linspace(-1, 1, 4, dtype=torch.float64)},
        {"bias": "alibi"},
    ],
    ids=["sparsemax", "entmax15", "softcap", "sinks", "alibi"],
)
def test_vmap_with_normalizers_biases_softcap_and_sinks(kw: dict) -> None:
    q, k, v = _qkv(3, 24, 30)  # Lq < Lk: queries at the last positions
    mask = M.causal() & M.window(9)
    call = dict(kw)
    extra: dict = {}
    if kw.get("bias") == "alibi":
        call["bias"] = B.alibi(4)
        extra["bias"] = B.alibi(4).dense(24, 30, heads=4).to(torch.float64)
    got = vmap(_per_item(mask=mask, **call))(q, k, v)
    norm = call.pop("normalize", "softmax")
    call.pop("bias", None)
    want, _ = naive_attention(q, k, v, allowed=mask.dense(24, 30), normalizer=norm, **call, **extra)
    assert max_err(got, want) < 1e-9


def test_vmap_returns_weights_and_lse_and_keeps_a_hidden_nan_hidden() -> None:
    """A NaN value at a key the mask hides (an unwritten cache slot) stays out of the
    rows that do not see it, as without vmap; the weights and logsumexp come out."""
    q, k, v = _qkv(2, 16, 16)
    v[:, :, -1] = float("nan")  # the last key: only the last row sees it (causal)
    mask = M.causal()

    def both(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        r = attnlab.attention(q[None], k[None], v[None], mask=mask, return_weights=True)
        return r.out[0], r.weights[0]

    out, weights = vmap(both)(q, k, v)
    want, want_w = naive_attention(q, k, v.nan_to_num(0.0), allowed=mask.dense(16, 16))
    assert torch.isnan(out[:, :, -1]).all() and not torch.isnan(out[:, :, :-1]).any()
    assert max_err(out[:, :, :-1], want[:, :, :-1]) < 1e-12
    assert max_err(weights, want_w) < 1e-12
    lse = vmap(lambda q, k: attnlab.attention(q[None], k[None], k[None], return_lse=True).lse[0])
    s = torch.einsum("nhqe,nhke->nhqk", q, k.repeat_interleave(2, 1)) * 8**-0.5
    assert max_err(lse(q, k), torch.logsumexp(s, -1)) < 1e-12


@pytest.mark.parametrize("lq", [700, 1], ids=["long window", "decoding step"])
def test_vmap_where_auto_would_pick_the_blocked_engine(lq: int) -> None:
    """float32 at 700 keys (the blocked engine and its decoding kernel without vmap):
    under vmap ``auto`` gives the call to an engine vmap can batch, under the 2x rule."""
    q, k, v = _qkv(2, 700, 700, torch.float32)
    q = q[:, :, -lq:]
    mask = M.causal() & M.window(64)
    got = vmap(_per_item(mask=mask))(q, k, v)
    allowed = mask.dense(lq, 700)
    want, _ = naive_attention(*(t.double() for t in (q, k, v)), allowed=allowed)
    plain, _ = naive_attention(q, k, v, allowed=allowed)
    assert_2x_rule(got, plain, want, "vmap")


@pytest.mark.parametrize("engine", ["blocked", "flex"])
def test_engines_that_cannot_be_vmapped_say_so(engine: str) -> None:
    q, k, v = _qkv(2, 64, 64, torch.float32)
    with pytest.raises(ValueError, match=rf"engine='{engine}'.*vmap"):
        vmap(_per_item(mask=M.causal(), engine=engine))(q, k, v)


def test_jacrev_equals_autograds_jacobian() -> None:
    """jacrev vmaps the backward of a call made outside vmap: SDPA's CPU backward has no
    batching rule, so torch warns and loops (the result is exact)."""
    q, k, v = _qkv(1, 5, 7)
    f = lambda q: torch.as_tensor(attnlab.attention(q, k, v, mask=M.causal()))  # noqa: E731
    want = torch.autograd.functional.jacobian(f, q)  # row by row, no vmap
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "There is a performance drop")
        got = jacrev(f)(q)
    assert max_err(got, want) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_per_sample_gradients_of_a_layer_equal_a_loop_of_backward_calls(dtype: torch.dtype) -> None:
    """``vmap(grad(loss))`` over examples (DP-SGD, Opacus's functorch mode): GQA with RoPE
    and q/k norms, and an encoder whose float32 linears took the fused oneDNN path (no
    batching rule: torch warned at each call and looped)."""
    torch.manual_seed(0)
    mha = MultiHeadAttention(32, 4, num_kv_heads=2, qk_norm=True, rope=RotaryEmbedding(8))
    enc = Encoder(EncoderLayer(LayerConfig(32, 4, 64, dropout=0.0, norm_first=True)), 2)
    x, y = torch.randn(4, 20, 32, dtype=dtype), torch.randn(4, 20, 32, dtype=dtype)
    mask = M.causal() & M.window(5)
    for model in (mha.to(dtype), enc.to(dtype).eval()):
        params = {n: p.detach() for n, p in model.named_parameters()}

        def loss(p: dict, xi: torch.Tensor, yi: torch.Tensor, model: torch.nn.Module = model):
            out = functional_call(model, p, (xi[None],), {"mask": mask})
            return (out[0] - yi).square().mean()

        per = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
        for i in range(4):
            model.zero_grad()
            loss(dict(model.named_parameters()), x[i], y[i]).backward()
            for n, p in model.named_parameters():
                assert max_err(per[n][i], p.grad) < (1e-12 if dtype == torch.float64 else 1e-6), n
