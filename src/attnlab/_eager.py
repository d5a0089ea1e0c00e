"""attnlab under torch's transforms: what ``torch.compile`` leaves to run as written, and
whether ``torch.func.vmap`` is running the caller.

attnlab plans each attention call in Python from the values of its mask (row spans, the
tiles to skip, plans cached by the mask object). Traced by dynamo, that planning broke
the graph at each read and, on the blocked engine, failed in inductor or indexed out of
bounds; run as written, the call is one graph break and exactly the uncompiled call.
Under vmap a tensor has one value per vmapped item and none can be read (``bool()``
raises), so the engines read none there (:func:`vmapping`).
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
import types
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar, cast

import torch
import torch.autograd.forward_ad as fwAD
from torch._C._functorch import TransformType, get_interpreter_stack
from torch.autograd.function import once_differentiable

__all__ = [
    "PLANS",
    "as_written",
    "autocast_dtype",
    "compiling",
    "differentiating_twice",
    "exporting",
    "first_order_only",
    "forward_mode",
    "higher_order",
    "no_autocast",
    "no_forward_mode",
    "refuse_second_order",
    "unreadable",
    "vmapping",
]

#: why attnlab's attention calls run as written
PLANS = "attnlab plans each call from its mask's values in Python"

_P = ParamSpec("_P")
_R = TypeVar("_R")


def as_written(reason: str) -> Callable[[Callable[_P, _R]], Callable[_P, _R]]:
    """A decorator: ``torch.compiler.disable`` with ``reason``, keeping the signature's
    types (torch's own decorator is untyped), and without importing dynamo (0.8 s of
    ``import attnlab``) before something compiles.

    Example:
        >>> @as_written("reads its argument's values")
        ... def first(x: torch.Tensor) -> int:
        ...     return int(x[0])
        >>> torch.compile(lambda x: first(x) + 1)(torch.tensor([41]))
        42
    """

    def decorate(fn: Callable[_P, _R]) -> Callable[_P, _R]:
        if _SKIP is None:  # a torch without the frame switch: disable at once
            return cast(Callable[_P, _R], torch.compiler.disable(fn, reason=reason))
        disabled: list[Callable[_P, _R]] = []

        def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            if "torch._dynamo" not in sys.modules:  # nothing can be compiling
                return fn(*args, **kwargs)
            if not disabled:
                disabled.append(torch.compiler.disable(fn, reason=reason))
            return disabled[0](*args, **kwargs)

        functools.update_wrapper(run, fn)
        # the marks torch.compiler.disable leaves: dynamo breaks the graph at `run` and
        # calls it; `run`'s own frame is never traced (_SKIP), the disabled `fn` neither.
        # Not its orig_callable/wrapper_id: torch.compile(run) followed them to the bare
        # `fn` and traced it (window, documents: "vr must not be None", bad indices)
        marks = {"disable": True, "disable_msg": reason, "disable_recursive": True}
        for key, value in marks.items():
            setattr(run, f"_torchdynamo_{key}", value)
        _SKIP(run.__code__)
        return run

    return decorate


def _frame_skipper() -> Callable[[types.CodeType], None] | None:
    """What marks a code object's frames as never traced by dynamo (its ``skip_code``),
    from torch's C module, which imports no dynamo; None where this torch lacks it."""
    try:
        from torch._C._dynamo import eval_frame as ef

        strategy = ef._FrameExecStrategy(ef._FrameAction.SKIP, ef._FrameAction.DEFAULT)
    except (ImportError, AttributeError, TypeError):
        return None
    return lambda code: ef.set_code_exec_strategy(code, strategy)


_SKIP = _frame_skipper()


def vmapping() -> bool:
    """Whether ``torch.func.vmap`` (also inside ``jacrev``) runs the caller:
    then no tensor value can be read, and whatever an engine would decide from one it
    must decide without it.

    Example:
        >>> vmapping(), bool(torch.func.vmap(lambda x: torch.tensor(vmapping()))(torch.ones(2))[0])
        (False, True)
    """
    stack = get_interpreter_stack()
    return bool(stack) and any(i.key() == TransformType.Vmap for i in stack)


def _traced_here() -> bool:
    """Whether a tracer runs in this thread: dynamo traces the caller (then
    ``is_dynamo_compiling`` is a constant True), or a tracing context or fake mode, both
    thread-local, is active (torch.export's make_fx, AOT autograd)."""
    if torch.compiler.is_dynamo_compiling():
        return True
    from torch._guards import TracingContext, detect_fake_mode

    return TracingContext.try_get() is not None or detect_fake_mode() is not None


def exporting() -> bool:
    """Whether ``torch.export`` traces this call. ``torch.compiler.is_exporting()`` alone
    is process-wide: set for a whole export in whatever thread, it made eager calls in
    other threads skip their NaN screens and argument checks; it is the cheap first
    test, and the thread's own tracing state decides.

    Example:
        >>> exporting()
        False
    """
    return torch.compiler.is_exporting() and _traced_here()


def compiling() -> bool:
    """Whether ``torch.compile`` or ``torch.export`` traces this call, in this thread
    (``torch.compiler.is_compiling()`` is process-wide: see :func:`exporting`).

    Example:
        >>> compiling()
        False
    """
    return torch.compiler.is_compiling() and _traced_here()


def unreadable(t: torch.Tensor) -> bool:
    """Whether no value of ``t`` can be read here: while exporting, under vmap, or on the
    meta device (shapes only: ``bool()`` raises, as it does under vmap).

    Example:
        >>> unreadable(torch.ones(1)), unreadable(torch.ones(1, device="meta"))
        (False, True)
    """
    return t.is_meta or exporting() or vmapping()


def differentiating_twice() -> bool:
    """Whether two ``torch.func`` differentiation levels run the caller (``grad`` of
    ``grad``, a Hessian, MAML's outer step): a backward that is not differentiable itself
    must refuse, since torch.func differentiates it silently as a constant.

    Example:
        >>> differentiating_twice()
        False
    """
    stack = get_interpreter_stack()
    if not stack:  # (every eager call: no generator to build)
        return False
    return sum(i.key() in (TransformType.Grad, TransformType.Jvp) for i in stack) > 1


def first_order_only(what: str, instead: str) -> Callable[[Callable[..., _R]], Callable[..., _R]]:
    """A decorator for an autograd Function's ``backward`` (static or class method): it
    runs ``once_differentiable``, raises (naming ``what`` and ``instead``) under two
    ``torch.func`` differentiation levels, and, under autograd's ``create_graph=True``,
    marks the gradients it returns so that differentiating them raises, whether the path
    runs through the saved inputs or only through the upstream gradient. Plain
    ``once_differentiable`` marks them only when the upstream gradient wants grad, so a
    loss linear in the output got a second-order gradient that silently left out the
    backward's own dependence on the inputs (1970 off where the largest entry is 1993).

    Example:
        >>> class Cube(torch.autograd.Function):
        ...     @staticmethod
        ...     def forward(ctx, x):
        ...         ctx.save_for_backward(x)
        ...         return x**3
        ...     @staticmethod
        ...     @first_order_only("Cube", "x**3")
        ...     def backward(ctx, g):
        ...         return 3 * ctx.saved_tensors[0] ** 2 * g
        >>> x = torch.tensor(2.0, requires_grad=True)
        >>> (g,) = torch.autograd.grad(Cube.apply(x), x, create_graph=True)
        >>> g.item()
        12.0
        >>> try:
        ...     g.backward()
        ... except RuntimeError as e:
        ...     print(str(e).split(" (")[0])
        a second-order gradient
    """
    msg = _second_order(what, instead)

    def decorate(fn: Callable[..., _R]) -> Callable[..., _R]:
        inner = once_differentiable(fn)

        @functools.wraps(fn)
        def backward(*args: Any) -> _R:
            ctx = args[1] if isinstance(args[0], type) else args[0]  # (cls,) ctx, *grads
            if differentiating_twice():
                raise RuntimeError(msg)
            create_graph = torch.is_grad_enabled() and not get_interpreter_stack()
            if not create_graph or not any(ctx.needs_input_grad):
                return inner(*args)
            saved = ctx.saved_tensors  # unpacked once (non-reentrant checkpointing)
            lead = 0 if args[0] is ctx else 1  # a classmethod's cls comes before ctx
            grads = tuple(g for g in args[lead + 1 :] if isinstance(g, torch.Tensor))
            with torch.no_grad():
                outputs = fn(*args[:lead], _Unpacked(ctx, saved), *args[lead + 1 :])
            return cast(_R, _refusing(outputs, saved + grads, msg))

        return backward

    return decorate


def _second_order(what: str, instead: str) -> str:
    """The refusal of a second-order gradient through ``what``, pointing at ``instead``."""
    return (
        "a second-order gradient (create_graph=True, grad of grad, a Hessian, MAML's outer "
        f"step) through {what}: its backward is not differentiable; {instead}"
    )


def forward_mode(*ts: torch.Tensor) -> bool:
    """Whether forward-mode AD runs through the caller: ``torch.func.jvp`` (``jacfwd``,
    ``hessian``) on the transform stack, or a dual tensor of ``torch.autograd.forward_ad``
    among ``ts``.

    Example:
        >>> x = torch.ones(2)
        >>> with fwAD.dual_level():
        ...     forward_mode(x), forward_mode(fwAD.make_dual(x, torch.ones(2)))
        (False, True)
    """
    stack = get_interpreter_stack()
    if stack and any(i.key() == TransformType.Jvp for i in stack):
        return True
    if getattr(fwAD, "_current_level", 0) < 0:  # no dual level open: no tangent anywhere
        return False
    return any(fwAD.unpack_dual(t).tangent is not None for t in ts)


def no_forward_mode(what: str, instead: str) -> Callable[..., Any]:
    """An autograd Function's ``jvp`` for one without a forward-mode derivative: it raises
    naming ``what`` and ``instead`` (torch's own error named neither: "You must implement
    the jvp function for custom autograd.Function").

    Example:
        >>> class Twice(torch.autograd.Function):
        ...     forward = staticmethod(lambda ctx, x: 2 * x)
        ...     jvp = staticmethod(no_forward_mode("Twice", "use 2 * x"))
        >>> try:
        ...     with fwAD.dual_level():
        ...         Twice.apply(fwAD.make_dual(torch.ones(1), torch.ones(1)))
        ... except RuntimeError as e:
        ...     print(str(e).split(" (")[0])
        forward-mode AD
    """

    def jvp(ctx: Any, *tangents: Any) -> Any:
        raise RuntimeError(
            "forward-mode AD (torch.func.jvp, jacfwd, torch.autograd.forward_ad dual "
            f"tensors) through {what}: it has no forward-mode derivative; {instead}"
        )

    return jvp


def higher_order(*ts: torch.Tensor) -> bool:
    """Whether a call must serve more than a first-order backward, as far as its forward
    can tell: :func:`differentiating_twice` or :func:`forward_mode` (``create_graph=True``
    shows only in the backward: :func:`refuse_second_order`).

    Example:
        >>> higher_order(torch.ones(1))
        False
    """
    return differentiating_twice() or forward_mode(*ts)


def refuse_second_order(node: Any, what: str, instead: str) -> None:
    """Have autograd ``node`` (a kernel's backward with no derivative of its own) return
    gradients whose differentiation raises, naming ``what`` and ``instead``, when it runs
    under ``create_graph=True``; a first-order backward gets its gradients as they were.

    Example:
        >>> x = torch.ones(2, requires_grad=True)
        >>> y = x.exp()
        >>> refuse_second_order(y.grad_fn, "exp", "use something else")
        >>> (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
        >>> try:
        ...     g.sum().backward()
        ... except RuntimeError as e:
        ...     print(str(e).split(" (")[0])
        a second-order gradient
    """
    msg = _second_order(what, instead)

    def hook(grads_in: tuple[Any, ...], grads_out: tuple[Any, ...]) -> Any:
        if not torch.is_grad_enabled() or get_interpreter_stack():
            return None  # first order (torch.func's levels: differentiating_twice)
        read = tuple(g for g in (*grads_in, *grads_out) if isinstance(g, torch.Tensor))
        return _refusing(tuple(grads_in), read, msg)

    node.register_hook(hook)


class _Unpacked:
    """A backward's ``ctx`` whose saved tensors were already unpacked."""

    def __init__(self, ctx: Any, saved: tuple[torch.Tensor, ...]) -> None:
        self._ctx, self.saved_tensors = ctx, saved

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ctx, name)


class _Refuse(torch.autograd.Function):
    """The gradients a backward returned, tied to the inputs it read (its saved tensors
    and the incoming gradients): differentiating them raises (``once_differentiable``'s
    marker hangs off fresh leaves, which ``torch.autograd.grad(..., inputs)`` never
    visits)."""

    @staticmethod
    def forward(ctx: Any, msg: str, n: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.msg = msg
        return tuple(t.view_as(t) for t in tensors[:n])

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        raise RuntimeError(ctx.msg)


def _refusing(outputs: Any, read: tuple[torch.Tensor, ...], msg: str) -> Any:
    """``outputs`` (a tensor, or a tuple with ``None``s) tied through :class:`_Refuse` to
    the tensors in ``read`` that want grad (the saved ones and the incoming gradients: a
    path through either alone was cut, e.g. to ``w`` in ``loss = (out * w).sum()``)."""
    outs = outputs if isinstance(outputs, tuple) else (outputs,)
    idx = [i for i, t in enumerate(outs) if isinstance(t, torch.Tensor)]
    wanting = [t for t in read if t.requires_grad]
    tied = _Refuse.apply(msg, len(idx), *(outs[i] for i in idx), *wanting)
    result = list(outs)
    for i, t in zip(idx, tied, strict=True):
        result[i] = t
    return tuple(result) if isinstance(outputs, tuple) else result[0]


legacy_batched = getattr(torch._C._functorch, "is_legacy_batchedtensor", lambda t: False)


def any_nan(*ts: torch.Tensor) -> bool:
    """Whether some of ``ts`` may hold NaN, read back at once (a sum propagates NaN, and
    where one is NaN, ``amax`` tells a NaN from ``inf - inf``; in half precision a sum
    took a quarter of ``amax``'s time, which made SDPA's screen of a long KV cache cost
    more than its attention): False while exporting or on the meta device (no value to
    read), True under vmap (each item may); a tensor batched by ``is_grads_batched``
    (legacy vmap), which cannot be read, is left out.

    Example:
        >>> any_nan(torch.ones(2), torch.tensor([1.0, float("nan")])), any_nan(torch.ones(2))
        (True, False)
        >>> any_nan(torch.tensor([float("inf")]), torch.tensor([float("-inf")]))  # inf - inf
        False
    """
    kept = screened(ts)
    if not isinstance(kept, list):
        return kept
    if not kept or not sum_is_off(kept, math.isnan):
        return False
    return bool(torch.stack([t.amax().to(torch.float64) for t in kept]).isnan().any())


def screened(ts: tuple[torch.Tensor, ...]) -> list[torch.Tensor] | bool:
    """The tensors of ``ts`` a screen reads, or its answer without a read: False while
    exporting or on the meta device, True under vmap."""
    kept, meta = [], False  # (one loop, no generators: a screen per masked call)
    for t in ts:
        if t.numel() and not legacy_batched(t):
            kept.append(t)
            meta = meta or t.is_meta
    if meta or exporting():
        return False
    return True if vmapping() else kept


def sum_is_off(ts: list[torch.Tensor], off: Callable[[float], bool]) -> bool:
    """Whether the sum of the sums of ``ts`` (not empty) is ``off`` (NaN, or not finite),
    read back once: where one of them holds NaN (or inf), and also where one sums to
    ``inf`` and another to ``-inf`` (the second pass of the screen then answers). Three
    ops for two tensors where a stack of float64 sums took seven; on the CPU, where a read
    costs no sync, each sum is read as a Python float (an add of two 0-dim tensors took
    3 us: 16 -> 5 us in all for two 1x8x16x16 tensors; a loop, not sum() of a generator:
    5.4 -> 4.8 us)."""
    if False not in [t.is_cpu for t in ts]:
        read = 0.0
        for t in ts:
            read += t.sum().item()
        return off(read)
    total = ts[0].sum()  # () each: 0-dim tensors of mixed dtypes add by promotion
    for t in ts[1:]:
        total = total + t.sum()
    return off(float(total))


def autocast_dtype(kind: str) -> torch.dtype | None:
    """The dtype ``torch.autocast`` casts to on device type ``kind``, None where it is off
    (or torch has no autocast for ``kind``).

    Example:
        >>> with torch.autocast("cpu", dtype=torch.bfloat16):
        ...     autocast_dtype("cpu")
        torch.bfloat16
        >>> autocast_dtype("cpu") is None
        True
    """
    on = torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind)
    return torch.get_autocast_dtype(kind) if on else None


def no_autocast(kind: str) -> contextlib.AbstractContextManager[object]:
    """Autocast off on device type ``kind`` where torch has it, else nothing: steps an
    engine means to run in float32 (autocast's matmuls undid them)."""
    if torch.amp.is_autocast_available(kind):
        return torch.autocast(kind, enabled=False)
    return contextlib.nullcontext()
