"""Checks of token ids shared by the models: ids in a vocabulary, and a config's special
ids (BOS, EOS) inside the vocabulary they index."""

from __future__ import annotations

from torch import Tensor

__all__ = ["check_special_ids", "check_vocab"]


def check_vocab(name: str, ids: Tensor, field: str, vocab: int) -> None:
    """Integer token ids ``ids`` must lie in ``[0, vocab)``, ``field`` naming ``vocab``
    (an embedding raised a bare ``IndexError: index out of range in self``).

    Example:
        >>> import torch
        >>> check_vocab("src", torch.tensor([[1, 7]]), "src_vocab", 5)
        Traceback (most recent call last):
        ...
        ValueError: src must lie in [0, src_vocab=5), got values in [1, 7]
    """
    lo, hi = (int(v) for v in ids.aminmax()) if ids.numel() else (0, 0)
    if lo < 0 or hi >= vocab:
        raise ValueError(f"{name} must lie in [0, {field}={vocab}), got values in [{lo}, {hi}]")


def check_special_ids(cfg: object, field: str, *names: str) -> None:
    """Each ``cfg.<name>`` must be an int id in ``[0, cfg.<field>)`` (a BOS or EOS outside
    the vocabulary failed at the first decoding step with an ``IndexError``).

    Example:
        >>> from types import SimpleNamespace as NS
        >>> check_special_ids(NS(tgt_vocab=5, bos=1, eos=7), "tgt_vocab", "bos", "eos")
        Traceback (most recent call last):
        ...
        ValueError: eos must be a token id in [0, tgt_vocab=5), got 7
    """
    vocab = getattr(cfg, field)
    for name in names:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < vocab:
            raise ValueError(f"{name} must be a token id in [0, {field}={vocab}), got {v!r}")
