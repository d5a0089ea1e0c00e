"""``attnlab explain --hf-model DIR`` with weights that do not fit the folder's config.json:
a missing tensor was initialized at random and explained (exit 0), as was an int8 or bool
one (cast to float), a mis-shaped one was exit 1 after transformers' multi-line report, and
num_hidden_layers=10**7 built the model for minutes (auditor helper-270)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from safetensors.torch import load_file, save_file  # noqa: E402

from attnlab.cli import main  # noqa: E402
from attnlab.integrations.hf_text import load_hf  # noqa: E402
from tests.test_hf_explain import _decoder_folder  # noqa: E402


def _edited(folder: Path, edit: dict[str, torch.Tensor | None]) -> Path:
    """``folder``'s model.safetensors with ``edit``'s tensors put in (None: taken out)."""
    weights = load_file(folder / "model.safetensors")
    for key, value in edit.items():
        if value is None:
            del weights[key]
        else:
            weights[key] = value
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        ({"transformer.h.1.mlp.c_fc.weight": None}, r"missing 1: \S*h\.1\.mlp\.c_fc\.weight$"),
        ({"transformer.h.0.ln_1.bias": torch.zeros(31)}, r"mis-shaped 1: \S*h\.0\.ln_1\.bias$"),
        *[
            (
                {"transformer.h.0.mlp.c_fc.weight": torch.ones(32, 128, dtype=dtype)},
                rf"not floating-point 1: transformer\.h\.0\.mlp\.c_fc\.weight \({name}\)$",
            )
            for dtype, name in ((torch.int8, "I8"), (torch.bool, "BOOL"))
        ],
    ],
)
def test_weights_that_do_not_fit_the_config_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], edit: dict, match: str
) -> None:
    good = _decoder_folder(tmp_path / "good")
    bad = _edited(_decoder_folder(tmp_path / "bad"), edit)
    capsys.readouterr()
    out = ["--out", str(tmp_path / "r.html"), "--steps", "2"]
    assert main(["explain", "the cat sat", "--hf-model", str(bad), *out]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    err = [ln for ln in lines if not ln.startswith("Loading weights")]  # its progress bar
    assert len(err) == 1 and "argument --hf-model:" in err[0], err
    assert "do not fit its config.json" in err[0] and re_search(match, err[0]), err
    assert not (tmp_path / "r.html").exists()
    assert main(["explain", "the cat sat", "--hf-model", str(good), *out]) == 0  # control


def re_search(pattern: str, text: str) -> bool:
    """Whether ``pattern`` occurs in ``text``."""
    import re

    return re.search(pattern, text) is not None


def test_a_huge_layer_count_is_refused_before_the_model_is_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _decoder_folder(tmp_path / "gpt2")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "n_layer": 10**7}))

    def built(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was built")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", built)
    with pytest.raises(ValueError, match=r"num_hidden_layers=10000000, more than the \d+ tensors"):
        load_hf(folder)
