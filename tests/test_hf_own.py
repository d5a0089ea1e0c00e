"""transformers models whose attention is partly or wholly their own code under
``attn_implementation="attnlab"``: PEGASUS-X's encoder ran outside attnlab silently, a
CLAP audio tower was served by nothing, Informer's ProbSparse attention failed inside."""

from __future__ import annotations

import warnings

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
