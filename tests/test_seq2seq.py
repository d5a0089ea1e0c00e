"""The transformer Seq2Seq's cached decoding (``generate``) against its teacher-forced
forward pass."""

from __future__ import annotations

import torch

from attnlab.models import Seq2Seq, Seq2SeqConfig


def test_float64_generate_steps_equal_the_teacher_forced_log_probs() -> None:
    """A float64 model's decoding steps were cast to float32 (2.6e-7 off the float64
    forward pass, which is 1e-16 off): each step's log-probabilities, recorded while
    greedy ``generate`` runs, equal those of the forward pass over the tokens it chose."""
    torch.manual_seed(0)
    cfg = Seq2SeqConfig(src_vocab=9, tgt_vocab=7, d_model=16, num_heads=2, dropout=0.0)
    model = Seq2Seq(cfg).double().eval()
    src, lengths = torch.tensor([[3, 4, 5, 6], [5, 7, 2, 0]]), torch.tensor([4, 3])
    steps: list[torch.Tensor] = []
    step = model._step

    def record(*args: object) -> torch.Tensor:
        steps.append(step(*args))  # type: ignore[arg-type]
        return steps[-1]

    model._step = record  # type: ignore[method-assign]
    model.generate(src, lengths, max_len=6)
    del model._step
    logp = torch.stack(steps, 1)  # (B, T, V)
    chosen = logp.argmax(-1)  # (B, T) greedy; after a row's EOS, EOS again
    ended = (chosen == cfg.eos).long().cumsum(1) - (chosen == cfg.eos).long() > 0
    chosen = torch.where(ended, cfg.eos, chosen)
    tokens = torch.cat([torch.full((2, 1), cfg.bos), chosen[:, :-1]], 1)  # (B, T)
    want = torch.log_softmax(model(src, lengths, tokens), -1)  # (B, T, V)
    torch.testing.assert_close(logp, want, rtol=0, atol=1e-12, check_dtype=False)
    assert logp.dtype == torch.float64
