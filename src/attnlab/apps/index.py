"""A sentence index: every sentence's MiniLM embedding, built once and kept on disk.

The index is two files in one folder: ``index.json`` (the model's name, per document its
content hash, its file and its sentences, and the name and SHA-256 of the vectors file,
so a pair from two different builds is never read as one) and that vectors file,
``index-HASH.safetensors`` (the ``(N, D)`` float32 unit vectors). :func:`build_index`
reuses the rows of every document whose hash is unchanged and embeds only the new or
changed ones, so editing one document re-embeds that document alone; a different model
or splitter version rebuilds everything. A document read from a file is known by that
file's path relative to the folder holding the index folder (:mod:`attnlab.apps._saved`):
one file of a folder, asked about alone, reuses its rows from the folder's index, and the
rows of the other files are kept while those files exist. A save writes the new vectors
under their own name, then the JSON that names them (each atomically), then removes the
vectors file the previous JSON named and any other that no JSON names and is older than
ten minutes (a stop between two writes left it): a crash at any point leaves the previous
index or the new one, never a pair that is read as none (one file name for both made a
stop between the two writes re-embed everything). A save holds the folder's
:class:`~attnlab._io.OutputLock`, and another run's vectors are never removed. A folder
whose ``index.json`` attnlab did not write (no JSON object with a ``"format"``, or no
JSON) is refused, not overwritten.
Nothing is pickled.

Search is brute force (``vectors @ q``, exact): at the Python reference's size (3,602
sentences x 384) one query is a 1.4 MFLOP matrix-vector product. ``benchmarks/bench_ask.py``
times it beside faiss: faiss' exact flat index and its HNSW graph answer a query faster
(fractions of a millisecond; HNSW misses about 5% of the exact top 5), but every search
here is followed by a ~1 s MiniLM re-ranking, so the search is under 1% of a question's
time and brute force keeps the index exact and free of another dependency.

Example:
    >>> import tempfile
    >>> from attnlab.models import SentenceEncoder
    >>> from attnlab.apps.corpus import Document
    >>> enc = SentenceEncoder.from_pretrained()  # needs attnlab[pretrained]
    >>> docs = [Document("a", "Cats purr. Dogs bark."), Document("b", "Rain falls.")]
    >>> ix = build_index(docs, enc, tempfile.mkdtemp())
    >>> ix.vectors.shape, ix.embedded, [s.text for s in ix.sentences]
    (torch.Size([3, 384]), 3, ['Cats purr.', 'Dogs bark.', 'Rain falls.'])
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from attnlab._io import LockedError, OutputLock, atomic_write, atomic_write_text
from attnlab._validate import instance_of, positive_int
from attnlab._warnings import warn
from attnlab.apps._saved import (
    SavedDoc,
    base_of,
    consistent,
    entries,
    locate,
    merge,
    path_key,
    renamed,
    reusable,
)
from attnlab.apps.corpus import Document, Sentence, known_sentences, split_document
from attnlab.apps.embedding import Progress, embed, model_name, unit
from attnlab.models import SentenceEncoder

__all__ = [
    "FORMAT",
    "Index",
    "build_index",
    "check_cache",
    "default_cache",
    "embed",
    "load_index",
    "saved_sentences",
    "unit",
]

FORMAT = 5  # bump when the splitter or the file layout changes: every index rebuilds
_READ = (4, FORMAT)  # 4: the same splitter, documents without their paths (known by name)
_VECTORS = re.compile(r"index-[0-9a-f]{16}\.safetensors")
STRAY_SECONDS = 600.0  # vectors no JSON names, older than this, are no save in progress


@dataclass
class Index:
    """Sentences and their unit vectors.

    Attributes:
        sentences: the ``N`` sentences, document by document.
        vectors: ``(N, D)`` float32 unit embeddings, row ``i`` for ``sentences[i]``.
        digests: document name -> content hash.
        model: the encoder's name (a different one invalidates the index).
        embedded: how many sentences this build embedded (0: all reused).

    Example:
        >>> cats, dogs = Sentence("Cats purr.", "a", "", 0), Sentence("Dogs bark.", "a", "", 0)
        >>> ix = Index([cats, dogs], torch.eye(2), {"a": "0" * 64}, "toy")  # unit vectors
        >>> scores, rows = ix.search(torch.tensor([[0.0, 1.0]]), k=1)
        >>> ix.sentences[int(rows[0, 0])].text, float(scores[0, 0])
        ('Dogs bark.', 1.0)
    """

    sentences: list[Sentence]
    vectors: Tensor
    digests: dict[str, str]
    model: str
    embedded: int = 0

    def search(self, query: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The ``k`` best rows for unit vectors ``query (Q, D)``: scores and indices,
        each ``(Q, min(k, N))``, best first (exact cosine, brute force)."""
        k = positive_int("k", k)  # (-1: torch's "selected index k out of range")
        query = instance_of("query", query, Tensor, "a (Q, D) Tensor")
        n, d = self.vectors.shape
        if query.dim() != 2 or query.shape[1] != d:  # (torch's "size mismatch" or a (N,) row)
            raise ValueError(f"query must have shape (Q, {d}), got {tuple(query.shape)}")
        if query.dtype != self.vectors.dtype:  # (torch's "expected m1 and m2 to have ...")
            raise TypeError(f"query must be {self.vectors.dtype} as the vectors, got {query.dtype}")
        scores = query @ self.vectors.T  # (Q, N)
        return scores.topk(min(k, n), dim=1)


def default_cache(docs: str | Path | Sequence[str | Path]) -> Path:
    """Where the index of ``docs`` lives: for ``"pydoc"`` under ``$XDG_CACHE_HOME/attnlab``
    (or ``~/.cache/attnlab``), else ``.attnlab-index`` in the (first) folder given or
    beside the (first) file, where links lead (``/dev/stdin`` fed from a file: beside that
    file, not in ``/dev``). A file given alone shares its folder's index: its rows are
    reused from it, and the folder's other rows are kept.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp()).resolve()
        >>> default_cache(d) == default_cache([d / "a.md", d / "b.md"]) == d / ".attnlab-index"
        True
        >>> default_cache("pydoc").parent.name, default_cache("pydoc").name.startswith("pydoc-")
        ('attnlab', True)
    """
    if not isinstance(docs, str | os.PathLike) and not (
        isinstance(docs, Sequence) and docs and isinstance(docs[0], str | os.PathLike)
    ):  # (an empty list: IndexError; a PurePath: "object is not subscriptable")
        raise TypeError(f"docs must be 'pydoc', a path or a non-empty list of paths, got {docs!r}")
    first = Path(docs if isinstance(docs, str | os.PathLike) else docs[0])
    if str(first) == "pydoc":
        import sys

        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "attnlab"
        return base / f"pydoc-{sys.version_info.major}.{sys.version_info.minor}"
    return (first if first.is_dir() else first.resolve().parent) / ".attnlab-index"


def load_index(folder: str | Path) -> Index | None:
    """The index saved in ``folder``, or None if there is none or it is unreadable.

    Example:
        >>> import tempfile
        >>> from attnlab.models.sentence import _toy_encoder
        >>> enc = _toy_encoder()  # untrained; needs attnlab[pretrained]; use from_pretrained()
        >>> with tempfile.TemporaryDirectory() as d:
        ...     built = build_index([Document("a", "Cats purr. Dogs bark.")], enc, d)
        ...     loaded, missing = load_index(d), load_index(Path(d) / "nothing")
        >>> torch.equal(loaded.vectors, built.vectors), loaded.sentences == built.sentences
        (True, True)
        >>> loaded.model == built.model, missing
        (True, None)
    """
    loaded = _load(index_folder(folder))
    return None if loaded is None else loaded[0]


def _load(folder: Path) -> tuple[Index, list[SavedDoc]] | None:
    """The index saved in ``folder``, whole and document by document (None: none)."""
    from safetensors.torch import load

    try:
        meta = _own_meta(folder, "folder")  # (JSON that is no index: a ValueError)
        if meta is None or meta.get("format") not in _READ:
            return None  # none, or another version
        raw = (folder / _vectors_name(meta.get("vectors"))).read_bytes()
        if meta.get("vectors_sha256") != _sha(raw):
            return None  # vectors from another build
        vectors = load(raw)["vectors"]
        sentences = [Sentence(*row) for d in meta["docs"] for row in d["sentences"]]
        digests = {d["name"]: d["digest"] for d in meta["docs"]}
        if not consistent(sentences, vectors, meta["docs"]):
            return None  # rows edited or of another kind: rebuilt, not used
        docs = entries(meta["docs"], sentences, vectors)
    except (OSError, ValueError, KeyError, TypeError, RecursionError):  # (JSON too deep)
        return None
    return Index(sentences, vectors, digests, str(meta.get("model"))), docs


def index_folder(folder: object, name: str = "folder") -> Path:
    """``folder`` as an index folder: a path, not ``""`` (the current folder, where the
    index files landed) and not a file; errors name the argument ``name``."""
    if not isinstance(folder, str | os.PathLike):
        raise TypeError(f"{name} must be a str or Path, got {type(folder).__name__}")
    if not str(folder):
        raise ValueError(f"{name} must be a folder, got an empty path (the current folder)")
    if Path(folder).exists() and not Path(folder).is_dir():
        raise ValueError(f"{name} must be a folder, got {str(folder)!r}, which is a file")
    return Path(folder)


def _vectors_name(name: object) -> str:
    """The vectors file that ``index.json`` names; a ValueError for anything but a file
    name of the form ``index-HASH.safetensors`` (no path: nothing outside the folder)."""
    if not isinstance(name, str) or not _VECTORS.fullmatch(name):
        raise ValueError(f"index.json names no vectors file: {name!r}")
    return name


def check_cache(folder: Path, name: str = "folder") -> Path:
    """``folder`` if :func:`build_index` may write its index there: it holds no
    ``index.json``, or one attnlab wrote (a JSON object with a ``"format"``, perhaps of
    another version or with damaged contents, which is rebuilt); else a ValueError naming
    ``name`` and the folder: JSON of another kind (a user's own ``index.json`` was
    overwritten, and an ``index.safetensors`` deleted), or a file that cannot be read as
    JSON (cut short, not UTF-8, nested too deeply): it is not known to be attnlab's.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> check_cache(d) == d
        True
        >>> _ = (d / "index.json").write_text('{"project": "notes"}')
        >>> check_cache(d, "cache")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: cache ... holds an index.json that attnlab did not write; ...
    """
    _own_meta(folder, name)
    return folder


def _key(st: os.stat_result) -> tuple[int, ...]:
    """A file's identity: inode, size, mtime and ctime (a save gives it a new inode)."""
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


# the index.json read last: its folder -> (its file's identity, its JSON object, never changed)
_LAST: dict[Path, tuple[tuple[int, ...], dict[str, Any]]] = {}


def _own_meta(folder: Path, name: str) -> dict[str, Any] | None:
    """The JSON object of ``folder/index.json`` (None: there is none), or the ValueError
    of :func:`check_cache` if that is no attnlab index. The file read last is not read
    again while it is unchanged (an ask read it four times: its cache check,
    build_index's, load_index and the save's)."""
    try:
        key = _key((folder / "index.json").stat())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError:  # (a folder we may not search: open says why)
        key = ()
    if (last := _LAST.get(folder)) is not None and last[0] == key:
        return last[1]
    try:
        with open(folder / "index.json", "rb") as f:
            st = os.fstat(f.fileno())
            meta = json.loads(f.read().decode("utf-8"))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (IsADirectoryError, ValueError, RecursionError) as e:  # (not UTF-8, not JSON)
        why = {IsADirectoryError: "it is a folder", RecursionError: "nested too deeply"}
        raise ValueError(
            f"{name} {str(folder)!r} holds an index.json that cannot be read (damaged, or "
            f"not attnlab's: {why.get(type(e), e)}); the index would replace it: give "
            "another folder, or move that file away"
        ) from None
    if not isinstance(meta, dict) or "format" not in meta:
        raise ValueError(
            f"{name} {str(folder)!r} holds an index.json that attnlab did not write; the "
            "index would replace it: give another folder, or move that file away"
        )
    _LAST.clear()  # one entry: the folder in use
    _LAST[folder] = (_key(st), meta)
    return meta


def _named_vectors(meta: dict[str, Any] | None) -> str | None:
    """The vectors file an attnlab ``index.json`` names (formats 2 and 3: the fixed
    ``index.safetensors``); None for none, or a name that is no such file."""
    if meta is None:
        return None
    if "vectors" not in meta and meta["format"] in (2, 3):
        return "index.safetensors"
    name = meta.get("vectors")
    return name if isinstance(name, str) and _VECTORS.fullmatch(name) else None


def _save(index: list[SavedDoc], model: str, folder: Path) -> None:
    """:func:`_write` under the folder's lock. A save takes milliseconds: if another live
    run holds the lock for 3 s, a warning says so, and this index is kept in memory only."""
    busy: LockedError | None = None
    for _ in range(30):
        try:
            with OutputLock(folder, command=f"build_index of {folder}"):
                return _write(index, model, folder)
        except LockedError as e:
            busy = e
            time.sleep(0.1)
    warn(f"the index is not saved: {busy}", stacklevel=3)


def _write(index: list[SavedDoc], model: str, folder: Path) -> None:
    """The documents' vectors under a new name, then the JSON that names them (both atomic), then
    the vectors no JSON names removed (:func:`_remove_strays`): a stop anywhere leaves a
    readable index, and vectors that another build's JSON names (or is about to) are
    kept."""
    from safetensors.torch import save

    previous = _named_vectors(_own_meta(folder, "folder"))

    docs = [d.as_json() for d in index]
    raw = save({"vectors": torch.cat([d.vectors for d in index]).contiguous()})
    sha = _sha(raw)
    name = f"index-{sha[:16]}.safetensors"
    meta = {"format": FORMAT, "model": model, "vectors": name, "vectors_sha256": sha}
    atomic_write(folder / name, lambda t: Path(t).write_bytes(raw))
    # ASCII: a document name from a file name that is not UTF-8 holds lone surrogates,
    # which UTF-8 cannot write but JSON's \uXXXX escapes carry there and back exactly
    atomic_write_text(folder / "index.json", json.dumps(meta | {"docs": docs}, ensure_ascii=True))
    _remove_strays(folder, name, previous)


def _remove_strays(folder: Path, keep: str, previous: str | None) -> None:
    """Once the JSON naming ``keep`` is written: the vectors the previous JSON named, and
    every other ``index-HASH.safetensors`` older than :data:`STRAY_SECONDS`, which no
    JSON names (a stop between a save's two writes, or after them, left them for good; a
    younger one may be another run's, between its two writes)."""
    if previous is not None and previous != keep:
        (folder / previous).unlink(missing_ok=True)
    now = time.time()
    for p in folder.glob("index-*.safetensors"):
        with contextlib.suppress(OSError):  # gone meanwhile, or not ours to remove: kept
            old = now - p.stat().st_mtime > STRAY_SECONDS
            if old and p.name != keep and _VECTORS.fullmatch(p.name):
                p.unlink()


def _sha(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def build_index(
    docs: Sequence[Document],
    enc: SentenceEncoder,
    folder: str | Path | None,
    *,
    progress: Progress | None = None,
    split: Mapping[Document, Sequence[Sentence]] | None = None,
) -> Index:
    """The index of ``docs``: loaded from ``folder`` and brought up to date (only new or
    changed documents are split and embedded), then saved back if anything changed.

    Args:
        docs: the documents (names must be unique).
        enc: the sentence encoder.
        folder: where the index lives (None: build in memory, save nothing).
        progress: called as ``progress(sentences embedded, sentences to embed)``.
        split: sentences known already, by document (as ``check_prose`` returns): not split again.

    Example:
        >>> import tempfile
        >>> from attnlab.models.sentence import _toy_encoder
        >>> enc = _toy_encoder()  # untrained; needs attnlab[pretrained]; use from_pretrained()
        >>> docs = [Document("a", "Cats purr. Dogs bark."), Document("b", "Rain falls.")]
        >>> with tempfile.TemporaryDirectory() as d:
        ...     first = build_index(docs, enc, d)
        ...     again = build_index(docs, enc, d)  # read back: nothing to embed
        ...     edited = build_index([docs[0], Document("b", "Snow falls. Wind blows.")], enc, d)
        >>> first.embedded, again.embedded, edited.embedded, len(edited.sentences)
        (3, 0, 2, 4)
    """
    if not isinstance(docs, list | tuple) or not all(isinstance(d, Document) for d in docs):
        seen = next((d for d in docs if not isinstance(d, Document)), docs)  # the offender
        raise TypeError(  # (a str: "'str' object has no attribute 'name'")
            f"docs must be a list of Documents (load_documents), got {type(seen).__name__}"
        )
    instance_of("enc", enc, SentenceEncoder, "a SentenceEncoder")
    known = known_sentences(split)
    folder = None if folder is None else check_cache(index_folder(folder))  # before the work
    names = [d.name for d in docs]
    if len(set(names)) != len(names):
        raise ValueError(f"docs: document names must be unique, got {len(names)} with repeats")
    model = model_name(enc)
    saved = _saved(folder, model, enc.dim)
    base = None if folder is None else base_of(folder)
    keys = {d.name: path_key(d, base) for d in docs}
    where = locate(saved, docs, keys)
    rows = {d.name: replace(saved[i], path=keys[d.name]) for d, i in reusable(saved, docs, where)}
    fresh = [d for d in docs if d.name not in rows]
    new_sents = {d.name: known[d] if d in known else split_document(d) for d in fresh}
    texts = [s.text for d in fresh for s in new_sents[d.name]]
    vecs = embed(enc, texts, progress) if texts else torch.empty(0, enc.dim)  # (n, D)
    start = 0
    for d in fresh:
        n, sents = len(new_sents[d.name]), new_sents[d.name]
        rows[d.name] = SavedDoc(d.name, keys[d.name], d.digest, sents, vecs[start : start + n])
        start += n
    sentences = [s for d in docs for s in renamed(rows[d.name].sentences, d.name)]
    vectors = torch.cat([torch.empty(0, enc.dim), *(rows[d.name].vectors for d in docs)])
    index = Index(sentences, vectors, {d.name: d.digest for d in docs}, model, len(texts))
    if folder is not None and base is not None:
        stored = merge(saved, where, rows, base)  # and the other files' rows, while they exist
        changed = [e.signature() for e in stored] != [e.signature() for e in saved]
        if changed and any(e.sentences for e in stored):  # nothing to keep from no prose
            _save(stored, model, Path(folder))
    return index


def _saved(folder: Path | None, model: str, dim: int) -> list[SavedDoc]:
    """The documents saved in ``folder`` by the encoder ``model`` (none for another)."""
    loaded = None if folder is None else _load(folder)
    if loaded is None or loaded[0].model != model or loaded[0].vectors.shape[1] != dim:
        return []
    return loaded[1]


def saved_sentences(
    docs: Sequence[Document], folder: str | Path | None
) -> dict[Document, list[Sentence]]:
    """The sentences the index in ``folder`` (None: none) holds for those of ``docs`` it
    holds unchanged (the same file, or name without a file, and digest, whatever model
    embedded them), named as in ``docs``: read, not split.

    Example:
        >>> import tempfile
        >>> from attnlab.models.sentence import _toy_encoder
        >>> a, d = Document("a", "Cats purr. Dogs bark."), tempfile.mkdtemp()
        >>> _ = build_index([a], _toy_encoder(), d)  # needs attnlab[pretrained]
        >>> [s.text for s in saved_sentences([a], d)[a]], saved_sentences([Document("a", "Hi.")], d)
        (['Cats purr.', 'Dogs bark.'], {})
    """
    folder = None if folder is None else index_folder(folder)
    loaded = None if folder is None else _load(folder)
    if folder is None or loaded is None:
        return {}
    saved, base = loaded[1], base_of(folder)
    where = locate(saved, docs, {d.name: path_key(d, base) for d in docs})
    return {d: renamed(saved[i].sentences, d.name) for d, i in reusable(saved, docs, where)}
