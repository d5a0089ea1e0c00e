"""The training loop, checkpoints, and seq2seq decoding."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

from attnlab.models.seq2seq import Seq2Seq, Seq2SeqConfig
from attnlab.tasks.text import Vocab, pad_batch
from attnlab.tasks.translation import TranslationTask
from attnlab.train import (
    Checkpoint,
    CheckpointError,
    TrainConfig,
    Trainer,
    load_checkpoint,
    lr_factor,
    save_checkpoint,
)
from attnlab.train import checkpoint as ckmod
from tests.conftest import check_and_control

pytest.importorskip("num2words")


@pytest.fixture(scope="module")
def task() -> TranslationTask:
    return TranslationTask(
        train_size=256, test_size=16, eval_size=16, d_model=32, dim_feedforward=64
    )


def _cfg(tmp: Path | None = None, **kw: object) -> TrainConfig:
    base = {"steps": 8, "batch_size": 32, "lr": 3e-3, "warmup": 2, "eval_every": 4}
    base.update(kw)
    return TrainConfig(**base, progress=False, out_dir=None if tmp is None else str(tmp))  # type: ignore[arg-type]


def test_loss_goes_down(task: TranslationTask) -> None:
    tr = Trainer(task, _cfg(steps=60, eval_every=60))
    losses = [tr.train_step() for _ in range(60)]
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5


def test_a_diverged_loss_stops_training_with_the_model_as_before(task: TranslationTask) -> None:
    """(With lr 1e30 training went on, and wrote NaN scores and "loss": NaN lines.)"""
    tr = Trainer(task, _cfg(lr=1e30, warmup=0))
    with pytest.raises(FloatingPointError, match=r"the loss is (nan|inf) at step \d+: training"):
        for _ in range(8):
            before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
            tr.train_step()
    for n, p in tr.model.named_parameters():  # the diverged step changed nothing
        assert torch.equal(p, before[n]), n
    Trainer(task, _cfg()).train_step()  # the control: a finite loss


def test_resume_takes_the_same_next_step(task: TranslationTask, tmp_path: Path) -> None:
    """Stop after 4 steps (checkpoint), resume, and the 5th step's loss is the same."""
    straight = Trainer(task, _cfg())
    losses = [straight.train_step() for _ in range(6)]
    first = Trainer(task, _cfg(tmp_path, target=-1.0))  # same schedule; stops at the 1st eval
    first.fit()
    assert (tmp_path / "last.safetensors").exists() and first.step == 4
    resumed = Trainer(task, _cfg(tmp_path, resume=True))
    assert resumed.step == 4
    assert [resumed.train_step(), resumed.train_step()] == pytest.approx(losses[4:], abs=1e-6)
    assert first.stop_reason is not None and "reached the target -1" in first.stop_reason
    assert resumed.first_step == 4 and resumed.stop_reason is None


def test_resume_on_another_training_set_is_refused(
    task: TranslationTask, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Trainer(task, _cfg(tmp_path, target=-1.0)).fit()
    assert Trainer(task, _cfg(tmp_path, resume=True)).step == 4  # control: the same data
    monkeypatch.setattr(task, "num_train", lambda: 255)
    # a CheckpointError: the command prints it as the other checkpoint errors, one line
    # without "ValueError:" or the --debug hint of an unexpected failure
    with pytest.raises(CheckpointError, match="was trained on 256 training examples, this"):
        Trainer(task, _cfg(tmp_path, resume=True))
    monkeypatch.undo()
    other = task.config() | {"model": task.config()["model"] | {"num_heads": 2}}
    monkeypatch.setattr(task, "config", lambda: other)  # the same shapes, other heads
    with pytest.raises(CheckpointError, match=r"another configuration .*: model.num_heads: 4 -> 2"):
        Trainer(task, _cfg(tmp_path, resume=True))


def test_a_checkpoint_with_an_empty_config_resumes_only_a_task_without_one(
    tmp_path: Path,
) -> None:
    """(An empty saved config skipped the config check: a hand-made file resumed into any
    task; a list failed with a bare AttributeError.) Every config was saved from the first
    format on, so none is missing: a file without one is corrupt."""
    path = tmp_path / "last.safetensors"
    ours = {"task": "toy", "model": {"d": 4}}
    check_and_control(
        lambda: ckmod.check_same_run(Checkpoint({}, {}), ours, 10, path),
        lambda: ckmod.check_same_run(Checkpoint({}, ours), ours, 10, path),
        CheckpointError,
        rf"^resume: {re.escape(str(path))} holds an empty config, .* names model, task\)",
    )
    ckmod.check_same_run(Checkpoint({}, {}), {}, 10, path)  # a task without a config
    with pytest.raises(TypeError, match=r"ckpt\.config must be a dict .*, got list"):
        save_checkpoint(path, Checkpoint({}, [1]))  # type: ignore[arg-type]
    tensors, meta = ckmod._flatten(Checkpoint({"w": torch.ones(1)}))
    meta |= {"config": "[1]"}
    ckmod.save_file(tensors, str(path), metadata=meta | {"digest": ckmod.digest(tensors, meta)})
    with pytest.raises(CheckpointError, match=r"metadata \(TypeError: its config is a list, not"):
        load_checkpoint(path)


def test_run_task_says_why_it_stopped_and_where_it_resumed(
    task: TranslationTask, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from attnlab.tasks.registry import spec
    from attnlab.tasks.run import run_task

    s = dataclasses.replace(spec("translation"), finish=None)
    run_task(s, task, _cfg(tmp_path, target=-1.0), tmp_path)
    out = capsys.readouterr().out
    assert "trained 4 steps in" in out and "stopped early at step 4: score" in out
    assert re.search(r"in \d+ s \(\d+ s of it evaluating\)", out), out
    run_task(s, task, _cfg(tmp_path, resume=True), tmp_path)  # on to step 8
    out = capsys.readouterr().out
    assert "trained 4 steps (resumed at step 4, now at 8) in" in out and "stopped" not in out


def test_same_seed_same_run(task: TranslationTask) -> None:
    a = [Trainer(task, _cfg(seed=3)).train_step() for _ in range(1)]
    b = [Trainer(task, _cfg(seed=3)).train_step() for _ in range(1)]
    c = [Trainer(task, _cfg(seed=4)).train_step() for _ in range(1)]
    assert a == b and a != c


def test_corrupt_and_truncated_checkpoints_give_clear_errors(tmp_path: Path) -> None:
    good = save_checkpoint(
        tmp_path / "ok.safetensors", Checkpoint(torch.nn.Linear(3, 3).state_dict())
    )
    data = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    for name in ("cut", "junk"):
        check_and_control(
            lambda n=name: load_checkpoint(tmp_path / f"{n}.safetensors"),  # type: ignore[misc]
            lambda: load_checkpoint(good),
            CheckpointError,
            "is truncated or corrupt",
        )
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file  # metadata of bad JSON: a bare JSONDecodeError

    meta = {"format": "attnlab-checkpoint-1", "config": "{bad", "optimizer": "null", "state": "{}"}
    save_file({"model.w": torch.zeros(2)}, str(tmp_path / "meta.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match=r"has corrupt metadata \(JSONDecodeError"):
        load_checkpoint(tmp_path / "meta.safetensors")
    raw = bytearray(good.read_bytes())  # the weights' bytes damaged, the header intact
    raw[-20:-10] = b"\xff" * 10
    (tmp_path / "bytes.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="is corrupt: its tensors or metadata do not match"):
        load_checkpoint(tmp_path / "bytes.safetensors")


def test_tied_weights_are_saved_and_loaded(tmp_path: Path) -> None:
    """(safetensors refused the shared tensor: "Some tensors share memory".)"""

    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.out = torch.nn.Embedding(4, 3), torch.nn.Linear(3, 4, bias=False)
            self.out.weight = self.emb.weight

    a, b = Tied(), Tied()
    p = save_checkpoint(tmp_path / "t.safetensors", Checkpoint(a.state_dict()))
    ckmod.load_model_state(b, load_checkpoint(p))
    assert torch.equal(b.emb.weight, a.emb.weight) and b.out.weight is b.emb.weight


def test_a_state_tensor_shared_with_the_model_is_saved(tmp_path: Path) -> None:
    """(Only the model's tensors were de-shared: an EMA copy that is the model's weight
    raised safetensors' "Some tensors share memory".)"""
    w = torch.arange(3.0)
    p = save_checkpoint(tmp_path / "s.safetensors", Checkpoint({"w": w}, state={"ema": w}))
    ck = load_checkpoint(p)
    assert torch.equal(ck.state["ema"], w) and torch.equal(ck.model["w"], w)


@pytest.mark.parametrize(
    ("state", "match"),
    [
        ({"best": {0.5}}, r"ckpt.state\['best'\] must be a tensor or JSON-able.*, got set"),
        ({1: 2}, r"ckpt.state must be a dict with str keys, got key 1 \(int\)"),
        ([("step", 1)], r"ckpt.state must be a dict with str keys, got list"),
    ],
)  # fmt: skip
def test_a_state_that_cannot_be_saved_is_named(tmp_path: Path, state: object, match: str) -> None:
    """(A set, or a numpy float, raised json's bare "Object of type set is not JSON
    serializable", an int key came back as the str '1' and a list "no attribute 'items'".)"""
    path = tmp_path / "s.safetensors"
    check_and_control(
        lambda: save_checkpoint(path, Checkpoint({"w": torch.ones(1)}, state=state)),  # type: ignore[arg-type]
        lambda: save_checkpoint(path, Checkpoint({"w": torch.ones(1)}, state={"best": 0.5})),
        TypeError,
        match,
    )


def test_a_checkpoint_without_training_state_is_named(
    task: TranslationTask, tmp_path: Path
) -> None:
    """(A checkpoint of weights alone, resumed, raised a bare KeyError: 'step'.)"""
    model = task.build_model()
    save_checkpoint(tmp_path / "last.safetensors", Checkpoint(model.state_dict(), task.config()))
    with pytest.raises(CheckpointError, match=r"holds no training state .*KeyError"):
        Trainer(task, _cfg(tmp_path, resume=True))


def test_a_crash_during_save_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "last.safetensors"
    save_checkpoint(path, Checkpoint({"w": torch.ones(2)}, {"version": 1}))

    def crash(*args: object, **kw: object) -> None:
        Path(str(args[1])).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckmod, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, Checkpoint({"w": torch.zeros(2)}, {"version": 2}))
    assert load_checkpoint(path).config == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.safetensors"]  # no temp files left


def test_checkpoint_round_trip_with_optimizer_state(task: TranslationTask, tmp_path: Path) -> None:
    tr = Trainer(task, _cfg(tmp_path, steps=4))
    tr.fit()
    ck = load_checkpoint(tmp_path / "last.safetensors")
    assert ck.config["task"] == "translation" and ck.state["step"] == 4
    ref = tr.opt.state_dict()
    assert ck.optimizer is not None
    assert ck.optimizer["param_groups"] == json.loads(json.dumps(ref["param_groups"]))
    for pid, st in ref["state"].items():
        for k, v in st.items():
            assert torch.equal(ck.optimizer["state"][pid][k], v), (pid, k)
    for k, v in tr.model.state_dict().items():
        assert torch.equal(ck.model[k], v), k


def test_lr_schedule() -> None:
    cfg = TrainConfig(steps=110, warmup=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(110, cfg) == pytest.approx(0.1)


def _naive_greedy(
    model: Seq2Seq, src: torch.Tensor, lengths: torch.Tensor, steps: int
) -> list[list[int]]:
    """Greedy decoding by re-running the whole decoder on the prefix (no cache)."""
    tokens = torch.ones(src.shape[0], 1, dtype=torch.long)
    for _ in range(steps):
        nxt = model(src, lengths, tokens)[:, -1].argmax(-1)
        tokens = torch.cat([tokens, nxt[:, None]], 1)
    out = []
    for row in tokens[:, 1:].tolist():
        out.append(row[: row.index(2)] if 2 in row else row)
    return out


def test_cached_greedy_equals_uncached_and_beam_is_no_worse() -> None:
    torch.manual_seed(0)
    model = Seq2Seq(Seq2SeqConfig(src_vocab=20, tgt_vocab=9, d_model=32, num_heads=4)).eval()
    src, lengths = pad_batch([[5, 6, 7, 8], [9, 10], [11, 12, 13]])
    assert model.generate(src, lengths, max_len=6) == _naive_greedy(model, src, lengths, 6)

    def logprob(row: list[int], b: int) -> float:
        ids = torch.tensor([[1, *row]])
        logp = torch.log_softmax(model(src[b : b + 1], lengths[b : b + 1], ids), -1)[0]
        tgt = [*row, 2] if len(row) < 6 else row
        return float(sum(logp[i, t] for i, t in enumerate(tgt)).detach())

    greedy, beam = (
        model.generate(src, lengths, max_len=6),
        model.generate(src, lengths, max_len=6, beam=4),
    )
    for b in range(3):  # beam search finds a sequence at least as likely as greedy's
        assert logprob(beam[b], b) >= logprob(greedy[b], b) - 1e-5


def test_vocab_round_trip_and_errors() -> None:
    text = "quatre-vingt-dix-sept mille trois cent deux"
    v = Vocab.build([text])
    assert v.decode(v.encode(text)) == text and v.encode("inconnu") == [3]
    check_and_control(
        lambda: Vocab(["a", "b"]),
        lambda: Vocab(["<pad>", "<bos>", "<eos>", "<unk>", "a"]),
        ValueError,
        "tokens must start with",
    )


def test_report_has_alignment_pictures(task: TranslationTask, tmp_path: Path) -> None:
    from attnlab.tasks.translation import cross_alignment, write_report

    model = task.build_model().eval()
    assert isinstance(model, Seq2Seq)
    src, ref = task.test_pairs[0]
    w = cross_alignment(task, model, src, ref)  # (Lt + 1, Ls): one row per output step
    assert w.shape == (len(task.tgt_vocab.encode(ref)) + 1, len(task.src_vocab.encode(src)))
    assert torch.allclose(w.sum(-1), torch.ones(w.shape[0]), atol=1e-5)
    page = write_report(task, model, [(src, "x", ref)], {"exact": 0.0}, tmp_path)
    text = page.read_text()
    assert text.count("data:image/png;base64,") == 1
    assert "http" not in text.replace("http-equiv", "")  # no link out (the CSP meta aside)
    assert (tmp_path / "alignment_0.png").stat().st_size > 1000


def test_fit_leaves_threads_and_denormals_as_it_found_them(task: TranslationTask) -> None:
    threads = torch.get_num_threads()
    Trainer(task, _cfg(steps=2, eval_every=2, threads=1)).fit()
    assert torch.get_num_threads() == threads
    tiny = torch.tensor(1e-310, dtype=torch.float64)  # a denormal
    assert float(tiny * 1.0) != 0.0  # flush-to-zero was switched off again


@pytest.mark.parametrize(
    ("kw", "exc", "match"),
    [
        ({"seed": 2**60}, ValueError, r"seed must be an int in \[0, 4294967295\], got"),
        ({"resume": "no"}, TypeError, "resume must be a bool, got str"),  # "no" resumed
        ({"progress": "no"}, TypeError, "progress must be a bool, got str"),
        ({"flush_denormal": 2}, TypeError, "flush_denormal must be a bool, got int"),
        ({"out_dir": ""}, ValueError, r"out_dir must be a directory path or None .*got ''"),
    ],
)
def test_train_config_checks_seeds_and_flags(kw: dict, exc: type, match: str) -> None:
    """(A seed of 2**60 passed and failed in the first step: "Overflow when unpacking long
    long"; the flags took any value; out_dir="" wrote no files and resumed nothing.)"""
    base = {"steps": 8, "batch_size": 32}
    with pytest.raises(exc, match=match):
        TrainConfig(**base, **kw)
    assert TrainConfig(**base, seed=2**32 - 1, progress=False).seed == 2**32 - 1  # control


CHILD = """
import json, torch
from torch import nn
from attnlab.train import TrainConfig, Trainer

class Toy:
    name = "toy"
    x, y = torch.randn(32, 3), torch.randn(32, 1)
    def build_model(self): return nn.Linear(3, 1)
    def config(self): return {"task": "toy"}
    def num_train(self): return 32
    def batch(self, i): return self.x[i], self.y[i]
    def loss(self, m, b): return (m(b[0]) - b[1]).pow(2).mean()
    def evaluate(self, m): return {"score": 0.25, "a_long_metric_name": 1 / 3}

cfg = TrainConfig(steps=2, batch_size=8, eval_every=1, progress=True)
Trainer(Toy(), cfg, on_eval=lambda r: print(json.dumps(r), flush=True)).fit()
"""


@pytest.mark.skipif(sys.platform != "linux", reason="a pseudo-terminal through pty")
def test_eval_lines_stay_whole_under_the_progress_bar_on_a_narrow_terminal() -> None:
    """(On a terminal, the progress bar's console cut each evaluation's JSON line at the
    terminal's width: ``{"step": 2, ..., "score": `` newline ``0.0}``.)"""
    import os
    import pty

    seen: list[bytes] = []

    def read(fd: int) -> bytes:
        seen.append(os.read(fd, 4096))
        return seen[-1]

    status = pty.spawn(["env", "COLUMNS=40", sys.executable, "-c", CHILD], read)
    text = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", b"".join(seen).decode(errors="replace"))
    assert os.waitstatus_to_exitcode(status) == 0, text
    lines = [ln for ln in re.split(r"[\r\n]+", text) if ln.startswith('{"step"')]
    assert [json.loads(ln)["step"] for ln in lines] == [1, 2], text  # each whole: parses
    assert len(lines[0]) > 40  # wider than the terminal (the control: it could be cut)


class LinearTask:
    """A tiny regression task: what the trainer needs and nothing more."""

    name = "linear"

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(32, 3, generator=g), torch.randn(32, 1, generator=g)

    def build_model(self) -> torch.nn.Module:
        return torch.nn.Linear(3, 1)

    def config(self) -> dict[str, object]:
        return {"task": "linear"}

    def num_train(self) -> int:
        return 32

    def batch(self, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]

    def loss(self, m: torch.nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return (m(b[0]) - b[1]).pow(2).mean()

    def evaluate(self, m: torch.nn.Module) -> dict[str, float]:
        return {"score": -float(self.loss(m, (self.x, self.y)))}


@pytest.mark.parametrize(("batch_size", "examples"), [(64, 32), (8, 8)])
def test_progress_counts_the_examples_a_step_really_took(
    monkeypatch: pytest.MonkeyPatch, batch_size: int, examples: int
) -> None:
    """A clock that ticks 1 s per reading: ex/s is the step's examples. With 32 training
    examples and batch_size 64 a step takes 32, and 64 ex/s was shown (2x)."""
    from types import SimpleNamespace

    from attnlab.train import _progress, loop

    ticks = iter(range(10**6))
    monkeypatch.setattr(loop, "time", SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    speeds: list[float] = []
    monkeypatch.setattr(_progress.progress_bar, "_advance", lambda self, loss, s: speeds.append(s))
    cfg = TrainConfig(steps=3, batch_size=batch_size, eval_every=3, progress=True)
    Trainer(LinearTask(), cfg).fit()
    assert speeds == [examples] * 3


class DropoutTask(LinearTask):
    """:class:`LinearTask` with dropout on its inputs: each step draws from torch's RNG."""

    def build_model(self) -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Linear(3, 1))


@pytest.mark.parametrize("fit", [True, False])
def test_a_draw_between_trainer_and_fit_changes_no_step(fit: bool) -> None:
    """(Dropout drew from the global RNG as it stood when fit() ran: one torch.rand(1)
    between Trainer(...) and fit() changed the run; the seed is meant to fix it.)"""
    cfg = TrainConfig(steps=4, batch_size=8, eval_every=4, progress=False, seed=3)

    def run(draw: bool) -> list[torch.Tensor]:
        tr = Trainer(DropoutTask(), cfg)
        if draw:
            torch.rand(5)
        if fit:
            tr.fit()
        else:
            for _ in range(cfg.steps):
                tr.train_step()
        return [p.detach().clone() for p in tr.model.parameters()]

    def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
        return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))

    plain = run(False)
    assert same(run(True), plain)
    tr = Trainer(DropoutTask(), cfg)  # the control: a draw after the first step does
    tr.train_step()  # change the next steps' dropout masks
    torch.rand(5)
    for _ in range(cfg.steps - 1):
        tr.train_step()
    assert not same([p.detach() for p in tr.model.parameters()], plain)


def test_train_config_keeps_numpy_numbers_as_plain_ones(tmp_path: Path) -> None:
    """(numpy scalars passed the checks but were kept: lr=np.float32(1e-3) failed the first
    checkpoint with "Object of type float32 is not JSON serializable", steps and
    eval_every as np.int64 the same, batch_size=np.int64(8) "an integer is required" from
    torch's manual_seed.)"""
    np = pytest.importorskip("numpy")
    cfg = TrainConfig(
        steps=np.int64(2), batch_size=np.int64(8), eval_every=np.int64(2), lr=np.float32(1e-3),
        warmup=np.int32(1), seed=np.uint8(3), clip=np.float64(1), target=np.float16(2),
        time_limit=np.int64(60), patience=np.int64(3), threads=np.int64(1),
        out_dir=str(tmp_path), progress=False,
    )  # fmt: skip
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        assert type(value) in (int, float, bool, str, type(None)), (f.name, type(value))
    assert (cfg.steps, cfg.batch_size, cfg.seed, cfg.lr) == (2, 8, 3, float(np.float32(1e-3)))
    assert Trainer(LinearTask(), cfg).fit()[-1]["step"] == 2
    assert load_checkpoint(tmp_path / "last.safetensors").state["train"]["batch_size"] == 8


def test_wrong_typed_arguments_are_named_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """(Trainer(task, {"steps": 2}) raised "'dict' object has no attribute 'threads'",
    on_eval=5 "'int' object is not callable" only at the first evaluation, save_checkpoint
    of a dict "no attribute 'model'", lr_factor(3, a dict) "no attribute 'warmup'",
    spec(["x"]) "unhashable type: 'list'", and run_task with a str report "unsupported
    operand type(s) for /: 'str' and 'str'" after all its training.)"""
    from attnlab.tasks import run_task, spec

    cfg = TrainConfig(steps=2, batch_size=8, eval_every=2, progress=False)
    cases = [
        (lambda: Trainer(LinearTask(), {"steps": 2}), "cfg must be a TrainConfig, got dict"),  # type: ignore[arg-type]
        (lambda: Trainer(LinearTask(), cfg, on_eval=5), "on_eval must be a callable or None"),  # type: ignore[arg-type]
        (lambda: save_checkpoint(tmp_path / "x.safetensors", {}), "ckpt must be a Checkpoint"),  # type: ignore[arg-type]
        (lambda: lr_factor(3, {"steps": 3}), "cfg must be a TrainConfig, got dict"),  # type: ignore[arg-type]
        (lambda: lr_factor(1.5, cfg), r"step must be an int >= 0, got 1.5"),  # type: ignore[arg-type]
        (lambda: spec(["x"]), r"task must be a task name, one of \[.*\], got list"),  # type: ignore[arg-type]
    ]  # fmt: skip
    for call, match in cases:
        with pytest.raises(TypeError, match=match):
            call()
    assert not (tmp_path / "x.safetensors").exists()
    seen: list[object] = []
    s = dataclasses.replace(spec("translation"), finish=lambda t, m, r: seen.append(r) or {})
    with pytest.raises(TypeError, match="report must be a str or Path"):
        run_task(s, LinearTask(), cfg, 5)  # type: ignore[arg-type]
    assert "data:" not in capsys.readouterr().out  # refused before any training
    run_task(s, LinearTask(), cfg, str(tmp_path / "report"))  # the control: a str will do
    assert seen == [tmp_path / "report"] and isinstance(seen[0], Path)
    assert Trainer(LinearTask(), cfg, on_eval=seen.append).fit()[-1] == seen[-1]


def _format_1(path: Path, **replace: str) -> Path:
    """Rewrite the checkpoint at ``path`` as the code before format 2 wrote it (a digest
    of the tensors alone), with ``replace``'s metadata fields changed."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    meta |= {"format": "attnlab-checkpoint-1", "digest": ckmod.digest(tensors), **replace}
    save_file(tensors, str(path), metadata=meta)
    return path


def test_the_digest_covers_the_metadata_and_format_1_still_loads(tmp_path: Path) -> None:
    """(The digest covered the tensors only: "step": 4 -> 5 in last.safetensors resumed
    silently at step 5, 476 of 2416 one-bit flips in the header loaded, and "params" ->
    "paramr" raised a bare KeyError: 'params' from the optimizer, exit 1.)"""
    cfg = TrainConfig(steps=4, batch_size=8, eval_every=4, progress=False, out_dir=str(tmp_path))
    Trainer(LinearTask(), cfg).fit()
    path = tmp_path / "last.safetensors"
    good = path.read_bytes()
    assert load_checkpoint(path).state["step"] == 4  # the control
    path.write_bytes(good.replace(b'\\"step\\": 4,', b'\\"step\\": 5,', 1))
    with pytest.raises(CheckpointError, match="is corrupt: its tensors or metadata do not"):
        load_checkpoint(path)
    path.write_bytes(good)
    state = load_checkpoint(_format_1(path)).state  # what the code before wrote loads
    resumed = Trainer(LinearTask(), dataclasses.replace(cfg, steps=6, resume=True))
    assert resumed.step == state["step"] == 4
    opt = load_checkpoint(path).optimizer
    assert opt is not None
    path.write_bytes(good)
    bad = json.dumps(opt["param_groups"]).replace('"params"', '"paramr"')
    _format_1(path, optimizer=json.dumps({"param_groups": json.loads(bad), "state": {}}))
    with pytest.raises(CheckpointError, match="holds an optimizer state that does not fit"):
        Trainer(LinearTask(), dataclasses.replace(cfg, resume=True))


def test_trainer_and_checkpoint_arguments_the_audit_found_unnamed(tmp_path: Path) -> None:
    """(Trainer(None, cfg) raised "'NoneType' object has no attribute 'loss'"; one plug-in
    not in a list, "'FGM' object is not iterable"; load_checkpoint(123), "expected str,
    bytes or os.PathLike object"; Checkpoint(5), "'int' object has no attribute 'items'";
    a config holding an object, json's message naming nothing.)"""
    from attnlab.robust import FGM
    from attnlab.tasks.dates import DatesTask

    cfg = TrainConfig(steps=2, batch_size=8, eval_every=2, progress=False)
    task = DatesTask(train_size=64, test_size=8, hidden=8)

    class NoModel(DatesTask):
        def build_model(self) -> torch.nn.Module:
            return 5  # type: ignore[return-value]

    check_and_control(
        lambda: Trainer(None, cfg),  # type: ignore[arg-type]
        lambda: Trainer(task, cfg),
        TypeError,
        "task must be a Task .* got NoneType without build_model",
    )
    with pytest.raises(TypeError, match=r"task\.build_model\(\) must be a torch\.nn\.Module"):
        Trainer(NoModel(train_size=64, test_size=8, hidden=8), cfg)
    check_and_control(
        lambda: Trainer(task, cfg, plugins=FGM(0.1)),  # type: ignore[arg-type]
        lambda: Trainer(task, cfg, plugins=[FGM(0.1)]),
        TypeError,
        r"plugins must be a list of plug-ins .* got FGM: pass \[plugin\]",
    )
    good = Checkpoint(torch.nn.Linear(2, 2).state_dict(), {"a": 1})
    path = tmp_path / "ck.safetensors"
    for call in (lambda: load_checkpoint(123), lambda: save_checkpoint(123, good)):  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="path must be a str or Path, got int"):
            call()
    with pytest.raises(TypeError, match=r"ckpt\.model must be a state_dict \(str -> Tensor\)"):
        save_checkpoint(path, Checkpoint(5))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"ckpt\.config must be JSON-able .* type object"):
        save_checkpoint(path, Checkpoint({}, {"a": object()}))
    assert not path.exists()
    assert load_checkpoint(save_checkpoint(path, good)).config == {"a": 1}  # the control


def test_a_fresh_run_does_not_keep_an_earlier_runs_best(
    task: TranslationTask, tmp_path: Path
) -> None:
    """(A fresh run into a used folder, stopped before its first evaluation, left the
    earlier run's best.safetensors beside its own last one: ``serve --runs`` opened it as
    this run's model.) A resumed run keeps its best."""
    cfg = TrainConfig(steps=2, batch_size=4, eval_every=100, out_dir=str(tmp_path), progress=False)
    earlier = Trainer(task, cfg)
    earlier._save("best.safetensors")
    best = tmp_path / "best.safetensors"
    fresh = Trainer(task, cfg)
    fresh.train_step()
    fresh._save("last.safetensors")  # as a Ctrl-C saves it
    assert not best.exists()
    fresh._evaluate(fresh.train_step(), 0.0)  # saves last, which records it, then best
    resumed = Trainer(task, dataclasses.replace(cfg, resume=True))
    resumed._save("last.safetensors")
    assert best.exists()  # its own run's
