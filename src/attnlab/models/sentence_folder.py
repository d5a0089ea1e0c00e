"""What a sentence-transformers folder asks for: its pooling and its length limit.

:func:`pooling_mode` reads ``1_Pooling/config.json`` in both layouts that
sentence-transformers writes (2.x-5.x: one ``pooling_mode_*_tokens: true`` key; 6.x:
``"pooling_mode": "mean"``), and :func:`max_seq_length` the truncation length with the
precedence sentence-transformers itself applies when it loads the folder.

Example:
    >>> from attnlab.models import minilm_path
    >>> folder = minilm_path()  # needs attnlab[pretrained]
    >>> pooling_mode(folder / "1_Pooling" / "config.json")
    'mean'
    >>> max_seq_length(folder, read_json(folder / "sentence_bert_config.json", {}), 512)
    256
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["POOLINGS", "max_seq_length", "pooling_mode", "read_json"]

POOLINGS = ("mean", "cls", "max")
# the classic (sentence-transformers 2.x-5.x) keys, one of which is true
_CLASSIC = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}
_CLASSIC |= {"pooling_mode_max_tokens": "max"}


def read_json(path: Path, default: Any) -> Any:
    """The JSON in ``path``, ``default`` when there is no such file.

    Example:
        >>> read_json(Path("/nonexistent.json"), default={})
        {}
    """
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def pooling_mode(path: Path) -> str:
    """The pooling a Pooling module's ``config.json`` names (``"mean"`` when absent).

    Both layouts are read: ``{"pooling_mode": "cls"}`` (sentence-transformers 6) and
    ``{"pooling_mode_cls_token": true, ...}`` (earlier); when both are present,
    ``pooling_mode`` wins, as in sentence-transformers.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "config.json"
        >>> _ = p.write_text('{"embedding_dimension": 384, "pooling_mode": "max"}')
        >>> pooling_mode(p)
        'max'
        >>> _ = p.write_text('{"pooling_mode": ["mean", "max"]}')
        >>> pooling_mode(p)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: .../config.json: pooling_mode must name one of ('mean', 'cls', 'max'), ...
    """
    cfg = read_json(path, default={"pooling_mode": "mean"})
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(cfg).__name__}")
    if "pooling_mode" in cfg:
        mode = cfg["pooling_mode"]
        one = mode[0] if isinstance(mode, list) and len(mode) == 1 else mode
        if one not in POOLINGS:
            raise ValueError(
                f"{path}: pooling_mode must name one of {POOLINGS}, got {mode!r} (attnlab "
                "implements these poolings, one per model)"
            )
        return str(one)
    modes = [mode for key, mode in _CLASSIC.items() if cfg.get(key)]
    extra = [k for k, v in cfg.items() if k.startswith("pooling_mode") and v and k not in _CLASSIC]
    if len(modes) != 1 or extra:
        raise ValueError(
            f"{path}: exactly one of {tuple(_CLASSIC)} must be true (got {modes + extra})"
        )
    return modes[0]


def max_seq_length(folder: Path, st_config: dict[str, Any], max_positions: int) -> int:
    """The token limit of the model in ``folder``, as sentence-transformers sets it.

    In order: ``model_max_length`` in ``sentence_bert_config.json``'s ``tokenizer_args``
    (or ``processor_kwargs``); its ``max_seq_length``; ``model_max_length`` in
    ``tokenizer_config.json`` (where sentence-transformers 6 saves it). The first one
    present counts, capped at ``max_positions`` (the position table), which is also the
    limit when none is.

    Args:
        folder: the sentence-transformers folder.
        st_config: its ``sentence_bert_config.json``, parsed (``{}`` when absent).
        max_positions: the encoder's ``max_position_embeddings``.

    Example:
        >>> import json, tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / "tokenizer_config.json").write_text('{"model_max_length": 256}')
        >>> max_seq_length(d, {}, 512), max_seq_length(d, {"max_seq_length": 128}, 512)
        (256, 128)
    """
    args = st_config.get("tokenizer_args", st_config.get("processor_kwargs")) or {}
    found = [
        ("sentence_bert_config.json tokenizer_args model_max_length", args, "model_max_length"),
        ("sentence_bert_config.json max_seq_length", st_config, "max_seq_length"),
    ]
    for where, cfg, key in found:
        if isinstance(cfg, dict) and cfg.get(key) is not None:
            return min(_length(f"{folder}: {where}", cfg[key]), max_positions)
    tok = read_json(folder / "tokenizer_config.json", default={})
    if isinstance(tok, dict) and tok.get("model_max_length") is not None:
        where = f"{folder / 'tokenizer_config.json'}: model_max_length"
        return min(_length(where, tok["model_max_length"]), max_positions)
    return max_positions


def _length(where: str, value: object) -> int:
    """A token limit read from a config file: a whole number >= 2 (ints past any position
    table, as transformers writes for 'no limit', are fine: the caller caps them)."""
    whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not whole or not isinstance(value, int | float) or value < 2:
        raise ValueError(f"{where} must be a whole number >= 2, got {value!r}")
    return int(value)
