"""What a sentence-transformers folder asks for: its modules, pooling, length limit and
Dense layers.

:func:`read_modules` lists ``modules.json``: a ``Transformer``, a ``Pooling``, any number of
``Dense`` layers and an optional ``Normalize``, in that order; any other module is refused
by name, never skipped. :func:`pooling_mode` reads ``1_Pooling/config.json`` in both layouts
that sentence-transformers writes (2.x-5.x: one ``pooling_mode_*_tokens: true`` key; 6.x:
``"pooling_mode": "mean"``), :func:`max_seq_length` the truncation length with the
precedence sentence-transformers itself applies, and :func:`load_dense_layers` each
``Dense`` folder's ``config.json`` and ``model.safetensors`` (weights are never unpickled).

Example:
    >>> from attnlab.models import minilm_path
    >>> folder = minilm_path()  # needs attnlab[pretrained]
    >>> [m.kind for m in read_modules(folder)]
    ['Transformer', 'Pooling', 'Normalize']
    >>> pooling_mode(folder / "1_Pooling" / "config.json")
    'mean'
    >>> max_seq_length(folder, read_json(folder / "sentence_bert_config.json", {}), 512)
    256
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from torch import Tensor, nn

from attnlab._validate import choice, plain, positive_int, validate_flag
from attnlab.models._checkpoint import check_keys, read_safetensors

__all__ = [
    "POOLINGS",
    "SentenceDense",
    "StModule",
    "check_dense",
    "load_dense_layers",
    "max_seq_length",
    "pooling_mode",
    "read_json",
    "read_modules",
    "read_object",
    "tokenizer_input",
]

POOLINGS = ("mean", "cls", "max")
# the classic (sentence-transformers 2.x-5.x) keys, one of which is true
_CLASSIC = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}
_CLASSIC |= {"pooling_mode_max_tokens": "max"}
_KINDS = ("Transformer", "Pooling", "Dense", "Normalize")
_ORDER = r"Transformer Pooling( Dense)*( Normalize)?"  # what attnlab runs, in this order
# Dense activations by class name (sentence-transformers saves "torch.nn.modules...Tanh")
_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "Identity": nn.Identity,
    "Tanh": nn.Tanh,
    "ReLU": nn.ReLU,
    "GELU": nn.GELU,
    "Sigmoid": nn.Sigmoid,
    "SiLU": nn.SiLU,
}
_POOLED = "sentence_embedding"  # the feature Dense and Normalize must read and write


class StModule(NamedTuple):
    """One entry of ``modules.json``: its kind (``"Pooling"``, ...) and its folder."""

    kind: str
    path: Path


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
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err  # (nested: exit 1)


def read_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``, ``{}`` when there is no such file; a ValueError naming
    the file for JSON of another kind (a list: ``.get`` raised AttributeError, exit 1).

    Example:
        >>> read_object(Path("/nonexistent.json"))
        {}
    """
    cfg = read_json(path, default={})
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(cfg).__name__}")
    return cfg


def pooling_mode(path: Path) -> str:
    """The pooling a Pooling module's ``config.json`` names (``"mean"`` when absent, or
    when no mode is named or every earlier-layout mode is false, as sentence-transformers
    reads it).

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
    if not modes and not extra:  # none true, or no mode keys: mean, as sentence-transformers
        return "mean"  # 6 reads such a config (it was refused)
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
    if not isinstance(st_config, dict):  # (a list: AttributeError on .get)
        raise TypeError(f"st_config must be a dict, got {type(st_config).__name__}")
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
    v = plain(value)
    whole = isinstance(v, int) or (isinstance(v, float) and v.is_integer())
    if isinstance(v, bool) or not whole or not isinstance(v, int | float) or v < 2:
        raise ValueError(f"{where} must be a whole number >= 2, got {value!r}")
    return int(v)


def read_modules(folder: Path) -> list[StModule]:
    """The modules that ``folder/modules.json`` lists (``[]`` when there is none: a plain
    BERT folder), checked to be ones attnlab runs, in an order it runs them.

    Raises:
        ValueError: a module type attnlab does not implement (named), or the modules in
            another order than Transformer, Pooling, any Dense, then an optional Normalize.

    Example:
        >>> import json, tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> kinds = ["models.Transformer", "models.Pooling", "models.LayerNorm"]
        >>> mods = [{"path": "", "type": "sentence_transformers." + t} for t in kinds]
        >>> _ = (d / "modules.json").write_text(json.dumps(mods))
        >>> read_modules(d)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: .../modules.json: module 2 is 'sentence_transformers.models.LayerNorm', ...
    """
    path = folder / "modules.json"
    raw = read_json(path, default=[])
    if not isinstance(raw, list):
        raise ValueError(f"{path} must hold a list of modules, got {type(raw).__name__}")
    mods = []
    for i, entry in enumerate(raw):
        kind = str(entry.get("type", "")) if isinstance(entry, dict) else ""
        name = kind.rsplit(".", 1)[-1]
        if not kind.startswith("sentence_transformers.") or name not in _KINDS:
            raise ValueError(
                f"{path}: module {i} is {kind or entry!r}, which attnlab does not implement "
                f"(it runs sentence_transformers' {', '.join(_KINDS)})"
            )
        mods.append(StModule(name, folder / str(entry.get("path", ""))))
    kinds = [m.kind for m in mods]
    if mods and not re.fullmatch(_ORDER, " ".join(kinds)):
        raise ValueError(
            f"{path}: modules {kinds} are not in the order attnlab runs them (Transformer, "
            "Pooling, any Dense, then an optional Normalize)"
        )
    for m in mods:
        if m.kind == "Normalize":
            _check_pooled(m.path / "config.json", read_json(m.path / "config.json", {}))
    return mods


class SentenceDense(nn.Module):
    """sentence-transformers' ``Dense`` on the pooled vector ``(B, in) -> (B, out)``:
    ``activation(linear(x))``, plus ``x`` (or ``residual(x)`` when the widths differ) with
    ``use_residual``. Parameter names are sentence-transformers' (``linear.weight``,
    ``linear.bias``, ``residual.weight``), so its ``model.safetensors`` loads as it is.

    Args:
        in_features, out_features: the widths.
        bias: whether ``linear`` has a bias.
        activation: one of ``Identity``, ``Tanh`` (sentence-transformers' default),
            ``ReLU``, ``GELU``, ``Sigmoid``, ``SiLU``.
        use_residual: add the input (projected when the widths differ).

    Example:
        >>> import torch
        >>> d = SentenceDense(4, 2, activation="Identity")
        >>> x = torch.randn(3, 4)
        >>> torch.allclose(d(x), x @ d.linear.weight.T + d.linear.bias)
        True
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        activation: str = "Tanh",
        use_residual: bool = False,
    ) -> None:
        super().__init__()
        activation = choice("activation", activation, _ACTIVATIONS)  # ([...]: unhashable)
        bias = validate_flag("bias", bias)  # (None, 0 and a tensor were taken)
        use_residual = validate_flag("use_residual", use_residual)  # ("False" turned it on)
        n_in = positive_int("in_features", in_features)
        n_out = positive_int("out_features", out_features)
        self.linear = nn.Linear(n_in, n_out, bias=bias)
        self.activation, self.use_residual = _ACTIVATIONS[activation](), use_residual
        self.residual = (
            nn.Linear(n_in, n_out, bias=False) if use_residual and n_in != n_out else None
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.activation(self.linear(x))  # (B, out)
        if self.use_residual:
            out = out + (x if self.residual is None else self.residual(x))
        return out


def load_dense_layers(folder: Path, width: int) -> list[SentenceDense]:
    """The ``Dense`` modules that ``folder/modules.json`` lists, in order, each from its
    folder's ``config.json`` and ``model.safetensors``; the first takes ``width``-wide
    pooled vectors.

    Raises:
        FileNotFoundError: a Dense folder has no ``model.safetensors`` (the message names a
            ``pytorch_model.bin`` that is there instead: attnlab never unpickles weights).
        ValueError: a config that attnlab cannot run as sentence-transformers would, or
            weights that do not fit it.

    Example:
        >>> from attnlab.models import minilm_path
        >>> load_dense_layers(minilm_path(), 384)  # needs attnlab[pretrained]; it has none
        []
    """
    layers = []
    for m in read_modules(folder):
        if m.kind == "Dense":
            layers.append(_load_dense(m.path, width))
            width = layers[-1].linear.out_features
    return layers


def check_dense(dense: object, width: int) -> list[SentenceDense]:
    """``dense`` as a list of :class:`SentenceDense` whose widths chain from ``width``."""
    if not isinstance(dense, Sequence | nn.ModuleList):
        raise TypeError(f"dense must be a list of SentenceDense, got {type(dense).__name__}")
    for i, layer in enumerate(dense):
        if not isinstance(layer, SentenceDense):
            raise TypeError(f"dense[{i}] must be a SentenceDense, got {type(layer).__name__}")
        if layer.linear.in_features != width:
            got = layer.linear.in_features
            raise ValueError(f"dense[{i}] takes {got}-wide vectors, but gets {width}-wide ones")
        width = layer.linear.out_features
    return list(dense)


def _load_dense(folder: Path, width: int) -> SentenceDense:
    """One Dense module from ``folder`` that takes ``width``-wide vectors."""
    path = folder / "config.json"
    cfg = read_json(path, default=None)
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} must hold the Dense module's config (a JSON object), got {cfg!r}")
    _check_pooled(path, cfg)
    n_in, n_out = _size(path, cfg, "in_features"), _size(path, cfg, "out_features")
    if n_in != width:
        raise ValueError(f"{path}: in_features={n_in}, but the vectors it gets have {width}")
    flags = {k: cfg.get(k, k == "bias") for k in ("bias", "use_residual")}
    if not all(isinstance(v, bool) for v in flags.values()):
        raise ValueError(f"{path}: bias and use_residual must be true or false, got {flags}")
    act = cfg.get("activation_function", "torch.nn.modules.activation.Tanh")
    name = act.rsplit(".", 1)[-1] if isinstance(act, str) and act.startswith("torch.nn.") else ""
    if name not in _ACTIVATIONS:
        known = ", ".join(f"torch.nn.{n}" for n in _ACTIVATIONS)
        raise ValueError(f"{path}: activation_function={act!r} is not one of {known}")
    dense = SentenceDense(n_in, n_out, activation=name, **flags)
    weights = folder / "model.safetensors"
    state = read_safetensors(weights)
    want = {k: tuple(v.shape) for k, v in dense.state_dict().items()}
    check_keys(str(weights), {k: tuple(v.shape) for k, v in state.items()}, want)
    dense.load_state_dict(state)
    return dense


def _size(path: Path, cfg: dict[str, Any], key: str) -> int:
    """``cfg[key]``, a positive int, or a ValueError naming the file and the key."""
    n = plain(cfg.get(key))
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{path}: {key} must be a positive int, got {cfg.get(key)!r}")
    return n


def _check_pooled(path: Path, cfg: object) -> None:
    """A Dense or Normalize module must read and write the pooled vector (one that works on
    token states, as multi-vector models have, is not what attnlab runs)."""
    if not isinstance(cfg, dict):
        return
    names = (cfg.get("module_input_name", _POOLED), cfg.get("module_output_name") or None)
    if names[0] != _POOLED or names[1] not in (None, _POOLED):
        raise ValueError(
            f"{path}: module_input_name/module_output_name are {names}; attnlab runs Dense "
            f"and Normalize on the pooled {_POOLED!r} only"
        )


def tokenizer_input(texts: Sequence[str], lowercase: bool) -> list[str]:
    """``texts`` as the tokenizer reads them, for every reader of it (the encoder, the
    explorer, word offsets): with ``lowercase`` (``do_lower_case``), lowercased character
    by character as sentence-transformers 6's ``Lowercase`` normalizer does (Python's
    ``str.lower`` ends a word's sigma as final: other ids, cosine 0.84 for "ΟΔΟΣ").

    Example:
        >>> tokenizer_input(["ΟΔΟΣ"], lowercase=True), tokenizer_input(["ΟΔΟΣ"], False)
        (['οδοσ'], ['ΟΔΟΣ'])
    """
    if not lowercase:
        return list(texts)
    from tokenizers.normalizers import Lowercase

    lower = Lowercase()  # one normalizer for the batch
    return [str(lower.normalize_str(t)) for t in texts]
