"""Tests for attnlab.nn.hierarchical: hierarchical attention networks (Yang et al., 2016).

The reference re-runs the module's own GRUs one sentence at a time on the real words only
(no packing, no masks) and applies the pooling formula with plain torch ops in float64.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from attnlab.nn.classic import AttentionPooling
from attnlab.nn.hierarchical import HierarchicalAttention, HierarchicalOutput
from tests.conftest import check_and_control

E, WH, SH = 6, 4, 3
# words per sentence of each document: an empty sentence in the middle and at the end
LENGTHS = [[5, 0, 2, 4], [3, 4, 1, 0]]


def _mask(lengths: list[list[int]], w: int) -> Tensor:
    return torch.arange(w) < torch.tensor(lengths)[..., None]  # (B, S, W)


def _words(dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Random embeddings (garbage in the padding too) and their mask, (B, S, W, E)."""
    keep = _mask(LENGTHS, 5)
    return torch.randn(*keep.shape, E, dtype=dtype), keep


def _ref_pool(pool: AttentionPooling, h: Tensor) -> tuple[Tensor, Tensor]:
    """h (L, D) -> (sum alpha h (D,), alpha (L,)) with alpha = softmax(tanh(W h + b) . u_w)."""
    u = torch.tanh(h @ pool.proj.weight.T + pool.proj.bias)  # (L, A)
    alpha = torch.softmax(u @ pool.context, dim=0)  # (L,)
    return alpha @ h, alpha


def _run(rnn: nn.GRU | None, x: Tensor) -> Tensor:
    """The module's own GRU on one unpadded sequence (L, D), or the identity."""
    return x if rnn is None else rnn(x[None])[0][0]


def _reference(han: HierarchicalAttention, words: Tensor, keep: Tensor) -> HierarchicalOutput:
    """Document by document, sentence by sentence, on the real items only."""
    b, s, w, _ = words.shape
    docs = words.new_zeros(b, han.document_dim)
    sents = words.new_zeros(b, s, han.sentence_dim)
    word_w, sent_w = words.new_zeros(b, s, w), words.new_zeros(b, s)
    for i in range(b):
        real_sents = [j for j in range(s) if keep[i, j].any()]
        for j in real_sents:
            idx = keep[i, j].nonzero().squeeze(1)
            h = _run(han.word_encoder, words[i, j, idx])  # (n, Ds)
            sents[i, j], word_w[i, j, idx] = _ref_pool(han.word_attention, h)
        if real_sents:
            hs = _run(han.sentence_encoder, sents[i, real_sents])  # (m, Dd)
            docs[i], sent_w[i, real_sents] = _ref_pool(han.sentence_attention, hs)
    return HierarchicalOutput(docs, sents, word_w, sent_w)


@pytest.mark.parametrize("encoder", ["gru", None])
def test_matches_sentence_by_sentence_reference(encoder: str | None) -> None:
    han = HierarchicalAttention(E, WH, SH, encoder=encoder, attn_dim=5).double()
    words, keep = _words(torch.float64)
    out = han(words, keep)
    with torch.no_grad():
        ref = _reference(han, words, keep)
    for name, got, want in zip(out._fields, out, ref, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10, msg=name)


@pytest.mark.parametrize("encoder", ["gru", None])
def test_weights_sum_to_one_over_real_items(encoder: str | None) -> None:
    han = HierarchicalAttention(E, WH, SH, encoder=encoder)
    words, keep = _words()
    out = han(words, keep)
    sent_keep = keep.any(-1)  # (B, S)
    assert torch.all(out.word_weights[~keep] == 0)
    torch.testing.assert_close(
        out.word_weights.sum(-1)[sent_keep], torch.ones(int(sent_keep.sum()))
    )
    assert torch.all(out.sentence_weights[~sent_keep] == 0)  # empty sentences
    assert torch.all(out.sentences[~sent_keep] == 0)
    torch.testing.assert_close(out.sentence_weights.sum(-1), torch.ones(2))
    assert out.document.shape == (2, han.document_dim)


@pytest.mark.parametrize("encoder", ["gru", None])
def test_padding_does_not_change_the_result(encoder: str | None) -> None:
    """More padding words, an extra all-padding sentence, other garbage in the padding."""
    han = HierarchicalAttention(E, WH, SH, encoder=encoder)
    words, keep = _words()
    b, s, w, _ = words.shape
    big = torch.randn(b, s + 1, w + 3, E)
    big[:, :s, :w] = torch.where(keep[..., None], words, torch.randn_like(words))
    big_keep = torch.zeros(b, s + 1, w + 3, dtype=torch.bool)
    big_keep[:, :s, :w] = keep
    out, padded = han(words, keep), han(big, big_keep)
    torch.testing.assert_close(padded.document, out.document, rtol=0, atol=1e-5)
    torch.testing.assert_close(padded.sentences[:, :s], out.sentences, rtol=0, atol=1e-5)
    torch.testing.assert_close(padded.word_weights[:, :s, :w], out.word_weights, rtol=0, atol=1e-5)
    torch.testing.assert_close(
        padded.sentence_weights[:, :s], out.sentence_weights, rtol=0, atol=1e-5
    )
    assert torch.all(padded.word_weights[:, :, w:] == 0)
    assert torch.all(padded.sentence_weights[:, s] == 0)


def test_masked_word_inside_a_sentence_is_skipped() -> None:
    """A hole in the mask equals deleting the word: the GRU reads the real words in order."""
    han = HierarchicalAttention(E, WH, SH)
    words = torch.randn(1, 2, 5, E)
    keep = torch.ones(1, 2, 5, dtype=torch.bool)
    keep[0, 0, 1] = False
    out = han(words, keep)
    shifted = words.clone()
    shifted[0, 0] = torch.cat([words[0, 0, [0, 2, 3, 4]], torch.randn(1, E)])
    ref = han(shifted, _mask([[4, 5]], 5))
    torch.testing.assert_close(out.document, ref.document, rtol=0, atol=1e-5)
    torch.testing.assert_close(
        out.word_weights[0, 0, [0, 2, 3, 4]], ref.word_weights[0, 0, :4], rtol=0, atol=1e-5
    )


def test_unmasked_call_equals_all_true_mask() -> None:
    han = HierarchicalAttention(E, WH, SH)
    words = torch.randn(2, 3, 4, E)
    a, b = han(words), han(words, torch.ones(2, 3, 4, dtype=torch.bool))
    for got, want in zip(a, b, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_document_with_no_real_word_gives_zeros() -> None:
    han = HierarchicalAttention(E, WH, SH)
    words, keep = _words()
    keep[0] = False
    words.requires_grad_(True)
    out = han(words, keep)
    assert torch.all(out.document[0] == 0) and torch.all(out.sentence_weights[0] == 0)
    assert not any(torch.isnan(t).any() for t in out)
    out.document.sum().backward()
    assert words.grad is not None and torch.isfinite(words.grad).all()
    assert torch.all(words.grad[0] == 0)


@pytest.mark.parametrize("encoder", ["gru", None])
def test_gradients_reach_every_parameter(encoder: str | None) -> None:
    han = HierarchicalAttention(E, WH, SH, encoder=encoder)
    words, keep = _words()
    doc = han(words, keep).document
    (doc * torch.randn_like(doc)).sum().backward()
    params = dict(han.named_parameters())
    n_gru = 0 if encoder is None else 2 * 8  # 2 GRUs x 2 directions x 4 tensors
    assert len(params) == 2 * 3 + n_gru  # 2 poolings x (W, b, u_w)
    for name, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_encoder_none_has_no_recurrent_layer() -> None:
    han = HierarchicalAttention(E, WH, SH, encoder=None)
    assert han.word_encoder is None and han.sentence_encoder is None
    assert han.sentence_dim == han.document_dim == E
    assert not any(isinstance(m, nn.RNNBase) for m in han.modules())


# --------------------------------------------------------------------------- errors


def _han(**kw: object) -> Callable[[], object]:
    args: dict[str, object] = {"embed_dim": E, "word_hidden": WH, "sentence_hidden": SH}
    args.update(kw)
    return lambda: HierarchicalAttention(**args)  # type: ignore[arg-type]


def _fwd(words: object, word_mask: object = None) -> Callable[[], object]:
    return lambda: HierarchicalAttention(E, WH, SH)(words, word_mask)


ERRORS: list[tuple[str, Callable[[], object], Callable[[], object], type[Exception], str]] = [
    (
        "encoder",
        _han(encoder="lstm"),
        _han(encoder=None),
        ValueError,
        r"encoder='lstm' is not supported; expected 'gru' or None",
    ),
    (
        "word_hidden",
        _han(word_hidden=0),
        _han(word_hidden=1),
        ValueError,
        r"word_hidden must be a positive int, got 0",
    ),
    (
        "words_type",
        _fwd([[1.0]]),
        _fwd(torch.randn(1, 1, 1, E)),
        TypeError,
        r"words must be a torch.Tensor \(B, S, W, E\), got list",
    ),
    (
        "words_rank",
        _fwd(torch.randn(2, 5, E)),
        _fwd(torch.randn(2, 1, 5, E)),
        ValueError,
        r"words must have shape \(B, S, W, E\) with E=embed_dim=6, got shape \(2, 5, 6\)",
    ),
    (
        "words_dim",
        _fwd(torch.randn(2, 3, 5, E + 1)),
        _fwd(torch.randn(2, 3, 5, E)),
        ValueError,
        r"words must have shape \(B, S, W, E\) with E=embed_dim=6, got shape \(2, 3, 5, 7\)",
    ),
    (
        "words_dtype",
        _fwd(torch.ones(2, 3, 5, E, dtype=torch.long)),
        _fwd(torch.ones(2, 3, 5, E)),
        TypeError,
        r"words must be floating-point embeddings, got dtype torch.int64",
    ),
    (
        "mask_dtype",
        _fwd(torch.randn(2, 3, 5, E), torch.ones(2, 3, 5)),
        _fwd(torch.randn(2, 3, 5, E), torch.ones(2, 3, 5, dtype=torch.bool)),
        TypeError,
        r"word_mask must be a bool tensor \(B, S, W\) or None, got torch.float32",
    ),
    (
        "mask_shape",
        _fwd(torch.randn(2, 3, 5, E), torch.ones(2, 15, dtype=torch.bool)),
        _fwd(torch.randn(2, 3, 5, E), torch.ones(2, 3, 5, dtype=torch.bool)),
        ValueError,
        r"word_mask must have shape \(B, S, W\) = \(2, 3, 5\) as in words, got shape \(2, 15\)",
    ),
]


@pytest.mark.parametrize(
    ("bad", "ok", "exc", "match"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS]
)
def test_errors_name_the_argument(
    bad: Callable[[], object], ok: Callable[[], object], exc: type[Exception], match: str
) -> None:
    check_and_control(bad, ok, exc, match)


@pytest.mark.parametrize("shape", [(0, 3, 4), (2, 0, 4), (2, 3, 0), (0, 0, 0)])
def test_empty_batches_sentences_and_words_give_zeros(shape: tuple[int, int, int]) -> None:
    """(B = 0 or S = 0 failed to reshape "a tensor of 0 elements"; W = 0 failed in the GRU
    and, without a mask, gave documents of no word a nonzero vector.)"""
    han = HierarchicalAttention(E, WH, SH)
    words = torch.randn(*shape, E)
    b, s, _ = shape
    for keep in (None, torch.zeros(shape, dtype=torch.bool)):
        out = han(words, keep)
        assert out.document.shape == (b, han.document_dim)
        assert out.word_weights.shape == shape and out.sentence_weights.shape == (b, s)
        assert torch.equal(out.document, torch.zeros_like(out.document))
    full = han(torch.randn(2, 3, 4, E))  # the control: real words give a nonzero document
    assert full.document.abs().sum() > 0
