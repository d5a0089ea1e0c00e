"""attnlab as a Hugging Face transformers attention backend (extra ``attnlab[hf]``).

:func:`register` adds ``"attnlab"`` to transformers' ``AttentionInterface`` and
``AttentionMaskInterface``. A model loaded with ``attn_implementation="attnlab"`` (or
switched with ``model.set_attn_implementation("attnlab")``) then runs every attention
call through :func:`attnlab.attention`:

* the mask builder (:func:`build_mask`) hands the model attnlab masks, never a dense
  ``S x S`` tensor: causal, bidirectional, padding (left or right), sliding windows,
  packed sequences from ``position_ids``, the KV-cache offset (see
  :mod:`attnlab.integrations.hf_masks`);
* packed sequences are found from ``position_ids`` restarts also where transformers does
  not look (:func:`with_packing`, causal masks only, row by row): beside a 2-D
  ``attention_mask`` (rows without padding), and with a fresh KV cache, dynamic or
  static, so an all-ones mask no longer lets packed rows see each other (for models
  that give transformers' mask functions their position ids: OPT, BioGPT and gpt-oss
  do not, so their packed rows attend to each other, as under eager),
  and from flash-attention's ``cu_seq_lens_q`` / ``cu_seq_lens_k`` where a collator
  passes them (``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``);
* the attention function (:func:`attention_forward`) calls the fastest exact engine for
  the mask, with the model's scale, dropout, logit soft-capping and attention sinks;
* ``output_attentions=True`` returns exact weights while the output still comes from the
  fast engine (the blocked engine recomputes the weights from its logsumexp); under
  autograd both come from the reference engine, the weights in the graph as eager's are;
* a model's own additive ``position_bias`` (T5's relative buckets, Inkling's learned
  relative logits) is added to the scaled scores as an attnlab bias, with its gradient;
* the keys a sparse-attention indexer keeps for each query (DeepSeek-V3.2's DSA, GLM-5,
  Mistral Large 4, ...: ``indices``; MiniMax M3's ``block_indices``) narrow the mask, and
  a model whose own code reads its mask as a tensor gets a dense one, bool or additive
  (:data:`hf_masks.TENSOR_MASK_MODELS`); a mask from the builder refuses an attention
  call with another number of keys than it was made for.

What the backend cannot serve exactly raises an error naming it (a head mask a
``ValueError``, a mask of an unknown type a ``TypeError``); nothing is silently ignored.
A model whose attention layers do not call transformers' attention interface (BLOOM,
XLNet, ...) is refused by name when it is built (:func:`register` installs that check).
"""

from __future__ import annotations

import re
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from attnlab._eager import PLANS, as_written, autocast_dtype, no_autocast
from attnlab.engines import get_engine
from attnlab.functional import AttentionOutput, attention, attention_plain
from attnlab.integrations.hf_args import (
    collecting_attentions,
    decoding_step,
    eager_weights,
    forget_packing,
    mask_and_bias,
    sinks_of,
    with_block_indices,
    with_cu_seq_lens,
    with_indices,
    with_packing,
    with_position_bias,
)
from attnlab.integrations.hf_masks import MaskCall, check_version, for_model, translate
from attnlab.integrations.hf_own import COMPOSITE, check_partly_own
from attnlab.masks import Mask

__all__ = ["NAME", "attention_forward", "build_mask", "register", "with_packing"]

NAME = "attnlab"
_NAMES: dict[str, str] = {}  # every name register() gave attnlab, and its engine
# keyword arguments that change the attention and that attnlab does not compute
_REFUSED = ("head_mask", "layer_head_mask")
# for each mask from build_mask: the number of keys it was made for (checked by
# attention_forward), and whether the model gave its mask request position ids
_BUILT_FOR: weakref.WeakKeyDictionary[Mask, tuple[int, bool]] = weakref.WeakKeyDictionary()


class _Request(threading.local):
    """Per thread (models run in several threads at once, as under ``attnlab serve``):
    whether the mask request transformers prepared last had position ids (None: not
    known). A global let one thread's OPT request decide another's Llama mask."""

    given_positions: bool | None = None


_REQUEST = _Request()


def register(name: str = NAME, engine: str | None = None) -> str:
    """Register attnlab with transformers under ``name``; idempotent. Returns ``name``.

    Args:
        name: the ``attn_implementation`` to register; not one of transformers' own
            (``"sdpa"``, ``"eager"``, ...), which would be replaced for every model, and
            of letters, digits, ``_``, ``.`` and ``-`` without "flash" (transformers reads
            ``"org/name"`` as a Hub kernel, a "flash" name as flash attention).
        engine: the attnlab engine every call uses (``"auto"``: the fastest exact one);
            a TypeError/ValueError naming it now, not at the first forward. None (the
            default): the engine ``name`` was registered with, ``"auto"`` for a new name,
            so a later plain ``register()`` (as ``attnlab explain --hf-model`` makes)
            keeps an engine chosen before.

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> register()
        'attnlab'
        >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                   num_hidden_layers=1, num_attention_heads=2)
        >>> model = LlamaForCausalLM(cfg).eval()
        >>> model.set_attn_implementation("attnlab")
        >>> model(torch.tensor([[1, 2, 3]])).logits.shape
        torch.Size([1, 3, 32])
    """
    try:
        import transformers
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ModuleNotFoundError as e:  # (a bare "No module named 'transformers'")
        why = f"{e}; register() needs the hf extra: pip install 'attnlab[hf]'"
        raise ModuleNotFoundError(why, name=e.name) from e
    check_version(transformers.__version__)  # (5.0-5.3: a TypeError at every forward)

    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    engine = _NAMES.get(name, "auto") if engine is None else engine
    if engine != "auto":
        get_engine(engine)  # as attention() does: 'blokced' failed at the first forward
    if name in {"eager", *AttentionInterface(), *AttentionMaskInterface()} - set(_NAMES):
        raise ValueError(  # (register("sdpa") replaced transformers' sdpa for every model)
            f"name={name!r} is transformers' own attention implementation or another "
            "library's; register attnlab under a name of its own (default 'attnlab')"
        )
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or "flash" in name.lower():
        raise ValueError(  # ('org/x' made transformers fetch a Hub kernel, 'flash...' fa2)
            f"name={name!r} would not reach attnlab: transformers reads a '/' as a Hub "
            "kernel to download, 'flash' as flash attention and 'paged|' as its own prefix; "
            "expected letters, digits, '_', '.' or '-' (default 'attnlab')"
        )

    @as_written(PLANS)
    def forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                attention_mask: Any, **kwargs: Any) -> tuple[Tensor, Tensor | None]:  # fmt: skip
        return attention_forward(module, query, key, value, attention_mask, engine=engine, **kwargs)

    AttentionInterface.register(name, forward)
    AttentionMaskInterface.register(name, as_written(PLANS)(build_mask))
    _NAMES[name] = engine
    _pass_built_masks()
    _refuse_own_attention()
    return name


def _refuse_own_attention() -> None:
    """Make a model that computes attention in its own code refuse an attnlab name.

    transformers accepts any registered ``attn_implementation`` for every model, but a
    model whose attention layers do not call ``ALL_ATTENTION_FUNCTIONS`` (BLOOM, GPT-Neo,
    XLNet, ...) never reaches attnlab: it runs its own attention silently, adds
    attnlab's mask to a tensor, or looks the name up in its own table, and fails far
    from the cause. transformers checks the implementation at the start of each model's
    construction (also under ``from_pretrained``); that check now raises a
    ``ValueError`` naming the model, by transformers' own test of whether a model
    follows its attention interface (``_can_set_attn_implementation``). Each (sub-)model's
    resolved implementation also refuses layers from its own table of classes
    (:func:`_refuse_in_class_tables`). Installed once.
    """
    from transformers import PreTrainedModel

    own = PreTrainedModel._check_and_adjust_attn_implementation
    if getattr(own, "refuses_own_attention", False):
        return

    def check(self: Any, *args: Any, **kwargs: Any) -> Any:
        name = own(self, *args, **kwargs)
        if isinstance(name, str) and name in _NAMES and _computes_own_attention(type(self)):
            raise ValueError(
                f"attn_implementation={name!r}: {type(self).__name__} computes attention in "
                f"its own code, not through transformers' AttentionInterface, so attnlab "
                f"cannot serve it; load it with attn_implementation='eager' {COMPOSITE}"
            )
        if isinstance(name, str) and name in _NAMES:
            check_partly_own(self, name)
        return name

    # every model's implementation passes here: at construction, and for each sub-model
    # when a built model is switched (set_attn_implementation)
    correct = PreTrainedModel.get_correct_attn_implementation

    def correct_and_check(self: Any, *args: Any, **kwargs: Any) -> Any:
        name = correct(self, *args, **kwargs)
        if isinstance(name, str) and name in _NAMES:
            _refuse_in_class_tables(self, name)
        return name

    check.refuses_own_attention = True  # type: ignore[attr-defined]
    PreTrainedModel._check_and_adjust_attn_implementation = check
    PreTrainedModel.get_correct_attn_implementation = correct_and_check


def _refuse_in_class_tables(model: nn.Module, name: str) -> None:
    """Refuse ``name`` for attention layers that ``model``'s module picks by name from a
    table of classes (GIT's ``GIT_SELF_ATTENTION_CLASSES``, SAM's vision tables), which
    compute attention in their own code: such layers, built under ``name``, would fail
    with ``KeyError: 'attnlab'``, and ones already built would go on without attnlab.

    A model that holds such layers already (``set_attn_implementation``) raises a
    ``ValueError`` now; for one being built, the table gets an entry under ``name`` that
    raises it when such a layer is built. Sub-models given another implementation (a
    dict), and the module's models whose layers call the interface, are built as before.
    """
    import sys

    cls = type(model)
    module = sys.modules.get(cls.__module__)
    for table_name, table in list(vars(module).items()) if module is not None else []:
        if not _is_class_table(table):
            continue
        offered = [k for k, c in table.items() if getattr(c, "serves", True)]
        if name in offered:
            continue
        why = (
            f"attn_implementation={name!r}: {cls.__module__} builds attention layers from "
            f"its own table {table_name} ({', '.join(offered)}), whose classes compute "
            f"attention in their own code, so attnlab cannot serve them; use one of those "
            f"{COMPOSITE}"
        )
        classes = tuple(c for c in table.values() if isinstance(c, type))
        if any(isinstance(m, classes) for m in _own_modules(model)):
            raise ValueError(why)

        if name not in table:

            def refuse(*_: Any, _why: str = why, **__: Any) -> Any:
                raise ValueError(_why)

            refuse.serves = False  # type: ignore[attr-defined]
            table[name] = refuse


def _own_modules(model: nn.Module) -> Iterator[nn.Module]:
    """``model``'s modules that follow its own config: not those of a sub-model with a
    config of its own (a composite's vision tower), which transformers checks apart.
    None while ``model`` is being built."""
    from transformers import PreTrainedModel

    stack = list(model.children()) if "_modules" in vars(model) else []
    while stack:
        m = stack.pop()
        yield m
        if not isinstance(m, PreTrainedModel) or m.config is model.config:
            stack.extend(m.children())


def _is_class_table(table: object) -> bool:
    """Whether ``table`` maps implementation names (``"eager"`` at least) to layer classes."""
    if not isinstance(table, dict) or not isinstance(table.get("eager"), type):
        return False
    return issubclass(table["eager"], nn.Module)


def _computes_own_attention(cls: Any) -> bool:
    """Whether transformers' source test says ``cls``'s attention layers do not call its
    attention interface. A class whose source cannot be read (defined in a REPL or a
    notebook, where transformers' test says no) is trusted."""
    import inspect
    import sys

    try:
        inspect.getsource(sys.modules[cls.__module__])
    except (KeyError, OSError, TypeError):
        return False
    return not cls._can_set_attn_implementation()


def _pass_built_masks() -> None:
    """Let transformers' mask functions hand back an attnlab mask they are given.

    With a compileable cache (``cache_implementation="static"``), ``generate()`` builds
    each step's mask before the forward (through :func:`build_mask`) and the model hands it
    to its mask function again, which passes a prepared 4-D tensor or ``BlockMask`` through
    unchanged but reads anything else as a 2-D padding mask. An attnlab mask is prepared
    too, so it passes through the same way; every other argument goes on to transformers'
    own preprocessing, noting for :func:`build_mask` whether the request has position ids
    (OPT, BioGPT, gpt-oss build their masks without them). Installed once.
    """
    import transformers.masking_utils as mu

    own = getattr(mu, "_preprocess_mask_arguments", None)
    if own is None or getattr(own, "passes_attnlab_masks", False):
        return

    def preprocess(config: Any, inputs_embeds: Any, attention_mask: Any, *a: Any, **kw: Any) -> Any:
        if not isinstance(attention_mask, Mask):
            pos = kw.get("position_ids", a[1] if len(a) > 1 else None)  # (cache, position_ids)
            _REQUEST.given_positions = pos is not None
            return own(config, inputs_embeds, attention_mask, *a, **kw)
        # built already: answered as a prepared 4-D mask is, in this version's own form
        early = own(config, inputs_embeds, torch.empty(0, 0, 0, 0), *a, **kw)
        return (early[0], attention_mask, *early[2:])

    preprocess.passes_attnlab_masks = True  # type: ignore[attr-defined]
    mu._preprocess_mask_arguments = preprocess


def build_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Any = None,
    attention_mask: Tensor | None = None,
    **kwargs: Any,
) -> Mask | Tensor | None:
    """transformers' mask request as an attnlab mask (None: every pair attends), or as a
    dense tensor for a model that reads it as one (``hf_masks.TENSOR_MASK_MODELS``).

    Registered as the ``"attnlab"`` mask builder; the model hands its result to
    :func:`attention_forward`. ``attention_mask`` is the 2-D padding ``(B, >= kv_offset + Lk)``.

    Example:
        >>> from transformers.masking_utils import causal_mask_function
        >>> build_mask(1, 3, 3, mask_function=causal_mask_function).spec()
        'causal()'
    """
    given, _REQUEST.given_positions = _REQUEST.given_positions is not False, None
    forget_packing()  # a new forward: its position ids are looked at afresh
    if mask_function is None:
        from transformers.masking_utils import causal_mask_function

        mask_function = causal_mask_function
    q_offset, kv_offset = int(q_offset), int(kv_offset)  # tensors under some caches
    call = MaskCall(
        batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask
    )
    mask = for_model(translate(call), call, *map(kwargs.get, ("config", "device", "dtype")))
    if isinstance(mask, Mask):
        _BUILT_FOR[mask] = (kv_length, given)
        # it stands for a prepared (B, H, Lq, Lk) mask: models that branch on the rank of
        # the mask they are handed (GPT-2, given generate()'s mask for a static cache) read 4
        setattr(mask, "ndim", 4)  # noqa: B010
    return mask


def attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Mask | Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    engine: str = "auto",
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """transformers' attention-function contract on :func:`attnlab.attention`.

    Args:
        module: the calling attention module, read only for its model type (a sink's
            weights), an indexer's block size and the names in errors.
        query: ``(B, Hq, Lq, E)``.
        key, value: ``(B, Hkv, Lk, E)``, ``(B, Hkv, Lk, Ev)`` (GQA: not repeated).
        attention_mask: an attnlab mask from :func:`build_mask`, None, a bool tensor
            ``(B, 1, Lq, >= Lk)`` (True = attend) or an additive float tensor.
        scaling: the score scale (default ``1/sqrt(E)``).
        dropout: dropout on the weights (the model passes 0 in eval mode).
        softcap: logit soft-capping ``cap * tanh(s / cap)`` (Gemma 2), or None.
        engine: the attnlab engine (``"auto"``: the fastest exact one).
        kwargs: ``output_attentions=True`` asks for the weights; ``s_aux`` are attention
            sinks ``(Hq,)`` (gpt-oss), ``sinks`` one per query row ``(B, Hq, Lq, 1)``
            (Inkling 2); ``position_ids`` mark packed sequences (see
            :func:`with_packing`); ``position_bias`` is the model's additive score bias
            ``(B or 1, Hq, Lq, Lk)`` (T5, Inkling); ``indices (B, Lq, topk)`` are the keys
            a sparse-attention indexer kept for each query (DeepSeek-V3.2's DSA), and
            ``block_indices`` the key blocks (MiniMax M3, with ``module.indexer.block_size``);
            ``sliding_window`` is already in the mask; options attnlab does not compute
            (a head mask) raise ``ValueError``.

    Returns:
        ``(out (B, Lq, Hq, Ev), weights (B, Hq, Lq, Lk) or None)``, as transformers'
        eager attention returns them.

    Example:
        >>> q = k = v = torch.randn(1, 2, 5, 8)
        >>> out, w = attention_forward(None, q, k, v, None, output_attentions=True)
        >>> out.shape, w.shape
        (torch.Size([1, 5, 2, 8]), torch.Size([1, 2, 5, 5]))
    """
    for name in _REFUSED:
        if kwargs.get(name) is not None:
            raise ValueError(
                f"the attnlab backend cannot compute {name!r} (a model option outside "
                f"attnlab's attention); load this model with attn_implementation='eager'"
            )
    built = _BUILT_FOR.get(attention_mask) if isinstance(attention_mask, Mask) else None
    if built is not None and built[0] != key.shape[-2]:  # the model added keys the mask misses
        raise ValueError(
            f"attention_mask: built for {built[0]} keys, but {type(module).__name__} attends to "
            f"{key.shape[-2]}: the model changed its keys after its mask was made, which an "
            f"attnlab mask cannot follow; load this model with attn_implementation='eager'"
        )
    if attention_mask is None and decoding_step(query, key, dropout, softcap, engine, kwargs):
        out = attention_plain(query, key, value, scaling)  # no request: see attnlab.attention
        if out is not None:
            return out.transpose(1, 2).contiguous(), None  # (B, Lq, Hq, Ev)
    mask, bias = mask_and_bias(attention_mask, key.shape[-2])
    if bias is None and not isinstance(mask, Tensor) and (built is None or built[1]):
        mask = with_packing(mask, kwargs.get("position_ids"), query.shape[-2], key.shape[-2])
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    mask = with_cu_seq_lens(mask, cu_q, cu_k, query.shape[-2], key.shape[-2])
    mask = with_indices(mask, kwargs.get("indices"), key.shape[-2])
    if kwargs.get("block_indices") is not None:  # the block size only then: a hot path
        size = getattr(getattr(module, "indexer", None), "block_size", None)
        mask = with_block_indices(
            mask, kwargs["block_indices"], size, query.shape[1], key.shape[-2]
        )
    bias = with_position_bias(bias, kwargs.get("position_bias"))
    want = bool(kwargs.get("output_attentions", False)) or collecting_attentions()
    graph = want and torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    sinks = sinks_of(kwargs.get("s_aux"), kwargs.get("sinks"))
    args: dict[str, Any] = {"mask": mask, "bias": bias, "scale": scaling, "softcap": softcap}
    args |= {"sinks": sinks, "dropout_p": float(dropout)}
    args["engine"] = "reference" if graph else engine
    out, weights = _attend(query, key, value, want, args)  # reference: weights in the graph
    return out.transpose(1, 2).contiguous(), eager_weights(module, weights, sinks)


def _attend(
    query: Tensor, key: Tensor, value: Tensor, want: bool, args: dict[str, Any]
) -> tuple[Tensor, Tensor | None]:
    """:func:`attnlab.attention`'s output, and its weights if ``want``. Under
    ``torch.autocast`` with weights asked for, q, k and v are rounded to its dtype (as
    eager's matmuls take them) and computed in float32, so the weights keep the precision
    of eager's float32 softmax (in bfloat16 they were 2e-3 off a float64 run, eager's
    1e-4): the output in autocast's dtype, the weights in the query's, as eager's."""
    kind = query.device.type
    low = autocast_dtype(kind) if want and kind in ("cpu", "cuda") else None
    if low is None:
        r = attention(query, key, value, **args, return_weights=want)
        return (r.out, r.weights) if isinstance(r, AttentionOutput) else (r, None)
    qkv = [t if t.dtype == torch.float64 else t.to(low).float() for t in (query, key, value)]
    with no_autocast(kind):
        r = attention(*qkv, **args, return_weights=True)
    assert isinstance(r, AttentionOutput) and r.weights is not None
    return r.out.to(low), r.weights.to(query.dtype)
