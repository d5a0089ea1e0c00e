"""transformers models whose attention is partly or wholly their own code under
``attn_implementation="attnlab"``: PEGASUS-X's encoder ran outside attnlab silently, a
CLAP audio tower was served by nothing, Informer's ProbSparse attention failed inside."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from attnlab.integrations.transformers import register  # noqa: E402
from attnlab.interpret import capture  # noqa: E402


def test_a_model_that_runs_some_attention_itself_says_so_once() -> None:
    name = register()
    cfg = transformers.PegasusXConfig(
        vocab_size=50, d_model=32, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
        decoder_ffn_dim=32, block_size=4, num_global_tokens=2,
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model = transformers.PegasusXModel._from_config(cfg, attn_implementation=name).eval()
    said = [str(w.message) for w in seen if "outside attnlab" in str(w.message)]
    assert len(said) == 1 and "global-local attention" in said[0], said
    ids = torch.randint(0, 50, (1, 8))
    with capture(model) as cap:  # what the warning is about: the decoder's calls only
        model(input_ids=ids, decoder_input_ids=ids)
    assert cap.records and all(r.name.startswith("decoder.") for r in cap.records)
    with warnings.catch_warnings(record=True) as seen:  # a llama: nothing to say
        warnings.simplefilter("always")
        llama = transformers.LlamaConfig(
            vocab_size=50, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1,
        )  # fmt: skip
        transformers.LlamaModel._from_config(llama, attn_implementation=name)
    assert not [w for w in seen if "outside attnlab" in str(w.message)]


LONGT5 = {
    "vocab_size": 50, "d_model": 32, "d_kv": 8, "d_ff": 32, "num_layers": 1,
    "num_decoder_layers": 1, "num_heads": 2, "local_radius": 2, "global_block_size": 2,
}  # fmt: skip


def _sub_models() -> dict[str, Any]:
    """Models that build sub-models of their own kind on their own config objects."""
    vision = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "intermediate_size": 32, "image_size": 16, "patch_size": 4}  # fmt: skip
    text = {"vocab_size": 50, "hidden_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 32}  # fmt: skip
    longt5 = transformers.LongT5Config(**LONGT5, encoder_attention_type="transient-global")
    siglip = transformers.SiglipConfig(text_config=text, vision_config=vision)
    return {
        "LongT5Model": transformers.LongT5Config(**LONGT5),
        "LongT5ForConditionalGeneration": longt5,
        "LongT5EncoderModel": transformers.LongT5Config(**LONGT5),
        "SiglipModel": siglip,
    }


@pytest.mark.parametrize("cls", list(_sub_models()))
@pytest.mark.parametrize("switched", [False, True])
def test_a_model_with_sub_models_of_copied_configs_says_so_once(cls: str, switched: bool) -> None:
    """LongT5's encoder and decoder stacks each take a copy of the model's config, and
    SigLIP's vision tower its own: the warning, given once per config object, was given
    three times for a LongT5 (twice for SigLIP). Once a model now, built under attnlab or
    switched to it; again for the same config object, not at all."""
    name, cfg = register(), _sub_models()[cls]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        build = getattr(transformers, cls)._from_config
        if switched:
            build(cfg, attn_implementation="eager").set_attn_implementation(name)
        else:
            models = build(cfg, attn_implementation=name).modules()
            models = [m for m in models if isinstance(m, transformers.PreTrainedModel)]
            assert len(models) > 1 and all(m.config._attn_implementation == name for m in models)
        build(cfg, attn_implementation=name)  # the same config: said already
    said = [str(w.message) for w in seen if "outside attnlab" in str(w.message)]
    assert len(said) == 1 and f"{cls} (" in said[0], said


def test_models_whose_attention_is_all_their_own_are_refused() -> None:
    name = register()
    audio = transformers.ClapAudioConfig(hidden_size=32, num_hidden_layers=1)
    with pytest.raises(ValueError, match=r"ClapAudioModel \(clap_audio_model\) computes attention"):
        transformers.ClapAudioModel._from_config(audio, attn_implementation=name)
    informer = transformers.InformerConfig(
        prediction_length=4, context_length=4, d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=16,
        decoder_ffn_dim=16, lags_sequence=[1],
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"ProbSparse attention .* attention_type='full'"):
        transformers.InformerModel._from_config(informer, attn_implementation=name)
    informer.attention_type = "full"  # then every layer calls the interface
    transformers.InformerModel._from_config(informer, attn_implementation=name)
    clap = transformers.ClapConfig(
        text_config={"vocab_size": 50, "hidden_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "intermediate_size": 32},
        audio_config={"hidden_size": 32, "num_hidden_layers": 1}, projection_dim=16,
    )  # fmt: skip
    split = {"audio_config": "eager", "text_config": name, "": name}  # the composite's way
    model = transformers.ClapModel._from_config(clap, attn_implementation=split)
    assert model.config.audio_config._attn_implementation == "eager"
