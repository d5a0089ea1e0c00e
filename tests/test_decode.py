"""The compiled decoding kernel (``blocked`` engine, ``decode`` op): a few query rows per
key/value head against a long cache, with no mask or one key interval per row. Checked
against fp64 under the 2x rule, NaN and empty rows included, and where ``auto`` sends it."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import attnlab
from attnlab import functional
from attnlab import masks as M
from attnlab.engines import base
from attnlab.engines import blocked as blocked_engine
from tests.conftest import assert_2x_rule, naive_attention


def _qkv(hq: int, hk: int, lq: int, lk: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, hq, lq, 64, generator=g)
    k = torch.randn(2, hk, lk, 64, generator=g)
    v = torch.randn(2, hk, lk, 48, generator=g)
    return q, k, v


def _allowed(mask: M.Mask | None, q: Tensor, k: Tensor) -> Tensor | None:
    if mask is None:
        return None
    return mask.dense(q.shape[2], k.shape[2], batch=q.shape[0], heads=q.shape[1])


MASKS = {
    "none": lambda lk: None,
    "window": lambda lk: M.window(100),
    "causal": lambda lk: M.causal(),
    "padding": lambda lk: M.padding([lk, lk // 3]),
    "window&padding": lambda lk: M.window(50) & M.padding([lk, lk // 2]),
    "documents": lambda lk: M.documents([0] * (lk // 2) + [1] * (lk - lk // 2)),
}


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("heads", [(8, 2, 1), (4, 1, 2), (6, 3, 1), (8, 1, 1), (2, 2, 1)], ids=str)
@pytest.mark.parametrize("lk", [16, 300, 2600])
def test_decoding_meets_the_2x_rule(
    mask: str, heads: tuple[int, int, int], lk: int, decodes: list[int]
) -> None:
    hq, hk, lq = heads
    q, k, v = _qkv(hq, hk, lq, lk, seed=lk + hq)
    m = MASKS[mask](lk)
    with torch.no_grad():
        out = attnlab.attention(q, k, v, mask=m)
    assert isinstance(out, Tensor)
    # grouped heads always decode; one query head per key/value head only under a mask
    # (causal alone lets one row see every key: the call is plain, and SDPA is as fast)
    masked = m is not None and not (mask == "causal" and lq == 1)
    assert len(decodes) == (1 if hq > hk or masked else 0)
    allowed = _allowed(m, q, k)
    ref64, _ = naive_attention(q.double(), k.double(), v.double(), allowed=allowed)
    plain, _ = naive_attention(q, k, v, allowed=allowed)
    assert_2x_rule(out, plain, ref64, f"{mask} {heads} lk={lk}")


@pytest.mark.parametrize("dims", [(40, 20), (80, 72), (8, 3)], ids=str)
def test_head_sizes_that_are_not_whole_vectors(dims: tuple[int, int], decodes: list[int]) -> None:
    e, ev = dims
    g = torch.Generator().manual_seed(e)
    q = torch.randn(2, 8, 1, e, generator=g)
    k = torch.randn(2, 2, 777, e, generator=g)
    v = torch.randn(2, 2, 777, ev, generator=g)
    with torch.no_grad():
        out = attnlab.attention(q, k, v, mask=M.padding([777, 300]))
    assert isinstance(out, Tensor) and len(decodes) == 1
    allowed = _allowed(M.padding([777, 300]), q, k)
    ref64, _ = naive_attention(q.double(), k.double(), v.double(), allowed=allowed)
    plain, _ = naive_attention(q, k, v, allowed=allowed)
    assert_2x_rule(out, plain, ref64, f"E={e} Ev={ev}")


def test_only_the_rows_intervals_are_read(decodes: list[int]) -> None:
    """NaN outside a row's window stays out of it; NaN inside reaches it, as in fp64; a row
    with no key gives 0."""
    q, k, v = _qkv(8, 2, 1, 1000)
    k[0, 0, 10] = float("nan")  # outside the window of the last 100 keys
    v[1, 1, 950] = float("nan")  # inside it, key/value head 1 of batch 1
    mask = M.window(99) & M.padding([1000, 0])  # batch 1 row: ... and no key at all
    mask_b = M.window(99) & M.padding([1000, 1000])
    with torch.no_grad():
        out = attnlab.attention(q, k, v, mask=mask)
        out_b = attnlab.attention(q, k, v, mask=mask_b)
    assert isinstance(out, Tensor) and isinstance(out_b, Tensor) and len(decodes) == 2
    assert not out[0].isnan().any()
    assert torch.equal(out[1], torch.zeros_like(out[1]))  # the empty rows: 0, never NaN
    ref64, _ = naive_attention(q.double(), k.double(), v.double(), allowed=_allowed(mask_b, q, k))
    assert torch.equal(out_b.isnan(), ref64.isnan())
    assert out_b[1, 4:].isnan().all() and not out_b[1, :4].isnan().any()
    finite = ~ref64.isnan()
    torch.testing.assert_close(out_b[finite].double(), ref64[finite], atol=1e-5, rtol=0)


@pytest.mark.parametrize("mask", ["causal", "window"])
@pytest.mark.parametrize("heads", [(1, 1, 3), (8, 2, 1), (4, 2, 3)], ids=str)
def test_a_nan_value_reaches_the_rows_that_see_its_key_only(
    mask: str, heads: tuple[int, int, int], decodes: list[int]
) -> None:
    """(P V ran over all the rows of a key/value head, and a row multiplied the NaN value
    of a key it does not see by its weight 0: rows 0 and 1 of three were NaN where causal
    hides the newest key from them.) A NaN value or key reaches the rows that see it only,
    as in fp64, with soft-capping and sinks too; the value in the first part of a cache
    split across threads, in the middle, and the newest one."""
    hq, hk, lq = heads
    m = M.causal() if mask == "causal" else M.window(1)
    read = 0
    for lk, pos, which in [(40, 39, "v"), (40, 39, "k"), (1500, 1498, "v"), (1500, 3, "v")]:
        q, k, v = _qkv(hq, hk, lq, lk, seed=lk + pos)
        (k if which == "k" else v)[:, -1, pos, 5] = float("nan")
        for softcap, sinks in ((None, None), (30.0, torch.linspace(-1.0, 1.0, hq))):
            decodes.clear()
            with torch.no_grad():
                out = attnlab.attention(q, k, v, mask=m, softcap=softcap, sinks=sinks)
                ref = attnlab.attention(*(t.double() for t in (q, k, v)), mask=m, softcap=softcap,
                                        sinks=sinks, engine="reference")  # fmt: skip
            assert isinstance(out, Tensor) and isinstance(ref, Tensor) and len(decodes) == 1
            where = f"NaN {which} at {pos} of {lk}, softcap {softcap}"
            assert torch.equal(out.isnan(), ref.isnan()), where
            assert not ref.isnan().all(), where
            read += bool(ref.isnan().any())
            fin = ~ref.isnan()
            torch.testing.assert_close(out[fin].double(), ref[fin], atol=1e-5, rtol=0)
    assert read >= 4  # the newest key is seen by some row


def test_a_mask_changed_in_place_is_read_again(decodes: list[int]) -> None:
    """The row bounds are kept for the next call with the same mask object and sizes (a
    model's layers share one mask per step), but not across an in-place change."""
    q, k, v = _qkv(8, 2, 1, 500)
    lengths = torch.tensor([500, 400])
    mask = M.causal() & M.padding(lengths)
    with torch.no_grad():
        first = attnlab.attention(q, k, v, mask=mask)
        again = attnlab.attention(q, k, v, mask=mask)
        lengths[1] = 100
        changed = attnlab.attention(q, k, v, mask=mask)
        fresh = attnlab.attention(q, k, v, mask=M.causal() & M.padding([500, 100]))
    assert len(decodes) == 4
    assert torch.equal(first, again) and torch.equal(changed, fresh)
    assert not torch.equal(first[1], changed[1]) and torch.equal(first[0], changed[0])


def test_a_mask_made_under_inference_mode_is_read_again(decodes: list[int]) -> None:
    """Tensors made under ``torch.inference_mode`` have no version counter: the kept row
    bounds follow their contents instead, and still see an in-place change."""
    q, k, v = _qkv(8, 2, 1, 500)
    with torch.inference_mode():
        lengths = torch.tensor([500, 400])
        mask = M.causal() & M.padding(lengths)
        first = attnlab.attention(q, k, v, mask=mask)
        again = attnlab.attention(q, k, v, mask=mask)
        lengths[1] = 100
        changed = attnlab.attention(q, k, v, mask=mask)
        fresh = attnlab.attention(q, k, v, mask=M.causal() & M.padding([500, 100]))
    assert len(decodes) == 4 and lengths.is_inference()
    assert torch.equal(first, again) and torch.equal(changed, fresh)
    assert not torch.equal(first[1], changed[1])


def test_nan_queries_reach_their_rows_only(decodes: list[int]) -> None:
    q, k, v = _qkv(8, 2, 1, 700)
    q[0, 3, 0, 5] = float("nan")
    with torch.no_grad():
        out = attnlab.attention(q, k, v)
    assert isinstance(out, Tensor) and decodes
    ref64, _ = naive_attention(q.double(), k.double(), v.double())
    assert torch.equal(out.isnan(), ref64.isnan()) and out[0, 3].isnan().all()


def test_a_slice_of_a_larger_cache_and_one_thread_give_the_same(decodes: list[int]) -> None:
    """Keys and values read in place from a view of a preallocated cache (row stride past
    the head size), and the split of the keys over threads does not change the result."""
    q, k, v = _qkv(8, 2, 1, 5000)
    cache_k = torch.zeros(2, 2, 6000, 64)
    cache_k[:, :, :5000] = k
    with torch.no_grad():
        out = attnlab.attention(q, cache_k[:, :, :5000], v)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            one = attnlab.attention(q, k, v)
        finally:
            torch.set_num_threads(threads)
    assert isinstance(out, Tensor) and isinstance(one, Tensor) and len(decodes) == 2
    ref64, _ = naive_attention(q.double(), k.double(), v.double())
    plain, _ = naive_attention(q, k, v)
    assert_2x_rule(out, plain, ref64)
    assert_2x_rule(one, plain, ref64)


def _request(q: Tensor, k: Tensor, v: Tensor, mask: M.Mask | None) -> base.AttentionRequest:
    return functional._request(q, k, v, mask, None, None, "dot", "softmax", 0.0, False, False)


def test_auto_decodes_only_what_the_kernel_serves(decodes: list[int]) -> None:
    q, k, v = _qkv(8, 2, 1, 300)
    with torch.no_grad():
        assert base.select_engine("auto", _request(q, k, v, None)).name == "blocked"
        assert base.select_engine("auto", _request(q, k, v, M.window(10))).name == "blocked"
        dense = _request(q[:, :2], k, v, None)  # one query head per key/value head
        assert base.select_engine("auto", dense).name == "sdpa"
        many = _request(torch.randn(2, 8, 5, 64), k, v, M.causal())  # 20 rows per head
        assert base.select_engine("auto", many).name != "blocked"
        half = _request(q.bfloat16(), k.bfloat16(), v.bfloat16(), None)  # (test_decode_half)
        assert base.select_engine("auto", half).name == "blocked"
    q.requires_grad_(True)  # no backward in the kernel: autograd goes elsewhere
    assert base.select_engine("auto", _request(q, k, v, None)).name == "sdpa"
    out = attnlab.attention(q, k, v)
    assert isinstance(out, Tensor) and out.requires_grad and not decodes


def test_a_plain_decoding_call_builds_no_request(
    decodes: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[int] = []
    full = functional._request
    monkeypatch.setattr(functional, "_request", lambda *a, **kw: built.append(1) or full(*a, **kw))
    q, k, v = _qkv(8, 2, 1, 300)
    with torch.no_grad():
        fast = attnlab.attention(q, k, v, scale=0.2)
        assert not built and len(decodes) == 1
        full_path = attnlab.attention(q, k, v, scale=0.2, engine="blocked")
    assert built and isinstance(fast, Tensor) and torch.equal(fast, full_path)


def test_the_op_checks_its_inputs() -> None:
    if blocked_engine.kernel() is None:
        pytest.skip(f"attnlab's CPU kernel could not be built: {blocked_engine.kernel_error()}")
    q, k, v = _qkv(8, 2, 1, 64)
    op = blocked_engine.ops().decode
    with pytest.raises(RuntimeError, match="float32"):
        op(q.double(), k.double(), v.double(), None, None, 0.1)
    with pytest.raises(RuntimeError, match="at most 64 rows"):
        op(torch.randn(2, 8, 20, 64), k, v, None, None, 0.1)
    with pytest.raises(RuntimeError, match="lo must be int64"):
        op(q, k, v, torch.zeros(2, 1, dtype=torch.int32), torch.zeros(2, 1, dtype=torch.long), 0.1)


def test_the_transformers_backend_decodes_without_a_request(
    decodes: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A maskless decoding step through transformers' attention contract takes the plain
    path (no request); asking for weights does not."""
    pytest.importorskip("transformers")
    from attnlab.integrations.transformers import attention_forward

    built: list[int] = []
    full = functional._request
    monkeypatch.setattr(functional, "_request", lambda *a, **kw: built.append(1) or full(*a, **kw))
    q, k, v = _qkv(8, 2, 1, 300)
    with torch.no_grad():
        out, weights = attention_forward(None, q, k, v, None, scaling=0.2)
        assert not built and weights is None and len(decodes) == 1
        want = attnlab.attention(q, k, v, scale=0.2)
        assert isinstance(want, Tensor) and torch.equal(out, want.transpose(1, 2))
        _, weights = attention_forward(None, q, k, v, None, output_attentions=True)
        assert built and weights is not None and weights.shape == (2, 8, 1, 300)


def test_a_one_row_causal_step_takes_the_path_without_a_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The causal mask is bottom-right aligned: one query row sees every key, so a
    decoding step with ``mask=causal()`` (every ``DecoderLayer`` step) is the plain call
    and takes its path (no request, no engine choice: 2-4x a plain loop's step time at
    small sizes before); a second row still builds a request and is masked."""
    from attnlab.models.lm import LanguageModel, LMConfig

    picks: list[str] = []
    real = functional.select_engine
    monkeypatch.setattr(functional, "select_engine", lambda *a: picks.append(a[0]) or real(*a))
    q, k, v = (torch.randn(1, 4, n, 16, dtype=torch.float64) for n in (1, 37, 37))
    got = attnlab.attention(q, k, v, mask=M.causal())
    assert picks == [] and torch.allclose(got, naive_attention(q, k, v)[0], atol=1e-12)
    two = attnlab.attention(torch.cat([q, q], 2), k, v, mask=M.causal())
    want = naive_attention(q, k[:, :, :36], v[:, :, :36])[0]  # the first row: one key fewer
    assert picks == ["auto"] and torch.allclose(two[:, :, :1], want, atol=1e-12)
    torch.manual_seed(0)
    lm = LanguageModel(LMConfig(vocab_size=50, d_model=32, num_heads=4, num_layers=2)).eval()
    picks.clear()
    with torch.no_grad():
        lm.generate(torch.randint(0, 50, (1, 16)), 12, temperature=0.0)  # from 16 keys on
    assert picks == ["auto", "auto"]  # the prompt's pass through both layers, then none


@pytest.mark.parametrize("mask", [None, M.causal()], ids=["none", "causal"])
def test_named_blocked_engine_decodes_a_maskless_step_with_the_kernel(
    decodes: list[int], mask: M.Mask | None
) -> None:
    """One query head per key/value head and no mask (or causal at one row): ``auto``
    gives these to SDPA, and ``engine="blocked"`` ran its general path: 632-861 us
    against the kernel's 142-178 us (B=4, H=8, 200 keys, E=64, AMD EPYC)."""
    q, k, v = _qkv(4, 4, 1, 300)
    out = attnlab.attention(q, k, v, mask=mask, engine="blocked")
    assert len(decodes) == 1
    ref = naive_attention(*(t.double() for t in (q, k, v)))[0]
    assert_2x_rule(out, naive_attention(q, k, v)[0], ref)
