"""The sentence encoder that ``embed``, ``attend`` and ``explain`` load: ``--model``."""

from __future__ import annotations

import argparse

from attnlab.models import SentenceEncoder

__all__ = ["add_model_option", "load_encoder"]


def add_model_option(parser: argparse.ArgumentParser) -> None:
    """``--model FOLDER``: a sentence-transformers folder instead of all-MiniLM-L6-v2."""
    parser.add_argument(
        "--model", default=None, help="a sentence-transformers folder (default: all-MiniLM-L6-v2)"
    )


def load_encoder(model: str | None) -> tuple[SentenceEncoder, str]:
    """The encoder that ``--model`` names (None: all-MiniLM-L6-v2) and its display name."""
    name = "all-MiniLM-L6-v2" if model is None else str(model)
    return SentenceEncoder.from_pretrained(model), name
