"""Attention engines behind one signature, and their registry.

=============  =====  ===========================================================
engine         exact  what it computes
=============  =====  ===========================================================
``reference``  yes    everything (materializes Lq x Lk); the fp64 oracle
``sdpa``       yes    dot + softmax with any mask/bias via torch SDPA; no weights
``blocked``    yes    dot/cosine + softmax, any mask/bias; skips empty tiles, fwd+bwd
=============  =====  ===========================================================

``engine="auto"`` picks ``blocked`` when the mask leaves most tiles empty (or adds a
bias to a causal mask), ``sdpa`` for dense and plain causal attention, and falls back to
``reference`` for what neither supports.
"""

from __future__ import annotations

from attnlab.engines.base import (
    AttentionRequest,
    Engine,
    EngineResult,
    available_engines,
    get_engine,
    register_engine,
    select_engine,
)
from attnlab.engines.blocked import BlockedEngine
from attnlab.engines.reference import ReferenceEngine
from attnlab.engines.sdpa import SdpaEngine

__all__ = [
    "AttentionRequest",
    "BlockedEngine",
    "Engine",
    "EngineResult",
    "ReferenceEngine",
    "SdpaEngine",
    "available_engines",
    "get_engine",
    "register_engine",
    "select_engine",
]

register_engine(ReferenceEngine(), auto_rank=0)
register_engine(SdpaEngine(), auto_rank=0)
register_engine(BlockedEngine(), auto_rank=0)
