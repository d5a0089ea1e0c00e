"""The Flex engine: torch's FlexAttention, compiled, for masked attention on a GPU.

attnlab's masks and biases are already functions of ``(batch, head, query, key)``
coordinates, which is FlexAttention's ``mask_mod`` / ``score_mod`` contract, so this
engine hands them over as they are: the mask as ``mask_mod`` (query positions aligned
bottom-right, as everywhere in attnlab), soft-capping and a constant bias (ALiBi, a
tensor bias) as ``score_mod``. The block mask, the list of 128 x 128 tiles to compute,
comes from the mask's own :meth:`~attnlab.masks.Mask.block_layout` (interval masks in
``O(L + tiles)``, without evaluating a single pair), so FlexAttention skips every empty
tile, forward and backward, and evaluates the mask only on partial tiles.

On the CPU, FlexAttention has no backward: this engine serves CPU calls that need no
gradient when named, and ``auto`` never picks it there (the blocked engine's kernel does
that work). On a CUDA device ``auto`` picks it where the blocked engine would be picked
on the CPU: calls of at least 512 x 512 whose mask leaves at most 60% of the tiles, and
calls with soft-capping, attention sinks or the logsumexp, which torch SDPA cannot do.
Sinks join the softmax after FlexAttention, through its logsumexp (:func:`with_sinks`),
which FlexAttention differentiates, so the inputs' gradients and the sinks' own are exact.

Example:
    >>> import torch, attnlab
    >>> from attnlab import masks
    >>> q = k = v = torch.randn(1, 2, 256, 64)
    >>> out = attnlab.attention(q, k, v, mask=masks.causal() & masks.window(32),
    ...                         engine="flex", engine_options={"compile": False})
    >>> ref = attnlab.attention(q, k, v, mask=masks.causal() & masks.window(32),
    ...                         engine="reference")
    >>> bool((out - ref).abs().max() < 1e-5)
    True
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import sys
from collections.abc import Callable, Mapping
from typing import Any, cast

import torch
from torch import Tensor

from attnlab._devices import to_device
from attnlab._eager import vmapping
from attnlab.bias.base import Bias
from attnlab.bias.function import CustomBias
from attnlab.engines._far import far_rows
from attnlab.engines._memo import LastMask
from attnlab.engines.base import AttentionRequest, Engine, EngineResult, with_sinks
from attnlab.engines.blocked import _normalized
from attnlab.engines.flex_mods import finite_lse, mask_mod, moved, score_mod
from attnlab.masks.base import And, Mask, Or, Wrapped
from attnlab.masks.custom import Custom
from attnlab.masks.layout import TileState
from attnlab.masks.sparse import BlockRandom, GlobalTokens

__all__ = [
    "FlexEngine",
    "compile_options",
    "cpu_compile_problem",
    "flex_available",
    "room_to_compile",
]

BLOCK = 128  # FlexAttention's default sparse block size
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def flex_available() -> bool:
    """Whether this torch has FlexAttention (``torch.nn.attention.flex_attention``)."""
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def cpu_compile_problem() -> str | None:
    """Why torch cannot compile FlexAttention for this process's CPU, or None if it can:
    its CPU template needs AVX2 or AVX-512 in use (not ``ATEN_CPU_CAPABILITY=default``, nor
    an ARM CPU), and neither macOS nor an Intel GPU (XPU) in the process; otherwise
    compiling fails deep inside inductor ("torch.compile on current platform is not
    supported for CPU").

    Example:
        >>> problem = cpu_compile_problem()
        >>> problem is None or problem.startswith("torch compiles FlexAttention")
        True
    """
    cap = torch.backends.cpu.get_cpu_capability()
    if cap not in ("AVX2", "AVX512"):
        return (
            "torch compiles FlexAttention for the CPU only where it runs AVX2 or AVX-512, "
            f"and this process runs {cap}"
        )
    if sys.platform == "darwin" or torch.xpu.is_available():
        where = "macOS" if sys.platform == "darwin" else "a process with an Intel GPU (XPU)"
        return f"torch compiles FlexAttention for the CPU, but not on {where}"
    return None


class FlexEngine(Engine):
    """torch FlexAttention (compiled) with attnlab's masks as its block mask and
    ``mask_mod``; on CUDA forward and backward, on the CPU forward only.

    Example:
        >>> from attnlab import masks
        >>> q = torch.zeros(1, 2, 4, 16)
        >>> req = AttentionRequest(q, q, q, masks.window(1), None, 0.25, "dot", "softmax", 0.0,
        ...                        return_weights=True, return_lse=False)
        >>> FlexEngine().unsupported(req)  # engine="auto" routes such calls elsewhere
        'FlexAttention does not return attention weights (return_weights=True)'
        >>> FlexEngine().check_options({"compile": "yes"})
        Traceback (most recent call last):
        ...
        TypeError: engine_options['compile'] must be a bool, got 'yes'
    """

    name = "flex"
    exact = True
    summary = (
        "dot/cosine score, softmax, any mask, soft-capping, constant biases (ALiBi), GQA; "
        "skips empty 128x128 tiles fwd+bwd via torch FlexAttention (compiled); "
        "CUDA: also sinks, lse, backward; CPU: forward only, sinks and lse only with "
        "engine_options={'compile': False}; no weights, dropout"
    )
    options = ("compile",)
    passes_plain = True  # prefers() is False without a mask or soft-capping

    def __init__(self) -> None:
        self._last: LastMask[tuple[Any, float]] = LastMask(strong=True)  # see _block_mask

    def check_option_values(self, options: Mapping[str, object]) -> None:
        if "compile" in options and not isinstance(options["compile"], bool):
            got = options["compile"]
            raise TypeError(f"engine_options['compile'] must be a bool, got {got!r}")

    def unsupported(self, req: AttentionRequest) -> str | None:
        if not flex_available():
            return "this torch has no FlexAttention (torch.nn.attention.flex_attention)"
        if req.score not in ("dot", "cosine"):
            return f"FlexAttention here computes dot and cosine scores, not {req.score!r}"
        if req.normalize != "softmax":
            return f"FlexAttention normalizes with softmax only, not {req.normalize!r}"
        if req.dropout_p:
            return "FlexAttention has no dropout (dropout_p > 0)"
        if req.return_weights:
            return "FlexAttention does not return attention weights (return_weights=True)"
        if _learnable(req.bias):
            return "the flex engine has no gradient for a learnable bias (one requires grad)"
        if vmapping():  # compiled or not, torch failed "when making fake tensor call"
            return "FlexAttention does not run under torch.func.vmap"
        return self._unsupported_inputs(req)

    def _unsupported_inputs(self, req: AttentionRequest) -> str | None:
        q, v, grad = req.q, req.v, req.needs_grad
        if q.device.type != "cuda" and grad:
            return f"FlexAttention has no backward on {q.device.type}; it has one on CUDA"
        if q.device.type == "cpu" and req.options.get("compile", True):
            if req.return_lse or req.sinks is not None:
                return (
                    "FlexAttention compiled for the CPU does not return the logsumexp "
                    "(return_lse, or sinks, which are joined through it); "
                    "engine_options={'compile': False} runs it uncompiled"
                )
            if _holds(req.mask, GlobalTokens):
                return (
                    "torch's CPU compiler fails on a global-token mask in FlexAttention "
                    "(torch.isin); engine_options={'compile': False} runs it uncompiled"
                )
            problem = cpu_compile_problem()
            if problem is not None:
                return f"{problem}; engine_options={{'compile': False}} runs it uncompiled"
        if q.dtype not in _DTYPES:
            return f"FlexAttention here runs float32, bfloat16 and float16, not {q.dtype}"
        e = q.shape[-1]
        if e < 16 or e & (e - 1) or v.shape[-1] != e:
            return (
                f"FlexAttention here needs one power-of-two head size >= 16, got {e}/{v.shape[-1]}"
            )
        if 0 in (req.batch, req.lq, req.lk):
            return "FlexAttention does not accept empty batches or sequences"
        return far_rows(req, "FlexAttention's backward")

    def prefers(self, req: AttentionRequest) -> bool:
        """On CUDA, calls of at least 512 x 512 with soft-capping, sinks or the logsumexp,
        or with a mask that leaves at most 60% of the tiles (below that, or for dense and
        causal, SDPA is as fast)."""
        if req.q.device.type != "cuda" or req.lq * req.lk < 1 << 18 or _unproven(req):
            return False
        if req.softcap is not None or req.sinks is not None or req.return_lse:
            return True  # SDPA cannot; the blocked engine's blocks run in eager torch here
        if req.mask is None or (req.mask.is_causal and req.bias is None):
            return False
        return self._block_mask(req)[1] < 0.6

    def forward(self, req: AttentionRequest) -> EngineResult:
        from torch.nn.attention.flex_attention import flex_attention

        if not req.needs_grad and req.q.device.type != "cuda":  # (under no_grad, inputs that
            # want grad: torch's CPU FlexAttention refused them, "does not support backward")
            req = dataclasses.replace(req, q=req.q.detach(), k=req.k.detach(), v=req.v.detach())
        if req.score == "cosine":
            req = _normalized(req)
        compiled = req.options.get("compile", True)
        fn = _compiled(req.q.device) if compiled else cast(Callable[..., Any], flex_attention)
        block_mask = None if req.mask is None else self._block_mask(req)[0]
        with room_to_compile() if compiled else contextlib.nullcontext():
            res = fn(
                req.q,
                req.k,
                req.v,
                score_mod=score_mod(req),
                block_mask=block_mask,
                scale=req.scale,
                enable_gqa=req.heads != req.k.shape[1],
                **_lse_request(req.return_lse or req.sinks is not None),
            )
        if not (req.return_lse or req.sinks is not None):
            return res, None, None
        out, aux = res
        lse = aux if isinstance(aux, Tensor) else aux.lse  # (B, Hq, Lq), natural log, fp32
        lse = finite_lse(lse, req)  # (rows past finfo.max in base 2 came back -inf)
        out, lse = with_sinks(out, lse, req.sinks)  # FlexAttention differentiates its lse
        return out, None, lse.to(req.q.dtype) if req.return_lse else None

    def _block_mask(self, req: AttentionRequest) -> tuple[Any, float]:
        """The request's FlexAttention block mask and the fraction of tiles it computes,
        memoized for the last mask, sizes and versions of the tensors it holds (a model's
        layers share one mask per forward; :class:`LastMask`). The mask is held, not
        weakly: a decoder stack's ``causal() & mask`` lives only through its forward, and
        where the block mask holds a moved copy (its tensors on CUDA) nothing else kept
        it, so each forward built again (2 host-device syncs per forward on an H200). The
        key takes the versions after building: building may make tensors the mask keeps
        (block_random draws its table for the length then), and a key from before never
        matched again."""
        mask = req.mask
        assert mask is not None
        sizes = (req.lq, req.lk, req.batch, req.heads, req.q.device)
        return self._last.get(mask, sizes, lambda: block_mask(mask, req))


def block_mask(mask: Mask, req: AttentionRequest) -> tuple[Any, float]:
    """FlexAttention's ``BlockMask`` for ``mask`` on ``req``'s sizes, built from the
    mask's 128 x 128 tile layout, and the fraction of tiles it computes."""
    from torch.nn.attention.flex_attention import BlockMask

    layout = mask.block_layout(
        req.lq, req.lk, BLOCK, BLOCK, batch=req.batch, heads=req.heads, device="cpu"
    )
    states = to_device(layout.states, req.q.device)  # (Bm, Hm, nQ, nK), not blocking
    partial, full = (_ordered(states == int(s)) for s in (TileState.PARTIAL, TileState.FULL))
    bm = BlockMask.from_kv_blocks(
        *partial,
        *full,
        BLOCK_SIZE=BLOCK,
        mask_mod=mask_mod(moved(mask, req.q.device), req.lq, req.lk),
        seq_lengths=(req.lq, req.lk),
    )
    return bm, layout.computed_fraction


def _ordered(sel: Tensor) -> tuple[Tensor, Tensor]:
    """Per query block, how many key blocks ``sel`` (``(..., nQ, nK)`` bool) selects, and
    their indices first in ascending order: FlexAttention's ``(num_blocks, indices)``."""
    counts = sel.sum(-1, dtype=torch.int32)  # (..., nQ)
    order = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True)  # selected first
    return counts, order.to(torch.int32).contiguous()


def _lse_request(wanted: bool) -> dict[str, Any]:
    """The keyword that asks FlexAttention for the logsumexp: ``return_aux`` where this
    torch has it (``return_lse`` is deprecated there), else ``return_lse``."""
    if not wanted:
        return {}
    from torch.nn.attention import flex_attention as fa

    aux = getattr(fa, "AuxRequest", None)
    return {"return_lse": True} if aux is None else {"return_aux": aux(lse=True)}


def _learnable(bias: Bias | None) -> bool:
    """Whether autograd would need a gradient for one of ``bias``'s tensors."""
    if bias is None or not torch.is_grad_enabled():
        return False
    return any(t.requires_grad for t in itertools.chain(bias.parameters(), bias.buffers()))


def _unproven(req: AttentionRequest) -> bool:
    """Whether the request holds a mask ``auto`` does not hand to FlexAttention (naming
    ``engine="flex"`` does): a user's mask or bias function, which may not trace under
    torch.compile, or random blocks, whose moved table has not yet run on a GPU."""
    return _holds(req.mask, (Custom, BlockRandom)) or isinstance(req.bias, CustomBias)


def _holds(mask: Mask | None, kinds: type | tuple[type, ...]) -> bool:
    """Whether ``mask`` is, or combines, a mask of one of ``kinds``."""
    stack: list[Mask] = [] if mask is None else [mask]
    while stack:
        m = stack.pop()
        if isinstance(m, kinds):
            return True
        if isinstance(m, (And, Or)):
            stack.extend(m.parts)
        elif isinstance(m, Wrapped):
            stack.append(m.inner)
    return False


#: compilations of FlexAttention per process that this engine allows (torch.compile's
#: default is 8 per function; the engine's are its own, see :func:`_compiled`): one per
#: mask kind, bias, soft-cap, dtype, grad mode and shape kind. Past it, torch runs the
#: uncompiled FlexAttention, which materializes the scores: seen on an H200 as a 30x
#: slowdown in a benchmark process that had compiled 8 cases.
RECOMPILE_LIMIT = 64


def room_to_compile() -> contextlib.AbstractContextManager:
    """torch.compile's recompile limit raised to :data:`RECOMPILE_LIMIT` for one call."""
    import torch._dynamo.config as dynamo

    name = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
    limit = max(getattr(dynamo, name), RECOMPILE_LIMIT)
    return dynamo.patch(**{name: limit})


_COMPILED: dict[str, Callable[..., Any]] = {}  # device type -> compiled


def compile_options(device: torch.device | str = "cpu") -> dict[str, Any]:
    """``torch.compile`` options for ``device`` that pin inductor's CPU vector width to the
    one this process picks, so that it is part of inductor's cache key.

    Inductor picks its CPU instruction set from ``ATEN_CPU_CAPABILITY`` (and the CPU), but
    its FX graph cache key leaves the choice out: a graph cached under AVX-512 and loaded
    under ``ATEN_CPU_CAPABILITY=avx2`` (or the other way) returned wrong attention (off by
    2.7-4.4; plain PyTorch's float32 error was 8e-7). With the width named in the options
    the two get different keys. Empty for a GPU (finding the width runs inductor's CPU
    probe: about 1 s, 7 s the first time on a machine), where inductor vectorizes nothing,
    or where the width is already set.

    Example:
        >>> opts = compile_options()
        >>> opts == {} or opts["cpp.simdlen"] in (128, 256, 512)
        True
        >>> compile_options("cuda")
        {}
    """
    from torch._inductor import config
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    if torch.device(device).type != "cpu" or config.cpp.simdlen is not None:
        return {}
    isa = pick_vec_isa()
    return {"cpp.simdlen": isa.bit_width()} if isa else {}


def _compiled(device: torch.device) -> Callable[..., Any]:
    """``flex_attention`` compiled with :func:`compile_options` for ``device``, made once
    per process and device type, through a function of the engine's own.

    torch.compile keeps its compilations, and counts them against its limit, per code
    object: compiling ``flex_attention`` itself shared them with every other caller in the
    process. After two engine calls a user's own ``torch.compile(flex_attention)(q, k, v)``
    failed inside dynamo (AttributeError: 'NoneType' object has no attribute
    'q_indices'), and the engine's compilations used up the user's 8.
    """
    if device.type not in _COMPILED:
        from torch.nn.attention.flex_attention import flex_attention

        def engines_flex_attention(*args: Any, **kwargs: Any) -> Any:
            return flex_attention(*args, **kwargs)  # traced through: one graph

        options = compile_options(device)
        _COMPILED[device.type] = torch.compile(
            engines_flex_attention, dynamic=False, options=options
        )
    return _COMPILED[device.type]
