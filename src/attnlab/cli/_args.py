"""Argument checks shared by the commands, run before any work starts.

Numbers are checked by ``argparse`` types (:func:`int_in`, :func:`float_in`,
:func:`names_in`), so ``--steps -5`` fails while parsing, one line naming the argument.
Paths are checked by the ``check_*`` functions, which raise :class:`UsageError` naming
the argument: an output folder must be creatable and writable, an input folder readable.

A script (``benchmarks/*.py``) builds its parser with :func:`script_parser`, so that it
fails as the commands do (one line on stderr, exit status 2) and its ``--help`` shows
every default as theirs does, ``(default X)``.

Example:
    >>> int_in(1)("12"), float_in(0.0, open_low=True)("3e-4"), ints_in(1)("128,256")
    (12, 0.0003, (128, 256))
    >>> int_in(1)("-5")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: must be an int >= 1, got '-5'
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import tempfile
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from attnlab._io import decode_text
from attnlab.cli._errors import Parser, UsageError, warn
from attnlab.cli._paths import check_not_system

__all__ = [
    "DefaultsShown",
    "check_html_out",
    "check_in_folder",
    "check_not_empty",
    "check_not_input",
    "check_out_file",
    "check_out_folder",
    "clean_text",
    "clip",
    "float_in",
    "int_in",
    "ints_in",
    "names_in",
    "parse_smoke",
    "refuse_beside_smoke",
    "script_parser",
    "shown",
    "shown_default",
]


def script_parser(doc: str | None) -> argparse.ArgumentParser:
    """The parser of a script such as ``benchmarks/bench_flow.py``, described by the first
    paragraph of its ``doc`` (a wrapped first sentence was cut at its first line): the
    commands' :class:`~attnlab.cli._errors.Parser`, so a bad argument is one line on stderr
    and exit status 2 (argparse's own printed its usage above the error) and ``--lr -1e-3``
    is a value; its help shows each option's default (:class:`DefaultsShown`).

    Example:
        >>> p = script_parser("Time things\\nat length.\\n\\nMore.")
        >>> _ = p.add_argument("--n", type=int, default=64, help="tokens")
        >>> p.description, " ".join(p.format_help().split()[-5:])
        ('Time things at length.', '--n N tokens (default 64)')
    """
    first = (doc or "").strip().split("\n\n")[0]
    return Parser(description=" ".join(first.split()), formatter_class=DefaultsShown)


def shown_default(action: argparse.Action) -> str | None:
    """How ``--help`` shows an option's default: a list (``nargs``) space-separated, a tuple
    (a comma list's value) comma-separated; None for none to show (a positional, a flag, a
    None or empty default, a hidden option, a help that names its default already).

    Example:
        >>> p = argparse.ArgumentParser()
        >>> a, b = p.add_argument("--ns", default=(128, 256)), p.add_argument("--quiet")
        >>> shown_default(a), shown_default(b)
        ('128,256', None)
    """
    d, said = action.default, action.help or ""
    named = "(default " in said or "%(default)" in said  # (as the commands write it)
    if not action.option_strings or said == argparse.SUPPRESS or named:
        return None
    if any(d is x for x in (None, False, argparse.SUPPRESS)) or d in ("", [], ()):
        return None
    if isinstance(d, list | tuple):
        return (" " if isinstance(d, list) else ",").join(map(str, d))
    return str(d)


class DefaultsShown(argparse.HelpFormatter):
    """Help that ends each option's text with ``(default X)`` (:func:`shown_default`), the
    form the commands write by hand; an option without help text gets that alone
    (argparse's ArgumentDefaultsHelpFormatter says ``(default: X)``, and nothing for an
    option without help)."""

    def _format_action(self, action: argparse.Action) -> str:
        shown = shown_default(action)
        if shown is not None:
            action = copy.copy(action)
            said = f"{action.help or ''} (default {shown.replace('%', '%%')})"
            action.help = said.lstrip()
        return super()._format_action(action)


def refuse_beside_smoke(given: Sequence[str]) -> None:
    """Refuse the options ``given`` beside ``--smoke``, which sets them itself (the values
    given went unread): a :class:`UsageError` naming the first.

    Example:
        >>> refuse_beside_smoke([])
        >>> refuse_beside_smoke(["--n"])
        Traceback (most recent call last):
        attnlab.cli._errors.UsageError: argument --n: and --smoke both set it; give one of them
    """
    if given:
        raise UsageError(given[0], "and --smoke both set it; give one of them")


def parse_smoke(
    p: argparse.ArgumentParser, argv: Sequence[str] | None, sizes: dict[str, object]
) -> argparse.Namespace:
    """``p.parse_args(argv)``, where ``--smoke`` sets the options of ``sizes`` (their dests,
    ``--batch-size`` as ``batch_size``, to their smoke values); one of them also given is
    one line from ``p.error`` (:func:`refuse_beside_smoke`), exit status 2."""
    args = p.parse_args(argv)
    if not args.smoke:
        return args
    unset = object()  # argparse fills in a default only where the namespace has none
    seen = p.parse_args(argv, argparse.Namespace(**dict.fromkeys(sizes, unset)))
    try:
        given = [dest for dest in sizes if getattr(seen, dest) is not unset]
        refuse_beside_smoke(["--" + dest.replace("_", "-") for dest in given])
    except UsageError as e:
        p.error(str(e))
    for dest, value in sizes.items():
        setattr(args, dest, value)
    return args


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an int in ``[low, high]``."""
    allowed = f"an int >= {low}" if high is None else f"an int in [{low}, {high}]"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}")
        return value

    parse.__name__ = "int"
    return parse


def ints_in(low: int, high: int | None = None) -> Callable[[str], tuple[int, ...]]:
    """An argparse type: a comma list of ints, each checked by :func:`int_in`."""
    one = int_in(low, high)

    def parse(text: str) -> tuple[int, ...]:
        return tuple(one(n.strip()) for n in text.split(","))

    parse.__name__ = "list"
    return parse


def float_in(
    low: float = -math.inf, high: float = math.inf, *, open_low: bool = False
) -> Callable[[str], float]:
    """An argparse type: a finite float in ``[low, high]`` (``(low, high]`` if
    ``open_low``)."""
    if math.isinf(low) and math.isinf(high):
        allowed = "a finite number"
    elif math.isinf(high):
        allowed = f"a number {'>' if open_low else '>='} {low:g}"
    else:
        allowed = f"a number in {'(' if open_low else '['}{low:g}, {high:g}]"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}") from None
        bad = value < low or value > high or (open_low and value == low)
        if bad or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}")
        return value

    parse.__name__ = "float"
    return parse


def names_in(choices: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    """An argparse type: a comma list of names, each one of ``choices``."""

    def parse(text: str) -> tuple[str, ...]:
        names = tuple(n.strip() for n in text.split(","))
        bad = [n for n in names if n not in choices]
        if bad:
            raise argparse.ArgumentTypeError(
                f"{bad[0] if bad else text!r} is not one of {', '.join(choices)} "
                "(give a comma list of them)"
            )
        return names

    parse.__name__ = "list"
    return parse


def clean_text(args: argparse.Namespace, name: str, text: str) -> str:
    """``text`` with bytes that are not UTF-8 replaced by U+FFFD (one warning if any)."""
    fixed, replaced = decode_text(text)
    if replaced:
        warn(args, f"{name} is not valid UTF-8; the undecodable bytes were replaced by U+FFFD")
    return fixed


def shown(text: object) -> str:
    """``str(text)`` as it can be printed: a path from a file name that is not UTF-8
    holds lone surrogates, which a UTF-8 stdout refuses; they show as U+FFFD."""
    return decode_text(str(text))[0]


def check_not_empty(argument: str, text: str) -> str:
    """``text`` unless it is empty (``Path("")`` would quietly mean the current folder)."""
    if not text:
        raise UsageError(argument, "is an empty string; give a path")
    return text


def check_not_input(argument: str, out: Path, inputs: Iterable[Path]) -> None:
    """Refuse an output file ``out`` that is one of the ``inputs`` (the same file, by
    any path or link): writing it would replace what the command reads."""
    if not out.exists():
        return
    for p in inputs:
        if os.path.samefile(out, p):
            same = "" if str(p) == str(out) else f" (the same file as {str(p)!r})"
            msg = f"{str(out)!r} is an input{same}; writing it would replace it: give another file"
            raise UsageError(argument, msg)


def reachable(argument: str, path: str | Path) -> Path:
    """``path`` as a Path (not empty), unless a folder on its way cannot be entered
    (``exists()`` and ``is_dir()`` raised a bare PermissionError there): a usage error
    naming ``argument``."""
    p = Path(check_not_empty(argument, path) if isinstance(path, str) else path)
    try:
        p.exists()
    except PermissionError:
        raise UsageError(argument, f"{str(p)!r} cannot be reached (permission denied)") from None
    except OSError as e:  # (a name past 255 bytes: a bare "OSError: [Errno 36]", exit 1)
        raise UsageError(argument, f"{str(p)!r} cannot be reached ({e.strerror or e})") from None
    for level in (p, *p.parents):  # exists() follows links: a dangling one read as absent,
        # and the command failed after its work ("File exists", exit 1)
        if level.is_symlink() and not level.exists():
            raise UsageError(
                argument, f"{str(level)!r} is a link to a missing place (or a loop of links)"
            )
    return p


def check_out_folder(argument: str, path: str | Path) -> Path:
    """``path`` as an output folder: it exists as a writable folder, or can be created."""
    p = reachable(argument, path)
    if p.exists() and not p.is_dir():
        raise UsageError(argument, f"{str(p)!r} is a file, not a folder")
    _check_creatable(argument, p)
    return p


def check_entries(
    argument: str, folder: Path, files: Iterable[str], folders: Iterable[str] = ()
) -> None:
    """What a command writes in its output ``folder`` (``files`` and ``folders`` by name)
    can be written there: a file where a folder goes, or the reverse, failed after all
    the work (``FileExistsError: 'o1/report'``, exit 1)."""
    for name in files:  # (a name past 255 bytes: a bare OSError from is_dir(), exit 1)
        if reachable(argument, folder / name).is_dir():
            raise UsageError(argument, f"{str(folder / name)!r} is a folder; the command writes "
                             "a file there: move it away or give another --out")  # fmt: skip
        check_out_file(argument, folder / name)
    for name in folders:
        if reachable(argument, folder / name).exists() and not (folder / name).is_dir():
            raise UsageError(argument, f"{str(folder / name)!r} is a file; the command writes "
                             "a folder there: move it away or give another --out")  # fmt: skip


def check_report(argument: str, folder: Path) -> None:
    """A task's report folder can take what its finish writes: ``report.html`` and its
    pictures (``*.png``, named by the task), none of them a folder (``mkdir report.html``
    failed after all the training, exit 1)."""
    check_entries(argument, folder, ("report.html",))
    pictures = sorted(folder.glob("*.png")) if folder.is_dir() else []
    check_entries(argument, folder, [p.name for p in pictures if p.is_dir()])


def check_out_file(argument: str, path: str | Path) -> Path:
    """``path`` as an output file: not a folder, nor a name ending in ``/`` (``--out
    newdir/`` wrote a file named ``newdir``), and its folder writable or creatable."""
    if isinstance(path, str) and path.endswith(("/", os.sep)):
        example = f"{path.rstrip('/' + os.sep)}/report.html"
        raise UsageError(argument, f"{path!r} ends in '/', a folder; give a file such as {example}")
    p = reachable(argument, path)
    if p.is_dir():
        raise UsageError(argument, f"{str(p)!r} is a folder; give a file, e.g. {p / 'report.html'}")
    if p.exists() and not p.is_file():  # it would be replaced by a file, not written into
        raise UsageError(argument, f"{str(p)!r} is not a regular file (a pipe or device)")
    check_not_system(argument, p)
    _check_creatable(argument, p.parent if str(p.parent) else Path("."))
    return p


def check_html_out(argument: str, path: Path) -> None:
    """``path``, where a command writes an HTML report or page, has no suffix of another
    kind (``explain --out r.png`` wrote HTML into a ``.png``); no suffix at all is kept."""
    if path.suffix and path.suffix.lower() not in (".html", ".htm"):
        msg = f"{str(path)!r} ends in {path.suffix!r}, but what is written there is HTML"
        raise UsageError(argument, msg + ": give a file ending in .html or .htm")


def check_outputs_not_inputs(argument: str, outs: Iterable[Path], folder: Path | None) -> None:
    """Refuse outputs (``argument``'s file and those written beside it) that are folders,
    not regular files, files of the input model ``folder`` other than reports, by any path
    or link (a model's weights were overwritten by a report), or new files of a kind a
    loader reads there
    (``modules.json``: it could change the model). A report or picture in the folder,
    new or replaced, is kept (``--model .`` with the default ``--out report.html``, run
    twice). ``folder`` is checked by the caller first; it is not listed (``/usr`` took
    18 s, ``/`` failed on ``/proc``)."""
    inside = folder.resolve() if folder is not None else None
    for i, out in enumerate(outs):
        if i == 0:
            check_out_file(argument, out)
        else:  # a file the command names beside it: "is a folder; give a file, e.g.
            # pic/r_rollout.png/report.html" named the folder again, a wrong way out
            check_entries(argument, out.parent, [out.name])
        target = out.resolve()  # (a link named report.html to the weights is the weights)
        if inside is None or not target.is_relative_to(inside):
            continue
        kind = target.suffix.lower()
        if target.exists() and kind not in _REPORT_SUFFIXES:
            msg = f"{str(out)!r} is an input, a file of the model folder {str(folder)!r}: "
            raise UsageError(argument, msg + "writing it would replace it; give another file")
        if kind in _MODEL_SUFFIXES:
            msg = f"{str(out)!r} is in the model folder {str(folder)!r}, an input: writing "
            raise UsageError(argument, msg + "it could change the model; give another file")


#: kinds of file a model folder's loaders read (configs, weights, vocabularies)
_MODEL_SUFFIXES = (".json", ".safetensors", ".bin", ".txt", ".model", ".pt", ".pth")
#: kinds of file the commands write as reports (pictures among them), which no loader reads
_REPORT_SUFFIXES = (".html", ".htm", ".png")


def check_in_folder(argument: str, path: str | Path) -> Path:
    """``path`` as an input folder: it exists, is a folder and can be read."""
    p = reachable(argument, path)
    if not p.exists():
        raise UsageError(argument, f"{str(p)!r} does not exist")
    if not p.is_dir():
        raise UsageError(argument, f"{str(p)!r} is not a folder")
    if not os.access(p, os.R_OK | os.X_OK):
        raise UsageError(argument, f"{str(p)!r} cannot be read (permission denied)")
    return p


def _check_creatable(argument: str, folder: Path) -> None:
    """``folder`` exists and is writable, or its nearest existing ancestor is a writable
    folder (so it can be created)."""
    for level in (folder, *folder.absolute().parents):
        if level.exists():
            break
    if not level.is_dir():
        raise UsageError(
            argument, f"cannot create {str(folder)!r}: {str(level)!r} is a file, not a folder"
        )
    try:  # a real write: os.access said yes for root in /proc and /sys, and the command
        # failed after its work, naming its lock file
        fd, probe = tempfile.mkstemp(prefix=".attnlab-probe-", dir=level)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(
            argument,
            f"cannot write in {str(level)!r} (a test file there failed: {e.strerror or e})",
        ) from None


def clip(text: str, n: int, tail: str = "") -> str:
    """``text`` cut to about ``n`` characters, ``tail`` marking a cut, never inside a
    character a reader sees as one: combining marks, joiners, variation selectors and skin
    tones stay with what they modify (a family emoji lost a member and left a dangling
    joiner; "e" + U+0301 printed a bare "e").

    Example:
        >>> clip("cafe\u0301 au lait", 4) == "cafe\u0301", clip("short", 10, "...")
        (True, 'short')
    """
    if len(text) <= n:
        return text
    cut = max(0, n - len(tail))
    while 0 < cut < len(text) and _joined(text[cut - 1], text[cut]):
        cut += 1
    return text[:cut] + tail


def _joined(before: str, ch: str) -> bool:
    """Whether ``ch`` belongs to the character ``before`` is part of."""
    modifier = 0x1F3FB <= ord(ch) <= 0x1F3FF  # emoji skin tones
    return (
        bool(unicodedata.combining(ch))
        or ch in "\u200d\ufe0e\ufe0f"
        or before == "\u200d"
        or modifier
    )
