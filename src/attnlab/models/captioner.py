"""An image captioner in the style of Show, Attend and Tell (Xu et al., 2015).

A patch encoder (ViT-style patches, learned positions, a small pre-norm
:class:`~attnlab.nn.Encoder`) turns an image into a grid of annotation vectors; an LSTM
decoder emits one word per step, each time attending over the grid with
:class:`~attnlab.nn.BahdanauAttention` from its previous state::

    z_t, alpha_t = attention(h_{t-1}, annotations)      # alpha_t: (B, N) over patches
    z_t          = sigmoid(f_beta(h_{t-1})) * z_t        # the paper's gating scalar
    h_t, c_t     = LSTM([E y_{t-1}; z_t], (h_{t-1}, c_{t-1}))
    p(y_t)       = softmax(L_o [h_t; z_t; E y_{t-1}])

Every step's ``alpha_t`` is an attnlab attention call made by the module named
``"attention"``, so :class:`attnlab.interpret.capture` (``layers=["attention"]``)
records the per-word maps, one record per decoding step, ``(B, 1, 1, N)`` each.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from attnlab._validate import plain_fields, positive_int
from attnlab.models._ids import check_ids, check_special_ids, check_vocab
from attnlab.models.vit import PatchEmbedding, patch_grid_side
from attnlab.nn import BahdanauAttention, Encoder, EncoderLayer, LayerConfig
from attnlab.positional import LearnedPositional

__all__ = ["Captioner", "CaptionerConfig"]

State = tuple[Tensor, Tensor]


@dataclass
class CaptionerConfig:
    """Sizes of a :class:`Captioner` (saved in its checkpoints).

    Example:
        >>> cfg = CaptionerConfig(vocab_size=12, image_size=16, d_model=16, num_heads=2)
        >>> m = Captioner(cfg)
        >>> m.patches.num_patches, Captioner(CaptionerConfig(**asdict(cfg))).cfg == cfg
        (16, True)
    """

    vocab_size: int
    image_size: int = 32
    patch_size: int = 4
    channels: int = 3
    d_model: int = 64
    num_heads: int = 4
    encoder_layers: int = 2
    embed_dim: int = 32
    hidden_dim: int = 128
    attention_dim: int = 64
    dropout: float = 0.0
    bos: int = 1
    eos: int = 2

    def __post_init__(self) -> None:
        plain_fields(self)  # numpy scalars as Python's: the config stays JSON-able

    def layer_config(self) -> LayerConfig:
        """The encoder layers' config (pre-norm GELU), after checking the sizes of the
        encoder and decoder, the image and patch sizes and the dropout (a task checks them
        so before it draws its scenes); :class:`Captioner` checks the vocabulary."""
        for name in ("d_model", "hidden_dim", "embed_dim", "attention_dim", "encoder_layers"):
            positive_int(name, getattr(self, name))
        patch_grid_side(self.image_size, self.patch_size)  # (image_size=30 drew its scenes)
        d = self.d_model
        return LayerConfig(
            d, self.num_heads, 2 * d, dropout=self.dropout, activation="gelu", norm_first=True
        )


class Captioner(nn.Module):
    """Patch encoder + attention LSTM decoder; teacher-forced logits and greedy captions.

    Example:
        >>> cfg = CaptionerConfig(vocab_size=12, image_size=16, d_model=16, num_heads=2,
        ...                       embed_dim=8, hidden_dim=16, attention_dim=16)
        >>> m = Captioner(cfg)
        >>> images, words = torch.rand(2, 3, 16, 16), torch.tensor([[1, 5, 6], [1, 7, 0]])
        >>> tuple(m(images, words).shape)
        (2, 3, 12)
        >>> out = m.eval().generate(images, max_len=4)
        >>> len(out), all(len(o) <= 4 for o in out)
        (2, True)
    """

    def __init__(self, cfg: CaptionerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        layer = EncoderLayer(cfg.layer_config())  # checks the sizes and the dropout
        d, hid, emb = cfg.d_model, cfg.hidden_dim, cfg.embed_dim
        self.patches = PatchEmbedding(cfg.image_size, cfg.patch_size, cfg.channels, d)
        self.pos = LearnedPositional(self.patches.num_patches, d)
        self.encoder = Encoder(layer, cfg.encoder_layers)
        self.encoder_norm = nn.LayerNorm(d)
        self.embed = nn.Embedding(positive_int("vocab_size", cfg.vocab_size), emb, padding_idx=0)
        check_special_ids(cfg, "vocab_size", "bos", "eos")
        self.init_h, self.init_c = nn.Linear(d, hid), nn.Linear(d, hid)
        self.attention = BahdanauAttention(hid, d, cfg.attention_dim)
        self.gate = nn.Linear(hid, 1)
        self.cell = nn.LSTMCell(emb + d, hid)
        self.dropout = nn.Dropout(cfg.dropout)
        self.out = nn.Linear(hid + d + emb, cfg.vocab_size)

    def config(self) -> dict[str, object]:
        """The JSON-able config that rebuilds this model."""
        return asdict(self.cfg)

    def encode(self, images: Tensor) -> Tensor:
        """Annotation vectors ``(B, N, D)`` of ``images (B, C, H, W)``, patches row-major."""
        x = self.pos(self.patches(images))  # (B, N, D)
        return self.encoder_norm(self.encoder(x))

    def _start(self, memory: Tensor) -> State:
        """The LSTM's first state from the mean annotation vector."""
        mean = memory.mean(1)  # (B, D)
        return torch.tanh(self.init_h(mean)), torch.tanh(self.init_c(mean))

    def _step(
        self, word: Tensor, state: State, memory: Tensor, keys: Tensor
    ) -> tuple[Tensor, State]:
        """Logits ``(B, V)`` of the word after ``word (B,)``, and the new state."""
        h, c = state  # (B, hid) each
        context, _ = self.attention(h, memory, projected_keys=keys)  # (B, D), alpha (B, N)
        context = torch.sigmoid(self.gate(h)) * context
        e = self.embed(word)  # (B, emb)
        h, c = self.cell(torch.cat([e, context], -1), (h, c))
        logits = self.out(self.dropout(torch.cat([h, context, e], -1)))  # (B, V)
        return logits, (h, c)

    def forward(self, images: Tensor, words: Tensor) -> Tensor:
        """Teacher-forced logits ``(B, Lt, V)`` for decoder inputs ``words (B, Lt)``
        (BOS first)."""
        b = images.shape[0] if isinstance(images, Tensor) else None  # else: encode names it
        check_ids("words", words, b, "images")  # integer ids (B, Lt), Lt >= 1
        check_vocab("words", words, "vocab_size", self.cfg.vocab_size)
        memory = self.encode(images)  # (B, N, D)
        keys, state = self.attention.project_keys(memory), self._start(memory)
        steps = []
        for t in range(words.shape[1]):
            logits, state = self._step(words[:, t], state, memory, keys)
            steps.append(logits)
        return torch.stack(steps, 1)  # (B, Lt, V)

    @torch.no_grad()
    def generate(self, images: Tensor, *, max_len: int = 16) -> list[list[int]]:
        """Greedy captions of ``images (B, C, H, W)``: word ids without BOS/EOS.

        Decoding stops once every caption has ended (or after ``max_len`` words); the
        attention call of step ``t`` belongs to word ``t`` (the last one to EOS).
        """
        positive_int("max_len", max_len)
        memory = self.encode(images)
        keys, state = self.attention.project_keys(memory), self._start(memory)
        word = torch.full((images.shape[0],), self.cfg.bos, dtype=torch.long, device=images.device)
        out, done = [], torch.zeros_like(word, dtype=torch.bool)
        for _ in range(max_len):
            logits, state = self._step(word, state, memory, keys)
            word = logits.argmax(-1)  # (B,)
            out.append(word)
            done |= word == self.cfg.eos
            if bool(done.all()):
                break
        rows = torch.stack(out, 1).tolist()  # (B, T)
        return [r[: r.index(self.cfg.eos)] if self.cfg.eos in r else r for r in rows]
