"""Vision-language and encoder-decoder transformers families through the attnlab backend:
each a tiny random model built from its own config classes (no download), fed an image
(or audio, or an encoder input) and a right-padded batch of text; logits under the 2x
rule against an fp64 eager run, and attnlab called as often as transformers' sdpa is
(every layer that calls the attention interface: vision towers, resamplers, text
layers, cross-attention), at least once per attention layer of the config. The vision
sizes follow transformers' own tests (image 16, patch 4, 2 layers of width 32).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from attnlab.integrations.transformers import register  # noqa: E402
from tests.conftest import assert_2x_rule, attnlab_calls  # noqa: E402

TEXT = {
    "vocab_size": 99, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
    "max_position_embeddings": 128, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
}  # fmt: skip
VISION = {
    "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
    "num_attention_heads": 4, "image_size": 16, "patch_size": 4,
}  # fmt: skip
SEQ2SEQ = {
    "vocab_size": 64, "d_model": 32, "encoder_layers": 2, "decoder_layers": 2,
    "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 37,
    "decoder_ffn_dim": 37, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
}  # fmt: skip
IMG, START, END = 98, 96, 95  # image token, image start and end tokens
Case = tuple[str, Any, dict[str, Any], int]  # model class, config, inputs, attention layers


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _text(images: int, pre: tuple[int, ...] = (), post: tuple[int, ...] = ()) -> dict[str, Any]:
    """Two rows: 2 text tokens, the image's tokens, 4 more; row 1 right-padded by 2 (left
    padding leaves rows without keys, NaN in fp64 eager)."""
    txt = torch.randint(3, 60, (2, 6), generator=_gen(1))
    marks = [torch.tensor(p, dtype=torch.long).reshape(1, -1).expand(2, -1) for p in (pre, post)]
    ids = torch.cat([txt[:, :2], marks[0], torch.full((2, images), IMG), marks[1], txt[:, 2:]], 1)
    am = torch.ones_like(ids)
    am[1, -2:], ids[1, -2:] = 0, 0
    return {"input_ids": ids, "attention_mask": am}


def _pixels(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(2))


def _llava() -> Case:
    vision = transformers.CLIPVisionConfig(**VISION, projection_dim=32)
    cfg = transformers.LlavaConfig(text_config=TEXT, vision_config=vision, image_token_index=IMG)
    cfg.vision_feature_layer = -1
    return (
        "LlavaForConditionalGeneration",
        cfg,
        {**_text(16), "pixel_values": _pixels(2, 3, 16, 16)},
        4,
    )


def _paligemma() -> Case:  # the image and prefix see each other (token_type_ids 0)
    text = transformers.GemmaConfig(**{**TEXT, "num_key_value_heads": 4})
    vision = transformers.SiglipVisionConfig(**VISION, vision_use_head=False)
    cfg = transformers.PaliGemmaConfig(
        text_config=text, vision_config=vision, image_token_index=IMG, projection_dim=32
    )
    kw = _text(16)
    kw["token_type_ids"] = torch.zeros_like(kw["input_ids"])
    kw["token_type_ids"][:, -4:] = 1  # the suffix: causal
    return (
        "PaliGemmaForConditionalGeneration",
        cfg,
        {**kw, "pixel_values": _pixels(2, 3, 16, 16)},
        4,
    )


def _qwen_vl(family: str) -> Case:
    """Qwen2-VL, Qwen2.5-VL (windowed vision attention), Qwen3-VL, GLM-4V: one 8x8-patch
    image a row (16 tokens after the 2x2 merge), multimodal RoPE."""
    rope = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [1, 1, 2]}
    vision: dict[str, Any] = {
        "depth": 2, "hidden_size": 32, "num_heads": 4, "patch_size": 4, "spatial_merge_size": 2,
        "temporal_patch_size": 2, "intermediate_size": 37, "out_hidden_size": 32,
    }  # fmt: skip
    ids = {"image_token_id": IMG, "video_token_id": 97}
    if family == "qwen2_vl":
        vision |= {"embed_dim": 32, "mlp_ratio": 2}
    elif family == "qwen2_5_vl":
        vision |= {"window_size": 8, "fullatt_block_indexes": [1]}
    elif family == "qwen3_vl":
        vision |= {"num_position_embeddings": 16, "deepstack_visual_indexes": [1]}
        rope["mrope_interleaved"] = True
    else:  # glm4v
        vision["image_size"] = 32
        ids |= {"image_start_token_id": START, "image_end_token_id": END}
    if family != "glm4v":
        ids |= {"vision_start_token_id": START, "vision_end_token_id": END}
    cfg = transformers.AutoConfig.for_model(
        family, text_config={**TEXT, "rope_parameters": rope}, vision_config=vision, **ids
    )
    kw = _text(16, (START,), (END,))
    kw |= {
        "pixel_values": _pixels(128, 3 * 2 * 4 * 4),
        "image_grid_thw": torch.tensor([[1, 8, 8]] * 2),
    }
    kw["mm_token_type_ids"] = (kw["input_ids"] == IMG).int()
    name = {"qwen2_vl": "Qwen2VL", "qwen2_5_vl": "Qwen2_5_VL", "qwen3_vl": "Qwen3VL"}.get(
        family, "Glm4v"
    )
    return f"{name}ForConditionalGeneration", cfg, kw, 4


def _idefics(family: str) -> Case:
    """Idefics2 (a perceiver resampler), Idefics3, SmolVLM: one image a row, its right
    quarter padding in the pixel mask (the vision tower's own mask)."""
    cls = {"idefics2": "Idefics2", "idefics3": "Idefics3", "smolvlm": "SmolVLM"}[family]
    extra: dict[str, Any] = {"scale_factor": 2}
    text = {**TEXT, "model_type": "mistral" if family == "idefics2" else "llama"}
    if family == "idefics2":
        extra = {"perceiver_config": {
            "hidden_size": 32, "resampler_n_latents": 4, "resampler_depth": 2,
            "resampler_n_heads": 4, "resampler_head_dim": 8, "num_key_value_heads": 2,
        }}  # fmt: skip
    cfg = transformers.AutoConfig.for_model(
        family, text_config=text, vision_config=VISION, image_token_id=IMG, **extra
    )
    pam = torch.ones(2, 1, 16, 16, dtype=torch.bool)
    pam[1, 0, :, 12:] = False
    kw = {**_text(4), "pixel_values": _pixels(2, 1, 3, 16, 16), "pixel_attention_mask": pam}
    return f"{cls}ForConditionalGeneration", cfg, kw, 4 + 2 * (family == "idefics2")


def _internvl() -> Case:
    cfg = transformers.InternVLConfig(
        text_config={**TEXT, "model_type": "qwen2"}, vision_config=VISION, image_token_id=IMG
    )
    return (
        "InternVLForConditionalGeneration",
        cfg,
        {**_text(4), "pixel_values": _pixels(2, 3, 16, 16)},
        4,
    )


def _gemma3() -> Case:  # an image's tokens see each other, across a sliding window of 3
    text = {**TEXT, "sliding_window": 3, "query_pre_attn_scalar": 8}
    text["layer_types"] = ["sliding_attention", "full_attention"]
    cfg = transformers.Gemma3Config(
        text_config=text, vision_config={**VISION, "vision_use_head": False},
        mm_tokens_per_image=4, image_token_index=IMG, boi_token_index=START, eoi_token_index=END,
    )  # fmt: skip
    kw = _text(4, (START,), (END,))
    kw["token_type_ids"] = (kw["input_ids"] == IMG).long()
    return "Gemma3ForConditionalGeneration", cfg, {**kw, "pixel_values": _pixels(2, 3, 16, 16)}, 4


def _mistral3() -> Case:  # Pixtral: images of two sizes, a block-diagonal vision mask
    vision = {**VISION, "model_type": "pixtral", "head_dim": 8}
    cfg = transformers.Mistral3Config(
        text_config={**TEXT, "model_type": "mistral"}, vision_config=vision, image_token_index=IMG
    )
    kw = _text(4)
    kw["input_ids"][1, 4:6] = 50  # row 1's image (8 x 16 pixels) has 2 tokens
    kw |= {"pixel_values": _pixels(2, 3, 16, 16), "image_sizes": torch.tensor([[16, 16], [8, 16]])}
    return "Mistral3ForConditionalGeneration", cfg, kw, 4


def _mllama() -> Case:  # tiles, a global vision encoder and gated cross-attention layers
    vision = {
        "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_global_layers": 1,
        "attention_heads": 4, "image_size": 16, "patch_size": 4, "max_num_tiles": 2,
        "intermediate_layers_indices": [0], "vision_output_dim": 64,
        "supported_aspect_ratios": [[1, 1], [1, 2]],
    }  # fmt: skip
    text = {k: v for k, v in TEXT.items() if k != "head_dim"}
    text |= {"cross_attention_layers": [1], "vocab_size": 100}
    cfg = transformers.MllamaConfig(text_config=text, vision_config=vision, image_token_index=99)
    kw = _text(1)
    kw["input_ids"][:, 2] = 99
    cross = torch.zeros(2, kw["input_ids"].shape[1], 1, 2, dtype=torch.long)
    cross[0, 2:, 0, :], cross[1, 2:, 0, 0] = 1, 1  # row 0: two tiles, row 1: one
    kw |= {
        "pixel_values": _pixels(2, 1, 2, 3, 16, 16),
        "aspect_ratio_ids": torch.tensor([[2], [1]]),
    }
    kw |= {"aspect_ratio_mask": torch.tensor([[[1, 1]], [[1, 0]]]), "cross_attention_mask": cross}
    return "MllamaForConditionalGeneration", cfg, kw, 5


def _florence2() -> Case:  # DaViT windowed and channel attention, a BART text model
    vision = {
        "depths": [1, 1], "patch_size": [7, 3], "patch_stride": [4, 2], "patch_padding": [3, 1],
        "patch_prenorm": [False, True], "embed_dim": [16, 32], "num_heads": [2, 4],
        "num_groups": [2, 4], "window_size": 2, "projection_dim": 32,
        "max_position_embeddings": 16, "drop_path_rate": 0.0,
    }  # fmt: skip
    text = {**SEQ2SEQ, "vocab_size": 99, "max_position_embeddings": 64, "decoder_start_token_id": 2}
    cfg = transformers.Florence2Config(text_config=text, vision_config=vision, image_token_id=IMG)
    kw = _text(17)  # a 32 x 32 image: 4 x 4 tokens after two stages, and their mean
    kw |= {"pixel_values": _pixels(2, 3, 32, 32), "decoder_input_ids": kw["input_ids"][:, :5]}
    return "Florence2ForConditionalGeneration", cfg, kw, 10


def _seq2seq(family: str) -> Case:
    """T5 (its relative position bias), Whisper (audio in, no encoder mask), Pegasus-X
    (its encoder's own global-local attention stays outside attnlab, with a warning)."""
    ids = torch.randint(3, 60, (2, 12), generator=_gen(1))
    am = torch.ones_like(ids)
    am[1, -4:] = 0
    kw: dict[str, Any] = {"input_ids": ids, "attention_mask": am, "decoder_input_ids": ids[:, :7]}
    if family == "t5":
        cfg = transformers.T5Config(
            vocab_size=64, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, pad_token_id=0, decoder_start_token_id=0,
        )  # fmt: skip
        return "T5ForConditionalGeneration", cfg, kw, 6
    if family == "whisper":
        cfg = transformers.WhisperConfig(
            **SEQ2SEQ, num_mel_bins=8, max_source_positions=15, max_target_positions=32,
            decoder_start_token_id=1, suppress_tokens=None, begin_suppress_tokens=None,
        )  # fmt: skip
        dam = torch.ones(2, 7, dtype=torch.long)
        dam[1, -2:] = 0
        kw = {"input_features": _pixels(2, 8, 30), "decoder_input_ids": ids[:, :7]}
        return "WhisperForConditionalGeneration", cfg, kw | {"decoder_attention_mask": dam}, 6
    cfg = transformers.PegasusXConfig(
        **SEQ2SEQ, max_position_embeddings=64, num_global_tokens=4, block_size=4,
        decoder_start_token_id=0,
    )  # fmt: skip
    return "PegasusXForConditionalGeneration", cfg, kw, 4  # decoder: self and cross


def _vision_encoder_decoder() -> Case:  # ViT encoder, GPT-2 decoder with cross-attention
    enc = transformers.ViTConfig(**VISION)
    dec = transformers.GPT2Config(
        vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, add_cross_attention=True
    )
    cfg = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id, cfg.pad_token_id = 1, 0
    dam = torch.ones(2, 7, dtype=torch.long)
    dam[1, -2:] = 0
    ids = torch.randint(3, 60, (2, 7), generator=_gen(1))
    kw = {
        "pixel_values": _pixels(2, 3, 16, 16),
        "decoder_input_ids": ids,
        "decoder_attention_mask": dam,
    }
    return "VisionEncoderDecoderModel", cfg, kw, 6


def _blip_2() -> Case:  # a Q-Former (2 self-, 1 cross-attention) before OPT
    qformer = {
        "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 37, "encoder_hidden_size": 32,
    }  # fmt: skip
    text = {
        "model_type": "opt", "vocab_size": 99, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "ffn_dim": 37, "word_embed_proj_dim": 32,
        "max_position_embeddings": 64, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
    }  # fmt: skip
    cfg = transformers.Blip2Config(
        vision_config=VISION, qformer_config=qformer, text_config=text, num_query_tokens=4,
        image_token_index=IMG,
    )  # fmt: skip
    kw = _text(4)
    kw["input_ids"] = torch.cat(
        [kw["input_ids"][:, 2:6], kw["input_ids"][:, :2], kw["input_ids"][:, 6:]], 1
    )
    kw["attention_mask"] = torch.ones_like(kw["input_ids"])
    kw["attention_mask"][1, -2:] = 0
    return "Blip2ForConditionalGeneration", cfg, {**kw, "pixel_values": _pixels(2, 3, 16, 16)}, 7


def _llama4() -> Case:  # chunked attention (chunks of 4) beside a no-RoPE full layer
    vision = {
        **VISION,
        "intermediate_size": 128,
        "vision_output_dim": 32,
        "pixel_shuffle_ratio": 0.5,
    }
    vision |= {"projector_input_dim": 32, "projector_output_dim": 32}
    text = {**TEXT, "intermediate_size_mlp": 37, "num_local_experts": 2, "num_experts_per_tok": 1}
    text |= {"attention_chunk_size": 4, "no_rope_layers": [1, 0]}
    cfg = transformers.Llama4Config(
        text_config=text, vision_config=vision, image_token_index=IMG, boi_token_index=START,
        eoi_token_index=END,
    )  # fmt: skip
    kw = _text(4)
    kw["attention_mask"][1, -2], kw["input_ids"][1, -2] = 1, 7  # (a chunk of padding alone:
    # a row without keys, which eager and attnlab fill differently)
    return "Llama4ForConditionalGeneration", cfg, {**kw, "pixel_values": _pixels(2, 3, 16, 16)}, 4


def _qwen2_audio() -> Case:  # a Whisper-like audio encoder with its feature mask
    audio = {
        "num_mel_bins": 8, "encoder_layers": 2, "encoder_attention_heads": 4,
        "encoder_ffn_dim": 37, "d_model": 32, "max_source_positions": 15,
    }  # fmt: skip
    cfg = transformers.Qwen2AudioConfig(
        audio_config=audio, text_config={**TEXT, "model_type": "qwen2"}, audio_token_index=IMG
    )
    frames = torch.ones(2, 30, dtype=torch.long)
    frames[1, 20:] = 0  # 30 frames: 7 tokens; row 1's 20: 5
    kw = _text(7)
    kw["input_ids"][1, 7:9] = 50
    kw |= {"input_features": _pixels(2, 8, 30), "feature_attention_mask": frames}
    return "Qwen2AudioForConditionalGeneration", cfg, kw, 4


def _idefics_v1() -> Case:  # gated cross-attention layers, a perceiver resampler
    vision = {"embed_dim": 32, "image_size": 16, "patch_size": 4, "num_hidden_layers": 2}
    vision |= {"num_attention_heads": 4, "intermediate_size": 37}
    resampler = {"resampler_n_latents": 4, "resampler_depth": 1, "resampler_n_heads": 2}
    text = {k: v for k, v in TEXT.items() if k not in ("num_key_value_heads", "head_dim")}
    cfg = transformers.IdeficsConfig(
        **text, additional_vocab_size=2, cross_layer_interval=1, vision_config=vision,
        perceiver_config={**resampler, "resampler_head_dim": 8}, use_resampler=True,
    )  # fmt: skip
    kw = _text(0)
    kw["image_attention_mask"] = torch.ones(2, kw["input_ids"].shape[1], 1, dtype=torch.long)
    return "IdeficsForVisionText2Text", cfg, {**kw, "pixel_values": _pixels(2, 1, 3, 16, 16)}, 6


CASES: dict[str, Callable[[], Case]] = {
    "llava": _llava,
    "paligemma": _paligemma,
    **{f: (lambda f=f: _qwen_vl(f)) for f in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "glm4v")},
    **{f: (lambda f=f: _idefics(f)) for f in ("idefics2", "idefics3", "smolvlm")},
    "internvl": _internvl,
    "gemma3": _gemma3,
    "mistral3": _mistral3,
    "mllama": _mllama,
    "florence2": _florence2,
    **{f: (lambda f=f: _seq2seq(f)) for f in ("t5", "whisper", "pegasus_x")},
    "vision_encoder_decoder": _vision_encoder_decoder,
    "blip_2": _blip_2,
    "llama4": _llama4,
    "qwen2_audio": _qwen2_audio,
    "idefics": _idefics_v1,
}


# families whose models transformers builds without sdpa (their decoder calls attnlab)
SDPA_REFUSED = ("pegasus_x",)


@pytest.fixture(scope="module", autouse=True)
def _registered() -> None:
    register()


def _case(family: str) -> Case:
    try:
        return CASES[family]()
    except (AttributeError, ImportError, KeyError, TypeError, ValueError) as e:  # another version
        pytest.skip(f"{family}: its tiny config cannot be built in this transformers: {e}")


def _model(cls: str, cfg: Any, impl: str, dtype: torch.dtype) -> Any:
    """The seeded float32 model's weights in a model built in ``dtype`` (so buffers such
    as Llama 4's complex vision RoPE are made in it: ``.to(float64)`` drops their
    imaginary part)."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "attn_implementation='attnlab'", UserWarning)
        build = getattr(transformers, cls)._from_config
        model = build(copy.deepcopy(cfg), attn_implementation=impl)
        if dtype != torch.float32:  # (a model shares its config: another's build changed it)
            weights = model.state_dict()
            model = build(copy.deepcopy(cfg), attn_implementation=impl, dtype=dtype)
            model.load_state_dict(weights)
    return model.eval()


def _logits(model: Any, kw: dict[str, Any], dtype: torch.dtype) -> torch.Tensor:
    cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in kw.items()}
    with torch.no_grad():
        return model(**cast).logits


def _sdpa_calls(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every call of transformers' sdpa attention function from now on."""
    interface = transformers.AttentionInterface._global_mapping
    own, calls = interface["sdpa"], []

    def counted(*a: Any, **k: Any) -> Any:
        calls.append(a[0])
        return own(*a, **k)

    monkeypatch.setitem(interface, "sdpa", counted)
    return calls


@pytest.mark.parametrize("family", list(CASES))
def test_family_follows_eager_by_the_2x_rule_through_attnlab(
    family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cls, cfg, kw, layers = _case(family)
    ref64 = _logits(_model(cls, cfg, "eager", torch.float64), kw, torch.float64)
    plain = _logits(_model(cls, cfg, "eager", torch.float32), kw, torch.float32)
    sdpa = _sdpa_calls(monkeypatch)
    if family in SDPA_REFUSED:  # transformers offers no sdpa: the layers are counted
        sdpa.extend(range(layers))
    else:
        _logits(_model(cls, cfg, "sdpa", torch.float32), kw, torch.float32)
    calls = attnlab_calls(monkeypatch)
    got = _logits(_model(cls, cfg, "attnlab", torch.float32), kw, torch.float32)
    assert torch.isfinite(ref64).all() and torch.isfinite(got).all()
    assert_2x_rule(got, plain, ref64, f"{family} logits")
    assert len(calls) == len(sdpa) >= layers, (
        f"{family}: attnlab ran {len(calls)} attentions, sdpa {len(sdpa)}, layers {layers}"
    )


def test_llama4_chunk_of_padding_alone_gives_0_as_sdpa_not_eagers_even_spread() -> None:
    """Right padding that fills a chunk of Llama 4's chunked layer leaves its pad queries
    no key: attnlab gives those rows 0, as transformers' sdpa does, where eager's additive
    mask spreads them evenly over all keys (its logits there 0.03-0.04 off). Real
    positions agree with eager; the pad positions with sdpa."""
    cls, cfg, kw, _ = _case("llama4")
    kw["attention_mask"][1, -2], kw["input_ids"][1, -2] = 0, 0  # chunk 8-11: pads alone
    real = kw["attention_mask"].bool()
    out = {
        (impl, dtype): _logits(_model(cls, cfg, impl, dtype), kw, dtype)
        for impl in ("eager", "sdpa")
        for dtype in (torch.float64, torch.float32)
    }
    got = _logits(_model(cls, cfg, "attnlab", torch.float32), kw, torch.float32)
    eager64, eager, sdpa64, sdpa = out.values()
    assert_2x_rule(got, sdpa, sdpa64, "llama4 logits against sdpa")
    assert_2x_rule(got[real], eager[real], eager64[real], "llama4 real logits against eager")
    assert float((eager64 - sdpa64)[~real].abs().max()) > 1e-2  # (eager's even spread)


@pytest.mark.parametrize(
    ("family", "cache"),
    [
        ("gemma3", "static"),
        ("gemma3", None),
        ("paligemma", "static"),
        ("paligemma", None),
        ("qwen2_vl", None),
        ("mllama", None),
        ("whisper", "static"),
        ("t5", "static"),
    ],
)
def test_greedy_generation_follows_eager_by_the_2x_rule(family: str, cache: str | None) -> None:
    """Four greedy tokens from the unpadded prompt (left padding leaves fp64 eager NaN
    rows): attnlab's tokens are eager's, its logits at every step under the 2x rule."""
    cls, cfg, kw, _ = _case(family)
    kw = {k: v for k, v in kw.items() if k not in ("decoder_input_ids", "decoder_attention_mask")}
    if "attention_mask" in kw and not cfg.is_encoder_decoder:
        kw["attention_mask"] = torch.ones_like(kw["attention_mask"])
    out = {}
    for impl, dtype in (
        ("eager", torch.float64),
        ("eager", torch.float32),
        ("attnlab", torch.float32),
    ):
        cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in kw.items()}
        out[impl, dtype] = _model(cls, cfg, impl, dtype).generate(
            **cast, max_new_tokens=4, do_sample=False, cache_implementation=cache,
            return_dict_in_generate=True, output_logits=True,
        )  # fmt: skip
    ref64, plain, got = out.values()
    assert torch.equal(got.sequences, plain.sequences)
    assert torch.equal(got.sequences, ref64.sequences)  # (else the steps' logits differ)
    logits = [torch.stack(o.logits) for o in (got, plain, ref64)]
    assert_2x_rule(*logits, f"{family} generated logits")


@pytest.mark.parametrize("family", ["paligemma", "gemma3"])
def test_image_tokens_seeing_each_other_reach_attnlab_as_groups(
    family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PaliGemma's prefix and Gemma 3's images see each other (transformers'
    ``blockwise_overlay`` OR-ed with causal): the text layers get ``causal() |
    groups(ids)`` with exact key intervals, no mask evaluated tile by tile (before, every
    text layer's mask was ``custom(hf_mask)``)."""
    cls, cfg, kw, _ = _case(family)
    calls = attnlab_calls(monkeypatch)
    _logits(_model(cls, cfg, "attnlab", torch.float32), kw, torch.float32)
    text = [m for m in calls if m is not None]  # (the vision towers' calls have no mask)
    specs = [m.spec() for m in text]
    assert len(text) == cfg.text_config.num_hidden_layers, specs
    assert all("(causal() | groups(" in s and "custom" not in s for s in specs), specs
    b, lq = kw["input_ids"].shape
    assert all(m.row_bounds(lq, lq, b).exact for m in text), specs


@pytest.mark.parametrize("family", ["paligemma", "gemma3"])
def test_a_static_cache_hands_the_images_on_as_groups_over_the_filled_keys(
    family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``cache_implementation="static"`` the full layers' keys run to the cache's
    last slot, past the last query; each image ends before it, so the prefill's mask is
    ``filled_keys(causal() | groups(ids))`` (before, transformers' function was evaluated
    tile by tile: ``custom(hf_mask)`` for the prefill and the first step)."""
    cls, cfg, kw, _ = _case(family)
    kw["attention_mask"] = torch.ones_like(kw["attention_mask"])
    calls = attnlab_calls(monkeypatch)
    _model(cls, cfg, "attnlab", torch.float32).generate(
        **kw, max_new_tokens=3, do_sample=False, cache_implementation="static"
    )
    specs = [m.spec() for m in calls if m is not None]
    assert specs and not any("custom" in s for s in specs), specs
    assert any(s.startswith("filled_keys(") and "groups(" in s for s in specs), specs


@pytest.mark.parametrize("family", ["paligemma", "gemma3"])
def test_a_siglip_tower_without_its_pooling_head_builds_without_a_warning(family: str) -> None:
    """PaliGemma's and Gemma 3's SigLIP towers are built without the pooling head
    (``vision_use_head=False``), so every layer calls attnlab: building one warned that
    the head ran outside attnlab. With the head the warning stays (the control)."""
    cls, cfg, _, _ = _case(family)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        getattr(transformers, cls)._from_config(copy.deepcopy(cfg), attn_implementation="attnlab")
    cfg.vision_config.vision_use_head = True
    with pytest.warns(UserWarning, match="pooling head"):
        getattr(transformers, cls)._from_config(cfg, attn_implementation="attnlab")


@pytest.mark.parametrize("flag", [False, True])
def test_idefics_warns_of_its_resampler_only_when_it_has_one(flag: bool) -> None:
    """IDEFICS's perceiver resampler (``use_resampler=True``) computes its attention in
    its own code: built under attnlab it ran silently outside attnlab (6 of the model's
    7 attentions reached attnlab). It now warns, as other partly-own models do; without
    the resampler every attention runs on attnlab, with no warning."""
    cls, cfg, _, _ = _case("idefics")
    cfg.use_resampler = flag
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        getattr(transformers, cls)._from_config(cfg, attn_implementation="attnlab")
    said = [str(w.message) for w in seen if "perceiver resampler" in str(w.message)]
    assert len(said) == flag, said
