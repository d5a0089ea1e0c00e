"""Translation: French number words to English number words (num2words).

``"quatre-vingt-dix-sept mille trois cent deux"`` -> ``"ninety-seven thousand, three
hundred and two"``. Training holds every number below 100 (the words the others are built
from); the others, and every test number, are drawn one at a time with a number of digits
uniform in 3..6, and a number already taken is drawn anew. The test numbers are drawn
first, so their digit counts stay near uniform; in training, the 900 three-digit and 9,000
four-digit numbers run out, so larger numbers dominate: of the 60,000 training numbers of
``attnlab train translation`` (seed 1234), 100 are below 100, 696 have 3 digits, 8,344
have 4, 23,741 have 5 and 27,119 have 6. The test numbers never occur in training. Scores
are exact match and BLEU (sacrebleu) of greedy or beam-search decoding.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab._validate import limit_or, nonnegative_int, positive_int
from attnlab.interpret import capture
from attnlab.models.seq2seq import Seq2Seq, Seq2SeqConfig
from attnlab.tasks.options import DataOptions
from attnlab.tasks.registry import TaskSpec
from attnlab.tasks.report import Section, write_html
from attnlab.tasks.text import Vocab, pad_batch

__all__ = [
    "SPEC",
    "TranslationBatch",
    "TranslationTask",
    "cross_alignment",
    "finish",
    "number_pairs",
    "write_report",
]


def _num2words() -> Any:
    try:
        from num2words import num2words
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the translation task needs num2words: pip install 'attnlab[tasks]'"
        ) from e
    return num2words


def number_pairs(numbers: list[int]) -> list[tuple[str, str]]:
    """``(french, english)`` number words of each number.

    Example:
        >>> for pair in number_pairs([97302]):
        ...     print(pair[0])
        ...     print(pair[1])
        quatre-vingt-dix-sept mille trois cent deux
        ninety-seven thousand, three hundred and two
    """
    n2w = _num2words()
    return [(n2w(n, lang="fr"), n2w(n, lang="en")) for n in numbers]


def _split_numbers(
    train: int, test: int, seed: int, max_digits: int = 6
) -> tuple[list[int], list[int]]:
    """Disjoint train and test numbers: every number below 100 in training, the others
    drawn with digit counts uniform in 3..max_digits and redrawn when already taken (so
    the test numbers, drawn first, are near uniform in digits; training, once the short
    numbers run out, is mostly long ones).

    Every number below 100 is in training (they are the words the others are built
    from, like a dictionary); the test numbers are drawn from 100 upward.
    """
    if train < 100 or train + test > 10**max_digits:
        raise ValueError(
            f"train_size={train} must be at least 100 and train_size + test_size at most "
            f"{10**max_digits}"
        )
    g = torch.Generator().manual_seed(seed)
    picked: dict[int, None] = dict.fromkeys(range(100))
    while len(picked) < train + test:
        digits = int(torch.randint(3, max_digits + 1, (), generator=g))
        picked[int(torch.randint(10 ** (digits - 1), 10**digits, (), generator=g))] = None
    nums = list(picked)
    return nums[:100] + nums[100 + test :], nums[100 : 100 + test]


@dataclass
class TranslationBatch:
    src: Tensor  # (B, Ls)
    lengths: Tensor  # (B,)
    tgt_in: Tensor  # (B, Lt): BOS + target
    tgt_out: Tensor  # (B, Lt): target + EOS, 0 = padding


class TranslationTask(DataOptions):
    """French -> English number words, for :class:`attnlab.train.Trainer`.

    Args:
        train_size, test_size: distinct numbers in each split.
        eval_size: test sentences decoded at each periodic evaluation (all at the end).
        seed: picks the numbers (the model's seed is the trainer's).
        d_model, num_heads, layers, dim_feedforward, dropout: model size.

    Example:
        >>> task = TranslationTask(train_size=150, test_size=5)
        >>> task.train_pairs[21][0], task.num_train()
        ('vingt et un', 150)
    """

    name = "translation"

    def __init__(
        self,
        train_size: int = 50_000,
        test_size: int = 1000,
        *,
        eval_size: int = 300,
        seed: int = 1234,
        d_model: int = 128,
        num_heads: int = 4,
        layers: int = 2,
        dim_feedforward: int = 512,
        dropout: float = 0.1,
    ) -> None:
        positive_int("train_size", train_size)
        test_size = positive_int("test_size", test_size)
        eval_size = positive_int("eval_size", eval_size)
        layers = positive_int("layers", layers)
        sizes = Seq2SeqConfig(  # the vocabularies' sizes come later, the model's now
            1,  # (they were checked in build_model, after drawing every pair)
            1,
            d_model=d_model,
            num_heads=num_heads,
            encoder_layers=layers,
            decoder_layers=layers,
            dim_feedforward=dim_feedforward,
            dropout=dropout,
        )
        sizes.layer_config()
        seed = nonnegative_int("seed", seed)
        train, test = _split_numbers(train_size, test_size, seed)
        self.train_numbers, self.test_numbers = train, test
        self.train_pairs, self.test_pairs = number_pairs(train), number_pairs(test)
        self.src_vocab = Vocab.build(p[0] for p in self.train_pairs)
        self.tgt_vocab = Vocab.build(p[1] for p in self.train_pairs)
        self.eval_size = eval_size
        self.data_options = {"test_size": test_size, "eval_size": eval_size, "seed": seed}
        self.model_cfg = replace(
            sizes, src_vocab=len(self.src_vocab), tgt_vocab=len(self.tgt_vocab)
        )
        self._src = [self.src_vocab.encode(s) for s, _ in self.train_pairs]
        self._tgt = [self.tgt_vocab.encode(t) for _, t in self.train_pairs]

    def build_model(self) -> nn.Module:
        return Seq2Seq(self.model_cfg)

    def config(self) -> dict[str, Any]:
        return {
            "task": self.name,
            "model": self.model_cfg.__dict__,
            "src_vocab": self.src_vocab.tokens,
            "tgt_vocab": self.tgt_vocab.tokens,
            "data": self.data_options,
        }

    def num_train(self) -> int:
        return len(self._src)

    def batch(self, indices: Tensor) -> TranslationBatch:
        idx = indices.tolist()
        src, lengths = pad_batch([self._src[i] for i in idx])
        tgt_in, _ = pad_batch([[1, *self._tgt[i]] for i in idx])
        tgt_out, _ = pad_batch([[*self._tgt[i], 2] for i in idx])
        return TranslationBatch(src, lengths, tgt_in, tgt_out)

    def loss(self, model: nn.Module, batch: TranslationBatch) -> Tensor:
        logits = model(batch.src, batch.lengths, batch.tgt_in)  # (B, Lt, V)
        return F.cross_entropy(logits.flatten(0, 1), batch.tgt_out.flatten(), ignore_index=0)

    def translate(
        self, model: Seq2Seq, sentences: list[str], *, beam: int = 1, batch_size: int = 256
    ) -> list[str]:
        """English words for each French sentence, ``batch_size`` (>= 1) at a time."""
        batch_size = positive_int("batch_size", batch_size)  # -1 gave [], 0 a range() error
        blank = next((i for i, s in enumerate(sentences) if not str(s).split()), None)
        if blank is not None:  # (it named the model's src and lengths, which nobody passed)
            raise ValueError(f"sentences[{blank}] is empty; give French number words")
        out: list[str] = []
        for i in range(0, len(sentences), batch_size):
            src, lengths = pad_batch(
                [self.src_vocab.encode(s) for s in sentences[i : i + batch_size]]
            )
            ids = model.generate(src, lengths, max_len=int(lengths.max()) * 2 + 8, beam=beam)
            out += [self.tgt_vocab.decode(r) for r in ids]
        return out

    def evaluate(
        self, model: nn.Module, *, limit: int | None = None, beam: int = 1
    ) -> dict[str, float]:
        """Exact match (%) and BLEU on the held-out numbers; ``score`` is exact / 100."""
        import sacrebleu

        assert isinstance(model, Seq2Seq)
        pairs = self.test_pairs[: limit_or(limit, self.eval_size)]
        hyps = self.translate(model, [s for s, _ in pairs], beam=beam)
        refs = [t for _, t in pairs]
        hits = sum(h == r for h, r in zip(hyps, refs, strict=True))
        bleu = sacrebleu.corpus_bleu(hyps, [refs]).score
        exact = round(100 * hits / len(pairs), 2)
        return {"exact": exact, "bleu": round(bleu, 2), "score": hits / len(pairs)}


def samples(task: TranslationTask, model: Seq2Seq, n: int) -> list[tuple[str, str, str]]:
    """``(french, greedy translation, reference)`` of the first ``n`` held-out numbers."""
    pairs = task.test_pairs[:n]
    hyps = task.translate(model, [s for s, _ in pairs])
    return [(s, h, r) for (s, r), h in zip(pairs, hyps, strict=True)]


def cross_alignment(task: TranslationTask, model: Seq2Seq, src: str, hyp: str) -> Tensor:
    """Cross-attention of each output token over the source, mean over heads and layers:
    ``(Lt + 1, Ls)`` (the last row is the end-of-sentence step)."""
    s, lengths = pad_batch([task.src_vocab.encode(src)])
    t, _ = pad_batch([[1, *task.tgt_vocab.encode(hyp)]])
    with torch.no_grad(), capture(model, layers=["*.cross_attn"]) as cap:
        model(s, lengths, t)
    return torch.stack([c.weights[0].mean(0) for c in cap]).mean(0)  # (Lt, Ls)


def write_report(
    task: TranslationTask,
    model: Seq2Seq,
    rows: list[tuple[str, str, str]],
    scores: dict[str, float],
    folder: Path,
) -> Path:
    """Alignment PNGs and a self-contained ``report.html`` (images inlined) in ``folder``."""
    from attnlab.interpret.plot import alignment

    folder.mkdir(parents=True, exist_ok=True)
    sections = []
    for i, (src, hyp, ref) in enumerate(rows[:4]):
        w = cross_alignment(task, model, src, hyp)
        src_toks = [task.src_vocab.tokens[j] for j in task.src_vocab.encode(src)]
        tgt_toks = [task.tgt_vocab.tokens[j] for j in task.tgt_vocab.encode(hyp)] + ["</s>"]
        png = alignment(w, src_toks, tgt_toks, folder / f"alignment_{i}.png", title=src)
        ok = "correct" if hyp == ref else f"expected: {ref}"
        sections.append(Section(src, f"{hyp} ({ok})", [png]))
    title = "French number words to English"
    return write_html(folder / "report.html", title, scores, sections)


def finish(task: TranslationTask, model: nn.Module, folder: Path) -> dict[str, float]:
    """Greedy scores on every held-out number, beam-4 on the first 200, samples, report."""
    assert isinstance(model, Seq2Seq)
    greedy = task.evaluate(model, limit=len(task.test_pairs))
    beam = task.evaluate(model, limit=200, beam=4)
    scores = {"greedy_exact": greedy["exact"], "greedy_bleu": greedy["bleu"]}
    scores |= {"beam4_exact_first200": beam["exact"], "beam4_bleu_first200": beam["bleu"]}
    print(f"held-out scores ({len(task.test_pairs)} numbers):", json.dumps(scores))
    rows = samples(task, model, n=6)
    for src, hyp, ref in rows:
        print(f"  {'ok ' if hyp == ref else 'BAD'} {src}\n      -> {hyp}")
    write_report(task, model, rows, scores, folder)
    return scores


SPEC = TaskSpec(
    summary="French number words to English (num2words), seq2seq transformer",
    build=lambda n: TranslationTask(60_000 if n is None else n, dropout=0.0),
    defaults={"steps": 2000, "batch_size": 128, "lr": 2e-3, "warmup": 100, "eval_every": 250},
    finish=finish,
    score_range=(0.0, 1.0),
)
