"""An infinite key or value the mask hides stays out of the rows that do not read it, as a
NaN one does; the rows that read it get what plain math gives (checked against fp64, each
row computed over the keys it sees only)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import attnlab
from attnlab import masks

B, H, L, E = 1, 2, 40, 16
SPOT = 20  # the causal case's non-finite key: rows 0-19 do not see it
CASES = [("k", math.inf), ("k", -math.inf), ("v", math.inf), ("v", -math.inf)]


def _inputs(which: str, value: float, at: int) -> tuple[torch.Tensor, ...]:
    """q, k, v ``(B, H, L, E)``; ``which`` holds ``value`` in one entry of key ``at``."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, E, generator=g) for _ in range(3))
    (k if which == "k" else v)[:, :, at, 3] = value
    return q, k, v


def _fp64_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seen: list[int]):
    """Plain fp64 attention, row ``i`` over keys ``0 .. seen[i] - 1`` only, and the
    gradients of ``out.sum()`` (q, k, v; 0 for a key no row sees)."""
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    rows = []
    for i, n in enumerate(seen):
        w = torch.softmax(q[:, :, i : i + 1] @ k[:, :, :n].mT / math.sqrt(E), -1)
        rows.append(w @ v[:, :, :n])  # (B, H, 1, E)
    out = torch.cat(rows, 2)
    return (out.detach(), *torch.autograd.grad(out.sum(), (q, k, v)))


def _run(engine: str, mask: masks.Mask, q, k, v):
    ts = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attnlab.attention(*ts, mask=mask, engine=engine)
    return (out.detach(), *torch.autograd.grad(out.sum(), ts))


@pytest.mark.parametrize("which,value", CASES)
@pytest.mark.parametrize("engine", ["reference", "auto", "blocked"])
def test_a_hidden_padded_key_or_value_stays_out(engine: str, which: str, value: float) -> None:
    q, k, v = _inputs(which, value, L - 1)  # padding hides the last key from every row
    got = _run(engine, masks.padding(torch.tensor([L - 1])), q, k, v)
    want = _fp64_rows(q, k, v, [L - 1] * L)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g.double(), w, atol=2e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("which,value", CASES)
@pytest.mark.parametrize("engine", ["reference", "auto", "blocked"])
def test_rows_before_a_causal_non_finite_key_stay_clean(
    engine: str, which: str, value: float
) -> None:
    q, k, v = _inputs(which, value, SPOT)
    got = _run(engine, masks.causal(), q, k, v)
    want = _fp64_rows(q, k, v, list(range(1, L + 1)))
    # every row as plain math gives it: the rows from SPOT on read the key (inf, NaN or
    # a -inf score's weight 0), the rows before it do not
    torch.testing.assert_close(got[0].double(), want[0], atol=2e-5, rtol=1e-5, equal_nan=True)
    assert torch.isfinite(got[0][:, :, :SPOT]).all() and torch.isfinite(got[1][:, :, :SPOT]).all()
    for name, g, w in zip(("dq", "dk", "dv"), got[1:], want[1:], strict=True):
        ok = torch.isfinite(w)  # plain math's non-finite gradients (0 * inf) not compared
        torch.testing.assert_close(g.double()[ok], w[ok], atol=2e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("which,value", CASES)
def test_sdpa_declines_a_non_finite_key_or_value_by_name(which: str, value: float) -> None:
    q, k, v = _inputs(which, value, L - 1)
    with pytest.raises(ValueError, match="NaN or inf, which torch SDPA spreads to rows"):
        attnlab.attention(q, k, v, mask=masks.padding(torch.tensor([L - 1])), engine="sdpa")


@pytest.mark.parametrize("which,value", CASES)
@pytest.mark.parametrize("engine", ["linear", "performer", "nystrom"])
@pytest.mark.parametrize("causal", [False, True])
def test_approximate_engines_keep_a_hidden_non_finite_entry_out(
    engine: str, which: str, value: float, causal: bool
) -> None:
    if causal and engine == "nystrom":
        pytest.skip("nystrom has no causal form")
    mask = masks.padding(torch.tensor([L - 1]))
    mask = mask & masks.causal() if causal else mask
    q, k, v = _inputs(which, value, L - 1)
    clean = _inputs(which, 0.0, L - 1)  # the hidden entry finite: the engine's own answer
    got, want = _run(engine, mask, q, k, v), _run(engine, mask, *clean)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5, msg=name)


def test_inf_products_match_plain_products_with_nan_and_inf_on_both_sides() -> None:
    # a NaN query entry meeting an infinite key entry gave 0 (a finite output row where
    # plain math gives NaN); every mix of 0, +-1, NaN in a and 0, +-inf, NaN in d
    from attnlab.engines._nonfinite import inf_products

    left, right = [0.0, 1.0, -1.0, math.nan], [0.0, math.inf, -math.inf, math.nan]
    pairs = torch.cartesian_prod(torch.arange(4), torch.arange(4), torch.arange(4), torch.arange(4))
    a = torch.tensor(left)[pairs[:, :2]].view(1, 1, -1, 2)  # (1, 1, 256, 2) rows
    d = torch.tensor(right)[pairs[:, 2:]].T.reshape(1, 1, 2, -1)  # (1, 1, 2, 256) columns
    terms = a.double().unsqueeze(-1) * d.double()  # (1, 1, 256, 2, 256)
    plain = terms.where(d != 0, 0.0).sum(-2)  # d's 0 entries add nothing (docstring)
    ours = inf_products(a, d, None).double()
    same = (ours == plain) | (ours.isnan() & plain.isnan())
    assert bool(same.all()), f"{int((~same).sum())} of {same.numel()} entries differ"


def test_a_nan_query_entry_meeting_an_infinite_key_gives_nan() -> None:
    q, k, v = (torch.randn(1, 1, 4, 2, generator=torch.Generator().manual_seed(1)) for _ in "qkv")
    q[0, 0, 0, 0], k[0, 0, 0, 0] = math.nan, math.inf  # row 0 sees key 0 only
    for engine in ("reference", "auto"):
        out = attnlab.attention(q, k, v, mask=masks.causal(), engine=engine)
        assert isinstance(out, torch.Tensor)
        assert bool(out[0, 0, 0].isnan().all()), engine


def test_reference_rows_match_plain_math_with_nan_and_inf_in_queries_and_keys() -> None:
    # an inf query entry meeting a key that holds inf or NaN gave 0 rows (plain: NaN) or a
    # NaN score where plain math has inf; every row that sees a score above -inf is
    # compared with plain float64 softmax over the keys it sees (400 seeded trials)
    g = torch.Generator().manual_seed(0)
    values, seen, wrong = [math.inf, -math.inf, math.nan], 0, []
    for trial in range(400):
        q, k, v = (torch.randn(1, 2, 6, 2, generator=g, dtype=torch.float64) for _ in "qkv")
        for t in (q, k):
            for _ in range(2):
                h, i, e, n = (int(torch.randint(0, m, (1,), generator=g)) for m in (2, 6, 2, 3))
                t[0, h, i, e] = values[n]
        out = attnlab.attention(q, k, v, mask=masks.causal(), engine="reference")
        assert isinstance(out, torch.Tensor)
        for h, i in itertools.product(range(2), range(6)):
            s = q[0, h, i] @ k[0, h, : i + 1].T / math.sqrt(2)  # (i + 1,)
            if bool((s == -math.inf).all()):
                continue  # no key left: attnlab gives 0 (plain math NaN)
            ref, ours = torch.softmax(s, -1) @ v[0, h, : i + 1], out[0, h, i]
            seen += 1
            if not torch.allclose(ours, ref, rtol=1e-9, atol=1e-9, equal_nan=True):
                wrong.append((trial, h, i, ours.tolist(), ref.tolist()))
    assert seen > 4000 and not wrong, wrong[:3]
