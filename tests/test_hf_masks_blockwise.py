"""transformers' ``blockwise_overlay`` (Gemma 3, PaliGemma and other vision-language
models: an image's tokens see each other, OR-ed with causal, within the sliding window of
Gemma 3's local layers) as attnlab's ``groups``: the masks that transformers' own builders
ask for equal its dense masks on a grid of paddings, images, caches and windows, and carry
no custom mask (before, each was evaluated tile by tile as ``custom(hf_mask)``, and with a
static cache still was), so the blocked engine gets exact key intervals.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")
mu = pytest.importorskip("transformers.masking_utils")
cache_utils = pytest.importorskip("transformers.cache_utils")
gemma3 = pytest.importorskip("transformers.models.gemma3.modeling_gemma3")
paligemma = pytest.importorskip("transformers.models.paligemma.modeling_paligemma")

from attnlab import masks  # noqa: E402
from attnlab.integrations.hf_masks import MaskCall, translate  # noqa: E402
from attnlab.integrations.transformers import register  # noqa: E402

B, L, WINDOW = 2, 12, 3
# row 0: an image at the start and one at 7..9; row 1: one across the window (2..5), one at 9
TYPES = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 0, 0, 0, 1, 1, 0]])
# PaliGemma's token types: 0 on the prefix (image and prompt, one group), 1 on the suffix
PREFIX = (torch.arange(L) >= torch.tensor([[7], [4]])).long()
CACHES = ("none", "prefill-after-cache", "decode", "static", "static-decode")
PADDINGS = ("none", "right", "left")


def _attention_mask(padding: str) -> torch.Tensor | None:
    if padding == "none":
        return None
    am = torch.ones(B, L, dtype=torch.long)
    if padding == "right":
        am[1, -2:] = 0
    else:
        am[0, :2] = 0  # (its token types there are 1: an image's padded tokens)
    return am


def _config(family: str) -> Any:
    text: dict[str, Any] = {"hidden_size": 16, "num_attention_heads": 2, "head_dim": 8}
    text |= {"num_key_value_heads": 1, "num_hidden_layers": 2, "sliding_window": WINDOW}
    text["layer_types"] = ["sliding_attention", "full_attention"]
    if family == "paligemma2":  # PaliGemma 2: a Gemma 2 text model, sliding windows too
        cfg = transformers.Gemma2Config(**text)
    else:
        cfg = transformers.Gemma3TextConfig(**text)
    cfg._attn_implementation = register()
    return cfg


def _cache(cfg: Any, kind: str, cached: int) -> Any:
    """No cache, or a cache holding ``cached`` tokens of every layer."""
    if kind == "none":
        return None
    if kind.startswith("static"):
        cache = cache_utils.StaticCache(config=cfg, max_cache_len=2 * L)
    else:
        cache = cache_utils.DynamicCache(config=cfg)
    for layer in range(cfg.num_hidden_layers):
        if cached:
            kv = torch.zeros(B, 1, cached, 8)
            cache.update(kv, kv, layer)
    return cache


def _calls(family: str, cache_kind: str, padding: str, ids_of: str) -> list[MaskCall]:
    """The mask requests the family's own mask builder makes for one step."""
    cfg = _config(family)
    cached = {"none": 0, "prefill-after-cache": 8, "static": 0}.get(cache_kind, L - 1)  # decodes
    q_length = L - cached
    cache = _cache(cfg, cache_kind, cached)
    types = TYPES if family == "gemma3" else PREFIX
    types = types if ids_of == "all" else types[:, cached:]  # the model's: the new tokens'
    seen: list[MaskCall] = []

    def record(batch_size: int, q_length: int, kv_length: int, **kw: Any) -> None:
        am = kw.get("attention_mask")
        seen.append(
            MaskCall(batch_size, q_length, kv_length, int(kw.get("q_offset", 0)),
                     int(kw.get("kv_offset", 0)), kw["mask_function"], am)
        )  # fmt: skip

    interface = mu.ALL_MASK_ATTENTION_FUNCTIONS
    own = interface._global_mapping[cfg._attn_implementation]
    interface._global_mapping[cfg._attn_implementation] = record
    try:
        kw = {"config": cfg, "inputs_embeds": torch.zeros(B, q_length, 16)}
        kw |= {"attention_mask": _attention_mask(padding), "cache": cache}
        kw["position_ids"] = torch.arange(cached, L).expand(B, -1)
        if family == "gemma3":  # Gemma3Model.forward's masks
            ids = gemma3.get_block_sequence_ids_for_mask(types)
            gemma3.create_masks_for_vision_model(**kw, block_sequence_ids=ids)
        else:  # PaliGemma's masks for generate: its prefix (token type 0) one group
            build = paligemma.PaliGemmaForConditionalGeneration.create_masks_for_generate
            build(**kw, token_type_ids=types)
    finally:
        interface._global_mapping[cfg._attn_implementation] = own
    return seen


def _pieces(fn: Any) -> set[str]:
    """The names of the functions a transformers mask function is composed of."""
    names = {fn.__qualname__.split(".")[0]}
    for cell in fn.__closure__ or ():
        inner = cell.cell_contents
        for f in inner if isinstance(inner, tuple) else (inner,):
            names |= _pieces(f) if callable(f) and hasattr(f, "__closure__") else set()
    return names


def _hf_dense(call: MaskCall) -> torch.Tensor:
    """transformers' own dense bool mask ``(B, 1, Lq, Lk)`` for the request."""
    m = mu.sdpa_mask(
        batch_size=call.batch_size, q_length=call.q_length, kv_length=call.kv_length,
        q_offset=call.q_offset, kv_offset=call.kv_offset, mask_function=call.mask_function,
        attention_mask=call.attention_mask, allow_is_causal_skip=False,
        allow_is_bidirectional_skip=False,
    )  # fmt: skip
    return torch.broadcast_to(m, (call.batch_size, 1, call.q_length, call.kv_length))


@pytest.mark.parametrize("ids_of", ["all", "new"])
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("cache_kind", CACHES)
@pytest.mark.parametrize("family", ["gemma3", "paligemma2"])
def test_blockwise_masks_equal_transformers_and_are_structured(
    family: str, cache_kind: str, padding: str, ids_of: str
) -> None:
    calls = _calls(family, cache_kind, padding, ids_of)
    assert len(calls) == 2  # the full and the sliding layers' masks
    for call in calls:
        assert "blockwise_overlay" in _pieces(call.mask_function), "no overlay asked for"
        what = f"{family} {cache_kind} {padding} {ids_of} Lq={call.q_length} Lk={call.kv_length}"
        mask = translate(call)
        want = _hf_dense(call)
        got = torch.ones_like(want) if mask is None else mask.dense(*want.shape[2:], batch=B)
        assert torch.equal(torch.broadcast_to(got, want.shape), want), what
        # a static cache's images end by the last query: its empty slots are never seen
        assert mask is not None and "custom" not in mask.spec(), f"{what}: {mask.spec()}"
        bounds = mask.row_bounds(call.q_length, call.kv_length, B)
        assert bounds is not None and bounds.exact, f"{what}: no exact interval per row"


def test_the_images_of_a_long_prompt_keep_one_interval_per_row() -> None:
    """At 1024 tokens the mask's tiles come from exact intervals: those past each row's
    image are skipped as causal skips those past the row."""
    types = torch.zeros(1, 1024, dtype=torch.long)
    for s in (5, 300, 700):
        types[0, s : s + 64] = 1
    ids = gemma3.get_block_sequence_ids_for_mask(types)
    fn = mu.or_masks(mu.causal_mask_function, mu.blockwise_overlay(ids))
    call = MaskCall(1, 1024, 1024, 0, 0, fn, None)
    mask = translate(call)
    assert mask is not None and mask.spec() == "(causal() | groups(3 groups, length 1024))"
    assert torch.equal(mask.dense(1024, 1024), _hf_dense(call))
    bounds = mask.row_bounds(1024, 1024)
    assert bounds is not None and bounds.exact
    empty = mask.block_layout(1024, 1024, 64, 64).count(masks.TileState.EMPTY)
    causal = masks.causal().block_layout(1024, 1024, 64, 64).count(masks.TileState.EMPTY)
    assert empty == causal - 3  # each image crosses a tile edge: tiles (0, 1), (4, 5), (10, 11)


@pytest.mark.parametrize(
    "ids",
    [
        torch.tensor([[0.0, 1.0]]),  # not integers
        torch.tensor([0, 1]),  # not (B, L)
        torch.tensor([[0, 1, 1]] * 3),  # another batch size
        torch.tensor([[0, 1]]),  # fewer ids than keys
    ],
)
def test_block_ids_it_cannot_read_leave_transformers_function_evaluated(ids: torch.Tensor) -> None:
    fn = mu.or_masks(mu.causal_mask_function, mu.blockwise_overlay(ids))
    mask = translate(MaskCall(2, 3, 3, 0, 0, fn, None))
    assert isinstance(mask, masks.Custom)


def _static_call(ids: torch.Tensor, q_length: int) -> MaskCall:
    """A static cache's prefill of ``q_length`` tokens into ``2 L`` slots, ``ids (B, L)``
    padded with -1 as transformers pads them."""
    padded = mu.maybe_pad_block_sequence_ids(ids, None, 2 * L, 0)
    fn = mu.or_masks(mu.causal_mask_function, mu.blockwise_overlay(padded))
    return MaskCall(B, q_length, 2 * L, 0, 0, fn, None)


def test_a_static_cache_keeps_only_images_that_end_by_the_last_query_structured() -> None:
    """An image group whose keys go on past the last query (a prefill cut in an image)
    lets transformers' mask see the cache's empty slots: that call stays transformers'
    function; a group of the same id in another row, past the last query, does not."""
    run = torch.full((B, L), -1)
    run[0, :3] = 0  # row 0: an image at 0..2; row 1: id 0 too, at 9..10 (past query 7)
    run[1, 9:11] = 0
    cut = run.clone()
    cut[0, 6:9] = 1  # row 0: an image at 6..8, cut by the last query (7)
    for ids, structured in ((run, True), (cut, False)):
        call = _static_call(ids, 8)
        mask = translate(call)
        want = _hf_dense(call)
        assert mask is not None
        assert torch.equal(torch.broadcast_to(mask.dense(8, 2 * L, batch=B), want.shape), want)
        assert ("custom" not in mask.spec()) == structured, mask.spec()
        if structured:
            assert mask.spec().startswith("filled_keys(8 of 24, (causal() | groups("), mask.spec()
