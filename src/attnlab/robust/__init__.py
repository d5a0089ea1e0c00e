"""Robust attention models: adversarial training plug-ins, attention regularizers,
attacks for evaluation, and faithfulness tests of attention as an explanation.

Plug-ins go into :class:`attnlab.train.Trainer` (``plugins=[...]``); each works on any
model with an embedding layer (token embeddings, or the ViT's patch embedding / pixels).

Example:
    >>> from attnlab.robust import FGM, EntropyRegularizer
    >>> [type(p).__name__ for p in (EntropyRegularizer(0.1), FGM(0.5))]
    ['EntropyRegularizer', 'FGM']
"""

from __future__ import annotations

from attnlab.robust.adversarial import FGM, PGD, SMART, FreeLB, symmetric_kl
from attnlab.robust.attacks import CharEditAttack, EditResult, pgd_embeddings, pgd_pixels
from attnlab.robust.faithfulness import (
    AttentionSearch,
    adversarial_attention,
    jsd,
    override_attention,
    permutation_test,
    tvd,
    uniform_attention,
)
from attnlab.robust.perturb import Perturbation, find_embedding, project
from attnlab.robust.regularize import (
    EntropyRegularizer,
    HeadDropout,
    SupervisedAttention,
    attention_entropy,
    entropy_term,
    supervised_attention_term,
)

__all__ = [
    "FGM",
    "PGD",
    "SMART",
    "AttentionSearch",
    "CharEditAttack",
    "EditResult",
    "EntropyRegularizer",
    "FreeLB",
    "HeadDropout",
    "Perturbation",
    "SupervisedAttention",
    "adversarial_attention",
    "attention_entropy",
    "entropy_term",
    "find_embedding",
    "jsd",
    "override_attention",
    "permutation_test",
    "pgd_embeddings",
    "pgd_pixels",
    "project",
    "supervised_attention_term",
    "symmetric_kl",
    "tvd",
    "uniform_attention",
]
