"""Documents and their sentences: text files, folders of them, or Python's reference.

A document is split into paragraphs at blank lines; headings (a line underlined with
``*``, ``=``, ``-`` or ``~``), grammar rules (``::=``), interactive examples (``>>>``),
tables and code blocks (an indented paragraph after one that ends with ``:``) are kept out of
the sentences. Each prose paragraph has its lines joined and is split into sentences by
pysbd (a rule-based splitter that knows abbreviations, decimals and dotted names).

``load_documents("pydoc")`` reads the language reference that the standard library
ships (``pydoc_data.topics.topics``, one document per topic); paths read ``.txt``,
``.md`` and ``.rst`` files, folders recursively.

Example:
    >>> doc = Document("demo", "Title\\n=====\\n\\nIt is e.g. 3.5 m long. See x.y() too.\\n")
    >>> [(s.text, s.section) for s in split_document(doc)]
    [('It is e.g. 3.5 m long.', 'Title'), ('See x.y() too.', 'Title')]
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

__all__ = [
    "SUFFIXES",
    "Document",
    "Sentence",
    "load_documents",
    "split_document",
    "split_sentences",
]

SUFFIXES = (".txt", ".md", ".rst")
_UNDERLINE = re.compile(r"^\s*([*=\-~^#])\1{2,}\s*$")
_BULLET = re.compile(r"^(?:[*\-+•]|\d{1,2}[.)])\s+")
_NOT_CODE_LEAD = ("note:", "see also:", "warning:")


@dataclass(frozen=True)
class Document:
    """A named text; ``digest`` is its content hash (the index's invalidation key)."""

    name: str
    text: str

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class Sentence:
    """One sentence: its text, document, the heading above it and its paragraph number."""

    text: str
    doc: str
    section: str
    para: int


@cache
def _segmenter() -> Any:
    try:
        import pysbd
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ModuleNotFoundError(
            "attnlab.apps splits sentences with pysbd: pip install 'attnlab[apps]'"
        ) from e
    return pysbd.Segmenter(language="en", clean=False)


def split_sentences(text: str) -> list[str]:
    """The sentences of one paragraph of prose (whitespace collapsed), by pysbd.

    Example:
        >>> split_sentences("Call str.format(), i.e. the method. It returns 3.5 too.")
        ['Call str.format(), i.e. the method.', 'It returns 3.5 too.']
    """
    flat = " ".join(text.split())
    return [s.strip() for s in _segmenter().segment(flat) if s.strip()] if flat else []


def _indent(block: str) -> int:
    lines = [ln for ln in block.splitlines() if ln.strip()]
    return min(len(ln) - len(ln.lstrip()) for ln in lines)


def _is_code(block: str, previous: str, prev_indent: int) -> bool:
    """A grammar rule, an interactive example, or an indented block after a ``:``."""
    first = block.strip()
    if "::=" in block or first.startswith((">>>", "+-")) or re.match(r"=+ +=", first):
        return True
    lead = previous.strip().lower()
    ends_colon = lead.endswith(":") and not lead.startswith(_NOT_CODE_LEAD)
    return ends_colon and _indent(block) > prev_indent


def _paragraphs(text: str) -> list[tuple[str, str]]:
    """``(section, prose paragraph)`` pairs of a document, headings and code left out."""
    out: list[tuple[str, str]] = []
    section, previous, prev_indent = "", "", 0
    for block in re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n")):
        lines = [ln for ln in block.splitlines() if ln.strip()]
        if not lines:
            continue
        if len(lines) >= 2 and _UNDERLINE.match(lines[1]):  # a heading, maybe with prose
            section, lines = lines[0].strip(), lines[2:]
            if not lines:
                continue
            block = "\n".join(lines)
        if _is_code(block, previous, prev_indent):
            continue
        previous, prev_indent = lines[-1], _indent(block)
        if block.strip().lower() not in _NOT_CODE_LEAD:  # a bare "Note:" is no sentence
            out.append((section, _BULLET.sub("", block.strip())))
    return out


def split_document(doc: Document) -> list[Sentence]:
    """Every prose sentence of ``doc``, in order (see the module docstring)."""
    return [
        Sentence(s, doc.name, section, i)
        for i, (section, para) in enumerate(_paragraphs(doc.text))
        for s in split_sentences(para)
    ]


def pydoc_documents() -> list[Document]:
    """The Python language reference that ships with the standard library, by topic."""
    from pydoc_data.topics import topics

    return [Document(name, topics[name]) for name in sorted(topics)]


def _read_text(path: Path) -> str:
    """A file's text; a binary or non-UTF-8 file is a ValueError naming it."""
    try:
        raw = path.read_bytes()
    except PermissionError:
        raise ValueError(f"docs: {str(path)!r} cannot be read (permission denied)") from None
    except OSError as e:
        raise ValueError(f"docs: {str(path)!r} cannot be read ({e.strerror})") from None
    if b"\x00" in raw[:8192]:
        raise ValueError(f"docs: {str(path)!r} is a binary file; give text files")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"docs: {str(path)!r} is not UTF-8 text ({e.reason} at {e.start})") from e


def _files(path: Path) -> list[Path]:
    """The text files that ``path`` names: itself, or a folder's (recursively, sorted)."""
    if not path.exists():
        raise ValueError(f"docs: {str(path)!r} does not exist")
    if path.is_file():
        return [path]
    if not os.access(path, os.R_OK | os.X_OK):
        raise ValueError(f"docs: {str(path)!r} cannot be read (permission denied)")
    found = sorted(p for p in path.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
    found = [
        p for p in found if not any(part.startswith(".") for part in p.relative_to(path).parts)
    ]
    if not found:
        raise ValueError(
            f"docs: the folder {str(path)!r} holds no text files ({', '.join(SUFFIXES)})"
        )
    return found


def load_documents(docs: str | Path | Sequence[str | Path]) -> list[Document]:
    """The documents that ``docs`` names: ``"pydoc"``, or paths to files and folders.

    Raises:
        ValueError: a path that does not exist or cannot be read, a binary or non-UTF-8
            file, a folder without text files, or no documents at all.

    Example:
        >>> len(load_documents("pydoc")) > 70
        True
    """
    if isinstance(docs, str | Path):
        docs = [docs]
    if not docs:
        raise ValueError("docs: no documents given; give files, folders or 'pydoc'")
    out: list[Document] = []
    for item in docs:
        if str(item) == "pydoc":
            out += pydoc_documents()
            continue
        out += [Document(str(p), _read_text(p)) for p in _files(Path(item))]
    if not any(d.text.strip() for d in out):
        raise ValueError(f"docs: every document is empty ({len(out)} files)")
    return out
