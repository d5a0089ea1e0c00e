"""Bad input gets a ValueError/TypeError naming the argument, what was seen and expected.

Each case pins the message and has a positive control: the same call with the one bad
argument fixed succeeds.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import attnlab
from attnlab import bias as B
from attnlab import masks as M


def _good() -> dict[str, Any]:
    torch.manual_seed(0)
    return {
        "q": torch.randn(2, 4, 5, 8),
        "k": torch.randn(2, 2, 6, 8),
        "v": torch.randn(2, 2, 6, 3),
    }


def _call(**overrides: Any) -> Any:
    args = _good()
    kw = {n: overrides.pop(n) for n in list(overrides) if n not in args}
    args.update(overrides)
    return attnlab.attention(args["q"], args["k"], args["v"], **kw)


CASES: list[tuple[str, dict[str, Any], dict[str, Any], type[Exception], str]] = [
    # id, bad overrides, fixed overrides, error type, message pattern
    (
        "q_rank",
        {"q": torch.randn(4, 5, 8)},
        {},
        ValueError,
        r"q must have shape \(B, H, L, E\) \(rank 4\), got shape \(4, 5, 8\)",
    ),
    ("q_type", {"q": [[1.0]]}, {}, TypeError, r"q must be a torch.Tensor .* got list"),
    (
        "int_dtype",
        {"k": torch.ones(2, 2, 6, 8, dtype=torch.long)},
        {},
        TypeError,
        r"k must be a floating-point tensor \(float64, float32, float16 or bfloat16\), got "
        r"dtype torch.int64",
    ),
    (  # float8 is floating point, but every engine failed in torch ("Promotion for Float8")
        "float8_dtype",
        {"q": torch.ones(2, 2, 6, 8, dtype=torch.float8_e4m3fn)},
        {},
        TypeError,
        r"q must be a floating-point tensor \(float64, .*\), got dtype torch.float8_e4m3fn",
    ),
    (
        "dtype_mismatch",
        {"v": torch.randn(2, 2, 6, 3, dtype=torch.float64)},
        {},
        TypeError,
        r"q, k and v must share one dtype; got q torch.float32, k torch.float32, v torch.float64",
    ),
    (
        "device_mismatch",
        {"v": torch.randn(2, 2, 6, 3, device="meta")},
        {},
        ValueError,
        r"q, k and v must be on one device; got q cpu, k cpu, v meta",
    ),
    (
        "gqa",
        {"k": torch.randn(2, 3, 6, 8), "v": torch.randn(2, 3, 6, 3)},
        {},
        ValueError,
        r"query heads must be a multiple of key/value heads \(GQA\); got q heads 4 and k/v heads 3",
    ),
    (
        "kv_length",
        {"v": torch.randn(2, 2, 7, 3)},
        {},
        ValueError,
        r"k and v must have the same heads and length .* got k \(2, 2, 6, 8\) and v \(2, 2, 7, 3\)",
    ),
    (
        "head_dim",
        {"k": torch.randn(2, 2, 6, 9)},
        {},
        ValueError,
        r"q and k must have the same head dim E",
    ),
    (
        "batch",
        {"k": torch.randn(3, 2, 6, 8), "v": torch.randn(3, 2, 6, 3)},
        {},
        ValueError,
        r"batch sizes of q, k, v must match or be 1; got \[2, 3, 3\]",
    ),
    (
        "score_name",
        {"score": "additive"},
        {"score": "cosine"},
        ValueError,
        r"score='additive' is not a known score; expected one of 'dot', 'cosine'",
    ),
    (
        "normalize_name",
        {"normalize": "softermax"},
        {"normalize": "entmax15"},
        ValueError,
        r"normalize='softermax' is not a known normalizer; expected one of 'softmax'",
    ),
    (
        "engine_name",
        {"engine": "flash"},
        {"engine": "reference"},
        ValueError,
        r"engine='flash' is not a known engine; expected one of 'reference', 'sdpa'",
    ),
    (
        "scale_nan",
        {"scale": float("nan")},
        {"scale": 0.5},
        ValueError,
        r"scale must be finite, got nan",
    ),
    (
        "scale_type",
        {"scale": "0.1"},
        {"scale": 1},
        TypeError,
        r"scale must be a finite float or None, got str",
    ),
    (
        "dropout",
        {"dropout_p": 1.0},
        {"dropout_p": 0.5},
        ValueError,
        r"dropout_p must be in \[0, 1\), got 1.0",
    ),
    (
        "flag",
        {"return_weights": 1},
        {"return_weights": True},
        TypeError,
        r"return_weights must be a bool, got int",
    ),
    (
        "lse_sparse",
        {"return_lse": True, "normalize": "sparsemax"},
        {"return_lse": True, "normalize": "softmax"},
        ValueError,
        r"return_lse=True needs normalize='softmax'",
    ),
    (
        "mask_float_tensor",
        {"mask": torch.zeros(5, 6)},
        {"mask": torch.ones(5, 6).bool()},
        TypeError,
        r"mask= got a tensor of dtype torch.float32; masks are bool tensors",
    ),
    (
        "mask_shape",
        {"mask": torch.ones(4, 6).bool()},
        {"mask": torch.ones(5, 6).bool()},
        ValueError,
        r"mask tensor of shape \(1, 1, 4, 6\) does not broadcast to \(B, H, Lq, Lk\)",
    ),
    (
        "mask_type",
        {"mask": "causal"},
        {"mask": M.causal()},
        TypeError,
        r"mask= expects an attnlab.masks.Mask, a bool tensor or None, got str",
    ),
    (
        "padding_batch",
        {"mask": M.padding([3, 4, 5])},
        {"mask": M.padding([3, 4])},
        ValueError,
        r"mask=padding\(...\) holds 3 lengths but the batch size is 2",
    ),
    (
        "documents_len",
        {"mask": M.documents([0, 0, 1])},
        {"mask": M.documents([0] * 6)},
        ValueError,
        r"doc_ids of length 3 but the call has Lq=5, Lk=6",
    ),
    (
        "bias_heads",
        {"bias": B.alibi(8)},
        {"bias": B.alibi(4)},
        ValueError,
        r"bias=alibi\(num_heads=8\) has 8 heads but the query has 4 heads",
    ),
    (
        "bias_bool",
        {"bias": torch.ones(5, 6).bool()},
        {"bias": torch.ones(5, 6)},
        TypeError,
        r"boolean tensors are masks",
    ),
    (
        "zero_heads",
        {"q": torch.randn(2, 0, 5, 8), "k": torch.randn(2, 0, 6, 8), "v": torch.randn(2, 0, 6, 3)},
        {},
        ValueError,
        r"q and k/v must have at least 1 head each \(only the batch and the lengths may be "
        r"0, for an empty output\); got q heads 0 and k/v heads 0",
    ),
    (
        "zero_query_heads",
        {"q": torch.randn(2, 0, 5, 8)},
        {},
        ValueError,
        r"q and k/v must have at least 1 head each .* got q heads 0 and k/v heads 2",
    ),
    (
        "zero_kv_heads",
        {"k": torch.randn(2, 0, 6, 8), "v": torch.randn(2, 0, 6, 3)},
        {},
        ValueError,
        r"q and k/v must have at least 1 head each .* got q heads 4 and k/v heads 0",
    ),
    (
        "custom_mask_shape",
        {"mask": M.custom(lambda b, h, q, k: torch.ones(3, dtype=torch.bool))},
        {"mask": M.custom(lambda b, h, q, k: torch.ones(6, dtype=torch.bool))},
        ValueError,
        r"mask=custom\(<lambda>\): fn returned shape \(3,\), expected a bool tensor "
        r"broadcastable to \(2, 4, 5, 6\) \(batch, heads, queries, keys\)",
    ),
    (
        "custom_mask_none",
        {"mask": M.custom(lambda b, h, q, k: None)},  # type: ignore[arg-type,return-value]
        {"mask": M.custom(lambda b, h, q, k: k <= q)},
        TypeError,
        r"mask=custom\(<lambda>\): custom mask fn must return a bool tensor, got NoneType",
    ),
    (
        "custom_bias_none",
        {"bias": B.custom(lambda h, q, k: None)},  # type: ignore[arg-type,return-value]
        {"bias": B.custom(lambda h, q, k: 0.5)},
        TypeError,
        r"bias=custom\(fn=.*\): fn returned NoneType, expected a float tensor or a Python number",
    ),
    (
        "custom_bias_shape",
        {"bias": B.custom(lambda h, q, k: torch.zeros(3))},
        {"bias": B.custom(lambda h, q, k: torch.zeros(6))},
        ValueError,
        r"bias=custom\(fn=.*\): fn returned shape \(3,\), expected a shape broadcastable to "
        r"\(1, 4, 5, 6\)",
    ),
    (
        "bias_shape",
        {"bias": torch.ones(5, 7)},
        {"bias": torch.ones(5, 6)},
        ValueError,
        r"bias=tensor\(shape=\(5, 7\)\) does not fit .* its lk size is 7, expected 1 or 6",
    ),
]


@pytest.mark.parametrize("bad,fixed,exc,pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_named(
    bad: dict[str, Any], fixed: dict[str, Any], exc: type[Exception], pattern: str
) -> None:
    with pytest.raises(exc, match=pattern):
        _call(**bad)
    out = _call(**fixed)  # positive control
    out = out.out if isinstance(out, attnlab.AttentionOutput) else out
    assert out.shape == (2, 4, 5, 3) and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "make,exc,pattern",
    [
        (lambda: M.window(-1), ValueError, r"left must be a non-negative int, got -1"),
        (lambda: M.window(2, -3), ValueError, r"right must be a non-negative int, got -3"),
        (lambda: M.window(1.5), TypeError, r"left must be an int, got float 1.5"),
        (lambda: M.dilated(4, 0), ValueError, r"dilation must be a positive int, got 0"),
        (lambda: M.prefix(-2), ValueError, r"n must be a non-negative int, got -2"),
        (lambda: M.padding([1.5, 2.0]), TypeError, r"key_lengths must hold integers"),
        (lambda: M.padding([-1, 2]), ValueError, r"key_lengths must be >= 0, got \[-1, 2\]"),
        (lambda: M.block_random(0, 1), ValueError, r"block_size must be a positive int, got 0"),
    ],
)
def test_bad_mask_arguments(make: Any, exc: type[Exception], pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        make()
    assert M.window(1).dense(3, 3).sum() == 5  # positive control: a valid mask builds


def test_sdpa_named_for_unsupported_request_says_who_can() -> None:
    args = _good()
    with pytest.raises(
        ValueError,
        match=r"engine='sdpa' cannot compute this request: torch "
        r"SDPA normalizes with softmax only, not 'sparsemax'\. Engines that "
        r"can: 'reference'",
    ):
        attnlab.attention(args["q"], args["k"], args["v"], normalize="sparsemax", engine="sdpa")
    out = attnlab.attention(args["q"], args["k"], args["v"], engine="sdpa")
    assert isinstance(out, torch.Tensor) and out.shape == (2, 4, 5, 3)


def test_attend_with_zero_heads_is_named() -> None:
    """attend() answers zero heads as attention() does (it returned an empty output for
    0 score heads and 2 value heads)."""
    scores, v = torch.randn(2, 0, 5, 6), torch.randn(2, 2, 6, 3)
    with pytest.raises(
        ValueError,
        match=r"scores and v must have at least 1 head each .* got scores heads 0 and v heads 2",
    ):
        attnlab.attend(scores, v)
    out = attnlab.attend(torch.zeros(2, 4, 5, 6), v)  # positive control: 4 heads, uniform
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(
        out, v.mean(2, keepdim=True).repeat_interleave(2, 1).expand(2, 4, 5, 3)
    )


def test_attend_names_the_layout_of_scores() -> None:
    """Scores of the wrong rank were told the layout of q, k and v, "(B, H, L, E)"."""
    v = torch.randn(1, 1, 5, 4)
    for bad, seen in ((torch.randn(1, 3, 5), r"\(1, 3, 5\)"), ([[1.0]], "list")):
        with pytest.raises(
            (ValueError, TypeError), match=rf"scores must .*\(B, Hq, Lq, Lk\).*{seen}"
        ):
            attnlab.attend(bad, v)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"v must have shape \(B, H, L, E\)"):  # v's is
        attnlab.attend(torch.randn(1, 1, 3, 5), v[0])
    assert attnlab.attend(torch.randn(1, 1, 3, 5), v).shape == (1, 1, 3, 4)  # the control
