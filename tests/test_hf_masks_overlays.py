"""The windows that transformers' model files define for themselves (Gemma 3's and
Step3p7's ``_bidirectional_window_overlay`` and the always-true lambda of their
bidirectional full layers, i.e. EmbeddingGemma; Gemma 4's audio and Moonshine streaming's
``sliding_window_mask_function``; T5Gemma 2's function of the same name) as attnlab
windows: the masks equal transformers' dense masks on a grid of paddings and caches, and
carry no custom mask (before, each was evaluated tile by tile as ``custom(hf_mask)``).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")
mu = pytest.importorskip("transformers.masking_utils")
cache_utils = pytest.importorskip("transformers.cache_utils")
gemma3 = pytest.importorskip("transformers.models.gemma3.modeling_gemma3")

from attnlab import masks  # noqa: E402
from attnlab.integrations.hf_masks import MaskCall, translate  # noqa: E402
from attnlab.integrations.transformers import register  # noqa: E402
from tests.conftest import assert_2x_rule, attnlab_calls  # noqa: E402
from tests.test_hf_masks_blockwise import PADDINGS, _attention_mask, _hf_dense  # noqa: E402

B, L, V = 2, 12, 64
CACHES = ("none", "prefill-after-cache", "decode", "static")


def _embedding_gemma(window: int = 7) -> Any:
    """A tiny EmbeddingGemma config: Gemma 3 text, bidirectional (its window becomes
    ``window // 2 + 1``, keys ``|q - k| < 4`` for 7)."""
    cfg = transformers.Gemma3TextConfig(
        hidden_size=32, intermediate_size=32, num_attention_heads=2, head_dim=16,
        num_key_value_heads=1, num_hidden_layers=2, vocab_size=V, sliding_window=window,
        layer_types=["sliding_attention", "full_attention"], use_bidirectional_attention=True,
        pad_token_id=0,
    )  # fmt: skip
    return cfg


def _record(cfg: Any) -> tuple[list[MaskCall], Any]:
    """The mask requests the model's own builders make from now on, and a restorer."""
    seen: list[MaskCall] = []

    def record(batch_size: int, q_length: int, kv_length: int, **kw: Any) -> None:
        seen.append(
            MaskCall(batch_size, q_length, kv_length, int(kw.get("q_offset", 0)),
                     int(kw.get("kv_offset", 0)), kw["mask_function"], kw.get("attention_mask"))
        )  # fmt: skip

    mapping = mu.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping
    own = mapping[cfg._attn_implementation]
    mapping[cfg._attn_implementation] = record
    return seen, lambda: mapping.__setitem__(cfg._attn_implementation, own)


def _gemma_calls(cache_kind: str, padding: str, window: int = 7) -> list[MaskCall]:
    """The mask requests of EmbeddingGemma's own forward for one step."""
    cfg = _embedding_gemma(window)
    cfg._attn_implementation = register()
    torch.manual_seed(0)
    model = gemma3.Gemma3TextModel(cfg).eval()
    cached = {"none": 0, "prefill-after-cache": 8, "decode": L - 1, "static": 0}[cache_kind]
    cache = None
    if cache_kind == "static":
        cache = cache_utils.StaticCache(config=cfg, max_cache_len=2 * L)
    elif cache_kind != "none":
        cache = cache_utils.DynamicCache(config=cfg)
        for layer in range(cfg.num_hidden_layers):
            kv = torch.zeros(B, 1, cached, 16)
            cache.update(kv, kv, layer)
    ids = torch.randint(3, V, (B, L - cached), generator=torch.Generator().manual_seed(1))
    seen, restore = _record(cfg)
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=_attention_mask(padding), cache=cache,
                  position_ids=torch.arange(cached, L).expand(B, -1))  # fmt: skip
    finally:
        restore()
    return seen


def _check(call: MaskCall, what: str, structured: bool = True) -> masks.Mask | None:
    """The translation of ``call`` equals transformers' dense mask; ``structured``: it
    carries no custom mask and reports an exact interval per row."""
    mask = translate(call)
    want = _hf_dense(call)
    got = torch.ones_like(want) if mask is None else mask.dense(*want.shape[2:], batch=B)
    assert torch.equal(torch.broadcast_to(got, want.shape), want), what
    if structured and mask is not None:
        assert "custom" not in mask.spec(), f"{what}: {mask.spec()}"
        bounds = mask.row_bounds(call.q_length, call.kv_length, B)
        assert bounds is not None and bounds.exact, f"{what}: no exact interval per row"
    return mask


@pytest.mark.parametrize("window", [7, 31])
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("cache_kind", CACHES)
def test_embedding_gemma_masks_equal_transformers_and_are_windows(
    cache_kind: str, padding: str, window: int
) -> None:
    """A window of 31 (16 each side) is wider than the 12 tokens: with a static cache its
    layer reads 16 slots, 4 of them empty. The 2-D mask ends at the last token, so
    transformers' mask hides the empty slots and the window covers the filled keys
    (before, transformers' function was evaluated); without a 2-D mask transformers' window
    sees the empty slots, and its function stays."""
    calls = _gemma_calls(cache_kind, padding, window)
    assert len(calls) == 2  # the sliding and the full layers' masks
    for call in calls:
        what = f"{cache_kind} {padding} {window} Lq={call.q_length} Lk={call.kv_length}"
        sees_empty = cache_kind == "static" and padding == "none"
        mask = _check(call, what, structured=not sees_empty)
        if cache_kind == "none" and padding == "none" and window == 7:
            specs = {"window(left=3, right=3)", None}
            assert (mask.spec() if mask is not None else None) in specs, what


def _step3p7_overlay() -> Any:
    step3p7 = pytest.importorskip("transformers.models.step3p7.modeling_step3p7")
    return step3p7._bidirectional_window_overlay


def _model_fn(module: str, name: str) -> Any:
    return getattr(pytest.importorskip(f"transformers.models.{module}.modeling_{module}"), name)


# (what, the mask function as its model composes it, the attnlab window it is)
def _cases() -> list[tuple[str, Any, str]]:
    gemma4 = _model_fn("gemma4", "sliding_window_mask_function")
    moon = _model_fn("moonshine_streaming", "sliding_window_mask_function")
    t5g2 = _model_fn("t5gemma2", "sliding_window_mask_function")
    bidir, causal_w = mu.bidirectional_mask_function, mu.sliding_window_causal_mask_function
    both = mu.and_masks
    step = _step3p7_overlay()
    return [
        ("step3p7 4", mu.or_masks(causal_w(4), step(4)), "window(left=3, right=3)"),
        ("gemma4 (12, 0)", mu.and_masks(bidir, gemma4((12, 0))), "window(left=11, right=0)"),
        ("moonshine (16, 4)", mu.and_masks(bidir, moon((16, 4))), "window(left=15, right=3)"),
        ("moonshine (1, 1)", mu.and_masks(bidir, moon((1, 1))), "window(left=0, right=0)"),
        ("moonshine [3, 2]", mu.and_masks(bidir, moon([3, 2])), "window(left=2, right=1)"),
        ("t5gemma2 5 enc", both(bidir, t5g2(5, is_causal=False)), "window(left=2, right=2)"),
        ("t5gemma2 4 enc", both(bidir, t5g2(4, is_causal=False)), "window(left=1, right=2)"),
        ("t5gemma2 4 causal", mu.and_masks(bidir, t5g2(4)), "window(left=3, right=0)"),
    ]  # fmt: skip


# (q_offset, kv_offset, Lq): no cache, prefill after cache, decode, a window cache's keys
OFFSETS = [(0, 0, L), (8, 0, L - 8), (L - 1, 0, 1), (10, 3, 5)]


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("offsets", OFFSETS)
@pytest.mark.parametrize("case", range(8))
def test_model_windows_equal_transformers_and_are_windows(
    case: int, offsets: tuple[int, int, int], padding: str
) -> None:
    what, fn, spec = _cases()[case]
    q_offset, kv_offset, lq = offsets
    lk = q_offset + lq - kv_offset
    am = _attention_mask(padding)
    call = MaskCall(B, lq, lk, q_offset, kv_offset, fn, am)
    mask = _check(call, f"{what} {offsets} {padding}")
    if padding == "none" and lq > 1:
        assert mask is not None and mask.spec() == spec, what


def _same_name(sliding_window: tuple[int, int]) -> Any:
    """A function named as Gemma 4's whose code differs (``<=``): not read as a window."""

    def inner_mask(batch_idx: Any, head_idx: Any, q_idx: Any, kv_idx: Any) -> Any:
        left_window_size, right_window_size = sliding_window

        dist = q_idx - kv_idx
        left_mask = (dist >= 0) & (dist <= left_window_size)
        right_mask = (dist < 0) & (-dist <= right_window_size)
        return left_mask | right_mask

    return inner_mask


_same_name.__qualname__ = "sliding_window_mask_function"


@pytest.mark.parametrize(
    "build",
    [
        lambda: _model_fn("moonshine_streaming", "sliding_window_mask_function")((0, 3)),
        lambda: _model_fn("moonshine_streaming", "sliding_window_mask_function")((2.0, 3)),
        lambda: _model_fn("moonshine_streaming", "sliding_window_mask_function")((True, 3)),
        lambda: _model_fn("t5gemma2", "sliding_window_mask_function")(4, is_causal=1),
        lambda: gemma3._bidirectional_window_overlay(0),
        lambda: _step3p7_overlay()(torch.tensor(3)),
        lambda: _same_name((2, 1)),
        lambda: lambda *args: torch.tensor(False, dtype=torch.bool),
    ],
)
def test_windows_it_cannot_read_leave_transformers_function_evaluated(build: Any) -> None:
    fn = build()
    fn.__qualname__ = fn.__qualname__.replace("_same_name.<locals>", "sliding_window_mask_function")
    call = MaskCall(B, 6, 6, 0, 0, mu.and_masks(mu.bidirectional_mask_function, fn), None)
    mask = _check(call, fn.__qualname__, structured=False)
    assert isinstance(mask, masks.Custom), fn.__qualname__


def _follows_eager(
    build: Any,
    inputs: dict[str, torch.Tensor],
    monkeypatch: pytest.MonkeyPatch,
    what: str,
    eager: str = "eager",
    extra: Any = lambda model: {},
) -> list[str]:
    """``build()``'s first output through attnlab (float32) under the 2x rule against
    float64 ``eager`` at the rows where its is finite (float32 the plain error), and the
    specs of the masks attnlab was handed; ``extra(model)``: more arguments (a cache)."""
    register()
    out, specs = {}, []
    for impl, dtype in ((eager, torch.float64), (eager, torch.float32), ("attnlab", None)):
        torch.manual_seed(0)
        model = build().eval().to(dtype or torch.float32)
        model.set_attn_implementation(impl)
        if model.config.model_type == "unlimited_ocr_text":  # (a mixture of experts)
            model.set_experts_implementation("eager")  # a grouped matmul takes no float64
        calls = attnlab_calls(monkeypatch) if impl == "attnlab" else []
        kw = {k: v.to(dtype or torch.float32) if v.is_floating_point() else v
              for k, v in inputs.items()} | extra(model)  # fmt: skip
        with torch.no_grad():
            out[impl, dtype] = model(**kw)[0]
        specs = [m.spec() if isinstance(m, masks.Mask) else f"tensor {m.dtype}" for m in calls]
    ref, plain = out[eager, torch.float64], out[eager, torch.float32]
    keep = torch.isfinite(ref).all(-1)
    assert keep[0].all(), what
    assert_2x_rule(out["attnlab", None][keep], plain[keep], ref[keep], what)
    assert specs and not any("custom" in s for s in specs), specs
    return specs


def _ids() -> dict[str, torch.Tensor]:
    """Token ids, the second row right-padded by 2 (a padded row keeps real keys in a
    window of 3 each side: a row without, NaN in float64 eager)."""
    ids = torch.randint(3, V, (B, L), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": _attention_mask("right")}


def test_embedding_gemma_follows_eager_by_the_2x_rule_through_attnlab_windows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A tiny EmbeddingGemma: each layer handed a window or padding, no custom mask."""
    build = lambda: gemma3.Gemma3TextModel(_embedding_gemma())  # noqa: E731
    specs = _follows_eager(build, _ids(), monkeypatch, "EmbeddingGemma")
    assert len(specs) == 2 and "window(left=3, right=3)" in specs[0], specs


def test_embedding_gemma_with_a_static_cache_follows_eager_through_attnlab_windows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A window of 16 each side over 12 tokens into a static cache of 24 slots: the
    sliding layer reads 16, the last 4 empty and hidden by the 2-D mask; it is handed the
    window over the 12 filled keys (before, ``custom(hf_mask)``)."""
    build = lambda: gemma3.Gemma3TextModel(_embedding_gemma(31))  # noqa: E731
    cache = lambda m: {"cache": cache_utils.StaticCache(config=m.config, max_cache_len=2 * L)}  # noqa: E731
    specs = _follows_eager(build, _ids(), monkeypatch, "EmbeddingGemma static", extra=cache)
    assert specs[0].startswith("filled_keys(12 of 16, (window(left=15, right=15)"), specs


def test_moonshine_streaming_encoder_follows_eager_through_attnlab_windows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A tiny Moonshine streaming encoder, its audio padded: each layer's ``(left,
    right)`` window a window."""
    moon = _model_fn("moonshine_streaming", "MoonshineStreamingEncoder")
    cfg = transformers.MoonshineStreamingEncoderConfig(
        hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, sliding_windows=[[4, 2], [3, 0]],
    )  # fmt: skip
    audio = torch.randn(B, 3200, generator=torch.Generator().manual_seed(1))
    am = torch.ones(B, 3200, dtype=torch.long)
    am[1, -400:] = 0
    inputs = {"input_values": audio, "attention_mask": am}
    specs = _follows_eager(lambda: moon(cfg), inputs, monkeypatch, "Moonshine streaming")
    assert len(specs) == 2, specs
    assert "window(left=3, right=1)" in specs[0] and "window(left=2, right=0)" in specs[1], specs


def _unlimited_ocr() -> tuple[Any, Any]:
    """Unlimited OCR's text model class and a tiny config of it (sliding window 4)."""
    ocr = _model_fn("unlimited_ocr", "UnlimitedOcrTextModel")
    cfg = transformers.AutoConfig.for_model("unlimited_ocr").text_config
    sizes = {"hidden_size": 32, "intermediate_size": 32, "num_attention_heads": 2, "head_dim": 16}
    sizes |= {"num_key_value_heads": 1, "num_hidden_layers": 2, "sliding_window": 4}
    for key, value in {**sizes, "vocab_size": V, "layer_types": cfg.layer_types[:2]}.items():
        setattr(cfg, key, value)
    return ocr, cfg


def test_unlimited_ocr_follows_eager_through_attnlab_causal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A tiny Unlimited OCR text model's prefill: each layer handed causal and padding."""
    ocr, cfg = _unlimited_ocr()
    specs = _follows_eager(lambda: ocr(cfg), _ids(), monkeypatch, "Unlimited OCR")
    assert len(specs) == 2 and all(s.startswith("(causal() &") for s in specs), specs


@pytest.mark.parametrize("padding", PADDINGS)
def test_unlimited_ocr_prefill_is_causal_and_its_decode_equals_transformers(padding: str) -> None:
    """Unlimited OCR's reference-sliding layers: while prefilling (``prefill_overlay``'s
    length still ``inf``) every earlier key, ``causal()`` with the padding; its decode
    steps (prefill keys beside the window's, not aligned) stay transformers' function."""
    ocr, cfg = _unlimited_ocr()
    cfg._attn_implementation = register()
    torch.manual_seed(0)
    model = ocr(cfg).eval()
    ids = torch.randint(3, V, (B, L), generator=torch.Generator().manual_seed(1))
    am = _attention_mask(padding)
    seen, restore = _record(cfg)
    try:
        with torch.no_grad():
            cache = model(input_ids=ids, attention_mask=am, use_cache=True).past_key_values
            am = None if am is None else torch.cat([am, torch.ones(B, 1, dtype=am.dtype)], 1)
            model(input_ids=ids[:, :1], attention_mask=am, cache=cache,
                  position_ids=torch.full((B, 1), L))  # fmt: skip
    finally:
        restore()
    prefill = [c for c in seen if c.q_length == L]
    assert prefill and len(prefill) < len(seen)
    for call in seen:
        what = f"{padding} Lq={call.q_length} Lk={call.kv_length}"
        mask = _check(call, what, structured=call.q_length == L)
        if call.q_length == L:
            assert mask is not None and mask.conjuncts[0].is_causal, f"{what}: {mask.spec()}"


def _nemotron() -> tuple[Any, Any]:
    """Nemotron ASR streaming's encoder class and a tiny config: chunks of 3 frames (2
    looked ahead), each seeing 8 // 3 = 2 chunks back."""
    enc = _model_fn("nemotron_asr_streaming", "NemotronAsrStreamingEncoder")
    cfg = transformers.NemotronAsrStreamingEncoderConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        subsampling_conv_channels=8, num_mel_bins=16, sliding_window=9,
        default_num_lookahead_tokens=2, dropout=0.0, layerdrop=0.0, activation_dropout=0.0,
        attention_dropout=0.0,
    )  # fmt: skip
    return enc, cfg


@pytest.mark.parametrize("padding", ["none", "right"])
def test_nemotron_chunked_limited_masks_equal_transformers_and_are_chunk_windows(
    padding: str,
) -> None:
    """Nemotron's ``chunked_limited`` masks, a whole utterance and two streamed chunks
    with its cache: ``chunk_window`` from the first key's absolute position."""
    enc, cfg = _nemotron()
    cfg._attn_implementation = register()
    torch.manual_seed(0)
    model = enc(cfg).eval()
    feat = torch.randn(B, 96, 16, generator=torch.Generator().manual_seed(1))
    am = torch.ones(B, 96, dtype=torch.long)
    if padding == "right":
        am[1, -20:] = 0
    seen, restore = _record(cfg)
    try:
        with torch.no_grad():
            model(input_features=feat, attention_mask=am, num_lookahead_tokens=2)
            out = model(input_features=feat[:, :48], num_lookahead_tokens=2, use_cache=True)
            model(input_features=feat[:, 48:], num_lookahead_tokens=2, use_cache=True,
                  cache=out.cache, padding_cache=out.padding_cache)  # fmt: skip
    finally:
        restore()
    assert any(c.q_offset > 0 for c in seen), [c.q_offset for c in seen]  # streamed
    for call in seen:
        what = f"{padding} Lq={call.q_length} Lk={call.kv_length} q_offset={call.q_offset}"
        mask = _check(call, what)
        assert mask is not None and "chunk_window(size=3, back=2" in mask.spec(), what


def test_nemotron_encoder_follows_eager_through_attnlab_chunk_windows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A tiny Nemotron ASR streaming encoder, its features padded, runs through attnlab
    (it reads its mask as a tensor: before, "And has no 'dtype'") under the 2x rule, each
    layer handed its score bias masked by the dense chunk window. Against sdpa: eager's
    additive mask is inverted by the model's ``attention_mask.logical_not()`` (1.7-4.0 off
    sdpa)."""
    enc, cfg = _nemotron()
    feat = torch.randn(B, 96, 16, generator=torch.Generator().manual_seed(1))
    am = torch.ones(B, 96, dtype=torch.long)
    am[1, -20:] = 0
    inputs = {"input_features": feat, "attention_mask": am}
    specs = _follows_eager(lambda: enc(cfg), inputs, monkeypatch, "Nemotron", eager="sdpa")
    assert specs == ["tensor torch.float32"] * 2, specs  # its score bias, masked by the mask


def test_a_lambda_without_a_docstring_slot_keeps_its_first_constant(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """From Python 3.14 a code object without a docstring has no None in front of its
    constants (the CO_HAS_DOCSTRING flag says when co_consts[0] is one): skipping the first
    constant whatever the flags made a lambda returning False read as Gemma 3's always-true
    one (every pair attends). Made here by dropping the leading None from 3.11's code."""
    from attnlab.integrations import hf_overlays

    flag = 0x4000000  # a bit no code object here sets, standing for CO_HAS_DOCSTRING
    monkeypatch.setattr(hf_overlays, "_HAS_DOC", flag, raising=False)
    never = lambda *args: torch.tensor(False, dtype=torch.bool)  # noqa: E731
    ours, theirs = (f.__code__ for f in (hf_overlays._always, never))
    if ours.co_consts[0] is None:  # (3.10-3.13: the docstring slot; 3.14: no slot)
        ours, theirs = (c.replace(co_consts=c.co_consts[1:]) for c in (ours, theirs))
    assert ours.co_flags & flag == 0
    assert hf_overlays._code_key(ours) != hf_overlays._code_key(theirs)
    assert hf_overlays._code_key(ours) == hf_overlays._code_key(ours.replace())
