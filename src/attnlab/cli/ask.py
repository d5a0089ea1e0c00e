"""``attnlab ask QUESTION`` and ``attnlab summarize FILE``: QA and summaries on real text.

Thin runners over :mod:`attnlab.apps`: arguments are checked (and the documents read)
before the model loads; bad input is one line on stderr, exit status 2 (an ``--out`` that
is one of the inputs included). The index is built once per document set and reused;
both commands redraw a progress line on stderr while they embed, and print warnings (a
sentence cut to the model's length) as ``attnlab CMD: warning: ...`` lines.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from attnlab.apps import Answer, Document, ask, load_documents, split_document, summarize
from attnlab.apps.ask import check_question
from attnlab.apps.corpus import check_prose
from attnlab.apps.documents import document_files
from attnlab.apps.index import check_cache, default_cache, saved_sentences
from attnlab.apps.report import answers_html, summary_html
from attnlab.apps.summarize import check_length
from attnlab.cli._args import (
    check_html_out,
    check_not_empty,
    check_not_input,
    check_out_file,
    check_out_folder,
    check_outputs_not_inputs,
    clean_text,
    clip,
    int_in,
    reachable,
    shown,
)
from attnlab.cli._errors import UsageError, warn, warnings_as_lines
from attnlab.cli._paths import user_path
from attnlab.cli._sentence import add_model_option, load_encoder, model_folder

__all__ = ["add_parsers", "run_ask", "run_summarize"]


def add_parsers(sub: Any) -> None:
    """Add the ``ask`` and ``summarize`` subcommands to an argparse subparsers object."""
    p = sub.add_parser("ask", help="answer a question from documents (default: Python's reference)")
    p.add_argument("question", metavar="QUESTION")
    p.add_argument(
        "--docs", nargs="+", type=user_path, default=["pydoc"], metavar="PATH",
        help="text files or folders (.txt .md .rst), or pydoc: Python's reference (default pydoc)",
    )  # fmt: skip
    p.add_argument(
        "--top", type=int_in(1, 50), default=3, help="how many answers (default %(default)s)"
    )
    p.add_argument("--out", type=user_path, default=None, help="also write an HTML report here")
    p.add_argument(
        "--cache", type=user_path, default=None, help="the index folder (default beside the docs)"
    )
    p.add_argument("--no-explain", action="store_true", help="skip the word-match explanation")
    add_model_option(p)
    p.set_defaults(run=run_ask)
    s = sub.add_parser("summarize", help="extractive summary of a text file, with salience")
    s.add_argument(
        "file", metavar="FILE", type=user_path, help="a text file, or pydoc:TOPIC (e.g. pydoc:with)"
    )
    s.add_argument(
        "--sentences",
        type=int_in(1),
        default=3,
        help="sentences in the summary (default %(default)s)",
    )
    s.add_argument("--out", type=user_path, default=None, help="also write an HTML page here")
    add_model_option(s)
    s.set_defaults(run=run_summarize)


@contextmanager
def _progress_line(
    label: str, unit: str = "sentences embedded"
) -> Iterator[Callable[[int, int], None]]:
    """A ``progress(done, total)`` that redraws one stderr line, ``label: done/total
    unit``; a line the work leaves unfinished (Ctrl-C, an error) is ended on the way
    out, so that the next message starts on a line of its own."""
    unfinished = False

    def progress(done: int, total: int) -> None:
        nonlocal unfinished
        unfinished = done < total
        end = "" if unfinished else "\n"
        print(f"\r{label}: {done}/{total} {unit}", end=end, file=sys.stderr, flush=True)

    try:
        yield progress
    finally:
        if unfinished:
            print(file=sys.stderr, flush=True)


def _documents(docs: list[str]) -> tuple[list[Document], list[Path]]:
    """The documents ``--docs`` names and the files they were read from."""
    try:
        return load_documents(docs), document_files(docs)
    except ValueError as e:
        raise UsageError("--docs", str(e).removeprefix("docs: ")) from None


def _out_file(out: str | None, inputs: Sequence[Path], model: str | None) -> Path | None:
    """``--out`` checked: a writable HTML file that is none of the ``inputs`` and no file
    of the ``--model`` folder (without one, of the shipped model's)."""
    if out is None:
        return None
    path = check_out_file("--out", out)
    check_not_input("--out", path, inputs)
    check_outputs_not_inputs("--out", [path], model_folder(model))
    check_html_out("--out", path)
    return path


def _print_answer(rank: int, a: Answer) -> None:
    where = shown(f"{a.sentence.doc} / {a.sentence.section}").rstrip(" /")
    print(f"{rank}. {a.sentence.text}\n   [{where}]  score {a.score:.3f}")
    others = [t for t in a.context if t != a.sentence.text]
    if others:
        print(
            "   context: " + " ".join(t if t != a.sentence.text else f">>{t}<<" for t in a.context)
        )
    m = a.matches
    if m is not None:
        pairs = ", ".join(f"{q} <-> {p} ({v:+.3f})" for q, p, v in m.top_pairs(5))
        print(f"   matched words (share of cosine {m.cosine:.3f}): {pairs}")
        words = zip(m.question_ig[1:-1], m.question[1:-1], strict=True)  # not [CLS], [SEP]
        ranked = sorted(words, reverse=True)[:5]
        print(
            "   question words (integrated gradients): "
            + ", ".join(f"{w} {v:+.3f}" for v, w in ranked)
        )


def run_ask(args: argparse.Namespace) -> int:
    """``attnlab ask``."""
    text = clean_text(args, "QUESTION", args.question)
    try:
        question = check_question(text)
    except ValueError as e:
        raise UsageError("QUESTION", str(e).removeprefix("question ")) from None
    documents, inputs = _documents(args.docs)  # read and checked before the model loads
    out = _out_file(args.out, inputs, args.model)
    cache = _cache(args)
    # a --model folder loads (its files checked) before the first document is split, as in
    # summarize; the shipped model after, so that docs of only code load no model
    enc = None if args.model is None else load_encoder(args.model)[0]
    # each document split once a run (here or in ask), none the saved index holds unchanged
    saved = saved_sentences(documents, cache if isinstance(cache, Path) else None)
    try:
        split = check_prose(documents, saved)
    except ValueError as e:  # only code: said before the model loads, as summarize does
        raise UsageError("--docs", str(e).removeprefix("docs: ")) from None
    enc = load_encoder(None)[0] if enc is None else enc
    with warnings_as_lines(args), _progress_line("indexing") as progress:
        try:
            answers = ask(
                question,
                args.docs,
                top=args.top,
                encoder=enc,
                cache=cache,
                explain=not args.no_explain,
                progress=progress,
                split=split,
            )
        except ValueError as e:  # the documents' own problem (no prose): a usage error
            if not str(e).startswith("docs: "):
                raise
            raise UsageError("--docs", str(e).removeprefix("docs: ")) from None
    for i, a in enumerate(answers):
        _print_answer(i + 1, a)
    if out is not None:
        print(f"wrote {shown(answers_html(question, answers, out))}")
    return 0


# how an error about the index folder names it when --cache was not given
DEFAULT_CACHE = "--docs (the index folder kept for them; --cache DIR gives another)"


def _cache(args: argparse.Namespace) -> Path | bool:
    """The index folder, checked before any work: ``--cache``'s, as any output folder, or
    the default one of ``--docs``, which is refused as a link to a missing place or a
    file, and when it cannot be written is ``False`` (an index in memory; one warning
    line: it failed after every sentence was embedded). Either one holding an
    ``index.json`` that attnlab did not write, or one that cannot be read, is refused
    (naming ``--cache``, or ``--docs`` when the folder is theirs by default)."""
    name = DEFAULT_CACHE if args.cache is None else "--cache"
    folder = _default_cache(args) if args.cache is None else check_out_folder(name, args.cache)
    if folder is None:
        return False
    try:  # a folder holding a user's own index.json, or a damaged one
        return check_cache(folder)
    except ValueError as e:
        raise UsageError(name, str(e).removeprefix("folder ")) from None


def _default_cache(args: argparse.Namespace) -> Path | None:
    """The default index folder of ``--docs``, or None (said) where it cannot be written."""
    folder = reachable(DEFAULT_CACHE, default_cache(args.docs))  # (a dangling link: exit 1)
    if folder.exists() and not folder.is_dir():
        raise UsageError(DEFAULT_CACHE, f"{str(folder)!r} is a file, not a folder")
    near = next(p for p in (folder, *folder.parents) if p.exists())
    if os.access(near, os.W_OK | os.X_OK) and (near == folder or near.is_dir()):
        return folder
    warn(args, f"cannot write the index to {str(folder)!r}; it is built in memory and not "
               "kept (give --cache DIR to keep it)")  # fmt: skip
    return None


def _summary_doc(name: str) -> Document:
    """The document ``FILE`` names: a text file, or ``pydoc:TOPIC``."""
    check_not_empty("FILE", name)
    if name.startswith("pydoc:"):
        topic = name.removeprefix("pydoc:")
        docs = {d.name: d for d in load_documents("pydoc")}
        if topic not in docs:
            raise UsageError("FILE", f"{topic!r} is not a topic of the reference; e.g. pydoc:with")
        return docs[topic]
    if name == "pydoc" and not Path(name).exists():  # load_documents reads the reference
        raise UsageError(
            "FILE", "'pydoc' is not a file; for a topic of Python's reference give "
            "pydoc:TOPIC (e.g. pydoc:with)"
        )  # fmt: skip
    if reachable("FILE", name).is_dir():  # (a name past 255 bytes: a bare OSError, exit 1)
        raise UsageError("FILE", f"{name!r} is a folder; give one text file")
    try:  # a file named "pydoc" by its full path, not the reference
        text = load_documents([Path(name).absolute() if name == "pydoc" else name])[0].text
    except ValueError as e:
        raise UsageError("FILE", str(e).removeprefix("docs: ")) from None
    return Document(name, text)  # named as given (load_documents names it by its file name)


LONG_TEXT = 100_000  # characters: pysbd splits these in about 5 s or more, so say so


def run_summarize(args: argparse.Namespace) -> int:
    """``attnlab summarize``."""
    doc = _summary_doc(args.file)
    inputs = [] if args.file.startswith("pydoc:") else [Path(args.file)]
    out = _out_file(args.out, inputs, args.model)  # (named after seconds of splitting, below)
    # a --model folder loads (so its files are checked) before the seconds to minutes of
    # splitting (an unusable one was refused after them); the shipped model after, so a
    # file of no prose is refused without loading one
    enc = None if args.model is None else load_encoder(args.model)[0]
    with _progress_line("reading", "paragraphs split into sentences") as progress:
        long = len(doc.text) > LONG_TEXT  # (a 6,000-sentence file: 73 s without a word)
        split = split_document(doc, progress if long else None)
    n = len(split)
    if not n:
        raise UsageError("FILE", f"{doc.name!r} has no prose sentences (empty, or only code)")
    try:
        check_length(n)
    except ValueError as e:
        raise UsageError("FILE", f"{doc.name!r}: {e}".replace(": text has", " has")) from None
    enc = load_encoder(None)[0] if enc is None else enc
    with warnings_as_lines(args), _progress_line("summarizing") as progress:
        summary = summarize(doc, args.sentences, encoder=enc, progress=progress, split=split)
    print(summary.text)
    print("\nsalience (PageRank over sentence similarity; sums to 1):")
    for i, (s, v) in enumerate(zip(summary.sentences, summary.salience, strict=True)):
        mark = "*" if i in summary.chosen else " "
        print(f"{mark} {v:.4f}  {clip(s, 100)}")
    if out is not None:
        print(f"wrote {shown(summary_html(summary, out, title=f'summary of {doc.name}'))}")
    return 0
