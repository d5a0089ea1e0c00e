"""Moving, saving and loading the key/value caches of :mod:`attnlab.nn.cache`.

A state is a flat ``dict[str, Tensor]`` that ``safetensors.torch.save_file`` writes as it
is: the filled keys and values (contiguous, not sharing memory) and the metadata as small
int64 tensors, so nothing needs pickling. Loading checks the whole state before it
changes anything, so a refused state leaves the cache as it was.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from attnlab._validate import float_dtype

DeviceLike = torch.device | str | int


class Layer(NamedTuple):
    """One :class:`~attnlab.nn.KVCache`'s checked state."""

    keys: Tensor | None  # (B, Hkv, L, E)
    values: Tensor | None  # (B, Hkv, L, Ev)
    cross: bool


def target(device: object, dtype: object) -> tuple[torch.device | None, torch.dtype | None]:
    """The checked arguments of ``.to(device, dtype)``."""
    if dtype is not None:
        dtype = float_dtype("dtype", dtype)  # (integer keys would round every score)
    if device is None:
        return None, dtype
    if isinstance(device, bool) or not isinstance(device, DeviceLike):
        raise TypeError(f"device must be a torch.device, str or int, got {type(device).__name__}")
    try:
        return torch.device(device), dtype
    except RuntimeError as e:  # ("gpu", "cuda:x")
        raise ValueError(f"device must name a torch device, got {device!r}: {e}") from None


def move(
    k: Tensor | None, v: Tensor | None, owned: bool, device: object, dtype: object
) -> tuple[Tensor | None, Tensor | None, bool]:
    """``k`` and ``v`` on ``device`` in ``dtype``, and whether the cache owns them: new
    copies are its own unless autograd tracks them; tensors left as they were keep ``owned``."""
    dev, dt = target(device, dtype)
    if k is None or v is None:
        return k, v, owned
    nk, nv = k.to(device=dev, dtype=dt), v.to(device=dev, dtype=dt)  # whole storage
    fresh = nk is not k and nv is not v
    return nk, nv, (owned or fresh) and not (nk.requires_grad or nv.requires_grad)


def layer_state(keys: Tensor | None, values: Tensor | None, cross: bool) -> dict[str, Tensor]:
    """A :class:`KVCache`'s state: ``cross`` (int64 ``(1,)``), and the filled ``keys`` and
    ``values`` unless it is empty."""
    state = {"cross": torch.tensor([int(cross)])}
    if keys is None or values is None or not keys.shape[2]:
        return state
    k, v = keys.detach().contiguous(), values.detach().contiguous()
    if v.untyped_storage().data_ptr() == k.untyped_storage().data_ptr():
        v = v.clone()  # (set(k, k): safetensors refuses tensors that share memory)
    return {**state, "keys": k, "values": v}


def _mapping(state: object, what: str) -> Mapping[str, object]:
    if not isinstance(state, Mapping):
        raise TypeError(
            f"state must be a dict from {what}.state_dict(), got {type(state).__name__}"
        )
    return state


def _exact_keys(state: Mapping[str, object], expected: set[str], where: str) -> None:
    """A ValueError naming the missing and unexpected entries of ``state``."""
    seen = set(state)
    if seen != expected:
        raise ValueError(
            f"{where}: missing {sorted(expected - seen)}, unexpected {sorted(seen - expected)}; "
            f"expected the entries {sorted(expected)}, got {sorted(seen)}"
        )


def _tensor(state: Mapping[str, object], name: str) -> Tensor:
    t = state[name]
    if not isinstance(t, Tensor):
        raise TypeError(f"state[{name!r}] must be a tensor, got {type(t).__name__}")
    return t


def flag(state: Mapping[str, object], name: str, top: int = 1) -> int:
    """The int in ``[0, top]`` that ``state[name]`` holds as one integer (one host read)."""
    t = _tensor(state, name)
    n = int(t.item()) if t.numel() == 1 and not t.dtype.is_floating_point else -1
    if not 0 <= n <= top or t.dtype.is_complex or t.device.type == "meta":
        raise ValueError(
            f"state[{name!r}] must hold one integer in [0, {top}], got {t.dtype} of shape "
            f"{tuple(t.shape)}" + (f" = {n}" if t.numel() == 1 else "")
        )
    return n


def parse_layer(state: object, prefix: str = "") -> Layer:
    """The checked state of one :class:`KVCache`; entries named ``prefix + name``."""
    state = _mapping(state, "KVCache")
    filled = {"keys", "values"} & {n.removeprefix(prefix) for n in state}
    names = {"cross", *(("keys", "values") if filled else ())}  # both, or neither (empty)
    where = f"KVCache state{f' {prefix[:-1]}' if prefix else ''}"
    _exact_keys(state, {prefix + n for n in names}, where)
    cross = bool(flag(state, prefix + "cross"))
    if "keys" not in names:
        return Layer(None, None, cross)
    k, v = _tensor(state, prefix + "keys"), _tensor(state, prefix + "values")
    if k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"{where}: keys and values must be (B, Hkv, L, E) with equal B, Hkv, L; got "
            f"{tuple(k.shape)} and {tuple(v.shape)}"
        )
    if not k.dtype.is_floating_point or k.dtype != v.dtype or k.device != v.device:
        raise ValueError(
            f"{where}: keys and values must be floating-point of one dtype on one device; "
            f"got {k.dtype} on {k.device} and {v.dtype} on {v.device}"
        )
    return Layer(k, v, cross)


def parse_decoder(
    state: object, num_layers: int, cross: bool
) -> tuple[list[Layer], list[Layer] | None]:
    """The checked per-layer states of a :class:`DecoderCache` of ``num_layers`` layers,
    with cross-attention caches if ``cross``."""
    state = _mapping(state, "DecoderCache")
    if _head() - set(state):
        raise ValueError(
            f"DecoderCache state: missing {sorted(_head() - set(state))}; expected a dict "
            f"from DecoderCache.state_dict(), got the entries {sorted(state)[:6]}"
        )
    n, has = flag(state, "num_layers", top=2**31), bool(flag(state, "has_cross_attn"))
    if (n, has) != (num_layers, cross):
        raise ValueError(
            f"DecoderCache state holds {n} layers {'with' if has else 'without'} cross-attention "
            f"caches, but this cache has {num_layers} layers "
            f"{'with' if cross else 'without'}: make it with "
            f"DecoderCache(num_layers={n}, cross={has})"
        )
    kinds = ["self_attn", *(["cross_attn"] if cross else [])]
    prefixes = [f"{kind}.{i}." for kind in kinds for i in range(n)]
    known = {name for name in state if any(name.startswith(p) for p in prefixes)}
    _exact_keys(state, known | _head(), "DecoderCache state")
    layers = [parse_layer({m: state[m] for m in state if m.startswith(p)}, p) for p in prefixes]
    _same_batch_and_length(layers[:n], layers[n:])
    return layers[:n], (layers[n:] if cross else None)


def _head() -> set[str]:
    return {"num_layers", "has_cross_attn"}


def _same_batch_and_length(own: list[Layer], cross: list[Layer]) -> None:
    """The self-attention layers hold one length (the decoder's position offset) and all
    filled layers one batch, as decoding leaves them."""
    lengths = sorted({0 if s.keys is None else s.keys.shape[2] for s in own})
    batches = sorted({s.keys.shape[0] for s in [*own, *cross] if s.keys is not None})
    if len(lengths) > 1 or len(batches) > 1:
        raise ValueError(
            "DecoderCache state: expected one length across the self-attention layers and "
            f"one batch size across the layers, got lengths {lengths} and batch sizes {batches}"
        )
