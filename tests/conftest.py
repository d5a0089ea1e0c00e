"""Shared test helpers: an independent eager reference, flash-attn's 2x error rule, a
counter of the attnlab backend's calls, and the headless chromium that the browser tests
drive."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

# Keep the suite deterministic and friendly to two cores with pytest-xdist.
torch.set_num_threads(max(1, int(os.environ.get("ATTNLAB_TEST_THREADS", "1"))))
# Inductor's cache key leaves out the instruction set it compiled for: a graph cached under
# AVX-512 and loaded under ATEN_CPU_CAPABILITY=avx2 returned values of 1e37. The tests that
# compile keep one cache per capability unless one is given.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _cap = torch.backends.cpu.get_cpu_capability().lower()
    _uid = getattr(os, "getuid", lambda: 0)()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(
        Path(tempfile.gettempdir()) / f"torchinductor_attnlab_tests_{_uid}_{_cap}"
    )


def naive_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    allowed: Tensor | None = None,
    bias: Tensor | None = None,
    scale: float | None = None,
    normalizer: str = "softmax",
    softcap: float | None = None,
    sinks: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Plain PyTorch attention written from the definition, independent of attnlab.

    q (B, Hq, Lq, E), k/v (B, Hkv, Lk, .); returns (out, weights). Fully masked rows -> 0.
    Sparse normalizers use the `entmax` package. ``softcap`` caps the scaled scores
    (``c * tanh(s / c)``) before the bias; ``sinks`` (softmax only), one logit per head
    ``(Hq,)`` or per row ``(B or 1, Hq, Lq)``, joins each row's softmax and its share is
    dropped.
    """
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("bhqe,bhke->bhqk", q, k) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + bias
    if allowed is None:
        allowed = torch.ones_like(s, dtype=torch.bool)
    allowed = torch.broadcast_to(allowed, s.shape)
    if normalizer == "softmax":
        s = s.masked_fill(~allowed, float("-inf"))
        if sinks is not None:  # one more logit per row, whose weight is dropped
            rows = sinks.view(1, -1, 1) if sinks.dim() == 1 else sinks  # (., Hq, Lq or 1)
            sink = rows[..., None].expand(*s.shape[:-1], 1).to(s.dtype)
            s = torch.cat([s, sink], dim=-1)
        w = torch.softmax(s, dim=-1)[..., : allowed.shape[-1]]
    else:
        import entmax

        fn = {"sparsemax": entmax.sparsemax, "entmax15": entmax.entmax15}[normalizer]
        w = fn(s.masked_fill(~allowed, -1e4 if s.dtype != torch.float64 else -1e9), dim=-1)
    w = torch.where(allowed.any(-1, keepdim=True), w, torch.zeros_like(w))
    return torch.einsum("bhqk,bhke->bhqe", w, v), w


def max_err(a: Tensor, b: Tensor) -> float:
    """Max absolute difference in float64 (equal infinities count as equal)."""
    if not a.numel():
        return 0.0
    a, b = a.double(), b.double()
    return torch.where(a == b, 0.0, (a - b).abs()).max().item()


def assert_2x_rule(ours: Tensor, plain: Tensor, ref64: Tensor, what: str = "") -> None:
    """flash-attn's rule: our error vs fp64 is at most 2x plain PyTorch's in the same dtype.

    The floor covers degenerate cases where plain PyTorch is exact by luck: 1e-5 (Lk = 1:
    dq is 0 in exact arithmetic and any fused kernel leaves rounding noise), or one unit in
    the last place of the largest reference value in ``ours``' dtype, where plain PyTorch
    happens to round a large result (a gradient summed over many rows) to the nearest
    representable value and any other order of summation may land on its neighbour.
    """
    ours_err, plain_err = max_err(ours, ref64), max_err(plain, ref64)
    finite = ref64[torch.isfinite(ref64)]
    top = float(finite.abs().max()) if finite.numel() else 0.0
    floor = max(1e-5, torch.finfo(ours.dtype).eps * top) if ours.is_floating_point() else 1e-5
    assert ours_err <= 2 * plain_err + floor, (
        f"{what}: error {ours_err:.3e} > 2 x plain PyTorch's {plain_err:.3e} (+ {floor:.1e})"
    )


def check_and_control(
    fn: Callable[[], object], ok: Callable[[], object], exc: type[Exception], match: str
) -> None:
    """``fn`` raises ``exc`` matching ``match``; ``ok`` (the positive control) does not."""
    with pytest.raises(exc, match=match):
        fn()
    ok()


def attnlab_calls(monkeypatch: pytest.MonkeyPatch, name: str = "attnlab") -> list[Any]:
    """Every call of transformers' registered attention function ``name`` from now on, as
    the attention mask it was handed: how many times attnlab ran, and with what."""
    import transformers

    interface = transformers.AttentionInterface._global_mapping
    own, calls = interface[name], []

    def counted(*a: Any, **k: Any) -> Any:
        calls.append(a[4] if len(a) > 4 else k.get("attention_mask"))
        return own(*a, **k)

    monkeypatch.setitem(interface, name, counted)
    return calls


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the blocked engine's decoding kernel's calls (tests/test_decode*.py); skips
    where the kernel cannot be built."""
    from attnlab.engines import blocked as blocked_engine

    if blocked_engine.kernel() is None:
        pytest.skip(f"attnlab's CPU kernel could not be built: {blocked_engine.kernel_error()}")
    calls: list[int] = []
    op = blocked_engine._decode_op()

    def counted(*args: object) -> Tensor:
        calls.append(1)
        return op(*args)

    monkeypatch.setattr(blocked_engine, "_decode_op", lambda: counted)
    return calls


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("ATTNLAB_ARTIFACTS", "test-artifacts"))


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's chromium, headless, driven by Playwright (no browser download); skipped
    without either."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.exists():
        pytest.skip("needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=str(CHROMIUM), args=["--headless", "--no-sandbox", "--disable-gpu"]
        )
        yield b
        b.close()
