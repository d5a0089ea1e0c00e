"""Masks keep their tensors where they were given and meet each call's device as they
evaluate: a copy there was made on every evaluation (on CUDA a host-device copy from
pageable memory, a sync, per layer and decoding step). The ``meta`` device stands for
another device here: one copy per tensor while it is unchanged.
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from attnlab import masks
from attnlab.engines._versions import held_tensors, versions
from attnlab.engines.flex_mods import moved
from attnlab.masks import Mask

META = torch.device("meta")


def _copies_to_meta(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """The values of each CPU tensor copied to the meta device from now on."""
    seen: list[list[int]] = []
    real = torch.Tensor.to

    def to(self: Tensor, *args: object, **kwargs: object) -> Tensor:
        out = real(self, *args, **kwargs)
        if self.device.type == "cpu" and out.is_meta:
            seen.append(self.tolist())
        return out

    monkeypatch.setattr(torch.Tensor, "to", to)
    return seen


def _padding_ref(kl: list[int], ql: list[int], lq: int, lk: int) -> Tensor:
    """Padding's dense ``(B, 1, lq, lk)``, from its definition."""
    k, rows = torch.arange(lk), torch.arange(lq).view(-1, 1)
    return torch.stack([(k < a) & (rows < b) for a, b in zip(kl, ql, strict=True)])[:, None]


def test_padding_copies_its_lengths_once_per_device_while_unchanged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kl, ql = torch.tensor([5, 3]), torch.tensor([4, 2])
    m = masks.padding(kl, query_lengths=ql)
    seen = _copies_to_meta(monkeypatch)
    for _ in range(3):
        assert m.dense(4, 6, batch=2, device="meta").shape == (2, 1, 4, 6)
    assert seen == [[5, 3], [4, 2]]  # (each evaluation copied both: 6)
    kl[1] = 1  # in place: copied again, with the new values
    m.dense(4, 6, batch=2, device="meta")
    assert seen[2:] == [[5, 1]]
    assert torch.equal(m.dense(4, 6, batch=2), _padding_ref([5, 1], [4, 2], 4, 6))
    m.ql = torch.tensor([1, 1])  # another tensor: copied
    m.dense(4, 6, batch=2, device="meta")
    assert seen[3:] == [[1, 1]]
    assert torch.equal(m.dense(4, 6, batch=2), _padding_ref([5, 1], [1, 1], 4, 6))


@pytest.mark.parametrize(
    ("make", "lq", "lk"),
    [
        (lambda: masks.documents(torch.tensor([0, 0, 1, 1, 1, 2])), 6, 6),
        (lambda: masks.global_tokens(torch.tensor([0, 3])), 5, 6),
        (lambda: masks.block_random(2, 1, seed=3), 6, 6),
    ],
    ids=["documents", "global_tokens", "block_random"],
)
def test_masks_copy_their_tensors_once_per_device(
    monkeypatch: pytest.MonkeyPatch, make: Callable[[], Mask], lq: int, lk: int
) -> None:
    m = make()
    want = m.dense(lq, lk)  # on the CPU: nothing copied
    seen = _copies_to_meta(monkeypatch)
    for _ in range(3):
        assert m.dense(lq, lk, device="meta").shape == want.shape
    assert len(seen) == 1
    assert torch.equal(m.dense(lq, lk), want) and torch.equal(make().dense(lq, lk), want)


def test_documents_see_ids_changed_in_place_on_another_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ids = torch.tensor([0, 0, 1, 1])
    m = masks.documents(ids)
    seen = _copies_to_meta(monkeypatch)
    m.dense(4, 4, device="meta")
    ids[1] = 1
    m.dense(4, 4, device="meta")
    m.dense(4, 4, device="meta")
    assert seen == [[[0, 0, 1, 1]], [[0, 1, 1, 1]]]
    assert torch.equal(m.dense(4, 4)[0, 0], ids.view(-1, 1) == ids.view(1, -1))


def test_kept_copies_are_no_part_of_a_masks_identity() -> None:
    """What engines key plans on, the flex engine's moved copy, pickles and deep copies
    see the mask's own tensors only."""
    kl = torch.tensor([3, 2])
    m = masks.causal() & masks.padding(kl, query_lengths=[3, 1])
    held, key, want = held_tensors(m), versions(m), m.dense(3, 3, batch=2)
    m.dense(3, 3, batch=2, device="meta")  # fills the copies
    assert [t is u for t, u in zip(held_tensors(m), held, strict=True)] == [True, True]
    assert versions(m) == key
    assert moved(m, torch.device("cpu")) is m
    on_meta = moved(m, META)
    assert [t.is_meta for t in held_tensors(on_meta)] == [True, True]
    assert on_meta.dense(3, 3, batch=2, device="meta").is_meta
    for other in (pickle.loads(pickle.dumps(m)), copy.deepcopy(m)):
        assert torch.equal(other.dense(3, 3, batch=2), want)
        assert other.spec() == m.spec()
        assert other.dense(3, 3, batch=2, device="meta").is_meta
    kl.fill_(1)  # the original still follows its tensor
    causal = torch.ones(3, 3, dtype=torch.bool).tril()
    assert torch.equal(m.dense(3, 3, batch=2), _padding_ref([1, 1], [3, 1], 3, 3) & causal)


def test_flex_copies_to_the_device_through_to_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """The flex engine copied the tile states and the mask's tensors to the call's device
    with ``Tensor.to``: from pageable memory to CUDA, a host-device sync each (2 per block
    mask on an H200; the transformers backend makes a new mask per forward). They go
    through ``attnlab._devices.to_device`` (pinned, not blocking); a sync cannot be seen
    without CUDA, so the meta device stands for it and the copies are counted."""
    from attnlab.engines import flex, flex_mods
    from attnlab.engines.base import AttentionRequest

    seen: list[tuple[list[int], torch.device]] = []

    def spy(t: Tensor, device: torch.device | str) -> Tensor:
        seen.append((list(t.shape), torch.device(device)))
        return t.to(device)

    for module in (flex, flex_mods):
        monkeypatch.setattr(module, "to_device", spy, raising=False)
    q = torch.zeros(2, 2, 256, 16, device=META)
    m = masks.causal() & masks.padding([256, 200], query_lengths=[256, 150])
    req = AttentionRequest(q, q, q, m, None, 1.0, "dot", "softmax", 0.0, False, False)
    bm, _ = flex.block_mask(m, req)
    assert sorted(shape for shape, _ in seen) == [[2], [2], [2, 1, 2, 2]]  # kl, ql, states
    assert all(device == META for _, device in seen)
    assert bm.kv_num_blocks.is_meta


def _on_gpu(monkeypatch: pytest.MonkeyPatch, lengths: Tensor) -> None:
    """``lengths`` (a CPU tensor) says it is on a GPU."""
    real = torch.Tensor.device
    on_gpu = property(lambda t: torch.device("cuda", 0) if t is lengths else real.__get__(t))
    monkeypatch.setattr(torch.Tensor, "device", on_gpu)
    monkeypatch.setattr(torch.Tensor, "is_cpu", property(lambda t: t.device.type == "cpu"))


def _counted_max(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that gets one item per ``Tensor.max`` call (a read of lengths) from now."""
    reads: list[int] = []
    real_max = torch.Tensor.max

    def counted_max(t: Tensor, *args: object, **kwargs: object) -> object:
        reads.append(1)
        return real_max(t, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "max", counted_max)
    return reads


def test_padding_checks_device_lengths_changed_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lengths on a GPU are read with the construction's check and kept; changed in place
    there, they were taken unchecked (a length past ``Lk`` passed, where a fresh mask of
    the same lengths refuses it): read again, once per change. No GPU here: a CPU tensor
    that says it is on one stands for it."""
    lengths = torch.tensor([3, 2])
    _on_gpu(monkeypatch, lengths)
    m = masks.padding(lengths)
    assert m.kl is lengths and m.kl.device.type == "cuda"
    reads = _counted_max(monkeypatch)
    for _ in range(3):  # unchanged: the kept value, no read
        m.check(batch=2, heads=1, lq=1, lk=3)
    assert reads == []
    lengths[0] = 5  # in place on the "device"
    with pytest.raises(ValueError, match=r"key_lengths=\[5, 2\] but the call has Lk=3"):
        masks.padding(lengths.clone()).check(batch=2, heads=1, lq=1, lk=3)  # a fresh mask
    reads.clear()
    for _ in range(2):
        with pytest.raises(ValueError, match=r"key_lengths=\[5, 2\] but the call has Lk=3"):
            m.check(batch=2, heads=1, lq=1, lk=3)
    assert m.natural_length == 5 and len(reads) == 1  # one read for the change
    lengths[0] = 1
    m.check(batch=2, heads=1, lq=1, lk=3)
    assert m.natural_length == 2


def test_padding_inference_lengths_on_a_device_are_not_read_per_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Lengths made under ``torch.inference_mode`` have no version to keep a read by: on
    a GPU each call read them (a sync per layer per step), where before the device
    re-check they were taken unchecked; they are again. No GPU here: a CPU tensor that
    says it is on one stands for it."""
    with torch.inference_mode():
        lengths = torch.tensor([3, 2])
    _on_gpu(monkeypatch, lengths)
    m = masks.padding(lengths)
    reads = _counted_max(monkeypatch)
    for _ in range(4):
        m.check(batch=2, heads=1, lq=1, lk=3)
    assert reads == []
