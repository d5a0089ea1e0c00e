"""Moving, saving and loading ``KVCache`` / ``DecoderCache`` (``to``, ``state_dict``,
``load_state_dict``): a generation saved through safetensors mid-way goes on with the same
outputs, bit for bit, as the one never interrupted; a cast cache decodes as the wider run;
mismatched states are ValueErrors that leave the cache as it was."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from attnlab import masks
from attnlab.models.lm import LanguageModel, LMConfig
from attnlab.nn import Decoder, DecoderCache, DecoderLayer, KVCache, LayerConfig
from attnlab.nn import MultiHeadAttention as MHA
from attnlab.positional import RotaryEmbedding


def _saved(state: dict[str, Tensor], tmp_path: Path, name: str = "c") -> dict[str, Tensor]:
    path = tmp_path / f"{name}.safetensors"
    save_file(state, str(path))
    return load_file(str(path))


def _lm() -> LanguageModel:
    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=23, d_model=32, num_heads=4, num_kv_heads=2, num_layers=2)
    return LanguageModel(cfg).eval()


def _greedy(lm: LanguageModel, ids: Tensor, cache: DecoderCache, steps: int) -> list[Tensor]:
    """``steps`` greedy steps from ``ids (B, T)``; the logits of each."""
    out = []
    with torch.no_grad():
        for _ in range(steps):
            logits = lm(ids, cache=cache)[:, -1:]  # (B, 1, V)
            ids = logits.argmax(-1)  # (B, 1)
            out.append(logits)
    return out


def test_a_generation_saved_midway_goes_on_bit_for_bit(tmp_path: Path) -> None:
    lm = _lm()
    prompt = torch.randint(0, 23, (3, 7), generator=torch.Generator().manual_seed(1))
    whole = _greedy(lm, prompt, lm.new_cache(), 9)
    cache = lm.new_cache()
    first = _greedy(lm, prompt, cache, 4)
    resumed = lm.new_cache().load_state_dict(_saved(cache.state_dict(), tmp_path))
    assert resumed.length == cache.length == 10
    rest = _greedy(lm, first[-1].argmax(-1), resumed, 5)
    for a, b in zip(whole, first + rest, strict=True):
        assert torch.equal(a, b)


def test_a_decoder_with_cross_attention_goes_on_after_a_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    dec = Decoder(DecoderLayer(LayerConfig(32, 4, 64, num_kv_heads=2, dropout=0.0)), 2).eval()
    memory, tgt = torch.randn(2, 6, 32), torch.randn(2, 5, 32)
    pad = masks.padding(torch.tensor([6, 4]))

    def run(cache: DecoderCache, lo: int, hi: int) -> list[Tensor]:
        mem = [memory if cache.cross_attn[0].length == 0 else memory[:, :0]]  # type: ignore[index]
        return [dec(tgt[:, i : i + 1], mem[0], memory_mask=pad, cache=cache) for i in range(lo, hi)]

    with torch.no_grad():
        whole = run(dec.new_cache(), 0, 5)
        cache = dec.new_cache()
        first = run(cache, 0, 2)
        state = _saved(cache.state_dict(), tmp_path)
        assert {"num_layers", "has_cross_attn", "cross_attn.1.keys", "self_attn.0.values"} <= set(
            state
        )
        resumed = dec.new_cache().load_state_dict(state)
        rest = run(resumed, 2, 5)
    assert resumed.cross_attn is not None and resumed.cross_attn[1].length == 6
    for a, b in zip(whole, first + rest, strict=True):
        assert torch.equal(a, b)


def _mha() -> MHA:
    torch.manual_seed(0)
    return MHA(64, 4, num_kv_heads=2, rope=RotaryEmbedding(16)).eval()


def test_a_cache_cast_to_float64_decodes_as_a_float64_run() -> None:
    """The fp32 prefix's keys and values, cast, decoded on by the fp64 model: equal to an
    fp64 cache appended those same keys (and close to the fp64 pass of the whole input)."""
    mha, x = _mha(), torch.randn(2, 9, 64)
    cache = KVCache()
    with torch.no_grad():
        mha(x[:, :5], mask=masks.causal(), cache=cache)
        wide = KVCache()
        wide.append(cache.keys.double(), cache.values.double())  # type: ignore[union-attr]
        assert cache.to(dtype=torch.float64) is cache and cache.keys.dtype == torch.float64  # type: ignore[union-attr]
        mha = mha.double()
        steps = [
            mha(x[:, i : i + 1].double(), mask=masks.causal(), cache=cache) for i in range(5, 9)
        ]
        want = [mha(x[:, i : i + 1].double(), mask=masks.causal(), cache=wide) for i in range(5, 9)]
        full = mha(x.double(), mask=masks.causal())[:, 5:]
    assert all(torch.equal(a, b) for a, b in zip(steps, want, strict=True))
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-5


def test_to_moves_in_place_and_keeps_what_is_already_there() -> None:
    cache, k = KVCache(), torch.randn(2, 2, 3, 8)
    cache.append(k, k + 1)
    storage = cache._k
    assert cache.to("cpu", torch.float32)._k is storage  # nothing to move: no copy
    assert cache.to(device="meta") is cache
    assert cache.keys is not None and cache.keys.device.type == "meta"
    assert cache.keys.shape == (2, 2, 3, 8) and cache.length == 3
    cache.to(torch.device("meta"), torch.float16)
    assert cache.values is not None and cache.values.dtype == torch.float16
    dec = DecoderCache(2, cross=True)
    dec.self_attn[1].append(k, k)
    assert dec.to("meta") is dec and dec.self_attn[1].keys.device.type == "meta"  # type: ignore[union-attr]
    assert dec.self_attn[0].keys is None  # empty layers stay empty


def test_to_refuses_what_is_not_a_device_or_a_float_dtype() -> None:
    cache = KVCache()
    cache.append(torch.ones(1, 1, 2, 4), torch.ones(1, 1, 2, 4))
    with pytest.raises(TypeError, match="dtype must be a floating-point"):
        cache.to(dtype=torch.int64)
    with pytest.raises(ValueError, match="device must name a torch device, got 'gpu'"):
        cache.to("gpu")
    with pytest.raises(TypeError, match=r"device must be a torch.device, str or int, got float"):
        DecoderCache(1).to(1.5)  # type: ignore[arg-type]
    assert cache.keys is not None and cache.keys.dtype == torch.float32


def test_the_state_holds_the_cropped_length_and_shares_no_memory(tmp_path: Path) -> None:
    cache, k = KVCache(), torch.randn(2, 2, 6, 8)
    cache.append(k, 2 * k)
    cache.crop(4)
    back = KVCache().load_state_dict(_saved(cache.state_dict(), tmp_path))
    assert back.length == 4 and torch.equal(back.keys, k[:, :, :4])  # type: ignore[arg-type]
    cross = KVCache()
    cross.set(k, k)  # one tensor for keys and values
    again = KVCache().load_state_dict(_saved(cross.state_dict(), tmp_path, "x"))
    assert torch.equal(again.values, k) and again._cross  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="self-attention call"):
        again.append(k, k)  # still cross-attention keys
    empty = KVCache().load_state_dict(_saved(KVCache().state_dict(), tmp_path, "e"))
    assert empty.length == 0 and empty.keys is None


def test_mismatched_decoder_states_are_named_and_change_nothing() -> None:
    src = DecoderCache(2, cross=True)
    for c in [*src.self_attn, *src.cross_attn]:  # type: ignore[misc]
        c.append(torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 4))
    state = src.state_dict()
    dst = DecoderCache(3, cross=True)
    with pytest.raises(ValueError, match=r"holds 2 layers with .* this cache has 3 layers with"):
        dst.load_state_dict(state)
    with pytest.raises(ValueError, match=r"2 layers with cross-attention .* 2 layers without"):
        DecoderCache(2).load_state_dict(state)
    bad = {
        **state,
        "self_attn.1.keys": torch.ones(1, 2, 2, 4),
        "self_attn.1.values": torch.ones(1, 2, 2, 4),
    }
    with pytest.raises(ValueError, match=r"one length .* got lengths \[2, 3\]"):
        dst = DecoderCache(2, cross=True)
        dst.load_state_dict(bad)
    assert dst.length == 0 and dst.self_attn[0].keys is None  # the first layer not loaded
    with pytest.raises(ValueError, match=r"unexpected \['self_attn.2.cross'\]"):
        DecoderCache(2, cross=True).load_state_dict(
            {**state, "self_attn.2.cross": state["num_layers"]}
        )
    with pytest.raises(ValueError, match=r"missing \['num_layers'\]"):
        DecoderCache(2, cross=True).load_state_dict(
            {n: t for n, t in state.items() if n != "num_layers"}
        )
    with pytest.raises(TypeError, match=r"state must be a dict from DecoderCache.state_dict"):
        DecoderCache(2).load_state_dict([1, 2])  # type: ignore[arg-type]


def test_mismatched_layer_states_are_named_and_change_nothing() -> None:
    cache, k = KVCache(), torch.ones(1, 2, 3, 4)
    cache.append(k, k)
    with pytest.raises(ValueError, match=r"missing \['values'\].*got \['cross', 'keys'\]"):
        cache.load_state_dict({"keys": k, "cross": torch.tensor([0])})
    with pytest.raises(ValueError, match=r"equal B, Hkv, L; got \(1, 2, 3, 4\) and \(1, 2, 5, 4\)"):
        cache.load_state_dict(
            {"keys": k, "values": torch.ones(1, 2, 5, 4), "cross": torch.tensor([0])}
        )
    with pytest.raises(ValueError, match=r"state\['cross'\] must hold one integer in \[0, 1\]"):
        cache.load_state_dict({"cross": torch.tensor([0.5])})
    with pytest.raises(ValueError, match="floating-point"):
        cache.load_state_dict({"keys": k.long(), "values": k.long(), "cross": torch.tensor([0])})
    with pytest.raises(ValueError, match=r"one dtype on one device; got torch\.float64 on cpu"):
        cache.load_state_dict({"keys": k.double(), "values": k, "cross": torch.tensor([0])})
    assert cache.length == 3 and cache.keys is not None and torch.equal(cache.keys, k)
    cache.load_state_dict({"keys": k.double(), "values": k.double(), "cross": torch.tensor([0])})
    assert cache.keys is not None and cache.keys.dtype == torch.float64  # the control


_K = torch.ones(1, 1, 2, 4)


@pytest.mark.parametrize(
    ("k", "v", "exc", "match"),
    [
        (_K.long(), _K.bool(), TypeError, "k must be a floating-point tensor, got torch.int64"),
        (_K, _K.int(), TypeError, "v must be a floating-point tensor, got torch.int32"),
        (_K.double(), _K, ValueError, "k torch.float64 on cpu and v torch.float32 on cpu"),
        (_K.to("meta"), _K, ValueError, "k torch.float32 on meta and v torch.float32 on cpu"),
    ],
)
@pytest.mark.parametrize("call", ["append", "set"])
def test_append_and_set_refuse_what_to_and_loading_refuse(
    k: Tensor, v: Tensor, exc: type[Exception], match: str, call: str
) -> None:
    """Integer or bool keys/values, or keys and values of two dtypes or devices, were
    cached (``to()`` and ``load_state_dict`` refused them); the next float step was then
    told the whole cache held the keys' dtype."""
    cache = KVCache()
    with pytest.raises(exc, match=match):
        getattr(cache, call)(k, v)
    assert cache.length == 0 and cache.keys is None
    kk, vv = getattr(cache, call)(_K.double(), _K.double())  # the control
    assert cache.length == 2 and kk.dtype == vv.dtype == torch.float64
