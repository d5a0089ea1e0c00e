"""The sentence encoder that ``embed``, ``attend`` and ``explain`` load: ``--model``."""

from __future__ import annotations

import argparse
import re
import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from attnlab._warnings import passed_on, quiet, warn_again
from attnlab.cli._args import check_in_folder, shown
from attnlab.cli._errors import UsageError
from attnlab.models import SentenceEncoder, TruncationWarning, minilm_path
from attnlab.train import CheckpointError

__all__ = [
    "add_model_option",
    "check_fits",
    "check_has_tokens",
    "encoder_tokens",
    "load_encoder",
    "model_folder",
    "texts_named",
]


def add_model_option(parser: argparse.ArgumentParser) -> None:
    """``--model FOLDER``: a sentence-transformers folder instead of all-MiniLM-L6-v2."""
    parser.add_argument(
        "--model", default=None, help="a sentence-transformers folder (default all-MiniLM-L6-v2)"
    )


def load_encoder(model: str | None) -> tuple[SentenceEncoder, str]:
    """The encoder that ``--model`` names (None: all-MiniLM-L6-v2) and its display name;
    a folder that is missing or not a sentence-transformers model is a usage error."""
    if model is None:
        return SentenceEncoder.from_pretrained(), "all-MiniLM-L6-v2"
    check_in_folder("--model", model)
    try:
        return SentenceEncoder.from_pretrained(model), str(model)
    except (OSError, ValueError, KeyError, CheckpointError) as e:
        msg = f"{model!r} is not a sentence-transformers folder attnlab can read: {e}"
        raise UsageError("--model", msg) from e


def model_folder(model: str | None) -> Path | None:
    """The folder whose files the command reads: ``--model``'s, checked to be a readable
    folder holding the ``config.json`` the loader reads (a usage error of ``--model``),
    else the shipped all-MiniLM-L6-v2's (None where that is not installed: loading it
    says so). An ``--out`` may name none of its files (a report replaced the default
    model's config)."""
    if model is not None:
        folder = check_in_folder("--model", model)
        if not (folder / "config.json").is_file():
            msg = f"{model!r} holds no config.json; give a sentence-transformers folder"
            raise UsageError("--model", msg)
        return folder
    try:
        return minilm_path()
    except (ModuleNotFoundError, FileNotFoundError):
        return None


def encoder_tokens(encoder: SentenceEncoder) -> Callable[[str], Sequence[int]]:
    """``encoder``'s token ids of one text, special tokens included, without the warning
    about truncated texts: the command's own encode or tokenize call gives it, once, with
    the count of all its texts (each text said "1 of 1 texts" first)."""

    def tokens(text: str) -> Sequence[int]:
        with quiet(TruncationWarning):  # (this thread's: not the process's filters)
            return encoder.tokenize([text])[0]

    return tokens


def texts_named(name: Callable[[int], str]) -> AbstractContextManager[None]:
    """The encoder's :class:`TruncationWarning` inside names a text as the command does,
    ``name(i)`` (``TEXT 2``), not by the encoder's 0-based ``texts[1]``; attnlab's
    other warnings in the block pass on as they come (only this thread's are taken)."""

    def rename(w: warnings.WarningMessage) -> None:
        message = w.message
        if isinstance(message, TruncationWarning):
            text = re.sub(r"texts\[(\d+)\]", lambda m: name(int(m[1])), str(message))
            message = TruncationWarning(text)
        warn_again(w, message)

    return passed_on(rename)


def check_has_tokens(argument: str, text: str, tokenize: Callable[[str], Sequence[int]]) -> None:
    """A usage error of ``argument`` when its text gives the model no token beyond the
    special ones ``tokenize`` adds to any text: zero-width or control characters passed
    the empty-text check, and ``[CLS] [SEP]`` alone was embedded, attended or explained."""
    if len(tokenize(text)) <= len(tokenize("")):
        msg = f"{shown(text)!r} holds no token the model reads (no word, only spaces, control "
        raise UsageError(argument, msg + "or zero-width characters); give a text with words")


def check_fits(
    name: str, text: str | None, ids: Callable[[str], list[int]], config: Any, follow: int = 0
) -> None:
    """A text longer than the model's position table is a usage error of ``name``, counted
    in tokens with the ``follow`` tokens a decoder scores after it: the model failed inside
    ("The expanded size of the tensor (92) must match ... (64)", an IndexError)."""
    limit = getattr(config, "max_position_embeddings", None)
    if text is None or not isinstance(limit, int):
        return
    n = len(ids(text)) + follow
    if n > limit:
        kind = getattr(config, "model_type", "the model")
        plus = f" with the {follow} it scores after it" if follow else ""
        msg = f"has {n} tokens{plus}; {kind} reads at most {limit}: give a shorter text"
        raise UsageError(name, msg)
