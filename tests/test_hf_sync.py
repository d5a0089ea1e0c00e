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


@pytest.mark.parametrize("family", ["llama", "gemma2"])
@pytest.mark.parametrize("kind", ["left", "right"])
def test_padded_rows_are_left_out_of_packing_without_a_read(
    kind: str, family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = _batch(kind)  # its padded row's positions restart: a packing to check per row
    model = _model("attnlab", family)
    with torch.no_grad():
        sites = _device_reads(
            _seeds(model, *batch.values()), lambda: model(**batch, use_cache=False), monkeypatch
        )
    args = {k: n for k, n in sites.items() if k.startswith("integrations/hf_args.py")}
    # the positions (transformers' check); each mask's padded rows come on the host from
    # its padding mask's read (was 1 per mask, and 1 per layer before that)
    assert sum(args.values()) == 1, sites


def test_packed_sequences_are_transformers_own() -> None:
    from attnlab.integrations.hf_args import packed_sequences

    pos = torch.tensor([[0, 1, 2, 0, 1, 0]])
    assert packed_sequences(pos, 6).tolist() == [[0, 0, 0, 1, 1, 2]]
    assert packed_sequences(torch.arange(4)[None], 4) is None


BUILDER = ("hf_masks.py", "hf_keys.py")  # padding_mask's module, and where it was


def _in_builder(frame: Any, module: str | tuple[str, ...] = BUILDER) -> bool:
    """Whether the innermost attnlab frame from ``frame`` out is in ``module`` (a host
    tensor's read in masks.padding is no device read)."""
    while frame is not None and "attnlab" not in frame.f_code.co_filename:
        frame = frame.f_back
    return frame is not None and frame.f_code.co_filename.endswith(module)


ROWS = [
    [[1, 1, 1, 1], [1, 1, 1, 1]],  # no padding
    [[1, 1, 0, 0], [1, 1, 1, 0]],  # right
    [[0, 0, 1, 1], [1, 1, 1, 1]],  # left
    [[0, 1, 1, 0], [1, 0, 1, 1]],  # a row of two runs
]


class _Reads(TorchDispatchMode):
    """Counts the scalar read-backs of ``module``; ``.tolist()``, ``.cpu()`` and
    ``.item()`` are counted apart (on a CPU tensor they do not dispatch)."""

    def __init__(self, module: str | tuple[str, ...] = BUILDER) -> None:
        super().__init__()
        self.n, self.module = 0, module

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default:
            self.n += _in_builder(sys._getframe(1), self.module)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("rows", ROWS)
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


SYNCING = frozenset(
    {
        torch.ops.aten._local_scalar_dense.default,
        torch.ops.aten.nonzero.default,
        torch.ops.aten._unique2.default,
        torch.ops.aten.unique_dim.default,
        torch.ops.aten.unique_consecutive.default,
    }
)  # ops that wait for a device's values


class _DeviceReads(TorchDispatchMode):
    """The CPU standing in for a GPU: tensors made from ``seeds`` (a model's inputs and
    weights) and by factories given a device are the device's; a value of one read back
    (``int``, ``bool``, ``.tolist()``, ``.cpu()``, ``unique``, or ``.to`` for row bounds
    asked for on the host) from the transformers backend or a mask counts as a sync,
    by its innermost attnlab site. The sdpa engine asks for host row bounds as off the CPU.
    """

    def __init__(self, seeds: list[torch.Tensor]) -> None:
        from torch.utils.weak import WeakTensorKeyDictionary

        super().__init__()
        self.on = WeakTensorKeyDictionary()
        for t in seeds:
            self.on[t] = True
        self.sites: dict[str, int] = {}

    @property
    def n(self) -> int:
        return sum(self.sites.values())

    def read(self, frame: Any) -> None:
        while frame is not None and "/attnlab/" not in frame.f_code.co_filename:
            frame = frame.f_back
        where = "" if frame is None else frame.f_code.co_filename.split("/attnlab/")[-1]
        if where.startswith(("integrations/", "masks/")):
            site = f"{where}:{frame.f_lineno}"
            self.sites[site] = self.sites.get(site, 0) + 1

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        flat = [*args, *(kwargs or {}).values()]
        flat += [t for a in flat if isinstance(a, (list, tuple)) for t in a]
        dev = any(isinstance(t, torch.Tensor) and t in self.on for t in flat)
        if not any(isinstance(t, torch.Tensor) for t in flat) and (kwargs or {}).get("device"):
            dev = not _host_request(sys._getframe(1))  # a factory on the call's device
        if dev and func in SYNCING:
            self.read(sys._getframe(1))
        out = func(*args, **(kwargs or {}))
        for t in out if dev and isinstance(out, (list, tuple)) else [out] if dev else []:
            if isinstance(t, torch.Tensor):
                self.on[t] = True
        return out


def _host_request(frame: Any) -> bool:
    """Whether ``frame`` is in a ``row_bounds`` asked for on the host ("cpu")."""
    for _ in range(6):
        if frame is None:
            return False
        if frame.f_code.co_name == "row_bounds" and frame.f_locals.get("device") == "cpu":
            return True
        frame = frame.f_back
    return False


def _to_host(args: tuple[Any, ...], kwargs: dict[str, Any], frame: Any) -> bool:
    """Whether ``Tensor.to(*args, **kwargs)`` called from ``frame`` moves to the host: to
    the CPU, for row bounds asked for there (elsewhere the CPU is the device)."""
    where = kwargs.get("device", args[0] if args else None)
    if not isinstance(where, (str, torch.device)) or torch.device(where).type != "cpu":
        return False
    return _host_request(frame)


def _device_reads(
    seeds: list[torch.Tensor], run: Any, monkeypatch: pytest.MonkeyPatch
) -> dict[str, int]:
    """The reads :class:`_DeviceReads` counts in ``run()`` (after a warm-up call)."""
    from attnlab.engines import sdpa

    run()
    reads = _DeviceReads(seeds)
    monkeypatch.setattr(sdpa, "_host_bounds", sdpa._exact_bounds)  # as on a GPU
    for name in ("tolist", "cpu", "item", "to"):
        own = getattr(torch.Tensor, name)

        def counted(t: torch.Tensor, *a: Any, _own: Any = own, _n: str = name, **k: Any) -> Any:
            if t not in reads.on or (_n == "to" and not _to_host(a, k, sys._getframe(1))):
                return _own(t, *a, **k)
            reads.read(sys._getframe(1))
            out = _own(t, *a, **k)
            if isinstance(out, torch.Tensor):  # on the host now: a copy of its own
                out = out.clone()
                del reads.on[out]
            return out

        monkeypatch.setattr(torch.Tensor, name, counted)
    with reads:
        run()
    monkeypatch.undo()
    return reads.sites


def _seeds(model: torch.nn.Module, *inputs: torch.Tensor) -> list[torch.Tensor]:
    """What is on the device before a call: ``model``'s weights and ``inputs``."""
    return [*inputs, *model.parameters(), *model.buffers()]


@pytest.mark.parametrize("rows", ROWS)
def test_a_padding_masks_row_bounds_read_nothing_back(
    rows: list[list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    valid = torch.tensor(rows, dtype=torch.bool)  # (B, Lk) "on the device"
    got: list[object] = []

    def layers() -> None:  # each mask made once, its bounds asked by 3 layers
        got.clear()
        for mask in (hf_masks.padding_mask(valid), hf_masks.KeyValid(valid)):
            for _ in range(3):
                got.append(None if mask is None else mask.row_bounds(2, 4, 2, "cpu"))

    sites = _device_reads([valid], layers, monkeypatch)
    assert sum(sites.values()) == 2, sites  # each mask's making (was 2 more per layer)
    runs = [r.nonzero().flatten().tolist() for r in valid]
    one_run = all(r == list(range(r[0], r[-1] + 1)) for r in runs)
    for bounds in got[3:]:  # KeyValid's: each row's run, on the host
        assert (bounds is not None) == one_run
        if bounds is not None:
            assert bounds.lo.device.type == "cpu" and bounds.exact  # type: ignore[attr-defined]
            assert bounds.lo.tolist() == [[r[0]] * 2 for r in runs]  # type: ignore[attr-defined]
            assert bounds.hi.tolist() == [[r[-1]] * 2 for r in runs]  # type: ignore[attr-defined]


def _left_padded(family: str) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The model (``LAYERS`` layers), ids ``(2, 64)`` and an attention mask whose row 0
    is left-padded by 7 (transformers makes positions that restart there: a packed row)."""
    model = _model("attnlab", family)
    ids = torch.randint(1, V, (2, 64), generator=torch.Generator().manual_seed(1))
    am = torch.ones_like(ids)
    am[0, :7] = 0
    return model, ids, am


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_a_left_padded_forward_reads_back_once_per_mask(
    family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, ids, am = _left_padded(family)
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    kw = {"attention_mask": am, "position_ids": pos, "use_cache": False}
    with torch.no_grad():
        sites = _device_reads(_seeds(model, ids, am, pos), lambda: model(ids, **kw), monkeypatch)
        got = model(ids, **kw).logits
        want = _model("eager", family)(ids, **kw).logits
    # llama: its mask's padding, transformers' packed positions, the documents' runs of
    # the packing (was 39: 2 per layer for KeyValid's row bounds and for the documents',
    # 4 for the runs, 1 for the packing's padded rows); gemma2: its 2 masks' padding and
    # the packed positions (was 5: each mask's padded rows for the packing)
    assert sum(sites.values()) == 3, sites
    torch.testing.assert_close(got[0, 7:], want[0, 7:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("family", "masks", "once"), [("llama", 1, 2), ("gemma2", 2, 1)])
def test_generate_reads_back_once_per_mask_and_step(
    family: str, masks: int, once: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """8 forwards, each mask's padding read once in each; once per generate: the packed
    positions and (llama, packed on sdpa) the documents' runs. Was 60 (llama: KeyValid's
    row bounds 2 per layer in the prefill, the documents' 4 + 16) and 33 (gemma2)."""
    model, ids, am = _left_padded(family)
    kw = {"attention_mask": am, "max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False}
    with torch.no_grad():
        sites = _device_reads(
            _seeds(model, ids, am), lambda: model.generate(ids, **kw), monkeypatch
        )
        got = model.generate(ids, **kw)
        want = _model("eager", family).generate(ids, **kw)
    assert sum(sites.values()) == 8 * masks + once, sites
    assert torch.equal(got, want)


@pytest.mark.parametrize(
    "ids",
    [
        [[0, 0, 1, 1, 1, 2], [5, 5, 5, 5, 7, 7]],  # each document one run
        [[0, 0, 1, 1, 0, 2], [5, 5, 5, 5, 7, 7]],  # row 0's document 0 split
        [[3, 3, 3, 3, 3, 3]],  # one row for the batch
    ],
)
def test_documents_runs_read_back_once(
    ids: list[list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from attnlab.masks import documents

    doc_ids = torch.tensor(ids)  # (Bd, L) "on the device"
    got: list[object] = []

    def layers() -> None:  # the mask made once, its bounds asked by 3 layers
        got.clear()
        mask = documents(doc_ids)
        got.extend(mask.row_bounds(4, 6, 2, "cpu") for _ in range(3))

    sites = _device_reads([doc_ids], layers, monkeypatch)
    assert sum(sites.values()) == 1, sites  # was 2 per row, then 2 per layer (10)
    dense = documents(doc_ids).dense(4, 6, batch=len(ids))[:, 0]  # (Bd, Lq, Lk)
    keys = [[r.nonzero().flatten().tolist() for r in b] for b in dense]
    one_run = all(k == list(range(k[0], k[-1] + 1)) for b in keys for k in b)
    for bounds in got:
        assert (bounds is not None) == one_run
        if bounds is not None:
            assert bounds.lo.device.type == "cpu" and bounds.exact  # type: ignore[attr-defined]
            assert bounds.lo.tolist() == [[k[0] for k in b] for b in keys]  # type: ignore[attr-defined]
            assert bounds.hi.tolist() == [[k[-1] for k in b] for b in keys]  # type: ignore[attr-defined]
