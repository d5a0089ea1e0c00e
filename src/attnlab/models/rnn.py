"""An RNN encoder-decoder with additive attention (Bahdanau, Cho & Bengio, 2015).

A bidirectional GRU reads the source; a GRU decoder attends over its states at every
step with :class:`attnlab.nn.BahdanauAttention`, from its previous state, and feeds the
context into its next input::

    c_t, a_t = attention(s_{t-1}, H)                 # a_t (B, Ls): one row of the alignment
    s_t      = GRUCell([emb(y_{t-1}); c_t], s_{t-1})
    logits_t = W_o [s_t; c_t; emb(y_{t-1})]

``W2 H`` (the key half of the additive score) is computed once per source
(:meth:`~attnlab.nn.BahdanauAttention.project_keys`) and reused at every step. Source
padding (id 0, at the end of each row) is hidden twice: the encoder runs on packed
sequences, and the attention gets the key-padding mask.

The attention rows go through :func:`attnlab.attend`, so :class:`attnlab.interpret.capture`
records them: one call per decoder step, named ``"attention"``, weights ``(B, 1, 1, Ls)``
(the call of step ``t`` is the attention used to predict output token ``t``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from attnlab._validate import plain_fields, positive_int, validate_dropout
from attnlab.models._ids import check_ids, check_source, check_special_ids, check_vocab
from attnlab.nn import BahdanauAttention

__all__ = ["RNNSeq2Seq", "RNNSeq2SeqConfig"]


@dataclass
class RNNSeq2SeqConfig:
    """Sizes of an :class:`RNNSeq2Seq` model (saved in its checkpoints).

    Attributes:
        src_vocab, tgt_vocab: vocabulary sizes (id 0 is padding in both).
        embed_dim: token embedding size.
        hidden: encoder GRU size per direction (encoder states are ``2 * hidden``).
        decoder_hidden: decoder GRU size.
        attn_dim: hidden size of the additive score.
        dropout: dropout on embeddings and on the output layer's input.
        bos, eos: decoder start and end token ids.

    Example:
        >>> m = RNNSeq2Seq(RNNSeq2SeqConfig(src_vocab=10, tgt_vocab=8, embed_dim=8, hidden=8))
        >>> m.encoder.hidden_size, m.attention, m.out.out_features  # doctest: +ELLIPSIS
        (8, BahdanauAttention(...), 8)
        >>> RNNSeq2Seq(RNNSeq2SeqConfig(src_vocab=10, tgt_vocab=8, eos=8))
        Traceback (most recent call last):
        ...
        ValueError: eos must be a token id in [0, tgt_vocab=8), got 8
    """

    src_vocab: int
    tgt_vocab: int
    embed_dim: int = 64
    hidden: int = 128
    decoder_hidden: int = 256
    attn_dim: int = 128
    dropout: float = 0.0
    bos: int = 1
    eos: int = 2

    def __post_init__(self) -> None:
        plain_fields(self)  # numpy scalars as Python's: the config stays JSON-able

    def check_sizes(self) -> None:
        """Check every size but the vocabularies' and the dropout, in [0, 1) as the other
        models' (a task checks them so before it draws its data; 1.5 failed in torch's
        Dropout, naming nothing, and 1.0 was taken)."""
        for name in ("embed_dim", "hidden", "decoder_hidden"):
            positive_int(name, getattr(self, name))
        positive_int("attn_dim", self.attn_dim)  # else Bahdanau's own check named hidden_dim
        validate_dropout(self.dropout, "dropout")


@dataclass
class _Memory:
    """What every decoder step reads: encoder states, their projection, the padding mask."""

    states: Tensor  # (B, Ls, 2H)
    keys: Tensor  # (B, Ls, A): W2 H, computed once
    keep: Tensor  # (B, Ls) bool, True = a real source token


class RNNSeq2Seq(nn.Module):
    """Bidirectional GRU encoder, GRU decoder with Bahdanau attention and input feeding.

    Token ids ``(B, L)`` with padding id 0 at the end of each row and the real source
    lengths passed explicitly.

    Example:
        >>> import torch
        >>> m = RNNSeq2Seq(RNNSeq2SeqConfig(src_vocab=10, tgt_vocab=8, embed_dim=8,
        ...                                 hidden=8, decoder_hidden=16, attn_dim=8))
        >>> src, lengths = torch.tensor([[4, 5, 6], [7, 8, 0]]), torch.tensor([3, 2])
        >>> tuple(m(src, lengths, torch.ones(2, 4, dtype=torch.long)).shape)
        (2, 4, 8)
        >>> out = m.eval().generate(src, lengths, max_len=5)
        >>> len(out), all(len(o) <= 5 for o in out)
        (2, True)
    """

    def __init__(self, cfg: RNNSeq2SeqConfig) -> None:
        super().__init__()
        positive_int("src_vocab", cfg.src_vocab)
        positive_int("tgt_vocab", cfg.tgt_vocab)
        cfg.check_sizes()
        check_special_ids(cfg, "tgt_vocab", "bos", "eos")
        self.cfg = cfg
        e, h, d = cfg.embed_dim, cfg.hidden, cfg.decoder_hidden
        self.src_embed = nn.Embedding(cfg.src_vocab, e, padding_idx=0)
        self.tgt_embed = nn.Embedding(cfg.tgt_vocab, e, padding_idx=0)
        self.encoder = nn.GRU(e, h, batch_first=True, bidirectional=True)
        self.init_state = nn.Linear(2 * h, d)
        self.attention = BahdanauAttention(d, 2 * h, cfg.attn_dim)
        self.decoder = nn.GRUCell(e + 2 * h, d)
        self.out = nn.Linear(d + 2 * h + e, cfg.tgt_vocab)
        self.drop = nn.Dropout(cfg.dropout)

    def config(self) -> dict[str, object]:
        """The JSON-able config that rebuilds this model."""
        return asdict(self.cfg)

    def encode(self, src: Tensor, lengths: Tensor) -> tuple[_Memory, Tensor]:
        """``src (B, Ls)`` -> the decoder's memory and its first state ``(B, D)``."""
        check_source(src, lengths)
        check_vocab("src", src, "src_vocab", self.cfg.src_vocab)
        states, last = self._run_encoder(self.drop(self.src_embed(src)), lengths)
        s0 = torch.tanh(self.init_state(torch.cat([last[0], last[1]], -1)))  # (B, D)
        keep = torch.arange(src.shape[1], device=src.device) < lengths[:, None].to(src.device)
        return _Memory(states, self.attention.project_keys(states), keep), s0

    def _run_encoder(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """The GRU over embeddings ``x (B, Ls, E)`` packed by ``lengths``: states
        ``(B, Ls, 2H)`` (zeros past each length) and the last states ``(2, B, H)``."""
        if x.shape[0] == 0:  # an empty batch: nothing to pack
            h = self.cfg.hidden
            return x.new_zeros(0, x.shape[1], 2 * h), x.new_zeros(2, 0, h)
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, last = self.encoder(packed)  # last (2, B, H): forward at the end, backward at 0
        states, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return states, last

    def step(self, prev: Tensor, state: Tensor, memory: _Memory) -> tuple[Tensor, Tensor]:
        """One decoder step after tokens ``prev (B,)``: ``(logits (B, V), new state (B, D))``."""
        emb = self.drop(self.tgt_embed(prev))  # (B, E)
        context, _ = self.attention(
            state, memory.states, mask=memory.keep, projected_keys=memory.keys
        )  # (B, 2H)
        state = self.decoder(torch.cat([emb, context], -1), state)  # (B, D)
        return self.out(self.drop(torch.cat([state, context, emb], -1))), state

    def forward(self, src: Tensor, lengths: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher-forced logits ``(B, Lt, V)`` for decoder inputs ``tgt_in (B, Lt)``
        (BOS followed by the target, shifted right)."""
        check_ids("tgt_in", tgt_in, src.shape[0] if isinstance(src, Tensor) else None)
        check_vocab("tgt_in", tgt_in, "tgt_vocab", self.cfg.tgt_vocab)
        memory, state = self.encode(src, lengths)
        logits = []
        for t in range(tgt_in.shape[1]):
            out, state = self.step(tgt_in[:, t], state, memory)
            logits.append(out)
        return torch.stack(logits, 1)  # (B, Lt, V)

    @torch.no_grad()
    def generate(self, src: Tensor, lengths: Tensor, *, max_len: int = 32) -> list[list[int]]:
        """Greedy decoding of each source row: ids without BOS and EOS."""
        max_len = positive_int("max_len", max_len)
        if isinstance(src, Tensor) and src.shape[0] == 0:  # no step to run
            check_source(src, lengths)
            return []
        memory, state = self.encode(src, lengths)
        prev = torch.full((src.shape[0],), self.cfg.bos, dtype=torch.long, device=src.device)
        done = torch.zeros_like(prev, dtype=torch.bool)
        ids = []
        for _ in range(max_len):
            logits, state = self.step(prev, state, memory)
            prev = logits.argmax(-1).masked_fill(done, self.cfg.eos)  # (B,)
            ids.append(prev)
            done |= prev == self.cfg.eos
            if bool(done.all()):
                break
        rows = torch.stack(ids, 1).tolist()  # (B, T)
        return [r[: r.index(self.cfg.eos)] if self.cfg.eos in r else r for r in rows]
