"""interpret.capture: names, engines, heads/rows selection, decoding steps."""

from __future__ import annotations

import pytest
import torch

import attnlab
from attnlab import bias, masks
from attnlab.interpret import capture
from attnlab.nn import DecoderOnly, Encoder, EncoderLayer, LayerConfig, LuongAttention, Transformer
from tests.conftest import max_err


def _encoder(engine: str) -> Encoder:
    torch.manual_seed(0)
    layer = EncoderLayer(LayerConfig(32, 4, 64, dropout=0.0, engine=engine))
    return Encoder(layer, 2).eval()


@pytest.mark.parametrize("engine", ["blocked", "sdpa", "auto"])
def test_capture_on_fast_engines_equals_reference_weights(engine: str) -> None:
    x = torch.randn(2, 300, 32)
    mask, b = masks.causal() & masks.window(40), bias.alibi(4)
    ref, fast = _encoder("reference"), _encoder(engine)
    with capture(ref) as cap_ref:
        ref(x, mask=mask, bias=b)
    with capture(fast, heads=[1, 3], rows=(250, 300)) as cap:
        fast(x, mask=mask, bias=b)
    assert [c.name for c in cap] == ["layers.0.self_attn", "layers.1.self_attn"]
    assert all(c.engine != "reference" for c in cap) and cap_ref.records[0].engine == "reference"
    for got, want in zip(cap, cap_ref, strict=True):
        assert got.weights.shape == (2, 2, 50, 300)
        assert max_err(got.weights, want.weights[:, [1, 3], 250:300]) < 1e-5


@pytest.mark.parametrize("engine", ["sdpa", "blocked", "reference"])
def test_a_layer_asked_for_weights_is_recorded_once(engine: str) -> None:
    """A layer whose engine returns no weights recomputes them for ``need_weights``; the
    capture recorded that second call too (12 records for 6 layers on SDPA, and rollout
    over them off by 0.1)."""
    enc, x, weights = _encoder(engine), torch.randn(1, 20, 32), []
    with torch.no_grad(), capture(enc) as cap:
        for layer in enc.layers:
            x, w = layer(x, mask=masks.causal(), need_weights=True)
            weights.append(w)
    assert [c.name for c in cap] == ["layers.0.self_attn", "layers.1.self_attn"]
    for got, want in zip(cap, weights, strict=True):
        assert max_err(got.weights, want) < 1e-6


def test_capture_with_gradients_enabled_and_training_dropout() -> None:
    enc = Encoder(EncoderLayer(LayerConfig(16, 2, 32, dropout=0.5)), 1)  # training mode, dropout on
    x = torch.randn(1, 7, 16, requires_grad=True)
    with capture(enc) as cap:
        enc(x).sum().backward()  # capture does not disturb autograd
    w = cap.records[0].weights
    assert torch.allclose(w.sum(-1), torch.ones(1, 2, 7), atol=1e-6)  # before dropout
    assert x.grad is not None


def test_seq2seq_names_cross_attention_and_decoding_steps() -> None:
    model = Transformer(LayerConfig(16, 2, 32, dropout=0.0), 1, 1).eval()
    src, tgt = torch.randn(1, 5, 16), torch.randn(1, 3, 16)
    memory = model.encode(src)
    cache = model.new_cache()
    with capture(model, layers=["*.cross_attn"]) as cap:
        for i in range(3):
            model.decode(tgt[:, i : i + 1], memory if i == 0 else None, cache=cache)
    assert [(c.name, c.call) for c in cap] == [("decoder.layers.0.cross_attn", i) for i in range(3)]
    assert all(c.weights.shape == (1, 2, 1, 5) for c in cap)
    full = torch.cat(cap.weights("decoder.layers.0.cross_attn"), dim=2)  # (1, 2, 3, 5)
    with capture(model, layers=["*.cross_attn"]) as cap_full:
        model.decode(tgt, memory)
    assert max_err(full, cap_full.records[0].weights) < 1e-6


def test_classic_attention_and_outside_any_model() -> None:
    luong = LuongAttention(8, method="general")
    with capture(luong) as cap:
        _, w = luong(torch.randn(2, 8), torch.randn(2, 6, 8))
    assert cap.records[0].engine == "attend" and max_err(cap.records[0].weights[:, 0, 0], w) == 0
    lm = DecoderOnly(
        LayerConfig(16, 2, 64, dropout=0.0, activation="gelu", norm_first=True), 1
    ).eval()
    with capture() as cap:
        lm(torch.randn(1, 4, 16))
    assert [c.name for c in cap] == [""]
    with capture(lm):
        pass
    lm(torch.randn(1, 4, 16))  # hooks are gone after the block
    assert all(not m._forward_pre_hooks for m in lm.modules())


def test_a_capture_sees_only_its_own_threads_calls() -> None:
    """Two threads capturing at once: each records its own model's calls only, and a
    ``grad=True`` capture in one thread leaves the other's engine alone."""
    import threading

    from attnlab.nn import Encoder, EncoderLayer, LayerConfig

    torch.manual_seed(0)
    encs = [Encoder(EncoderLayer(LayerConfig(16, 2, 32, dropout=0.0)), n).eval() for n in (2, 3)]
    got: dict[int, list[str]] = {}
    barrier = threading.Barrier(2)

    def work(i: int) -> None:
        with capture(encs[i], grad=i == 1) as cap:
            barrier.wait()
            for _ in range(20):
                encs[i](torch.randn(1, 5, 16))
        got[i] = sorted({(c.name, c.engine) for c in cap.records})

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [name for name, _ in got[0]] == ["layers.0.self_attn", "layers.1.self_attn"]
    assert [name for name, _ in got[1]] == [f"layers.{i}.self_attn" for i in range(3)]
    assert {e for _, e in got[1]} == {"reference"} and "reference" not in {e for _, e in got[0]}


@pytest.mark.parametrize("engine", ["performer", "nystrom", "linear"])
def test_a_capture_in_another_thread_leaves_this_threads_calls_alone(engine: str) -> None:
    """An approximate engine builds its weights only for a capture of its own thread: a
    block open in another thread made every call return them (a different reduction:
    outputs 1.5e-7 to 8e-7 off the same call alone, and 145x slower at 6144 keys)."""
    import threading

    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 2, 64, 16).unbind(0)
    opts = {"seed": 1} if engine == "performer" else None
    alone = attnlab.attention(q, k, v, engine=engine, engine_options=opts)
    opened, done = threading.Event(), threading.Event()

    def other() -> None:
        with capture():
            opened.set()
            done.wait(60)

    thread = threading.Thread(target=other)
    thread.start()
    try:
        assert opened.wait(60)
        beside = attnlab.attention(q, k, v, engine=engine, engine_options=opts)
    finally:
        done.set()
        thread.join(timeout=60)
    assert torch.equal(beside, alone)
    with capture() as mine:  # in this thread the weights are still there to record
        attnlab.attention(q, k, v, engine=engine, engine_options=opts)
    assert mine.records[0].weights is not None


@pytest.mark.parametrize("engine", ["blocked", "sdpa", "reference"])
def test_rows_past_the_queries_are_clipped_as_a_slice(engine: str) -> None:
    """rows=(0, 10) over 7 queries keeps the 7 rows, as slicing the full weights would
    (the recomputing engines used to pad 3 made-up rows of zeros)."""
    enc = _encoder(engine)
    x = torch.randn(1, 7, 32)
    with capture(enc, rows=(4, 10), heads=[2]) as cap:
        enc(x)
    with capture(enc) as whole:
        enc(x)
    for got, want in zip(cap, whole, strict=True):
        assert got.weights.shape == (1, 1, 3, 7)
        assert max_err(got.weights, want.weights[:, [2], 4:]) < 1e-6


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"layers": "layers.0.self_attn"}, TypeError, "layers must be a list of module names"),
        ({"heads": [-1]}, ValueError, "heads must be a list of query head indices >= 0"),
        ({"rows": (5, 2)}, ValueError, r"rows=\(5, 2\) must satisfy 0 <= r0 <= r1"),
        ({"rows": 3}, ValueError, "rows must be a pair of ints"),
        ({"heads": 3}, TypeError, r"^heads must be a list of query head indices >= 0, got int 3"),
    ],
)
def test_bad_capture_arguments_are_named(
    kwargs: dict[str, object], exc: type[Exception], match: str
) -> None:
    enc = _encoder("blocked")
    with pytest.raises(exc, match=match):
        capture(enc, **kwargs)  # type: ignore[arg-type]
    with capture(enc, layers=["layers.0.self_attn"], heads=[3], rows=(2, 5)) as cap:
        enc(torch.randn(1, 6, 32))  # the control: names, heads and rows that exist
    assert len(cap.records) == 1 and cap.records[0].weights.shape == (1, 1, 3, 6)
    wrong = r"heads=\[4\] must be query head indices in \[0, 4\)"
    with pytest.raises(ValueError, match=wrong), capture(enc, heads=[4]):
        enc(torch.randn(1, 6, 32))


@pytest.mark.parametrize(
    ("engine", "options", "mask"),
    [("linear", None, None), ("performer", {"num_features": 64, "seed": 1}, "causal"),
     ("nystrom", {"num_landmarks": 4}, None)],
)  # fmt: skip
def test_approximate_engines_record_their_own_weights(
    engine: str, options: dict | None, mask: str | None
) -> None:
    """(capture recorded exact softmax weights for a linear-attention call, 0.69 away from
    the kernel's own, and ``grad=True`` swapped the model's engine for the reference one:
    its output moved by 0.28.)"""
    from attnlab.nn import MultiHeadAttention

    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 2, 16, 8, dtype=torch.float64).unbind(0)
    m = masks.causal() if mask else None
    kw = {"mask": m, "engine": engine, "engine_options": options}
    own = attnlab.attention(q, k, v, return_weights=True, **kw).weights  # type: ignore[union-attr]
    soft = attnlab.attention(q, k, v, mask=m, engine="reference", return_weights=True).weights
    with capture() as cap:
        out = attnlab.attention(q, k, v, **kw)
    assert isinstance(out, torch.Tensor) and cap.records[0].engine == engine
    assert torch.allclose(cap.records[0].weights, own, atol=1e-12)
    assert not torch.allclose(own, soft, atol=1e-2)  # the control: not softmax's
    mha = MultiHeadAttention(8, 2, engine=engine).double().eval()  # its default options
    x = torch.randn(1, 16, 8, dtype=torch.float64)
    plain = mha(x, mask=m)
    with capture(mha, grad=True) as live:
        under = mha(x, mask=m)
    assert live.records[0].engine == engine and live.records[0].weights.requires_grad
    assert torch.allclose(under, plain, atol=1e-10)


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_layers_are_recorded_once(reentrant: bool) -> None:
    """Activation checkpointing recomputes each layer in the backward: with the backward
    inside the block, those calls were recorded as second calls (4 records for 2 layers,
    6 with grad=True), and rollout ran over 4 "layers"."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    enc = Encoder(EncoderLayer(LayerConfig(16, 2, 32, dropout=0.0)), 2).eval()
    x = torch.randn(1, 5, 16, requires_grad=True)
    with capture(enc) as plain:
        enc(x)
    with capture(enc) as cap:
        h = x
        for layer in enc.layers:
            h = checkpoint(layer, h, use_reentrant=reentrant)
        h.sum().backward()
    assert [(c.name, c.call) for c in cap] == [(c.name, c.call) for c in plain]
    for got, want in zip(cap, plain, strict=True):
        torch.testing.assert_close(got.weights, want.weights)


def test_gradient_relevance_of_a_checkpointed_model_equals_the_plain_one() -> None:
    """Its backward ran after the block, where the recompute took another engine than the
    forward's reference: torch's CheckpointError (37 tensors saved, 30 recomputed)."""
    from torch.utils.checkpoint import checkpoint

    from attnlab.interpret import gradient_relevance

    torch.manual_seed(0)
    enc = Encoder(EncoderLayer(LayerConfig(16, 2, 32, dropout=0.0)), 2).eval()
    x = torch.randn(1, 5, 16)

    def checkpointed() -> torch.Tensor:
        h = x
        for layer in enc.layers:
            h = checkpoint(layer, h, use_reentrant=False)
        return h[:, 0].sum()

    want = gradient_relevance(enc, lambda: enc(x)[:, 0].sum())
    torch.testing.assert_close(gradient_relevance(enc, checkpointed), want)


def test_gradient_relevance_under_reentrant_checkpointing_says_why() -> None:
    """Reentrant checkpointing runs the forward without grad, so the weights are outside
    the graph: torch's "One of the differentiated Tensors does not require grad"."""
    from torch.utils.checkpoint import checkpoint

    from attnlab.interpret import gradient_relevance

    enc = Encoder(EncoderLayer(LayerConfig(16, 2, 32, dropout=0.0)), 1).eval()
    x = torch.randn(1, 5, 16, requires_grad=True)
    run = lambda: checkpoint(enc.layers[0], x, use_reentrant=True)[:, 0].sum()  # noqa: E731
    with pytest.raises(RuntimeError, match="use_reentrant=False"):
        gradient_relevance(enc, run)


def test_asked_for_heads_and_rows_are_the_only_ones_computed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``heads=[1, 6]`` and ``rows=(130, 140)`` multiply those heads and rows only (it
    computed every head of each overlapping 128-row block and sliced), with the weights
    of an fp64 softmax, GQA and a per-head bias included."""
    from attnlab.engines import blocked_weights

    shapes: list[tuple[int, ...]] = []
    real = blocked_weights.scores_of
    monkeypatch.setattr(
        blocked_weights, "scores_of", lambda q, k, s: shapes.append(tuple(q.shape)) or real(q, k, s)
    )
    torch.manual_seed(0)
    q = torch.randn(1, 8, 300, 16, dtype=torch.float64)
    k, v = torch.randn(2, 1, 2, 300, 16, dtype=torch.float64).unbind(0)
    mask, alibi = masks.causal(), bias.alibi(8)
    got = attnlab.attention_weights(q, k, v, mask=mask, bias=alibi, heads=[1, 6], rows=(130, 140))
    assert shapes == [(1, 2, 10, 16)]  # one block's 10 rows, two heads
    s = q @ k.repeat_interleave(4, 1).transpose(-1, -2) / 4 + alibi.dense(300, 300, heads=8)
    want = s.masked_fill(~mask.dense(300, 300)[0, 0], float("-inf")).softmax(-1)
    assert max_err(got, want[:, [1, 6], 130:140]) < 1e-12


def test_the_reference_engines_weights_are_captured_as_computed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under capture a call on the reference engine (sparsemax here) hands its own weights
    to the observers: it computed them twice, once for the output and once for capture."""
    from attnlab.engines.reference import ReferenceEngine

    calls: list[int] = []
    real = ReferenceEngine.forward
    monkeypatch.setattr(
        ReferenceEngine, "forward", lambda self, r: calls.append(1) or real(self, r)
    )
    q, k, v = torch.randn(3, 1, 2, 40, 8).unbind(0)
    with capture() as cap:
        out = attnlab.attention(q, k, v, normalize="sparsemax")
    assert len(calls) == 1 and len(cap.records) == 1
    want = attnlab.attention(q, k, v, normalize="sparsemax", return_weights=True)
    assert torch.equal(cap.records[0].weights, want.weights) and torch.equal(out, want.out)
