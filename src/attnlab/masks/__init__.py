"""Attention masks: typed, composable, and aware of their block structure.

A mask says which (query, key) pairs may attend. Every mask is a function of
``(batch, head, query position, key index)``; query positions are aligned bottom-right
(query row ``i`` sits at position ``i + Lk - Lq``), the frame of cached decoding.
:func:`block_random` draws its random blocks per key length, so it depends on ``Lk`` too,
and a cached decoder sees another pattern than a full pass (its docstring says how to keep
one). ``True`` means *may attend*, as in
:func:`torch.nn.functional.scaled_dot_product_attention`.

Masks combine with ``&`` (both allow), ``|`` (either allows) and ``~`` (negation). Each
mask knows its dense form (:meth:`Mask.dense` -> bool ``(Bm, Hm, Lq, Lk)``) and its block
layout (:meth:`Mask.block_layout`: which ``(q-block, k-block)`` tiles are empty, partial
or full), and describes its structure to engines through a public protocol (see
:mod:`attnlab.masks.base`): the key interval of each row, its ``&`` parts, whether it is
causal, its padding lengths. Engines ask; they never check a mask's class.

The package holds one file per family: ``intervals`` (causal, window, prefix, dilated),
``padding``, ``documents`` (and groups), ``sparse`` (global tokens, random blocks), ``custom``,
``tensor``; ``base`` holds the protocol and the ``& | ~`` combinators, ``layout`` the
block layouts. :class:`Grid` is the argument of :meth:`Mask.evaluate` (a new mask's type
hints name it).

Example:
    >>> from attnlab import masks
    >>> m = masks.causal() & masks.window(2)
    >>> m.dense(4, 4)[0, 0].int().tolist()
    [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1]]
"""

from __future__ import annotations

from attnlab._grid import Grid
from attnlab.masks.base import And, Mask, Not, Or, Wrapped
from attnlab.masks.custom import Custom, MaskFn, custom
from attnlab.masks.documents import Documents, Groups, documents, groups
from attnlab.masks.intervals import (
    Causal,
    ChunkWindow,
    Dilated,
    Prefix,
    Window,
    causal,
    chunk_window,
    dilated,
    prefix,
    window,
)
from attnlab.masks.layout import BlockLayout, RowBounds, TileState
from attnlab.masks.padding import Padding, padding
from attnlab.masks.sparse import BlockRandom, GlobalTokens, block_random, global_tokens
from attnlab.masks.tensor import TensorMask, as_mask, tensor

__all__ = [
    "And",
    "BlockLayout",
    "BlockRandom",
    "Causal",
    "ChunkWindow",
    "Custom",
    "Dilated",
    "Documents",
    "GlobalTokens",
    "Grid",
    "Groups",
    "Mask",
    "MaskFn",
    "Not",
    "Or",
    "Padding",
    "Prefix",
    "RowBounds",
    "TensorMask",
    "TileState",
    "Window",
    "Wrapped",
    "as_mask",
    "block_random",
    "causal",
    "chunk_window",
    "custom",
    "dilated",
    "documents",
    "global_tokens",
    "groups",
    "padding",
    "prefix",
    "tensor",
    "window",
]
