"""Documents and their sentences: text files, folders of them, or Python's reference.

A document is split into paragraphs at blank lines, and what is not prose is kept out of
the sentences: headings (a line underlined, or over- and underlined, with ``*``, ``=``,
``-``, ``~``, ``^`` or ``#``, and Markdown's ``# Title``), grammar rules (``::=``),
interactive examples (``>>>``), tables (reST grids and Markdown pipes), code blocks
(fenced by three backticks or ``~~~``; an indented paragraph after one that ends with
``:`` or ``::``; in ``.md`` files, one indented 4 columns past the prose above it), reST
explicit markup (``.. name::`` directives and ``..`` comments, with their indented bodies;
an admonition's body, as under ``.. note::``, is prose) and HTML comments. Each prose
paragraph has its lines joined (list bullets dropped) and is split into sentences by pysbd
(a rule-based splitter that knows abbreviations, decimals and dotted names).

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
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from attnlab._validate import instance_of
from attnlab.apps.sentences import split_sentences

__all__ = [
    "SUFFIXES",
    "Document",
    "Sentence",
    "check_prose",
    "document_files",
    "load_documents",
    "split_document",
    "split_sentences",
]

SUFFIXES = (".txt", ".md", ".rst")
_UNDERLINE = re.compile(r"^\s*([*=\-~^#])\1{2,}\s*$")
_BULLET = re.compile(r"^(?:[*\-+•]|\d{1,2}[.)])\s+")
_NOT_CODE_LEAD = ("note:", "see also:", "warning:")
_ATX = re.compile(r"^#{1,6}[ \t]+(\S.*?)(?:[ \t]+#+)?[ \t]*$")  # "## Title ##"
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")
_HTML_COMMENT = re.compile(r"<!--.*?-->", re.S)
_MD_TABLE_RULE = re.compile(
    r"^[ \t]*\|?[ \t]*:?-+:?[ \t]*(?:\|[ \t]*:?-+:?[ \t]*)+\|?[ \t]*$", re.M
)
_EXPLICIT = re.compile(r"^[ \t]*\.\.(?:[ \t]|$)")  # reST: ".. name:: arg", ".. comment"
_DIRECTIVE = re.compile(r"^[ \t]*\.\.[ \t]+([\w-]+)::(.*)$")
_PROSE_DIRECTIVES = (  # reST directives whose body is prose, not code
    "note", "warning", "tip", "hint", "important", "caution", "attention", "danger", "error",
    "admonition", "seealso", "versionadded", "versionchanged", "deprecated",
)  # fmt: skip
_NO_MARKUP = -1


@dataclass(frozen=True)
class Document:
    """A named text; ``digest`` is its content hash (the index's invalidation key).

    Example:
        >>> a, b = Document("a.txt", "Cats purr. Dogs bark."), Document("b.txt", "Cats purr.")
        >>> a.digest == Document("copy", a.text).digest, a.digest == b.digest, len(a.digest)
        (True, False, 64)
        >>> [s.text for s in split_document(a)]
        ['Cats purr.', 'Dogs bark.']
    """

    name: str
    text: str

    def __post_init__(self) -> None:  # (a Path name or bytes text failed later, unnamed)
        instance_of("name", self.name, str, "a str")
        instance_of("text", self.text, str, "a str")

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class Sentence:
    """One sentence: its text, document, the heading above it and its paragraph number.

    Example:
        >>> split_document(Document("pets", "Pets\\n====\\n\\nCats purr.\\n\\nDogs bark."))[-1]
        Sentence(text='Dogs bark.', doc='pets', section='Pets', para=1)
    """

    text: str
    doc: str
    section: str
    para: int


def _indent(block: str) -> int:
    lines = [ln for ln in block.splitlines() if ln.strip()]
    return min(len(ln) - len(ln.lstrip()) for ln in lines)


def _is_code(block: str, previous: str, prev_indent: int, markdown: bool) -> bool:
    """A grammar rule, an interactive example, a table, or an indented block after a ``:``
    (in Markdown: a block indented 4 columns past ``prev_indent``)."""
    first = block.strip()
    if "::=" in block or first.startswith((">>>", "+-")) or re.match(r"=+ +=", first):
        return True
    if _MD_TABLE_RULE.search(block):  # a Markdown table's "|---|---|" row
        return True
    if markdown:
        return _indent(block) >= prev_indent + 4
    lead = previous.strip().lower()
    ends_colon = lead.endswith(":") and not lead.startswith(_NOT_CODE_LEAD)
    return ends_colon and _indent(block) > prev_indent


def _is_fence(line: str, above: str) -> re.Match[str] | None:
    """A line that opens a code fence (a bare ``~~~`` run under a line no longer than it
    is that line's reST underline)."""
    m = _FENCE.match(line)
    if m and m.group(1)[0] == "~" and not m.group(2).strip():
        return None if 0 < len(above.strip()) <= len(m.group(1)) else m
    return m


def _unfenced(text: str) -> str:
    """``text`` with fenced code blocks and HTML comments blanked out, and every Markdown
    ``# heading`` a paragraph of its own."""
    out: list[str] = []
    fence = ""
    flat = text.replace("\r\n", "\n").replace("\r", "\n")  # old Mac line ends too
    for line in _HTML_COMMENT.sub("\n", flat).split("\n"):
        if fence:  # code, until a bare run of the fence's character at least as long
            m = _FENCE.match(line)
            if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence):
                fence = "" if not m.group(2).strip() else fence
            line = ""
        elif m := _is_fence(line, out[-1] if out else ""):
            fence, line = m.group(1), ""
        elif _ATX.match(line):
            line = f"\n{line}\n"
        out.append(line)
    return "\n".join(out)


def _heading(lines: list[str]) -> tuple[str, list[str]] | None:
    """The section title that opens a paragraph's ``lines``, and the lines after it."""
    if m := _ATX.match(lines[0]):
        return m.group(1).strip(), lines[1:]
    if len(lines) >= 3 and _UNDERLINE.match(lines[0]) and _UNDERLINE.match(lines[2]):
        return lines[1].strip(), lines[3:]  # over- and underlined
    if len(lines) >= 2 and _UNDERLINE.match(lines[1]):
        return lines[0].strip(), lines[2:]
    return None


_STRONG = re.compile(r"\*\*(?=\S)(.+?)(?<=\S)\*\*", re.DOTALL)  # Markdown's strong emphasis


def _prose(block: str) -> str:
    """A prose paragraph's text: a list's bullets dropped (those of the kind that opens
    it, so a wrapped ``2) ...`` stays), a reST ``text::`` read as ``text:``."""
    lines = [ln.strip() for ln in block.splitlines()]
    if b := _BULLET.match(lines[0]):
        kind = re.sub(r"\d+", "1", b.group(0).strip())
        for i, ln in enumerate(lines):
            if (m := _BULLET.match(ln)) and re.sub(r"\d+", "1", m.group(0).strip()) == kind:
                lines[i] = ln[m.end() :]
    text = "\n".join(lines)
    return re.sub(r"\s+::$", "", re.sub(r"(\S)::$", r"\1:", text))


def _paragraphs(text: str, markdown: bool = False) -> list[tuple[str, str]]:
    """``(section, prose paragraph)`` pairs of a document, headings and code left out."""
    out: list[tuple[str, str]] = []
    section, previous, prev_indent, markup = "", "", 0, _NO_MARKUP
    for block in re.split(r"\n[ \t]*\n", _unfenced(text)):
        lines = [ln for ln in block.splitlines() if ln.strip()]
        if not lines or (markup != _NO_MARKUP and _indent(block) > markup):
            continue  # blank, or the indented body of a directive or comment
        markup = _NO_MARKUP
        if heading := _heading(lines):  # a heading, maybe with prose
            section, lines = heading
            if not lines:
                continue
        if _EXPLICIT.match(lines[0]):  # reST directive or comment, its body indented
            d = _DIRECTIVE.match(lines[0])
            if not d or d.group(1).lower() not in _PROSE_DIRECTIVES:
                markup = _indent(lines[0])
                continue
            arg = d.group(2).strip()  # an admonition's text, or a version number
            previous, prev_indent = "", _indent(lines[0])  # its indented body is prose
            lines = [arg] * bool(re.search(r"[^\W\d_]", arg)) + lines[1:]
            if not lines:
                continue
        block = "\n".join(lines)
        if _is_code(block, previous, prev_indent, markdown):
            continue
        previous, prev_indent = lines[-1], _indent(block)
        if markdown and (b := _BULLET.match(lines[0].lstrip())):
            prev_indent += len(b.group(0))  # a list item's own indented paragraphs are prose
        para = _prose(block)
        if markdown:  # "**Fast.** The encoder..." gave "** The encoder..." and "**Fast."
            para = _STRONG.sub(r"\1", para)
        if re.search(r"\w", para) and para.lower() not in _NOT_CODE_LEAD:
            out.append((section, para))  # not a bare "Note:", "::" or "---"
    return out


def split_document(
    doc: Document, progress: Callable[[int, int], None] | None = None
) -> list[Sentence]:
    """Every prose sentence of ``doc``, in order (see the module docstring);
    ``progress(done, total)`` after each paragraph (pysbd's time grows with the square of a
    paragraph's length: a 300,000-character one takes about a minute).

    Example:
        >>> text = ("# Setup\\n\\nInstall it. Then run:\\n\\n```\\npip install x\\n```\\n\\n"
        ...         "## Use\\n\\nCall f().\\n")  # the fenced code is no prose
        >>> [(s.section, s.para, s.text) for s in split_document(Document("notes.md", text))]
        [('Setup', 0, 'Install it.'), ('Setup', 0, 'Then run:'), ('Use', 1, 'Call f().')]
    """
    if not isinstance(doc, Document):  # (a str: "'str' object has no attribute 'name'")
        raise TypeError(f"doc must be a Document, got {type(doc).__name__}")
    markdown = doc.name.lower().endswith((".md", ".markdown"))
    paragraphs = _paragraphs(doc.text, markdown)
    out: list[Sentence] = []
    for i, (section, para) in enumerate(paragraphs):
        if progress is not None:
            progress(i, len(paragraphs))
        out += [Sentence(s, doc.name, section, i) for s in split_sentences(para)]
    if progress is not None:
        progress(len(paragraphs), len(paragraphs))
    return out


def check_prose(docs: Sequence[Document]) -> None:
    """A ValueError if no document of ``docs`` holds a prose sentence (empty, or only
    code): said before the model loads (``attnlab ask`` loaded it first). Documents are
    split until the first one with prose.

    Example:
        >>> check_prose([Document("a.md", "```\\nprint(1)\\n```\\n")])
        Traceback (most recent call last):
        ...
        ValueError: docs: the documents hold no prose sentences (empty, or only code)
    """
    if not any(split_document(d) for d in docs):
        raise ValueError("docs: the documents hold no prose sentences (empty, or only code)")


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
        return raw.decode("utf-8-sig")  # a byte-order mark is not text (it hid a heading)
    except UnicodeDecodeError as e:
        raise ValueError(f"docs: {str(path)!r} is not UTF-8 text ({e.reason} at {e.start})") from e


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
            regular file or folder (a pipe, such as ``/dev/stdin``), a binary or non-UTF-8
            file, a folder without text files, a document named twice (a file and its
            folder), or no documents at all.

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
    out += [Document(name, _read_text(p)) for name, p in _unique_names(named)]
    if not any(d.text.strip() for d in out):
        raise ValueError(f"docs: every document is empty ({len(out)} files)")
    seen: set[str] = set()
    for d in out:  # names key the index: each document once
        if d.name in seen:
            raise ValueError(f"docs: names {d.name!r} more than once (a file and its folder?)")
        seen.add(d.name)
    return out
