"""The sentence encoder that ``embed``, ``attend`` and ``explain`` load: ``--model``."""

from __future__ import annotations

import argparse
import re
import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from attnlab._warnings import passed_on, warn_again
from attnlab.cli._args import check_in_folder, shown
from attnlab.cli._errors import UsageError
from attnlab.cli._paths import user_path
from attnlab.models import (
    BertConfig,
    SentenceConfig,
    SentenceEncoder,
    TruncationWarning,
    load_tokenizer,
    minilm_path,
)
from attnlab.models.sentence_folder import tokenizer_input
from attnlab.train import CheckpointError

__all__ = [
    "add_model_option",
    "check_fits",
    "check_has_tokens",
    "load_encoder",
    "model_folder",
    "model_name",
    "model_parts",
    "texts_named",
]


def add_model_option(parser: argparse.ArgumentParser) -> None:
    """``--model FOLDER``: a sentence-transformers folder instead of all-MiniLM-L6-v2."""
    parser.add_argument(
        "--model",
        type=user_path,
        default=None,
        help="a sentence-transformers folder (default all-MiniLM-L6-v2)",
    )


def load_encoder(model: str | None) -> tuple[SentenceEncoder, str]:
    """The encoder that ``--model`` names (None: all-MiniLM-L6-v2) and its display name;
    a folder that is missing or not a sentence-transformers model is a usage error."""
    if model is None:
        return SentenceEncoder.from_pretrained(), model_name(model)
    check_in_folder("--model", model)
    try:
        return SentenceEncoder.from_pretrained(model), model_name(model)
    except (OSError, ValueError, KeyError, CheckpointError) as e:
        raise _unreadable(model, e) from e


def model_name(model: str | None) -> str:
    """The name the commands print for ``--model`` (None: all-MiniLM-L6-v2)."""
    return "all-MiniLM-L6-v2" if model is None else str(model)


def model_parts(model: str | None) -> tuple[Callable[[str], Sequence[int]], BertConfig]:
    """``--model``'s token ids of one text (special tokens included, never a truncation
    warning) and its BERT config, read without the weights (milliseconds; the weights
    took ~1 s, and a text of no tokens or a ``--layer`` past the model was refused only
    after them)."""
    folder = minilm_path() if model is None else check_in_folder("--model", model)
    try:
        config = BertConfig.from_json(folder / "config.json")
        sentence = SentenceConfig.from_folder(folder, config.max_position_embeddings)
        tokenizer = load_tokenizer(folder / "tokenizer.json", sentence.max_seq_length)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise _unreadable(model_name(model), e) from e

    def tokens(text: str) -> Sequence[int]:
        return tokenizer.encode(tokenizer_input([text], sentence.lowercase)[0]).ids

    return tokens, config


def _unreadable(model: str, e: Exception) -> UsageError:
    """The usage error of a ``--model`` folder attnlab cannot read."""
    msg = f"{model!r} is not a sentence-transformers folder attnlab can read: {e}"
    return UsageError("--model", msg)


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
