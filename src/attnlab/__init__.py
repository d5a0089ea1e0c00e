"""attnlab: the attention mechanism of transformer models, complete, fast and visible.

Example:
    >>> import torch, attnlab
    >>> from attnlab import masks, bias
    >>> q = k = v = torch.randn(1, 8, 32, 16)
    >>> out = attnlab.attention(q, k, v, mask=masks.causal(), bias=bias.alibi(8))
    >>> out.shape
    torch.Size([1, 8, 32, 16])
"""

from __future__ import annotations

import torch
from torch.torch_version import Version

# older releases lack torch.compiler.disable(reason=) and is_exporting(), and their
# per-block flash kernel read past k and v for grouped-query heads without an error
if Version(torch.__version__).release < (2, 9):
    raise ImportError(f"attnlab needs torch >= 2.9, found torch {torch.__version__}")

from attnlab import bias, engines, masks, nn, normalize, positional, scores
from attnlab.approximation import approximation_error
from attnlab.engines import available_engines, get_engine, register_engine
from attnlab.functional import AttentionOutput, attend, attention, attention_weights

__version__ = "0.1.0"

__all__ = [
    "AttentionOutput",
    "__version__",
    "approximation_error",
    "attend",
    "attention",
    "attention_weights",
    "available_engines",
    "bias",
    "engines",
    "get_engine",
    "masks",
    "nn",
    "normalize",
    "positional",
    "register_engine",
    "scores",
]
