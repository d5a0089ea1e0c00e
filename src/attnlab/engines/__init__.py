"""Attention engines behind one signature, and their registry.

=============  =====  ===========================================================
engine         exact  what it computes
=============  =====  ===========================================================
``reference``  yes    everything (materializes Lq x Lk); the fp64 oracle
``sdpa``       yes    dot + softmax with any mask/bias via torch SDPA; no weights
``blocked``    yes    dot/cosine + softmax, any mask/bias; skips empty tiles, fwd+bwd
``flex``       yes    torch FlexAttention with attnlab's masks; skips empty tiles (CUDA)
``linear``     no     linear attention, elu(x) + 1 features; causal, padding; O(L)
``performer``  no     FAVOR+ random-feature estimate of softmax; causal, padding; O(L)
``nystrom``    no     Nystromformer landmarks; non-causal, padding; O(L)
=============  =====  ===========================================================

``engine="auto"`` picks ``blocked`` when the mask leaves most tiles empty (or adds a
bias to a causal mask) on the CPU, ``flex`` for such calls and soft-capped ones on CUDA,
``sdpa`` for dense and plain causal attention, and falls back to ``reference`` for what
none of them supports. It picks an approximate engine only for calls
with ``approximate=True`` that want no weights: ``nystrom`` from ``2**22`` (query, key)
pairs on (it has no causal form), else ``performer`` from ``2**24`` pairs on; ``linear``
is a different kernel, not an estimate of softmax, so ``auto`` never picks it. Engine
settings travel as ``engine_options`` and are checked against :attr:`Engine.options`.
"""

from __future__ import annotations

import torch

from attnlab.engines.base import (
    AttentionRequest,
    Engine,
    EngineResult,
    available_engines,
    get_engine,
    register_engine,
    select_engine,
    validate_options,
)
from attnlab.engines.blocked import BlockedEngine, kernel_status
from attnlab.engines.flex import FlexEngine
from attnlab.engines.linear import LinearEngine
from attnlab.engines.nystrom import NystromEngine
from attnlab.engines.performer import PerformerEngine
from attnlab.engines.reference import ReferenceEngine
from attnlab.engines.sdpa import SdpaEngine

__all__ = [
    "AttentionRequest",
    "BlockedEngine",
    "Engine",
    "EngineResult",
    "FlexEngine",
    "LinearEngine",
    "NystromEngine",
    "PerformerEngine",
    "ReferenceEngine",
    "SdpaEngine",
    "available_engines",
    "get_engine",
    "kernel_status",
    "register_engine",
    "select_engine",
    "validate_options",
]

register_engine(ReferenceEngine(), auto_rank=0)
register_engine(SdpaEngine(), auto_rank=0)
register_engine(BlockedEngine(), auto_rank=0)
# auto tries it first where it can pick it (CUDA: masked and soft-capped calls); on a
# machine without CUDA it is named only, and auto's CPU calls never ask it
register_engine(FlexEngine(), auto_rank=0 if torch.cuda.is_available() else None)
register_engine(LinearEngine())  # a different kernel: never chosen by auto
register_engine(PerformerEngine(), auto_rank=0)  # auto with approximate=True only
register_engine(NystromEngine(), auto_rank=0)  # tried before performer (non-causal)
