"""Rows a bias puts far from 0: the additive-mask convention (``finfo.min`` on the keys a
row may not see, so a fully padded row has every key there). Torch SDPA's backward
recomputes the weights from a stored logsumexp that large, which rounds away the log of
the row's sum: a row of ``finfo(float32).min`` got weights 1, not 1/Lk. ``auto`` gives
such calls with gradients to an engine that keeps the 2x rule; calls without gradients
stay with SDPA, whose forward is right.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

import attnlab
from attnlab import masks as M
from attnlab.engines import select_engine
from attnlab.engines._far import far_limit
from attnlab.functional import _request
from tests.conftest import assert_2x_rule, check_and_control

F32_MIN = torch.finfo(torch.float32).min


def _grads(fn: Callable[..., Tensor], x: list[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """``fn(q, k, v)`` in ``dtype`` and the gradients of q, k, v for upstream ``x[3]``."""
    q, k, v = (t.to(dtype).clone().requires_grad_() for t in x[:3])
    out = fn(q, k, v)
    out.backward(x[3].to(dtype))
    return [out.detach(), *(t.grad for t in (q, k, v))]  # type: ignore[list-item]


def _plain(bias: Tensor) -> Callable[..., Tensor]:
    """Plain PyTorch: ``softmax(q k^T / sqrt(E) + bias) v`` in the inputs' dtype."""
    return lambda q, k, v: torch.softmax(q @ k.mT * q.shape[-1] ** -0.5 + bias.to(q.dtype), -1) @ v


def _inputs(lk: int, seed: int = 0) -> list[Tensor]:
    """q (2, 4, 8, 16), k, v (2, 4, lk, 16) and an upstream gradient, float64."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(2, 4, 8, 16), (2, 4, lk, 16), (2, 4, lk, 16), (2, 4, 8, 16)]
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]


@pytest.mark.parametrize("value", [F32_MIN, -1e30, 1e30])
@pytest.mark.parametrize("lk", [2, 64])
def test_auto_gradients_on_rows_of_a_huge_bias_follow_fp64(value: float, lk: int) -> None:
    """Item 1's first three query rows have ``value`` on every key (a padded row of an
    additive mask; +1e30 from the other side). Before, ``auto`` ran torch SDPA: dV [1, 1]
    where it is [0.5, 0.5] (Lk = 2), dQ up to 55 off (Lk 300)."""
    x = _inputs(lk)
    bias = torch.zeros(2, 1, 8, lk, dtype=torch.float64)
    bias[1, :, :3] = value  # (in float64 too the scores round to the bias: uniform rows)
    ref = _grads(_plain(bias), x, torch.float64)
    plain = _grads(_plain(bias), x, torch.float32)
    ours = _grads(lambda q, k, v: attnlab.attention(q, k, v, bias=bias.float()), x, torch.float32)
    for what, o, p, r in zip(("out", "dq", "dk", "dv"), ours, plain, ref, strict=True):
        assert_2x_rule(o, p, r, f"{what}, bias {value:g}, Lk={lk}")


def _pick(bias: Tensor, mask: M.Mask | None = None, *, grad: bool = True) -> str:
    q, k, v = (torch.randn(1, 2, 4, 8, requires_grad=grad) for _ in "qkv")
    req = _request(q, k, v, mask, bias, None, "dot", "softmax", 0.0, False, False)
    return select_engine("auto", req).name


def test_only_calls_with_gradients_and_a_far_row_leave_sdpa() -> None:
    """From ``far_limit`` (32 in float32) on, a row's largest bias over the keys it sees
    sends calls with gradients elsewhere; below it, without gradients, or where the mask
    leaves the row no key, SDPA keeps them."""
    assert far_limit(torch.float32) == 32.0
    row = torch.zeros(4, 4)
    for peak, engine in ((-31.9, "sdpa"), (-32.0, "reference"), (32.0, "reference")):
        row[2] = peak
        assert _pick(row) == engine, peak
    row[2] = F32_MIN
    assert _pick(row, grad=False) == "sdpa"  # forward only: SDPA's forward is right
    row[2, 0] = 0.0  # the row's largest bias is 0 ...
    assert _pick(row) == "sdpa"
    hide = torch.ones(4, 4, dtype=torch.bool)
    hide[2, 0] = False  # ... unless the mask hides that key
    assert _pick(row, M.tensor(hide)) == "reference"
    hide[2] = False  # a row no key reaches is 0 with gradient 0 in SDPA too
    assert _pick(row, M.tensor(hide)) == "sdpa"


def test_the_sdpa_engine_named_refuses_them_by_name() -> None:
    q, k, v = (torch.randn(1, 2, 4, 8, requires_grad=True) for _ in "qkv")
    far, near = torch.zeros(4, 4), torch.zeros(4, 4)
    far[0] = F32_MIN
    check_and_control(
        lambda: attnlab.attention(q, k, v, bias=far, engine="sdpa"),
        lambda: attnlab.attention(q, k, v, bias=near, engine="sdpa"),
        ValueError,
        r"torch SDPA's backward recomputes the weights from a logsumexp .* peaks at "
        r"-3\.4e\+38 \(\|peak\| >= 32 in float32\)",
    )


def test_a_transformers_float_mask_with_a_padded_row_trains_like_eager() -> None:
    """transformers' 4-D additive mask (``finfo.min`` where a query may not attend): a
    left-padded causal item's first rows see no key. Through the attnlab backend (engine
    ``auto``), the gradients follow eager attention's fp64 run by the 2x rule."""
    pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import eager_attention_forward

    from attnlab.integrations.transformers import attention_forward

    module = torch.nn.Module()
    module.num_key_value_groups = 2  # type: ignore[assignment]
    x = _inputs(8)
    x[1], x[2] = x[1][:, :2], x[2][:, :2]  # GQA: 4 query heads on 2 key/value heads
    x[3] = x[3].transpose(1, 2)  # (B, Lq, H, E), as both return their output
    allowed = torch.ones(8, 8, dtype=torch.bool).tril().repeat(2, 1, 1, 1)  # (B, 1, Lq, Lk)
    allowed[0, :, :, :3] = False  # item 0: 3 tokens of left padding

    mask = torch.zeros(allowed.shape).masked_fill(~allowed, F32_MIN)  # float32's, as trained

    def eager(q: Tensor, k: Tensor, v: Tensor) -> Tensor:  # its softmax is float32's
        return eager_attention_forward(module, q, k, v, mask.to(q.dtype), scaling=0.25)[0]

    def ours(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return attention_forward(module, q, k, v, mask, scaling=0.25)[0]

    def fp64(q: Tensor, k: Tensor, v: Tensor) -> Tensor:  # eager's formula in float64
        k, v = (t.repeat_interleave(2, dim=1) for t in (k, v))
        return _plain(mask.double())(q, k, v).transpose(1, 2)  # (scale 1/sqrt(16))

    ref, plain = _grads(fp64, x, torch.float64), _grads(eager, x, torch.float32)
    got = _grads(ours, x, torch.float32)
    for what, o, p, r in zip(("out", "dq", "dk", "dv"), got, plain, ref, strict=True):
        assert_2x_rule(o, p, r, what)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_sdpa_and_flex_refuse_them_and_auto_follows_fp64() -> None:
    """On a GPU ``auto`` gives masked calls to FlexAttention, whose backward also
    recomputes the weights from its logsumexp (torch's dense FlexAttention backward, run on
    the CPU with its device check lifted: dQ 0.5-4.6 off at finfo.min and -1e30, NaN at
    -1e12): both engines refuse such rows with gradients by name."""
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(1, 2, 512, 32, generator=g, dtype=torch.float64).cuda() for _ in "qkvo"]
    mask = M.causal() & M.window(64)
    allowed = mask.dense(512, 512).cuda()
    bias = torch.zeros(512, 512, device="cuda")
    bias[:5] = F32_MIN  # five padded rows
    bias = bias.masked_fill(~allowed[0, 0], F32_MIN)  # the additive form of the mask too
    for name in ("sdpa", "flex"):
        with pytest.raises(ValueError, match=r"backward recomputes the weights from a logsumexp"):
            _grads(lambda q, k, v, e=name: attnlab.attention(q, k, v, bias=bias, engine=e), x,
                   torch.float32)  # fmt: skip
    ours = _grads(lambda q, k, v: attnlab.attention(q, k, v, bias=bias, mask=mask), x,
                  torch.float32)  # fmt: skip
    hidden = bias.masked_fill(~allowed[0, 0], float("-inf"))  # what the mask hides
    ref = _grads(_plain(hidden.double()), x, torch.float64)
    plain = _grads(_plain(hidden), x, torch.float32)
    for what, o, p, r in zip(("out", "dq", "dk", "dv"), ours, plain, ref, strict=True):
        assert_2x_rule(o, p, r, what)
