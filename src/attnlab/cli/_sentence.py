"""The sentence encoder that ``embed``, ``attend`` and ``explain`` load: ``--model``."""

from __future__ import annotations

import argparse

from attnlab.cli._args import check_in_folder, shown
from attnlab.cli._errors import UsageError
from attnlab.models import SentenceEncoder
from attnlab.train import CheckpointError

__all__ = ["add_model_option", "check_has_tokens", "load_encoder", "word_tokens"]


def add_model_option(parser: argparse.ArgumentParser) -> None:
    """``--model FOLDER``: a sentence-transformers folder instead of all-MiniLM-L6-v2."""
    parser.add_argument(
        "--model", default=None, help="a sentence-transformers folder (default: all-MiniLM-L6-v2)"
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


def word_tokens(encoder: SentenceEncoder, text: str) -> int:
    """How many tokens ``encoder`` reads in ``text``, its special tokens left out."""
    return len(encoder.tokenize([text])[0]) - len(encoder.tokenize([""])[0])


def check_has_tokens(argument: str, text: str, count: int) -> None:
    """A usage error of ``argument`` when its text gives the model no token (``count``,
    special ones left out): zero-width or control characters passed the empty-text
    check, and ``[CLS] [SEP]`` alone was embedded, attended or explained."""
    if count <= 0:
        msg = f"{shown(text)!r} holds no token the model reads (no word, only spaces, control "
        raise UsageError(argument, msg + "or zero-width characters); give a text with words")
