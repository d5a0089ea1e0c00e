"""What a transformers model's attention call carries, as :func:`attnlab.attention`'s
arguments: its mask (an attnlab mask, a bool or an additive float tensor), the keys a
sparse-attention indexer picked for each query, its position bias and its sinks; and
whether it asks for nothing but a decoding step's output."""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch
from torch import Tensor

from attnlab._devices import to_device
from attnlab.integrations.hf_masks import Chunks, FilledKeys, KeyValid
from attnlab.masks import Mask, documents, tensor

__all__ = [
    "SINK_AFTER_WEIGHTS",
    "collecting_attentions",
    "decoding_step",
    "eager_weights",
    "forget_packing",
    "mask_and_bias",
    "packed_sequences",
    "sinks_of",
    "with_block_indices",
    "with_cu_seq_lens",
    "with_indices",
    "with_packing",
    "with_position_bias",
]

# transformers' ContextVar of the outputs being recorded (None: not looked up yet; False:
# this transformers has none)
_COLLECTOR: Any = None


def sinks_of(s_aux: object, sinks: object) -> Tensor | None:
    """The call's attention sinks for :func:`attnlab.attention`: gpt-oss's ``s_aux (Hq,)``
    or Inkling 2's per-row ``sinks (B, Hq, Lq, 1)`` as ``(B, Hq, Lq)``.

    Example:
        >>> sinks_of(None, torch.zeros(2, 4, 3, 1)).shape
        torch.Size([2, 4, 3])
    """
    if s_aux is not None and sinks is not None:
        raise ValueError("the attnlab backend takes attention sinks as s_aux or sinks, not both")
    if isinstance(sinks, Tensor) and sinks.dim() == 4 and sinks.shape[-1] == 1:
        return sinks.squeeze(-1)  # (B, Hq, Lq): attnlab.attention checks the rest
    return sinks if sinks is not None else s_aux  # type: ignore[return-value]


# model types whose eager attention returns the softmax without its sink and scales the
# output by the sink's complement afterwards (gpt-oss and the others drop the sink's share)
SINK_AFTER_WEIGHTS = frozenset({"granite_swa", "granitemoe_swa"})


def eager_weights(module: object, weights: Tensor | None, sinks: Tensor | None) -> Tensor | None:
    """``weights`` (a sink's share dropped) as ``module``'s eager attention returns them:
    renormalized rows where the model applies its sink after the weights (0.39-0.98 were
    the sums of the rows there, eager's 1).

    Example:
        >>> from types import SimpleNamespace
        >>> granite = SimpleNamespace(config=SimpleNamespace(model_type="granite_swa"))
        >>> w = torch.tensor([[0.25, 0.25]])  # the sink took half
        >>> eager_weights(granite, w, torch.zeros(1)).tolist(), eager_weights(None, w, None) is w
        ([[0.5, 0.5]], True)
    """
    kind = getattr(getattr(module, "config", None), "model_type", None)
    if weights is None or sinks is None or kind not in SINK_AFTER_WEIGHTS:
        return weights
    total = weights.sum(-1, keepdim=True)  # 0 on rows without a key: kept 0
    return weights / torch.where(total > 0, total, torch.ones_like(total))


def with_position_bias(bias: Tensor | None, position_bias: object) -> Tensor | None:
    """The additive bias of the call: the model's float mask plus its ``position_bias``.

    Example:
        >>> with_position_bias(None, torch.ones(1, 2, 3, 3)).shape
        torch.Size([1, 2, 3, 3])
    """
    if position_bias is None:
        return bias
    if not isinstance(position_bias, Tensor):
        raise TypeError(
            f"position_bias: the attnlab backend takes an additive float tensor "
            f"(B or 1, H, Lq, Lk), got {type(position_bias).__name__}"
        )
    return position_bias if bias is None else bias + position_bias


def mask_and_bias(m: Mask | Tensor | None, lk: int) -> tuple[Mask | Tensor | None, Tensor | None]:
    """The model's ``attention_mask`` as an attnlab mask or an additive bias."""
    if m is None or isinstance(m, Mask):
        return m, None
    if not isinstance(m, Tensor):
        raise TypeError(
            f"attention_mask: the attnlab backend takes an attnlab mask, a bool tensor or "
            f"an additive float tensor, got {type(m).__name__}"
        )
    # (an int64 or too-short mask was refused as "bias=", which the user never gave)
    want = f"a bool or an additive float tensor (B or 1, 1 or H, Lq, Lk >= {lk})"
    if m.dtype != torch.bool and not m.is_floating_point():
        raise TypeError(f"attention_mask: the attnlab backend takes {want}, got {m.dtype}")
    if m.dim() < 2 or 1 < m.shape[-1] < lk:
        raise ValueError(f"attention_mask: the attnlab backend takes {want}, got shape "
                         f"{tuple(m.shape)}")  # fmt: skip
    m = m[..., :lk]  # static caches hand a longer mask, as to eager
    if m.dtype == torch.bool:
        return m, None
    return None, m


def with_indices(mask: Mask | Tensor | None, indices: object, lk: int) -> Mask | Tensor | None:
    """``mask`` AND the keys a sparse-attention indexer kept for each query.

    DeepSeek-V3.2's DSA and the models built on it (GLM-5, Mistral Large 4, ...) narrow
    the mask themselves only under ``eager`` and ``sdpa``; under any other implementation
    they pass the kept key positions as ``indices (B, Lq, topk)`` for the attention to
    apply. A query attends to a key only where both allow it.

    Example:
        >>> from attnlab.masks import causal
        >>> m = with_indices(causal(), torch.tensor([[[0, 0], [0, 1], [0, 2]]]), 3)
        >>> m.dense(3, 3)[0, 0].int().tolist()
        [[1, 0, 0], [1, 1, 0], [1, 0, 1]]
    """
    if indices is None:
        return mask
    if not isinstance(indices, Tensor) or indices.dim() != 3 or indices.is_floating_point():
        got = tuple(indices.shape) if isinstance(indices, Tensor) else type(indices).__name__
        raise TypeError(f"indices: the attnlab backend takes kept key positions as an "
                        f"integer tensor (B, Lq, topk), got {got}")  # fmt: skip
    b, lq, _ = indices.shape
    kept = torch.zeros(b, lq, lk, dtype=torch.bool, device=indices.device)
    kept.scatter_(-1, indices.long(), True)
    return _narrowed(mask, kept.unsqueeze(1))  # (B, 1, Lq, Lk)


def with_block_indices(
    mask: Mask | Tensor | None, block_indices: object, block_size: object, hq: int, lk: int
) -> Mask | Tensor | None:
    """``mask`` AND the key blocks a block-sparse indexer kept (MiniMax M3).

    ``block_indices (B, Hi, Lq, topk)`` are the kept blocks of ``block_size`` keys for each
    query, per indexer head (``-1``: none); each of the ``Hi`` heads serves ``hq // Hi``
    consecutive query heads, as in the model's own mask.

    Example:
        >>> m = with_block_indices(None, torch.tensor([[[[0], [1]]]]), 2, 2, 4)
        >>> m.dense(2, 4, batch=1, heads=2)[0, 1].int().tolist()
        [[1, 1, 0, 0], [0, 0, 1, 1]]
    """
    if block_indices is None:
        return mask
    idx = block_indices if isinstance(block_indices, Tensor) else None
    if idx is None or idx.dim() != 4 or idx.is_floating_point() or not isinstance(block_size, int):
        got = tuple(idx.shape) if idx is not None else type(block_indices).__name__
        raise TypeError(f"block_indices: the attnlab backend takes kept key blocks as an integer "
                        f"tensor (B, Hi, Lq, topk) from a module with an indexer's block_size, "
                        f"got {got} and block_size {block_size!r}")  # fmt: skip
    b, hi, lq, _ = idx.shape
    blocks = -(-lk // block_size)
    safe = idx.long().masked_fill(idx < 0, blocks)  # -1: a spare column
    kept = torch.zeros(b, hi, lq, blocks + 1, dtype=torch.bool, device=idx.device)
    kept = kept.scatter_(-1, safe, True)[..., :blocks].repeat_interleave(block_size, dim=-1)
    return _narrowed(mask, kept[..., :lk].repeat_interleave(hq // hi, dim=1))  # (B, Hq, Lq, Lk)


def with_cu_seq_lens(
    mask: Mask | Tensor | None, cu_q: object, cu_k: object, lq: int, lk: int
) -> Mask | Tensor | None:
    """``mask`` AND the packed sequences that flash-attention's ``cu_seq_lens_q`` and
    ``cu_seq_lens_k`` mark (the sequences' start offsets in one packed row, then its
    length): what ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)`` passes.

    Example:
        >>> from attnlab.masks import causal
        >>> cu = torch.tensor([0, 2, 3])
        >>> with_cu_seq_lens(causal(), cu, cu, 3, 3).dense(3, 3)[0, 0].int().tolist()
        [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    """
    if cu_q is None and cu_k is None:
        return mask
    cu = cu_k if isinstance(cu_k, Tensor) else None
    if (
        cu is None
        or cu.dim() != 1
        or cu.is_floating_point()
        or len(cu) < 2
        or not isinstance(cu_q, Tensor)
        or lq != lk
        or not torch.equal(cu_q, cu)
        or int(cu[0]) != 0
        or int(cu[-1]) != lk
        or bool((cu.diff() < 0).any())
    ):
        got = [tuple(c.tolist()) if isinstance(c, Tensor) else c for c in (cu_q, cu_k)]
        raise ValueError(
            f"cu_seq_lens_q, cu_seq_lens_k: the attnlab backend takes one packed row's "
            f"rising sequence offsets from 0 to its {lk} tokens, the same for queries "
            f"({lq}) and keys, as 1-D integer tensors; got {got}"
        )
    ids = torch.repeat_interleave(torch.arange(len(cu) - 1, device=cu.device), cu.diff())
    docs = documents(ids)  # (L,): every row of the batch
    if mask is None:
        return docs
    if isinstance(mask, Tensor):
        return _narrowed(mask, docs.dense(lq, lk, device=mask.device))
    return docs & mask


def _narrowed(mask: Mask | Tensor | None, kept: Tensor) -> Mask | Tensor:
    """``mask`` AND the bool tensor ``kept (B, 1 or H, Lq, Lk)``."""
    if mask is None:
        return tensor(kept)
    return mask & kept if isinstance(mask, Tensor) else mask & tensor(kept)


def with_packing(mask: Mask | None, position_ids: object, lq: int, lk: int) -> Mask | None:
    """``mask`` AND the packed sequences that ``position_ids (B or 1, L)`` mark by restarting.

    transformers looks for packed sequences in its causal masks only, and only when no
    2-D ``attention_mask`` and no KV cache is given, so an all-ones mask (or
    ``use_cache=True``) lets packed rows attend to each other. Here the same rule
    (transformers' ``find_packed_sequence_indices``: a new sequence wherever the position
    does not rise by one) applies to a causal mask whenever every query meets every key
    for the first time (``Lq == Lk == L``, or a static cache's first ``L`` filled slots),
    row by row: a row with padding is left to the padding mask (its positions do not
    rise by one). Bidirectional masks (encoders, which transformers never packs), 3-D
    position ids (multimodal RoPE) and decoding steps keep ``mask`` as it is; the backend
    does not call it for a model whose mask request had no position ids (OPT, BioGPT,
    gpt-oss), whose rows transformers never packs.

    Example:
        >>> from attnlab.masks import causal
        >>> with_packing(causal(), torch.tensor([[0, 1, 2, 0, 1]]), 5, 5).spec()
        '(documents(2 documents, length 5) & causal())'
    """
    if isinstance(mask, FilledKeys) and mask.keys == lq < lk:  # a static cache's prefill
        inner = with_packing(mask.inner, position_ids, lq, lq)
        return mask if inner is mask.inner else FilledKeys(inner, mask.keys, mask.slots)
    pos, parts = position_ids, mask.conjuncts if mask is not None else ()
    if lq != lk or not isinstance(pos, Tensor) or pos.dim() not in (1, 2) or pos.shape[-1] != lq:
        return mask  # a decoding step (lq < lk) returns here, before any import
    if not any(m.is_causal for m in parts):
        return mask  # transformers packs causal masks only: encoders attend across
    packed = packed_sequences(pos, lq)  # (B or 1, L)
    if packed is None:
        return mask
    done = _PACKED.masks  # this forward's: every layer hands the same mask and positions
    for ref, packed_mask in done:
        if ref() is mask:
            return packed_mask
    packed_mask = _packed(mask, parts, packed, pos.reshape(-1, lq))  # type: ignore[arg-type]
    done.append((weakref.ref(mask), packed_mask))
    return packed_mask


def _packed(mask: Mask, parts: tuple[Mask, ...], packed: Tensor, pos: Tensor) -> Mask:
    """``mask`` AND the ``packed (B or 1, L)`` sequences of positions ``pos (B or 1, L)``."""
    padded = _padded_rows(parts, pos.shape[-1])  # (B,) or None
    if padded is not None and bool(padded.all()):  # (on the host from padding_mask's read)
        return mask
    if padded is not None:  # those rows one sequence: the padding mask keeps them apart
        packed = torch.where(to_device(padded, packed.device)[:, None], 0, packed)
    docs = documents(packed)
    for p in parts:  # Llama 4's chunks follow positions: each sequence's start at its own
        docs = docs & (p.at(pos) if isinstance(p, Chunks) else p)
    return docs


class _Packed(threading.local):
    """Per thread: the position ids looked at last (a weak reference, their version and
    length), the packed sequences transformers found in them and the masks made of those."""

    ref: Any = None
    key: tuple[int | None, int] | None = None
    found: Tensor | None = None

    def __init__(self) -> None:
        self.masks: list[tuple[Any, Mask]] = []  # each mask with its packed sequences


_PACKED = _Packed()


def packed_sequences(position_ids: Tensor, lq: int) -> Tensor | None:
    """transformers' ``find_packed_sequence_indices`` of ``position_ids (B or 1, L)``
    (None: no row packs several sequences), found once for the tensor every layer's
    call is handed: its check reads a value back from the device (a CUDA sync), once
    per forward instead of once per layer. A changed tensor (its version) is looked at
    again, and so is any after :func:`forget_packing` (an inference tensor has no version).

    Example:
        >>> pos = torch.tensor([[0, 1, 0, 1]])
        >>> packed_sequences(pos, 4).tolist(), packed_sequences(pos, 4) is packed_sequences(pos, 4)
        ([[0, 0, 1, 1]], True)
    """
    key = (None if position_ids.is_inference() else position_ids._version, lq)
    memo = _PACKED
    if memo.ref is not None and memo.ref() is position_ids and memo.key == key:
        return memo.found
    from transformers.masking_utils import find_packed_sequence_indices

    found = find_packed_sequence_indices(position_ids.reshape(-1, lq))  # (B or 1, L) or None
    memo.ref, memo.key, memo.found = weakref.ref(position_ids), key, found
    memo.masks = []
    return found


def forget_packing() -> None:
    """Drop this thread's :func:`packed_sequences` memo (each mask request: a new forward).

    Example:
        >>> forget_packing()
    """
    _PACKED.ref = _PACKED.key = _PACKED.found = None
    _PACKED.masks = []


def _padded_rows(parts: tuple[Mask, ...], lq: int) -> Tensor | None:
    """Which rows ``(B,)`` of the conjuncts' padding masks hide a key or a query (a
    packing decision per row: one padded row left its neighbours' sequences mixed)."""
    rows = None
    for m in parts:
        if isinstance(m, KeyValid):
            found = m.padded_rows()  # (on the host where its padding_mask read them)
        elif (lengths := m.lengths()) is not None:
            kl, ql = lengths
            found = (kl < lq) | (torch.zeros_like(kl, dtype=torch.bool) if ql is None else ql < lq)
        else:
            continue
        rows = found if rows is None else rows | found
    return rows


def decoding_step(
    query: Tensor, key: Tensor, dropout: float, softcap: float | None, engine: str, kw: dict
) -> bool:
    """Whether a maskless call asks nothing but the attention output of queries that do not
    meet their keys for the first time (``Lq < Lk``: no packed rows to find), as a decoding
    step does: the backend then takes attnlab's plain-call path."""
    if query.shape[-2] >= key.shape[-2] or dropout or softcap is not None or engine != "auto":
        return False
    get = kw.get  # every decoding step comes here: plain lookups, no generator
    if get("s_aux") is not None or get("sinks") is not None or get("position_bias") is not None:
        return False
    if get("indices") is not None or get("block_indices") is not None:
        return False
    if get("output_attentions"):
        return False
    return not collecting_attentions()


def collecting_attentions() -> bool:
    """Whether transformers is recording attention weights now (``output_attentions=True``
    on a model that does not pass the flag down to its attention calls, like GPT-2)."""
    global _COLLECTOR
    if _COLLECTOR is None:  # looked up once: this runs on every attention call
        try:
            from transformers.utils.output_capturing import _active_collector
        except ImportError:  # an older transformers passes output_attentions down
            _COLLECTOR = False
        else:
            _COLLECTOR = _active_collector
    if _COLLECTOR is False:
        return False
    collected = _COLLECTOR.get()
    return bool(collected) and any("attentions" in key for key in collected)
