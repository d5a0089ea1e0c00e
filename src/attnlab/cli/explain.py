"""``attnlab explain TEXT``: what a sentence encoder attends to, and which tokens matter.

Loads the shipped all-MiniLM-L6-v2 (or any sentence-transformers folder), hands it to
:func:`attnlab.interpret.explain_text` as a :class:`~attnlab.interpret.TextModel`, prints
the most important tokens and the files written: the interactive HTML report and PNG
pictures beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from attnlab._io import OutputLock
from attnlab.cli._args import (
    check_html_out,
    check_in_folder,
    check_out_file,
    check_outputs_not_inputs,
    clean_text,
    int_in,
    shown,
)
from attnlab.cli._errors import UsageError
from attnlab.cli._paths import user_path
from attnlab.cli._sentence import (
    add_model_option,
    check_fits,
    check_has_tokens,
    load_encoder,
    model_folder,
    model_parts,
    texts_named,
)
from attnlab.interpret import TextModel, explain_text
from attnlab.interpret.text import Progress, explanation_files
from attnlab.models import SentenceEncoder
from attnlab.tasks.encoder import text_model

__all__ = ["add_parsers", "run", "text_model"]

MAX_FLOW_TOKENS = 256  # the shipped encoder's longest input; its flow takes about 15 min
UNITS = {"integrated gradients": "steps", "attention flow": "rows"}


def add_parsers(sub: Any) -> None:
    """Add the ``explain`` subcommand to an argparse subparsers object."""
    p = sub.add_parser("explain", help="explain a sentence encoder's attention (HTML + PNGs)")
    p.add_argument("text", metavar="TEXT")
    p.add_argument(
        "--out",
        type=user_path,
        default="report.html",
        help="the HTML report; PNGs go beside it (default %(default)s)",
    )
    p.add_argument("--against", default=None, help="explain the similarity to this text")
    p.add_argument(  # 100000 steps asked for 74.5 GiB after the model had loaded
        "--steps",
        type=int_in(2, 1024),
        default=32,
        help="integrated-gradients steps (default %(default)s)",
    )
    p.add_argument(  # the flow of a 510-token text ran for about 7 h, printing nothing
        "--flow-tokens",
        type=int_in(0, MAX_FLOW_TOKENS),
        default=64,
        help=f"attention flow only up to this many tokens, at most {MAX_FLOW_TOKENS} (default "
        "%(default)s); MiniLM's flow takes about 10 s at 50 tokens, 25 s at 100, 6 min at 200, "
        "15 min at 250, and a line on stderr shows the rows done and the time left",
    )
    add_model_option(p)
    p.add_argument(
        "--hf-model",
        type=user_path,
        default=None,
        metavar="DIR",
        help="explain a local transformers encoder or decoder folder instead (attnlab[hf])",
    )
    p.add_argument(
        "--continuation", default=None, help="with a decoder: explain log p(this | TEXT)"
    )
    p.set_defaults(run=run)


def _hf_model(args: argparse.Namespace, text: str, continuation: str | None) -> TextModel:
    """``--hf-model DIR`` on the attnlab transformers backend; a folder that holds no model
    it can load, or ``--continuation`` with an encoder, is a usage error."""
    try:
        import transformers  # noqa: F401  (it said "... (an optional dependency is missing)")
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(f"{e}; pip install 'attnlab[hf]'") from e
    from attnlab.integrations.hf_text import (
        hf_text_model,
        is_decoder,
        is_seq2seq,
        load_hf_model,
        load_hf_tokenizer,
    )

    config = _hf_config(args.hf_model)
    seq2seq = is_seq2seq(config)  # load_hf_tokenizer names it below
    kind = getattr(config, "model_type", "unknown")
    if continuation is not None and not is_decoder(config) and not seq2seq:
        msg = f"needs a decoder --hf-model; {args.hf_model!r} is an encoder ({kind})"
        raise UsageError("--continuation", msg)
    if args.against is not None and is_decoder(config):  # a log-probability has no
        # similarity: every explanation was 0 (cosine of two numbers)
        msg = f"needs an encoder --hf-model; {args.hf_model!r} is a decoder ({kind})"
        raise UsageError("--against", f"{msg}: explain a continuation with --continuation")
    from safetensors import SafetensorError

    try:
        tokenizer = load_hf_tokenizer(args.hf_model)[1]
    except (OSError, ValueError) as e:
        raise UsageError("--hf-model", str(e).removeprefix("--hf-model: ")) from e
    _check_texts(args, text, continuation, tokenizer, config)  # before the weights load
    try:
        model = load_hf_model(args.hf_model, config)
    except SafetensorError as e:  # (it was exit 1, naming no argument)
        msg = f"{args.hf_model!r}: its weights cannot be read ({e}); truncated or corrupt?"
        raise UsageError("--hf-model", msg) from e
    except (OSError, ValueError) as e:
        raise UsageError("--hf-model", str(e).removeprefix("--hf-model: ")) from e
    try:
        return hf_text_model(model, tokenizer, text=text, continuation=continuation)
    except ValueError as e:
        if continuation is not None and "continuation" in str(e):
            raise UsageError("--continuation", str(e)) from e
        if str(e).startswith("--hf-model: "):
            raise UsageError("--hf-model", str(e).removeprefix("--hf-model: ")) from e
        raise


def _check_texts(
    args: argparse.Namespace, text: str, continuation: str | None, tokenizer: Any, config: Any
) -> None:
    """TEXT and ``--against`` fit the model and hold tokens it reads, measured with the
    tokenizer alone (a text too long was refused after the weights loaded, below
    transformers' progress bar and its own long-sequence warning)."""
    from attnlab.integrations.hf_text import decoder_ids, is_decoder

    def ids(x: str, special: bool = True) -> list[int]:
        return list(tokenizer(x, add_special_tokens=special, verbose=False)["input_ids"])

    text_ids: Callable[[str], list[int]] = ids
    follow = 0  # the tokens a decoder scores after the text: the
    if is_decoder(config):  # continuation, or 1; the text counted without EOS
        follow = 1 if continuation is None else len(ids(continuation, special=False))
        text_ids = lambda x: decoder_ids(tokenizer, x, verbose=False)  # noqa: E731
    checks = (("TEXT", text, text_ids, follow), ("--against", args.against, ids, 0))
    for name, s, count, n in checks:
        check_fits(name, s, count, config, n)
        if s is not None:
            check_has_tokens(name, s, ids)


def _hf_config(folder: str) -> Any:
    """The transformers config in ``folder``, read before any weights; a usage error of
    ``--hf-model`` if the folder is missing or holds no readable ``config.json``."""
    import transformers

    path = _hf_folder(folder)
    try:
        return transformers.AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UsageError("--hf-model", f"cannot read {str(path / 'config.json')!r}: {e}") from e


def _hf_folder(folder: str) -> Path:
    """``--hf-model``'s folder: a readable folder that holds a ``config.json`` (a usage
    error of ``--hf-model`` otherwise)."""
    path = check_in_folder("--hf-model", folder)
    if not (path / "config.json").is_file():
        msg = f"{folder!r} holds no config.json; give a local transformers model folder"
        raise UsageError("--hf-model", msg)
    return path


def _optional_text(args: argparse.Namespace, name: str, value: str | None) -> str | None:
    """An optional text argument: None, or a text that is not blank."""
    if value is None:
        return None
    fixed = clean_text(args, name, value)
    if not fixed.strip():
        raise UsageError(name, "is empty; give a text or leave the option out")
    return fixed


def _check_args(args: argparse.Namespace) -> tuple[str, str | None, str | None, Path]:
    """TEXT, ``--against``, ``--continuation`` (it needs ``--hf-model``) and ``--out``,
    checked before any work."""
    text = clean_text(args, "TEXT", args.text)
    if not text.strip():
        raise UsageError("TEXT", "is empty; give a sentence to explain")
    against = _optional_text(args, "--against", args.against)
    continuation = _optional_text(args, "--continuation", args.continuation)
    if continuation is not None and args.hf_model is None:
        msg = "needs a decoder --hf-model (the sentence encoder has no continuation)"
        raise UsageError("--continuation", msg)
    if args.model is not None and args.hf_model is not None:  # --model went unread
        raise UsageError("--model", "and --hf-model name two models; give one of them")
    out = check_out_file("--out", args.out)
    folder = _hf_folder(args.hf_model) if args.hf_model is not None else model_folder(args.model)
    # the pictures beside the report too; none may be a model file (weights were replaced;
    # without --model, the shipped model's config.json could be)
    check_outputs_not_inputs("--out", explanation_files(out), folder)
    check_html_out("--out", out)  # (the pictures beside it are named by explain)
    return text, against, continuation, out


def run(args: argparse.Namespace) -> int:
    """``attnlab explain``."""
    text, against, continuation, out = _check_args(args)
    if args.hf_model is not None:
        model = _hf_model(args, text, continuation)
    else:
        tokens = model_parts(args.model)[0]  # before the weights load (~1 s)
        for name, t in (("TEXT", text), ("--against", against)):
            if t is not None:
                check_has_tokens(name, t, tokens)
        model = _named_text_model(load_encoder(args.model)[0], text)
    lock = OutputLock(out, folder=False, command=f"attnlab explain --out {out}")
    with lock, _progress_lines() as progress:
        ex = explain_text(
            model,
            text,
            out,
            against=against,
            steps=args.steps,
            flow_tokens=args.flow_tokens,
            progress=progress,
        )
    print(top_tokens(ex.saliency["integrated gradients"], ex.tokens))
    for path in ex.files:
        print(f"wrote {shown(path)}")  # (a name not UTF-8 was shown as \udcXX escapes)
    return 0


@contextmanager
def _progress_lines() -> Iterator[Progress]:
    """A ``progress(done, total, label)`` that redraws one stderr line per part of the
    work, ``label: done/total unit``, with the time left once a part has some done
    (integrated gradients and attention flow ran for minutes with nothing printed). As
    ``ask``'s line: a line left unfinished (Ctrl-C, an error) is ended on the way out."""
    started: dict[str, float] = {}
    unfinished, width = False, 0

    def progress(done: int, total: int, label: str) -> None:
        nonlocal unfinished, width
        elapsed = time.perf_counter() - started.setdefault(label, time.perf_counter())
        unfinished = done < total
        line = f"{label}: {done}/{total} {UNITS.get(label, '')}".rstrip()
        if unfinished and done:
            line += f" (about {_duration(elapsed / done * (total - done))} left)"
        end = "" if unfinished else "\n"
        print(f"\r{line:<{width}}", end=end, file=sys.stderr, flush=True)  # (spaces: over
        width = len(line) if unfinished else 0  # the longer line before)

    try:
        yield progress
    finally:
        if unfinished:
            print(file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    """``seconds`` as a person reads a wait.

    Example:
        >>> _duration(42.4), _duration(400), _duration(25000)
        ('42 s', '7 min', '6.9 h')
    """
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def _named_text_model(encoder: SentenceEncoder, text: str) -> TextModel:
    """:func:`text_model` of ``encoder`` whose truncation warning names the text as the
    command line does, ``TEXT`` or ``--against`` (it said the encoder's ``texts[0]`` for
    either; embed and attend said ``TEXT``), once per text."""
    model = text_model(encoder)
    seen: dict[str, list[int]] = {}

    def tokenize(t: str) -> Sequence[int]:
        if t not in seen:
            with texts_named(lambda i: "TEXT" if t == text else "--against"):
                seen[t] = list(model.tokenize(t))
        return list(seen[t])

    return dataclasses.replace(model, tokenize=tokenize)


def top_tokens(saliency: Sequence[float], tokens: Sequence[str], k: int = 5) -> str:
    """The line naming the ``k`` tokens of largest attribution by size, signs shown: a
    decoder's score is ``-log p``, so the tokens that make its token likely are negative
    (sorted by signed value they never showed).

    Example:
        >>> top_tokens([0.1, -0.9, 0.5], ["a", "b", "c"], k=2)
        'most important tokens (integrated gradients, by size): b (-0.900), c (+0.500)'
    """
    top = sorted(zip(saliency, tokens, strict=True), key=lambda p: abs(p[0]), reverse=True)
    named = ", ".join(f"{t} ({v:+.3f})" for v, t in top[:k])
    return f"most important tokens (integrated gradients, by size): {named}"
