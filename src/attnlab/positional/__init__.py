"""Positional encodings, all found here.

They enter a transformer in three different places:

* **added to the embeddings** before the first layer: :func:`sinusoidal_table` /
  :class:`SinusoidalPositional` (Vaswani et al., 2017) and :class:`LearnedPositional`
  (GPT-2, BERT), on tensors of shape ``(B, L, D)`` (module ``absolute``);
* **rotating q and k** inside the attention layer: :class:`RotaryEmbedding` (RoPE, Su et al.,
  2021), on per-head tensors of shape ``(B, H, L, E)`` (module ``rotary``);
* **biasing the attention scores**: :func:`alibi` (Press et al., 2022) and
  :func:`relative_buckets` (T5, Raffel et al., 2020) build attention biases; pass them as
  ``bias=`` to :func:`attnlab.attention`. They live in :mod:`attnlab.bias` and are re-exported
  here so every positional encoding can be found in one place.

Angles are computed in float32 (float64 for float64 inputs) and the results are cast to the
input's dtype.

Example:
    >>> import attnlab
    >>> import torch
    >>> rope = RotaryEmbedding(16)
    >>> q = k = v = torch.randn(1, 4, 10, 16)
    >>> out = attnlab.attention(rope(q), rope(k), v)
    >>> out = attnlab.attention(q, k, v, bias=alibi(4))
    >>> out.shape
    torch.Size([1, 4, 10, 16])
"""

from __future__ import annotations

from attnlab.bias import alibi, relative_buckets
from attnlab.positional.absolute import LearnedPositional, SinusoidalPositional, sinusoidal_table
from attnlab.positional.rotary import SCALINGS as SCALINGS
from attnlab.positional.rotary import RotaryEmbedding

__all__ = [
    "LearnedPositional",
    "RotaryEmbedding",
    "SinusoidalPositional",
    "alibi",
    "relative_buckets",
    "sinusoidal_table",
]
