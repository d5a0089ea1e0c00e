"""Host read-backs of the transformers backend (each one a CUDA sync on a GPU): packed
sequences are looked for once per forward, not once per layer, and a padding mask reads
its checks and lengths back in one go; outputs stay those of eager attention."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

transformers = pytest.importorskip("transformers")
mu = pytest.importorskip("transformers.masking_utils")

from attnlab.integrations import hf_masks  # noqa: E402
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


@pytest.mark.parametrize(("family", "masks"), [("llama", 1), ("gemma2", 2)])
@pytest.mark.parametrize("kind", ["left", "right"])
def test_padded_rows_are_left_out_of_packing_once_per_mask(
    kind: str, family: str, masks: int
) -> None:
    batch = _batch(kind)  # its padded row's positions restart: a packing to check per row
    model = _model("attnlab", family)
    with torch.no_grad():
        model(**batch, use_cache=False)
        reads = _Reads("hf_args.py")
        with reads:
            model(**batch, use_cache=False)
    assert reads.n == 1 + masks  # the positions, each mask's padded rows (was 1 per layer)


def test_packed_sequences_are_transformers_own() -> None:
    from attnlab.integrations.hf_args import packed_sequences

    pos = torch.tensor([[0, 1, 2, 0, 1, 0]])
    assert packed_sequences(pos, 6).tolist() == [[0, 0, 0, 1, 1, 2]]
    assert packed_sequences(torch.arange(4)[None], 4) is None


def _in_builder(frame: Any, module: str = "hf_masks.py") -> bool:
    """Whether the innermost attnlab frame from ``frame`` out is in ``module`` (a host
    tensor's read in masks.padding is no device read)."""
    while frame is not None and "attnlab" not in frame.f_code.co_filename:
        frame = frame.f_back
    return frame is not None and frame.f_code.co_filename.endswith(module)


class _Reads(TorchDispatchMode):
    """Counts the scalar read-backs of ``module``; ``.tolist()``, ``.cpu()`` and
    ``.item()`` are counted apart (on a CPU tensor they do not dispatch)."""

    def __init__(self, module: str = "hf_masks.py") -> None:
        super().__init__()
        self.n, self.module = 0, module

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default:
            self.n += _in_builder(sys._getframe(1), self.module)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "rows",
    [
        [[1, 1, 1, 1], [1, 1, 1, 1]],  # no padding
        [[1, 1, 0, 0], [1, 1, 1, 0]],  # right
        [[0, 0, 1, 1], [1, 1, 1, 1]],  # left
        [[0, 1, 1, 0], [1, 0, 1, 1]],  # a row of two runs
    ],
)
def test_a_padding_mask_reads_back_once(
    rows: list[list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    valid = torch.tensor(rows, dtype=torch.bool)  # (B, Lk)
    reads = _Reads()
    for name in ("tolist", "cpu", "item"):
        own = getattr(torch.Tensor, name)

        def counted(t: torch.Tensor, *a: Any, _own: Any = own, **k: Any) -> Any:
            reads.n += _in_builder(sys._getframe(1))
            return _own(t, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    with reads:
        mask = hf_masks.padding_mask(valid)
    monkeypatch.undo()
    assert reads.n == 1  # was 1 (no padding) and 3 (else): all(), prefix, lengths or run
    if bool(valid.all()):
        assert mask is None
        return
    assert mask is not None
    assert torch.equal(mask.dense(3, 4, batch=2)[:, 0], valid[:, None].expand(2, 3, 4))
    bounds = mask.row_bounds(3, 4, 2)
    runs = [r.nonzero().flatten().tolist() for r in valid]
    if any(r != list(range(r[0], r[-1] + 1)) for r in runs):
        assert bounds is None or not bounds.exact
    else:
        assert bounds is not None and bounds.exact
        assert bounds.lo[:, 0].tolist() == [r[0] for r in runs]
        assert bounds.hi[:, 0].tolist() == [r[-1] for r in runs]
