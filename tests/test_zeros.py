"""The cache behind large zeroed results (attnlab.engines.zeros): a reused map is all
zeros again whoever wrote where, and the cache keeps only what its rules allow."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from attnlab.engines import zeros as _zeros
from attnlab.engines.zeros import PAGE, cache_info, empty_cache, lazy_zeros, lazy_zeros_unzeroed

pytestmark = pytest.mark.skipif(
    _zeros._written_pages(0, 1) is None, reason="no readable /proc/self/pagemap"
)

SHAPE = (1, 1024, 4096)  # 16 MiB of float32, the smallest mapped result; 4 pages a row


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ATTNLAB_ZEROS_CACHE_MB", raising=False)
    empty_cache()


def _scribble(z: torch.Tensor, seed: int) -> None:
    """Writes a band, a few scattered cells and the last cell, as weights and users do."""
    g = torch.Generator().manual_seed(seed)
    for h in range(z.shape[0]):
        z[h].diagonal().fill_(1.0)
        z[h].diagonal(-300).fill_(-2.0)
    flat = z.view(-1)
    flat[torch.randint(0, flat.numel(), (500,), generator=g)] = float("nan")
    flat[-1] = 7.0


def test_a_reused_map_is_zeros_again() -> None:
    like = torch.ones(1)
    for seed in range(3):
        z = lazy_zeros(SHAPE, like)
        ptr = z.data_ptr()
        assert torch.equal(z[:, ::97, ::89], torch.zeros(1, 11, 47))  # reads map few pages
        _scribble(z, seed)
        del z  # the map goes back to the cache
        assert cache_info()["kept"] == 1
        z = lazy_zeros(SHAPE, like)
        assert z.data_ptr() == ptr and cache_info()["kept"] == 0  # the same map, reused
        nonzero = torch.count_nonzero(z)  # reads every page: this map is not kept
        assert int(nonzero) == 0
        del z
        assert cache_info()["kept"] == 0


def test_unzeroed_names_the_written_pages_and_zeroes_nothing_else() -> None:
    """lazy_zeros_unzeroed hands a reused map back as it is, with the pages written; the
    caller zeroes them. A fresh map has none; small results are plain zeros."""
    like = torch.ones(1)
    z, dirty = lazy_zeros_unzeroed(SHAPE, like)
    assert dirty.numel() == 0
    _scribble(z, 0)  # (no read: reading maps pages, and a map mostly mapped is not kept)
    seen = torch.zeros(SHAPE)
    _scribble(seen, 0)
    by_page = seen.view(-1, PAGE // 4).view(torch.int32)
    pages = by_page.any(1).nonzero().flatten()
    del z
    z, dirty = lazy_zeros_unzeroed(SHAPE, like)
    assert dirty.dtype == torch.long and dirty.tolist() == pages.tolist()
    assert torch.equal(z.view(-1, PAGE // 4)[dirty].view(torch.int32), by_page[dirty])  # as left
    z.view(-1, PAGE // 4)[dirty] = 0.0  # the caller's part: then all zeros
    assert int(torch.count_nonzero(z)) == 0
    small, none = lazy_zeros_unzeroed((3, 5), like)
    assert torch.equal(small, torch.zeros(3, 5)) and none.numel() == 0


def test_other_dtypes_and_sizes_that_are_not_whole_pages() -> None:
    shape = (3, 1001, 2999)  # bfloat16, 18 MB: not a multiple of the page size
    z = lazy_zeros(shape, torch.ones(1, dtype=torch.bfloat16))
    z[:, ::50, :7] = 3
    z[-1, -1, -1] = 5  # the last bytes, in the last (partly used) page
    del z
    hits = cache_info()["hits"]
    z = lazy_zeros(shape, torch.ones(1, dtype=torch.bfloat16))
    assert cache_info()["hits"] == hits + 1 and z.shape == shape and z.dtype == torch.bfloat16
    assert torch.equal(z, torch.zeros(shape, dtype=torch.bfloat16))


def test_the_cache_keeps_what_its_rules_allow(monkeypatch: pytest.MonkeyPatch) -> None:
    like = torch.ones(1)
    z = lazy_zeros(SHAPE, like)
    z.fill_(1.0)  # every page written: zeroing it would cost more than a new map
    del z
    assert cache_info()["kept"] == 0
    a, b = lazy_zeros(SHAPE, like), lazy_zeros(SHAPE, like)
    a[0, :, 0] = 1  # a page in each row: 4 MiB written
    b[0, :40] = 1  # 160 pages
    monkeypatch.setenv("ATTNLAB_ZEROS_CACHE_MB", "0")  # off: nothing is kept
    del b
    assert cache_info()["kept"] == 0
    monkeypatch.setenv("ATTNLAB_ZEROS_CACHE_MB", "1")  # 1 MiB: 160 pages fit, 1024 do not
    b = lazy_zeros(SHAPE, like)
    b[0, :40] = 1
    del a, b
    info = cache_info()
    assert info["kept"] == 1 and 0 < info["held_mib"] <= 1
    empty_cache()
    assert cache_info()["kept"] == 0 and cache_info()["held_mib"] == 0


def test_a_bad_cache_limit_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTNLAB_ZEROS_CACHE_MB", "lots")
    with pytest.raises(ValueError, match=r"ATTNLAB_ZEROS_CACHE_MB must be .* got 'lots'"):
        lazy_zeros(SHAPE, torch.ones(1))
    monkeypatch.setenv("ATTNLAB_ZEROS_CACHE_MB", "64")
    assert lazy_zeros(SHAPE, torch.ones(1)).shape == SHAPE


def test_a_forked_child_keeps_its_own_copy() -> None:
    """Private maps: after a fork, the parent's reuse of a map never shows in the child."""
    z = lazy_zeros(SHAPE, torch.ones(1))
    z[0, :8] = 1.0
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child waits for the parent's write, then reports what it sees
        os.close(write)
        os.read(read, 1)
        os._exit(0 if z[0, :8, ::512].flatten().tolist() == [1.0] * 64 else 1)
    os.close(read)
    ptr = z.data_ptr()
    del z
    again = lazy_zeros(SHAPE, torch.ones(1))  # the same map, zeroed, written anew
    assert again.data_ptr() == ptr
    again[0, :8] = 5.0
    os.write(write, b"x")
    os.close(write)
    for _ in range(600):  # 30 s at most: a hang fails instead of blocking the suite
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child did not finish in 30 s")
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def test_a_new_size_evicts_the_oldest_maps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights of changing lengths: the cache serves the sizes in use. It kept the first
    sizes it saw and refused the rest (16 lengths: 965 MiB held, no hit)."""
    monkeypatch.setenv("ATTNLAB_ZEROS_CACHE_MB", "1")  # one map of 160 written pages
    like = torch.ones(1)
    before = cache_info()
    for rows in (1024, 1040, 1056):  # three sizes, each over the first's pages
        for _ in range(3):
            z = lazy_zeros((1, rows, 4096), like)
            z[0, :40] = 1  # 160 pages
            del z
    info = cache_info()
    hits, misses = info["hits"] - before["hits"], info["misses"] - before["misses"]
    assert info["kept"] == 1 and (hits, misses) == (6, 3), info
    z = lazy_zeros((1, 1056, 4096), like)  # the newest size is the one kept
    assert cache_info()["hits"] - before["hits"] == 7 and not z.any()


def _vm_mib() -> float:
    """This process's address space (VmSize), in MiB."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmSize")) / 1024


def test_unwritten_maps_are_unmapped_and_the_count_is_capped() -> None:
    """A never-written map cost 0 under the limit and was kept: all-padding weights at 600
    lengths kept 600 maps (0 MiB written, VmSize 4.6 -> 49 GiB). Now it is unmapped, and
    written maps are kept MAX_KEPT at most, the newest size still reused."""
    like = torch.ones(1)
    before = _vm_mib()
    for i in range(50):  # 50 sizes, 16 to 28.5 MiB, none written (1.1 GiB if all kept)
        z = lazy_zeros((1, 1024 + 16 * i, 4096), like)
        del z
        assert cache_info()["kept"] == 0
    assert _vm_mib() - before < 256, (before, _vm_mib())
    for i in range(_zeros.MAX_KEPT + 4):  # written maps: one page each, well under the limit
        z = lazy_zeros((1, 1024 + 16 * i, 4096), like)
        z[0, 0, 0] = 1.0
        del z
        assert cache_info()["kept"] == min(i + 1, _zeros.MAX_KEPT)
    assert _vm_mib() - before < 256 + _zeros.MAX_KEPT * 32, (before, _vm_mib())
    hits = cache_info()["hits"]
    z = lazy_zeros((1, 1024 + 16 * (_zeros.MAX_KEPT + 3), 4096), like)  # the newest: reused
    assert cache_info()["hits"] == hits + 1 and not z.any()
    del z
    assert lazy_zeros((1, 1024, 4096), like).shape == (1, 1024, 4096)  # the oldest: evicted
    assert cache_info()["hits"] == hits + 1
