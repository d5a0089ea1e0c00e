"""transformers models that call its attention interface in some layers and compute
attention in their own code in others (checked on transformers 5.24 by building each
model type small under ``attn_implementation="attnlab"`` and comparing the attention
calls attnlab saw with those made outside it).

Such a model passes transformers' own source test (its file calls the interface), so
:func:`attnlab.integrations.transformers.register` cannot refuse it whole: it runs, with
the layers named here outside attnlab (``attnlab.interpret.capture`` does not see them).
It now says so, once a model, with a ``UserWarning`` (not again for the sub-models it
builds, nor for a model of a config already warned about). Sub-models whose every
attention layer is of that kind (loaded alone) are refused like the models that never call
the interface.
"""

from __future__ import annotations

import sys
import warnings
import weakref
from types import FrameType
from typing import Any

__all__ = ["COMPOSITE", "OWN_SUBMODELS", "PARTLY_OWN", "check_partly_own"]

COMPOSITE = "(a composite model takes a dict, one implementation per sub-config)"
_WARNED: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
_BUILDS = ("__init__", "set_attn_implementation")  # where a model builds its sub-models

# model_type -> the layers that compute attention in their own code
PARTLY_OWN = {
    "pegasus_x": "its encoder's global-local attention (PegasusXGlobalLocalAttention)",
    "longt5": "its encoder's local or transient-global attention",
    "bigbird_pegasus": "its encoder's block-sparse attention",
    "aria": "its projector's cross-attention (torch.nn.MultiheadAttention)",
    "aimv2": "its attention pooling head (torch's scaled_dot_product_attention)",
    "siglip": "its vision pooling head, if vision_use_head (torch.nn.MultiheadAttention)",
    "siglip2": "its vision pooling head, if vision_use_head (torch.nn.MultiheadAttention)",
    "siglip_vision_model": "its pooling head, if vision_use_head (torch.nn.MultiheadAttention)",
    "siglip2_vision_model": "its pooling head, if vision_use_head (torch.nn.MultiheadAttention)",
    "evolla": "its sequence compressor's and aligner's cross-attention",
    "idefics": "its perceiver resampler's attention, if use_resampler (IdeficsPerceiverAttention)",
}
# model_type -> the config flag (of the vision config for a composite SigLIP) that builds
# those layers: off, the model has none and is not warned about
_BUILT_IF = {
    **dict.fromkeys(("siglip", "siglip2", "siglip_vision_model", "siglip2_vision_model"),
                    "vision_use_head"),
    "idefics": "use_resampler",
}  # fmt: skip
# sub-models whose attention layers all compute attention in their own code (CLAP's
# audio tower, BridgeTower's vision tower, ...): refused, so a composite that holds one
# (ClapModel) takes a dict that gives it "eager" ({"audio_config": "eager", "": "attnlab"})
OWN_SUBMODELS = frozenset(
    {
        "clap_audio_model",
        "bridgetower_vision_model",
        "pp_formulanet_vision",
        "gemma3n_audio",
        "gemma4_audio",
        "chameleon_vqgan",
        "janus_vqgan",
    }
)


def check_partly_own(model: Any, name: str) -> None:
    """Refuse ``name`` for a model whose attention is all its own, and warn for one whose
    attention is partly its own (``informer`` with ``attention_type="prob"``, whose
    ProbSparse attention failed inside attnlab, is refused).

    Example:
        >>> class Toy:
        ...     config = type("Config", (), {"model_type": "gemma3n_audio"})()
        >>> check_partly_own(Toy(), "attnlab")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: attn_implementation='attnlab': Toy (gemma3n_audio) computes attention ...
    """
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    prob = kind == "informer" and getattr(config, "attention_type", None) == "prob"
    if kind in OWN_SUBMODELS or prob:
        what = "its ProbSparse attention" if prob else "attention"
        raise ValueError(
            f"attn_implementation={name!r}: {type(model).__name__} ({kind}) computes {what} "
            f"in its own code, so attnlab cannot serve it; load it with "
            f"attn_implementation='eager'"
            + (" or attention_type='full'" if prob else "")
            + f" {COMPOSITE}"
        )
    if kind in PARTLY_OWN and _built(config, kind) and not _warned(config):
        _WARNED[id(config)] = config
        warnings.warn(
            f"attn_implementation={name!r}: {type(model).__name__} ({kind}) runs "
            f"{PARTLY_OWN[kind]} in its own code, outside attnlab (no weights or capture "
            "from those layers); its other attention layers run on attnlab",
            UserWarning,
            stacklevel=4,
        )


def _warned(config: Any) -> bool:
    """Whether the warning was given for ``config`` (PEGASUS-X's encoder and decoder share
    their model's) or, up the call stack, for a model whose construction or
    ``set_attn_implementation`` builds this one (LongT5's encoder and decoder stacks each
    take a copy of the config: the warning was given three times a model)."""
    if _WARNED.get(id(config)) is config:
        return True
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name in _BUILDS:
            outer = getattr(frame.f_locals.get("self"), "__dict__", {}).get("config")
            if outer is not None and _WARNED.get(id(outer)) is outer:
                _WARNED[id(config)] = config
                return True
        frame = frame.f_back
    return False


def _built(config: Any, kind: str) -> bool:
    """Whether ``config`` builds the layers :data:`PARTLY_OWN` names for ``kind``: a SigLIP
    tower without its pooling head (``vision_use_head=False``, PaliGemma's and Gemma 3's)
    or an IDEFICS without its resampler has none."""
    flag = _BUILT_IF.get(kind)
    holder = getattr(config, "vision_config", config) if kind in ("siglip", "siglip2") else config
    return flag is None or getattr(holder, flag, True) is not False
