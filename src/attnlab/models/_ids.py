"""Checks of token ids shared by the models: id tensors and source lengths, ids in a
vocabulary, and a config's special ids (BOS, EOS) inside the vocabulary they index."""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from attnlab._eager import PLANS, as_written, exporting, vmapping

__all__ = ["check_id_dtype", "check_ids", "check_source", "check_special_ids", "check_vocab"]

# the index dtypes nn.Embedding takes
_ID_DTYPES = (torch.int64, torch.int32)


@as_written(PLANS)  # (traced, its read broke the graph with dynamo's warning)
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
    if vmapping() or exporting():
        return  # no value to read: taken as given (an embedding still fails on a bad id)
    # one read of both (two int() reads were two host-device syncs on a GPU)
    lo, hi = torch.stack(ids.aminmax()).tolist() if ids.numel() else (0, 0)
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
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not 0 <= int(v) < vocab:
            raise ValueError(f"{name} must be a token id in [0, {field}={vocab}), got {v!r}")


def check_id_dtype(name: str, ids: Tensor, what: str = "token ids") -> None:
    """The tensor ``ids`` must hold int64 or int32 ``what``, the dtypes ``nn.Embedding``
    indexes with (int16, uint8 or bool ids failed inside it, naming no argument).

    Example:
        >>> check_id_dtype("words", torch.tensor([[1, 4]], dtype=torch.uint8))
        Traceback (most recent call last):
        ...
        TypeError: words must hold int64 or int32 token ids, got dtype torch.uint8
    """
    if ids.dtype not in _ID_DTYPES:
        raise TypeError(f"{name} must hold int64 or int32 {what}, got dtype {ids.dtype}")


def check_ids(name: str, ids: object, batch: int | None, source: str = "src") -> Tensor:
    """``ids`` must be an int64 or int32 tensor ``(B, L)`` with ``L >= 1`` (and
    ``B = batch``, the batch of ``source``).

    Example:
        >>> check_ids("tgt_in", torch.tensor([[1, 4]]), 1).shape
        torch.Size([1, 2])
        >>> try:
        ...     check_ids("words", torch.tensor([[1.0, 2.0]]), 1, "images")
        ... except ValueError as e:
        ...     print(str(e)[:60])
        words must be an integer tensor of token ids (B, L) with L >
    """
    if not isinstance(ids, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids (B, L), got {type(ids)}")
    if ids.dim() != 2 or ids.shape[1] == 0 or ids.is_floating_point() or ids.is_complex():
        raise ValueError(
            f"{name} must be an integer tensor of token ids (B, L) with L >= 1, got "
            f"shape {tuple(ids.shape)} and dtype {ids.dtype}"
        )
    check_id_dtype(name, ids)
    if batch is not None and ids.shape[0] != batch:
        raise ValueError(f"{name} has batch size {ids.shape[0]} but {source} has {batch}")
    return ids


def check_source(src: object, lengths: object) -> None:
    """``src (B, Ls)`` ids and ``lengths (B,)`` with ``1 <= lengths <= Ls``."""
    s = check_ids("src", src, None)
    if not isinstance(lengths, Tensor) or lengths.shape != (s.shape[0],):
        seen = tuple(lengths.shape) if isinstance(lengths, Tensor) else type(lengths).__name__
        raise ValueError(f"lengths must be a tensor of shape (B,) = ({s.shape[0]},), got {seen}")
    if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
        raise TypeError(f"lengths must hold integers (each row's real length), got {lengths.dtype}")
    _check_lengths_in(lengths, s.shape[1])


@as_written(PLANS)  # (traced, its read broke the graph)
def _check_lengths_in(lengths: Tensor, ls: int) -> None:
    """``lengths (B,)`` must lie in ``[1, ls]`` (where its values can be read)."""
    if vmapping() or exporting() or not lengths.numel():
        return
    if int(lengths.min()) < 1 or int(lengths.max()) > ls:
        raise ValueError(
            f"lengths must lie in [1, Ls={ls}] (the real length of each src row), "
            f"got {lengths.tolist()}"
        )
