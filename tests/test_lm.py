"""The decoder-only language model: cached generation and sampling."""

from __future__ import annotations

import math

import pytest
import torch

from attnlab.models.lm import LanguageModel, LMConfig, filter_logits, sample_logits
from tests.conftest import check_and_control


def _lm(**kw: object) -> LanguageModel:
    cfg = {"vocab_size": 13, "d_model": 16, "num_heads": 2, "num_layers": 2} | kw
    return LanguageModel(LMConfig(**cfg)).eval()  # type: ignore[arg-type]


def _full_greedy(lm: LanguageModel, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding without a cache: the whole sequence through the model every step."""
    ids = prompt
    for _ in range(n):
        nxt = lm(ids)[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        ids = torch.cat([ids, nxt], 1)
    return ids


@pytest.mark.parametrize("tie", [True, False])
def test_cached_greedy_generation_equals_full_forward_argmax(tie: bool) -> None:
    lm = _lm(tie_weights=tie, num_kv_heads=1)
    with torch.no_grad():  # random weights give peaked enough logits to avoid argmax ties
        for p in lm.parameters():
            p.mul_(4.0)
    prompt = torch.tensor([[1, 4, 5, 6], [1, 7, 8, 9]])
    ours = lm.generate(prompt, 12, temperature=0.0)
    ref = _full_greedy(lm, prompt, 12)
    assert ours.tolist() == ref.tolist()
    assert len(set(ours[0, 4:].tolist())) > 1  # not a constant continuation


def test_generate_uses_one_prefill_then_one_token_per_step() -> None:
    lm = _lm()
    lengths: list[int] = []
    lm.decoder.register_forward_pre_hook(
        lambda m, args, kw: lengths.append(args[0].shape[1]), with_kwargs=True
    )
    lm.generate(torch.tensor([[1, 4, 5]]), 5, temperature=0.0)
    assert lengths == [3, 1, 1, 1, 1]


def test_cached_logits_equal_full_forward() -> None:
    lm = _lm()
    ids = torch.randint(0, 13, (2, 9))
    cache = lm.new_cache()
    steps = [lm(ids[:, :5], cache=cache)] + [
        lm(ids[:, i : i + 1], cache=cache) for i in range(5, 9)
    ]
    torch.testing.assert_close(torch.cat(steps, 1), lm(ids), atol=1e-5, rtol=1e-5)


def test_tied_head_is_the_embedding() -> None:
    lm = _lm(tie_weights=True)
    ids = torch.tensor([[3, 4, 5]])
    h = lm.decoder(lm.embed(ids))
    torch.testing.assert_close(lm(ids), h @ lm.embed.weight.T)
    assert (
        "head.weight" not in lm.state_dict()
        and "head.weight" in _lm(tie_weights=False).state_dict()
    )


def test_eos_stops_rows() -> None:
    lm = _lm()
    prompt = torch.tensor([[1, 4], [1, 5]])
    free = lm.generate(prompt, 6, temperature=0.0)
    eos = int(free[0, 2])  # the first row's first new token
    out = lm.generate(prompt, 6, temperature=0.0, eos_id=eos)
    assert (out[0, 2:] == eos).all()
    row = free[1, 2:].tolist()
    stop = row.index(eos) + 1 if eos in row else len(row)
    assert out[1, 2 : 2 + stop].tolist() == row[:stop]


def test_an_empty_batch_gets_max_new_tokens_without_eos() -> None:
    """(B = 0 returned (0, P + 1), not (0, P + T): the loop stopped after one step because
    ``done.all()`` of an empty batch is True, with eos_id=None as well.)"""
    lm = _lm()
    for one in (torch.ones(1, 2, dtype=torch.long), torch.ones(0, 2, dtype=torch.long)):
        assert tuple(lm.generate(one, 3).shape) == (one.shape[0], 5)
        assert tuple(lm.generate(one, 3, temperature=0.0).shape) == (one.shape[0], 5)
    empty = lm.generate(torch.ones(0, 2, dtype=torch.long), 3, eos_id=2)
    assert empty.shape[0] == 0 and 2 < empty.shape[1] <= 5  # eos: up to max_new_tokens


# --- sampling against hand-computed distributions --------------------------------------

PROBS = torch.tensor([0.4, 0.3, 0.2, 0.1])
N = 40_000


def _freq(logits: torch.Tensor, **kw: object) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    draws = sample_logits(logits.expand(N, -1), generator=g, **kw)  # type: ignore[arg-type]
    return torch.bincount(draws, minlength=logits.shape[-1]).double() / N


def _close(freq: torch.Tensor, expected: list[float]) -> None:
    want = torch.tensor(expected, dtype=torch.float64)
    tol = 5 * torch.sqrt(want * (1 - want) / N) + 1e-12  # 5 standard errors
    assert ((freq - want).abs() <= tol).all(), (freq.tolist(), expected)
    assert (freq[want == 0] == 0).all()


def test_plain_sampling_follows_softmax() -> None:
    _close(_freq(PROBS.log()), [0.4, 0.3, 0.2, 0.1])


def test_top_k_keeps_only_k_tokens_renormalized() -> None:
    _close(_freq(PROBS.log(), top_k=2), [0.4 / 0.7, 0.3 / 0.7, 0.0, 0.0])
    _close(_freq(PROBS.log()[[2, 0, 3, 1]], top_k=3), [0.2 / 0.9, 0.4 / 0.9, 0.0, 0.3 / 0.9])


@pytest.mark.parametrize(
    ("p", "expected"),
    [
        (0.35, [1.0, 0.0, 0.0, 0.0]),  # 0.4 alone reaches 0.35
        (0.5, [0.4 / 0.7, 0.3 / 0.7, 0.0, 0.0]),  # 0.4 < 0.5 <= 0.7
        (0.85, [0.4 / 0.9, 0.3 / 0.9, 0.2 / 0.9, 0.0]),  # 0.7 < 0.85 <= 0.9
        (1.0, [0.4, 0.3, 0.2, 0.1]),
    ],
)
def test_top_p_keeps_the_smallest_prefix_reaching_p(p: float, expected: list[float]) -> None:
    perm = torch.tensor([3, 1, 0, 2])  # shuffled order: sorting is part of the test
    freq = _freq(PROBS.log()[perm], top_p=p)
    _close(freq, [expected[int(i)] for i in perm])


def test_top_k_then_top_p() -> None:
    # top-k 3 -> (4, 3, 2) / 9; top-p 0.5 on that: 4/9 < 0.5 <= 7/9 keeps two
    _close(_freq(PROBS.log(), top_k=3, top_p=0.5), [0.4 / 0.7, 0.3 / 0.7, 0.0, 0.0])


def test_temperature_sharpens_and_flattens() -> None:
    for t in (0.5, 2.0):
        w = PROBS.double() ** (1 / t)
        _close(_freq(PROBS.log(), temperature=t), (w / w.sum()).tolist())


def test_temperature_zero_is_argmax_and_tiny_temperature_is_finite() -> None:
    logits = torch.randn(50, 7)
    assert torch.equal(sample_logits(logits, 0.0), logits.argmax(-1))
    assert torch.equal(sample_logits(logits, 1e-30), logits.argmax(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_temperatures_past_the_dtype_range_take_their_limits(dtype: torch.dtype) -> None:
    """(In float32 a temperature of 1e-50 divided to 0/0, and 1e39 to -inf/inf at a banned
    token: NaN, torch's multinomial error.) T -> 0: the argmax; T -> inf: uniform over the
    tokens not banned."""
    logits = PROBS.log().to(dtype)
    assert sample_logits(logits.expand(5, -1), 1e-50).tolist() == [0] * 5
    banned = PROBS.log().clone()
    banned[2] = -math.inf
    _close(_freq(banned.to(dtype), temperature=1e39), [1 / 3, 1 / 3, 0.0, 1 / 3])
    lm = LanguageModel(LMConfig(vocab_size=11, d_model=16, num_heads=2)).eval()
    with torch.no_grad():
        want = lm.generate(torch.tensor([[1, 5]]), 3, temperature=0.0)  # greedy
        assert torch.equal(lm.generate(torch.tensor([[1, 5]]), 3, temperature=1e-50), want)


def test_float64_logits_are_sampled_in_float64() -> None:
    """Logits 1e-9 apart at temperature 1e-11: softmax gives the second token e^100 times
    the weight of the first. Cast to float32 (as they were), the two were equal: 50/50."""
    logits = torch.tensor([1.0, 1.0 + 1e-9], dtype=torch.float64)
    draws = sample_logits(logits.expand(200, -1), 1e-11, generator=torch.Generator().manual_seed(0))
    assert draws.tolist() == [1] * 200


def test_top_p_boundary_against_a_direct_loop() -> None:
    """filter_logits' kept set against a plain Python reading of the definition."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(20, 9, generator=g)
    for p in (0.1, 0.3, 0.6, 0.9):
        kept = ~filter_logits(logits, top_p=p).isinf()
        for row, k in zip(logits.softmax(-1).tolist(), kept.tolist(), strict=True):
            order = sorted(range(9), key=lambda i: -row[i])
            mass, want = 0.0, set()
            for i in order:
                want.add(i)
                mass += row[i]
                if mass >= p:
                    break
            assert {i for i in range(9) if k[i]} == want
    # equal tokens, where p falls on a sum: mass-before as cumsum - probs lost the last
    # float32 ulp and kept one token more (7 of 10 for p = 0.6)
    for v, p, n in ((10, 0.6, 6), (20, 0.3, 6), (8, 0.25, 2)):
        assert int((~filter_logits(torch.zeros(v), top_p=p).isinf()).sum()) == n, (v, p)


def test_sampling_is_reproducible_with_a_generator() -> None:
    logits = torch.randn(3, 11)
    a = sample_logits(logits, 0.8, 5, 0.9, torch.Generator().manual_seed(7))
    b = sample_logits(logits, 0.8, 5, 0.9, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_bad_input_errors() -> None:
    logits = torch.randn(2, 5)
    ok = lambda: sample_logits(logits, 1.0, 2, 0.5)  # noqa: E731
    check_and_control(lambda: sample_logits(logits, -1.0), ok, ValueError, "temperature")
    check_and_control(lambda: sample_logits(logits, math.nan), ok, ValueError, "temperature")
    check_and_control(lambda: sample_logits(logits, top_k=0), ok, ValueError, "top_k")
    check_and_control(lambda: sample_logits(logits, top_k=2.5), ok, TypeError, "top_k")  # type: ignore[arg-type]
    check_and_control(lambda: sample_logits(logits, top_p=0.0), ok, ValueError, "top_p")
    check_and_control(lambda: sample_logits(logits, top_p=1.5), ok, ValueError, "top_p")
    check_and_control(lambda: sample_logits(logits.long()), ok, TypeError, "logits")
    check_and_control(lambda: sample_logits(logits, generator=3), ok, TypeError, "generator")  # type: ignore[arg-type]


def test_rows_no_token_can_be_drawn_from_are_named() -> None:
    """(NaN, +inf and all -inf rows raised torch's unnamed "probability tensor contains
    either inf, nan or element < 0"; greedy decoding returned token 0 for all -inf.)"""
    inf = math.inf
    good = torch.tensor([[0.0, 1.0, -inf], [2.0, -inf, 0.5]])  # -inf beside a finite: fine
    ok = lambda: sample_logits(good)  # noqa: E731
    for row, what in ((torch.tensor([0.0, math.nan, 1.0]), "NaN"),
                      (torch.tensor([0.0, inf, 1.0]), r"\+inf"),
                      (torch.full((3,), -inf), "only -inf")):  # fmt: skip
        bad = torch.stack([good[0], row])
        for temperature in (1.0, 0.0):
            check_and_control(
                lambda: sample_logits(bad, temperature), ok, ValueError,  # noqa: B023
                rf"^logits must hold a finite maximum in every row .*; logits\[1\] holds {what}$",
            )  # fmt: skip
    assert sample_logits(good, 0.0).tolist() == [1, 0]


def test_filter_logits_bad_logits() -> None:
    """filter_logits checks its logits as sample_logits does (a list, int64, 0-d, V=0)."""
    logits = torch.randn(2, 5)
    ok = lambda: filter_logits(logits, top_k=1)  # noqa: E731
    check_and_control(lambda: filter_logits([1.0, 2.0], top_k=1), ok, TypeError, "logits")  # type: ignore[arg-type]
    check_and_control(lambda: filter_logits(logits.long(), top_k=1), ok, TypeError, "torch.int64")
    check_and_control(lambda: filter_logits(torch.tensor(1.0), top_k=1), ok, TypeError, "logits")
    check_and_control(lambda: filter_logits(logits[:, :0], top_p=0.5), ok, ValueError, "V >= 1")
    lm, prompt = _lm(), torch.tensor([[1, 2]])
    gen_ok = lambda: lm.generate(prompt, 2)  # noqa: E731
    check_and_control(lambda: lm.generate(prompt, -1), gen_ok, ValueError, "max_new_tokens")
    check_and_control(lambda: lm.generate(prompt[:, :0], 2), gen_ok, ValueError, "prompt_ids")
    check_and_control(lambda: lm.generate(prompt + 20, 2), gen_ok, ValueError, "vocab_size=13")
    check_and_control(lambda: lm.generate(prompt.float(), 2), gen_ok, TypeError, "prompt_ids")
    check_and_control(lambda: lm.generate(prompt, 2, top_p=2.0), gen_ok, ValueError, "top_p")
    check_and_control(lambda: _lm(d_model=15), _lm, ValueError, "num_heads")
