"""Trained task checkpoints, rebuilt from the checkpoint alone and run on one input, with
every attention the model computed (what ``attnlab serve`` shows for ``--runs``).

A checkpoint written by ``attnlab train TASK --out DIR`` (``best.safetensors`` or
``last.safetensors``) holds the task's ``config()``: the task name, the model's config
and the vocabularies. :func:`load_run` rebuilds the vocabularies and the model from it (no
data set is built) and returns a :class:`RunModel`; :meth:`RunModel.inspect` runs it on
one text or image and returns an :class:`Inspection`: the output, the attention stacks
(recorded by :class:`attnlab.interpret.capture`, named by the module that made each call),
the output-to-source alignment of seq2seq and captioning models, and image overlays.

=============== =========== =====================================================
task            kind        stacks (``AttentionStack.name``: what the rows are)
=============== =========== =====================================================
translation     seq2seq     encoder (self), decoder (self, causal), cross: one
                            teacher-forced pass over ``<bos>`` + the output
dates           seq2seq     attention: the Bahdanau step of each output character
generation      lm          decoder (self, causal): one pass over ``<bos>`` +
                            prompt + continuation
classification  classifier  words (a row per sentence, its own words' columns),
                            sentences (one row: the document)
vision          image       encoder (self; token 0 is the CLS token)
captioning      caption     patches (self), words (a row per decoding step)
=============== =========== =====================================================

Capture records only its own thread's calls, so several threads may inspect at once (the
same :class:`RunModel` included).

Example:
    >>> import tempfile
    >>> from attnlab.train import Checkpoint, save_checkpoint
    >>> ckpt = Checkpoint({}, {"task": "dates"})
    >>> p = save_checkpoint(f"{tempfile.mkdtemp()}/best.safetensors", ckpt)
    >>> run_task_name(p)
    'dates'
"""

from __future__ import annotations

import fnmatch
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn

from attnlab.interpret import capture
from attnlab.train.checkpoint import FORMATS, CheckpointError, load_checkpoint, load_model_state

if TYPE_CHECKING:  # pragma: no cover
    from PIL.Image import Image

__all__ = [
    "AttentionStack",
    "Inspection",
    "Overlay",
    "RunModel",
    "load_run",
    "run_task_name",
]

_MAX_HEADER = 100_000_000


@dataclass
class AttentionStack:
    """One attention of a model, every layer of it.

    Attributes:
        name: ``"encoder"``, ``"decoder"``, ``"cross"``, ``"words"``, ``"sentences"``,
            ``"patches"``, ``"attention"``, ``"alignment"``.
        kind: ``"self"`` (queries and keys are the same tokens) or ``"cross"`` (they are
            not: cross-attention, a Bahdanau step, an attention pooling's learned query).
        queries: the ``Lq`` query tokens' labels.
        keys: the ``Lk`` key tokens' labels.
        weights: one ``(H, Lq, Lk)`` float32 tensor per layer, first layer first; each row
            sums to 1 (0 for a row that may attend to nothing).
    """

    name: str
    kind: str
    queries: list[str]
    keys: list[str]
    weights: list[Tensor]


@dataclass
class Overlay:
    """Weights over an image's patches: ``map (g, g)``, row-major as the patches are."""

    label: str
    map: Tensor


@dataclass
class Inspection:
    """What a model did with one input.

    Attributes:
        output: the translation, the ISO date, the continuation, the predicted label with
            its probability, or the caption.
        stacks: every attention the model computed for this input.
        alignment: seq2seq and captioning: output tokens x source tokens, one layer and
            one head: the cross-attention averaged over heads and layers (as the
            translation report draws it), or the one attention of an RNN model; rows are
            the tokens produced, then ``</s>``.
        pixels: image tasks: the image the model saw, in [0, 1], ``(h, w)`` grey or
            ``(h, w, 3)`` RGB.
        grid: image tasks: patches per side.
        overlays: vision: the rollout from the CLS token; captioning: one per word.
    """

    output: str | None
    stacks: list[AttentionStack]
    alignment: AttentionStack | None
    pixels: Tensor | None = None
    grid: int | None = None
    overlays: list[Overlay] = field(default_factory=list)


class RunModel:
    """A trained task model in eval mode, ready to :meth:`inspect` one input.

    Attributes:
        task: the task name.
        kind: ``"seq2seq"``, ``"lm"``, ``"classifier"``, ``"image"`` or ``"caption"``.
        input: ``"text"`` or ``"image"``.
        example: an input text the model can read (``""`` for image tasks).
        model: the rebuilt ``nn.Module``.
        config: the checkpoint's task config.
    """

    task: str = ""
    kind: str = ""
    input: str = "text"
    example: str = ""

    def __init__(self, model: nn.Module, config: dict[str, Any]) -> None:
        self.model, self.config = model.eval(), config

    def inspect(self, text: str | None = None, image: Image | None = None) -> Inspection:
        """Run the model on ``text`` (text tasks) or ``image`` (a PIL image of any size and
        mode, image tasks; converted as the task's data is).

        Raises:
            TypeError: the wrong kind of input for this task, or not a str / PIL image.
            ValueError: an empty text, or one the task cannot read (a date without its
                locale tag); the message names ``text``.
        """
        if self.input == "text":
            _check_absent("image", image, self)
            text = check_text(text)
            with torch.no_grad():
                return self._run_text(text)
        _check_absent("text", text, self)
        with torch.no_grad():
            return self._run_image(_check_image(image))

    def count_tokens(self, text: str) -> int:
        """Tokens the model would read for ``text`` (text tasks), to enforce a limit first."""
        if self.input != "text":
            raise TypeError(f"text: the {self.task} model reads images, not text")
        return len(self._tokens(check_text(text)))

    @classmethod
    def build(cls, config: dict[str, Any]) -> RunModel:
        """The runner of a task config (``task.config()``), with an untrained model."""
        raise NotImplementedError

    def _tokens(self, text: str) -> list[int]:
        raise NotImplementedError

    def _run_text(self, text: str) -> Inspection:
        raise NotImplementedError

    def _run_image(self, image: Image) -> Inspection:
        raise NotImplementedError


def check_text(text: object) -> str:
    """``text`` as a non-blank str, or a TypeError/ValueError naming it."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if not text.strip():
        raise ValueError(f"text must hold at least one word, got {text!r}")
    return text


def _check_absent(name: str, value: object, run: RunModel) -> None:
    if value is not None:
        raise TypeError(
            f"{name}: the {run.task} model reads {'an image' if run.input == 'image' else 'text'}"
            f", so pass {run.input}= and leave {name} out; got {type(value).__name__}"
        )


def _check_image(image: object) -> Image:
    from PIL.Image import Image as PILImage

    if not isinstance(image, PILImage):
        raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
    if image.width < 1 or image.height < 1:
        raise ValueError(f"image must be at least 1x1 pixels, got {image.width}x{image.height}")
    return image


class _Tokens(Protocol):
    tokens: list[str]


def labels(vocab: _Tokens, ids: Sequence[int]) -> list[str]:
    """The token of each id (``<unk>`` for unknown words; spaces shown as ``␣``).

    Example:
        >>> from attnlab.tasks.text import SPECIALS, Vocab
        >>> labels(Vocab([*SPECIALS, "vingt", " "]), [1, 4, 3, 5])
        ['<bos>', 'vingt', '<unk>', '␣']
    """
    return ["\u2423" if vocab.tokens[i] == " " else vocab.tokens[i] for i in ids]


def stack(
    cap: capture, pattern: str, name: str, kind: str, queries: Sequence[str], keys: Sequence[str]
) -> AttentionStack:
    """The calls of ``cap`` whose module name matches ``pattern``, in call order (one per
    layer for one forward pass), batch row 0 of each: ``(H, Lq, Lk)`` float32."""
    weights = [c.weights[0].float() for c in cap.records if fnmatch.fnmatchcase(c.name, pattern)]
    return AttentionStack(name, kind, list(queries), list(keys), weights)


def steps_stack(
    cap: capture, pattern: str, name: str, queries: Sequence[str], keys: Sequence[str]
) -> AttentionStack:
    """A one-head attention called once per decoding step (``(1, 1, 1, Lk)`` each) as
    one layer ``(1, steps, Lk)``: row ``t`` is the call of step ``t``."""
    rows = [c.weights[0] for c in cap.records if fnmatch.fnmatchcase(c.name, pattern)]
    return AttentionStack(name, "cross", list(queries), list(keys), [torch.cat(rows, 1).float()])


def head_layer_mean(s: AttentionStack, name: str, queries: Sequence[str]) -> AttentionStack:
    """``s`` averaged over heads and layers: one ``(1, Lq, Lk)`` layer."""
    w = torch.stack([x.mean(0) for x in s.weights]).mean(0)  # (Lq, Lk)
    return AttentionStack(name, "cross", list(queries), s.keys, [w[None]])


def run_task_name(path: str | Path) -> str:
    """The task of a checkpoint file, read from its safetensors header's metadata only:
    the first ``8 + n`` bytes (no tensor is read, however large the file).

    Raises:
        CheckpointError: the file is missing, unreadable, or not an attnlab task checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    meta = _header_metadata(path)
    try:
        task = json.loads(meta["config"])["task"] if meta.get("format") in FORMATS else None
    except (KeyError, TypeError, ValueError):
        task = None
    if not isinstance(task, str):
        raise CheckpointError(f"{str(path)!r} is not an attnlab task checkpoint (no task name)")
    return task


def _header_metadata(path: Path) -> dict[str, Any]:
    """The ``__metadata__`` of a safetensors file: an 8-byte little-endian length ``n``,
    then ``n`` bytes of JSON (the format's header; at most 100 MB by its spec)."""
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        raw = f.read(n) if 0 < n <= _MAX_HEADER else b""
    try:
        header = json.loads(raw) if len(raw) == n else None
    except ValueError:  # UnicodeDecodeError is one
        header = None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{str(path)!r} is not a safetensors file with metadata")
    return meta


def load_run(path: str | Path) -> RunModel:
    """Rebuild the model of a task checkpoint (``best.safetensors`` or ``last``) in eval
    mode, with its vocabularies, from the checkpoint alone.

    Example:
        >>> import tempfile
        >>> from attnlab.tasks.generation import GenerationTask
        >>> from attnlab.train import Checkpoint, save_checkpoint
        >>> task = GenerationTask(train_size=60, test_size=10, d_model=16, num_heads=2)
        >>> ckpt = Checkpoint(task.build_model().state_dict(), task.config())
        >>> run = load_run(save_checkpoint(f"{tempfile.mkdtemp()}/best.safetensors", ckpt))
        >>> s = run.inspect(text="we count").stacks[0]  # prompt + continuation, one pass
        >>> run.kind, s.name, len(s.weights), s.weights[0].shape[0], s.queries[:3]
        ('lm', 'decoder', 2, 2, ['<bos>', 'we', 'count'])

    Raises:
        CheckpointError: the file is not a readable attnlab checkpoint of a known task, or
            its weights do not fit the model its config describes.
    """
    from attnlab.tasks import inspect_image, inspect_text

    runners: dict[str, type[RunModel]] = {**inspect_text.RUNNERS, **inspect_image.RUNNERS}
    task = run_task_name(path)
    if task not in runners:
        raise CheckpointError(f"{str(path)!r} is a {task!r} checkpoint; known: {sorted(runners)}")
    ckpt = load_checkpoint(path)
    try:
        run = runners[task].build(ckpt.config)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"{str(path)!r}: its {task} config cannot rebuild the model ({e!r})"
        ) from e
    load_model_state(run.model, ckpt, path)
    return run
