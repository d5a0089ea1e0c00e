"""Key/value caches for incremental decoding.

A :class:`KVCache` belongs to one attention layer. Self-attention appends the new step's
keys and values; cross-attention (the decoder's context attention) fills it once with the
projected encoder output and reuses it. A :class:`DecoderCache` holds one pair per
decoder layer and applies beam-search reordering and cropping to all of them.

Keys are stored after RoPE, so a cached key never needs rotating again; the cache length
is the position offset of the next query.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnlab._eager import as_written, compiling
from attnlab._validate import nonnegative_int, positive_int, validate_flag
from attnlab.nn import _cache_state
from attnlab.nn._cache_state import DeviceLike

__all__ = ["DecoderCache", "KVCache"]


class KVCache:
    """Growing ``(B, Hkv, L, E)`` key and value buffers of one attention layer.

    Storage grows by doubling, so appending one step at a time costs amortized O(1)
    copies per step instead of re-concatenating the whole history, in every grad mode.
    Two cases copy more: steps whose ``k`` or ``v`` need a gradient are concatenated (each
    append copies the history, so gradients reach every cached step), and the first append
    after :meth:`crop` under grad mode copies the kept positions once (see there).

    Example:
        >>> import torch
        >>> c = KVCache()
        >>> k, v = c.append(torch.ones(2, 4, 3, 8), torch.ones(2, 4, 3, 8))
        >>> k, v = c.append(torch.ones(2, 4, 1, 8), torch.ones(2, 4, 1, 8))
        >>> c.length, tuple(k.shape)
        (4, (2, 4, 4, 8))
        >>> c.reorder(torch.tensor([1, 1, 0])).batch_size
        3

    ``to()`` moves or casts it with its model (in place, like ``nn.Module.to``);
    ``state_dict()`` is a flat dict of tensors that safetensors saves, so a generation can
    stop and go on later with the same outputs:

        >>> import tempfile, os
        >>> from safetensors.torch import load_file, save_file
        >>> path = os.path.join(tempfile.mkdtemp(), "cache.safetensors")
        >>> save_file(c.to(dtype=torch.float64).state_dict(), path)
        >>> d = KVCache().load_state_dict(load_file(path))
        >>> d.length, d.keys.dtype, torch.equal(d.values, c.values)
        (4, torch.float64, True)
    """

    def __init__(self) -> None:
        self._k: Tensor | None = None  # (B, Hkv, capacity, E)
        self._v: Tensor | None = None  # (B, Hkv, capacity, Ev)
        self._len = 0
        # whether the storage is the cache's own to write into: not after set() (the
        # caller's tensors) or load_state_dict(), nor after a concatenation (autograd's)
        self._owned = False
        # the storage's positions handed out since it was allocated: views of [0, _high)
        # may be saved by a backward, so writes below it copy or bump the version counter
        # (see _write); _high >= _len
        self._high = 0
        # whether an append under grad mode handed views of the storage out since then
        self._lent = False
        self._cross = False  # filled by set() (cross-attention), not by append()

    @property
    def length(self) -> int:
        """Cached positions; the position of the next query."""
        return self._len

    @property
    def batch_size(self) -> int:
        """Batch of the cached tensors (0 when empty)."""
        return 0 if self._k is None else self._k.shape[0]

    @property
    def keys(self) -> Tensor | None:
        """Cached keys ``(B, Hkv, L, E)`` or None when empty."""
        return None if self._k is None else self._k[:, :, : self._len]

    @property
    def values(self) -> Tensor | None:
        """Cached values ``(B, Hkv, L, Ev)`` or None when empty."""
        return None if self._v is None else self._v[:, :, : self._len]

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add ``k (B, Hkv, T, E)`` and ``v (B, Hkv, T, Ev)``; return all cached keys/values.

        The step is written into the cache's storage, which grows by doubling, and views
        of it are returned, in every grad mode. A backward may have saved earlier views
        (through the keys, or only through the queries or a bias): the write lies past
        them and leaves their version counter as it was, so that backward still runs (see
        :meth:`crop` for writes over them). Steps whose ``k`` or ``v`` need a gradient are
        concatenated instead, so gradients flow through every cached step. Compiled, a step
        outside grad mode writes in the graph (a version bump): a backward that saved keys
        handed out outside grad mode then fails loudly; run that step eagerly.

        Example:
            >>> c = KVCache()
            >>> q = torch.ones(1, 1, 1, 2, requires_grad=True)
            >>> for _ in range(2):
            ...     k, v = c.append(torch.ones(1, 1, 1, 2), torch.ones(1, 1, 1, 2))
            ...     loss = (q @ k.transpose(-1, -2)).sum()  # saves k for q's gradient
            >>> loss.backward()
            >>> q.grad.tolist()
            [[[[2.0, 2.0]]]]
        """
        _check_step(self, k, v)
        self._check_kind(cross=False)
        need = self._len + k.shape[2]
        if self._len == 0 and not self.takes(k, v):
            self._k = self._v = None  # emptied (crop(0)): the next step may change its sizes
        grad = torch.is_grad_enabled()
        if grad and (k.requires_grad or v.requires_grad or self._tracked()):
            return self._concat(k, v, need)
        if self._k is None or self._v is None or need > self._k.shape[2] or self._moves(grad):
            self._grow(k, v, need)
        self._write(k, v, need, grad)
        self._lent |= grad
        assert self._k is not None and self._v is not None
        return self._k[:, :, :need], self._v[:, :, :need]

    def takes(self, k: Tensor, v: Tensor) -> bool:
        """Whether the storage can take steps like ``k`` and ``v`` (same batch, heads,
        head sizes, dtype and device; an empty cache takes any)."""
        return _fits(self._k, k) and _fits(self._v, v)

    def set(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Replace the contents by ``k (B, Hkv, L, E)`` and ``v (B, Hkv, L, Ev)``
        (cross-attention's encoder keys)."""
        _check_pair(k, v)  # (3-D keys were taken, with their E as the length)
        self._check_kind(cross=True)
        self._k, self._v, self._len, self._cross = k, v, k.shape[2], True
        self._owned, self._high, self._lent = False, self._len, False
        return k, v

    def _check_kind(self, *, cross: bool) -> None:
        """A cache holds one kind of keys: a call of the other kind on a filled cache is a
        ValueError (a call without ``key`` appended its own keys to the encoder's and
        attended over both). Emptied by ``crop(0)``, it takes either again."""
        if self._len and self._cross != cross:
            had, call = ("cross", "self") if self._cross else ("self", "cross")
            raise ValueError(
                f"cache holds {had}-attention keys, but this is a {call}-attention call "
                f"({'no key given' if call == 'self' else 'a key given'}); give each "
                "attention its own KVCache (for cross-attention, pass key on every call)"
            )
        self._cross = cross

    def crop(self, length: int) -> KVCache:
        """Forget every position from ``length`` on (speculative decoding, retries).

        Outside grad mode, the next appends write over those positions in place: keys and
        values handed out before the crop are views of the same storage and see the new
        steps (``.clone()`` them to keep the old ones). Under grad mode, or once an append
        under grad mode handed out views of the storage, the first append over those
        positions copies the kept ones into new storage, so a backward that saved the old
        keys still finds them.

        Example:
            >>> c = KVCache()
            >>> with torch.no_grad():
            ...     k, _ = c.append(torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2))
            ...     _ = c.crop(1).append(torch.ones(1, 1, 1, 2), torch.ones(1, 1, 1, 2))
            >>> k[0, 0, :, 0].tolist()  # the view from before the crop
            [0.0, 1.0, 0.0]
        """
        length = nonnegative_int("length", length)  # numpy's ints too (they were refused)
        if length > self._len:
            raise ValueError(f"crop length must be an int in [0, {self._len}], got {length!r}")
        self._len = length
        return self

    def reorder(self, index: Tensor) -> KVCache:
        """Select batch rows by ``index (B',)``: beam search keeps the surviving beams."""
        if not isinstance(index, Tensor):  # (an AttributeError; empty caches took it)
            raise TypeError(f"index must be a 1-D integer tensor, got {type(index).__name__}")
        if index.dtype not in (torch.int32, torch.int64) or index.dim() != 1:
            raise TypeError(
                f"index must be a 1-D integer tensor, got {index.dtype} {index.dim()}-D"
            )
        if self._k is None or self._v is None:
            return self
        batch = self._k.shape[0]
        lo, hi = torch.stack(torch.aminmax(index)).tolist() if index.numel() else (0, -1)
        if not (lo >= 0 and hi < batch):  # (one pass over the index, one read back)
            raise ValueError(  # (torch's IndexError from index_select)
                f"index must hold batch rows in [0, {batch}), got {index.tolist()}"
            )
        idx = index.to(self._k.device)
        self._k = self._k.index_select(0, idx)
        self._v = self._v.index_select(0, idx)
        self._owned = not (self._k.requires_grad or self._v.requires_grad)
        self._high, self._lent = self._len, False  # (new storage)
        return self

    def to(self, device: DeviceLike | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """Move the cached keys and values to ``device`` and cast them to the floating-point
        ``dtype``, in place (like ``nn.Module.to``); return the cache. Later steps must come
        in the same dtype and on the same device."""
        old = self._k
        self._k, self._v, self._owned = _cache_state.move(
            self._k, self._v, self._owned, device, dtype
        )
        if self._k is not old:
            self._high, self._lent = self._len, False  # (new storage)
        return self

    def state_dict(self) -> dict[str, Tensor]:
        """The cache as a flat dict of tensors for ``safetensors.torch.save_file``: ``keys``
        ``(B, Hkv, L, E)`` and ``values`` ``(B, Hkv, L, Ev)`` (absent when empty; detached,
        views of the cache's storage where it is already contiguous: clone them to keep
        them across later steps) and ``cross`` (int64 ``(1,)``: 1 for encoder keys)."""
        return _cache_state.layer_state(self.keys, self.values, self._cross)

    def load_state_dict(self, state: dict[str, Tensor]) -> KVCache:
        """Replace the contents by a :meth:`state_dict` (on the state's device, in its
        dtype; the next append copies them into the cache's own storage); return the cache.
        A state with missing or unexpected entries, or keys and values of unequal
        ``B, Hkv, L``, is a ValueError and leaves the cache as it was."""
        self._load(_cache_state.parse_layer(state))
        return self

    def _load(self, layer: _cache_state.Layer) -> None:
        k, v = layer.keys, layer.values
        self._k, self._v, self._cross, self._owned, self._lent = k, v, layer.cross, False, False
        self._len = self._high = 0 if k is None else k.shape[2]

    def _tracked(self) -> bool:
        """Whether the storage is part of an autograd graph (earlier steps' ``k`` or ``v``
        needed a gradient): appends under grad mode go on concatenating."""
        return any(t is not None and t.requires_grad for t in (self._k, self._v))

    def _moves(self, grad: bool) -> bool:
        """Whether this append needs new storage though the step fits: it is not the
        cache's own, it is an inference tensor (a prefill under ``torch.inference_mode``)
        written outside it, or the step would write over views handed out under grad mode
        (after :meth:`crop`), which a backward may have saved: copy on write."""
        frozen = self._k is not None and self._k.is_inference()
        inference = frozen and not torch.is_inference_mode_enabled()
        over_lent = self._len < self._high and (grad or self._lent)
        return not self._owned or inference or over_lent

    def _write(self, k: Tensor, v: Tensor, need: int, grad: bool) -> None:
        """Write the step into positions ``[_len, need)`` of the storage. Over views
        handed out (after :meth:`crop`, outside grad mode): in place, the version counter
        bumped, so a backward that saved them fails loudly. Past them: see
        :func:`_write_past`; torch.compile would turn that write into a copy back into
        the graph input, which bumps the version counter, so where views may be saved
        (grad mode, or views handed out under it) a compiled step writes eagerly."""
        assert self._k is not None and self._v is not None
        a = self._len
        if a < self._high:
            self._k[:, :, a:need] = k  # (B, Hkv, T, E)
            self._v[:, :, a:need] = v  # (B, Hkv, T, Ev)
        else:
            saved = grad or self._lent
            write = _write_eagerly if saved and compiling() else _write_past
            write(self._k, k, a)
            write(self._v, v, a)
        self._len, self._high = need, max(self._high, need)

    def _concat(self, k: Tensor, v: Tensor, need: int) -> tuple[Tensor, Tensor]:
        """Append a step whose ``k`` or ``v`` needs a gradient (or onto keys that do) under
        grad mode: new tensors each step, so the graph reaches every cached step."""
        old_k, old_v = self.keys, self.values
        if self._len == 0 or old_k is None or old_v is None:
            self._k, self._v = k.clone(), v.clone()
        else:
            self._k, self._v = torch.cat((old_k, k), 2), torch.cat((old_v, v), 2)
        self._len = self._high = need
        self._owned, self._lent = not self._tracked(), True
        return self._k, self._v

    def _grow(self, k: Tensor, v: Tensor, need: int) -> None:
        """New storage for ``need`` positions, the kept ones copied: doubling when it
        must grow, the same capacity otherwise (copy on write)."""
        old = 0 if self._k is None else self._k.shape[2]
        cap = max(need, 16, old if need <= old else 2 * old)
        nk = k.new_empty(k.shape[0], k.shape[1], cap, k.shape[3])  # (B, Hkv, cap, E)
        nv = v.new_empty(v.shape[0], v.shape[1], cap, v.shape[3])  # (B, Hkv, cap, Ev)
        if self._k is not None and self._v is not None and self._len:
            nk[:, :, : self._len] = self._k[:, :, : self._len]
            nv[:, :, : self._len] = self._v[:, :, : self._len]
        self._k, self._v, self._owned = nk, nv, True
        self._high, self._lent = self._len, False

    def __repr__(self) -> str:
        shape = None if self._k is None else (*self._k.shape[:2], self._len, self._k.shape[3])
        return f"KVCache(length={self._len}, shape={shape})"


def _write_past(buf: Tensor, x: Tensor, start: int) -> None:
    """Write ``x (B, Hkv, T, E)`` into positions ``[start, start + T)`` of ``buf (B, Hkv,
    capacity, E)``, past every view of ``buf`` handed out, through ``.data``: the same
    memory under a new version counter. ``buf``'s counter, which its views share, stays,
    so a backward that saved a view still runs, and no byte it saved changed.

    Example:
        >>> buf, q = torch.zeros(1, 1, 4, 2), torch.ones(1, 1, 1, 2, requires_grad=True)
        >>> loss = (q @ buf[:, :, :2].transpose(-1, -2)).sum()  # saves the view
        >>> _write_past(buf, torch.ones(1, 1, 2, 2), 2)
        >>> loss.backward()  # (buf[:, :, 2:] = ... fails it: "modified by an inplace")
        >>> buf._version, buf[0, 0, :, 0].tolist()
        (0, [0.0, 0.0, 1.0, 1.0])
    """
    buf.data[:, :, start : start + x.shape[2]] = x


_write_eagerly = as_written("traced, a write into an input is a copy back into all of it")(
    _write_past
)


def _check_pair(k: object, v: object) -> None:
    """``k (B, Hkv, T, E)`` and ``v (B, Hkv, T, Ev)`` floating-point tensors of one dtype on
    one device, with equal ``B, Hkv, T``."""
    if not isinstance(k, Tensor) or not isinstance(v, Tensor):
        raise TypeError(f"k and v must be tensors, got {type(k).__name__}, {type(v).__name__}")
    for name, t in (("k", k), ("v", v)):  # (as to() and load_state_dict() refuse them)
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if k.dtype != v.dtype or k.device != v.device:
        raise ValueError(
            f"k and v must share one dtype and device; got k {k.dtype} on {k.device} and "
            f"v {v.dtype} on {v.device}"
        )
    if k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"k and v must be (B, Hkv, T, E) with equal B, Hkv, T; got {tuple(k.shape)} "
            f"and {tuple(v.shape)}"
        )


def _check_step(cache: KVCache, k: Tensor, v: Tensor) -> None:
    """A step ``cache`` can append: see :func:`_check_pair` and :meth:`KVCache.takes`."""
    _check_pair(k, v)
    old, old_v = cache.keys, cache.values
    if old is None or old_v is None or not cache.length or cache.takes(k, v):
        return
    if old.shape[:2] != k.shape[:2]:
        raise ValueError(
            f"cache holds (B, Hkv)={tuple(old.shape[:2])} but the new step has "
            f"{tuple(k.shape[:2])}; reorder the cache before changing the batch"
        )
    raise ValueError(
        f"cache holds keys of size E={old.shape[3]} and values of Ev={old_v.shape[3]} in "
        f"{old.dtype} on {old.device}, but the new step has E={k.shape[3]}, Ev={v.shape[3]} "
        f"in {k.dtype} on {k.device}"
    )


def _fits(buf: Tensor | None, x: Tensor) -> bool:
    """Whether storage ``buf (B, Hkv, capacity, E)`` can take steps like ``x``."""
    if buf is None:
        return True
    same = buf.shape[:2] == x.shape[:2] and buf.shape[3] == x.shape[3]
    return same and buf.dtype == x.dtype and buf.device == x.device


class DecoderCache:
    """One self-attention and one (optional) cross-attention cache per decoder layer.

    Example:
        >>> import torch
        >>> c = DecoderCache(num_layers=2, cross=True)
        >>> len(c.self_attn), c.length
        (2, 0)

    ``to()``, ``state_dict()`` and ``load_state_dict()`` act on every layer's caches as
    :class:`KVCache`'s do; the state names them ``self_attn.{i}.keys``,
    ``cross_attn.{i}.values``, ... and holds ``num_layers`` and ``has_cross_attn``
    (int64 ``(1,)``), which loading checks against this cache's.

        >>> d = DecoderCache(num_layers=2, cross=True)
        >>> d.load_state_dict(c.to("cpu", torch.float64).state_dict()).length
        0
        >>> try:
        ...     DecoderCache(num_layers=3).load_state_dict(c.state_dict())
        ... except ValueError as e:
        ...     print(str(e).split(": ")[-1])
        make it with DecoderCache(num_layers=2, cross=True)
    """

    def __init__(self, num_layers: int, *, cross: bool = False) -> None:
        num_layers = positive_int("num_layers", num_layers)
        cross = validate_flag("cross", cross)  # ("no" is truthy)
        self.self_attn = [KVCache() for _ in range(num_layers)]
        self.cross_attn: list[KVCache] | None = (
            [KVCache() for _ in range(num_layers)] if cross else None
        )

    @property
    def length(self) -> int:
        """Decoded positions so far (the position offset of the next step)."""
        return self.self_attn[0].length if self.self_attn else 0

    def reorder(self, index: Tensor) -> DecoderCache:
        """Reorder every layer's batch by ``index (B',)`` (beam search)."""
        for c in [*self.self_attn, *(self.cross_attn or [])]:
            c.reorder(index)
        return self

    def crop(self, length: int) -> DecoderCache:
        """Crop the self-attention caches to ``length`` positions."""
        for c in self.self_attn:
            c.crop(length)
        return self

    def _all(self) -> list[KVCache]:
        return [*self.self_attn, *(self.cross_attn or [])]

    def to(
        self, device: DeviceLike | None = None, dtype: torch.dtype | None = None
    ) -> DecoderCache:
        """Move and cast every layer's keys and values in place; return the cache."""
        _cache_state.target(device, dtype)  # (checked once, also when every layer is empty)
        for c in self._all():
            c.to(device, dtype)
        return self

    def state_dict(self) -> dict[str, Tensor]:
        """Every layer's :meth:`KVCache.state_dict` under ``self_attn.{i}.`` and
        ``cross_attn.{i}.``, with ``num_layers`` and ``has_cross_attn``."""
        state = {
            "num_layers": torch.tensor([len(self.self_attn)]),
            "has_cross_attn": torch.tensor([int(self.cross_attn is not None)]),
        }
        kinds = [("self_attn", self.self_attn), ("cross_attn", self.cross_attn or [])]
        for kind, caches in kinds:
            for i, c in enumerate(caches):
                state.update({f"{kind}.{i}.{n}": t for n, t in c.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> DecoderCache:
        """Replace every layer's contents by a :meth:`state_dict` of a cache with as many
        layers, both with or both without cross-attention; return the cache. A mismatch
        is a ValueError naming what the state holds, and leaves the cache as it was."""
        own, cross = _cache_state.parse_decoder(
            state, len(self.self_attn), self.cross_attn is not None
        )
        for c, layer in zip(self._all(), [*own, *(cross or [])], strict=True):
            c._load(layer)
        return self
