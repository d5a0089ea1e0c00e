"""Attention sinks (gpt-oss: a learned logit per head in the softmax denominator; Inkling
2: one per query row) in the core: the reference and blocked engines against plain
PyTorch written from the definition, forward and backward (the sinks' gradient too);
engines without a softmax denominator decline; bad sinks are named."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import attnlab
from attnlab import masks
from attnlab.engines import blocked_autograd
from tests.conftest import assert_2x_rule, check_and_control, max_err, naive_attention


def naive_sinks(q, k, v, allowed, sinks, scale):  # type: ignore[no-untyped-def]
    """The definition: a softmax over the keys and one extra logit per head (``(H,)``) or
    per row (``(B or 1, H, L)``), whose share is dropped (fully masked rows give 0)."""
    return naive_attention(q, k, v, allowed=allowed, scale=scale, sinks=sinks)


# one logit per head (gpt-oss); per row of every batch, or shared by the batch (Inkling 2)
SINKS = {"head": lambda n: (4,), "row": lambda n: (2, 4, n), "row-shared": lambda n: (1, 4, n)}


def _inputs(dtype: torch.dtype, n: int = 97, e: int = 40, kind: str = "head") -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, n, e, generator=g) for h in (4, 2, 2))
    sinks = torch.randn(SINKS[kind](n), generator=g) * 2
    return [t.to(dtype).requires_grad_() for t in (q, k, v, sinks)]


def _allowed(n: int) -> torch.Tensor:
    m = (masks.causal() & masks.window(30)).dense(n, n).clone()  # (1, 1, n, n)
    m[..., 7, :] = False  # one fully masked row
    return m


def _by_the_2x_rule(n: int, kind: str, allowed: torch.Tensor, attend: Callable, what: str) -> list:
    """Output and gradients (q, k, v, sinks) of a squared-sum loss through ``attend``,
    each held to the 2x rule against the definition in fp64 and plain fp32; returns ours."""

    def run(fn: Callable, dtype: torch.dtype) -> list:
        ts = _inputs(dtype, n, kind=kind)
        out = fn(*ts)
        out.square().sum().backward()
        return [out.detach(), *(t.grad for t in ts)]

    def naive(q, k, v, s):  # type: ignore[no-untyped-def]
        return naive_sinks(q, k, v, allowed, s, 40**-0.5)[0]

    ref64, plain = run(naive, torch.float64), run(naive, torch.float32)
    ours = run(attend, torch.float32)
    for name, o, p, r in zip(["out", "dq", "dk", "dv", "dsinks"], ours, plain, ref64, strict=True):
        assert_2x_rule(o, p, r, f"{what} {name}")
    return ours


@pytest.mark.parametrize("kind", list(SINKS))
@pytest.mark.parametrize("engine", ["reference", "blocked", "blocked-eager"])
def test_sinks_follow_the_definition_by_the_2x_rule(
    engine: str, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    n, allowed = 97, _allowed(97)
    if engine == "blocked-eager":  # the per-block eager path, not torch's fused kernel
        monkeypatch.setattr(blocked_autograd, "USE_FUSED", False)
        engine = "blocked"

    ours = _by_the_2x_rule(
        n, kind, allowed, lambda q, k, v, s: attnlab.attention(
            q, k, v, mask=allowed, sinks=s, engine=engine
        ), engine,
    )  # fmt: skip
    assert float(ours[0][:, :, 7].abs().max()) == 0.0  # the fully masked row gives 0
    plain_out = attnlab.attention(*_inputs(torch.float32, n)[:3], mask=allowed, engine=engine)
    assert ours[4].shape == SINKS[kind](n)  # the sinks' gradient has their shape
    assert max_err(plain_out, ours[0]) > 1e-2  # positive control: the sinks matter


# (seed, heads, key/value heads, length, head size, scale of q and k, mask, sinks' shape):
# with the sinks inside the blocked engine's autograd function, each row's delta came from
# the forward's output: dQ 2.6x and dK 2.5x plain PyTorch's float32 error in these two
SINK_DELTA_CASES = {
    "window, 2 heads": (4, 2, 2, 202, 32, 1.0, masks.causal() & masks.window(100), (2,)),
    "causal, GQA 8/2": (8, 8, 2, 292, 32, 2.0, masks.causal(), (8,)),
    "causal, a sink per row": (3, 4, 2, 181, 80, 0.5, masks.causal(), (1, 4, 181)),
}


@pytest.mark.parametrize("path", ["kernel", "eager"])
@pytest.mark.parametrize("case", list(SINK_DELTA_CASES))
def test_sink_gradients_take_delta_from_their_own_probabilities(
    case: str, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """dQ, dK, dV strictly within 2x plain PyTorch's float32 error (no floor; these errors
    are about 1e-6): the sinks join the blocked engine's finished softmax outside its
    autograd function, so its backward makes each row's delta of its own P and dP. The
    sinks' own gradient is held to the usual rule (it comes from the forward's output,
    within an ulp or two of its largest value either way)."""
    seed, h, hkv, n, e, scale, mask, shape = SINK_DELTA_CASES[case]
    if path == "kernel" and blocked_autograd.kernel() is None:
        pytest.skip(f"attnlab's CPU kernel could not be built: {blocked_autograd.kernel_error()}")
    if path == "eager":
        monkeypatch.setattr(blocked_autograd, "USE_KERNEL", False)
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(1, heads, n, e, generator=g) * scale for heads in (h, hkv))
    v, dout = torch.randn(1, hkv, n, e, generator=g), torch.randn(1, h, n, e, generator=g)
    sinks, allowed = torch.randn(shape, generator=g) * 2, mask.dense(n, n)

    def grads(attend: Callable, dtype: torch.dtype) -> list[torch.Tensor]:
        ts = [t.to(dtype, copy=True).requires_grad_() for t in (q, k, v, sinks)]
        return list(torch.autograd.grad((attend(*ts) * dout.to(dtype)).sum(), ts))

    def naive(q, k, v, s):  # type: ignore[no-untyped-def]
        return naive_sinks(q, k, v, allowed, s, e**-0.5)[0]

    def ours(q, k, v, s):  # type: ignore[no-untyped-def]
        return attnlab.attention(q, k, v, mask=mask, sinks=s, engine="blocked")

    want, plain = grads(naive, torch.float64), grads(naive, torch.float32)
    blocked_autograd.STATS.clear()
    got = grads(ours, torch.float32)
    assert (blocked_autograd.STATS.get("scores", 0) > 0) == (path == "kernel")
    for name, o, p, w in zip(["dq", "dk", "dv"], got, plain, want, strict=False):
        assert max_err(o, w) <= 2 * max_err(p, w), (name, max_err(o, w), max_err(p, w))
    assert_2x_rule(got[3], plain[3], want[3], "dsinks")


@pytest.mark.parametrize("engine", ["reference", "blocked", "blocked-eager"])
def test_a_sink_of_minus_inf_on_a_row_without_keys_gives_0(
    engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sink of -inf means no sink for that head: a row with no key then has nothing in
    its softmax at all, and gives 0, its logsumexp -inf, and finite gradients (sinks'
    too); the other rows follow the definition in fp64."""
    if engine == "blocked-eager":
        monkeypatch.setattr(blocked_autograd, "USE_FUSED", False)
        engine = "blocked"
    q, k, v, _ = _inputs(torch.float64, 97, kind="head")
    sinks = torch.tensor([float("-inf"), 0.5, float("-inf"), 1.0], dtype=torch.float64)
    sinks.requires_grad_()
    allowed = _allowed(97)
    r = attnlab.attention(q, k, v, mask=allowed, sinks=sinks, engine=engine, return_lse=True)
    r.out.square().sum().backward()
    assert float(r.out[:, :, 7].abs().max()) == 0.0 and bool(r.lse[:, [0, 2], 7].isneginf().all())
    grads = [t.grad for t in (q, k, v, sinks)]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    want, _ = naive_sinks(q.detach(), k.detach(), v.detach(), allowed, sinks.detach(), 40**-0.5)
    rows = torch.arange(97) != 7
    assert max_err(r.out[:, :, rows], want[:, :, rows]) < 1e-12


@pytest.mark.parametrize("kind", list(SINKS))
@pytest.mark.parametrize("engine", ["reference", "blocked"])
def test_sink_weights_and_lse_are_exact(engine: str, kind: str) -> None:
    q, k, v, s = (t.detach() for t in _inputs(torch.float64, 64, 16, kind))
    allowed = _allowed(64)
    r = attnlab.attention(
        q, k, v, mask=allowed, sinks=s, engine=engine, return_weights=True, return_lse=True
    )
    _, w = naive_sinks(q, k, v, allowed, s, 16**-0.5)
    assert max_err(r.weights, w) < 1e-12  # type: ignore[union-attr]
    assert bool((w.sum(-1) < 1).all())  # the sinks take a share of every row
    scores = torch.einsum("bhqe,bhke->bhqk", q, k.repeat_interleave(2, 1)) * 16**-0.5
    scores = scores.masked_fill(~allowed, float("-inf"))
    rows = s.view(1, -1, 1) if s.dim() == 1 else s
    lse = torch.logaddexp(scores.logsumexp(-1), rows)  # keys and the sink
    assert max_err(r.lse, lse) < 1e-12  # type: ignore[union-attr]
    w2 = attnlab.attention_weights(q, k, v, mask=allowed, sinks=s, heads=[3], rows=(5, 9))
    assert max_err(w2, w[:, [3], 5:9]) < 1e-12


@pytest.mark.parametrize("engine", ["sdpa", "performer", "nystrom", "linear"])
def test_engines_without_a_softmax_denominator_decline_sinks(engine: str) -> None:
    q = k = v = torch.randn(1, 2, 16, 8)
    check_and_control(
        lambda: attnlab.attention(q, k, v, sinks=torch.zeros(2), engine=engine),
        lambda: attnlab.attention(q, k, v, engine=engine),
        ValueError,
        f"engine='{engine}' cannot compute this request: .*sinks",
    )


@pytest.mark.parametrize(
    ("sinks", "kw", "exc", "match"),
    [
        (torch.zeros(3), {}, ValueError, r"sinks must have shape \(Hq,\) = \(2,\).*got \(3,\)"),
        (
            torch.zeros(1, 2, 5),
            {},
            ValueError,
            r"\(B or 1, Hq, Lq\) = \(1 or 1, 2, 4\).*got \(1, 2, 5\)",
        ),
        (torch.zeros(3, 2, 4), {}, ValueError, r"one per query row; got \(3, 2, 4\)"),
        (torch.zeros(2, dtype=torch.long), {}, TypeError, "sinks must be a float tensor"),
        ([0.0, 0.0], {}, TypeError, "sinks must be a float tensor .* got list"),
        (torch.zeros(2), {"normalize": "sparsemax"}, ValueError, "normalize='sparsemax'"),
    ],
)
def test_bad_sinks_are_named(sinks: object, kw: dict, exc: type[Exception], match: str) -> None:
    q = torch.randn(1, 2, 4, 8)
    check_and_control(
        lambda: attnlab.attention(q, q, q, sinks=sinks, **kw),  # type: ignore[arg-type]
        lambda: attnlab.attention(q, q, q, sinks=torch.zeros(2)),
        exc,
        match,
    )


@pytest.mark.parametrize("kind", list(SINKS))
def test_kernel_serves_sinks_by_the_2x_rule(kind: str) -> None:
    """The compiled kernel runs a call with sinks (its output and lse, then the sinks' share):
    forward and backward, the sinks' gradient too, under the 2x rule against fp64, with a
    padded batch whose second item's last rows see no key."""
    from attnlab.engines import blocked as blocked_mod

    if blocked_mod.kernel() is None:
        pytest.skip(f"attnlab's CPU kernel could not be built: {blocked_mod.kernel_error()}")
    n = 300
    mask = masks.causal() & masks.window(70) & masks.padding([300, 250], [300, 250])
    allowed = mask.dense(n, n, batch=2, heads=4).expand(2, 4, n, n)

    blocked_autograd.STATS.clear()
    ours = _by_the_2x_rule(
        n, kind, allowed, lambda q, k, v, s: attnlab.attention(
            q, k, v, mask=mask, sinks=s, engine="blocked"
        ), "kernel",
    )  # fmt: skip
    assert blocked_autograd.STATS.get("scores", 0) > 0  # the kernel ran
    assert float(ours[0][1, :, 250:].abs().max()) == 0.0  # rows with no key give 0
    q, k, v, s = (t.detach() for t in _inputs(torch.float32, n, kind=kind))
    blocked_autograd.STATS.clear()
    r = attnlab.attention(
        q, k, v, mask=mask, sinks=s, engine="blocked", return_weights=True, return_lse=True
    )
    assert blocked_autograd.STATS.get("scores", 0) > 0  # the kernel wrote the weights
    out64, w64 = naive_sinks(*(t.double() for t in (q, k, v)), allowed, s.double(), 40**-0.5)
    out32, w32 = naive_sinks(q, k, v, allowed, s, 40**-0.5)
    assert_2x_rule(r.weights, w32, w64, "kernel weights")  # type: ignore[union-attr]
    assert_2x_rule(r.out, out32, out64, "kernel out with weights")  # type: ignore[union-attr]


@pytest.mark.parametrize("option", ["sinks", "softcap", "return_lse"])
def test_auto_takes_the_blocked_engine_where_sdpa_cannot(option: str) -> None:
    """A long causal or maskless call with what SDPA lacks goes to the blocked engine, not
    to the reference engine's dense scores (Lq x Lk per head); a short one may."""
    from attnlab.engines import select_engine
    from attnlab.functional import _request

    def chosen(n: int, mask: masks.Mask | None, lse: bool = False, **kw: object) -> str:
        q, k = torch.randn(1, 4, n, 16), torch.randn(1, 2, n, 16)
        args = (q, k, k, mask, None, None, "dot", "softmax", 0.0, False, lse)
        return select_engine("auto", _request(*args, **kw)).name  # type: ignore[arg-type]

    extra = {"sinks": {"sinks": torch.zeros(4)}, "softcap": {"softcap": 30.0}}
    kw = extra.get(option, {"lse": True})
    for mask in (None, masks.causal()):
        assert chosen(1024, mask, **kw) == "blocked", (option, mask)
        assert chosen(64, mask, **kw) == "reference"  # short: dense scores are cheap
    assert chosen(1024, None) == "sdpa"  # control: SDPA serves a plain dense call
    q, k = torch.randn(1, 4, 1024, 16, requires_grad=True), torch.randn(1, 2, 1024, 16)
    r = attnlab.attention(q, k, k, mask=masks.causal(), return_lse=True)
    assert r.lse.requires_grad  # type: ignore[union-attr]  # the blocked engine's has a grad


@pytest.mark.parametrize("kind", list(SINKS))
@pytest.mark.parametrize("cap", [None, 5.0])
@pytest.mark.parametrize("masked", [False, True])
def test_decoding_kernel_serves_sinks_and_softcap(
    kind: str, cap: float | None, masked: bool
) -> None:
    """A decoding step (2 query rows per query head against a long cache) with sinks, soft-
    capped or not, runs in the decoding kernel and meets the 2x rule against fp64; under a
    padding mask that leaves the second batch item no key its rows give 0, sinks or not."""
    from attnlab.engines import blocked as blocked_mod
    from attnlab.engines import get_engine
    from attnlab.functional import _request

    if blocked_mod.kernel() is None:
        pytest.skip(f"attnlab's CPU kernel could not be built: {blocked_mod.kernel_error()}")
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, h, n, 40, generator=g) * 1.5 for h, n in ((4, 2), (2, 700)))
    v = torch.randn(2, 2, 700, 40, generator=g)
    shape = {"head": (4,), "row": (2, 4, 2), "row-shared": (1, 4, 2)}[kind]
    sinks = torch.randn(shape, generator=g) * 2 + 6  # near the logsumexp of the keys
    mask = masks.window(100) & masks.padding([700, 0]) if masked else None
    kw = {"mask": mask, "sinks": sinks, "softcap": cap}
    req = _request(
        q, k, v, mask, None, None, "dot", "softmax", 0.0, False, False, softcap=cap, sinks=sinks
    )
    assert get_engine("blocked").decoding(req)[0]  # the decoding kernel serves it
    ours = attnlab.attention(q, k, v, engine="blocked", **kw)
    plain = attnlab.attention(q, k, v, engine="reference", **kw)
    d = {"mask": mask, "sinks": sinks.double(), "softcap": cap}
    ref64 = attnlab.attention(q.double(), k.double(), v.double(), engine="reference", **d)
    assert_2x_rule(ours, plain, ref64, f"decode {kind} cap={cap}")
    if masked:
        assert float(ours[1].abs().max()) == 0.0  # no key: 0
    without = attnlab.attention(q, k, v, mask=mask, softcap=cap, engine="blocked")
    assert max_err(without, ours) > 1e-2  # positive control: the sinks matter
