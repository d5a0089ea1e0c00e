"""Values read back to the host where a GPU would stall for each (``int(t)``, ``bool(t)``,
``.item()``, ``.tolist()``: a host-device sync on CUDA), counted on the CPU, where the same
code runs: ``LanguageModel.generate`` reads once per step, and the flex engine's
``finite_lse`` reads nothing where the bias's bound rules out an overflowed row."""

from __future__ import annotations

import collections
import math
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import attnlab
from attnlab import bias as B
from attnlab import masks as M
from attnlab.engines import AttentionRequest
from attnlab.engines import flex as flex_mod
from attnlab.engines.flex import flex_available
from attnlab.engines.flex_mods import finite_lse
from attnlab.models.lm import LanguageModel, LMConfig, sample_logits

ROOT = attnlab.__file__.rsplit("/", 1)[0] + "/"
aten = torch.ops.aten
READS = {aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default}


class Reads(TorchDispatchMode):
    """Counts reads of a tensor's values by the innermost attnlab file that made them."""

    def __init__(self) -> None:
        super().__init__()
        self.by_file: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in READS:
            self.note()
        return func(*args, **(kwargs or {}))

    def note(self) -> None:
        ours = [f.filename for f in traceback.extract_stack() if f.filename.startswith(ROOT)]
        if ours:
            self.by_file[ours[-1].removeprefix(ROOT)] += 1

    def under(self, folder: str) -> int:
        return sum(n for name, n in self.by_file.items() if name.startswith(folder))


@contextmanager
def reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[Reads]:
    """A :class:`Reads` over the block, ``Tensor.tolist`` (one copy to the host, no
    dispatched op) counted too."""
    rec, tolist = Reads(), torch.Tensor.tolist

    def counted(t: torch.Tensor) -> Any:
        rec.note()
        return tolist(t)

    monkeypatch.setattr(torch.Tensor, "tolist", counted)
    with rec:
        yield rec
    monkeypatch.setattr(torch.Tensor, "tolist", tolist)


def _lm() -> LanguageModel:
    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=50, d_model=32, num_heads=4, num_kv_heads=2, num_layers=2)
    return LanguageModel(cfg).eval()


def _stepwise(lm: LanguageModel, ids: torch.Tensor, n: int, seed: int | None, **kw: Any) -> Any:
    """The reference: the public forward with a cache and ``sample_logits``, step by step."""
    eos, temperature = kw.pop("eos_id", None), kw.pop("temperature", 1.0)
    g = None if seed is None else torch.Generator().manual_seed(seed)
    cache, out, step = lm.new_cache(), [ids], ids
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    with torch.no_grad():
        for _ in range(n):
            nxt = sample_logits(lm(step, cache=cache)[:, -1], temperature, generator=g, **kw)
            if eos is not None:
                nxt = torch.where(done, eos, nxt)
                done |= nxt == eos
            out.append(step := nxt[:, None])
            if eos is not None and bool(done.all()):
                break
    return torch.cat(out, 1)


CASES = {
    "greedy": {"temperature": 0.0},
    "greedy, eos": {"temperature": 0.0, "eos_id": 3},
    "sampled": {"top_k": 5, "top_p": 0.9},
    "sampled, eos": {"top_k": 5, "top_p": 0.9, "eos_id": 7},
}


@pytest.mark.parametrize("name", list(CASES))
def test_generate_reads_once_per_step_and_draws_as_sample_logits(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(Two reads of the vocabulary check per forward, the model's own tokens included,
    one of the rows' check and one of ``done.all()``: 3.3-5.3 per step, each a sync on a
    GPU.) One read checks the prompt; each step reads its flags once."""
    lm, kw = _lm(), CASES[name]
    ids = torch.randint(0, 50, (3, 6), generator=torch.Generator().manual_seed(1))
    seed = None if kw.get("temperature") == 0.0 else 5
    want = _stepwise(lm, ids, 10, seed, **kw)
    g = None if seed is None else torch.Generator().manual_seed(seed)
    with reads(monkeypatch) as rec:
        got = lm.generate(ids, 10, generator=g, **kw)
    assert torch.equal(got, want)
    steps = got.shape[1] - ids.shape[1]
    assert rec.under("models/") == 1 + steps, rec.by_file


def test_generate_stopped_by_eos_reads_once_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    lm, ids = _lm(), torch.tensor([[4, 9, 2]])
    eos = int(lm.generate(ids, 2, temperature=0.0)[0, 4])  # the second new token
    with reads(monkeypatch) as rec:
        got = lm.generate(ids, 10, temperature=0.0, eos_id=eos)
    assert torch.equal(got, _stepwise(lm, ids, 10, None, temperature=0.0, eos_id=eos))
    assert got.shape[1] < 13 and rec.under("models/") == 1 + got.shape[1] - 3


@pytest.mark.parametrize("temperature", [1.0, 0.0])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_generate_names_a_row_no_token_can_be_drawn_from(temperature: float, value: float) -> None:
    """Generate draws before it reads the step's flags: a bad row still raises
    sample_logits' error, naming it, at the step it appears."""
    lm, calls = _lm(), []
    row = (
        torch.full((50,), value)
        if value == -math.inf
        else torch.ones(50).index_fill(0, torch.tensor(7), value)
    )

    def spoil(module: Any, args: Any, logits: torch.Tensor) -> torch.Tensor:
        calls.append(1)  # the prefill, two steps, then row 1 of the third step's logits
        return (
            logits if len(calls) < 3 else logits.index_copy(0, torch.tensor([1]), row[None, None])
        )

    lm.register_forward_hook(spoil)
    what = {"nan": "NaN", "inf": r"\+inf", "-inf": "only -inf"}[str(value)]
    pattern = rf"^logits must hold a finite maximum in every row .*; logits\[1\] holds {what}$"
    with pytest.raises(ValueError, match=pattern):  # the control: sample_logits' own
        sample_logits(torch.stack([torch.zeros(50), row]), temperature)
    with pytest.raises(ValueError, match=pattern):
        lm.generate(torch.tensor([[1, 2], [3, 4]]), 5, temperature=temperature)
    assert len(calls) == 3
    with pytest.raises(ValueError, match="vocab_size=50"):  # forward checks ids again
        lm(torch.tensor([[50]]))


def test_forward_and_generate_still_check_ids_they_are_given() -> None:
    lm = _lm()
    lm.generate(torch.tensor([[1, 2]]), 2)
    for bad in (torch.tensor([[50]]), torch.tensor([[-1, 3]])):
        with pytest.raises(ValueError, match=r"^ids must lie in \[0, vocab_size=50\)"):
            lm(bad)
        with pytest.raises(ValueError, match=r"^prompt_ids must lie in \[0, vocab_size=50\)"):
            lm.generate(bad, 2)


def test_generate_checks_its_own_ids_again_when_a_hook_changed_them_in_place() -> None:
    """forward skips the check of the ids generate hands it only while they are unchanged:
    a pre-hook writing 99 into them got an IndexError from the embedding (a device assert
    on a GPU), not the check's ValueError."""
    lm = _lm()
    hook = lm.register_forward_pre_hook(lambda m, a: a[0].fill_(99) if a[0].shape[1] == 1 else None)
    try:
        with pytest.raises(ValueError, match=r"^ids must lie in \[0, vocab_size=50\)"):
            lm.generate(torch.tensor([[1, 2]]), 3)
    finally:
        hook.remove()
    assert lm._own_ids is None


@pytest.mark.parametrize("temperature", [1e-39, 1e-40, 1e-45])
def test_a_subnormal_temperature_is_argmax_with_denormals_flushed(temperature: float) -> None:
    """A temperature below the smallest normal float is the limit T -> 0 (argmax): with
    ``torch.set_flush_denormal(True)`` (Trainer sets it) it rounded to 0 and 0/0 made the
    draw fail ("probability tensor contains either inf, nan or element < 0")."""
    logits = torch.tensor([[0.5, 2.0, -1.0], [3.0, 1.0, 0.0]])
    before = torch.set_flush_denormal(True)
    try:
        got = sample_logits(logits, temperature=temperature)
    finally:
        torch.set_flush_denormal(False)
    assert before in (True, False) and got.tolist() == [1, 0]


def _request(bias: Any, lse_rows: int = 8) -> tuple[AttentionRequest, torch.Tensor]:
    q = torch.randn(1, 2, lse_rows, 8)
    req = AttentionRequest(
        q, q, q, None, bias, 1.0, "dot", "softmax", 0.0, return_weights=False, return_lse=True
    )
    return req, torch.zeros(1, 2, lse_rows)


def _reads_in(fn: Callable[[], Any], monkeypatch: pytest.MonkeyPatch) -> tuple[Any, int]:
    """``fn()`` and the reads made in flex_mods (a bias's bound reads its own CPU tensors:
    on a GPU call the caller's module stays on the CPU, and the call reads no device)."""
    with reads(monkeypatch) as rec:
        out = fn()
    assert set(rec.by_file) <= {"engines/flex_mods.py", "bias/base.py", "bias/dense.py"}
    return out, rec.by_file["engines/flex_mods.py"]


def test_finite_lse_reads_nothing_where_the_bias_bound_rules_out_overflow(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """(``bool(dead.any())`` on every call with a bias and the logsumexp: a sync per flex
    call on a GPU.) ALiBi's bound, slope times distance, keeps the logsumexp far from
    ``-finfo.max * ln 2``; a dense bias of ``finfo.min`` has none and is read."""
    req, lse = _request(B.alibi(2))
    out, n = _reads_in(lambda: finite_lse(lse, req), monkeypatch)
    assert out is lse and n == 0
    req, lse = _request(B.alibi(2) + B.tensor(torch.zeros(2, 8, 8)))  # a sum's bound: its terms'
    assert _reads_in(lambda: finite_lse(lse, req), monkeypatch)[1] == 0
    low = torch.full((2, 8, 8), torch.finfo(torch.float32).min)
    req, lse = _request(B.tensor(low))
    assert _reads_in(lambda: finite_lse(lse, req), monkeypatch)[1] == 1  # no bound: read
    dead = lse.index_fill(2, torch.tensor([3]), -math.inf)  # row 3 came back -inf
    torch.testing.assert_close(finite_lse(dead, req)[:, :, 3], low[:, 3].amax(-1)[None])
    req, lse = _request(B.alibi(2) + B.tensor(low))  # a bound past the overflow: read, repaired
    assert _reads_in(lambda: finite_lse(dead, req), monkeypatch)[1] >= 1


@pytest.mark.skipif(not flex_available(), reason="this torch has no FlexAttention")
def test_flex_with_alibi_and_the_logsumexp_reads_nothing_in_finite_lse(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g) for _ in range(3))
    kw: dict[str, Any] = {"mask": M.causal(), "bias": B.alibi(2), "return_lse": True}
    ref = attnlab.attention(q, k, v, engine="reference", **kw)
    counts: list[int] = []

    def counted(lse: torch.Tensor, req: AttentionRequest) -> torch.Tensor:
        out, n = _reads_in(lambda: finite_lse(lse, req), monkeypatch)
        counts.append(n)
        return out  # type: ignore[no-any-return]

    monkeypatch.setattr(flex_mod, "finite_lse", counted)
    ours = attnlab.attention(q, k, v, engine="flex", engine_options={"compile": False}, **kw)
    assert counts == [0]
    torch.testing.assert_close(ours.lse, ref.lse)
    torch.testing.assert_close(ours.out, ref.out)
