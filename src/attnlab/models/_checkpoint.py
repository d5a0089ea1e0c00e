"""Reading safetensors checkpoints and reporting how they fail to fit a model.

Weights are read with :mod:`safetensors` only: nothing is unpickled, ever.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from attnlab._io import first_names

__all__ = ["check_floating", "check_keys", "check_layer_count", "check_state", "read_safetensors"]

_SHOWN = 8  # names listed per kind of mismatch before "... and N more"


def read_safetensors(path: str | Path) -> dict[str, Tensor]:
    """All tensors of a ``.safetensors`` file, by name.

    Raises ``FileNotFoundError`` (saying what a folder must hold) when the file is absent
    and ``ValueError`` when it is truncated or not a safetensors file.

    Example:
        >>> import tempfile, torch
        >>> from safetensors.torch import save_file
        >>> path = tempfile.mkdtemp() + "/w.safetensors"
        >>> save_file({"w": torch.ones(2)}, path)
        >>> read_safetensors(path)
        {'w': tensor([1., 1.])}
    """
    path = Path(path)
    if not path.is_file():
        pickled = path.parent / "pytorch_model.bin"
        hint = (
            f" ({pickled.name} is there, but attnlab never unpickles weights: convert it "
            "to safetensors first)"
            if pickled.exists()
            else ""
        )
        raise FileNotFoundError(f"weights file {path} does not exist{hint}")
    if not os.access(path, os.R_OK):  # (safetensors said "No such file or directory")
        raise PermissionError(f"weights file {path} cannot be read (permission denied)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(
            f"weights file {path} is not a readable safetensors file ({err}); it may be "
            "truncated or corrupt: reinstall or re-export it"
        ) from err


def check_keys(
    where: str,
    found: Mapping[str, tuple[int, ...]],
    expected: Mapping[str, tuple[int, ...]],
    optional: Iterable[str] = (),
) -> None:
    """Raise ``ValueError`` listing missing, unexpected and mis-shaped tensors.

    Args:
        where: what is being loaded (named in the message).
        found: tensor names and shapes of the checkpoint.
        expected: tensor names and shapes the model needs.
        optional: name prefixes that may be present and are ignored.

    Example:
        >>> check_keys("ckpt", {"b": (3,)}, {"b": (4,), "c": (1,)})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: ckpt does not fit the model: missing 1: c; mis-shaped 1: b (checkpoint (3,), ...
    """
    opt = tuple(optional)
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected and not k.startswith(opt)]
    shaped = [
        f"{k} (checkpoint {tuple(found[k])}, model {tuple(expected[k])})"
        for k in expected
        if k in found and tuple(found[k]) != tuple(expected[k])
    ]
    parts = [
        _listing(kind, names)
        for kind, names in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("mis-shaped", shaped),
        )
        if names
    ]
    if parts:
        raise ValueError(f"{where} does not fit the model: " + "; ".join(parts))


def check_state(
    where: str,
    found: Mapping[str, Tensor],
    expected: Callable[[], Mapping[str, tuple[int, ...]]],
    optional: Iterable[str],
    layers: tuple[str, int],
) -> None:
    """:func:`check_layer_count` (``layers`` is the layer names' prefix and the config's
    count), then :func:`check_keys` against ``expected()``, then :func:`check_floating`."""
    opt = tuple(optional)
    check_layer_count(where, found, *layers)
    check_keys(where, {k: tuple(v.shape) for k, v in found.items()}, expected(), opt)
    check_floating(where, found, opt)


def check_layer_count(where: str, found: Iterable[str], prefix: str, layers: int) -> None:
    """Raise ``ValueError`` when the config asks for more layers than the weights hold,
    before the names of every expected tensor are listed (a ``num_hidden_layers`` of
    10**7 built a dict of 160 million names, for minutes and gigabytes).

    Example:
        >>> check_layer_count("w", ["l.0.a", "l.1.a"], "l.", 5)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: w does not fit the model: the config has num_hidden_layers=5, the ...
    """
    held = {k[len(prefix) :].split(".", 1)[0] for k in found if k.startswith(prefix)}
    if layers > len(held):
        raise ValueError(
            f"{where} does not fit the model: the config has num_hidden_layers={layers}, "
            f"the weights hold {len(held)} layers ({prefix}N.*)"
        )


def check_floating(where: str, found: Mapping[str, Tensor], optional: Iterable[str] = ()) -> None:
    """Raise ``ValueError`` naming the tensors that are not floating-point (int8, bool: a
    model's weights are cast to float silently); float16, bfloat16 and float64 are cast.

    Example:
        >>> import torch
        >>> check_floating("w", {"a": torch.ones(2), "b": torch.ones(2, dtype=torch.int8)})
        Traceback (most recent call last):
        ...
        ValueError: w does not fit the model: not floating-point 1: b (torch.int8); ...
    """
    opt = tuple(optional)
    bad = [
        f"{k} ({v.dtype})"
        for k, v in found.items()
        if not k.startswith(opt) and not v.is_floating_point()
    ]
    if bad:
        raise ValueError(
            f"{where} does not fit the model: {_listing('not floating-point', bad)}; "
            "expected float32 (float16, bfloat16 and float64 are cast)"
        )


def _listing(kind: str, names: list[str]) -> str:
    return f"{kind} {len(names)}: " + first_names(names, _SHOWN)
