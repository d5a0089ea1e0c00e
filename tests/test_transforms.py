"""attnlab under torch's transforms.

``torch.compile``: each attention call runs as written between the compiled pieces
(``torch.compiler.disable`` on :func:`attnlab.attention`), and the layers leave the
fusing of their linears to inductor, so a compiled function, layer or decoder gives the
uncompiled result. Traced, the planning broke the graph at each read of a mask's values
and, on the blocked engine, failed in inductor (a window) or indexed out of bounds
(documents, padding). tests/test_hf_models.py covers a compiled transformers model.

``torch.func.grad``: the engines' and normalizers' autograd Functions take no ``ctx`` in
their forward, so it differentiates them as autograd does (``vmap``:
tests/test_vmap.py). ``torch.export``: layers whose calls go to SDPA.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from collections.abc import Callable

import pytest
import torch
from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list

import attnlab
from attnlab import bias as B
from attnlab import masks as M
from attnlab.models.seq2seq import Seq2Seq, Seq2SeqConfig
from attnlab.nn import DecoderOnly, LayerConfig
from attnlab.nn.attention import MultiHeadAttention
from attnlab.positional import RotaryEmbedding
from tests.conftest import max_err, naive_attention

dynamo = pytest.importorskip("torch._dynamo")
MASKS = {
    "window": lambda: M.causal() & M.window(40),
    "documents": lambda: M.documents(torch.arange(300) * 3 // 300),
    "padding": lambda: M.padding([300, 250]),
}


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> object:
    dynamo.reset()
    yield
    dynamo.reset()


@pytest.mark.parametrize("name", list(MASKS))
def test_a_compiled_call_equals_the_call_and_breaks_only_there(name: str) -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 300, 32, generator=g) for _ in range(3))
    mask = MASKS[name]()

    def f(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attnlab.attention(q, k, v, mask=mask, engine="blocked") * 2

    reasons = [r.reason for r in dynamo.explain(f)(q, k, v).break_reasons]
    assert all("torch.compiler.disable" in r for r in reasons), reasons
    want = f(q, k, v)
    assert max_err(torch.compile(f)(q, k, v), want) == 0.0  # the same kernel, as written
    assert max_err(want, attnlab.attention(q, k, v, mask=mask, engine="reference") * 2) < 1e-5

    # the wrapper that stands for torch.compiler.disable is never traced itself
    assert not _debug_get_cache_entry_list(attnlab.attention.__code__)


@pytest.mark.parametrize("name", ["window", "documents"])
def test_attention_compiled_itself_runs_as_written(name: str) -> None:
    """``torch.compile(attnlab.attention)``, not a function that calls it: the decorator's
    marks led dynamo to the undecorated function, which it traced (600 positions, window:
    InductorError "vr must not be None for symbol q0"; documents: an index out of bounds)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 600, 32, generator=g) for _ in range(3))
    masks = {"window": M.window(32), "documents": M.documents(torch.arange(600) * 30 // 600)}
    want = attnlab.attention(q, k, v, mask=masks[name], engine="reference")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = torch.compile(attnlab.attention)(q, k, v, mask=masks[name])
    assert not [w for w in seen if "ynamo" in str(w.message)], [str(w.message) for w in seen]
    assert max_err(got, want) < 1e-5


def test_attend_compiled_breaks_only_at_the_call_without_a_warning() -> None:
    """(Traced, ``attend`` broke the graph inside, at its NaN screen, with dynamo's
    warning that it cannot trace ``is_legacy_batchedtensor``.)"""
    s, v = torch.randn(2, 4, 64, 64), torch.randn(2, 4, 64, 16)

    def f(s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attnlab.attend(s.sin(), v, mask=M.causal()).cos()

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        reasons = [r.reason for r in dynamo.explain(f)(s, v).break_reasons]
        got = torch.compile(f)(s, v)
    assert len(reasons) == 1 and "torch.compiler.disable" in reasons[0], reasons
    assert not [w for w in seen if "Dynamo" in str(w.message)], [str(w.message) for w in seen]
    assert max_err(got, f(s, v)) < 1e-6


BUILT_INSIDE: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "padding": lambda q, n: attnlab.attention(q, q, q, mask=M.padding(n)),
    "query_padding": lambda q, n: attnlab.attention(q, q, q, mask=M.padding(n, n)),
    "global_tokens": lambda q, n: attnlab.attention(q, q, q, mask=M.global_tokens(n - 3)),
}


@pytest.mark.parametrize("name", [*BUILT_INSIDE, "seq2seq"])
def test_masks_and_ids_checked_inside_a_compiled_function_without_a_warning(name: str) -> None:
    """(Traced, ``padding``'s and ``global_tokens``' check that their values are >= 0
    broke the graph with dynamo's warning that it cannot trace functorch's interpreter
    stack; a model's checks of its token ids and source lengths broke it at
    ``Tensor.item()``.) They run as written, a bad value still refused."""
    q, n = torch.randn(2, 2, 12, 8), torch.tensor([3, 11])
    if name == "seq2seq":
        torch.manual_seed(0)
        m = Seq2Seq(Seq2SeqConfig(src_vocab=10, tgt_vocab=12, d_model=16, num_heads=2)).eval()
        src, tgt = torch.tensor([[1, 2, 3, 4, 5], [1, 2, 3, 0, 0]]), torch.ones(2, 4).long()
        f, n = (lambda q, lengths: m(src, lengths, tgt)), torch.tensor([5, 3])
    else:
        f = BUILT_INSIDE[name]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        reasons = [r.reason for r in dynamo.explain(f)(q, n).break_reasons]
        got = torch.compile(f, backend="eager")(q, n)
    assert all("torch.compiler.disable" in r for r in reasons), reasons
    assert not [w for w in seen if "ynamo" in str(w.message)], [str(w.message) for w in seen]
    assert max_err(got, f(q, n)) == 0.0
    with pytest.raises(ValueError, match=r"must be >= 0|must lie in"):
        torch.compile(f, backend="eager")(q, -n)


def test_importing_attnlab_leaves_dynamo_unloaded_until_something_compiles() -> None:
    """(``torch.compiler.disable`` imports dynamo: 0.8 of ``import attnlab``'s 2 s.)"""
    code = "import sys, attnlab.cli, attnlab.interpret; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr[-2000:]


def test_a_compiled_layer_trains_as_the_layer() -> None:
    """MultiHeadAttention on the blocked engine, forward and the input's gradient."""
    torch.manual_seed(0)
    mha = MultiHeadAttention(64, 8, num_kv_heads=2, engine="blocked")
    x = torch.randn(2, 200, 64, requires_grad=True)
    mask = M.causal() & M.window(30)
    outs, grads = [], []
    for layer in (mha, torch.compile(mha)):
        out, _ = layer(x, mask=mask)
        outs.append(out)
        grads.append(torch.autograd.grad(out.square().sum(), x)[0])
    assert max_err(outs[1], outs[0]) < 1e-5
    assert max_err(grads[1], grads[0]) < 1e-4 * grads[0].abs().max().item()


def test_a_compiled_decoder_at_inference_equals_it_with_and_without_its_cache() -> None:
    """At inference the layers' linears take oneDNN's fused kernel on a packed weight,
    which inductor failed to lower; compiled, they leave the fusing to inductor."""
    torch.manual_seed(0)
    config = LayerConfig(32, 4, 128, num_kv_heads=2, dropout=0.0, activation="gelu",
                         norm_first=True, rope=RotaryEmbedding(8))  # fmt: skip
    lm = DecoderOnly(config, 2).eval()
    compiled = torch.compile(lm)
    x = torch.randn(1, 12, 32)
    with torch.no_grad():
        want = lm(x)
        assert max_err(compiled(x), want) < 1e-5
        cache = lm.new_cache()
        steps = [compiled(x[:, :8], cache=cache)]
        steps += [compiled(x[:, i : i + 1], cache=cache) for i in range(8, 12)]
    assert max_err(torch.cat(steps, 1), want) < 1e-5


def _func_and_autograd(loss: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> float:
    """How far ``torch.func.grad(loss)(x)`` is from autograd's gradient."""
    from torch.func import grad

    leaf = x.clone().requires_grad_()
    return max_err(grad(loss)(x), torch.autograd.grad(loss(leaf), leaf)[0])


@pytest.mark.parametrize("path", ["kernel", "fused", "eager"])
def test_torch_func_grad_equals_autograd_on_the_blocked_engine(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``torch.func.grad`` (MAML-style training, per-call gradients) needs autograd
    Functions whose forward takes no ``ctx``: on each of its three paths the blocked
    engine raised "it must override the setup_context staticmethod"."""
    from attnlab.engines import blocked_autograd as ba

    monkeypatch.setattr(ba, "USE_KERNEL", path == "kernel")
    monkeypatch.setattr(ba, "USE_FUSED", path == "fused")
    x = torch.randn(1, 2, 300, 16, generator=torch.Generator().manual_seed(0))
    mask = M.causal() & M.window(40)

    def loss(x: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(attnlab.attention(x, 0.5 * x, x, mask=mask, engine="blocked"))

    assert _func_and_autograd(lambda x: loss(x).square().sum(), x) < 1e-6


@pytest.mark.parametrize("normalize", ["sparsemax", "entmax15"])
def test_torch_func_grad_equals_autograd_for_the_sparse_normalizers(normalize: str) -> None:
    x = torch.randn(1, 2, 60, 16, generator=torch.Generator().manual_seed(0))

    def loss(x: torch.Tensor) -> torch.Tensor:
        out = attnlab.attention(x, 0.5 * x, x, mask=M.causal(), normalize=normalize)
        return torch.as_tensor(out).square().sum()

    assert _func_and_autograd(loss, x) < 1e-6


EXPORTS = {"plain": None, "causal": M.causal(), "padding": M.padding([300, 250], [300, 200])}


@pytest.mark.parametrize("name", list(EXPORTS))
def test_torch_export_holds_what_auto_gives_to_sdpa(name: str) -> None:
    """``torch.export`` traces the call with no values to read: the NaN screen and the
    check for rows without a key (which read one) step aside, so a layer whose calls go
    to torch SDPA exports and its program equals the layer, rows without a key (query
    padding) 0 included. The blocked engine plans from the mask's values: no export."""
    mask = EXPORTS[name]
    torch.manual_seed(0)
    mha = MultiHeadAttention(32, 4, num_kv_heads=2).eval()

    class Layer(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return mha(x, mask=mask)[0]

    x = torch.randn(2, 300, 32)
    program = torch.export.export(Layer(), (x,))
    with torch.no_grad():
        assert max_err(program.module()(x), Layer()(x)) == 0.0


@pytest.mark.parametrize("flag", ["_is_exporting_flag", "_is_compiling_flag"])
def test_an_export_in_another_thread_leaves_this_threads_calls_eager(
    flag: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``torch.compiler.is_exporting()`` and ``is_compiling()`` are process-wide flags that
    an export or a compile sets for its whole length, in whatever thread. Read as "this
    call is traced", they made eager calls in other threads skip the NaN screen (a NaN
    that a padding mask hides reached all 64 rows in 8918 of 13058 calls) and the argument
    checks (``padding([-3])`` accepted). Here the flag is set as another thread's export
    or compile leaves it, with nothing traced in this thread."""
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 1, 2, 32, 16, generator=g).unbind(0)
    v[:, :, 20:] = float("nan")  # unwritten cache slots, hidden by the padding mask
    want = attnlab.attention(q, k, v.nan_to_num(), mask=M.padding([20]), engine="reference")
    monkeypatch.setattr(torch.compiler, flag, True)
    for engine in ("auto", "reference", "blocked"):  # (sdpa refuses a NaN)
        got = torch.as_tensor(attnlab.attention(q, k, v, mask=M.padding([20]), engine=engine))
        assert not got.isnan().any(), engine
    got = attnlab.attention(q, k, v.nan_to_num(), mask=M.padding([20]), engine="reference")
    assert torch.equal(torch.as_tensor(got), torch.as_tensor(want))  # the same softmax
    with pytest.raises(ValueError, match="must be >= 0"):
        M.padding(torch.tensor([-3]))


def test_torch_export_with_a_dynamic_length() -> None:
    """A mask's size check took the symbolic length (``SymInt``) of a dynamic dimension for
    a wrong type: "lq must be an int >= 0, got s53 (SymInt)"."""

    class Layer(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.as_tensor(attnlab.attention(x, x, x, mask=M.window(8), engine="reference"))

    x = torch.randn(2, 2, 64, 16)
    dims = {"x": {2: torch.export.Dim("L", min=2, max=512)}}
    program = torch.export.export(Layer(), (x,), dynamic_shapes=dims)
    for n in (100, 9):  # other lengths than the traced one
        y = torch.randn(2, 2, n, 16)
        back = torch.arange(n)[:, None] - torch.arange(n)  # the query's position - the key's
        want = naive_attention(*[y.double()] * 3, allowed=(back >= 0) & (back <= 8))[0]
        assert max_err(program.module()(y), want) < 1e-5


def test_capture_on_a_compiled_model_records_the_weights_without_a_dynamo_warning() -> None:
    """``interpret.capture`` names calls from module hooks that read the thread id, which
    dynamo cannot trace (it warned so); they run as written."""
    import warnings

    from attnlab.interpret import capture
    from attnlab.nn import Encoder, EncoderLayer

    torch.manual_seed(0)
    enc = Encoder(EncoderLayer(LayerConfig(32, 4, 64, dropout=0.0)), 2).eval()
    x = torch.randn(1, 20, 32)
    with torch.no_grad(), capture(enc) as plain:
        enc(x)
    with torch.no_grad(), warnings.catch_warnings(record=True) as seen, capture(enc) as compiled:
        warnings.simplefilter("always")
        torch.compile(enc)(x)
    assert [r.name for r in compiled.records] == [r.name for r in plain.records]
    assert len(plain.records) == 2
    for a, b in zip(compiled.records, plain.records, strict=True):
        assert max_err(a.weights, b.weights) < 1e-6
    assert not [w for w in seen if "Dynamo does not know" in str(w.message)]


def test_a_second_order_gradient_through_the_blocked_engine_is_refused() -> None:
    """Its backward (the compiled kernel, or in-place eager sums) is not differentiable:
    torch.func took it for a constant and MAML's outer gradient came out 1539 off (the
    reference's largest entry 1494), with one warning; autograd's create_graph gave a
    gradient whose own gradient was wrong. Both now raise; the reference engine serves."""
    x = torch.randn(1, 2, 300, 16, generator=torch.Generator().manual_seed(0))
    w0 = 0.3 * torch.randn(16, 16, generator=torch.Generator().manual_seed(1))
    mask = M.causal() & M.window(40)

    def loss(w: torch.Tensor, engine: str) -> torch.Tensor:
        out = attnlab.attention(x @ w, x, x, mask=mask, engine=engine)
        return torch.as_tensor(out).square().sum()

    def maml(engine: str) -> torch.Tensor:
        inner = torch.func.grad(lambda u: loss(u, engine))
        return torch.func.grad(lambda w: loss(w - 0.1 * inner(w), engine))(w0)

    with pytest.raises(RuntimeError, match=r"second-order gradient .* engine='reference'"):
        maml("blocked")
    assert torch.isfinite(maml("reference")).all()  # the control
    w = w0.clone().requires_grad_()
    (g,) = torch.autograd.grad(loss(w, "blocked"), w, create_graph=True)  # first order: fine
    with pytest.raises(RuntimeError, match=r"second-order gradient .* engine='reference'"):
        g.square().sum().backward()


def test_second_order_gradients_that_once_differentiable_missed_are_refused() -> None:
    """A loss linear in the output: ``create_graph=True`` gave a gradient whose own
    gradient dropped the attention's part (1970 off, the reference's largest entry 1993),
    since ``once_differentiable`` marks its gradients only when the upstream gradient
    wants grad. It raises now, when that gradient is differentiated."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 300, 16, dtype=torch.float64, generator=g)
    y = torch.randn(x.shape, dtype=torch.float64, generator=g)
    w0 = 0.3 * torch.randn(16, 16, dtype=torch.float64, generator=g)
    mask = M.causal() & M.window(40)

    def hessian_row(engine: str) -> torch.Tensor:
        w = w0.clone().requires_grad_()
        out = torch.as_tensor(attnlab.attention(x @ w, x, x, mask=mask, engine=engine))
        (gw,) = torch.autograd.grad((out * y).sum() + (w**3).sum(), w, create_graph=True)
        return torch.autograd.grad(gw.square().sum(), w)[0]

    with pytest.raises(RuntimeError, match=r"second-order gradient .* engine='reference'"):
        hessian_row("blocked")
    assert torch.isfinite(hessian_row("reference")).all()  # the control


@pytest.mark.parametrize("normalize", ["softmax", "entmax15"])
def test_first_order_gradients_that_look_like_second_order_still_run(normalize: str) -> None:
    """Refusing second-order gradients must leave first-order ones alone: non-reentrant
    checkpointing (which lets a backward unpack its saved tensors once) and
    ``torch.func.grad`` over parameters that want grad (``functional_call``'s own
    example) raised for a while."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    engine = "blocked" if normalize == "softmax" else "reference"
    model = DecoderOnly(LayerConfig(32, 4, 64, dropout=0.0, normalize=normalize, engine=engine), 1)
    x, mask = torch.randn(1, 512, 32), M.causal() & M.window(64)

    def loss(params: dict[str, torch.Tensor]) -> torch.Tensor:
        out = torch.func.functional_call(model, params, (x,), {"mask": mask})
        return out.square().mean()

    model(x, mask=mask).square().mean().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}  # type: ignore[union-attr]
    model.zero_grad()
    checkpoint(model, x, mask=mask, use_reentrant=False).square().mean().backward()
    got = torch.func.grad(loss)(dict(model.named_parameters()))
    for n, p in model.named_parameters():
        assert max_err(p.grad, want[n]) < 1e-6 and max_err(got[n], want[n]) < 1e-6, n  # type: ignore[arg-type]


def test_a_second_derivative_through_entmax_is_refused() -> None:
    """1.5-entmax's Jacobian depends on its weights, so its once-differentiable backward
    cannot serve a second derivative (sparsemax's is constant on each support)."""
    from attnlab.normalize import entmax15, sparsemax

    torch.manual_seed(0)
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    w = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    (ge,) = torch.autograd.grad((entmax15(x @ w) * y).sum() + w.sum() ** 3, w, create_graph=True)
    with pytest.raises(RuntimeError, match=r"second-order gradient .* 1\.5-entmax"):
        torch.autograd.grad(ge.square().sum(), w)
    (gw,) = torch.autograd.grad((sparsemax(x @ w) * y).sum() + w.sum() ** 3, w, create_graph=True)
    assert gw.requires_grad  # the control: sparsemax's backward is differentiable


UPSTREAM_CASES = [("blocked", "softmax"), ("reference", "entmax15")]


@pytest.mark.parametrize(("engine", "normalize"), UPSTREAM_CASES)
def test_a_second_order_path_only_through_the_upstream_gradient_is_refused(
    engine: str, normalize: str
) -> None:
    """``loss = (out * w).sum()``: ``d/dw`` of ``grad(loss, q, create_graph=True)`` runs
    only through the upstream gradient ``w``, which the refusal did not hold: None (or
    zeros, or "appears to not have been used") where the reference gives norm 1.8547."""
    g = torch.Generator().manual_seed(0)
    q, k, v, w = (torch.randn(1, 2, 5, 3, dtype=torch.float64, generator=g) for _ in range(4))
    q.requires_grad_(), w.requires_grad_()
    out = torch.as_tensor(attnlab.attention(q, k, v, engine=engine, normalize=normalize))
    (gq,) = torch.autograd.grad((out * w).sum(), q, create_graph=True)
    named = r"1\.5-entmax.* softmax" if engine == "reference" else r"blocked.* engine='reference'"
    with pytest.raises(RuntimeError, match=rf"second-order gradient .* {named}"):
        torch.autograd.grad(gq.sum(), w, allow_unused=True)
    ref = torch.as_tensor(attnlab.attention(q, k, v, engine="reference", normalize=normalize))
    assert max_err(gq, torch.autograd.grad((ref * w).sum(), q)[0]) < 1e-12  # first order: fine


HIGHER_ORDER_CALLS = {
    "plain": lambda: {},
    "causal": lambda: {"mask": M.causal()},
    "window": lambda: {"mask": M.causal() & M.window(4)},
    "padding": lambda: {"mask": M.padding([20, 13])},
    "documents": lambda: {"mask": M.documents(torch.arange(20) // 7)},
    "alibi": lambda: {"mask": M.causal(), "bias": B.alibi(2)},
}


@pytest.mark.parametrize("call", list(HIGHER_ORDER_CALLS))
def test_auto_serves_forward_mode_and_second_order_as_the_reference(call: str) -> None:
    """``auto`` gave these calls to SDPA, whose fused kernels have neither forward-mode AD
    nor a second derivative ("Trying to use forward AD with
    _scaled_dot_product_flash_attention_for_cpu..."): now the reference serves them."""
    g = torch.Generator().manual_seed(0)
    q, k, v, t = (torch.randn(2, 2, 20, 8, dtype=torch.float64, generator=g) for _ in range(4))
    kw = HIGHER_ORDER_CALLS[call]()

    def f(engine: str) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda q: torch.as_tensor(attnlab.attention(q, k, v, engine=engine, **kw))

    def hess(engine: str) -> torch.Tensor:
        return torch.func.grad(
            lambda q: torch.func.grad(lambda q: f(engine)(q).square().sum())(q).sum()
        )(q)

    want = torch.func.jvp(f("reference"), (q,), (t,))[1]
    assert max_err(torch.func.jvp(f("auto"), (q,), (t,))[1], want) < 1e-12
    with torch.autograd.forward_ad.dual_level():
        dual = f("auto")(torch.autograd.forward_ad.make_dual(q, t))
        assert max_err(torch.autograd.forward_ad.unpack_dual(dual).tangent, want) < 1e-12
    assert max_err(hess("auto"), hess("reference")) < 1e-12


def test_the_sdpa_engine_refuses_forward_mode_and_second_order_by_name() -> None:
    """Explicit ``engine='sdpa'``: torch's errors named no engine ("derivative for
    aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented")."""
    g = torch.Generator().manual_seed(0)
    q, k, v, t = (torch.randn(1, 2, 20, 8, dtype=torch.float64, generator=g) for _ in range(4))

    def f(q: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(attnlab.attention(q, k, v, mask=M.causal(), engine="sdpa"))

    with pytest.raises(ValueError, match=r"engine='sdpa' .*forward-mode.* engine='reference'"):
        torch.func.jvp(f, (q,), (t,))
    with pytest.raises(ValueError, match=r"engine='sdpa' .*second derivative.* engine='reference'"):
        torch.func.grad(lambda q: torch.func.grad(lambda q: f(q).square().sum())(q).sum())(q)
    qq = q.clone().requires_grad_()
    (gq,) = torch.autograd.grad(f(qq).square().sum(), qq, create_graph=True)
    ref = torch.as_tensor(attnlab.attention(qq, k, v, mask=M.causal(), engine="reference"))
    assert max_err(gq, torch.autograd.grad(ref.square().sum(), qq)[0]) < 1e-12  # first order
    with pytest.raises(
        RuntimeError, match=r"second-order gradient .* sdpa engine.* engine='reference'"
    ):
        torch.autograd.grad(gq.sum(), qq)


def test_forward_mode_through_the_blocked_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's "You must implement the jvp function for custom autograd.Function" named no
    engine: ``auto`` now gives the call to the reference, ``engine='blocked'`` is refused by
    name, and its autograd Function's own jvp names it (where the forward cannot tell)."""
    import attnlab.engines.blocked as blocked

    g = torch.Generator().manual_seed(0)
    q, k, v, t = (torch.randn(1, 1, 1024, 4, dtype=torch.float64, generator=g) for _ in range(4))
    mask = M.causal() & M.window(16)

    def f(engine: str) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda q: torch.as_tensor(attnlab.attention(q, k, v, mask=mask, engine=engine))

    want = torch.func.jvp(f("reference"), (q,), (t,))[1]
    assert max_err(torch.func.jvp(f("auto"), (q,), (t,))[1], want) < 1e-12  # auto: blocked
    with pytest.raises(ValueError, match=r"engine='blocked' .*forward-mode AD.*'reference'"):
        torch.func.jvp(f("blocked"), (q,), (t,))
    monkeypatch.setattr(blocked, "forward_mode", lambda *ts: False)
    with pytest.raises(
        RuntimeError, match=r"forward-mode AD .*blocked engine.* engine='reference'"
    ):
        torch.func.jvp(f("blocked"), (q,), (t,))


def _plain_sparsemax(z: torch.Tensor) -> torch.Tensor:
    """Martins & Astudillo (2016) in differentiable torch ops, rows of ``z (N, L)``."""
    zs = z.sort(-1, descending=True).values
    k = torch.arange(1, z.shape[-1] + 1, dtype=z.dtype)
    cs = zs.cumsum(-1)
    size = ((1 + k * zs) > cs).sum(-1, keepdim=True)  # (N, 1)
    tau = (cs.gather(-1, size - 1) - 1) / size.to(z.dtype)
    return (z - tau).clamp(min=0)


def test_second_order_through_sparsemax_equals_plain_autograd() -> None:
    """A MAML step through sparsemax with a loss not linear in its weights: the outer
    gradient needs the J^T H J term (it was cut: 0.3250 for 0.3128 in the audit)."""
    from attnlab.normalize import sparsemax

    torch.manual_seed(0)
    a, c, d = (torch.randn(3, 7, dtype=torch.float64) for _ in range(3))

    def outer(f: Callable[[torch.Tensor], torch.Tensor], p: torch.Tensor) -> torch.Tensor:
        (g,) = torch.autograd.grad((c * f(p * a) ** 2).sum(), p, create_graph=True)
        return (d * f((p - 0.1 * g) * a)).sum()

    def outer_grad(f: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        p = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
        return torch.autograd.grad(outer(f, p), p)[0]

    got, want = outer_grad(sparsemax), outer_grad(_plain_sparsemax)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert abs(float(want)) > 1e-3
    inner = torch.func.grad(lambda p: (c * sparsemax(p * a) ** 2).sum())
    func = torch.func.grad(lambda p: (d * sparsemax((p - 0.1 * inner(p)) * a)).sum())
    torch.testing.assert_close(func(torch.tensor(1.3, dtype=torch.float64)), want)


@pytest.mark.parametrize("bias", [False, True])
def test_is_grads_batched_through_the_blocked_engine(bias: bool) -> None:
    """(A block holding every key summed its dk into ``dk[:, :, 0:L]``, an alias of the
    whole tensor, which vmap cannot write into: "Batching rule not implemented for
    aten::alias", in float64 or with a tensor bias.)"""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 150, 8, dtype=torch.float64, generator=g) for _ in range(3))
    b = B.tensor(torch.randn(150, 150, dtype=torch.float64, generator=g)) if bias else None
    mask = M.causal() & M.window(32)
    gs = torch.randn(3, 1, 2, 150, 8, dtype=torch.float64, generator=g)
    got, want = [], []
    for engine, into in (("blocked", got), ("reference", want)):
        qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
        out = attnlab.attention(qq, kk, v, mask=mask, bias=b, engine=engine)
        into += torch.autograd.grad(out, (qq, kk), gs, is_grads_batched=True)
    for a, w in zip(got, want, strict=True):
        assert a.shape == (3, 1, 2, 150, 8) and max_err(a, w) < 1e-12


def test_jacrev_with_respect_to_a_bias() -> None:
    """The blocked engine's backward takes a bias's gradient with torch.autograd, which a
    torch.func transform of the bias hides ("element 0 of tensors does not require
    grad"): it declines by name, and ``auto`` serves the call exactly."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 150, 8, dtype=torch.float64, generator=g) for _ in range(3))
    bias = torch.randn(1, 2, 150, 150, dtype=torch.float64, generator=g)
    mask = M.causal() & M.window(32)

    def f(b: torch.Tensor, engine: str) -> torch.Tensor:
        out = attnlab.attention(q, k, v, mask=mask, bias=b, engine=engine)
        return torch.as_tensor(out)[0, 1, 60:63, 0]

    got = torch.func.jacrev(lambda b: f(b, "auto"))(bias)
    want = torch.autograd.functional.jacobian(lambda b: f(b, "reference"), bias)
    assert got.shape == (3, 1, 2, 150, 150) and max_err(got, want) < 1e-12
    with pytest.raises(ValueError, match=r"torch\.func transform of the bias; use 'reference'"):
        torch.func.jacrev(lambda b: f(b, "blocked"))(bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_jacrev_through_the_blocked_engine(dtype: torch.dtype) -> None:
    """(The eager backward summed a batched upstream gradient into unbatched zeros in
    place: "output with shape [1, 2, 128, 16] doesn't match the broadcast shape".)"""
    x = torch.randn(1, 2, 300, 8, dtype=dtype, generator=torch.Generator().manual_seed(0))
    mask = M.global_tokens([0]) | M.window(32)

    def f(x: torch.Tensor) -> torch.Tensor:
        out = attnlab.attention(x, 0.5 * x, x, mask=mask, engine="blocked")
        return torch.as_tensor(out)[0, 0, :3, 0]  # (3,)

    got = torch.func.jacrev(f)(x)  # (3, 1, 2, 300, 8)
    want = torch.autograd.functional.jacobian(f, x)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert got.shape == want.shape and (got - want).abs().max() < tol


def test_a_padding_mask_from_per_example_lengths_under_vmap() -> None:
    """(Its check for negative lengths read their values: vmap refused the data-dependent
    control flow, and export a GuardOnDataDependentSymNode.)"""
    q = torch.randn(3, 4, 12, 8, dtype=torch.float64)
    lens = torch.tensor([12, 5, 1])

    def one(qi: torch.Tensor, li: torch.Tensor) -> torch.Tensor:
        out = attnlab.attention(qi[None], qi[None], qi[None], mask=M.padding(li[None]))
        return torch.as_tensor(out)[0]

    got = torch.func.vmap(one)(q, lens)
    want = attnlab.attention(q, q, q, mask=M.padding(lens), engine="reference")
    assert max_err(got, torch.as_tensor(want)) < 1e-12


def test_rope_built_on_the_meta_device_can_be_materialized() -> None:
    """(Its inverse frequencies stayed on meta: "Cannot copy out of meta tensor".)"""
    torch.manual_seed(0)
    ref = MultiHeadAttention(32, 4, rope=RotaryEmbedding(8))
    with torch.device("meta"):
        lazy = MultiHeadAttention(32, 4, rope=RotaryEmbedding(8))
    lazy = lazy.to_empty(device="cpu")
    lazy.load_state_dict(ref.state_dict())
    x = torch.randn(1, 5, 32)
    assert max_err(torch.as_tensor(lazy(x)), torch.as_tensor(ref(x))) < 1e-6


def test_alibi_built_on_the_meta_device_gets_its_slopes() -> None:
    """(Its slopes, a non-persistent buffer, came out of to_empty uninitialized: 0 or
    8.6e32, and the output moved by 0.135; no state dict holds them.)"""
    from attnlab import bias as B

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha, self.alibi = MultiHeadAttention(32, 4), B.alibi(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.as_tensor(self.mha(x, mask=M.causal(), bias=self.alibi))

    torch.manual_seed(0)
    ref = Net()
    with torch.device("meta"):
        lazy = Net()
    lazy = lazy.to_empty(device="cpu")
    lazy.load_state_dict(ref.state_dict())
    assert torch.equal(lazy.alibi.slopes, B.alibi_slopes(4))
    x = torch.randn(1, 5, 32)
    assert max_err(lazy(x), ref(x)) < 1e-6


def test_capture_of_the_compiled_module_names_its_layers_as_the_model_does() -> None:
    """(``capture(torch.compile(model))`` named the calls '_orig_mod.layers.0.self_attn',
    so ``layers=["layers.0.self_attn"]`` recorded nothing.)"""
    from attnlab.interpret import capture
    from attnlab.nn import Encoder, EncoderLayer

    torch.manual_seed(0)
    enc = Encoder(EncoderLayer(LayerConfig(32, 4, 64, dropout=0.0)), 2).eval()
    x, compiled = torch.randn(1, 20, 32), torch.compile(enc)
    with torch.no_grad(), capture(enc) as plain:
        enc(x)
    with torch.no_grad(), capture(compiled, layers=[plain.records[0].name]) as one:
        compiled(x)
    assert [r.name for r in one.records] == [plain.records[0].name]
    assert max_err(one.records[0].weights, plain.records[0].weights) < 1e-6


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_gives_the_same_gradients(reentrant: bool) -> None:
    """``torch.utils.checkpoint`` recomputes the layer in the backward: the blocked
    kernel's engine (a window at 512 tokens) with a learnable T5 bias gives the gradients
    of the run without it, bit for bit."""
    from torch.utils.checkpoint import checkpoint

    class Layer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha, self.t5 = MultiHeadAttention(32, 4), B.relative_buckets(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.mha(x, mask=M.causal() & M.window(64), bias=self.t5)

    torch.manual_seed(0)
    layer, x = Layer(), torch.randn(1, 512, 32, requires_grad=True)
    grads = []
    for wrapped in (False, True):
        layer.zero_grad()
        x.grad = None
        out = checkpoint(layer, x, use_reentrant=reentrant) if wrapped else layer(x)
        out.square().sum().backward()
        grads.append([x.grad.clone(), *(p.grad.clone() for p in layer.parameters())])
    assert len(grads[0]) == 6  # x, the projections' weights and biases, the T5 table
    for got, want in zip(*grads, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointing_a_layer_that_returns_weights(reentrant: bool) -> None:
    """What README says of weights under checkpointing: bit for bit with
    ``use_reentrant=False``; the reentrant kind's first forward runs without autograd,
    where auto takes the blocked engine (the recompute: the reference engine, whose
    weights carry gradients), so its gradients agree to rounding."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    mha, x = MultiHeadAttention(32, 4), torch.randn(2, 160, 32, requires_grad=True)

    def run(x: torch.Tensor) -> torch.Tensor:
        out, w = mha(x, mask=M.causal(), need_weights=True)
        return out.square().sum() + w.square().sum()

    grads = []
    for wrapped in (False, True):
        mha.zero_grad()
        x.grad = None
        (checkpoint(run, x, use_reentrant=reentrant) if wrapped else run(x)).backward()
        grads.append([x.grad.clone(), *(p.grad.clone() for p in mha.parameters())])
    for got, want in zip(*grads, strict=True):
        if reentrant:
            assert max_err(got, want) <= 1e-5 * want.abs().max()
        else:
            assert torch.equal(got, want)
