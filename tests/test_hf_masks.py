"""The transformers mask builder: every mask transformers asks for, as an attnlab mask,
equals transformers' own dense mask; the known kinds carry exact key intervals (no dense
tensor); what is not recognized is evaluated, never dropped. And the backend's errors.
"""

from __future__ import annotations

import importlib

import pytest
import torch

transformers = pytest.importorskip("transformers")
mu = pytest.importorskip("transformers.masking_utils")

import attnlab  # noqa: E402
from attnlab.integrations.hf_masks import FilledKeys, KeyValid, MaskCall, translate  # noqa: E402
from attnlab.integrations.transformers import (  # noqa: E402
    attention_forward,
    build_mask,
    register,
)
from attnlab.masks import Custom  # noqa: E402
from tests.conftest import check_and_control, max_err  # noqa: E402

B = 2


def _padding(kv_total: int) -> torch.Tensor:
    am = torch.ones(B, kv_total, dtype=torch.bool)
    am[0, :3] = False  # left padding
    am[1, -2:] = False  # right padding
    return am


def _hf_dense(call: MaskCall) -> torch.Tensor:
    """transformers' own dense bool mask ``(B, 1, Lq, Lk)`` for the same request."""
    m = mu.sdpa_mask(
        batch_size=call.batch_size,
        q_length=call.q_length,
        kv_length=call.kv_length,
        q_offset=call.q_offset,
        kv_offset=call.kv_offset,
        mask_function=call.mask_function,
        attention_mask=call.attention_mask,
        allow_is_causal_skip=False,
        allow_is_bidirectional_skip=False,
    )
    return torch.broadcast_to(m, (call.batch_size, 1, call.q_length, call.kv_length))


PACKED = torch.tensor([[0] * 5 + [1] * 7, [0] * 9 + [1] * 3])
POS = torch.tensor([list(range(5)) + list(range(7)), list(range(9)) + list(range(3))])
CASES = {
    "causal": (mu.causal_mask_function, 12, 12, 0, 0, False),
    "bidirectional": (mu.bidirectional_mask_function, 12, 12, 0, 0, True),
    "sliding": (mu.sliding_window_causal_mask_function(4), 12, 12, 0, 0, True),
    "sliding-bidirectional": (mu.sliding_window_bidirectional_mask_function(2), 12, 12, 0, 0, True),
    "decode": (mu.causal_mask_function, 1, 13, 12, 0, True),
    "prefill-after-cache": (mu.causal_mask_function, 4, 16, 12, 0, True),
    "sliding-cache": (mu.sliding_window_causal_mask_function(4), 1, 4, 12, 9, True),
    "packed": (
        mu.and_masks(
            mu.remap_positions_for_packed_sequence(mu.causal_mask_function, POS),
            mu.packed_sequence_mask_function(PACKED),
        ),
        12, 12, 0, 0, False,
    ),
    "static-cache": (mu.causal_mask_function, 3, 20, 5, 0, True),  # Lk past the tokens
    "static-decode": (mu.causal_mask_function, 1, 20, 12, 0, True),
    "static-sliding": (mu.sliding_window_causal_mask_function(4), 3, 20, 5, 0, True),
    "static-chunked": (mu.chunked_causal_mask_function(4, torch.tensor([0, 3])),
                       3, 20, 9, 0, True),
    "chunked": (mu.chunked_causal_mask_function(4, torch.zeros(B, dtype=torch.long)),
                12, 12, 0, 0, True),
    "chunked-left-padded": (mu.chunked_causal_mask_function(4, torch.tensor([0, 3])),
                            12, 12, 0, 0, True),
    "chunked-decode": (mu.chunked_causal_mask_function(4, torch.tensor([0, 3])),
                       1, 14, 13, 0, True),
    "chunked-prefill-after-cache": (mu.chunked_causal_mask_function(5, torch.tensor([2, 0])),
                                    4, 16, 12, 0, True),
    "or-overlay": (mu.or_masks(mu.causal_mask_function, lambda b, h, q, k: k == 0),
                   12, 12, 0, 0, True),
    # a bare overlay (no transformers model asks for one) was dropped: every key attended
    "bare-overlay": (mu.sliding_window_overlay(3), 12, 12, 0, 0, True),
    "bare-overlay-unpadded": (mu.sliding_window_overlay(3), 12, 12, 0, 0, False),
    # Qwen2-MoE's default window 0 (a mask no layer reads) raised "left must be a
    # non-negative int, got -1": transformers' own function is evaluated
    "sliding-window-0": (mu.sliding_window_causal_mask_function(0), 12, 12, 0, 0, True),
    "bidirectional-window-minus-1": (mu.sliding_window_bidirectional_mask_function(-1),
                                     12, 12, 0, 0, True),
    "cross-attention": (mu.bidirectional_mask_function, 7, 12, 0, 0, True),  # Lq != Lk
    "one-query-for-all": (mu.bidirectional_mask_function, 1, 12, 0, 0, True),  # BridgeTower
}  # fmt: skip
INTERVALS = {"causal", "sliding", "sliding-bidirectional", "decode", "prefill-after-cache"}
INTERVALS |= {"cross-attention", "one-query-for-all"}
INTERVALS |= {"chunked", "chunked-left-padded", "chunked-decode", "chunked-prefill-after-cache"}


@pytest.mark.parametrize("name", list(CASES))
def test_translated_masks_equal_transformers_dense_masks(name: str) -> None:
    fn, lq, lk, q_off, kv_off, pad = CASES[name]
    call = MaskCall(B, lq, lk, q_off, kv_off, fn, _padding(kv_off + lk) if pad else None)
    mask = translate(call)
    want = _hf_dense(call)
    got = torch.ones_like(want) if mask is None else mask.dense(lq, lk, batch=B)
    assert torch.equal(torch.broadcast_to(got, want.shape), want), name
    structural = mask is None or not isinstance(mask, Custom)
    if name in {*INTERVALS, "packed"}:  # no evaluation of a function: exact intervals
        assert structural and (mask is None or mask.row_bounds(lq, lk, B) is not None), name
    if name == "or-overlay":  # evaluated, never dropped
        assert isinstance(mask, Custom), name
    if name.startswith("static"):  # the empty slots after the tokens: never read
        assert isinstance(mask, FilledKeys) and mask.keys == q_off + lq, name
        bounds = mask.row_bounds(lq, lk, B)
        assert bounds is not None and bounds.exact, name
        keys = torch.arange(lk)
        from_bounds = (keys >= bounds.lo[..., None]) & (keys <= bounds.hi[..., None])
        assert torch.equal(torch.broadcast_to(from_bounds[:, None], want.shape), want), name


def test_a_mask_of_keys_alone_holds_for_every_query_length() -> None:
    """BridgeTower builds its text padding mask for one query and hands it to attentions of
    12 and of 17 queries (eager broadcasts the ``(B, 1, 1, Lk)`` tensor): the translation
    must not depend on the query length it was built for."""
    call = MaskCall(B, 1, 12, 0, 0, mu.bidirectional_mask_function, _padding(12))
    mask = translate(call)
    want = _hf_dense(call)  # (B, 1, 1, 12)
    assert mask is not None and not isinstance(mask, Custom)
    for lq in (1, 12, 17):
        got = mask.dense(lq, 12, batch=B)
        assert torch.equal(torch.broadcast_to(got, (B, 1, lq, 12)), want.expand(B, 1, lq, 12))


def test_left_padding_is_an_exact_interval_per_row() -> None:
    m = translate(MaskCall(B, 12, 12, 0, 0, mu.causal_mask_function, _padding(12)))
    assert m is not None and m.row_bounds(12, 12, B) is not None
    assert any(isinstance(p, KeyValid) for p in m.conjuncts)
    layout = m.block_layout(12, 12, 4, 4, batch=B)
    assert layout.count(attnlab.masks.TileState.EMPTY) > 0  # tiles are skipped


def test_build_mask_takes_transformers_keywords() -> None:
    m = build_mask(
        batch_size=1, q_length=3, kv_length=3, mask_function=mu.causal_mask_function,
        attention_mask=None, allow_is_causal_skip=True, dtype=torch.float32, use_vmap=False,
    )  # fmt: skip
    assert m is not None and m.is_causal


@pytest.mark.parametrize(
    ("engine", "exc", "match"),
    [
        ("blokced", ValueError, "engine='blokced' is not a known engine"),
        (123, TypeError, "engine must be a str, got int"),
        (1.5, TypeError, "engine must be a str, got float"),
    ],
)
def test_register_checks_its_engine_when_called(engine: object, exc: type, match: str) -> None:
    """(Any engine was registered; 'blokced' failed at the model's first forward.)"""
    interface = transformers.AttentionInterface._global_mapping
    with pytest.raises(exc, match=match):
        register("attnlab_bad_engine", engine=engine)  # type: ignore[arg-type]
    assert "attnlab_bad_engine" not in interface
    assert register("attnlab_good_engine", engine="reference") in interface  # the control


def test_a_plain_register_keeps_the_engine_a_name_was_given() -> None:
    """``load_hf`` (``attnlab explain --hf-model``) calls ``register()``: it turned a user's
    ``register(engine=...)`` back to ``"auto"`` without a word."""
    q, k, v = (torch.randn(1, 2, 6, 8, dtype=torch.float64) for _ in range(3))
    want = attnlab.attention(q, k, v, engine="linear").transpose(1, 2)  # (B, L, H, E)
    exact = attnlab.attention(q, k, v, engine="reference").transpose(1, 2)
    interface = transformers.AttentionInterface._global_mapping
    try:
        for again in [(), ("attnlab",), ("attnlab", None)]:
            register(engine="linear")
            register(*again)
            out = interface["attnlab"](None, q, k, v, None)[0]
            assert max_err(out, want) < 1e-12 and max_err(out, exact) > 1e-3  # still linear
        register(engine="reference")  # an engine given: the new one
        assert max_err(interface["attnlab"](None, q, k, v, None)[0], exact) < 1e-12
    finally:
        register(engine="auto")


@pytest.mark.parametrize("name", ["sdpa", "eager", "flash_attention_2", "flex_attention"])
def test_register_refuses_transformers_own_names(name: str) -> None:
    """(register("sdpa") put attnlab under transformers' sdpa for every model.)"""
    before = dict(transformers.AttentionInterface._global_mapping)
    with pytest.raises(ValueError, match=f"name='{name}' is transformers' own"):
        register(name)
    assert transformers.AttentionInterface._global_mapping == before
    assert register() == register() == "attnlab"  # the control: its own name, again


@pytest.mark.parametrize("name", ["", "my/attn", "paged|mine", "flash_mine", "a b"])
def test_register_refuses_names_transformers_reads_otherwise(name: str) -> None:
    """(register("my/attn") was accepted, and set_attn_implementation("my/attn") then went
    for a Hub kernel of that name; "flash_mine" was sought as a flash-attention kernel.)"""
    before = dict(transformers.AttentionInterface._global_mapping)
    with pytest.raises(ValueError, match=f"name={name!r} would not reach attnlab"):
        register(name)
    assert transformers.AttentionInterface._global_mapping == before
    assert register("attnlab.mine-2") == "attnlab.mine-2"  # the control: such a name works
    cfg = transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, attn_implementation="eager",
    )  # fmt: skip
    model, ids = transformers.LlamaForCausalLM(cfg).eval(), torch.tensor([[1, 2, 3, 4]])
    want = model(ids).logits
    model.set_attn_implementation("attnlab.mine-2")
    assert model.config._attn_implementation == "attnlab.mine-2"
    assert max_err(model(ids).logits, want) < 1e-5


@pytest.mark.parametrize("version", ["5.0.0", "5.3.0"])
def test_register_refuses_a_transformers_before_5_4(
    version: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(On 5.0-5.3 register() succeeded and every forward raised "build_mask() missing 1
    required positional argument: 'q_length'": those call it with cache_position.)
    The module register() imports now: another test may have imported it again."""
    tf = importlib.import_module("transformers")
    before = dict(tf.AttentionInterface._global_mapping)
    monkeypatch.setattr(tf, "__version__", version)
    with pytest.raises(ImportError, match=f"needs transformers>=5.4, found {version} "):
        register()
    assert tf.AttentionInterface._global_mapping == before
    monkeypatch.setattr(tf, "__version__", "5.4.0.dev0")  # the control
    assert register() == "attnlab"


def test_what_the_backend_cannot_compute_is_named() -> None:
    q = k = v = torch.randn(1, 2, 4, 8)
    check_and_control(
        lambda: attention_forward(None, q, k, v, None, head_mask=torch.ones(2)),
        lambda: attention_forward(None, q, k, v, None, head_mask=None),
        ValueError,
        "cannot compute 'head_mask'",
    )
    check_and_control(
        lambda: attention_forward(None, q, k, v, None, position_bias=[[0.0]]),
        lambda: attention_forward(None, q, k, v, None, position_bias=torch.zeros(1, 2, 4, 4)),
        TypeError,
        r"position_bias: .*additive float tensor \(B or 1, H, Lq, Lk\), got list",
    )
    check_and_control(
        lambda: attention_forward(None, q, k, v, None, s_aux=torch.zeros(2), sinks=torch.zeros(2)),
        lambda: attention_forward(None, q, k, v, None, s_aux=torch.zeros(2)),
        ValueError,
        "sinks as s_aux or sinks, not both",
    )
    check_and_control(
        lambda: attention_forward(None, q, k, v, "causal"),  # type: ignore[arg-type]
        lambda: attention_forward(None, q, k, v, torch.ones(1, 1, 4, 4, dtype=torch.bool)),
        TypeError,
        "attention_mask: the attnlab backend takes an attnlab mask.*got str",
    )
    # an integer or too-short 4-D mask was refused as "bias=", which nobody gave
    check_and_control(
        lambda: attention_forward(None, q, k, v, torch.ones(1, 1, 4, 4, dtype=torch.long)),
        lambda: attention_forward(None, q, k, v, torch.zeros(1, 1, 4, 4)),
        TypeError,
        r"attention_mask: .*bool or an additive float tensor .*got torch.int64",
    )
    check_and_control(
        lambda: attention_forward(None, q, k, v, torch.zeros(1, 1, 4, 3)),
        lambda: attention_forward(None, q, k, v, torch.zeros(1, 1, 4, 5)),
        ValueError,
        r"attention_mask: .*\(B or 1, 1 or H, Lq, Lk >= 4\), got shape \(1, 1, 4, 3\)",
    )


def test_a_float_mask_is_added_like_eager() -> None:
    q = k = v = torch.randn(1, 2, 4, 8, dtype=torch.float64)
    add = torch.zeros(1, 1, 4, 6, dtype=torch.float64)
    add[..., 1] = torch.finfo(torch.float64).min  # eager's additive form, one key hidden
    out, _ = attention_forward(None, q, k, v, add)  # sliced to Lk = 4, as eager does
    allowed = torch.ones(4, 4, dtype=torch.bool)
    allowed[:, 1] = False
    want = attnlab.attention(q, k, v, mask=allowed, engine="reference")
    assert torch.allclose(out, want.transpose(1, 2))  # type: ignore[union-attr]
