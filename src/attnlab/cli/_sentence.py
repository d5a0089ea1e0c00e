"""The sentence encoder that ``embed``, ``attend`` and ``explain`` load: ``--model``."""

from __future__ import annotations

import argparse

from attnlab.cli._args import check_in_folder
from attnlab.cli._errors import UsageError
from attnlab.models import SentenceEncoder
from attnlab.train import CheckpointError

__all__ = ["add_model_option", "load_encoder"]


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
