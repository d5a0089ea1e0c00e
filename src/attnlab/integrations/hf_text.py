"""A local transformers model folder as an :class:`attnlab.interpret.TextModel`.

The model runs on the attnlab backend (``attn_implementation="attnlab"``), so
:func:`attnlab.interpret.explain_text`, :class:`~attnlab.interpret.capture`, rollout,
gradient relevance and integrated gradients see every one of its attention calls.

* An encoder (BERT-like; ``architectures`` not a causal LM): the explained score is the
  mean-pooled embedding's length along its own direction, as for attnlab's sentence
  encoder.
* A decoder (``*ForCausalLM``, ``*LMHeadModel``): the "embedding" is the log-probability of
  the greedy next token after the text, or of ``continuation`` after it, so the explained
  score is that log-probability's size, ``-log p`` (how unexpected the model finds it;
  attributions of ``log p`` itself are the same with the opposite sign).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab._io import first_names
from attnlab.integrations.transformers import register
from attnlab.interpret import TextModel

__all__ = [
    "decoder_ids",
    "encoder_class",
    "hf_text_model",
    "is_decoder",
    "is_seq2seq",
    "load_hf",
    "load_hf_model",
    "load_hf_tokenizer",
]


def is_decoder(config: Any) -> bool:
    """Whether a transformers config describes a causal language model: an architecture
    named as one, or the class transformers' ``AutoModelForCausalLM`` maps the model type to
    (Gemma 3's ``Gemma3ForConditionalGeneration``, read as an encoder by its name alone).

    Example:
        >>> from transformers import BertConfig, Gemma3Config, GPT2Config
        >>> is_decoder(GPT2Config(architectures=["GPT2LMHeadModel"])), is_decoder(BertConfig())
        (True, False)
        >>> is_decoder(Gemma3Config(architectures=["Gemma3ForConditionalGeneration"]))
        True
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = getattr(config, "architectures", None) or []
    causal = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(config, "model_type", None))
    return any(n.endswith(("ForCausalLM", "LMHeadModel")) or n == causal for n in names)


def encoder_class(config: Any) -> type[Any] | None:
    """The encoder-only class ``config.architectures`` names (``T5EncoderModel``,
    ``MT5EncoderModel``, ``UMT5EncoderModel``) when transformers has it for this config;
    ``AutoModel`` made the whole encoder-decoder of such a folder, and its decoder's tensors
    were missing. None for other architectures.

    Example:
        >>> from transformers import BertConfig, T5Config
        >>> encoder_class(T5Config(architectures=["T5EncoderModel"])).__name__
        'T5EncoderModel'
        >>> encoder_class(T5Config(architectures=["T5Model"])), encoder_class(BertConfig())
        (None, None)
    """
    import transformers as t

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(t, name, None) if name.endswith("EncoderModel") else None
        if isinstance(cls, type) and isinstance(config, getattr(cls, "config_class", ())):
            return cls
    return None


def is_seq2seq(config: Any) -> bool:
    """Whether a config describes an encoder-decoder that its folder holds whole (an
    encoder-only ``T5EncoderModel``'s config may still say ``is_encoder_decoder``).

    Example:
        >>> from transformers import T5Config
        >>> is_seq2seq(T5Config()), is_seq2seq(T5Config(architectures=["T5EncoderModel"]))
        (True, False)
    """
    return bool(getattr(config, "is_encoder_decoder", False)) and encoder_class(config) is None


def _text_and_vision(config: Any) -> str | None:
    """The refusal of a text-and-vision (or audio) composite that is no causal LM (CLIP,
    SigLIP: transformers raised NotImplementedError on its input embeddings), naming the
    text model to save alone where transformers has one; None for other configs."""
    towers = [n for n in ("vision_config", "audio_config") if getattr(config, n, None)]
    if not towers or is_decoder(config):
        return None
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    text = getattr(getattr(config, "text_config", None), "model_type", None)
    tower = MODEL_MAPPING_NAMES.get(text) if text else None
    names = getattr(config, "architectures", None) or [config.model_type]
    return (
        f"is a composite of a text model and {towers[0].removesuffix('_config')} model "
        f"({names[0]}); explain takes a text encoder or a decoder-only model"
        + (f": save its text model alone ({tower})" if tower else "")
    )


def load_hf(folder: str | Path) -> tuple[nn.Module, Any]:
    """The model (on the attnlab backend, eval mode) and tokenizer in a local folder.

    ``ValueError`` naming the folder when it holds no config, no tokenizer, no safetensors
    weights, an encoder-decoder or a text-and-vision composite (which the explanations do
    not handle).
    """
    config, tokenizer = load_hf_tokenizer(folder)
    return load_hf_model(folder, config), tokenizer


def load_hf_tokenizer(folder: str | Path) -> tuple[Any, Any]:
    """The config and tokenizer in a local folder, with every check of :func:`load_hf`
    that needs no weights: a text can be measured before the model loads.

    Example:
        >>> from attnlab.models.pretrained import minilm_path  # needs attnlab[pretrained]
        >>> config, tok = load_hf_tokenizer(minilm_path())
        >>> config.max_position_embeddings, tok("Cats purr.")["input_ids"][:2]
        (512, [101, 8870])
    """
    import transformers as t

    path = Path(folder)
    if not (path / "config.json").is_file():
        raise ValueError(f"--hf-model: {str(path)!r} holds no config.json (a local model folder)")
    for file in path.iterdir():  # transformers said "No such file or directory"
        if file.is_file() and not os.access(file, os.R_OK):
            raise ValueError(f"--hf-model: {str(file)!r} cannot be read (permission denied)")
    config = t.AutoConfig.from_pretrained(path)
    if is_seq2seq(config):
        raise ValueError(
            f"--hf-model: {str(path)!r} is an encoder-decoder ({config.model_type}); "
            f"explain takes an encoder or a decoder-only model"
        )
    if (composite := _text_and_vision(config)) is not None:
        raise ValueError(f"--hf-model: {str(path)!r} {composite}")
    try:
        tokenizer = t.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"--hf-model: no tokenizer in {str(path)!r}: {e}") from e
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)):  # transformers 5 made one of
        # the special tokens alone from the config, and every word became [UNK] or nothing
        raise ValueError(
            f"--hf-model: no tokenizer in {str(path)!r}: it holds no tokenizer files "
            f"(only {len(tokenizer)} special tokens could be made)"
        )
    _check_weights(path)
    return config, tokenizer


def load_hf_model(folder: str | Path, config: Any) -> nn.Module:
    """The weights in ``folder`` (checked by :func:`load_hf_tokenizer`, which gives
    ``config``) as a model on the attnlab backend, in eval mode."""
    import transformers as t

    _check_layer_count(Path(folder), config)
    auto = t.AutoModelForCausalLM if is_decoder(config) else encoder_class(config) or t.AutoModel
    report = _Captured()  # its multi-line report of the keys: one line below
    root = logging.getLogger("transformers")
    handlers, root.handlers = root.handlers, [report]
    try:
        model, info = auto.from_pretrained(
            folder, attn_implementation=register(), use_safetensors=True, output_loading_info=True
        )
    except RuntimeError as e:  # (exit 1 after a dump: "ignore_mismatched_sizes")
        if "ignore_mismatched_sizes" not in str(e):
            raise
        raise _misfit(Path(folder), [], report.mismatched()) from e
    finally:
        root.handlers = handlers
    _check_loaded(Path(folder), info)
    _check_dtypes(Path(folder), model)
    return model.eval()


def _check_loaded(path: Path, info: dict[str, Any]) -> None:
    """A ValueError naming the tensors the weights lack (transformers initialized them at
    random, and a random model was explained); a missing pooler (the explanations read the
    hidden states) is let through."""
    missing = sorted(k for k in info["missing_keys"] if "pooler" not in k.split("."))
    shaped = sorted(k for k, *_ in info["mismatched_keys"])
    if missing or shaped:
        raise _misfit(path, missing, shaped)


def _misfit(path: Path, missing: list[str], shaped: list[str]) -> ValueError:
    """The error for weights that lack or mis-shape the named tensors."""
    parts = [
        f"{kind} {len(names)}: " + ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        for kind, names in (("missing", missing), ("mis-shaped", shaped))
        if names
    ]
    return ValueError(
        f"--hf-model: the weights in {str(path)!r} do not fit its config.json: "
        + ("; ".join(parts) or "mis-shaped tensors")
    )


class _Captured(logging.Handler):
    """transformers' log lines while a model loads, kept (its load report named the
    mis-shaped tensors in a table on stderr)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines += record.getMessage().splitlines()

    def mismatched(self) -> list[str]:
        """The tensors the report's table marks MISMATCH."""
        return [ln.split("|")[0].strip() for ln in self.lines if "| MISMATCH" in ln]


def _header(path: Path) -> dict[str, str]:
    """The tensors of the folder's ``*.safetensors`` files and their dtypes (``"F32"``,
    ``"I8"``), from the headers alone."""
    from safetensors import safe_open

    out: dict[str, str] = {}
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            out |= {k: f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118
    return out


def _check_layer_count(path: Path, config: Any) -> None:
    """A ValueError when config.json asks for more layers than the weights hold tensors
    (``num_hidden_layers`` of 10**7 built the model for minutes, eating gigabytes)."""
    layers = getattr(config, "num_hidden_layers", None)
    count = len(_header(path)) if isinstance(layers, int) else 0
    if count and isinstance(layers, int) and layers > count:
        raise ValueError(
            f"--hf-model: {str(path)!r} config.json has num_hidden_layers={layers}, more "
            f"than the {count} tensors its weights hold"
        )


def _check_dtypes(path: Path, model: nn.Module) -> None:
    """A ValueError naming the tensors stored as integers or bools where the model's are
    floating-point (transformers cast an int8 weight to float and the model ran)."""
    own, prefix = model.state_dict(), getattr(model, "base_model_prefix", "") + "."
    bad = []
    for key, dtype in _header(path).items():
        names = (key, key.removeprefix(prefix), prefix + key)
        ours = next((own[n] for n in names if n in own), None)
        if ours is not None and ours.is_floating_point() and not dtype.startswith(("F", "BF")):
            bad.append(f"{key} ({dtype})")
    if bad:
        raise ValueError(
            f"--hf-model: the weights in {str(path)!r} do not fit its config.json: not "
            f"floating-point {len(bad)}: {first_names(bad)}"
        )


def _check_weights(path: Path) -> None:
    """Safetensors weights in the folder, or a ValueError before anything loads (a folder
    with only ``pytorch_model.bin`` was unpickled; one with no weights at all explained a
    randomly initialized model)."""
    if any(path.glob("*.safetensors")) or any(path.glob("*.safetensors.index.json")):
        return
    pickled = sorted(f.name for f in path.glob("*.bin")) + sorted(f.name for f in path.glob("*.pt"))
    hint = (
        f"; {', '.join(pickled)} is there, but attnlab never unpickles weights: convert it "
        "to safetensors first (model.save_pretrained(dir) writes model.safetensors)"
        if pickled
        else ""
    )
    raise ValueError(f"--hf-model: {str(path)!r} holds no model.safetensors{hint}")


def token_text(tokenizer: Any, i: int) -> str:
    """The text token ``i`` stands for, as a picture labels it: byte-level BPE's vocabulary
    strings decoded (``"ĠcafÃ©"`` is ``" café"``), spaces alone shown as ``"␣"``, and the
    vocabulary string itself where it decodes to part of a character (half an emoji).

    Example:
        >>> from types import SimpleNamespace
        >>> tok = SimpleNamespace(convert_ids_to_tokens=lambda i: "Ġ",
        ...                       convert_tokens_to_string=lambda ts: " ")
        >>> token_text(tok, 7)
        '␣'
    """
    raw = tokenizer.convert_ids_to_tokens(i)
    try:
        text = tokenizer.convert_tokens_to_string([raw])
    except (AttributeError, KeyError, TypeError, ValueError):  # no decoder: its own strings
        return str(raw)
    if "\ufffd" in text or not text:
        return str(raw)
    return text if text.strip() else text.replace(" ", "␣")


def hf_text_model(
    model: nn.Module, tokenizer: Any, *, text: str = "", continuation: str | None = None
) -> TextModel:
    """``model`` (on the attnlab backend) as the explanations see it.

    Args:
        model: a transformers encoder or causal LM whose ``attn_implementation`` is attnlab.
        tokenizer: its tokenizer.
        text: (decoders) the text whose greedy next token is explained, when no
            ``continuation`` is given.
        continuation: (decoders) explain the log-probability of this text after the text.

    Example:
        >>> from attnlab.models.pretrained import minilm_path  # needs attnlab[pretrained]
        >>> model, tok = load_hf(minilm_path())
        >>> tm = hf_text_model(model, tok)
        >>> [tm.token_name(i) for i in tm.tokenize("Cats purr.")]
        ['[CLS]', 'cats', 'pu', '##rr', '.', '[SEP]']
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    common: dict[str, Any] = {
        "network": model,
        "token_name": lambda i: token_text(tokenizer, int(i)),
        "input_embeddings": _input_embeddings(model),
        "pad_id": int(pad),
    }
    first, last = _special_ends(tokenizer)  # GPT-2 adds neither: its ends are words
    common["keep_first"] = first
    if not is_decoder(model.config):

        def pooled(ids: Tensor) -> Tensor:
            return model(input_ids=ids).last_hidden_state.mean(1)  # (B, D)

        tokenize = lambda s: tokenizer(s)["input_ids"]  # noqa: E731
        return TextModel(
            tokenize=tokenize,
            pooled=pooled,
            embed=lambda ids: F.normalize(pooled(ids), dim=-1),
            pooling="mean",
            keep_last=int(last),
            **common,
        )
    follow = _continuation(model, tokenizer, text, continuation)
    return TextModel(
        tokenize=lambda s: [*decoder_ids(tokenizer, s), *follow],
        pooled=lambda ids: _log_prob(model, ids, len(follow)),
        embed=lambda ids: _log_prob(model, ids, len(follow)),
        pooling="next",  # saliency: the rows the log-probabilities are read from
        keep_last=len(follow),
        scored=tokenizer.decode(follow).strip(),
        **common,
    )


def _input_embeddings(model: nn.Module) -> nn.Module:
    """The word-embedding module ``model``'s forward calls: T5EncoderModel's
    ``get_input_embeddings()`` names ``shared``, but the forward calls its encoder's
    ``embed_tokens``, which shares the weight (integrated gradients' hook on ``shared``
    "did not obtain any outputs"). A model that names none (a composite) is a ValueError."""
    try:
        words = model.get_input_embeddings()  # type: ignore[operator]
    except NotImplementedError as e:  # transformers' own, raw: exit 1
        raise ValueError(
            f"--hf-model: {type(model).__name__} has no word embeddings explain can read; "
            f"explain takes a text encoder or a decoder-only model"
        ) from e
    inner = getattr(getattr(model, "encoder", None), "embed_tokens", None)
    same = getattr(inner, "weight", None) is getattr(words, "weight", 0)
    return inner if isinstance(inner, nn.Module) and same else words


def _special_ends(tokenizer: Any) -> tuple[bool, bool]:
    """Whether the tokenizer puts a special token ([CLS], <s>) before the text's tokens,
    and one ([SEP], </s>) after them: the baseline keeps those, and pads words.

    Example:
        >>> def bert(s, add_special_tokens=True):  # [CLS] a [SEP]
        ...     return {"input_ids": [101, 7, 102] if add_special_tokens else [7]}
        >>> def gpt2(s, add_special_tokens=True):  # a
        ...     return {"input_ids": [7]}
        >>> _special_ends(bert), _special_ends(gpt2)
        ((True, True), (False, False))
    """
    plain, marked = _sample_ids(tokenizer)
    return bool(marked) and marked[:1] != plain[:1], bool(marked) and marked[-1:] != plain[-1:]


def _sample_ids(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids of the text ``"a"`` without and with the tokenizer's special tokens: what
    it adds around a text."""
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    return plain, list(tokenizer("a")["input_ids"])


def decoder_ids(tokenizer: Any, text: str, **kwargs: Any) -> list[int]:
    """``text``'s token ids as a decoder continues it: the tokenizer's special tokens
    before the text (BOS) kept, those it appends after it (EOS, as ``add_eos_token`` or a
    ``<s> $A </s>`` template add) dropped, as the model would never go on after them.

    Example:
        >>> def llama(s, add_special_tokens=True, **kw):  # <s> a </s>
        ...     return {"input_ids": [1, 7, 2] if add_special_tokens else [7]}
        >>> decoder_ids(llama, "a")
        [1, 7]
    """
    plain, marked = _sample_ids(tokenizer)
    after = 0  # the tokens appended after the text's own
    for i in range(len(marked) - len(plain) + 1):
        if marked[i : i + len(plain)] == plain:
            after = len(marked) - i - len(plain)
            break
    ids = list(tokenizer(text, **kwargs)["input_ids"])
    return ids[: len(ids) - after]


def _continuation(model: nn.Module, tokenizer: Any, text: str, cont: str | None) -> list[int]:
    """The token ids to explain after the text: ``cont``'s, else the greedy next token."""
    if cont is not None:
        ids = tokenizer(cont, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"continuation={cont!r} has no tokens")
        return list(ids)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([decoder_ids(tokenizer, text)])).logits
    return [int(logits[0, -1].argmax())]


def _log_prob(model: nn.Module, ids: Tensor, m: int) -> Tensor:
    """``(B, 1)`` log-probability of the last ``m`` tokens of ``ids (B, n)`` given the rest."""
    logits = model(input_ids=ids).logits[:, -m - 1 : -1]  # (B, m, V): each predicts the next
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)
    return logp.gather(-1, ids[:, -m:, None]).sum((1, 2)).unsqueeze(-1)
