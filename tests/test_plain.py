"""The plain-call path of :func:`attnlab.attention`: a call with nothing but q, k, v (a
decoding step) goes to the engine ``auto`` would pick without building a request, and
gives what the full path gives, validation included."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import Tensor

import attnlab
from attnlab import functional
from attnlab import masks as M
from attnlab.engines import base
from attnlab.engines.blocked import kernel
from attnlab.engines.reference import ReferenceEngine
from attnlab.interpret import capture
from tests.conftest import assert_2x_rule, naive_attention


def _qkv(lk: int, dtype: torch.dtype = torch.float32, b: int = 2) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(lk)
    q = torch.randn(b, 8, 1, 32, generator=g, dtype=dtype)
    k, v = (torch.randn(b, 2, lk, 32, generator=g, dtype=dtype) for _ in range(2))
    return q, k, v


@pytest.fixture
def no_requests(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts the requests attention() builds (a plain call builds none)."""
    built: list[int] = []
    full = functional._request

    def counting(*args: object, **kwargs: object) -> base.AttentionRequest:
        built.append(1)
        return full(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(functional, "_request", counting)
    yield built


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_plain_call_skips_the_request_and_equals_the_full_path(
    dtype: torch.dtype, no_requests: list[int]
) -> None:
    q, k, v = _qkv(300, dtype)
    with torch.no_grad():
        fast = attnlab.attention(q, k, v, scale=0.2)
    assert not no_requests  # the plain path answered
    picked = "blocked" if kernel() is not None else "sdpa"
    with torch.no_grad():  # grouped heads: the decoding kernel (half precision too); else SDPA
        full = attnlab.attention(q, k, v, scale=0.2, engine=picked)
    assert no_requests and isinstance(fast, Tensor) and torch.equal(fast, full)
    ref64, _ = naive_attention(*(t.double() for t in (q, k, v)), scale=0.2)
    plain, _ = naive_attention(q, k, v, scale=0.2)  # plain PyTorch in the same dtype
    assert_2x_rule(fast, plain, ref64)


def test_a_batch_of_one_broadcasts_on_the_plain_path(no_requests: list[int]) -> None:
    q, k, v = _qkv(40, b=3)
    out = attnlab.attention(q[:1], k, v)
    assert not no_requests and isinstance(out, Tensor) and out.shape == (3, 8, 1, 32)
    want = attnlab.attention(q[:1].expand(3, -1, -1, -1), k, v, engine="reference")
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize(
    "extra",
    [
        {"mask": M.window(8)},  # (causal alone lets one row see every key: a plain call)
        {"return_weights": True},
        {"dropout_p": 0.1},
        {"engine": "sdpa"},
        {"softcap": 30.0},
        {"normalize": "sparsemax"},
    ],
    ids=lambda e: next(iter(e)),
)
def test_anything_more_than_q_k_v_builds_a_request(extra: dict, no_requests: list[int]) -> None:
    attnlab.attention(*_qkv(40), **extra)
    assert no_requests


def test_few_keys_and_open_capture_blocks_build_a_request(no_requests: list[int]) -> None:
    attnlab.attention(*_qkv(15))  # below 16 keys SDPA needs its NaN screen
    assert len(no_requests) == 1
    model = _Attends()
    with capture(model) as got:
        model(*_qkv(40))
    assert len(no_requests) == 2 and len(got.records) == 1  # the observer saw the call


class _Attends(torch.nn.Module):
    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out = attnlab.attention(q, k, v)
        assert isinstance(out, Tensor)
        return out


def test_bad_input_fails_as_on_the_full_path() -> None:
    q, k, v = _qkv(40)
    with pytest.raises(TypeError, match="q, k and v must share one dtype"):
        attnlab.attention(q, k.double(), v)
    with pytest.raises(ValueError, match=r"q must have shape \(B, H, L, E\)"):
        attnlab.attention(q[0], k, v)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        attnlab.attention(q[:, :3], k, v)
    with pytest.raises(ValueError, match="scale must be finite"):
        attnlab.attention(q, k, v, scale=float("inf"))
    with pytest.raises(TypeError, match="dropout_p"):
        attnlab.attention(q, k, v, dropout_p=False)
    with pytest.raises(TypeError, match="return_weights must be a bool"):
        attnlab.attention(q, k, v, return_weights=0)  # type: ignore[arg-type]


def test_an_engine_registered_first_gets_plain_calls(no_requests: list[int]) -> None:
    """A user's engine ahead of SDPA in auto's order turns the plain path off."""

    class Mine(ReferenceEngine):
        name = "mine"

    saved = (dict(base._REGISTRY), list(base._AUTO_ORDER), list(base._PLAIN))
    try:
        base.register_engine(Mine(), auto_rank=0)
        q, k, v = _qkv(40)
        got = attnlab.attention(q, k, v, return_lse=False)
        assert no_requests and base.select_engine("auto", _request(q, k, v)).name == "mine"
        torch.testing.assert_close(got, attnlab.attention(q, k, v, engine="sdpa"))
    finally:
        base._REGISTRY.clear()
        base._REGISTRY.update(saved[0])
        base._AUTO_ORDER[:] = saved[1]
        base._PLAIN[:] = saved[2]


def _registry() -> tuple[dict[str, base.Engine], list[str], list[str], list[base.Engine]]:
    return dict(base._REGISTRY), [*base._AUTO_ORDER], [*base._APPROX_ORDER], [*base._PLAIN]


@pytest.fixture
def kept_registry() -> Iterator[tuple]:
    """The registry and auto's orders as they were, put back after the test."""
    saved = _registry()
    yield saved
    base._REGISTRY.clear()
    base._REGISTRY.update(saved[0])
    base._AUTO_ORDER[:], base._APPROX_ORDER[:], base._PLAIN[:] = saved[1:]


class _NoPlain(base.Engine):  # neither unsupported nor forward: a half-made engine
    name = "half"


class _Named(ReferenceEngine):
    def __init__(self, name: object, exact: object = True) -> None:
        self.name, self.exact = name, exact  # type: ignore[assignment]


@pytest.mark.parametrize(
    ("engine", "rank", "error", "match"),
    [
        (None, 0, TypeError, r"engine must be an instance of an attnlab.engines.Engine .*None"),
        ("blocked", 0, TypeError, r"Engine subclass, got 'blocked' \(str\)"),
        (5, None, TypeError, r"Engine subclass, got 5 \(int\)"),
        (_NoPlain(), 0, TypeError, r"engine 'half' must implement unsupported and forward"),
        (_Named(7), 0, TypeError, r"engine.name must be a str, got 7 \(int\)"),
        (_Named("auto"), 0, ValueError, r"engine.name must be a name of its own, got 'auto'"),
        (_Named("mine", 1), 0, TypeError, r"engine.exact must be a bool, got 1"),
        (_Named("mine"), "0", TypeError, r"auto_rank must be an int >= 0, got '0' \(str\)"),
        (_Named("mine"), -1, ValueError, r"auto_rank must be an int >= 0, got -1"),
        (ReferenceEngine(), True, TypeError, r"auto_rank must be an int >= 0, got True"),
    ],
)
def test_a_refused_registration_names_the_fault_and_changes_nothing(
    engine: object, rank: object, error: type[Exception], match: str, kept_registry: tuple
) -> None:
    """register_engine(None) gave AttributeError; auto_rank='0' a TypeError naming nothing
    after it had taken the engine out of auto's order (auto then chose sdpa for the rest
    of the process); an engine refused for lacking ``passes_plain`` stayed registered."""
    with pytest.raises(error, match=match):
        base.register_engine(engine, auto_rank=rank)  # type: ignore[arg-type]
    assert kept_registry == _registry()
    q, k, v = _qkv(40)
    torch.testing.assert_close(attnlab.attention(q, k, v), naive_attention(q, k, v)[0])


def test_a_rank_past_the_end_puts_the_engine_last(kept_registry: tuple) -> None:
    base.register_engine(_Named("mine"), auto_rank=99)
    assert [*kept_registry[1], "mine"] == base._AUTO_ORDER


def test_get_engine_auto_lists_only_registered_engines() -> None:
    """get_engine('auto') was refused in a message that listed 'auto' as allowed."""
    names = ", ".join(map(repr, attnlab.available_engines()))
    with pytest.raises(ValueError, match="engine='auto' names no single engine") as info:
        attnlab.get_engine("auto")
    assert f"get_engine takes one of {names} (attention() and select_engine" in str(info.value)
    with pytest.raises(ValueError, match=f"expected one of {names} "):
        attnlab.get_engine("fast")
    assert attnlab.get_engine("sdpa").name == "sdpa"


def _request(q: Tensor, k: Tensor, v: Tensor) -> base.AttentionRequest:
    return functional._request(q, k, v, None, None, None, "dot", "softmax", 0.0, False, False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_the_nan_screen_tells_nan_from_infinities(dtype: torch.dtype) -> None:
    """The screen sums (a NaN makes the sum NaN; in half precision a sum took a quarter
    of amax's time) and asks amax only then: +inf and -inf sum to NaN without a NaN."""
    from attnlab._eager import any_nan

    x = torch.randn(4096).to(dtype)
    infs = x.clone()
    infs[3], infs[7] = float("inf"), float("-inf")
    nan = x.clone()
    nan[2048] = float("nan")
    assert not any_nan(x) and not any_nan(infs) and not any_nan(x, infs)
    assert any_nan(nan) and any_nan(infs, nan) and any_nan(torch.ones(2), nan)
    big = torch.full((4096,), torch.finfo(dtype).max, dtype=dtype)  # a sum that overflows
    assert not any_nan(big)
