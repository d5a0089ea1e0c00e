"""A mask or bias given as a tensor meets each call's device as it evaluates: the tensor
was copied there on every evaluation (on CUDA a host-device copy from pageable memory, a
sync, per layer and decoding step). The ``meta`` device stands for a GPU here: one copy
while the tensor is the same and unchanged, none kept for a tensor that requires grad.
"""

from __future__ import annotations

import copy
import gc
import pickle
import weakref
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import attnlab
from attnlab import bias, masks
from attnlab.engines._versions import held_tensors, versions

META = torch.device("meta")
B, H, L, E = 2, 2, 5, 4


def _copies_of(src: Tensor, monkeypatch: pytest.MonkeyPatch) -> list[list[float]]:
    """The values of each copy of ``src`` (or a view of it) made on the meta device."""
    seen: list[list[float]] = []
    real, storage = torch.Tensor.to, src.untyped_storage().data_ptr()

    def to(self: Tensor, *args: object, **kwargs: object) -> Tensor:
        out = real(self, *args, **kwargs)
        if out.is_meta and not self.is_meta and self.untyped_storage().data_ptr() == storage:
            seen.append(self.detach().double().flatten().tolist())
        return out

    monkeypatch.setattr(torch.Tensor, "to", to)
    return seen


def _qkv(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64) -> Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, B, H, L, E, generator=g, dtype=dtype).to(device)  # (3, B, H, L, E)


def _user_mask() -> Tensor:
    m = torch.rand(H, L, L, generator=torch.Generator().manual_seed(1)) > 0.4  # (H, L, L)
    return m | torch.eye(L, dtype=torch.bool)  # every row sees a key


def _user_bias() -> Tensor:
    return torch.randn(B, 1, L, L, generator=torch.Generator().manual_seed(2))  # (B, 1, L, L)


def _call(engine: str, device: torch.device | str, **kw: object) -> Tensor:
    q, k, v = _qkv(device)
    return attnlab.attention(q, k, v, engine=engine, **kw)  # type: ignore[arg-type]


def _reference(mask: Tensor | None = None, bias_t: Tensor | None = None) -> Tensor:
    """A fresh mask or bias of these values, in fp64 on the CPU."""
    kw = {"mask": None if mask is None else masks.tensor(mask.clone())}
    kw["bias"] = None if bias_t is None else bias.tensor(bias_t.detach().double().clone())
    return _call("reference", "cpu", **kw)


@pytest.mark.parametrize("engine", ["reference", "sdpa"])
@pytest.mark.parametrize("kind", ["mask", "bias"])
def test_a_tensor_is_copied_once_per_device_while_unchanged(
    monkeypatch: pytest.MonkeyPatch, engine: str, kind: str
) -> None:
    t = _user_mask() if kind == "mask" else _user_bias()
    arg: dict[str, object] = {kind: masks.tensor(t) if kind == "mask" else bias.tensor(t)}
    seen = _copies_of(t, monkeypatch)
    for _ in range(3):
        assert _call(engine, META, **arg).is_meta
    assert len(seen) == 1  # (each call copied it: 3)
    if kind == "mask":
        t[0, 0, 1] = ~t[0, 0, 1]  # in place: copied again, with the new values
    else:
        t.add_(0)
    for _ in range(2):
        _call(engine, META, **arg)
    assert len(seen) == 2 and seen[1] == t.double().flatten().tolist()
    want = _reference(**{"mask" if kind == "mask" else "bias_t": t})
    torch.testing.assert_close(_call(engine, "cpu", **arg), want, rtol=0, atol=1e-12)


def _reaches(out: Tensor, leaf: Tensor) -> bool:
    """Whether ``out``'s autograd graph ends in ``leaf``'s gradient."""
    stack, seen = [out.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if getattr(fn, "variable", None) is leaf:
            return True
        stack.extend(f for f, _ in fn.next_functions)
    return False


def test_a_bias_that_requires_grad_is_copied_on_every_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    w = _user_bias().requires_grad_()
    b = bias.tensor(w)
    seen = _copies_of(w, monkeypatch)
    outs = [_call("reference", META, bias=b) for _ in range(2)]
    assert len(seen) == 2 and all(_reaches(o, w) for o in outs)
    monkeypatch.undo()
    # on the CPU, two calls with backward: the leaf's gradient is the fp64 reference's
    wd = w.detach().double().requires_grad_()
    for _ in range(2):
        _call("sdpa", "cpu", bias=bias.tensor(wd)).square().sum().backward()
    for _ in range(2):
        _call("reference", "cpu", bias=b).double().square().sum().backward()
    assert w.grad is not None and wd.grad is not None
    torch.testing.assert_close(w.grad.double(), wd.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_a_kept_copy_follows_its_tensor_and_grads_reach_the_leaf() -> None:
    t, w = _user_bias(), _user_bias().mul(0.5).requires_grad_()
    m, b, g = masks.tensor(_user_mask()), bias.tensor(t), bias.tensor(w)
    for _ in range(2):
        got = _call("sdpa", "cuda", mask=m, bias=b)
    torch.testing.assert_close(got.cpu(), _reference(m.t[0], t), rtol=0, atol=1e-12)
    t.mul_(2)
    m.t[0, 0, 0, 1] = ~m.t[0, 0, 0, 1]
    got = _call("sdpa", "cuda", mask=m, bias=b)
    torch.testing.assert_close(got.cpu(), _reference(m.t[0], t), rtol=0, atol=1e-12)
    wd = w.detach().double().requires_grad_()
    for _ in range(2):
        _call("sdpa", "cuda", bias=g).square().sum().backward()
        _call("reference", "cpu", bias=bias.tensor(wd)).square().sum().backward()
    assert w.grad is not None and wd.grad is not None
    torch.testing.assert_close(w.grad.double(), wd.grad, rtol=1e-5, atol=1e-5)


def test_a_frozen_parameter_converted_by_its_module_is_copied_again() -> None:
    p = nn.Parameter(_user_bias(), requires_grad=False)
    b = bias.tensor(p)
    assert _call("reference", META, bias=b).dtype == torch.float64
    assert b._device_copies.on("values", p, META) is b._device_copies.on("values", p, META)
    kept = b._device_copies.on("values", p, META)
    b.double()  # p.data = a float64 tensor: the version is the same, the storage is not
    assert b.values is p and p.dtype == torch.float64
    assert b._device_copies.on("values", p, META).dtype == torch.float64 is not kept.dtype


def _filled(kind: str) -> tuple[object, Callable[[object], Tensor]]:
    """A mask or bias whose copy on the meta device is kept, and its CPU output."""
    if kind == "mask":
        m = masks.tensor(_user_mask())
        m.dense(L, L, heads=H, device="meta")
        return m, lambda x: _call("reference", "cpu", mask=x)
    b = bias.tensor(_user_bias())
    _call("reference", META, bias=b)
    return b, lambda x: _call("reference", "cpu", bias=x)


@pytest.mark.parametrize("kind", ["mask", "bias", "parameter"])
def test_kept_copies_are_no_part_of_a_mask_or_bias(kind: str) -> None:
    """Deep copies, pickles, state dicts and what engines key plans on see the user's
    tensor only."""
    x, out = _filled("bias" if kind == "parameter" else kind)
    if kind == "parameter":
        x = bias.tensor(nn.Parameter(x.values.clone()))  # type: ignore[union-attr]
        _call("reference", META, bias=x)  # (requires grad: nothing kept)
    want, held, key = out(x), held_tensors(x), versions(x)
    assert [t is u for t, u in zip(held_tensors(x), held, strict=True)] == [True] * len(held)
    assert versions(x) == key
    for other in (pickle.loads(pickle.dumps(x)), copy.deepcopy(x)):
        kept = vars(other).get("_copies", vars(other).get("_device_copies"))
        assert repr(kept) == "DeviceCopies(0 kept)"
        torch.testing.assert_close(out(other), want, rtol=0, atol=0)
    if isinstance(x, nn.Module):
        fresh = bias.tensor(x.values)  # type: ignore[arg-type]
        assert list(x.state_dict()) == list(fresh.state_dict())
        assert list(x.state_dict()) == (["values"] if kind == "parameter" else [])


def test_a_tensor_on_the_meta_device_read_elsewhere_is_still_refused() -> None:
    m, b = masks.tensor(_user_mask().to("meta")), bias.tensor(_user_bias().to("meta"))
    with pytest.raises(ValueError, match="mask tensor is on the meta device"):
        m.dense(L, L, heads=H, device="cpu")
    with pytest.raises(ValueError, match="bias tensor is on the meta device"):
        _call("reference", "cpu", bias=b)


def test_a_bias_moved_to_the_device_drops_the_copy_kept_there() -> None:
    """After ``module.to(device)`` the bias's values are on the device, so the copy kept
    for that device was never read again, nor replaced: it held the old source on the
    host and a second copy on the device (2 GiB each for a 32 x 4096^2 float32 bias)."""
    b = bias.tensor(torch.randn(4, 16, 16))
    source = weakref.ref(b.values)
    q = torch.randn(1, 4, 16, 8, device="meta")
    attnlab.attention(q, q, q, bias=b, engine="reference")
    b.to("meta")
    attnlab.attention(q, q, q, bias=b, engine="reference")
    gc.collect()
    assert source() is None, "the host tensor the bias moved away from is still held"
