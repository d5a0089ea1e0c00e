"""The checks of a :class:`~attnlab.nn.MultiHeadAttention` call's inputs (also the
layers' input check): named errors where torch would fail deep inside, or silently
broadcast or ignore an argument.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["check_input", "check_positions", "check_residual", "is_self_attention"]


def check_input(name: str, x: object, dim: int) -> None:
    """``x`` a floating ``(B, L, dim)`` tensor, else an error naming ``name``.

    Example:
        >>> import torch
        >>> check_input("x", torch.zeros(2, 7, 16), 32)
        Traceback (most recent call last):
        ValueError: x must be (B, L, 32), got (2, 7, 16)
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a Tensor (B, L, D), got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != dim:
        raise ValueError(f"{name} must be (B, L, {dim}), got {tuple(x.shape)}")
    if not x.is_floating_point():  # (torch: "mat1 and mat2 must have the same dtype")
        raise TypeError(f"{name} must be a floating-point Tensor, got {x.dtype}")


def check_residual(residual: object, query: Tensor) -> None:
    """``residual`` is exactly the output's ``(B, Lq, D)``: a broadcastable ``(1, 1, D)``
    would have been added silently, another length failed inside torch."""
    if not isinstance(residual, Tensor):
        raise TypeError(f"residual must be a Tensor (B, Lq, D), got {type(residual).__name__}")
    if residual.shape != query.shape:
        raise ValueError(
            f"residual must be the output's shape (B, Lq, D) = {tuple(query.shape)}, "
            f"got {tuple(residual.shape)}"
        )


def check_positions(positions: object, rope: bool, is_self: bool) -> None:
    """``positions`` only place RoPE's rotations in self-attention: refuse them anywhere
    else rather than ignore them."""
    if positions is None:
        return
    if not rope:
        raise ValueError(
            "positions: given, but this layer has no RoPE (rope=None), and positions only "
            "place RoPE's rotations; add absolute positions to the inputs instead, or "
            "build the layer with rope=..."
        )
    if not is_self:
        raise ValueError(
            "positions: given to cross-attention, which applies no RoPE (its queries and "
            "keys come from two sequences); pass positions=None"
        )


def is_self_attention(
    query: Tensor, key: Tensor | None, value: Tensor | None, rope: object, cache: object
) -> bool:
    """Self-attention: ``key`` None or ``query`` itself, with ``value`` None or ``query``
    too. ``key=query`` beside another ``value`` attends over that value (torch's layer
    does), which has no meaning with RoPE or a cache, whose self-attention reads values
    from the queries' own tokens."""
    if key is None and value is not None and value is not query:
        raise ValueError(  # it attended over query's own values, the value unread
            "value: given without key; pass key as well (key=query attends over this "
            "value with the queries' own keys), or neither for self-attention"
        )
    if key is None or (key is query and (value is None or value is query)):
        return True
    if key is query and (rope is not None or cache is not None):
        raise ValueError(
            "value: with key=query and RoPE or a cache, self-attention takes its values "
            "from query; got another value tensor (pass value=None, or a separate key "
            "for cross-attention)"
        )
    return False
