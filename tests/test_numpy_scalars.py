"""numpy's scalars where a constructor takes a number or a flag: taken as Python's int,
float or bool (as ``positive_int`` takes them) and stored so, so a config saves as JSON
and builds torch modules. Each case has its plain-Python twin as the control."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from attnlab import models as M
from attnlab import rl
from attnlab.models import gan, vae
from attnlab.tasks.translation import TranslationTask
from attnlab.train import TrainConfig

NP = {int: np.int64, float: np.float32, bool: np.bool_}


def _np(kw: dict[str, Any]) -> dict[str, Any]:
    """``kw`` with each number and flag as numpy's scalar of its kind."""
    return {k: NP[type(v)](v) for k, v in kw.items()}


def _asdict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# (what builds a config dict, the numeric arguments given)
CONFIG_CASES: list[tuple[Callable[..., dict[str, Any]], dict[str, Any]]] = [
    (lambda **k: _asdict(TrainConfig(**k)), {"progress": False, "resume": True, "steps": 3}),
    (lambda **k: _asdict(TrainConfig(**k)), {"flush_denormal": False, "lr": 0.5}),
    (lambda **k: _asdict(rl.PPOConfig(**k)), {"clip": 0.25, "gamma": 0.5}),
    (
        lambda **k: M.LanguageModel(M.LMConfig(num_layers=1, **k)).config(),
        {"vocab_size": 50, "d_model": 32, "num_heads": 4, "dropout": 0.5, "tie_weights": False},
    ),
    (
        lambda **k: M.Seq2Seq(
            M.Seq2SeqConfig(20, 20, encoder_layers=1, decoder_layers=1, **k)
        ).config(),
        {"d_model": 32, "num_heads": 4, "dim_feedforward": 32, "norm_first": False},
    ),
    (
        lambda **k: M.ViT(M.ViTConfig(patch_size=2, num_heads=2, layers=1, **k)).config(),
        {"image_size": 8, "d_model": 16, "dim_feedforward": 16, "dropout": 0.0},
    ),
    (
        lambda **k: M.Captioner(
            M.CaptionerConfig(
                image_size=8,
                patch_size=4,
                channels=1,
                d_model=16,
                num_heads=2,
                encoder_layers=1,
                **k,
            )
        ).config(),
        {"vocab_size": 20, "embed_dim": 8, "hidden_dim": 8, "attention_dim": 8},
    ),
    (
        lambda **k: gan.GAN(gan.GANConfig(**k)).config(),
        {"latent_dim": 8, "channels": 16, "attention": True},
    ),
    (
        lambda **k: vae.VAE(vae.VAEConfig(**k)).config(),
        {"latent_dim": 4, "channels": 8, "sigma": 0.5},
    ),
    (
        lambda **k: M.RNNSeq2Seq(M.RNNSeq2SeqConfig(20, 20, **k)).config(),
        {"embed_dim": 8, "hidden": 8, "decoder_hidden": 8, "attn_dim": 8},
    ),
    (
        lambda **k: TranslationTask(train_size=120, test_size=4, **k).config(),
        {"d_model": 16, "num_heads": 2, "layers": 1, "dim_feedforward": 16, "dropout": 0.0},
    ),
]


@pytest.mark.parametrize(("build", "kw"), CONFIG_CASES)
def test_numpy_scalars_are_stored_as_python_values(
    build: Callable[..., dict[str, Any]], kw: dict[str, Any]
) -> None:
    """A config given numpy's scalars saves as the one given Python's (it raised "Object
    of type int64 is not JSON serializable" at the first checkpoint)."""
    plain = json.dumps(build(**kw))
    assert json.dumps(build(**_np(kw))) == plain


def _shapes(m: Any) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


# (a model's constructor, the int arguments given)
INT_CASES: list[tuple[Callable[..., Any], dict[str, Any]]] = [
    (lambda **k: M.Seq2Seq(M.Seq2SeqConfig(20, 20, d_model=16, num_heads=2, **k)),
     {"bos": 1, "eos": 2}),
    (lambda **k: M.RNNSeq2Seq(M.RNNSeq2SeqConfig(20, 20, **k)), {"embed_dim": 8, "hidden": 8}),
    (lambda **k: M.Captioner(M.CaptionerConfig(20, image_size=8, patch_size=4, channels=1,
                                               d_model=16, num_heads=2, **k)),
     {"encoder_layers": 1, "bos": 1, "eos": 2}),
    (lambda **k: M.DocumentClassifier(9, 2, **k),
     {"embed_dim": 8, "word_hidden": 4, "sentence_hidden": 4}),
    (lambda **k: M.SentenceConfig(**k), {"max_seq_length": 8}),
]  # fmt: skip


@pytest.mark.parametrize(("build", "kw"), INT_CASES)
def test_numpy_ints_build_what_python_ints_build(
    build: Callable[..., Any], kw: dict[str, Any]
) -> None:
    """numpy's ints are sizes and token ids like Python's (bos=np.int64(1) was "out of
    range", embed_dim=np.int64(8) a TypeError from torch's nn.GRU, word_hidden and
    max_seq_length refused)."""
    plain, numpy = build(**kw), build(**_np(kw))
    if isinstance(plain, torch.nn.Module):
        assert _shapes(numpy) == _shapes(plain)
    else:
        assert numpy == plain
