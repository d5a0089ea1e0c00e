"""Host read-backs of the transformers backend (each one a CUDA sync on a GPU): packed
sequences are looked for once per forward, not once per layer; outputs stay those of
eager attention."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")
mu = pytest.importorskip("transformers.masking_utils")

from attnlab.integrations.transformers import register  # noqa: E402

LAYERS = 8
V = 64


def _model(impl: str, family: str = "llama") -> torch.nn.Module:
    """A tiny float32 model of ``LAYERS`` layers (gemma2: sliding and full layers mixed)."""
    register()
    torch.manual_seed(0)
    kw: dict[str, Any] = {"vocab_size": V, "hidden_size": 32, "intermediate_size": 64}
    kw |= {"num_hidden_layers": LAYERS, "num_attention_heads": 4, "num_key_value_heads": 2}
    if family == "gemma2":
        cfg = transformers.Gemma2Config(**kw, head_dim=8, sliding_window=5)
    else:
        cfg = transformers.LlamaConfig(**kw)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl).eval()


@pytest.fixture
def found(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The number of calls of transformers' ``find_packed_sequence_indices``."""
    calls, own = [0], mu.find_packed_sequence_indices

    def counting(position_ids: torch.Tensor) -> Any:
        calls[0] += sys._getframe(1).f_code.co_filename.endswith("hf_args.py")  # the layers'
        return own(position_ids)

    monkeypatch.setattr(mu, "find_packed_sequence_indices", counting)
    yield calls


def _batch(kind: str) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, V, (2, 12), generator=torch.Generator().manual_seed(1))
    if kind == "packed":  # sequences of 5 and 7 tokens in each row, no attention_mask
        return {
            "input_ids": ids,
            "position_ids": torch.cat([torch.arange(5), torch.arange(7)])[None],
        }
    am = torch.ones(2, 12, dtype=torch.long)
    if kind == "left":
        am[1, :3] = 0
    elif kind == "right":
        am[1, -4:] = 0
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": am, "position_ids": pos}


@pytest.mark.parametrize("family", ["llama", "gemma2"])
@pytest.mark.parametrize("kind", ["plain", "left", "right", "packed"])
def test_packed_sequences_are_looked_for_once_per_forward(
    found: list[int], kind: str, family: str
) -> None:
    batch = _batch(kind)
    with torch.no_grad():
        want = _model("eager", family)(**batch, use_cache=False).logits
        model = _model("attnlab", family)
        got = model(**batch, use_cache=False).logits
    assert found[0] == 1  # was one per layer (8)
    if kind == "left":  # eager's left-padded queries see no key: NaN rows
        want, got = want[:, 3:], got[:, 3:]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_changed_position_tensor_is_looked_at_again(found: list[int]) -> None:
    ids = _batch("packed")["input_ids"][:1]
    eager, model = _model("eager"), _model("attnlab")
    for mode in (torch.no_grad, torch.inference_mode):  # inference tensors have no version
        with mode():
            pos = torch.arange(12)[None].clone()
            for restart in (12, 5, 7):  # the same tensor, changed in place between forwards
                pos[0, restart:] = torch.arange(12 - restart)
                got = model(input_ids=ids, position_ids=pos, use_cache=False).logits
                want = eager(input_ids=ids, position_ids=pos, use_cache=False).logits
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_generate_takes_eager_tokens_with_left_padding() -> None:
    batch = _batch("left")
    kw = {"max_new_tokens": 6, "do_sample": False, "min_new_tokens": 6}
    ids, am = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        want = _model("eager").generate(ids, attention_mask=am, **kw)
        got = _model("attnlab").generate(ids, attention_mask=am, **kw)
    assert torch.equal(got, want)


def test_packed_sequences_are_transformers_own() -> None:
    from attnlab.integrations.hf_args import packed_sequences

    pos = torch.tensor([[0, 1, 2, 0, 1, 0]])
    assert packed_sequences(pos, 6).tolist() == [[0, 0, 0, 1, 1, 2]]
    assert packed_sequences(torch.arange(4)[None], 4) is None
