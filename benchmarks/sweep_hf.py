"""Every transformers family through the attnlab backend: runs, equals eager, reaches attnlab?

For each model type of transformers' auto mappings (``--mapping causal``: the causal-LM
classes; ``base``: the base models), a tiny random model of the family's own config
class (every size it has shrunk, seeded) runs its main input (a right-padded batch of
token ids, with images where the model takes both; random images; raw audio; log-mel
frames) with ``attn_implementation="eager"`` and with
``"attnlab"``. One JSON line per family:

* ``status``: ``ok`` (equal to eager within ``--tol`` times its largest value, or within
  ``--tol`` absolute where that value is below 1, and attnlab's function ran),
  ``unreached`` (equal, but attnlab's function never ran: a model without attention, like
  FNet), ``mismatch`` (not equal), ``refused`` (the backend named why it
  cannot serve the model), ``error`` (the attnlab run failed otherwise), ``skipped``
  (eager itself failed on the shrunk config or the inputs: not attnlab's to judge);
* ``sizes``: ``retry`` where eager failed on the first sizes and ran on a second set
  (:data:`RETRY`);
* ``err``: the largest difference from eager over the unpadded tokens (where eager's
  output is NaN, attnlab's must be too: ``nan``); ``calls``: how many times attnlab's
  attention function ran; ``why``: the first line of an error.

A family outside the causal-LM mapping (T5) runs as its base model. A last line counts
each status; any ``mismatch`` makes the run exit with status 1. Nothing is downloaded;
only ``transformers`` is needed.

python benchmarks/sweep_hf.py                        # every causal-LM family
python benchmarks/sweep_hf.py --mapping base         # every base model
python benchmarks/sweep_hf.py --families llama t5    # some families
python benchmarks/sweep_hf.py --smoke                # three families, for CI
"""

from __future__ import annotations

import collections
import contextlib
import functools
import importlib.util
import inspect
import json
import os
import resource
import signal
import time
import warnings
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

from attnlab.cli._args import float_in, int_in, parse_smoke, script_parser

V = 64
SIZES = {
    "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 2, "vocab_size": V,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "n_embd": 64,
    "n_head": 4, "n_layer": 2, "d_model": 64, "encoder_layers": 2, "decoder_layers": 2,
    "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64, "moe_intermediate_size": 32, "n_routed_experts": 4,
    "num_experts": 4, "num_local_experts": 4, "num_experts_per_tok": 2, "n_positions": 256,
    "max_position_embeddings": 256, "sliding_window": 5, "kv_lora_rank": 16,
    "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "first_k_dense_replace": 1, "n_shared_experts": 1, "n_group": 1, "topk_group": 1,
    "num_layers": 2, "num_decoder_layers": 2, "num_heads": 4, "d_kv": 16, "d_ff": 64,
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "attention_dropout": 0.0,
    "dropout": 0.0, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
    "image_size": 32, "patch_size": 8, "max_source_positions": 32,
    "index_topk": 4, "index_n_heads": 2, "index_head_dim": 16,  # DSA keeps 4 of 12 keys
    "rotary_dim": 8, "qk_head_dim": 16, "vocab_size_per_layer_input": 64,
    "hidden_size_per_layer_input": 16,
}  # fmt: skip
# sizes a config may leave None although its model needs them (set from SIZES)
UNSET = ("head_dim", "num_key_value_heads", "num_experts_per_tok", "n_routed_experts",
         "n_shared_experts")  # fmt: skip
# the second try for a config the sizes above break: multi-head latent attention's rope
# dimension as the head dimension, one key/value head per query head (DeepSeek-V3)
RETRY = {"head_dim": 8, "num_key_value_heads": 4}
# each family's own overrides (a dotted key sets a sub-config's): hybrids whose default
# config places its attention layers by index or period (or has none) get one recurrent
# layer, then one attention layer; the others are what their models need beyond SIZES
MAMBA = {"mamba_n_heads": 8, "mamba_d_head": 16, "mamba_d_state": 16, "mamba_chunk_size": 16}
FAMILY: dict[str, dict[str, Any]] = {
    "bamba": {"attn_layer_indices": [1], **MAMBA},
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"], **MAMBA},
    "qwen4_exp_text": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16,
                       "indexer_budget": 4, "indexer_compress_ratio": 2},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2,
              "expert_layer_offset": 1},
    "recurrent_gemma": {"block_types": ["recurrent", "attention"]},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},
    "dbrx": {"attn_config.rope_theta": 10000.0, "attn_config.clip_qkv": 8.0,
             "ffn_config.hidden_size": 64},
    "gemma3n_text": {"num_kv_shared_layers": 0, "intermediate_size": [64, 64]},
    "hrm_text": {"num_layers_per_stack": 1, "num_hidden_layers": 8},
    "gemma3": {"mm_tokens_per_image": 4},  # 2 x 2 pooled patches of its 32 x 32 images
}  # fmt: skip
# one served, one with a position bias, one refused, one whose mask is built for one query
SMOKE = ("llama", "t5", "bloom", "bridgetower")


class _Timeout(Exception):
    pass


def shrink(cfg: Any, sizes: dict[str, Any] = SIZES) -> Any:
    """``cfg`` with every size of ``sizes`` it has (and its sub-configs') set, its family's
    overrides (:data:`FAMILY`), and each of its layer types once."""
    spec = cfg.__dict__.get("_heterogeneity_spec")  # per-layer values (Gemma 4, dots3)
    per_layer = _per_layer_off(cfg) if spec is not None else None
    for key in UNSET:
        if key in sizes and key in cfg.__dict__ and cfg.__dict__[key] is None:
            with contextlib.suppress(Exception):
                setattr(cfg, key, sizes[key])
    for key, value in sizes.items():
        if getattr(cfg, key, None) is not None:
            with contextlib.suppress(Exception):  # a derived, read-only property
                setattr(cfg, key, value)
    for part in ("text_config", "vision_config", "audio_config"):
        sub = getattr(cfg, part, None)
        if sub is not None and sub is not cfg and hasattr(sub, "to_dict"):
            shrink(sub, sizes)
    for key, value in FAMILY.get(getattr(cfg, "model_type", ""), {}).items():
        *path, last = key.split(".")
        setattr(functools.reduce(getattr, path, cfg), last, value)
    _each_layer_type_once(cfg)
    if per_layer is not None:
        _per_layer_on(cfg, *per_layer)
    return cfg


def _each_layer_type_once(cfg: Any) -> None:
    """Each layer type once, in the family's own order (a hybrid's attention layer may come
    after its first few layers), and as many MLP types as layers."""
    types = getattr(cfg, "layer_types", None)
    if not types:
        return
    kinds = list(dict.fromkeys(types))
    n = max(cfg.num_hidden_layers, len(kinds))
    with contextlib.suppress(Exception):
        cfg.num_hidden_layers = n
        cfg.layer_types = (kinds * n)[:n]
    mlp = getattr(cfg, "mlp_layer_types", None)
    if mlp:
        with contextlib.suppress(Exception):
            cfg.mlp_layer_types = (list(mlp) * n)[:n]


def _per_layer_off(cfg: Any) -> tuple[dict, dict, list]:
    """A heterogeneous config's per-layer overrides, its global values and layer types,
    with the overrides taken off (reading a per-layer size raises while they are on)."""
    spec = cfg.__dict__["_heterogeneity_spec"]
    per_layer = {i: dict(o) for i, o in spec.per_layer_overrides.items()}
    read = cfg._getattr_without_heterogeneous_validation
    old = {k: read(k) for k in spec.per_layer_attributes}
    types = list(getattr(cfg, "layer_types", None) or [])
    cfg.per_layer_config = None
    return per_layer, old, types


def _per_layer_on(cfg: Any, per_layer: dict, old: dict, old_types: list) -> None:
    """The per-layer overrides back on the shrunk layers, each scaled as its global value
    was (Gemma 4's full-attention layers keep twice the head size)."""
    read, new = cfg._getattr_without_heterogeneous_validation, {}
    for i, kind in enumerate(getattr(cfg, "layer_types", None) or []):
        src = next((j for j, k in enumerate(old_types) if k == kind and j in per_layer), None)
        if src is None:
            continue
        new[i] = {
            k: max(1, v * read(k) // old[k]) if isinstance(v, int) and old.get(k) else v
            for k, v in per_layer[src].items()
        }
    cfg.per_layer_config = new


def _inputs(model: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """The model's inputs by its main input (token ids, right-padded; images; audio), and
    the index of the outputs to compare (the unpadded tokens, or everything)."""
    g = torch.Generator().manual_seed(1)
    cfg, main = model.config, model.main_input_name
    keep: Any = ...
    if main == "pixel_values":
        kw = {main: _images(cfg, g)}
    elif main == "input_values":  # raw audio
        kw = {main: torch.randn(2, 1600, generator=g)}
    elif main == "input_features":  # log-mel frames (Whisper)
        frames = 2 * getattr(cfg, "max_source_positions", 32)
        kw = {main: torch.randn(2, getattr(cfg, "num_mel_bins", 80), frames, generator=g)}
    elif main == "input_ids":
        am = torch.ones(2, 12, dtype=torch.long)
        am[1, -4:] = 0
        kw = {"input_ids": torch.randint(3, V, (2, 12), generator=g), "attention_mask": am}
        keep = am.bool()
        vision = getattr(cfg, "vision_config", cfg)  # None: a text-only build (Gemma 4)
        if "pixel_values" in inspect.signature(model.forward).parameters and vision is not None:
            kw["pixel_values"] = _images(vision, g)  # CLIP
            _image_tokens(model, kw)
    else:
        raise ValueError(f"main input {main!r}: not generated here")
    if cfg.is_encoder_decoder:  # the decoder's outputs are compared, whole
        kw["decoder_input_ids"] = torch.randint(3, V, (2, 5), generator=g)
        keep = ...
    return kw, keep


def _image_tokens(model: Any, kw: dict[str, torch.Tensor]) -> None:
    """A model that places its image features at image tokens (Gemma 3) gets as many in each
    row, after the first token, marked as one image block (``token_type_ids``)."""
    cfg = model.config
    image, n = getattr(cfg, "image_token_id", None), getattr(cfg, "mm_tokens_per_image", None)
    if image is None or not n:
        return
    kw["input_ids"][:, 1 : 1 + n] = image
    if "token_type_ids" in inspect.signature(model.forward).parameters:
        kw["token_type_ids"] = (kw["input_ids"] == image).long()


def _images(cfg: Any, g: torch.Generator) -> torch.Tensor:
    """``(2, C, H, W)`` random images of the config's size."""
    side = getattr(cfg, "image_size", 32)
    side = tuple(side) if isinstance(side, (list, tuple)) else (side, side)
    return torch.randn(2, getattr(cfg, "num_channels", 3), *side, generator=g)


def _run(
    t: Any, auto: Any, family: str, impl: str, sizes: dict[str, Any]
) -> tuple[torch.Tensor, Any]:
    """The model's output (logits or last hidden state) and the index to compare."""
    torch.manual_seed(0)
    cfg = shrink(t.AutoConfig.for_model(family), sizes)
    model = auto.from_config(cfg, attn_implementation=impl)
    kw, keep = _inputs(model.eval())
    with torch.no_grad():
        out = model(**kw)
    for name in ("logits", "last_hidden_state"):
        if getattr(out, name, None) is not None:
            return getattr(out, name), keep
    return _first_tensor(out), keep


def _first_tensor(out: Any) -> torch.Tensor:
    """The first tensor in a model's output (nested tuples, lists, model outputs)."""
    if isinstance(out, torch.Tensor):
        return out
    items = out.values() if isinstance(out, dict) else out if isinstance(out, (list, tuple)) else ()
    for item in items:
        with contextlib.suppress(ValueError):
            return _first_tensor(item)
    raise ValueError(f"no tensor in the output ({type(out).__name__})")


def check(t: Any, auto: Any, family: str, calls: list[int], tol: float) -> dict:
    """The JSON row of one family."""
    row: dict[str, Any] = {"bench": "sweep_hf", "family": family}
    try:
        sizes = SIZES
        want, keep = _run(t, auto, family, "eager", sizes)
    except _Timeout as exc:
        return {**row, "status": "skipped", "why": _why(exc)}
    except BaseException as exc:  # the model's own failure on these sizes: once more
        try:
            sizes = {**SIZES, **RETRY}
            want, keep = _run(t, auto, family, "eager", sizes)
        except BaseException:
            return {**row, "status": "skipped", "why": _why(exc)}
        row["sizes"] = "retry"
    calls[0] = 0
    try:
        got, _ = _run(t, auto, family, "attnlab", sizes)
    except BaseException as exc:
        refused = isinstance(exc, ValueError) and "attnlab" in str(exc)
        return {**row, "status": "refused" if refused else "error", "why": _why(exc)}
    if got.shape != want.shape:
        return {**row, "status": "mismatch", "why": f"shape {tuple(got.shape)}", "calls": calls[0]}
    if not isinstance(keep, torch.Tensor) or got.shape[:2] != keep.shape:
        keep = ...  # everything (images, audio, a decoder's tokens)
    got, want = got[keep], want[keep]
    nan = want.isnan()  # eager's own NaN (a shrunk config's overflow) must come out the same
    finite = ~nan
    err = float((got[finite] - want[finite]).abs().max()) if bool(finite.any()) else 0.0
    scale = float(want[finite].abs().max()) if bool(finite.any()) else 1.0
    same = err <= tol * max(scale, 1.0) and torch.equal(got.isnan(), nan)
    status = ("ok" if calls[0] else "unreached") if same else "mismatch"
    return {**row, "status": status, "err": err, "calls": calls[0], "nan": bool(nan.any())}


def _why(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


def _alarm(*_: object) -> None:
    raise _Timeout("the family took longer than --timeout")


def main() -> None:
    p = script_parser(__doc__)
    p.add_argument("--mapping", choices=("causal", "base"), default="causal")
    p.add_argument("--families", nargs="+", help="model types (default the whole mapping)")
    p.add_argument("--smoke", action="store_true", help=f"only {', '.join(SMOKE)}")
    p.add_argument(
        "--tol",
        type=float_in(0.0, open_low=True),
        default=1e-5,
        help="relative to eager's largest value, or absolute where that is below 1",
    )
    p.add_argument("--timeout", type=int_in(1), default=60, help="seconds per family")
    gib = float_in(0.0, open_low=True)
    p.add_argument("--max-gib", type=gib, default=8.0, help="memory the sweep may take")
    args = parse_smoke(p, None, {"families": list(SMOKE)})
    # a config whose shrunk sizes still ask for tens of GiB fails its family, not the sweep
    limit = int(args.max_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, resource.getrlimit(resource.RLIMIT_DATA)[1]))
    if importlib.util.find_spec("transformers") is None:  # `make bench-smoke` alone
        print(
            json.dumps(
                {"bench": "sweep_hf", "skipped": "not installed: transformers (attnlab[hf])"}
            )
        )
        return
    import transformers as t
    from transformers.models.auto import modeling_auto as ma

    from attnlab.integrations.transformers import register

    names = (
        ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if args.mapping == "causal" else ma.MODEL_MAPPING_NAMES
    )
    families = args.families or sorted(names)
    unknown = [f for f in families if f not in t.models.auto.configuration_auto.CONFIG_MAPPING]
    if unknown:
        p.error(f"argument --families: unknown model types {unknown}")
    register()
    calls, cpu = [0], torch.backends.cpu.get_cpu_capability()
    own = t.AttentionInterface._global_mapping["attnlab"]

    def counted(*a: Any, **k: Any) -> Any:
        calls[0] += 1
        return own(*a, **k)

    t.AttentionInterface._global_mapping["attnlab"] = counted
    t.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    causal = ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    signal.signal(signal.SIGALRM, _alarm)
    counts: collections.Counter[str] = collections.Counter()
    for family in families:
        t0 = time.perf_counter()
        signal.alarm(args.timeout)
        try:
            auto = (
                t.AutoModelForCausalLM
                if family in causal and args.mapping == "causal"
                else t.AutoModel
            )
            row = check(t, auto, family, calls, args.tol)
        except Exception as exc:  # the sweep's own failure on this family: said, not fatal
            row = {"bench": "sweep_hf", "family": family, "status": "skipped", "why": _why(exc)}
        finally:
            signal.alarm(0)
        counts[row["status"]] += 1
        took = {"seconds": round(time.perf_counter() - t0, 2), "cpu": cpu}
        print(json.dumps({**row, **took}), flush=True)
    print(json.dumps({"bench": "sweep_hf", "mapping": args.mapping, "families": len(families),
                      **dict(sorted(counts.items())), "transformers": t.__version__}))  # fmt: skip
    if counts["mismatch"]:  # a wrong answer fails the run (and make test's smoke)
        raise SystemExit(f"{counts['mismatch']} families differ from eager")


if __name__ == "__main__":
    main()
