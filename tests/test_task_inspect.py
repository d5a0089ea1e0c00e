"""Trained task checkpoints rebuilt from the checkpoint alone (attnlab.tasks.inspect).

For every task, on a tiny checkpoint trained for a few steps: the rebuilt model's output
equals what the task's own code gives with the trained model (translate, convert,
complete, predict, caption), and every attention stack equals the same model's
attention recomputed in float64 by the reference engine (``capture(grad=True)``), the
alignment equals the translation report's ``cross_alignment``, the classifier's weights
equal the ones its forward returns, and ViT's rollout equals rollout written out here.
"""

from __future__ import annotations

import copy
import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import Tensor, nn

from attnlab.interpret import capture
from attnlab.tasks.inspect import AttentionStack, Inspection, load_run, run_task_name
from attnlab.tasks.text import pad_batch
from attnlab.train import Checkpoint, CheckpointError, save_checkpoint
from tests.conftest import check_and_control
from tests.task_runs import TINY_TASKS, tiny_task, train_tiny

Made = tuple[Any, nn.Module, Path]

# (name, kind, layers, heads) of each tiny task's stacks: the documented layout
LAYOUT = {
    "translation": [("encoder", "self", 2, 4), ("decoder", "self", 2, 4), ("cross", "cross", 2, 4)],
    "dates": [("attention", "cross", 1, 1)],
    "generation": [("decoder", "self", 2, 4)],
    "classification": [("words", "cross", 1, 1), ("sentences", "cross", 1, 1)],
    "vision": [("encoder", "self", 2, 2)],
    "captioning": [("patches", "self", 2, 4), ("words", "cross", 1, 1)],
}


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Made]:
    """``made(task)``: the tiny task, its trained model and its best checkpoint (each made
    once per test process, on first use)."""
    root, cache = tmp_path_factory.mktemp("runs"), {}

    def get(name: str) -> Made:
        if name not in cache:
            task = tiny_task(name)
            trainer = train_tiny(task, root / name)
            cache[name] = (task, trainer.model, root / name / "best.safetensors")
        return cache[name]

    return get


def reference(model: nn.Module, *inputs: Tensor, layers: list[str]) -> capture:
    """The attention of ``model`` on ``inputs`` recomputed in float64 on the reference
    engine (capture(grad=True) runs every call there and keeps the weights it used)."""
    ref = copy.deepcopy(model).double()
    with torch.no_grad(), capture(ref, layers=layers, grad=True) as cap:
        ref(*(x.double() if x.is_floating_point() else x for x in inputs))
    return cap


def check_stack(s: AttentionStack) -> None:
    """Shapes match the labels; rows sum to 1 (or 0 for a row with nothing to attend)."""
    assert s.kind in ("self", "cross") and (s.kind == "cross" or s.queries == s.keys)
    for w in s.weights:
        assert w.dtype == torch.float32 and tuple(w.shape[1:]) == (len(s.queries), len(s.keys))
        sums = w.sum(-1)
        assert bool((((sums - 1).abs() < 1e-5) | (sums == 0)).all()), sums


def check_layout(task: str, ins: Inspection) -> None:
    got = [(s.name, s.kind, len(s.weights), s.weights[0].shape[0]) for s in ins.stacks]
    assert got == LAYOUT[task]
    for s in ins.stacks + ([ins.alignment] if ins.alignment else []):
        check_stack(s)


def same(ours: list[Tensor], ref: list[Tensor]) -> None:
    """Layer by layer, our float32 weights against the float64 reference."""
    assert len(ours) == len(ref) > 0
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a.double(), b.reshape(a.shape), atol=2e-5, rtol=0)


def test_checkpoint_task_names(made: Callable[[str], Made]) -> None:
    for name in TINY_TASKS:
        _, model, path = made(name)
        assert run_task_name(path) == name == load_run(path).task
        run = load_run(path.with_name("last.safetensors"))
        for key, value in model.state_dict().items():  # the trained weights, rebuilt
            assert torch.equal(run.model.state_dict()[key], value), key
        assert not run.model.training


def test_translation(made: Callable[[str], Made]) -> None:
    from attnlab.tasks.translation import cross_alignment

    task, model, path = made("translation")
    run, text = load_run(path), task.test_pairs[0][0]
    ins = run.inspect(text=text)
    check_layout("translation", ins)
    assert ins.output == task.translate(model, [text])[0]
    enc, dec, cross = ins.stacks
    tgt = torch.tensor([[task.tgt_vocab.index[t] for t in dec.queries]])  # <bos> + output
    src, lengths = pad_batch([task.src_vocab.encode(text)])
    ref = reference(model, src, lengths, tgt, layers=["*_attn"])
    same(enc.weights, [ref.weights(f"transformer.encoder.layers.{i}.self_attn")[0] for i in (0, 1)])
    same(dec.weights, [ref.weights(f"transformer.decoder.layers.{i}.self_attn")[0] for i in (0, 1)])
    same(
        cross.weights,
        [ref.weights(f"transformer.decoder.layers.{i}.cross_attn")[0] for i in (0, 1)],
    )
    assert ins.alignment is not None and ins.alignment.queries[:-1] == dec.queries[1:]
    assert ins.alignment.queries[-1] == "</s>" and enc.keys == ins.alignment.keys
    assert min(tgt[0, 1:].tolist(), default=4) >= 4  # the output reads back as the same ids
    report = cross_alignment(task, model, text, ins.output)  # (Lt + 1, Ls)
    torch.testing.assert_close(ins.alignment.weights[0][0], report)
    unknown = run.inspect(text="vingt xyzzy")  # unknown words: the <unk> token
    assert unknown.stacks[0].keys[-1] == "<unk>" and run.count_tokens("vingt xyzzy") == 2


def test_dates(made: Callable[[str], Made]) -> None:
    task, model, path = made("dates")
    run, ex = load_run(path), task.test[0]
    text = f"[{ex.locale}] {ex.text}"
    ins = run.inspect(text=text)
    check_layout("dates", ins)
    assert ins.output == task.convert(model, [ex])[0] and ins.alignment is ins.stacks[0]
    rows = ins.alignment
    assert rows.keys[0] == f"<{ex.locale}>" and len(rows.keys) == 1 + len(ex.text)
    assert run.count_tokens(text) == len(rows.keys)
    # the steps of greedy decoding, recomputed teacher-forced on the output in float64
    out = [task.tgt_vocab.index[q] for q in rows.queries if q != "</s>"]
    tgt = torch.tensor([[1, *out]])[:, : len(rows.queries)]
    b = task.test_batch([ex])
    ref = reference(model, b.src, b.lengths, tgt, layers=["attention"])
    same(rows.weights, [torch.cat([w[0] for w in ref.weights("attention")], 1)])


def test_generation(made: Callable[[str], Made]) -> None:
    task, model, path = made("generation")
    run, prompt = load_run(path), task.test_pairs[0][0]
    ins = run.inspect(text=prompt)
    check_layout("generation", ins)
    assert ins.output == task.complete(model, [prompt], temperature=0.0)[0]
    dec = ins.stacks[0]
    ids = [task.vocab.index[t] for t in dec.queries]  # <bos> + prompt + continuation
    n = run.count_tokens(prompt)
    assert ids[:n] == [1, *task.vocab.encode(prompt)]
    assert task.vocab.decode(ids[n:]) == ins.output and ins.alignment is None
    ref = reference(model, torch.tensor([ids]), layers=["*self_attn"])
    same(dec.weights, [ref.weights(f"decoder.layers.{i}.self_attn")[0] for i in (0, 1)])
    assert all(bool(w.triu(1).eq(0).all()) for w in dec.weights)  # causal


def test_classification(made: Callable[[str], Made]) -> None:
    from attnlab.tasks.classification import CURRENCIES

    task, model, path = made("classification")
    run, doc = load_run(path), task.test_docs[0]
    ins = run.inspect(text="\n".join(doc.sentences))
    check_layout("classification", ins)
    pred, sentence_w = task.predict(model, [doc])
    assert ins.output is not None and ins.output.split()[0] == CURRENCIES[int(pred[0])]
    words, sentences = ins.stacks
    assert sentences.keys == words.queries == list(doc.sentences)
    torch.testing.assert_close(sentences.weights[0][0, 0], sentence_w[0, : len(doc.sentences)])
    with torch.no_grad():  # the weights the model itself returns, in float64
        out = copy.deepcopy(model).double()(task.encode([doc]).ids)
    lengths = [len(task.vocab.encode(s)) for s in doc.sentences]
    start = torch.tensor([0, *lengths]).cumsum(0)
    for j, n in enumerate(lengths):
        row = words.weights[0][0, j]  # this sentence's words, 0 elsewhere
        torch.testing.assert_close(
            row[start[j] : start[j] + n].double(), out.han.word_weights[0, j, :n]
        )
        assert float(row.sum()) == pytest.approx(float(row[start[j] : start[j] + n].sum()))
    p = out.logits[0].softmax(-1).max()
    assert ins.output.endswith(f"(p={float(p):.2f})")


def test_classification_names_with_full_stops(made: Callable[[str], Made]) -> None:
    """Texts naming "St. Lucia" or "U.S. Virgin Islands" (words of the task's vocabulary)
    give the output and stacks of the task's own encoding, one sentence per line (the
    inspector split sentences at every ".": "St." became <unk>, "Lucia" a sentence of its
    own, and the tiny model's output was another document's)."""
    from attnlab.tasks.classification import CURRENCIES, Document, currency_name

    task, model, path = made("classification")
    run = load_run(path)
    for sentences in (
        ["the customer lives in St. Lucia"],
        ["the customer does not live in France", "the customer moved to U.S. Virgin Islands"],
        ["the customer visited St. Kitts & Nevis on June 2, 2001", "the customer lives in Chad"],
    ):
        rows = [task.vocab.encode(s) for s in sentences]
        assert {"St.", "U.S."} & {task.vocab.tokens[i] for r in rows for i in r}  # known words
        ins = run.inspect(text="\n".join(sentences))
        words, sents = ins.stacks
        assert sents.keys == words.queries == sentences
        assert words.keys == [task.vocab.tokens[i] for r in rows for i in r]
        assert "<unk>" not in words.keys
        with torch.no_grad():
            out = model(task.encode([Document(tuple(sentences), 0, 0)]).ids)
        probs = out.logits[0].softmax(-1)
        code = CURRENCIES[int(probs.argmax())]
        assert ins.output == f"{code} {currency_name(code)} (p={float(probs.max()):.2f})"
        torch.testing.assert_close(sents.weights[0][0, 0], out.han.sentence_weights[0])
        start = 0
        for j, r in enumerate(rows):
            got = words.weights[0][0, j, start : start + len(r)]
            torch.testing.assert_close(got, out.han.word_weights[0, j, : len(r)])
            start += len(r)


def _rollout_by_hand(layers: list[Tensor]) -> Tensor:
    """Abnar & Zuidema's rollout from token 0 over tokens 1.., renormalized."""
    r = torch.eye(layers[0].shape[-1], dtype=torch.float64)
    for w in layers:  # (H, T, T)
        a = 0.5 * w.mean(0) + 0.5 * torch.eye(w.shape[-1], dtype=torch.float64)
        r = (a / a.sum(-1, keepdim=True)) @ r
    return r[0, 1:] / r[0, 1:].sum()


def test_vision(made: Callable[[str], Made]) -> None:
    task, model, path = made("vision")
    run, x = load_run(path), task.test_x[0, 0]  # (8, 8) in [0, 1]
    picture = Image.fromarray((x * 255).round().byte().numpy(), "L")
    ins = run.inspect(image=picture)
    check_layout("vision", ins)
    assert ins.pixels is not None and ins.grid == 4
    torch.testing.assert_close(ins.pixels, x, atol=0.5 / 255 + 1e-6, rtol=0)
    pred = task.predict(model, ins.pixels[None, None])
    assert ins.output is not None and ins.output.startswith(f"{int(pred[0])} (p=")
    ref = reference(model, ins.pixels[None, None], layers=["*self_attn"])
    layers = [ref.weights(f"encoder.layers.{i}.self_attn")[0][0] for i in (0, 1)]
    same(ins.stacks[0].weights, layers)
    (overlay,) = ins.overlays
    assert overlay.label == "rollout" and overlay.map.shape == (4, 4)
    torch.testing.assert_close(
        overlay.map.flatten().double(), _rollout_by_hand(layers), atol=2e-5, rtol=0
    )
    # the same digit drawn dark on light, large and with an alpha channel, reads the same
    big = Image.fromarray(255 - (x * 255).round().byte().numpy(), "L").resize(
        (80, 80), Image.NEAREST
    )
    again = run.inspect(image=big.convert("RGBA"))
    torch.testing.assert_close(again.pixels, ins.pixels, atol=1.5 / 255, rtol=0)


def test_captioning(made: Callable[[str], Made]) -> None:
    task, model, path = made("captioning")
    run, img = load_run(path), task.test_images[0]  # (3, 32, 32) uint8
    ins = run.inspect(image=Image.fromarray(img.permute(1, 2, 0).numpy(), "RGB"))
    check_layout("captioning", ins)
    assert ins.output == task.caption(model, img[None])[0]
    assert ins.pixels is not None and ins.grid == 8
    assert torch.equal(ins.pixels, img.permute(1, 2, 0).float() / 255)
    patches, words = ins.stacks
    assert ins.alignment is words and len(words.keys) == 64
    ids = [task.vocab.index[w] for w in words.queries if w != "</s>"]
    tgt = torch.tensor([[1, *ids]])[:, : len(words.queries)]  # the decoding steps
    ref = reference(model, img[None].float() / 255, tgt, layers=["attention", "*self_attn"])
    same(patches.weights, [ref.weights(f"encoder.layers.{i}.self_attn")[0] for i in (0, 1)])
    same(words.weights, [torch.cat([w[0] for w in ref.weights("attention")], 1)])
    assert [o.label for o in ins.overlays] == words.queries[: len(ids)]
    for i, o in enumerate(ins.overlays):
        assert torch.equal(o.map.flatten(), words.weights[0][0, i])


def test_examples_read(made: Callable[[str], Made]) -> None:
    for name in ("translation", "dates", "generation", "classification"):
        run = load_run(made(name)[2])
        assert run.input == "text" and run.example
        assert run.inspect(text=run.example).output is not None
        assert run.count_tokens(run.example) > 0
    for name in ("vision", "captioning"):
        run = load_run(made(name)[2])
        assert run.input == "image" and run.example == ""


def test_not_checkpoints(made: Callable[[str], Made], tmp_path: Path) -> None:
    good = made("dates")[2]
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + bytes(64))
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))  # safetensors, not attnlab
    no_task = save_checkpoint(tmp_path / "no_task.safetensors", Checkpoint({}, {"n": 1}))
    for bad in (junk, plain, no_task, tmp_path / "missing.safetensors"):
        check_and_control(
            lambda b=bad: run_task_name(b),
            lambda: run_task_name(good),
            CheckpointError,
            "is not a|does not exist",
        )
        with pytest.raises(CheckpointError, match=str(bad.name)):
            load_run(bad)
    other = save_checkpoint(tmp_path / "o.safetensors", Checkpoint({}, {"task": "chess"}))
    with pytest.raises(CheckpointError, match=r"'chess' checkpoint; known: \['captioning'"):
        load_run(other)


def test_task_name_reads_no_tensor(made: Callable[[str], Made], tmp_path: Path) -> None:
    good = made("translation")[2]
    raw = good.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header_only = tmp_path / "header.safetensors"
    header_only.write_bytes(raw[: 8 + n])  # every tensor's bytes cut off
    assert run_task_name(header_only) == "translation"
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_run(header_only)
    # weights that do not fit the config's model
    meta = json.loads(raw[8 : 8 + n])["__metadata__"]
    wrong = save_checkpoint(tmp_path / "w.safetensors", Checkpoint({}, json.loads(meta["config"])))
    with pytest.raises(CheckpointError, match="does not fit this model"):
        load_run(wrong)


def test_bad_input(made: Callable[[str], Made]) -> None:
    text_run, image_run = load_run(made("translation")[2]), load_run(made("vision")[2])
    dates = load_run(made("dates")[2])
    picture = Image.new("L", (8, 8))
    on_text = [
        ({"text": 5}, TypeError, "text must be a str, got int"),
        ({}, TypeError, "text must be a str, got NoneType"),
        ({"text": "  \n"}, ValueError, "text must hold at least one word"),
        ({"text": "vingt", "image": picture}, TypeError, "image: the translation model reads text"),
    ]
    for kwargs, exc, match in on_text:
        ok = lambda: text_run.inspect(text="vingt")  # noqa: E731
        check_and_control(lambda k=kwargs: text_run.inspect(**k), ok, exc, match)
    on_image = [
        ({"image": "digit.png"}, TypeError, "image must be a PIL.Image.Image, got str"),
        ({}, TypeError, "image must be a PIL.Image.Image, got NoneType"),
        ({"text": "7", "image": picture}, TypeError, "text: the vision model reads an image"),
        ({"image": Image.new("La", (4, 4))}, ValueError, "image: Pillow cannot read this La"),
    ]
    for kwargs, exc, match in on_image:
        ok = lambda: image_run.inspect(image=picture)  # noqa: E731
        check_and_control(lambda k=kwargs: image_run.inspect(**k), ok, exc, match)
    for text, match in [
        ("21 novembre 2026", r"text must be a locale tag .* \(no \[locale\] tag\)"),
        ("[xx_YY] 1/2/2000", r"among \[.*\]; got '\[xx_YY\] 1/2/2000' \(unknown locale 'xx_YY'\)"),
        ("[en_US]  ", r"text must be a locale tag .* \(no date after the tag\)"),
    ]:
        ok = lambda: dates.inspect(text=dates.example)  # noqa: E731
        check_and_control(lambda t=text: dates.inspect(text=t), ok, ValueError, match)
    check_and_control(
        lambda: text_run.count_tokens(3),  # type: ignore[arg-type]
        lambda: text_run.count_tokens("un"),
        TypeError,
        "text must be a str",
    )
    with pytest.raises(TypeError, match="text: the vision model reads images"):
        image_run.count_tokens("seven")


def test_threads_see_only_their_own_calls(made: Callable[[str], Made]) -> None:
    """Capture's hook is process-wide: inspections from several threads (a server's
    workers) must each record only their own model's calls, as when run one by one."""
    from concurrent.futures import ThreadPoolExecutor

    runs = [load_run(made(name)[2]) for name in ("translation", "generation", "dates")]
    alone = [r.inspect(text=r.example) for r in runs]
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda r: r.inspect(text=r.example), runs * 4))
    for i, ins in enumerate(together):
        want = alone[i % len(runs)]
        assert ins.output == want.output
        for a, b in zip(ins.stacks, want.stacks, strict=True):
            assert len(a.weights) == len(b.weights)
            assert all(torch.equal(x, y) for x, y in zip(a.weights, b.weights, strict=True))
