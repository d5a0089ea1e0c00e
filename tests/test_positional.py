"""Positional encodings against independent references: the papers' formulas written with
Python's math module, RoPE as complex multiplication, and Hugging Face's Llama rotary."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from attnlab.bias import ALiBi, RelativeBuckets
from attnlab.positional import (
    LearnedPositional,
    RotaryEmbedding,
    SinusoidalPositional,
    alibi,
    relative_buckets,
    sinusoidal_table,
)
from tests.conftest import check_and_control, max_err

F64 = torch.float64


# --------------------------------------------------------------------------- references


def paper_sinusoid(pos: int, j: int, dim: int, base: float = 10000.0) -> float:
    """Vaswani et al. (2017): PE[pos, 2i] = sin(pos / base^(2i/d)), PE[pos, 2i+1] = cos(...)."""
    i = j // 2
    angle = pos / base ** (2 * i / dim)
    return math.sin(angle) if j % 2 == 0 else math.cos(angle)


def complex_rope(
    x: Tensor,
    pos: Tensor,
    *,
    rotary_dim: int | None = None,
    base: float = 10000.0,
    interleaved: bool = False,
) -> Tensor:
    """RoPE as complex multiplication, float64: x (B, H, L, E), pos float (L,) or (B, 1, L).

    Pair j (features (2j, 2j+1) if interleaved, else (j, j + R/2)) is the complex number
    a + ib, multiplied by exp(i * pos * base^(-2j/R)).
    """
    r = x.shape[-1] if rotary_dim is None else rotary_dim
    half = r // 2
    theta = torch.tensor([base ** (-2 * j / r) for j in range(half)], dtype=F64)
    angle = pos.to(F64)[..., None] * theta  # (L, R/2) or (B, 1, L, R/2)
    rot = x[..., :r].to(F64)
    if interleaved:
        z = torch.view_as_complex(rot.reshape(*rot.shape[:-1], half, 2).contiguous())
    else:
        z = torch.complex(rot[..., :half], rot[..., half:])
    z = z * torch.polar(torch.ones_like(angle), angle)
    out = torch.view_as_real(z).flatten(-2) if interleaved else torch.cat((z.real, z.imag), -1)
    return torch.cat((out, x[..., r:].to(F64)), dim=-1)


# --------------------------------------------------------------------------- sinusoidal


@pytest.mark.parametrize("dim", [1, 6, 7, 64])
@pytest.mark.parametrize("offset", [0, 5, 1000])
def test_sinusoidal_table_matches_paper(dim: int, offset: int) -> None:
    length = 9
    want = torch.tensor(
        [[paper_sinusoid(offset + p, j, dim) for j in range(dim)] for p in range(length)],
        dtype=F64,
    )
    got64 = sinusoidal_table(length, dim, offset=offset, dtype=F64)
    assert got64.shape == (length, dim) and got64.dtype == F64
    assert max_err(got64, want) < 1e-12
    # float32 angles: the error grows with the position (pos * 2^-24 relative rounding).
    got32 = sinusoidal_table(length, dim, offset=offset)
    assert got32.dtype == torch.float32
    assert max_err(got32, want) < 1e-6 + (offset + length) * 2e-7


def test_sinusoidal_table_base_and_empty() -> None:
    got = sinusoidal_table(4, 6, base=100.0, dtype=F64)
    want = [[paper_sinusoid(p, j, 6, base=100.0) for j in range(6)] for p in range(4)]
    assert max_err(got, torch.tensor(want, dtype=F64)) < 1e-12
    assert sinusoidal_table(0, 6).shape == (0, 6)
    for bad in ("float32", None, torch.int64):  # (a str or None raised AttributeError)
        with pytest.raises(TypeError, match=r"dtype must be a floating-point torch\.dtype"):
            sinusoidal_table(3, 4, dtype=bad)  # type: ignore[arg-type]


def test_sinusoidal_module_offset_and_positions() -> None:
    dim, pe = 7, SinusoidalPositional(7)
    x = torch.randn(2, 5, dim, dtype=F64)
    assert list(pe.parameters()) == []
    want = [[paper_sinusoid(3 + p, j, dim) for j in range(dim)] for p in range(5)]
    assert max_err(pe(x, offset=3) - x, torch.tensor(want, dtype=F64)) < 1e-12
    pos = torch.tensor([[0, 1, 2, 3, 4], [9, 7, 5, 3, 1]])
    out = pe(x, positions=pos)
    for b in range(2):
        rows = [[paper_sinusoid(int(p), j, dim) for j in range(dim)] for p in pos[b]]
        assert max_err(out[b] - x[b], torch.tensor(rows, dtype=F64)) < 1e-12
    assert pe(x.half()).dtype == torch.float16


# --------------------------------------------------------------------------- learned


def test_learned_offset_and_positions() -> None:
    pe = LearnedPositional(10, 4)
    assert pe.weight.shape == (10, 4) and pe.weight.requires_grad
    x = torch.randn(2, 3, 4)
    w = pe.weight.detach()
    torch.testing.assert_close(pe(x), x + w[:3], rtol=0, atol=0)
    torch.testing.assert_close(pe(x, offset=7), x + w[7:10], rtol=0, atol=0)
    pos = torch.tensor([[9, 0, 4], [1, 1, 1]])
    want = torch.stack([x[0] + w[[9, 0, 4]], x[1] + w[[1, 1, 1]]])
    torch.testing.assert_close(pe(x, positions=pos), want, rtol=0, atol=0)
    torch.testing.assert_close(pe(x, positions=pos[0]), x + w[[9, 0, 4]], rtol=0, atol=0)


def test_learned_init_and_gradient() -> None:
    pe = LearnedPositional(512, 64)
    assert abs(pe.weight.std().item() - 0.02) < 0.001
    pe(torch.zeros(1, 3, 64), offset=2).sum().backward()
    assert pe.weight.grad is not None
    touched = pe.weight.grad.abs().sum(-1).nonzero().flatten().tolist()
    assert touched == [2, 3, 4]


def test_learned_errors() -> None:
    pe, x = LearnedPositional(10, 4), torch.zeros(1, 5, 4)
    check_and_control(
        lambda: pe(x, offset=6),
        lambda: pe(x, offset=5),
        ValueError,
        r"offset=6 \+ length=5 = 11 > max_len=10",
    )
    check_and_control(
        lambda: pe(x, positions=torch.tensor([0, 1, 2, 3, 10])),
        lambda: pe(x, positions=torch.tensor([0, 1, 2, 3, 9])),
        ValueError,
        r"\[0, max_len=10\), got values from 0 to 10",
    )
    check_and_control(
        lambda: pe(x, positions=torch.tensor([-1, 1, 2, 3, 4])),
        lambda: pe(x, positions=torch.tensor([0, 1, 2, 3, 4])),
        ValueError,
        r"got values from -1 to 4",
    )
    check_and_control(
        lambda: pe(x, 2, positions=torch.arange(5)),
        lambda: pe(x, 0, positions=torch.arange(5)),
        ValueError,
        r"either offset or positions.*offset=2",
    )
    check_and_control(
        lambda: pe(torch.zeros(1, 5, 3)), lambda: pe(x), ValueError, r"D = dim = 4.*\(1, 5, 3\)"
    )


# --------------------------------------------------------------------------- rotary: math

ROPE_CASES = [  # (head_dim, rotary_dim, interleaved)
    (16, None, False),
    (16, None, True),
    (40, 24, False),
    (59, 58, False),
    (59, 32, True),
    (111, 110, True),
]


@pytest.mark.parametrize(("head_dim", "rotary_dim", "interleaved"), ROPE_CASES)
def test_rope_matches_complex_reference(
    head_dim: int, rotary_dim: int | None, interleaved: bool
) -> None:
    rope = RotaryEmbedding(head_dim, rotary_dim=rotary_dim, interleaved=interleaved)
    x = torch.randn(2, 3, 97, head_dim, dtype=F64)
    pos = torch.arange(97)
    want = complex_rope(x, pos, rotary_dim=rotary_dim, interleaved=interleaved)
    assert max_err(rope(x), want) < 1e-12
    # float32 angles: rounding grows with the position, about L * 2^-24 * |x|.
    got32 = rope(x.float())
    assert got32.dtype == torch.float32
    assert max_err(got32, want) < 3e-5


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim", [16, 8])
def test_rope_scores_depend_on_relative_position(rotary_dim: int, interleaved: bool) -> None:
    rope = RotaryEmbedding(16, rotary_dim=rotary_dim, interleaved=interleaved)
    q, k = torch.randn(2, 1, 1, 1, 16, dtype=F64).unbind(0)

    def score(m: int, n: int) -> float:
        return (rope(q, positions=m) * rope(k, positions=n)).sum().item()

    for m, n in [(0, 0), (3, 7), (9, 2)]:
        s = score(m, n)
        for t in (1, 5, 100, 1234):
            assert score(m + t, n + t) == pytest.approx(s, abs=1e-10)
    assert score(0, 1) != pytest.approx(score(0, 2), abs=1e-6)  # and it does depend on m - n


def test_rope_partial_leaves_tail_untouched() -> None:
    x = torch.randn(2, 3, 11, 40)
    out = RotaryEmbedding(40, rotary_dim=24)(x, positions=5)
    assert torch.equal(out[..., 24:], x[..., 24:])
    head = RotaryEmbedding(24)(x[..., :24].contiguous(), positions=5)
    torch.testing.assert_close(out[..., :24], head, rtol=0, atol=0)
    assert max_err(out[..., :24], x[..., :24]) > 0.1


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_int_offset_equals_explicit_positions(interleaved: bool) -> None:
    rope = RotaryEmbedding(32, interleaved=interleaved)
    x = torch.randn(2, 4, 6, 32)
    torch.testing.assert_close(rope(x, 40), rope(x, torch.arange(40, 46)), rtol=0, atol=1e-6)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5], [7, 3, 300, 0, 9, 9]])
    out = rope(x, pos)
    for b in range(2):
        want = complex_rope(x[b : b + 1].double(), pos[b], interleaved=interleaved)
        assert max_err(out[b : b + 1], want) < 1e-4
    # Incremental decoding: token t alone at offset t equals row t of the full pass.
    full = rope(x)
    for t in (0, 3, 5):
        torch.testing.assert_close(rope(x[:, :, t : t + 1], t), full[:, :, t : t + 1])


def test_rope_cache_grows_and_follows_dtype() -> None:
    rope, fresh = RotaryEmbedding(8), RotaryEmbedding(8)
    x = torch.randn(1, 2, 3, 8)
    rope(x)
    assert rope._cos.shape == (16, 4)
    out = rope(x, positions=1000)
    assert rope._cos.shape == (1024, 4)
    assert torch.equal(out, fresh(x, positions=1000))
    assert rope.state_dict() == {}
    rope.half()  # casts the cached tables; the next call rebuilds them in float32
    torch.testing.assert_close(rope(x), fresh(x), rtol=0, atol=0)
    x64 = x.double()
    assert max_err(rope(x64), complex_rope(x64, torch.arange(3))) < 1e-12
    assert rope._cos.dtype == F64


def test_rope_far_offsets_compute_their_angles_without_a_table() -> None:
    """One token at offset 2**21 built cos/sin tables of 2**22 positions (2 GiB at 128
    rotated features, 12.6 s); past ``_TABLE_MAX`` the tokens' own angles are computed,
    with the same values as explicit positions and the float64 formula."""
    from attnlab.positional.rotary import _TABLE_MAX

    rope, x = RotaryEmbedding(8), torch.randn(1, 2, 3, 8, dtype=F64)
    far = 2**21
    out = rope(x, far)
    assert rope._cos.shape[0] <= _TABLE_MAX
    assert torch.equal(out, rope(x, torch.arange(far, far + 3)))
    assert max_err(out, complex_rope(x, torch.arange(far, far + 3))) < 1e-9
    rope(x, _TABLE_MAX - 3)  # the last positions a table serves: built to _TABLE_MAX
    assert rope._cos.shape[0] == _TABLE_MAX
    assert torch.equal(rope(x, _TABLE_MAX - 3), rope(x, torch.arange(_TABLE_MAX - 3, _TABLE_MAX)))


def test_rope_returns_the_tables_it_built_when_another_thread_swaps_them() -> None:
    """Two threads sharing one RoPE: the other thread's shorter tables, stored between
    this call's store and its return, were what this call read back (a size error for a
    long sequence, 3 of 1000 trials of two threads at the default switch interval)."""

    class Raced(RotaryEmbedding):
        def __setattr__(self, name: str, value: object) -> None:
            super().__setattr__(name, value)
            if name == "_sin" and value.shape[0] > 16:  # type: ignore[union-attr]
                short = torch.zeros(16, value.shape[1])  # type: ignore[union-attr]
                super().__setattr__("_cos", short)  # the other thread's stores
                super().__setattr__("_sin", short.clone())

    x = torch.randn(1, 2, 100, 32)
    torch.testing.assert_close(Raced(32)(x), RotaryEmbedding(32)(x), rtol=0, atol=0)


def test_rope_tables_cast_by_double_are_computed_again() -> None:
    """``module.double()`` casts a float32 table; float64 work recomputes it (the offset
    path and the explicit-positions path then agree with the float64 definition)."""
    rope = RotaryEmbedding(64)
    rope(torch.randn(1, 2, 100, 64))  # float32 tables
    rope.double()
    x = torch.randn(1, 2, 100, 64, dtype=F64)
    want = complex_rope(x, torch.arange(100))
    assert max_err(rope(x), want) < 1e-12
    assert max_err(rope(x, torch.arange(100)), want) < 1e-12


def test_rope_cache_built_in_inference_mode_serves_autograd() -> None:
    rope = RotaryEmbedding(8)
    with torch.inference_mode():
        rope(torch.randn(1, 1, 4, 8))
    x = torch.randn(1, 1, 4, 8, requires_grad=True)
    rope(x).square().sum().backward()  # |rope(x)|^2 = |x|^2, so the gradient is 2x
    assert x.grad is not None
    torch.testing.assert_close(x.grad, 2 * x.detach())


def rotate_half_rope(x: Tensor, pos: Tensor, base: float = 10000.0) -> Tensor:
    """Hugging Face's ``x * cos + rotate_half(x) * sin`` in float64, ``pos`` (L,)."""
    half = x.shape[-1] // 2
    inv_freq = base ** (-torch.arange(half, dtype=F64) * 2 / x.shape[-1])  # (E/2,)
    angle = torch.cat([pos.to(F64)[:, None] * inv_freq] * 2, dim=-1)  # (L, E)
    x1, x2 = x.to(F64).chunk(2, dim=-1)
    return x.to(F64) * angle.cos() + torch.cat((-x2, x1), dim=-1) * angle.sin()


def test_rope_tables_are_no_buffers_so_models_that_ran_other_lengths_stack() -> None:
    """The cos/sin tables were buffers sized by the longest sequence run: a model that had
    run 32 tokens and a fresh one did not stack ("got [32, 8] at entry 0 and [0, 8] at
    entry 1") and ``AveragedModel(use_buffers=True)`` failed to update (size 0 vs 32)."""
    from torch.func import stack_module_state
    from torch.optim.swa_utils import AveragedModel

    from attnlab.models import LanguageModel, LMConfig

    cfg = LMConfig(vocab_size=50, d_model=32, num_heads=4, num_layers=1)
    ran, fresh = LanguageModel(cfg).eval(), LanguageModel(cfg).eval()
    ema, ids = AveragedModel(ran, use_buffers=True), torch.randint(0, 50, (2, 32))
    with torch.no_grad():
        want = ran(ids)
    stack_module_state([ran, fresh])
    ema.update_parameters(ran)
    assert [n for n, _ in ran.named_buffers() if "rope" in n] == []
    fresh.load_state_dict(ran.state_dict(), strict=True)  # the same keys, run or not
    with torch.no_grad():
        assert torch.equal(fresh(ids), want)


def test_rope_tables_follow_double_and_float_moves() -> None:
    """Plain cached tables, dropped by ``.double()`` / ``.float()``: each dtype's result
    matches the rotate_half formula to its own precision."""
    rope, x = RotaryEmbedding(64), torch.randn(1, 2, 100, 64)
    want = rotate_half_rope(x, torch.arange(100))
    assert max_err(rope(x), want) < 1e-5  # float32 tables of 128 positions
    rope.double()
    assert max_err(rope(x.double()), want) < 1e-12
    assert (rope._cos.dtype, rope._cos.shape) == (F64, (128, 32))
    rope.float()
    assert rope._cos.shape[0] == 0  # dropped by the cast; built again on use
    assert max_err(rope(x), want) < 1e-5 and rope._cos.dtype == torch.float32


def test_rope_scaling_formulas() -> None:
    r, base, factor = 16, 10000.0, 4.0
    ntk = RotaryEmbedding(r, scaling="ntk", factor=factor)
    ntk_base = base * factor ** (r / (r - 2))
    assert ntk.effective_base == pytest.approx(ntk_base, rel=1e-15)
    want = torch.tensor([ntk_base ** (-2 * j / r) for j in range(r // 2)], dtype=F64)
    assert max_err(ntk.inv_freq, want) < 1e-15
    x = torch.randn(1, 2, 20, r, dtype=F64)
    pos = torch.arange(20)
    assert max_err(ntk(x, pos), complex_rope(x, pos, base=ntk_base)) < 1e-12
    lin = RotaryEmbedding(r, scaling="linear", factor=factor)
    want = torch.tensor([base ** (-2 * j / r) / factor for j in range(r // 2)], dtype=F64)
    assert max_err(lin.inv_freq, want) < 1e-15
    assert max_err(lin(x, pos), complex_rope(x, pos / factor)) < 1e-12
    # With rotary_dim 2 the only frequency is base^0 = 1: NTK scaling changes nothing.
    assert RotaryEmbedding(2, scaling="ntk", factor=8.0).effective_base == base


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_rope_preserves_norm_and_dtype(dtype: torch.dtype) -> None:
    x = torch.randn(2, 3, 50, 24, dtype=dtype)
    for rope in (RotaryEmbedding(24), RotaryEmbedding(24, rotary_dim=12, interleaved=True)):
        out = rope(x, 77)
        assert out.dtype == dtype and out.shape == x.shape
        tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
        torch.testing.assert_close(
            out.double().norm(dim=-1), x.double().norm(dim=-1), rtol=tol, atol=tol
        )


# --------------------------------------------------------------------------- rotary: Hugging Face


@pytest.mark.parametrize(
    "rope_parameters",
    [
        {"rope_type": "default", "rope_theta": 10000.0},
        {"rope_type": "default", "rope_theta": 500000.0},
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    ],
    ids=["default", "theta5e5", "linear4"],
)
def test_rope_matches_transformers_llama(rope_parameters: dict[str, object]) -> None:
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.models.llama import modeling_llama as hf

    heads, head_dim = 4, 64
    config = LlamaConfig(
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        head_dim=head_dim,
        rope_parameters=dict(rope_parameters),
    )
    theta = float(rope_parameters["rope_theta"])  # type: ignore[arg-type]
    factor = float(rope_parameters.get("factor", 1.0))  # type: ignore[arg-type]
    scaling = "linear" if rope_parameters["rope_type"] == "linear" else "none"
    ours = RotaryEmbedding(head_dim, base=theta, scaling=scaling, factor=factor)
    q, k = torch.randn(2, 2, heads, 33, head_dim).unbind(0)
    pos = torch.stack([torch.arange(33), torch.arange(100, 133)])  # (B, L)
    cos, sin = hf.LlamaRotaryEmbedding(config)(q, pos)
    hf_q, hf_k = hf.apply_rotary_pos_emb(q, k, cos, sin)
    # float32 angles of positions up to 132 round to within ~132 * 2^-24 rad.
    torch.testing.assert_close(ours(q, pos), hf_q, rtol=0, atol=1e-4)
    torch.testing.assert_close(ours(k, pos), hf_k, rtol=0, atol=1e-4)
    # Both in float32: ours is no further from the float64 truth than twice Hugging Face's.
    ref = complex_rope(q.double(), pos[:, None].double() / factor, base=theta)
    assert max_err(ours(q, pos), ref) <= 2 * max_err(hf_q, ref) + 1e-6


# --------------------------------------------------------------------------- rotary: errors


def test_rope_constructor_errors() -> None:
    check_and_control(
        lambda: RotaryEmbedding(16, rotary_dim=7),
        lambda: RotaryEmbedding(16, rotary_dim=6),
        ValueError,
        r"rotary_dim must be an even int <= head_dim, got 7 \(head_dim=16\)",
    )
    check_and_control(
        lambda: RotaryEmbedding(16, rotary_dim=18),
        lambda: RotaryEmbedding(16, rotary_dim=16),
        ValueError,
        r"rotary_dim must be an even int <= head_dim, got 18",
    )
    check_and_control(
        lambda: RotaryEmbedding(59),
        lambda: RotaryEmbedding(59, rotary_dim=58),
        ValueError,
        r"got 59 \(defaults to head_dim\); pass rotary_dim=58",
    )
    check_and_control(
        lambda: RotaryEmbedding(16, scaling="yarn"),
        lambda: RotaryEmbedding(16, scaling="ntk"),
        ValueError,
        r"scaling must be one of \('none', 'linear', 'ntk'\), got 'yarn'",
    )
    check_and_control(
        lambda: RotaryEmbedding(16, factor=2.0),
        lambda: RotaryEmbedding(16, scaling="linear", factor=2.0),
        ValueError,
        r"factor must be 1.0 with scaling='none', got 2.0",
    )
    check_and_control(
        lambda: RotaryEmbedding(16, base=-1.0),
        lambda: RotaryEmbedding(16, base=1.0),
        ValueError,
        r"base must be a finite float > 0, got -1.0",
    )


def test_rope_forward_errors() -> None:
    rope, x = RotaryEmbedding(16), torch.zeros(2, 3, 5, 16)
    check_and_control(
        lambda: rope(torch.zeros(2, 3, 5, 8)),
        lambda: rope(x),
        ValueError,
        r"E = head_dim = 16, got shape \(2, 3, 5, 8\)",
    )
    check_and_control(
        lambda: rope(x, -1), lambda: rope(x, 1), ValueError, r"int offset >= 0, got -1"
    )
    check_and_control(
        lambda: rope(x, torch.arange(4)),
        lambda: rope(x, torch.arange(5)),
        ValueError,
        r"shape \(L,\) = \(5,\) or \(B, L\) = \(2, 5\), got shape \(4,\)",
    )
    check_and_control(
        lambda: rope(x, torch.zeros(3, 5, dtype=torch.long)),
        lambda: rope(x, torch.zeros(2, 5, dtype=torch.long)),
        ValueError,
        r"got shape \(3, 5\)",
    )
    check_and_control(
        lambda: rope(x, torch.arange(5.0)),
        lambda: rope(x, torch.arange(5, dtype=torch.int32)),
        TypeError,
        r"positions must be an integer tensor, got dtype torch.float32",
    )
    check_and_control(
        lambda: rope(x, 1.5),  # type: ignore[arg-type]
        lambda: rope(x, 1),
        TypeError,
        r"positions must be an int offset or an integer tensor .* got float",
    )


# --------------------------------------------------------------------------- biases


def test_alibi_slopes_match_the_paper() -> None:
    # 8 heads: the geometric sequence starting at 2^(-8/8) with ratio 2^(-8/8).
    eight = [1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64, 1 / 128, 1 / 256]
    b = alibi(8)
    assert isinstance(b, ALiBi)
    assert b.slopes.tolist() == eight
    # 12 heads (Press's reference code): the 8 slopes for 8 heads, then every other slope of
    # the 16-head sequence 2^-0.5, 2^-1, 2^-1.5, ...: 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5.
    twelve = [*eight, 2**-0.5, 2**-1.5, 2**-2.5, 2**-3.5]
    torch.testing.assert_close(alibi(12).slopes, torch.tensor(twelve), rtol=0, atol=0)


def test_relative_buckets_forwards_arguments() -> None:
    b = relative_buckets(3, num_buckets=8, max_distance=20, bidirectional=False)
    assert isinstance(b, RelativeBuckets)
    assert (b.num_heads, b.num_buckets, b.max_distance, b.bidirectional) == (3, 8, 20, False)
    assert b.table.shape == (8, 3)
    assert relative_buckets(2).table.shape == (32, 2)
