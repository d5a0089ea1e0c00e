"""The fused oneDNN linear of inference: equal to F.linear, and never stale after a weight
changes (its packed copy follows the weight's version, address and a sample of its entries)."""

from __future__ import annotations

import gc
import math
import threading

import pytest
import torch
import torch.nn.functional as F

from attnlab.nn import _fused
from attnlab.nn._fused import linear


@pytest.fixture(autouse=True)
def _always_fused(monkeypatch: pytest.MonkeyPatch) -> None:
    """These small shapes take the fused kernel too (in use only from FUSE_ROWS rows and
    FUSE_WEIGHT weight entries on), so that its checks below check it."""
    monkeypatch.setattr(_fused, "FUSE_ROWS", 1)
    monkeypatch.setattr(_fused, "FUSE_WEIGHT", 1)


def test_few_rows_and_small_weights_run_f_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    """Below 16 rows or 2**17 weight entries ``F.linear`` was faster (a decoding step's
    single row: 22 against 13 us at 256 -> 768): only larger products are fused."""
    monkeypatch.undo()
    calls: list[int] = []
    real = _fused._POINTWISE
    if real is None:
        pytest.skip("this torch has no oneDNN fused linear")
    monkeypatch.setattr(_fused, "_POINTWISE", lambda x, *a: calls.append(len(x)) or real(x, *a))
    big, small = torch.randn(1024, 128), torch.randn(192, 64)
    with torch.no_grad():
        for rows, w in [(1, big), (15, big), (16, big), (640, small)]:
            x = torch.randn(rows, w.shape[1])
            got = linear(x, w, None, "relu")
            assert torch.allclose(got, F.relu(F.linear(x, w)), atol=1e-5)
    assert calls == [16]


@pytest.mark.parametrize("inner", [256, 384, 1536])
def test_long_inner_sizes_keep_the_2x_rule(inner: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """At MiniLM's sizes (384 -> 1536 -> 384) the fused kernel's error against float64 was
    up to 4.8x ``F.linear``'s (oneDNN sums the inner size in one run): those products keep
    to ``F.linear``, and so to its error, with no slack."""
    monkeypatch.undo()
    with torch.no_grad():
        for seed in range(4):
            g = torch.Generator().manual_seed(seed)
            x, w = torch.randn(128, inner, generator=g), torch.randn(384, inner, generator=g)
            w, b = w / inner**0.5, torch.randn(384, generator=g)
            want = F.linear(x.double(), w.double(), b.double())
            ours = (linear(x, w, b).double() - want).abs().max()
            assert ours <= 2 * (F.linear(x, w, b).double() - want).abs().max(), (seed, ours)


def test_the_attention_output_projection_is_fused_with_its_residual(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``out_proj`` is an ``nn.Linear`` subclass that only initializes differently: its
    residual is added in the product's epilogue (it was not, from the subclass on)."""
    from attnlab.nn import MultiHeadAttention

    if _fused._BINARY is None:
        pytest.skip("this torch has no oneDNN fused linear")
    calls: list[str] = []
    real = _fused._BINARY
    monkeypatch.setattr(_fused, "_BINARY", lambda *a: calls.append("binary") or real(*a))
    mha = MultiHeadAttention(64, 4).eval()
    x = torch.randn(2, 40, 64)
    with torch.no_grad():
        got = mha(x, residual=x)
        want = x + mha(x)
    assert calls == ["binary"] and torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("fold", [True, False])  # the AVX-512 and the AVX2 choice
@pytest.mark.parametrize("activation", [None, "relu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("rows", [1, 37, 640])
def test_fused_linear_equals_torch(
    activation: str | None, rows: int, fold: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_fused, "fuse_activation", lambda: (fold, "test"))
    x, w, b = torch.randn(rows, 48), torch.randn(24, 48), torch.randn(24)
    want = F.linear(x.double(), w.double(), b.double())
    if activation == "relu":
        want = F.relu(want)
    elif activation is not None:
        want = F.gelu(want, approximate="tanh" if activation == "gelu_tanh" else "none")
    with torch.no_grad():
        got = linear(x, w, b, activation)
    ours, plain = (got.double() - want).abs().max(), (F.linear(x, w, b).double() - want).abs()
    assert ours <= 2 * plain.max() + 1e-6  # the 2x rule, with gelu's own rounding


@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("activation", [None, "relu", "gelu", "gelu_tanh"])
def test_nan_and_inf_come_out_where_torch_puts_them(
    activation: str | None, fold: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(oneDNN's ReLU post-op gave 0 for NaN: a FeedForward with a NaN weight was finite
    at inference only.) NaN and inf in the input or the weight give NaN and inf where
    torch's linear and activation give them."""
    monkeypatch.setattr(_fused, "fuse_activation", lambda: (fold, "test"))
    x, w, b = torch.randn(64, 48), torch.randn(40, 48), torch.randn(40)
    x[3, 5], x[4, 6], x[5, 7], w[7, 0] = math.nan, math.inf, -math.inf, math.nan
    with torch.no_grad():
        got = linear(x, w, b, activation)
        want = _fused._activate(F.linear(x, w, b), activation)
    assert want.isnan().any() and torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.isinf(), want.isinf())
    ok = want.isfinite()
    assert torch.allclose(got[ok], want[ok], atol=1e-5)


def test_a_write_by_another_thread_during_the_packing_is_seen(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """(The version and the sample were read after oneDNN's reorder: a write another
    thread made meanwhile was taken for the packed values, a stale copy for good, 120
    off.) The reorder here pauses, as a thread switch can, while the other thread writes."""
    real = _fused._REORDER
    packed, written = threading.Event(), threading.Event()

    def reorder_then_pause(w: torch.Tensor, rows: int) -> torch.Tensor:
        out = real(w, rows)
        packed.set()
        written.wait(5)
        return out

    monkeypatch.setattr(_fused, "_REORDER", reorder_then_pause)
    w, x = torch.randn(64, 48), torch.randn(32, 48)

    def infer() -> None:
        with torch.no_grad():
            linear(x, w, None)

    def write() -> None:
        packed.wait(5)
        with torch.no_grad():
            w.mul_(-1)  # in place: a new version
        written.set()

    threads = [threading.Thread(target=infer), threading.Thread(target=write)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert written.is_set()
    monkeypatch.setattr(_fused, "_REORDER", real)
    with torch.no_grad():
        assert torch.allclose(linear(x, w, None), F.linear(x, w), atol=1e-5)


def test_packed_weight_follows_in_place_updates_and_is_freed() -> None:
    x, w, b = torch.randn(16, 32), torch.randn(8, 32), torch.randn(8)
    with torch.no_grad():
        first = linear(x, w, b)
        assert torch.allclose(first, F.linear(x, w, b), atol=1e-5)
        w.mul_(-2.0)  # an optimizer step or load_state_dict: the version changes
        second = linear(x, w, b)
    assert torch.allclose(second, F.linear(x, w, b), atol=1e-5)
    assert not torch.allclose(first, second)  # positive control: the update was seen
    if _fused._REORDER is not None:
        before = len(_fused._PACKED)
        del w
        gc.collect()
        assert len(_fused._PACKED) == before - 1  # the packed copy goes with its weight


def test_a_weight_made_under_inference_mode_is_used_as_it_is_and_follows_changes() -> None:
    """An inference tensor has no version counter (reading it raised), so its changes
    in place (allowed under inference_mode) could not be seen in a packed copy."""
    with torch.inference_mode():
        x, w, b = torch.randn(16, 32), torch.randn(8, 32), torch.randn(8)
        first = linear(x, w, b)
        w.mul_(-2.0)
        second = linear(x, w, b)
        want = F.linear(x, w, b)
    assert torch.allclose(second, want, atol=1e-5)
    assert not torch.allclose(first, second)  # positive control: the change was seen


def test_a_new_storage_is_seen_and_single_data_writes_are_dropped_on_request() -> None:
    """``vector_to_parameters`` (``param.data = t``: a new storage, the same version) is
    seen; a write through ``.data`` of one entry off the sample is seen only after
    :func:`forget_packed` (the documented limit)."""
    from torch.nn.utils import parameters_to_vector, vector_to_parameters

    from attnlab.nn import MultiHeadAttention, forget_packed

    torch.manual_seed(0)
    m, x = MultiHeadAttention(64, 4).eval(), torch.randn(2, 50, 64)

    def unfused() -> torch.Tensor:  # autograd on: F.linear, never a packed weight
        with torch.enable_grad():
            return m(x.clone().requires_grad_()).detach()

    with torch.no_grad():
        before = m(x)
        vector_to_parameters(parameters_to_vector(m.parameters()) * 1.5, m.parameters())
        assert (m(x) - unfused()).abs().max() < 1e-5
        assert (m(x) - before).abs().max() > 0.1  # positive control: the weights changed
        m.out_proj.weight.data[0, 1] = 50.0  # entry 1: not one of every 61st
        assert (m(x) - unfused()).abs().max() > 0.1  # missed by the sample
        forget_packed()
        assert (m(x) - unfused()).abs().max() < 1e-5


def _sgd(ff: torch.nn.Module, x: torch.Tensor) -> None:
    """Three steps of the tutorials' loop, ``p.data -= lr * p.grad``, each followed by an
    evaluation under ``no_grad`` (which packs the weights of that step)."""
    for _ in range(3):
        ff(x).square().mean().backward()
        for p in ff.parameters():
            assert p.grad is not None
            p.data -= 0.5 * p.grad
            p.grad = None
        with torch.no_grad():
            ff(x)


def _vector(ff: torch.nn.Module, x: torch.Tensor) -> None:
    """``vector_to_parameters`` (the parameters become views of one vector, through
    ``param.data``), an evaluation under ``no_grad`` (which packs them), then a write
    into the vector: no parameter's version changes."""
    from torch.nn.utils import parameters_to_vector, vector_to_parameters

    vec = parameters_to_vector(ff.parameters())
    vector_to_parameters(vec, ff.parameters())
    with torch.no_grad():
        ff(x)
        vec.mul_(2.0)


_DATA_WRITES = {
    "mul_": lambda ff, x: [p.data.mul_(2.0) for p in ff.parameters()],
    "add_": lambda ff, x: [p.data.add_(0.1 * torch.randn_like(p)) for p in ff.parameters()],
    "sgd": _sgd,
    "copy_": lambda ff, x: [
        p.data.copy_(q)
        for p, q in zip(ff.parameters(), type(ff)(128, 1024).parameters(), strict=True)
    ],
    "row": lambda ff, x: ff.linear1.weight.data[7].mul_(-3.0),
    "column": lambda ff, x: ff.linear1.weight.data[:, 5].fill_(2.0),
    "vector": _vector,
}


@pytest.mark.parametrize("write", list(_DATA_WRITES))
def test_a_write_through_data_is_seen(write: str) -> None:
    """A write in place through ``.data`` bumps no version counter: a ``no_grad`` forward
    after one used the packed weights of before it (FeedForward 128 -> 1024, every entry
    plus 0.1 noise: 8.9 off the grad-enabled forward). The sample kept at packing sees it."""
    from attnlab.nn import FeedForward

    torch.manual_seed(0)
    ff, x = FeedForward(128, 1024).eval(), torch.randn(2, 16, 128)  # 2**17 entries, K 128
    with torch.no_grad():
        before = ff(x)  # packs linear1.weight
    _DATA_WRITES[write](ff, x)
    with torch.no_grad():
        after = ff(x)
    truth = ff(x).detach()  # autograd on: F.linear of the weights as they are now
    assert (truth - before).abs().max() > 1e-3  # positive control: the write changed them
    assert (after - truth).abs().max() < 1e-5


@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("rows", [1, 37, 640])
def test_residual_is_added_as_torch_adds_it(
    rows: int, fold: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_fused, "fuse_activation", lambda: (fold, "test"))
    x, w, b, r = torch.randn(rows, 48), torch.randn(24, 48), torch.randn(24), torch.randn(rows, 24)
    with torch.no_grad():
        got = linear(x, w, b, residual=r)
        strided = linear(x, w, b, residual=torch.randn(24, rows).T)  # not oneDNN's: unfused
    want = F.linear(x, w, b) + r
    assert torch.allclose(got, want, atol=1e-5)
    assert strided.shape == want.shape
    with pytest.raises(ValueError, match="residual only without an activation"):
        linear(x, w, b, "gelu", residual=r)


@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh"])
def test_feed_forward_in_row_blocks_equals_one_pass(activation: str) -> None:
    lin1, lin2 = torch.nn.Linear(16, 64), torch.nn.Linear(64, 16)
    x, res = torch.randn(3, 37, 16), torch.randn(3, 37, 16)
    want = res + lin2(_fused._activate(lin1(x), activation))
    with torch.no_grad():
        whole = _fused.feed_forward(x, lin1, lin2, activation, res, rows=1000)
        blocks = _fused.feed_forward(x, lin1, lin2, activation, res, rows=25)  # 5 of 23 rows
    assert blocks.shape == want.shape
    assert torch.allclose(whole, want, atol=1e-5)
    assert torch.allclose(blocks, want, atol=1e-5)
    # with autograd the plain path runs, and gradients reach the weights
    out = _fused.feed_forward(x, lin1, lin2, activation, res, rows=25)
    out.sum().backward()
    assert lin1.weight.grad is not None and torch.allclose(out, want, atol=1e-5)


def test_encoder_layer_folds_residuals_only_without_hooks() -> None:
    from attnlab.nn import EncoderLayer, LayerConfig

    torch.manual_seed(0)
    layer = EncoderLayer(LayerConfig(32, 4, 64, dropout=0.1, activation="gelu")).eval()
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        fused = layer(x)
        seen: list[torch.Tensor] = []
        hooks = [
            layer.ff.register_forward_hook(lambda m, i, o: seen.append(o)),
            layer.self_attn.register_forward_hook(lambda m, i, o: seen.append(o)),
        ]
        plain = layer(x)
        for h in hooks:
            h.remove()
    assert torch.allclose(fused, plain, atol=1e-6)
    # hooked sub-layers report their own outputs, without the residual
    a = layer.self_attn(x)
    assert torch.allclose(seen[0], a, atol=1e-6)
    assert torch.allclose(seen[1], layer.ff(layer.norm1(x + a)), atol=1e-6)


def test_a_weight_cast_away_and_back_is_packed_again() -> None:
    """``.to(bfloat16).float()`` gives a weight new storage with the same version, often
    at the freed address: the packing of the weight before the rounding was used (6 of 20
    layers, outputs up to 2e-3 off the weights they held)."""
    from attnlab.nn import MultiHeadAttention

    stale = 0
    for seed in range(20):
        torch.manual_seed(seed)
        mha = MultiHeadAttention(16, 4).eval()
        x = torch.randn(1, 5, 16)
        with torch.no_grad():
            mha(x)  # packs the weights
            mha.to(torch.bfloat16).float()
            got = mha(x)
            _fused.forget_packed()
            stale += not torch.equal(got, mha(x))
    assert stale == 0


@pytest.mark.parametrize("kind", ["Adam", "AdamW", "Adagrad"])
def test_a_fused_optimizer_step_is_seen(kind: str) -> None:
    """torch's fused CPU optimizers write the parameters without bumping their version
    counter: a ``no_grad`` forward after a step used the packed weights of before it
    (FeedForward 128 -> 1024, Adam fused: 0.85 off the grad-enabled forward)."""
    from attnlab.nn import FeedForward

    torch.manual_seed(0)
    ff, x = FeedForward(128, 1024).eval(), torch.randn(2, 16, 128)  # 2**17 entries, K 128
    with torch.no_grad():
        before = ff(x)  # packs linear1.weight
    opt = getattr(torch.optim, kind)(ff.parameters(), lr=1e-2, fused=True)
    ff(x).square().mean().backward()
    version = ff.linear1.weight._version
    opt.step()
    with torch.no_grad():
        after = ff(x)
    truth = ff(x).detach()  # autograd on: F.linear of the weights as they are now
    assert ff.linear1.weight._version == version  # what hid the step from the packing
    assert (truth - before).abs().max() > 0.05  # positive control: the step changed them
    assert (after - truth).abs().max() < 1e-5


def test_a_packed_weight_can_be_swapped_and_its_packing_follows() -> None:
    """The cache held a weakref to each packed weight, and torch swaps no tensor that has
    one: after a ``no_grad`` forward, ``load_state_dict`` and ``.double()`` under
    ``torch.__future__.set_swap_module_params_on_conversion(True)``, and
    ``torch.utils.swap_tensors``, raised RuntimeError. They swap; the next forward uses
    the weights swapped in, and a packing goes when its weight's storage is freed."""
    from attnlab.nn import FeedForward

    torch.manual_seed(0)
    ff, x = FeedForward(128, 1024).eval(), torch.randn(2, 16, 128)
    w = ff.linear1.weight

    def check() -> torch.Tensor:  # the fused forward against autograd's F.linear
        with torch.no_grad():
            got = ff(x)
        assert (got - ff(x).detach()).abs().max() < 1e-5
        return got

    before = check()  # packs linear1.weight
    swapping = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        ff.load_state_dict(FeedForward(128, 1024).state_dict())
        loaded = check()
        ff.double().float()
        assert torch.equal(check(), loaded)
        torch.utils.swap_tensors(w, torch.nn.Parameter(-w.detach()))
        assert (check() - loaded).abs().max() > 0.1  # positive control: the swap was seen
        key = _fused._key(w)
        assert key in _fused._PACKED or _fused._REORDER is None
        ff.double()  # for good: the float32 storage is freed, and its packing with it
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swapping)
    assert ff.linear1.weight is w and w.dtype == torch.float64  # swapped, not replaced
    assert (loaded - before).abs().max() > 0.1
    gc.collect()
    assert key not in _fused._PACKED


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm", "orthogonal"])
def test_a_parametrized_linear_is_called_as_a_module(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A parametrized ``nn.Linear``'s weight is a new tensor at each access: it took the
    fused path and was packed anew at every call (505 packs in 505 calls, 1.6-5.5x slower
    than the module's own call). It is called as a module, and packs nothing."""
    from torch.nn.utils import parametrizations

    from attnlab.nn._fused import module_linear

    if _fused._REORDER is None:
        pytest.skip("this torch has no oneDNN weight packing")
    packs: list[int] = []
    real = _fused._REORDER
    monkeypatch.setattr(_fused, "_REORDER", lambda w, rows: packs.append(rows) or real(w, rows))
    torch.manual_seed(0)
    plain = torch.nn.Linear(32, 48)
    made = getattr(parametrizations, kind)(torch.nn.Linear(32, 48)).eval()
    x = torch.randn(20, 32)
    with torch.no_grad():
        for _ in range(3):
            module_linear(plain, x, "gelu")
        assert len(packs) == 1  # positive control: a plain linear packs once
        for _ in range(3):
            got = module_linear(made, x, "gelu")
            assert torch.allclose(got, F.gelu(made(x)), atol=1e-5)
    assert len(packs) == 1
