"""Documents and their sentences (:mod:`attnlab.apps.documents` reads them from files,
folders or Python's reference).

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

Example:
    >>> doc = Document("demo", "Title\\n=====\\n\\nIt is e.g. 3.5 m long. See x.y() too.\\n")
    >>> [(s.text, s.section) for s in split_document(doc)]
    [('It is e.g. 3.5 m long.', 'Title'), ('See x.y() too.', 'Title')]
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from attnlab._validate import instance_of
from attnlab.apps.sentences import split_sentences

__all__ = [
    "Document",
    "Sentence",
    "check_prose",
    "is_markdown",
    "known_sentences",
    "split_document",
    "split_sentences",
]

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
    """A named text; ``digest`` is its content hash (the index's invalidation key), and
    ``path`` the real path of the file it was read from (links resolved; None: no file),
    by which a saved index knows the file however it was named (``notes/a.txt`` in its
    folder, ``a.txt`` given alone) and whether it still exists. ``path`` takes no part in
    equality or the repr.

    Example:
        >>> a, b = Document("a.txt", "Cats purr. Dogs bark."), Document("b.txt", "Cats purr.")
        >>> a.digest == Document("copy", a.text).digest, a.digest == b.digest, len(a.digest)
        (True, False, 64)
        >>> [s.text for s in split_document(a)]
        ['Cats purr.', 'Dogs bark.']
    """

    name: str
    text: str
    path: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:  # (a Path name or bytes text failed later, unnamed)
        instance_of("name", self.name, str, "a str")
        instance_of("text", self.text, str, "a str")
        if self.path is not None:
            instance_of("path", self.path, str, "a str or None")

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
    paragraphs = _paragraphs(doc.text, is_markdown(doc.name))
    out: list[Sentence] = []
    for i, (section, para) in enumerate(paragraphs):
        if progress is not None:
            progress(i, len(paragraphs))
        out += [Sentence(s, doc.name, section, i) for s in split_sentences(para)]
    if progress is not None:
        progress(len(paragraphs), len(paragraphs))
    return out


def is_markdown(name: str) -> bool:
    """Whether a document of this name is split as Markdown (``.md``, ``.markdown``).

    Example:
        >>> is_markdown("notes/README.MD"), is_markdown("notes.txt")
        (True, False)
    """
    return name.lower().endswith((".md", ".markdown"))


def check_prose(
    docs: Sequence[Document], split: Mapping[Document, Sequence[Sentence]] | None = None
) -> dict[Document, list[Sentence]]:
    """A ValueError if no document of ``docs`` holds a prose sentence (empty, or only
    code): said before the model loads (``attnlab ask`` loaded it first). ``split``:
    documents whose sentences are known already (a saved index's); the others are split
    until the first with prose.

    Returns:
        the sentences known: ``split``'s and those of the documents split here (pass them
        on, as ``ask`` and ``build_index`` take them, and none is split twice).

    Example:
        >>> known = check_prose([Document("a", "Cats purr."), Document("b", "Rain falls.")])
        >>> [(d.name, [s.text for s in sentences]) for d, sentences in known.items()]
        [('a', ['Cats purr.'])]
        >>> check_prose([Document("a.md", "```\\nprint(1)\\n```\\n")])
        Traceback (most recent call last):
        ...
        ValueError: docs: the documents hold no prose sentences (empty, or only code)
    """
    known = known_sentences(split)
    if any(known.get(d) for d in docs):
        return known
    for d in docs:
        if d not in known and known.setdefault(d, split_document(d)):
            return known
    raise ValueError("docs: the documents hold no prose sentences (empty, or only code)")


def known_sentences(split: object) -> dict[Document, list[Sentence]]:
    """``split`` (each document's sentences, as :func:`split_document` gives them) as a
    new dict; None is an empty one, and what is no such mapping a TypeError naming it."""
    want = "split must map Documents to lists of Sentences (as check_prose returns them)"
    if split is None:
        return {}
    if not isinstance(split, Mapping):
        raise TypeError(f"{want}, got {type(split).__name__}")
    for d, s in split.items():
        if (
            not isinstance(d, Document)
            or not isinstance(s, list | tuple)
            or not all(isinstance(x, Sentence) for x in s)
        ):
            raise TypeError(f"{want}, got an item {type(d).__name__} -> {type(s).__name__}")
    return {d: list(s) for d, s in split.items()}
