"""A decoder-only language model with RoPE and KV-cache sampling.

Token ids ``(B, L)`` in, next-token logits ``(B, L, V)`` out. :meth:`LanguageModel.generate`
runs the prompt through the model once (the prefill, which fills every layer's KV cache)
and then feeds one new token per step; :func:`sample_logits` turns a step's logits into
tokens with temperature, top-k and top-p (nucleus) sampling, or greedily at temperature 0.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab._validate import (
    nonnegative_int,
    plain_fields,
    positive_int,
    positive_real,
    validate_flag,
)
from attnlab.models._ids import check_id_dtype, check_vocab
from attnlab.nn import DecoderCache, DecoderOnly, LayerConfig
from attnlab.positional import RotaryEmbedding

__all__ = ["LMConfig", "LanguageModel", "filter_logits", "sample_logits"]


@dataclass
class LMConfig:
    """Sizes of a :class:`LanguageModel` (saved in its checkpoints).

    Attributes:
        vocab_size: ``V``, token ids ``0 .. V-1``.
        d_model, num_heads, num_layers, dim_feedforward: the decoder stack's widths
            (``dim_feedforward`` None: ``4 * d_model``).
        num_kv_heads: key/value heads (GQA); None: ``num_heads``.
        dropout: in the decoder layers.
        tie_weights: the output head reuses the token embedding (``logits = h @ E^T``).
        rope_base: RoPE's frequency base.

    Example:
        >>> cfg = LMConfig(vocab_size=11, d_model=16, num_heads=4, num_kv_heads=2)
        >>> lm = LanguageModel(cfg)
        >>> lm.head is None, LanguageModel(LMConfig(**lm.config())).cfg == cfg  # tied; rebuilt
        (True, True)
    """

    vocab_size: int
    d_model: int = 128
    num_heads: int = 4
    num_layers: int = 2
    dim_feedforward: int | None = None
    num_kv_heads: int | None = None
    dropout: float = 0.0
    tie_weights: bool = True
    rope_base: float = 10000.0

    def __post_init__(self) -> None:
        plain_fields(self)  # numpy scalars as Python's: the config stays JSON-able

    def layer_config(self) -> LayerConfig:
        """The decoder layers' config (pre-norm GELU with RoPE), after checking every size
        but ``vocab_size`` (a task checks them so before it builds its vocabulary)."""
        positive_int("d_model", self.d_model)
        heads = positive_int("num_heads", self.num_heads)
        if self.d_model % heads or self.d_model // heads % 2:  # (RoPE rotates feature pairs)
            raise ValueError(
                f"d_model={self.d_model} must be a multiple of num_heads={heads} with an even "
                f"head dim d_model // num_heads (RoPE), got {self.d_model / heads:g}"
            )
        positive_int("num_layers", self.num_layers)
        positive_real("rope_base", self.rope_base)  # (else named base, RotaryEmbedding's)
        ff = self.dim_feedforward
        return LayerConfig(
            self.d_model,
            heads,
            4 * self.d_model if ff is None else ff,
            num_kv_heads=self.num_kv_heads,
            dropout=self.dropout,
            activation="gelu",
            norm_first=True,
            rope=RotaryEmbedding(self.d_model // heads, base=self.rope_base),
        )


class _Embedding(nn.Embedding):
    """Token embeddings drawn ``N(0, 0.02**2)`` (GPT-2's), when built and by
    ``reset_parameters()`` (after a build on the meta device and ``to_empty``)."""

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.02)


class LanguageModel(nn.Module):
    """Token embedding, a RoPE :class:`~attnlab.nn.DecoderOnly` stack and an output head.

    Args:
        cfg: an :class:`LMConfig`.

    Example:
        >>> import torch
        >>> lm = LanguageModel(LMConfig(vocab_size=11, d_model=16, num_heads=2)).eval()
        >>> prompt = torch.tensor([[1, 5, 6]])
        >>> tuple(lm(prompt).shape)
        (1, 3, 11)
        >>> out = lm.generate(prompt, 4, temperature=0.0)
        >>> tuple(out.shape), out[0, :3].tolist()
        ((1, 7), [1, 5, 6])
    """

    #: the ids :meth:`generate` hands :meth:`forward` and their version, which need no
    #: check there unless changed in place since (a forward pre-hook's ``fill_(99)``)
    _own_ids: tuple[Tensor, int | None] | None = None

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        positive_int("vocab_size", cfg.vocab_size)
        layer = cfg.layer_config()  # pre-norm GELU layers with RoPE
        self.cfg = cfg
        self.embed = _Embedding(cfg.vocab_size, cfg.d_model)
        self.decoder = DecoderOnly(layer, cfg.num_layers)
        # Tied: no head module, so the state dict holds the shared matrix once (safetensors
        # refuses tensors that share memory).
        tied = validate_flag("tie_weights", cfg.tie_weights)  # ("False" tied them)
        self.head = None if tied else nn.Linear(cfg.d_model, cfg.vocab_size, False)

    def config(self) -> dict[str, object]:
        """The JSON-able config that rebuilds this model."""
        return asdict(self.cfg)

    def new_cache(self) -> DecoderCache:
        """An empty KV cache (one per decoder layer) for :meth:`forward` with ``cache``."""
        return self.decoder.new_cache()

    def forward(self, ids: Tensor, *, cache: DecoderCache | None = None) -> Tensor:
        """Next-token logits ``(B, L, V)`` for token ids ``ids (B, L)``.

        With ``cache`` the ids are the new tokens only; their positions continue from the
        cache length (RoPE) and they attend to every cached token.
        """
        if not self._owns(ids):  # generate's own, unchanged: checked, or drawn in range
            _check_ids(ids, self.cfg.vocab_size)
        h = self.decoder(self.embed(ids), cache=cache)  # (B, L, D)
        if self.head is None:  # tied: the embedding is the output weight (V, D)
            return F.linear(h, self.embed.weight)  # (B, L, V)
        return self.head(h)  # (B, L, V); a module call, so a quantized head works too

    def _owns(self, ids: Tensor) -> bool:
        """Whether ``ids`` are what :meth:`generate` handed :meth:`forward`, unchanged."""
        own = self._own_ids
        return own is not None and ids is own[0] and _version(ids) == own[1]

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        eos_id: int | None = None,
    ) -> Tensor:
        """Continue each prompt by up to ``max_new_tokens`` tokens.

        One forward pass over the whole prompt fills the KV cache; then each step feeds
        only the last token. Sampling follows :func:`sample_logits` (greedy when
        ``temperature == 0``).

        Args:
            prompt_ids: ``(B, P)`` (or ``(P,)``) token ids, ``P >= 1``.
            max_new_tokens: tokens to add at most.
            temperature, top_k, top_p, generator: see :func:`sample_logits`.
            eos_id: a token id in ``[0, V)``; once a row produces it, the row repeats it;
                generation stops when every row has. None: always ``max_new_tokens``.

        Returns:
            ``(B, P + T)`` (or ``(P + T,)``): the prompt followed by the ``T`` new tokens.
        """
        one_row = isinstance(prompt_ids, Tensor) and prompt_ids.dim() == 1
        ids = prompt_ids[None] if one_row else prompt_ids  # (B, P)
        _check_ids(ids, self.cfg.vocab_size, "prompt_ids")
        if ids.shape[1] == 0:
            raise ValueError("prompt_ids must hold at least one token (e.g. <bos>), got P=0")
        n = nonnegative_int("max_new_tokens", max_new_tokens)
        _check_sampling(temperature, top_k, top_p, generator)
        eos_id = _check_eos(eos_id, self.cfg.vocab_size)
        cache, out = self.new_cache(), [ids]
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)  # (B,)
        step_in = ids  # the prefill, then one token per step
        try:
            for _ in range(n):
                self._own_ids = (step_in, _version(step_in))  # forward skips its check
                logits = self(step_in, cache=cache)[:, -1]  # (B, V)
                nxt, bad = _draw(logits, temperature, top_k, top_p, generator)  # (B,) each
                if eos_id is not None:
                    nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                    done |= nxt == eos_id
                out.append(nxt[:, None])
                step_in = nxt[:, None]  # (B, 1)
                # the step's one read (each was a host-device sync on a GPU); an empty
                # batch's all() is True
                any_bad, all_done = torch.stack([bad.any(), done.all()]).tolist()
                if any_bad:
                    _check_rows(logits)  # raises, naming the row
                if eos_id is not None and all_done:
                    break
        finally:
            self._own_ids = None
        result = torch.cat(out, dim=1)  # (B, P + T)
        return result[0] if one_row else result


def _check_ids(ids: object, vocab_size: int, name: str = "ids") -> None:
    """Integer token ids ``(B, L)`` in ``[0, vocab_size)``."""
    if not isinstance(ids, Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor (B, L) of token ids, got {type(ids).__name__}"
        )
    check_id_dtype(name, ids)
    if ids.dim() != 2:
        raise ValueError(f"{name} must have shape (B, L), got shape {tuple(ids.shape)}")
    check_vocab(name, ids, "vocab_size", vocab_size)


def _check_eos(eos_id: object, vocab_size: int) -> int | None:
    """``eos_id`` as an int in ``[0, vocab_size)``, or None."""
    if eos_id is None:
        return None
    if isinstance(eos_id, bool) or not isinstance(eos_id, numbers.Integral):
        raise TypeError(
            f"eos_id must be an int in [0, {vocab_size}) or None, got {eos_id!r} "
            f"({type(eos_id).__name__})"
        )
    eos = int(eos_id)
    if not 0 <= eos < vocab_size:
        raise ValueError(f"eos_id must be an int in [0, {vocab_size}), got {eos}")
    return eos


def _check_sampling(temperature: object, top_k: object, top_p: object, generator: object) -> None:
    """``temperature >= 0`` finite, ``top_k`` a positive int, ``top_p`` in ``(0, 1]``."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a float >= 0, got {type(temperature).__name__}")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite float >= 0 (0 = greedy), got {temperature}")
    if top_k is not None:
        positive_int("top_k", top_k)
    if top_p is not None:
        if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real):
            raise TypeError(f"top_p must be a float in (0, 1] or None, got {type(top_p).__name__}")
        if not 0.0 < float(top_p) <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}"
        )


def _check_logits(logits: object) -> None:
    """``logits`` a floating-point tensor ``(..., V)`` with ``V >= 1``."""
    if not isinstance(logits, Tensor) or not logits.is_floating_point() or logits.dim() < 1:
        seen = (
            f"{logits.dtype} {tuple(logits.shape)}"
            if isinstance(logits, Tensor)
            else type(logits).__name__
        )
        raise TypeError(f"logits must be a floating-point tensor (..., V), got {seen}")
    if logits.shape[-1] == 0:
        raise ValueError(
            f"logits must have at least one token (V >= 1), got shape {tuple(logits.shape)}"
        )


def _version(t: Tensor) -> int | None:
    """``t``'s version counter, None for an inference tensor (which keeps none: an
    in-place change of it under ``torch.inference_mode`` goes unseen)."""
    return None if t.is_inference() else t._version


def _check_rows(logits: Tensor) -> None:
    """A ValueError naming the first row of ``logits (..., V)`` that no token can be drawn
    from: one holding NaN or +inf, or only -inf (torch's multinomial raised an unnamed
    RuntimeError; greedy decoding returned token 0 for an all -inf row)."""
    top = logits.amax(dim=-1)  # (...): NaN, +inf or -inf exactly where a row is bad
    bad = ~torch.isfinite(top)
    if bool(bad.any()):
        row = tuple(int(i) for i in bad.nonzero()[0])
        what = "NaN" if top[row].isnan() else "+inf" if top[row] > 0 else "only -inf"
        at = f"logits[{', '.join(map(str, row))}]" if row else "logits"
        raise ValueError(
            f"logits must hold a finite maximum in every row (no NaN or +inf, not all "
            f"-inf); {at} holds {what}"
        )


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Set the logits outside the top-k and then outside the top-p nucleus to ``-inf``.

    Top-k keeps exactly the ``k`` largest logits of each row (ties broken by
    ``torch.topk``). Top-p keeps the smallest set of most probable tokens whose
    probability (softmax of the top-k-filtered logits) reaches ``top_p``: a token stays
    when the mass of the tokens ranked before it is below ``top_p``, so the most probable
    token always stays.

    Args:
        logits: a floating-point tensor ``(..., V)``, ``V >= 1``.
        top_k: keep this many tokens per row (None or ``>= V``: all).
        top_p: the nucleus mass in ``(0, 1]`` (None or 1: all).

    Returns:
        ``(..., V)`` logits, ``-inf`` where filtered out.

    Example:
        >>> import torch
        >>> logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()
        >>> [round(p, 4) for p in filter_logits(logits, top_p=0.6).softmax(-1).tolist()]
        [0.5714, 0.4286, 0.0, 0.0]
        >>> filter_logits(logits, top_k=3).isinf().tolist()
        [False, False, False, True]
    """
    _check_logits(logits)
    _check_sampling(1.0, top_k, top_p, None)
    v = logits.shape[-1]
    if top_k is not None and top_k < v:
        idx = logits.topk(top_k, dim=-1).indices  # (..., k)
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, idx, True)
        logits = logits.masked_fill(~keep, -math.inf)
    if top_p is not None and top_p < 1.0:
        ranked, order = logits.sort(dim=-1, descending=True)  # (..., V)
        probs = ranked.softmax(dim=-1, dtype=torch.float64)  # (..., V)
        mass = probs.cumsum(dim=-1)  # shifted by one, not minus probs, which lost the last
        before = torch.cat([torch.zeros_like(mass[..., :1]), mass[..., :-1]], -1)  # ulp
        drop = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, order, before >= top_p)
        logits = logits.masked_fill(drop, -math.inf)
    return logits


def sample_logits(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw one token per row of ``logits``.

    The logits are divided by ``temperature``, filtered by :func:`filter_logits`
    (top-k, then top-p on the tempered distribution) and sampled from. ``temperature=0``
    returns the argmax (greedy decoding; ``top_k``/``top_p`` cannot change it).

    Args:
        logits: ``(..., V)`` unnormalized log-probabilities; each row's maximum finite
            (no NaN or +inf, not all -inf), else a ValueError naming the row.
        temperature: ``>= 0``; below 1 sharpens, above 1 flattens.
        top_k: keep the ``k`` most probable tokens (None: all).
        top_p: keep the smallest most-probable set with mass ``>= top_p`` (None: all).
        generator: a ``torch.Generator`` for reproducible draws.

    Returns:
        ``(...)`` int64 token ids.

    Example:
        >>> import torch
        >>> logits = torch.tensor([[2.0, 1.0, 0.5], [0.0, 3.0, 0.0]])
        >>> sample_logits(logits, temperature=0.0).tolist()
        [0, 1]
        >>> g = torch.Generator().manual_seed(0)
        >>> sample_logits(logits, top_k=1, generator=g).tolist()
        [0, 1]
    """
    _check_logits(logits)
    _check_sampling(temperature, top_k, top_p, generator)
    _check_rows(logits)
    return _sample(logits, temperature, top_k, top_p, generator)


def _draw(
    logits: Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """:func:`sample_logits` of ``logits (B, V)`` without reading a value: the tokens
    ``(B,)`` and which rows ``(B,)`` no token can be drawn from (drawn as if all 0, so
    that the caller reads the flags with its own and raises :func:`_check_rows`' error)."""
    bad = ~torch.isfinite(logits.amax(dim=-1))  # (B,): NaN, +inf or only -inf
    if temperature != 0:  # (multinomial fails on them, on a GPU with a device assert)
        logits = logits.masked_fill(bad[:, None], 0.0)
    return _sample(logits, temperature, top_k, top_p, generator), bad


def _sample(
    logits: Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> Tensor:
    """:func:`sample_logits` on checked arguments and rows."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float64 stays
    t = torch.tensor(temperature, dtype=x.dtype)  # inf where T passes x's range
    # the limit T -> 0 below the smallest normal number (1e-50 rounded to 0 and gave
    # 0/0 = NaN; a subnormal T does too where torch.set_flush_denormal(True), as Trainer
    # sets it; elsewhere every gap between logits of over 1e-36 is then a factor of e^88)
    if temperature < torch.finfo(x.dtype).tiny:
        return logits.argmax(dim=-1)
    x = x - x.amax(dim=-1, keepdim=True)  # max 0: no overflow at small T
    x = torch.where(x == -math.inf, x, x / t)  # a banned token stays so at T = inf
    scaled = filter_logits(x, top_k, top_p)  # (..., V)
    probs = scaled.softmax(dim=-1).reshape(-1, logits.shape[-1])  # (N, V)
    picked = torch.multinomial(probs, 1, generator=generator)  # (N, 1)
    return picked.reshape(logits.shape[:-1])
