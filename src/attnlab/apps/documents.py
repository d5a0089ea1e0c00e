"""Documents from text files, folders of them, or Python's reference.

``load_documents("pydoc")`` reads the language reference that the standard library
ships (``pydoc_data.topics.topics``, one document per topic); paths read ``.txt``,
``.md`` and ``.rst`` files, folders recursively, as UTF-8 text, or as UTF-16 or UTF-32
when the file starts with that encoding's byte-order mark (Windows Notepad's "Unicode");
a mark is not part of the text. :mod:`attnlab.apps.corpus` splits them into sentences.

Example:
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / "pets.md").write_text("Cats purr. Dogs bark.")
    >>> [(d.name, d.text) for d in load_documents(folder)] == [
    ...     (f"{folder.name}/pets.md", "Cats purr. Dogs bark.")]
    True
"""

from __future__ import annotations

import codecs
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from attnlab.apps.corpus import Document

__all__ = ["SUFFIXES", "document_files", "load_documents", "pydoc_documents"]

SUFFIXES = (".txt", ".md", ".rst")


def pydoc_documents() -> list[Document]:
    """The Python language reference that ships with the standard library, by topic."""
    from pydoc_data.topics import topics

    return [Document(name, topics[name]) for name in sorted(topics)]


# byte-order marks and the encodings they announce; UTF-32's first, as its little-endian
# mark starts with UTF-16's
_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32"),
    (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16"),
)


def _read_text(path: Path) -> str:
    """A file's text: UTF-8 (a byte-order mark dropped: it hid a heading), or UTF-16 or
    UTF-32 that starts with its byte-order mark (Windows Notepad's "Unicode", which was
    called a binary file); a binary file, or one that is not text in its encoding, is a
    ValueError naming it."""
    try:
        raw = path.read_bytes()
    except PermissionError:
        raise ValueError(f"docs: {str(path)!r} cannot be read (permission denied)") from None
    except OSError as e:
        raise ValueError(f"docs: {str(path)!r} cannot be read ({e.strerror})") from None
    binary = f"docs: {str(path)!r} is a binary file; give text files"
    encoding = next((name for bom, name in _BOMS if raw.startswith(bom)), None)
    if encoding is None and b"\x00" in raw[:8192]:  # (UTF-16 text is half NUL bytes)
        raise ValueError(binary)
    try:
        text = raw.decode(encoding or "utf-8-sig")  # (the UTF-16/32 codecs drop the mark)
    except UnicodeDecodeError as e:
        said = f"{encoding} text, as its byte-order mark says" if encoding else "UTF-8 text"
        raise ValueError(f"docs: {str(path)!r} is not {said} ({e.reason} at {e.start})") from e
    if "\x00" in text[:8192]:  # bytes that only start like a byte-order mark
        raise ValueError(binary)
    return text


def _files(path: Path) -> list[Path]:
    """The text files that ``path`` names: itself, or a folder's (recursively, sorted)."""
    if not path.exists():
        raise ValueError(f"docs: {str(path)!r} does not exist")
    if path.is_file():
        return [path]
    if not path.is_dir():  # os.access would call a FIFO "permission denied"
        raise ValueError(
            f"docs: {str(path)!r} is not a regular file or folder (a pipe, device or "
            "socket); save the text to a file and give that"
        )
    if not os.access(path, os.R_OK | os.X_OK):
        raise ValueError(f"docs: {str(path)!r} cannot be read (permission denied)")
    found = _text_files(path)
    if not found:
        raise ValueError(
            f"docs: the folder {str(path)!r} holds no text files ({', '.join(SUFFIXES)})"
        )
    return found


def _identity(path: str | Path) -> tuple[int, int]:
    """The file or folder that ``path`` reaches (links followed): device and inode."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _text_files(folder: Path) -> list[Path]:
    """The text files under ``folder`` (hidden ones and those in hidden folders left
    out), sorted; a subfolder that cannot be read is a ValueError (``rglob`` passed over
    it, and its documents were silently never searched). Links are followed, but each
    real folder and each real file is read once (a link to the folder itself made one
    file 41 documents)."""

    def fail(e: OSError) -> None:
        raise ValueError(f"docs: {str(e.filename)!r} cannot be read (permission denied)")

    found: list[Path] = []
    seen: set[tuple[int, int]] = set()
    for root, dirs, files in os.walk(folder, onerror=fail, followlinks=True):
        if (here := _identity(root)) in seen:  # reached again through a link: read already
            dirs[:] = []
            continue
        seen.add(here)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            p = Path(root) / name
            if name.startswith(".") or p.suffix.lower() not in SUFFIXES or not p.is_file():
                continue
            if (key := _identity(p)) not in seen:
                seen.add(key)
                found.append(p)
    return sorted(found)


def _named_files(path: Path) -> list[tuple[str, Path]]:
    """The files that ``path`` names, each with its document name: a file's own name, or
    for a folder its name and the path inside it (``docs/a.txt`` whether the folder was
    given as ``docs``, ``./docs/`` or ``/home/me/docs``), so that the title signal and the
    index's keys do not depend on how the folder was spelled."""
    base = Path(os.path.abspath(path))
    if not path.is_dir():
        return [(base.name, p) for p in _files(path)]
    return [(str(Path(base.name) / p.relative_to(path)), p) for p in _files(path)]


def _items(docs: object) -> list[str | Path]:
    """``docs`` as a list: one path, or a sequence of them (a TypeError naming ``docs``
    otherwise: ``docs=123`` said "'int' object is not iterable")."""
    if isinstance(docs, str | os.PathLike):
        return [docs]  # type: ignore[list-item]  # a PathLike: _path makes it a Path
    if not isinstance(docs, Sequence) or isinstance(docs, bytes | bytearray):  # (bytes: each
        # item an int, "got int 47")
        raise TypeError(
            f"docs must be 'pydoc', a path or a sequence of paths, got {type(docs).__name__} "
            f"{docs!r}"
        )
    return list(docs)


def _path(item: object) -> Path:
    """``item`` as a path; the empty string (which ``Path`` reads as ".") is a ValueError,
    and what is no path a TypeError naming ``docs``."""
    if not isinstance(item, str | os.PathLike):
        raise TypeError(
            f"docs: each item must be a path (str or Path), got {type(item).__name__} {item!r}"
        )
    if isinstance(item, str) and not item:
        raise ValueError("docs: an empty path was given; give files, folders or 'pydoc'")
    try:
        Path(item).exists()
    except OSError as e:  # (a name past 255 bytes: a bare "OSError: [Errno 36]", exit 1)
        raise ValueError(f"docs: {str(item)!r} cannot be reached ({e.strerror or e})") from None
    return Path(item)


def document_files(docs: str | Path | Sequence[str | Path]) -> list[Path]:
    """The files that :func:`load_documents` reads for ``docs`` (``"pydoc"`` names none),
    e.g. to refuse an output that would overwrite one of them.

    Example:
        >>> document_files("pydoc")
        []
    """
    return [p for item in _items(docs) if str(item) != "pydoc" for p in _files(_path(item))]


def _unique_names(named: list[tuple[str, Path]]) -> list[tuple[str, Path]]:
    """``named`` with each file once; a file given twice (a file and its folder) is a
    ValueError, and a name that two different files share (``a/docs/x.txt`` and
    ``b/docs/x.txt``) becomes each one's absolute path."""
    first: dict[tuple[int, int], Path] = {}
    for _, p in named:
        if (key := _identity(p)) in first:
            raise ValueError(f"docs: names {str(p)!r} more than once (a file and its folder?)")
        first[key] = p
    counts = Counter(name for name, _ in named)
    return [(name if counts[name] == 1 else os.path.abspath(p), p) for name, p in named]


def load_documents(docs: str | Path | Sequence[str | Path]) -> list[Document]:
    """The documents that ``docs`` names: ``"pydoc"``, or paths to files and folders.

    Raises:
        ValueError: a path that is empty, does not exist, cannot be read or is not a
            regular file or folder (a pipe, such as ``/dev/stdin``), a binary file or one
            that is not UTF-8 (or the UTF-16 or UTF-32 its byte-order mark announces), a
            folder without text files, a document named twice (a file and its folder), or
            no documents at all.

    Example:
        >>> len(load_documents("pydoc")) > 70
        True
    """
    docs = _items(docs)
    if not docs:
        raise ValueError("docs: no documents given; give files, folders or 'pydoc'")
    out: list[Document] = []
    named: list[tuple[str, Path]] = []
    if sum(str(item) == "pydoc" for item in docs) > 1:
        raise ValueError("docs: names 'pydoc' more than once; give it once")
    for item in docs:
        if str(item) == "pydoc":
            out += pydoc_documents()
            continue
        named += _named_files(_path(item))
    out += [Document(name, _read_text(p), os.path.realpath(p)) for name, p in _unique_names(named)]
    if not any(d.text.strip() for d in out):
        raise ValueError(f"docs: every document is empty ({len(out)} files)")
    seen: set[str] = set()
    for d in out:  # names key the index: each document once
        if d.name in seen:
            raise ValueError(f"docs: names {d.name!r} more than once (a file and its folder?)")
        seen.add(d.name)
    return out
