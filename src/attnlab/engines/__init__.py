"""Attention engines behind one signature, and their registry.

=============  =====  ===========================================================
engine         exact  what it computes
=============  =====  ===========================================================
``reference``  yes    everything (materializes Lq x Lk); the fp64 oracle
``sdpa``       yes    dot + softmax with any mask/bias via torch SDPA; no weights
=============  =====  ===========================================================

``engine="auto"`` tries ``sdpa`` first and falls back to ``reference``.
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
from attnlab.engines.reference import ReferenceEngine
from attnlab.engines.sdpa import SdpaEngine

__all__ = [
    "AttentionRequest",
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
