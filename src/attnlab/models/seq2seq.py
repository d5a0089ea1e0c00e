"""A token-level encoder-decoder transformer with greedy and beam-search decoding.

Token ids ``(B, L)`` in, logits ``(B, L, V)`` out; padding id 0 at the end of each row,
with the real lengths passed explicitly. Decoding runs step by step on the KV caches of
:class:`attnlab.nn.Transformer` (the encoder output is projected once per layer).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from attnlab import masks
from attnlab._validate import plain_fields, positive_int
from attnlab.models._ids import check_ids, check_source, check_special_ids, check_vocab
from attnlab.nn import DecoderCache, LayerConfig, Transformer
from attnlab.positional import SinusoidalPositional

__all__ = ["Seq2Seq", "Seq2SeqConfig"]


@dataclass
class Seq2SeqConfig:
    """Sizes of a :class:`Seq2Seq` model (saved in its checkpoints).

    Example:
        >>> cfg = Seq2SeqConfig(src_vocab=10, tgt_vocab=12, d_model=16, num_heads=2,
        ...                     decoder_layers=1)
        >>> m = Seq2Seq(cfg)
        >>> len(m.transformer.decoder.layers), m.out.out_features, m.config()["dropout"]
        (1, 12, 0.1)
    """

    src_vocab: int
    tgt_vocab: int
    d_model: int = 128
    num_heads: int = 4
    encoder_layers: int = 2
    decoder_layers: int = 2
    dim_feedforward: int = 256
    dropout: float = 0.1
    norm_first: bool = True
    bos: int = 1
    eos: int = 2

    def __post_init__(self) -> None:
        plain_fields(self)  # numpy scalars as Python's: the config stays JSON-able

    def layer_config(self) -> LayerConfig:
        """The encoder and decoder layers' config, after checking every size but the
        vocabularies' (a task checks them so before it builds its vocabularies)."""
        for name in ("d_model", "encoder_layers", "decoder_layers"):
            positive_int(name, getattr(self, name))  # else named dim or num_layers later
        return LayerConfig(
            self.d_model,
            self.num_heads,
            self.dim_feedforward,
            dropout=self.dropout,
            norm_first=self.norm_first,
        )


class Seq2Seq(nn.Module):
    """Embeddings (scaled, plus sinusoidal positions), a :class:`~attnlab.nn.Transformer`
    with cross-attention, and an output projection.

    Example:
        >>> import torch
        >>> m = Seq2Seq(Seq2SeqConfig(src_vocab=10, tgt_vocab=12, d_model=16, num_heads=2))
        >>> src, lengths = torch.tensor([[4, 5, 6], [7, 8, 0]]), torch.tensor([3, 2])
        >>> tuple(m(src, lengths, torch.ones(2, 4, dtype=torch.long)).shape)
        (2, 4, 12)
        >>> out = m.eval().generate(src, lengths, max_len=5, beam=2)
        >>> len(out), all(len(o) <= 5 for o in out)
        (2, True)
    """

    def __init__(self, cfg: Seq2SeqConfig) -> None:
        super().__init__()
        for name in ("src_vocab", "tgt_vocab"):
            positive_int(name, getattr(cfg, name))
        layer = cfg.layer_config()
        check_special_ids(cfg, "tgt_vocab", "bos", "eos")
        self.cfg = cfg
        d = cfg.d_model
        self.src_embed = nn.Embedding(cfg.src_vocab, d, padding_idx=0)
        self.tgt_embed = nn.Embedding(cfg.tgt_vocab, d, padding_idx=0)
        self.pos = SinusoidalPositional(d)
        self.transformer = Transformer(layer, cfg.encoder_layers, cfg.decoder_layers)
        self.out = nn.Linear(d, cfg.tgt_vocab)

    def config(self) -> dict[str, object]:
        """The JSON-able config that rebuilds this model."""
        return asdict(self.cfg)

    def _embed(self, emb: nn.Embedding, ids: Tensor, offset: int = 0) -> Tensor:
        x = emb(ids) * math.sqrt(self.cfg.d_model)  # (B, L, D)
        return self.pos(x, offset)

    def encode(self, src: Tensor, lengths: Tensor) -> Tensor:
        """``src (B, Ls)`` -> memory ``(B, Ls, D)``; ``lengths (B,)`` in ``[1, Ls]``."""
        check_source(src, lengths)
        check_vocab("src", src, "src_vocab", self.cfg.src_vocab)
        return self.transformer.encode(
            self._embed(self.src_embed, src), mask=masks.padding(lengths)
        )

    def forward(self, src: Tensor, lengths: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher-forced logits ``(B, Lt, V)`` for decoder inputs ``tgt_in (B, Lt)``."""
        check_ids("tgt_in", tgt_in, src.shape[0] if isinstance(src, Tensor) else None)
        check_vocab("tgt_in", tgt_in, "tgt_vocab", self.cfg.tgt_vocab)
        memory = self.encode(src, lengths)
        pad = masks.padding(lengths)
        h = self.transformer.decode(self._embed(self.tgt_embed, tgt_in), memory, memory_mask=pad)
        return self.out(h)

    def _step(
        self, tok: Tensor, memory: Tensor | None, pad: masks.Mask, cache: DecoderCache
    ) -> Tensor:
        """Log-probabilities ``(B, V)`` of the next token after ``tok (B, 1)``, in float32
        or the model's wider dtype (a float64 model's were cast down: 2.6e-7 off)."""
        x = self._embed(self.tgt_embed, tok, offset=cache.length)
        h = self.transformer.decode(x, memory, memory_mask=pad, cache=cache)  # (B, 1, D)
        logits = self.out(h[:, -1])  # (B, V)
        return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)

    @torch.no_grad()
    def generate(
        self, src: Tensor, lengths: Tensor, *, max_len: int = 32, beam: int = 1
    ) -> list[list[int]]:
        """Decode each source row: greedy (``beam=1``) or beam search; ids without BOS/EOS.

        ``lengths (B,)`` must lie in ``[1, Ls]``; ``max_len`` and ``beam`` are positive ints.
        """
        max_len, beam = positive_int("max_len", max_len), positive_int("beam", beam)
        memory = self.encode(src, lengths).repeat_interleave(beam, 0)  # (B*k, Ls, D)
        b = src.shape[0]  # after encode's checks: src is a tensor of ids
        if b == 0:
            return []
        pad = masks.padding(lengths.repeat_interleave(beam, 0))
        cache = self.transformer.new_cache()
        tokens = torch.full((b * beam, 1), self.cfg.bos, dtype=torch.long, device=src.device)
        scores = torch.full((b, beam), -math.inf, device=src.device)
        scores[:, 0] = 0.0  # all beams start identical: keep one
        done = torch.zeros(b * beam, dtype=torch.bool, device=src.device)
        for t in range(max_len):
            logp = self._step(tokens[:, -1:], memory if t == 0 else None, pad, cache)  # (B*k, V)
            logp = _freeze_finished(logp, done, self.cfg.eos)
            index, nxt, scores = _top_beams(scores, logp, b, beam)
            cache.reorder(index)
            tokens = torch.cat([tokens[index], nxt[:, None]], 1)
            done = done[index] | (nxt == self.cfg.eos)
            if bool(done.all()):
                break
        best = tokens.view(b, beam, -1)[:, 0, 1:]  # beams are sorted by score
        return [_strip(row.tolist(), self.cfg.eos) for row in best]


def _freeze_finished(logp: Tensor, done: Tensor, eos: int) -> Tensor:
    """Finished beams can only repeat EOS, at no cost."""
    frozen = torch.full_like(logp, -math.inf)
    frozen[:, eos] = 0.0
    return torch.where(done[:, None], frozen, logp)


def _top_beams(scores: Tensor, logp: Tensor, b: int, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Best ``k`` continuations per row: (cache index (B*k,), next tokens, new scores)."""
    v = logp.shape[-1]
    cand = (scores[:, :, None] + logp.view(b, k, v)).view(b, k * v)  # (B, k*V)
    top, flat = cand.topk(k, dim=-1)  # (B, k), sorted
    src_beam = flat // v
    index = (torch.arange(b, device=logp.device)[:, None] * k + src_beam).view(-1)
    return index, (flat % v).view(-1), top


def _strip(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos)] if eos in ids else ids
