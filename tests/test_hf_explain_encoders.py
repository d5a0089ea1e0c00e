"""``attnlab explain --hf-model DIR`` on encoder-only T5 folders and text-and-vision
composites (auditor b4, session 70): a ``T5EncoderModel`` folder was loaded by AutoModel as
the whole encoder-decoder and refused, "the weights ... do not fit its config.json: missing
28: decoder.block.0..." (UMT5's, whose config keeps ``is_encoder_decoder``, as "an
encoder-decoder"), and a ``CLIPModel`` folder ended in transformers' raw
``NotImplementedError: get_input_embeddings not auto-handled for CLIPModel``, exit 1."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from attnlab.cli import main  # noqa: E402
from attnlab.integrations.hf_text import hf_text_model, load_hf  # noqa: E402
from attnlab.interpret import captured_attentions  # noqa: E402
from attnlab.interpret.text import explain_text  # noqa: E402
from tests.conftest import max_err  # noqa: E402
from tests.test_hf_explain import WORDS, _save_word_tokenizer  # noqa: E402

TEXT = "the big dog sat on a red mat"


def _t5_encoder_folder(path: Path, arch: str) -> Path:
    """A tiny random ``arch`` (T5EncoderModel, MT5EncoderModel, UMT5EncoderModel) with a
    word-level tokenizer, saved to ``path``."""
    _save_word_tokenizer(path)
    cls = getattr(transformers, arch)
    cfg = cls.config_class(vocab_size=len(WORDS), d_model=32, d_kv=8, d_ff=32, num_layers=2)
    cfg.num_heads, cfg.pad_token_id = 4, 0
    torch.manual_seed(0)
    cls(cfg).save_pretrained(path)
    return path


@pytest.mark.parametrize("arch", ["T5EncoderModel", "MT5EncoderModel", "UMT5EncoderModel"])
def test_an_encoder_only_t5_folder_is_explained_as_eager_runs_it(
    tmp_path: Path, arch: str, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _t5_encoder_folder(tmp_path / "enc", arch)
    model, tok = load_hf(folder)
    assert type(model).__name__ == arch
    tm = hf_text_model(model, tok)
    ids = torch.tensor([list(tm.tokenize(TEXT))])  # (1, 8)
    eager = getattr(transformers, arch).from_pretrained(folder, attn_implementation="eager")
    with torch.no_grad():  # transformers' own eager model, independent of attnlab
        ref = eager.eval()(input_ids=ids, output_attentions=True)
        assert max_err(tm.pooled(ids), ref.last_hidden_state.mean(1)) < 1e-5
    got = captured_attentions(tm, ids)
    assert len(got) == len(ref.attentions) == 2
    for g, r in zip(got, ref.attentions, strict=True):
        assert max_err(g, r[0]) < 1e-5
    # integrated gradients interpolate the embedding the forward calls (the encoder's
    # embed_tokens; get_input_embeddings() names `shared`, which it never calls)
    ex = explain_text(tm, TEXT, tmp_path / "c.html", steps=32, log=lambda s: None)
    ig = sum(ex.saliency["integrated gradients"])
    assert ig != 0 and abs(ig - (ex.score - ex.baseline_score)) < 0.02 * max(1.0, abs(ig))

    capsys.readouterr()
    out = ["--out", str(tmp_path / "r.html"), "--steps", "4"]
    assert main(["explain", TEXT, "--hf-model", str(folder), *out]) == 0
    assert "most important tokens" in capsys.readouterr().out
    assert (tmp_path / "r.html").is_file() and (tmp_path / "r_heads.png").is_file()
    assert main(["explain", TEXT, "--hf-model", str(folder), *out, "--continuation", "a"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--continuation: needs a decoder --hf-model" in err and "is an encoder" in err, err


def test_a_text_and_vision_composite_is_refused_by_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "clip"
    _save_word_tokenizer(folder)
    text = {"vocab_size": len(WORDS), "hidden_size": 32, "intermediate_size": 32}
    text |= {"num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 32}
    vision = {"hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 1}
    vision |= {"num_attention_heads": 4, "image_size": 28, "patch_size": 14}
    cfg = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    torch.manual_seed(0)
    clip = transformers.CLIPModel(cfg)
    clip.save_pretrained(folder)

    def built(*args: object, **kwargs: object) -> None:
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", built)
    capsys.readouterr()
    out = ["--out", str(tmp_path / "r.html"), "--steps", "2"]
    assert main(["explain", TEXT, "--hf-model", str(folder), *out]) == 2
    err = capsys.readouterr().err.strip()
    want = r"argument --hf-model: .* is a composite of a text model and vision model \(CLIPModel\)"
    assert len(err.splitlines()) == 1 and re.search(want, err), err
    assert err.endswith("save its text model alone (CLIPTextModel)"), err
    assert not (tmp_path / "r.html").exists()
    with pytest.raises(ValueError, match="composite of a text model and vision model"):
        load_hf(folder)
    # a composite the config check does not know is a ValueError naming it, not exit 1
    with pytest.raises(ValueError, match="CLIPModel has no word embeddings explain can read"):
        hf_text_model(clip, transformers.AutoTokenizer.from_pretrained(folder))
