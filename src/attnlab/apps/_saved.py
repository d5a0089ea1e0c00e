"""The documents of a saved sentence index, one entry each (for :mod:`attnlab.apps.index`).

An entry is known by its file's path relative to the folder that holds the index folder
(links resolved), so a file is one entry whether it was given alone (named ``a.txt``) or
in its folder (``notes/a.txt``): its rows are reused either way. A document without a
file (Python's reference, a :class:`~attnlab.apps.corpus.Document` made in code, an
entry of a format-4 index) is known by its name. A save keeps the entries of the files
not asked about this time while those files exist, and drops the others.

Example:
    >>> import torch
    >>> a = Document("notes/a.txt", "Cats purr.", "/home/me/notes/a.txt")
    >>> base = "/home/me/notes"  # base_of("/home/me/notes/.attnlab-index")
    >>> keys = {a.name: path_key(a, base)}
    >>> keys
    {'notes/a.txt': 'a.txt'}
    >>> saved = [SavedDoc("a.txt", "a.txt", a.digest,
    ...                   [Sentence("Cats purr.", "a.txt", "", 0)], torch.ones(1, 2))]
    >>> where = locate(saved, [a], keys)  # the same file, named as in its folder
    >>> where, current(saved[0], a), renamed(saved[0].sentences, a.name)[0].doc
    ({'notes/a.txt': 0}, True, 'notes/a.txt')
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from attnlab.apps.corpus import Document, Sentence, is_markdown

__all__ = [
    "SavedDoc",
    "base_of",
    "consistent",
    "current",
    "entries",
    "locate",
    "merge",
    "path_key",
    "renamed",
    "reusable",
]


@dataclass
class SavedDoc:
    """One document of a saved index.

    Attributes:
        name: its name when its rows were embedded (each row's ``doc``).
        path: its file relative to :func:`base_of` the index folder (None: no file).
        digest: its content hash.
        sentences: its ``n`` sentences.
        vectors: ``(n, D)`` their rows.
    """

    name: str
    path: str | None
    digest: str
    sentences: list[Sentence]
    vectors: Tensor

    def signature(self) -> tuple[str, str | None, str, int]:
        """What a save writes of it, but the rows' contents (equal: nothing to save)."""
        return self.name, self.path, self.digest, len(self.sentences)

    def as_json(self) -> dict[str, Any]:
        """Its ``index.json`` entry (``path`` only where it has a file)."""
        rows = [[s.text, s.doc, s.section, s.para] for s in self.sentences]
        out = {"name": self.name, "digest": self.digest, "sentences": rows}
        return out if self.path is None else out | {"path": self.path}


def base_of(folder: str | Path) -> str:
    """The folder an index folder's paths are relative to: the one that holds it, links
    resolved (``notes`` for ``notes/.attnlab-index``)."""
    return os.path.realpath(Path(folder).absolute().parent)


def path_key(doc: Document, base: str | None) -> str | None:
    """``doc``'s file relative to ``base`` (None: no file, or no index folder)."""
    if doc.path is None or base is None:
        return None
    try:
        return os.path.relpath(doc.path, base)
    except ValueError:  # (Windows: another drive)
        return doc.path


def entries(docs: list[dict], sentences: list[Sentence], vectors: Tensor) -> list[SavedDoc]:
    """The saved index's ``docs`` (its JSON) with their rows, each document's in turn; a
    ValueError for a ``path`` that is no str."""
    out: list[SavedDoc] = []
    start = 0
    for d in docs:
        path, n = d.get("path"), len(d["sentences"])
        if path is not None and not isinstance(path, str):
            raise ValueError(f"index.json: a document's path must be a str, got {path!r}")
        rows = slice(start, start + n)
        out.append(SavedDoc(d["name"], path, d["digest"], sentences[rows], vectors[rows]))
        start += n
    return out


def consistent(sentences: list[Sentence], vectors: Tensor, docs: list[dict]) -> bool:
    """An index's rows as :func:`~attnlab.apps.index.build_index` saved them: one float
    vector per sentence, each row's fields of their kinds and its ``doc`` the document it
    is saved under (a row naming another document raised KeyError when the index was
    updated; an int text failed in ranking; int vectors gave every cosine 0)."""
    names = [d["name"] for d in docs for _ in d["sentences"]]
    kinds = all(
        isinstance(s.text, str) and isinstance(s.section, str) and type(s.para) is int
        and s.doc == name
        for s, name in zip(sentences, names, strict=True)
    )  # fmt: skip
    shape = vectors.dim() == 2 and vectors.shape[0] == len(sentences)
    if not (kinds and shape and vectors.dtype == torch.float32):
        return False
    # unit rows (an index of a model without a Normalize module held raw vectors)
    return not vectors.numel() or bool(((vectors.norm(dim=-1) - 1).abs() < 1e-3).all())


def locate(
    saved: Sequence[SavedDoc], docs: Sequence[Document], keys: Mapping[str, str | None]
) -> dict[str, int]:
    """Document name -> the position in ``saved`` of its entry, changed or not: that of
    its file (``keys``: name -> :func:`path_key`), else one without a file of its name."""
    by_path = {e.path: i for i, e in enumerate(saved) if e.path is not None}
    by_name = {e.name: i for i, e in enumerate(saved) if e.path is None}
    out: dict[str, int] = {}
    for d in docs:
        key = keys.get(d.name)
        i = by_path.get(key) if key is not None else None
        i = by_name.get(d.name) if i is None else i
        if i is not None and i not in out.values():
            out[d.name] = i
    return out


def current(entry: SavedDoc, doc: Document) -> bool:
    """Whether ``entry``'s rows are ``doc``'s: the same text, split alike (as Markdown or
    not: a link ``a.md`` to ``x.txt`` is one file under two names)."""
    return entry.digest == doc.digest and is_markdown(entry.name) == is_markdown(doc.name)


def reusable(
    saved: Sequence[SavedDoc], docs: Sequence[Document], where: Mapping[str, int]
) -> list[tuple[Document, int]]:
    """Each document of ``docs`` whose saved entry (``where``: name -> its position,
    :func:`locate`) holds its rows (:func:`current`), with that position."""
    found = [(d, where.get(d.name)) for d in docs]
    return [(d, i) for d, i in found if i is not None and current(saved[i], d)]


def renamed(sentences: list[Sentence], name: str) -> list[Sentence]:
    """``sentences`` as those of the document ``name`` (a file saved as ``a.txt`` and
    asked about in its folder as ``notes/a.txt``): as splitting it again gives them."""
    if all(s.doc == name for s in sentences):
        return sentences
    return [replace(s, doc=name) for s in sentences]


def merge(
    saved: Sequence[SavedDoc],
    where: Mapping[str, int],
    rows: Mapping[str, SavedDoc],
    base: str,
) -> list[SavedDoc]:
    """What a save writes: ``saved`` in its order with each asked document's entry
    (``where``: name -> position, :func:`locate`) replaced by its ``rows``, the other
    entries kept while their file exists (those without a file dropped), then the new
    documents in ``rows``' order."""
    asked = {i: name for name, i in where.items()}
    out: list[SavedDoc] = []
    for i, e in enumerate(saved):
        if i in asked:
            out.append(rows[asked[i]])
        elif e.path is not None and os.path.isfile(os.path.join(base, e.path)):
            out.append(e)
    return out + [e for name, e in rows.items() if name not in where]
