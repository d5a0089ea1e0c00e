"""Linear layers at inference through oneDNN's fused CPU kernel: matmul, bias and
activation in one pass.

On CPU, in float32, when no gradient is needed, ``linear(x, w, b, "gelu")`` runs
``torch.ops.mkldnn._linear_pointwise`` (the kernel torch's own compiler emits for this
pattern); everywhere else it is ``F.linear`` and the activation. Both compute the same
function; the fused kernel saves the bias copy and the activation's extra pass over the
output, and its matmul is faster than MKL's on small inner dimensions. Weights are packed
into oneDNN's blocked layout once (and again only when they change). On CPUs without
AVX-512 the activation runs as torch's own pass after the product
(:func:`attnlab._cpu.fuse_activation` says why); ReLU does everywhere (oneDNN's maps NaN
to 0, torch's keeps it).

Example:
    >>> import torch
    >>> x, w, b = torch.randn(5, 16), torch.randn(8, 16), torch.randn(8)
    >>> with torch.no_grad():
    ...     y = linear(x, w, b, "gelu")
    >>> torch.allclose(y, torch.nn.functional.gelu(x @ w.T + b), atol=1e-5)
    True
"""

from __future__ import annotations

import functools
import weakref
from typing import Any, NamedTuple, TypeGuard

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab._cpu import fuse_activation
from attnlab._eager import compiling, vmapping

__all__ = ["forget_packed", "linear", "module_linear"]

_POINTWISE: Any = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
_BINARY: Any = getattr(_POINTWISE, "binary", None)  # the product plus a tensor, fused
_REORDER: Any = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None)
# attnlab activation -> (oneDNN post-op, its algorithm). Not ReLU: oneDNN's gives 0 for
# NaN (torch's keeps it: a NaN weight gave finite outputs at inference only), and torch's
# in-place pass after the product cost the same here
_POST_OPS = {None: ("none", ""), "gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh")}


#: the fused kernel from this many rows and weight entries on; below, ``F.linear`` was
#: faster: 1.6-8x for 64 -> 192 at every row count up to 128, 1.3-3x at 1-8 rows up to
#: 512 -> 2048 (a decoding step's single row: 22 against 13 us at 256 -> 768), on both
#: AVX512-b and AVX2 (forced); from 16 rows on weights of 2**17 entries and more tie or
#: gain (1.0-2.1x)
FUSE_ROWS, FUSE_WEIGHT = 16, 1 << 17
#: the fused kernel only up to this inner size K: up to 192 its products equal
#: ``F.linear``'s bit for bit; from 256 on (AMD EPYC with AVX-512, torch 2.13) oneDNN
#: sums K in one long run where MKL sums blocks, and its error against float64 was
#: 1.7-2.7x F.linear's at K=256-768 and 3.4-4.8x at 1536 (MiniLM's 1536 -> 384), past the
#: 2x rule. Summing 192-wide slices of K in oneDNN's epilogue kept the rule (1.00x) but
#: ran at F.linear's speed. The cost: MiniLM encoded 400 texts in 6.31 s, against 5.15 s
#: with the long fused products (same CPU, 2 threads)
FUSE_INNER = 192


def _fusable(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """CPU float32 without autograd or autocast, and the op is available, from
    :data:`FUSE_ROWS` rows and :data:`FUSE_WEIGHT` weight entries on, up to an inner
    size of :data:`FUSE_INNER`; not while
    torch.compile traces (inductor fuses linears itself, and failed to lower this op on
    the packed weight), nor under torch.func.vmap (no batching rule: torch warned at
    each call and looped over the items)."""
    return (
        _POINTWISE is not None
        and x.dim() >= 2
        and 0 < x.shape[-1] <= FUSE_INNER
        and x.numel() >= FUSE_ROWS * x.shape[-1]  # (an empty batch: reshape failed)
        and weight.numel() >= FUSE_WEIGHT
        and not compiling()
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and not (
            torch.is_grad_enabled()
            and any(t is not None and t.requires_grad for t in (x, weight, bias))
        )
        and torch.backends.mkldnn.is_available()
        and not vmapping()  # last: the cheap checks decide most calls
    )


def linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    activation: str | None = None,
    *,
    residual: Tensor | None = None,
) -> Tensor:
    """``activation(x @ weight.T + bias)`` for ``x (..., K)``, ``weight (N, K)`` -> ``(..., N)``.

    ``activation`` is None, ``"relu"``, ``"gelu"`` or ``"gelu_tanh"``. ``residual`` (the
    output's shape, no activation) is added to the result: ``residual + x @ weight.T +
    bias``, in the product's epilogue where it is fused (the same sum, without a pass of
    its own or a second output).
    """
    if residual is not None and activation is not None:
        raise ValueError("linear adds a residual only without an activation")
    if _fusable(x, weight, bias):
        fold = activation is None or (activation != "relu" and fuse_activation()[0])
        op, algorithm = _POST_OPS[activation if fold else None]
        flat = x.reshape(-1, x.shape[-1])  # (M, K)
        shape = (*x.shape[:-1], weight.shape[0])
        packed = _packed(weight, flat.shape[0])
        if residual is not None and _BINARY is not None and _addable(residual, shape):
            out = _BINARY(flat, residual.reshape(flat.shape[0], -1), packed, bias, "add")
            return out.view(shape)  # (..., N)
        out = _POINTWISE(flat, packed, bias, op, [], algorithm).view(shape)  # (..., N)
        if residual is not None:
            return out.add_(residual)  # residual + out: the same sum, in place
        return out if fold else _activate(out, activation, inplace=True)  # out is ours
    out = _activate(F.linear(x, weight, bias), activation, inplace=True)
    return out if residual is None else out + residual


def _addable(residual: Tensor, shape: tuple[int, ...]) -> bool:
    """oneDNN's binary add takes a contiguous float32 tensor of the output's shape."""
    return (
        tuple(residual.shape) == shape
        and residual.dtype == torch.float32
        and residual.device.type == "cpu"
        and residual.is_contiguous()
        and not residual.requires_grad
    )


class _Packing(NamedTuple):
    """A weight's packed copy and what tells whether the weight changed since."""

    storage: weakref.ref[torch.UntypedStorage]  # the weight's (the entry goes with it)
    version: int  # the weight's version when packed
    packed: Tensor  # oneDNN's blocked copy
    step: int  # the sample's stride (see _sample)
    then: Tensor  # the sampled entries' bits when packed


# (id of the weight's storage, the weight's address, its shape) -> its packing: no
# reference to the weight itself, as a weakref to a tensor forbids swapping it
# (``torch.utils.swap_tensors``; ``module.double()`` and ``load_state_dict`` under
# ``torch.__future__.set_swap_module_params_on_conversion(True)``)
_PACKED: dict[tuple[int, int, torch.Size], _Packing] = {}


def _key(weight: Tensor) -> tuple[int, int, torch.Size]:
    """``weight``'s place in :data:`_PACKED`: where it lies, and its shape."""
    return id(weight.untyped_storage()), weight.data_ptr(), weight.shape


#: a packed weight's every ``SAMPLE_STRIDE``-th entry is kept at packing and compared at
#: each use, so that a write through ``.data`` (which bumps no version) is seen: prime, so
#: the sample visits every column (and every row of a weight 67 or more wide). The
#: compare took 2-3 us a call at 2**17 entries, and making the sample's view anew 2-3 us
#: more (see _sample): 5-7% of the smallest fused product (16 rows: 78-90 us); a float
#: sum of the whole weight (blind to changes under its rounding) took 7 us, 29 us at
#: 3072 x 192
SAMPLE_STRIDE = 61


def _stride(weight: Tensor) -> int:
    """The sample's stride for ``weight (N, K)``: :data:`SAMPLE_STRIDE`, or 67 where that
    divides ``K`` (61, 122, 183), so the sample still visits every column."""
    return SAMPLE_STRIDE + 6 * (weight.shape[1] % SAMPLE_STRIDE == 0)


def _sample(weight: Tensor, step: int) -> Tensor:
    """A view of every ``step``-th entry of a contiguous ``weight``, as int32 (bit for bit:
    a NaN equals itself). Made anew at each use: a view kept would keep the weight's
    storage, and with it the packing, alive after the weight is freed."""
    return weight.as_strided(((weight.numel() - 1) // step + 1,), (step,)).view(torch.int32)


def _packed(weight: Tensor, rows: int) -> Tensor:
    """``weight (N, K)`` in oneDNN's own blocked layout, packed once and reused while the
    weight is unchanged: each call then skips the reorder oneDNN would otherwise make of
    a plain weight (7-10% of a MiniLM-sized linear). The result is the same; a weight that
    cannot be packed is used as it is.

    "Unchanged" is the weight's storage (the same object, still alive: ``param.data = t``,
    ``vector_to_parameters``, casts, a swap of tensors give it another; a cast away and
    back got new storage at the freed address, so the address alone did not tell), its
    address and shape in that storage, its version counter (every in-place op on it,
    optimizer steps and ``load_state_dict`` included; a step of any optimizer drops its
    parameters' copies, as torch's fused ones bump no version) and a sample of its
    entries, one in :data:`SAMPLE_STRIDE` (61) in every column, compared bit for bit. A
    write in place through ``param.data`` bypasses the version; the sample sees it when
    it changes any sampled entry (``p.data.mul_(2)``, ``p.data -= lr * p.grad``,
    ``p.data.copy_(other)``, a row, a column, a random 1% of the entries, a write into
    the vector that ``vector_to_parameters`` made them views of), but not a write of a
    few single entries that misses it (``p.data[3, 5] = 0``: one chance in 61 to be
    seen): :func:`forget_packed` drops the copies after one. A weight made under
    ``torch.inference_mode`` has no version counter, so it is used as it is.

    The cache holds no reference to the weight (a weakref would forbid swapping it): it is
    keyed by where the weight lies, so a new tensor on the same place (a view made at
    each call) finds its packing, and an entry goes when its storage is freed (a weight
    freed while another tensor views its storage keeps its packing until then)."""
    if _REORDER is None or weight.dim() != 2 or not weight.is_contiguous():
        return weight
    if weight.is_inference():  # no version to tell a change by
        return weight
    storage = weight.untyped_storage()
    key = (id(storage), weight.data_ptr(), weight.shape)
    got = _PACKED.get(key)
    if (
        got is not None
        and got.storage() is storage
        and got.version == weight._version
        and torch.equal(_sample(weight, got.step), got.then)  # a write through .data
    ):
        return got.packed
    # what the packing is checked against, read before it: a write that another thread
    # makes during the reorder then tells at the next call (read after, it was taken for
    # the packed values: a stale copy for good)
    version, step = weight._version, _stride(weight)
    then = _sample(weight, step).clone()
    try:
        packed = _REORDER(weight.detach(), rows)
    except RuntimeError:
        return weight
    _watch_optimizers()
    ref = weakref.ref(storage, functools.partial(_forget, key))
    _PACKED[key] = _Packing(ref, version, packed, step, then)
    return packed


def forget_packed() -> None:
    """Drop every packed copy of a weight, so the next inference call packs the weights
    as they are now: needed only after a write in place through ``.data`` that changes
    a few single entries (``w.data[3, 5] = 0``), which neither the version counter nor,
    most likely, the sample that :func:`_packed` compares sees.

    Example:
        >>> forget_packed()
    """
    _PACKED.clear()


def _forget(key: tuple[int, int, torch.Size], ref: object) -> None:
    """Drop the packed copy of a weight whose storage was freed (unless the entry is
    another's since)."""
    got = _PACKED.get(key)
    if got is not None and got.storage is ref:
        del _PACKED[key]


@functools.cache
def _watch_optimizers() -> None:
    """Once, at the first packing: after any optimizer's step, drop the packed copies of
    its parameters. torch's fused CPU optimizers (``Adam``/``AdamW``/``Adagrad`` with
    ``fused=True``) write them in place without bumping their version counter: a
    ``no_grad`` forward after a step used the weights of before it (0.85 off)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    register_optimizer_step_post_hook(_stepped)


def _stepped(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
    for group in optimizer.param_groups:
        for p in group["params"]:
            try:
                _PACKED.pop(_key(p), None)
            except (RuntimeError, NotImplementedError):  # no storage (sparse): never packed
                continue


def _activate(y: Tensor, activation: str | None, *, inplace: bool = False) -> Tensor:
    """``activation(y)``; ``inplace`` (``y`` is a fresh output nobody else holds, and no
    gradient flows through it) overwrites ``y`` instead of allocating a second tensor."""
    inplace = inplace and not (torch.is_grad_enabled() and y.requires_grad)
    if activation == "relu":
        return F.relu(y, inplace=inplace)
    if activation is not None:
        approximate = "tanh" if activation == "gelu_tanh" else "none"
        if inplace and _GELU_ is not None:
            return _GELU_(y, approximate=approximate)
        return F.gelu(y, approximate=approximate)
    return y


_GELU_: Any = getattr(torch.ops.aten, "gelu_", None)


def module_linear(
    module: nn.Module,
    x: Tensor,
    activation: str | None = None,
    *,
    residual: Tensor | None = None,
) -> Tensor:
    """``activation(module(x))`` for an ``nn.Linear``, fused when :func:`linear` can be;
    ``residual + module(x)`` with ``residual`` (see :func:`linear`).

    A module that is not a plain ``nn.Linear`` (quantized, swapped) or that carries hooks
    is called as a module, so those keep working.
    """
    if _plain(module):
        return linear(x, module.weight, module.bias, activation, residual=residual)
    out = _activate(module(x), activation)
    return out if residual is None else residual + out


def _plain(module: nn.Module) -> TypeGuard[nn.Linear]:
    """An ``nn.Linear`` whose forward is ``nn.Linear``'s own (the attention's output
    projection only initializes differently; a swapped or quantized module, or one with
    its own forward, is not), without hooks, whose weight is its own parameter. A
    parametrized weight (``torch.nn.utils.parametrize``: ``weight_norm``,
    ``spectral_norm``, ``orthogonal``) is a new tensor at each access: it was packed anew
    at every call, 1.6-5.5x slower than the module's own call."""
    return (
        isinstance(module, nn.Linear)
        and type(module).forward is nn.Linear.forward
        and "weight" in module._parameters
        and plain(module, type(module))
    )


def plain(module: nn.Module, kind: type) -> bool:
    """``module`` is a ``kind`` itself (not a subclass or a swapped module) and carries no
    forward hooks: code may then compute what it computes another way (fused, or with a
    residual folded in) without any hook missing its call."""
    return type(module) is kind and not (module._forward_hooks or module._forward_pre_hooks)


# rows of a feed-forward's input per pass at inference (see feed_forward)
FF_ROWS = 2048


def feed_forward(
    x: Tensor,
    linear1: nn.Linear,
    linear2: nn.Linear,
    activation: str,
    residual: Tensor,
    rows: int | None = None,
) -> Tensor:
    """``residual + linear2(activation(linear1(x)))`` at inference, ``rows`` rows of ``x``
    at a time (default :data:`FF_ROWS`).

    The rows are independent, so each pass computes what one pass over all of ``x``
    would, but the hidden ``(rows, F)`` block is allocated at one modest size instead of
    at the batch's: a hidden block over glibc's 32 MiB mmap ceiling is mapped and
    unmapped anew in every layer and page-faults on every touch (MiniLM's feed-forward at
    6400 rows, forced AVX2: 91.8 ms in one pass, 70.5 ms in 512-row blocks; at 3200 rows
    one pass and blocks tie, and blocks under ~1000 rows are slower). Where the linears
    cannot be fused this is one pass.
    """
    n, d = x.shape[-1], residual.shape[-1]
    flat = x.reshape(-1, n)  # (M, D_in)
    m = flat.shape[0]
    step = rows or FF_ROWS
    if (
        m <= step
        or not (_plain(linear1) and _plain(linear2))
        or not _fusable(flat, linear1.weight, linear1.bias)
        or not _addable(residual, (*x.shape[:-1], d))
    ):
        h = module_linear(linear1, x, activation)
        return module_linear(linear2, h, residual=residual)
    parts = -(-m // step)
    step = -(-m // parts)  # equal passes: no small tail
    res = residual.reshape(m, d)
    out = torch.empty_like(res)  # (M, D)
    for start in range(0, m, step):
        h = linear(flat[start : start + step], linear1.weight, linear1.bias, activation)
        y = linear(h, linear2.weight, linear2.bias, residual=res[start : start + step])
        out[start : start + step] = y
    return out.view(residual.shape)
