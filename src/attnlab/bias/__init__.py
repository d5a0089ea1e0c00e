"""Additive attention biases: ``scores = q·kᵀ * scale + bias``.

A bias is a function of ``(batch, head, query position, key index)``. It is evaluated on a
:class:`Grid` (:meth:`Bias.forward`'s argument, the one masks are evaluated on), so a tiled
engine asks for one tile at a time and the full ``Lq x Lk`` tensor exists only when
:meth:`Bias.dense` is called.

Query positions are aligned bottom-right (row ``i`` sits at position ``i + Lk - Lq``), which
is the frame of cached decoding: the last query is the newest token.

The public constructors are :func:`alibi`, :func:`relative_buckets`, :func:`learned_relative`,
:func:`custom` and :func:`tensor`; :func:`as_bias` turns a user argument into a bias and two
biases add up with ``+``. One concept per module, all re-exported here:

* ``base``: :class:`Bias` (the protocol engines ask) and :class:`SumBias`;
* ``linear``: ALiBi, :func:`alibi_slopes`, :class:`ALiBi`, :func:`alibi`;
* ``relative``: :func:`t5_bucket`, :func:`relative_buckets`, :func:`learned_relative`;
* ``function``: :func:`custom`, a bias given by ``fn(h, q_pos, k)``;
* ``dense``: :func:`tensor`, a bias given as a float tensor, and :func:`as_bias`.

Example:
    >>> import torch
    >>> b = alibi(2) + tensor(torch.zeros(3, 3))
    >>> b.dense(3, 3, heads=2).shape
    torch.Size([1, 2, 3, 3])
"""

from __future__ import annotations

from attnlab._grid import Grid
from attnlab.bias.base import Bias, SumBias
from attnlab.bias.dense import TensorBias, as_bias, tensor
from attnlab.bias.function import CustomBias, custom
from attnlab.bias.function import ScoreBiasFn as ScoreBiasFn
from attnlab.bias.linear import ALiBi, alibi, alibi_slopes
from attnlab.bias.relative import (
    LearnedRelative,
    RelativeBuckets,
    learned_relative,
    relative_buckets,
    t5_bucket,
)

__all__ = [
    "ALiBi",
    "Bias",
    "CustomBias",
    "Grid",
    "LearnedRelative",
    "RelativeBuckets",
    "SumBias",
    "TensorBias",
    "alibi",
    "alibi_slopes",
    "as_bias",
    "custom",
    "learned_relative",
    "relative_buckets",
    "t5_bucket",
    "tensor",
]
