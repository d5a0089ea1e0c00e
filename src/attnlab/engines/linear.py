"""Linear attention (Katharopoulos et al. 2020): ``phi(x) = elu(x) + 1``.

A different kernel from softmax, not an estimate of it: models are trained with it.
``scale`` is unused. Causal attention takes chunked prefix sums
(:func:`~attnlab.engines.kernelized.kernel_attention`); ``auto`` never picks it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from attnlab.engines.approximate import ApproximateEngine, MaskPlan, option_field
from attnlab.engines.base import AttentionRequest
from attnlab.engines.kernelized import kernel_result

__all__ = ["LinearEngine", "LinearOptions"]


@dataclass(frozen=True)
class LinearOptions:
    """``engine_options`` of ``"linear"``.

    Attributes:
        chunk_size: keys per chunk of the causal prefix sums (memory/time trade-off).
    """

    chunk_size: int = option_field(128, minimum=1)


class LinearEngine(ApproximateEngine):
    """Linear attention (Katharopoulos et al. 2020) with ``phi(x) = elu(x) + 1``.

    Example:
        >>> import torch, attnlab
        >>> from attnlab import masks
        >>> q = k = v = torch.randn(1, 2, 1000, 16)
        >>> out = attnlab.attention(q, k, v, mask=masks.causal(), engine="linear")
        >>> out.shape
        torch.Size([1, 2, 1000, 16])
    """

    name = "linear"
    summary = (
        "linear attention, phi(x) = elu(x) + 1 (a different kernel, not a "
        "softmax estimate; scale unused); causal, padding, GQA; O(L)"
    )
    options = ("chunk_size",)
    settings_type = LinearOptions
    float16_in_float32 = True  # its sums overflowed past ~1000 keys: rows gave 0

    def compute(
        self, req: AttentionRequest, plan: MaskPlan, opts: LinearOptions
    ) -> tuple[Tensor, Tensor | None]:
        qf = F.elu(req.q).add_(1)  # (B, Hq, Lq, E); elu's backward keeps its input
        kf = F.elu(req.k).add_(1)  # (B, Hkv, Lk, E)
        if plan.key_valid is not None:
            kf = kf * plan.key_valid
        return kernel_result(req, qf, kf, plan.causal, opts.chunk_size)
