"""What Hugging Face transformers asks of a mask builder, as attnlab masks.

transformers describes each attention mask as a composed index function
``mask_function(batch_idx, head_idx, q_idx, kv_idx)`` plus a 2-D padding
``attention_mask`` and the query and key offsets of the KV cache. :func:`translate`
recognizes the pieces transformers builds its masks from (causal, bidirectional,
sliding windows, packed sequences, padding, the image blocks of vision-language models,
``and``/``or``, and the windows some models define for themselves, see
:mod:`~attnlab.integrations.hf_overlays`) and turns them into attnlab
masks with exact key intervals, so the blocked engine skips masked-out work and no
``Lq x Lk`` tensor is made; chunked attention (Llama 4) becomes :func:`documents` of the
chunks. A piece it does not recognize (a model's own overlay) is not dropped: the whole
function is then evaluated tile by tile as an attnlab :func:`~attnlab.masks.custom` mask,
which is exact but slower.

Positions: transformers' query ``i`` is at ``q_offset + i`` and key ``j`` at
``kv_offset + j``; attnlab aligns queries bottom-right (row ``i`` at ``i + Lk - Lq``).
The two agree up to a shift that causal and window masks do not see when
``kv_offset + Lk == q_offset + Lq`` (dynamic caches, sliding-window caches, no cache).
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from attnlab._grid import Grid
from attnlab.integrations.hf_keys import KeyValid, padding_mask
from attnlab.integrations.hf_overlays import model_overlay, without_covered
from attnlab.masks import Mask, RowBounds, causal, custom, documents, groups, window
from attnlab.masks.base import And, Or
from attnlab.masks.documents import Documents, Groups
from attnlab.masks.padding import Padding

__all__ = ["FLOOR", "Chunks", "FilledKeys", "KeyValid", "MaskCall", "check_version", "translate"]

HFMaskFn = Callable[..., Tensor]
# before 5.4 transformers called the mask builder as (batch_size, cache_position, kv_length)
FLOOR = (5, 4)


def check_version(version: str) -> None:
    """An ImportError naming ``version`` and the floor when transformers is older than 5.4,
    whose mask calls :class:`MaskCall` does not describe.

    Example:
        >>> check_version("5.4.0.dev0")
    """
    parts = re.match(r"(\d+)\.(\d+)", version)
    if parts is not None and tuple(map(int, parts.groups())) < FLOOR:
        raise ImportError(
            f"attnlab's hf integration needs transformers>=5.4, found {version} (before 5.4 "
            "it calls the mask builder with cache_position); pip install 'transformers>=5.4'"
        )


@dataclass(frozen=True)
class MaskCall:
    """The arguments transformers hands a mask builder (``AttentionMaskInterface``).

    Attributes:
        batch_size, q_length, kv_length: the sizes of the attention call.
        q_offset, kv_offset: absolute positions of the first query and the first key.
        mask_function: transformers' ``fn(batch_idx, head_idx, q_idx, kv_idx) -> bool``.
        attention_mask: the 2-D padding mask ``(B, >= kv_offset + kv_length)`` (1 = token),
            or None.
    """

    batch_size: int
    q_length: int
    kv_length: int
    q_offset: int
    kv_offset: int
    mask_function: HFMaskFn
    attention_mask: Tensor | None


class FilledKeys(Mask):
    """``inner`` over the first ``keys`` of ``slots`` keys, nothing after them: a static
    cache's call, whose trailing slots hold no key yet.

    ``inner`` is built for the call that ends at the last filled key (its queries aligned
    bottom-right on ``keys``), so this mask shifts the query positions by the unfilled
    slots. Its row bounds are ``inner``'s, so the blocked engine and the decoding kernel
    never read an unfilled slot. ``inner=None``: every filled key.

    Example:
        >>> from attnlab.masks import causal
        >>> FilledKeys(causal(), keys=3, slots=5).dense(2, 5)[0, 0].int().tolist()
        [[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]]
    """

    def __init__(self, inner: Mask | None, keys: int, slots: int) -> None:
        self.inner, self.keys, self.slots = inner, keys, slots
        self.per_head = inner is not None and inner.per_head

    @property
    def batch_size(self) -> int | None:
        return None if self.inner is None else self.inner.batch_size

    def check(self, *, batch: int, heads: int, lq: int, lk: int) -> None:
        if lk != self.slots:
            raise ValueError(f"FilledKeys mask is built for {self.slots} keys, the call has {lk}")
        if self.inner is not None:
            self.inner.check(batch=batch, heads=heads, lq=lq, lk=self.keys)

    def evaluate(self, grid: Grid) -> Tensor:
        filled = grid.k < self.keys
        if self.inner is None:
            return filled
        shift = grid.lk - self.keys  # positions in the inner call: the filled keys only
        inner = Grid(
            grid.b, grid.h, grid.q - shift, grid.k.clamp(max=self.keys - 1), grid.lq, self.keys
        )
        return filled & self.inner(inner)

    def row_bounds(
        self, lq: int, lk: int, batch: int = 1, device: torch.device | str | None = None
    ) -> RowBounds | None:
        if self.inner is None:
            lo = torch.zeros(1, lq, dtype=torch.long, device=device)
            return RowBounds(lo, lo + self.keys - 1, exact=True)
        bounds = self.inner.row_bounds(lq, self.keys, batch, device)
        if bounds is None:
            return None
        return RowBounds(bounds.lo, bounds.hi.clamp(max=self.keys - 1), bounds.exact)

    def spec(self) -> str:
        inner = "all" if self.inner is None else self.inner.spec()
        return f"filled_keys({self.keys} of {self.slots}, {inner})"


def translate(call: MaskCall) -> Mask | None:
    """The attnlab mask of one transformers mask request (None: every pair attends).

    Example:
        >>> from transformers.masking_utils import sliding_window_causal_mask_function
        >>> call = MaskCall(1, 4, 4, 0, 0, sliding_window_causal_mask_function(2), None)
        >>> translate(call).dense(4, 4)[0, 0].int().tolist()
        [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    """
    structured = _structure(call.mask_function, call)
    if isinstance(structured, _Overlay):  # a bare overlay was dropped: every key attended
        structured = _as_mask(structured, call, causal_too=False)
    filled = call.q_offset + call.q_length - call.kv_offset  # keys up to the last query
    if 0 < filled < call.kv_length and _unfilled_hidden(structured, call, filled):
        # a static cache: the slots after the last query hold no key yet, none seen
        inner = translate(dataclasses.replace(call, kv_length=filled))
        return FilledKeys(inner, filled, call.kv_length)
    aligned = call.kv_offset + call.kv_length == call.q_offset + call.q_length
    if structured is _UNKNOWN or not (aligned or _query_free(structured)):
        return _evaluated(call)
    pad = None
    if call.attention_mask is not None:
        am = call.attention_mask.to(torch.bool)
        short = call.kv_offset + call.kv_length - am.shape[1]
        am = torch.nn.functional.pad(am, (0, short)) if short > 0 else am  # as transformers
        pad = padding_mask(am[:, call.kv_offset : call.kv_offset + call.kv_length])
    if isinstance(structured, Mask) and structured.is_causal and call.q_length == 1:
        structured = None  # one new token sees every cached key: no mask to apply
    parts = [m for m in (structured, pad) if isinstance(m, Mask)]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else parts[0] & parts[1]


# model types whose own code reads the attention mask as a tensor, not only through the
# attention function: the indexers of sparse attention that pick each query's keys from
# masked scores (DeepSeek-V3.2's DSA and the models built on it, Qwen4-Exp's QSA) and
# Doge's dynamic mask take it as a bool tensor; DeepSeek-V4, which runs on eager alone,
# appends its compressed keys' additive bias to it, and BigBird-Pegasus's encoder adds it
# to the scores of its own attention (its decoder calls attnlab), so they take eager's
# float form
TENSOR_MASK_MODELS = {
    **dict.fromkeys(("axk2", "deepseek_v32", "doge", "dots3_note_text", "glm_moe_dsa", "hy_v4",
                     "hy_v4_vl_text", "mistral_large4_text", "qwen4_exp_text"), "bool"),
    **dict.fromkeys(("bigbird_pegasus", "deepseek_v4"), "additive"),
    "t5gemma2_decoder": "bool",  # joins its self- and cross-attention masks with torch.cat
    "nemotron_asr_streaming_encoder": "bool",  # finds the rows that see no key
}  # fmt: skip


def for_model(
    mask: Mask | None,
    call: MaskCall,
    config: object,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Mask | Tensor | None:
    """``mask`` for the model of ``config``: itself, or for a model of
    :data:`TENSOR_MASK_MODELS` its dense tensor ``(B, 1, Lq, Lk)``, which such a model reads
    before its attention runs on attnlab: bool (True: attend) or additive (0, or the
    lowest value of ``dtype`` (float32 if None), as transformers' eager builder makes it).

    Example:
        >>> from types import SimpleNamespace
        >>> from transformers.masking_utils import causal_mask_function as fn
        >>> call = MaskCall(2, 3, 3, 0, 0, fn, None)
        >>> for_model(causal(), call, SimpleNamespace(model_type="deepseek_v32")).shape
        torch.Size([2, 1, 3, 3])
        >>> for_model(causal(), call, SimpleNamespace(model_type="deepseek_v4"))[0, 0, 0, 1]
        tensor(-3.4028e+38)
    """
    form = TENSOR_MASK_MODELS.get(str(getattr(config, "model_type", "")))
    if form is None:
        return mask
    b, lq, lk = call.batch_size, call.q_length, call.kv_length
    if mask is None:
        allowed = torch.ones(b, 1, lq, lk, dtype=torch.bool, device=device)
    else:
        allowed = mask.dense(lq, lk, batch=b, device=device).expand(b, 1, lq, lk).contiguous()
    if form == "bool":
        return allowed
    dtype = dtype if isinstance(dtype, torch.dtype) else torch.float32
    zeros = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return zeros.masked_fill(~allowed, torch.finfo(dtype).min)


def _query_free(piece: Piece) -> bool:
    """Whether a translated piece ignores the queries (every pair; keys alone, as padding
    hides them), so it holds for any query length and positions: a cross-attention's
    padding, or a mask built for one query and broadcast over all (BridgeTower)."""
    if piece is _ALL:
        return True
    if not isinstance(piece, Mask):
        return False
    return all(
        isinstance(m, KeyValid) or (isinstance(m, Padding) and m.lengths()[1] is None)
        for m in piece.conjuncts
    )


def _unfilled_hidden(piece: Piece, call: MaskCall, filled: int) -> bool:
    """Whether transformers' mask hides the keys from ``filled`` on (a static cache's empty
    slots) from every query: its padding does (the 2-D mask ends before them, so
    transformers pads it with 0), or ``piece`` lets no query see past its own position
    (:func:`_no_future`). A piece of keys alone keeps its padding over every slot."""
    if _query_free(piece):
        return False
    am, start = call.attention_mask, call.kv_offset + filled
    hidden = am is not None and not bool(am[:, start : call.kv_offset + call.kv_length].any())
    return hidden or _no_future(piece, call.q_offset - call.kv_offset, filled)


def _no_future(piece: Piece, first: int, end: int) -> bool:
    """Whether no query of a translated piece, sitting on keys ``first`` to ``end - 1``,
    sees a key from ``end`` on: a causal conjunct, every part of an ``|`` such, or groups
    whose ids from ``end`` on are none of the queries' (an image wholly before the last
    query); anything else is not assumed."""
    if isinstance(piece, And):
        return any(_no_future(p, first, end) for p in piece.parts)
    if isinstance(piece, Or):
        return all(_no_future(p, first, end) for p in piece.parts)
    if isinstance(piece, Groups):
        return first >= 0 and not _shares_group(piece.ids, first, end)
    return isinstance(piece, Mask) and piece.is_causal


def _shares_group(ids: Tensor, first: int, end: int) -> bool:
    """Whether a row's ids ``(Bd, Lk)`` at ``first:end`` and from ``end`` on hold one group
    (a non-negative id) in common: one read of the device."""
    rows = torch.arange(ids.shape[0], device=ids.device).unsqueeze(1)  # (Bd, 1)
    tagged = ids.long() * ids.shape[0] + rows  # (Bd, Lk): an id of one row, none of another
    tagged = torch.where(ids >= 0, tagged, -1)  # in no group
    queries, after = tagged[:, first:end], tagged[:, end:]
    return bool(torch.isin(after, torch.where(queries >= 0, queries, -2)).any())


class _Unknown:
    """Marker: a piece of a mask function that :func:`translate` does not recognize."""


@dataclass(frozen=True)
class _Overlay:
    """transformers' sliding-window overlay: keys ``k > q - window`` (future keys too)."""

    window: int


_UNKNOWN = _Unknown()
_ALL = None  # every pair may attend
Piece = Mask | _Overlay | _Unknown | None


def _cells(fn: Callable[..., object]) -> dict[str, object]:
    """The closure variables of ``fn`` by name."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return {}
    return {n: c.cell_contents for n, c in zip(code.co_freevars, fn.__closure__ or (), strict=True)}


def _structure(fn: HFMaskFn, call: MaskCall, positions: Tensor | None = None) -> Piece:
    """The mask of one piece of a transformers mask function, or ``_UNKNOWN``; inside a
    packed sequence's remapping, ``positions (B, L)`` are each token's own position."""
    name, cells = getattr(fn, "__qualname__", ""), _cells(fn)
    kind = name.split(".")[0]
    if name in ("causal_mask_function", "bidirectional_mask_function"):
        return causal() if name.startswith("causal") else _ALL
    if kind == "sliding_window_overlay":  # a window < 1 (Qwen2-MoE's default 0, a mask
        # no layer reads) raised "left must be a non-negative int": its own function then
        w = int(cells["sliding_window"])  # type: ignore[call-overload]
        return _Overlay(w) if w >= 1 else _UNKNOWN
    if kind == "sliding_window_bidirectional_overlay":
        w = int(cells["sliding_window"])  # type: ignore[call-overload]
        return window(w, w) if w >= 0 else _UNKNOWN
    if kind == "padding_mask_function":
        pad = cells["padding_mask"]
        if isinstance(pad, Tensor):
            return padding_mask(pad[:, call.kv_offset : call.kv_offset + call.kv_length].bool())
    if kind == "chunked_overlay":  # Llama 4: (k - pad) // C == (q - pad) // C
        keys = torch.arange(call.kv_length) + call.kv_offset if positions is None else positions
        return Chunks(int(cells["chunk_size"]), cells["left_padding"], keys)  # type: ignore[call-overload]
    if kind == "blockwise_overlay" and positions is None:  # Gemma 3, PaliGemma, ...
        return _blocks(cells["block_sequence_ids"], call)
    if kind == "packed_sequence_mask_function" and call.q_length == call.kv_length:
        return documents(cells["packed_sequence_mask"])  # type: ignore[arg-type]
    if kind == "remap_positions_for_packed_sequence":
        # inside one packed sequence positions rise by 1 per token, so causal and window
        # masks on positions equal those masks on indices (not chunks: they follow the
        # positions); the packed part is AND-ed
        return _structure(cells["mask_function"], call, cells["position_ids"])  # type: ignore[arg-type]
    if kind in ("and_masks", "or_masks"):
        return _combine(kind == "and_masks", cells["mask_functions"], call, positions)  # type: ignore[arg-type]
    offset = call.kv_offset if positions is None else None
    known, mask = model_overlay(fn, cells, offset)  # a model's own (EmbeddingGemma's, ...)
    return mask if known else _UNKNOWN


def _blocks(ids: object, call: MaskCall) -> Piece:
    """transformers' ``blockwise_overlay``, ``ids[b, q] == ids[b, k] >= 0`` at absolute
    positions (an image's tokens see each other): :func:`groups` of the keys' ids (queries
    aligned on their keys sit on their keys' ids), or ``_UNKNOWN`` where the ids are not a
    ``(1 or B, >= kv_offset + kv_length)`` integer tensor."""
    end = call.kv_offset + call.kv_length
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.shape[1] < end:
        return _UNKNOWN
    if ids.shape[0] not in (1, call.batch_size) or ids.dtype not in _INTS:
        return _UNKNOWN
    return groups(ids[:, call.kv_offset : end])


_INTS = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


class Chunks(Documents):
    """Llama 4's chunked attention: :func:`documents` of ``(position - left_padding) //
    size`` per key, the positions kept so that packed sequences found later recompute the
    chunks on their own positions (:meth:`at`). Aligned queries (``kv_offset + Lk ==
    q_offset + Lq``) sit on their keys' positions, so a query's chunk is its key's.

    Example:
        >>> Chunks(2, torch.tensor([0]), torch.arange(5)).at(torch.tensor([[0, 1, 2, 0, 1]])).ids
        tensor([[0, 0, 1, 0, 0]])
    """

    def __init__(self, size: int, left_padding: object, positions: Tensor) -> None:
        pad = torch.as_tensor(left_padding).reshape(-1, 1)  # (B or 1, 1)
        self.size, self.left_padding = size, pad
        super().__init__(torch.div(positions.to(pad.device) - pad, size, rounding_mode="floor"))

    def at(self, positions: Tensor) -> Chunks:
        """The chunks of tokens at ``positions (B or 1, Lk)`` (a packed sequence's own)."""
        return Chunks(self.size, self.left_padding, positions)


def _combine(
    conjunction: bool, fns: tuple[HFMaskFn, ...], call: MaskCall, positions: Tensor | None
) -> Piece:
    """``and``/``or`` of translated pieces; a window beside causal loses its future side."""
    parts = [_structure(f, call, positions) for f in fns]
    if any(isinstance(p, _Unknown) for p in parts):
        return _UNKNOWN
    if not conjunction and any(p is _ALL for p in parts):
        return _ALL  # one part allows everything
    causal_too = conjunction and any(isinstance(p, Mask) and p.is_causal for p in parts)
    masks = [_as_mask(p, call, causal_too) for p in parts if p is not _ALL]
    if not masks:
        return _ALL
    masks = masks if conjunction else without_covered(masks)
    return functools.reduce(operator.and_ if conjunction else operator.or_, masks)


def _as_mask(p: Piece, call: MaskCall, causal_too: bool) -> Mask:
    """A translated piece as a mask: an overlay becomes a window, one-sided beside causal."""
    if isinstance(p, _Overlay):
        return window(p.window - 1, 0 if causal_too else call.kv_length)
    assert isinstance(p, Mask)
    return p


def _evaluated(call: MaskCall) -> Mask:
    """transformers' own mask function, padding included, evaluated tile by tile at its
    absolute positions."""
    from transformers.masking_utils import (
        and_masks,
        padding_mask_function,
        prepare_padding_mask,
    )

    fn = call.mask_function
    if call.attention_mask is not None:
        pad = prepare_padding_mask(call.attention_mask.bool(), call.kv_length, call.kv_offset)
        fn = and_masks(fn, padding_mask_function(pad))
    shift = call.q_offset - (call.kv_length - call.q_length)  # attnlab position -> absolute

    def hf_mask(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        ok = fn(b, h, q + shift, k + call.kv_offset).to(torch.bool)
        return torch.broadcast_to(ok, torch.broadcast_shapes(b.shape, q.shape, k.shape))

    return custom(hf_mask, per_batch=True, per_head=False)
