"""BertEncoder against transformers' BertModel on small random checkpoints, and the loader's
errors (missing, unexpected, mis-shaped and corrupt tensors)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from attnlab import masks
from attnlab.models import BertConfig, BertEncoder, bert_state_dict
from tests.conftest import assert_2x_rule, check_and_control

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

SMALL = {
    "vocab_size": 97,
    "hidden_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 80,
    "max_position_embeddings": 64,
    "model_type": "bert",
}


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialized BertForMaskedLM (keys prefixed ``bert.``, a ``cls.`` head),
    saved in the Hugging Face layout."""
    torch.manual_seed(0)
    config = transformers.BertConfig(**SMALL, attn_implementation="eager")
    model = transformers.BertForMaskedLM(config)
    with torch.no_grad():  # random norms and biases, so a swapped one shows
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.normal_(0, 0.5)
    folder = tmp_path_factory.mktemp("bert")
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def _hf_bert(folder: Path, dtype: torch.dtype) -> torch.nn.Module:
    model = transformers.BertModel.from_pretrained(
        folder, attn_implementation="eager", add_pooling_layer=False
    )
    return model.to(dtype).eval()


def test_hidden_states_and_weights_match_transformers(hf_folder: Path) -> None:
    ref, ref64 = _hf_bert(hf_folder, torch.float32), _hf_bert(hf_folder, torch.float64)
    ours = BertEncoder.from_pretrained(hf_folder)
    ids = torch.randint(1, SMALL["vocab_size"], (3, 23))
    types = torch.randint(0, 2, (3, 23))
    lengths = torch.tensor([23, 17, 4])
    keep = (torch.arange(23)[None] < lengths[:, None]).long()  # (B, L) HF attention_mask
    with torch.no_grad():
        kw = {"token_type_ids": types, "attention_mask": keep, "output_attentions": True}
        want, want64 = ref(ids, **kw), ref64(ids, **kw)
        got = ours(ids, types, mask=masks.padding(lengths), need_weights=True)
    assert got.attentions is not None and len(got.attentions) == 2
    for i, w in enumerate(got.attentions):
        assert w.shape == (3, 4, 23, 23)
        assert_2x_rule(w, want.attentions[i], want64.attentions[i], f"layer {i} weights")
    assert_2x_rule(got.hidden, want.last_hidden_state, want64.last_hidden_state, "hidden")


def test_weights_do_not_change_the_output(hf_folder: Path) -> None:
    ours = BertEncoder.from_pretrained(hf_folder)
    ids = torch.randint(1, SMALL["vocab_size"], (2, 9))
    with torch.no_grad():
        plain = ours(ids).hidden
        with_w = ours(ids, need_weights=True).hidden
    torch.testing.assert_close(plain, with_w, rtol=0, atol=1e-6)


def test_packed_documents_equal_separate_rows(hf_folder: Path) -> None:
    """Two texts in one row under masks.documents, positions restarting, equal each text
    run alone (checked against transformers' own forward of each text)."""
    ref = _hf_bert(hf_folder, torch.float64)
    ours = BertEncoder.from_pretrained(hf_folder).double()
    a, b = torch.randint(1, 97, (1, 11)), torch.randint(1, 97, (1, 6))
    doc = torch.tensor([0] * 11 + [1] * 6)
    pos = torch.cat([torch.arange(11), torch.arange(6)])
    with torch.no_grad():
        got = ours(torch.cat([a, b], 1), mask=masks.documents(doc), positions=pos).hidden
        want = torch.cat([ref(a).last_hidden_state, ref(b).last_hidden_state], 1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_state_dict_mapping_accepts_plain_keys_and_optional_heads(hf_folder: Path) -> None:
    state = {
        k.removeprefix("bert."): v for k, v in load_file(hf_folder / "model.safetensors").items()
    }
    state["pooler.dense.weight"] = torch.zeros(48, 48)
    state["embeddings.position_ids"] = torch.arange(64)[None]
    mapped = bert_state_dict(state, BertConfig.from_dict(SMALL))
    q = state["encoder.layer.1.attention.self.query.weight"]
    v = state["encoder.layer.1.attention.self.value.weight"]
    qkv = mapped["layers.1.self_attn.in_proj_weight"]
    assert torch.equal(qkv[:48], q) and torch.equal(qkv[96:], v)
    BertEncoder(BertConfig.from_dict(SMALL)).load_state_dict(mapped)  # strict


def _copy(src: Path, dst: Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    if state is not None:
        save_file(state, str(dst / "model.safetensors"))
    return dst


def test_missing_unexpected_and_misshaped_tensors_are_listed(
    hf_folder: Path, tmp_path: Path
) -> None:
    state = load_file(hf_folder / "model.safetensors")
    del state["bert.encoder.layer.1.output.dense.bias"]
    state["bert.encoder.layer.0.attention.self.key.weight"] = torch.zeros(48, 40)
    state["bert.encoder.extra.weight"] = torch.zeros(3)
    bad = _copy(hf_folder, tmp_path / "bad", state)
    check_and_control(
        lambda: BertEncoder.from_pretrained(bad),
        lambda: BertEncoder.from_pretrained(hf_folder),
        ValueError,
        r"does not fit the model: missing 1: encoder\.layer\.1\.output\.dense\.bias; "
        r"unexpected 1: encoder\.extra\.weight; mis-shaped 1: "
        r"encoder\.layer\.0\.attention\.self\.key\.weight "
        r"\(checkpoint \(48, 40\), model \(48, 48\)\)",
    )


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool])
def test_integer_tensors_are_refused_and_other_floats_cast(
    hf_folder: Path, tmp_path: Path, dtype: torch.dtype
) -> None:
    """An int8 or bool weight was cast to float by load_state_dict and the model ran."""
    state = load_file(hf_folder / "model.safetensors")
    key = "bert.encoder.layer.1.attention.self.query.weight"
    bad = _copy(hf_folder, tmp_path / "bad", {**state, key: state[key].to(dtype)})
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    fp16 = _copy(hf_folder, tmp_path / "fp16", half)
    check_and_control(
        lambda: BertEncoder.from_pretrained(bad),
        lambda: BertEncoder.from_pretrained(fp16),
        ValueError,
        r"model\.safetensors does not fit the model: not floating-point 1: "
        rf"encoder\.layer\.1\.attention\.self\.query\.weight \({dtype}\)",
    )


def test_a_huge_layer_count_is_refused_before_listing_its_tensors(
    hf_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """num_hidden_layers=10**7 in config.json built 160 million expected names (minutes,
    gigabytes) before the missing ones were reported: the weights' layers are counted first."""
    import attnlab.models.bert as bert_module

    shapes = bert_module._hf_shapes

    def bounded(c: BertConfig) -> dict[str, tuple[int, ...]]:
        assert c.num_hidden_layers < 100, "listed the tensors of every configured layer"
        return shapes(c)

    monkeypatch.setattr(bert_module, "_hf_shapes", bounded)
    huge = _copy(hf_folder, tmp_path / "huge")
    shutil.copy(hf_folder / "model.safetensors", huge / "model.safetensors")
    config = json.loads((hf_folder / "config.json").read_text())
    (huge / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 10**7}))
    check_and_control(
        lambda: BertEncoder.from_pretrained(huge),
        lambda: BertEncoder.from_pretrained(hf_folder),
        ValueError,
        r"model\.safetensors does not fit the model: the config has "
        r"num_hidden_layers=10000000, the weights hold 2 layers",
    )


def test_missing_and_corrupt_weight_files(hf_folder: Path, tmp_path: Path) -> None:
    empty = _copy(hf_folder, tmp_path / "empty")
    check_and_control(
        lambda: BertEncoder.from_pretrained(empty),
        lambda: BertEncoder.from_pretrained(hf_folder),
        FileNotFoundError,
        r"model\.safetensors does not exist",
    )
    (empty / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(FileNotFoundError, match="never unpickles weights"):
        BertEncoder.from_pretrained(empty)
    corrupt = _copy(hf_folder, tmp_path / "corrupt")
    data = (hf_folder / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(
        ValueError, match=r"not a readable safetensors file .* truncated or corrupt"
    ):
        BertEncoder.from_pretrained(corrupt)
    with pytest.raises(FileNotFoundError, match=r"model folder .* does not exist"):
        BertEncoder.from_pretrained(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"hidden_size": 50}, "hidden_size=50 is not divisible by num_attention_heads=4"),
        ({"hidden_act": "swish"}, "hidden_act='swish' is not one of"),
        ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive int, got 0"),
        ({"position_embedding_type": "relative_key"}, "must be 'absolute'"),
        ({"model_type": "roberta"}, "model_type='roberta' is not 'bert'"),
    ],
)
def test_bad_config(change: dict[str, object], match: str, tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**SMALL, **change}))
    check_and_control(
        lambda: BertConfig.from_json(path),
        lambda: BertConfig.from_dict(SMALL),
        ValueError,
        match,
    )


@pytest.mark.parametrize(
    ("change", "exc", "match"),
    [
        ({"pad_token_id": 97}, ValueError, r"^BertConfig.pad_token_id must be None or an id in "
         r"\[0, vocab_size=97\), got 97"),
        ({"pad_token_id": "0"}, TypeError, "^BertConfig.pad_token_id must be an int >= 0, got '0'"),
        ({"hidden_dropout_prob": 1.5}, ValueError,
         r"^BertConfig.hidden_dropout_prob must be in \[0, 1\), got 1.5"),
        ({"attention_probs_dropout_prob": 2.0}, ValueError,
         r"^BertConfig.attention_probs_dropout_prob must be in \[0, 1\), got 2.0"),
    ],
)  # fmt: skip
def test_bad_config_values_are_named(
    change: dict[str, object], exc: type[Exception], match: str
) -> None:
    # these reached torch: an AssertionError in nn.Embedding, a TypeError in a comparison,
    # nn.Dropout's message without the field; a dropout of 2.0 was accepted
    check_and_control(
        lambda: BertEncoder(BertConfig.from_dict({**SMALL, **change})),
        lambda: BertEncoder(BertConfig.from_dict({**SMALL, "pad_token_id": None})),
        exc,
        match,
    )


def test_config_from_dict_needs_a_mapping() -> None:
    check_and_control(  # (a list failed with AttributeError: 'list' object has no attribute 'get')
        lambda: BertConfig.from_dict([("hidden_size", 48)]),  # type: ignore[arg-type]
        lambda: BertConfig.from_dict({"hidden_size": 48, "num_attention_heads": 4}),
        TypeError,
        r"^raw must be a mapping of config.json's keys, got list",
    )


def test_bad_input_ids(hf_folder: Path) -> None:
    ours = BertEncoder.from_pretrained(hf_folder)
    ok = torch.randint(1, 97, (1, 64))
    check_and_control(
        lambda: ours(torch.randint(1, 97, (1, 65))),
        lambda: ours(ok),
        ValueError,
        r"position 64 >= max_position_embeddings=64; truncate the input",
    )
    with pytest.raises(
        ValueError, match=r"must lie in \[0, vocab_size=97\), got values in \[1, 97\]"
    ):
        ours(torch.tensor([[1, 97]]))
    with pytest.raises(ValueError, match=r"position 64 >= max_position_embeddings=64"):
        ours(ok[:, :3], positions=torch.tensor([0, 1, 64]))
    with pytest.raises(
        TypeError, match=r"input_ids must hold int64 or int32 token ids, got dtype torch\.float32"
    ):
        ours(ok.float())
    with pytest.raises(
        TypeError, match=r"input_ids must be an integer Tensor \(B, L\), got \(64,\)"
    ):
        ours(ok[0])


def test_token_types_and_positions_must_fit_input_ids(hf_folder: Path) -> None:
    """token_type_ids and positions broadcast to input_ids' (B, L) without growing it:
    (L,), (1, L) and (B, 1) equal transformers given them expanded to (B, L) (another shape
    was a bare RuntimeError from the embedding sum, naming neither argument; token types
    (3, L) for one row of ids gave 3 rows without a word)."""
    ours, ref = BertEncoder.from_pretrained(hf_folder), _hf_bert(hf_folder, torch.float32)
    ids, types = torch.randint(1, 97, (2, 5)), torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    row, per_text, pos = types[0], torch.tensor([[0], [1]]), torch.arange(5)
    cases = [  # (token types, positions) given to attnlab, token types given to transformers
        (types, pos, types),
        (types, pos[None], types),
        (row, None, row.expand(2, 5)),
        (row[None], pos[None].expand(2, 5), row.expand(2, 5)),
        (per_text, None, per_text.expand(2, 5)),
    ]
    with torch.no_grad():
        for t, p, full in cases:
            want = ref(ids, token_type_ids=full).last_hidden_state
            got = ours(ids, t, positions=p).hidden
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    zeros = torch.zeros(3, 5, dtype=torch.long)
    for kw, seen in [
        ({"token_type_ids": zeros[:2, :4]}, r"\(2, 4\)"),
        ({"token_type_ids": zeros}, r"\(3, 5\)"),
        ({"positions": torch.arange(4)}, r"\(4,\)"),
        ({"positions": torch.arange(5)[:, None, None]}, r"\(5, 1, 1\)"),
    ]:
        name = next(iter(kw))
        with pytest.raises(
            ValueError,
            match=rf"{name} must have input_ids' shape \(B, L\) = \(2, 5\) or one that "
            rf"broadcasts to it, such as \(L,\) = \(5,\); got {seen}",
        ):
            ours(ids, **kw)
    with pytest.raises(ValueError, match=r"token_type_ids .* = \(1, 5\) .*; got \(3, 5\)"):
        ours(ids[:1], zeros)  # one row of ids, three of token types


def _attention_sublayer(hidden: float, attn: float, n: int) -> tuple[Tensor, Tensor]:
    """Layer 0's self-attention outputs over ``n`` train-mode calls of a BertEncoder with
    the given dropouts, and the same self-attention in eval mode on each call's inputs."""
    config = BertConfig(
        **{k: v for k, v in SMALL.items() if k != "model_type"},
        hidden_dropout_prob=hidden,
        attention_probs_dropout_prob=attn,
    )
    bert = BertEncoder(config).double().train()
    sub = bert.layers[0].self_attn
    seen: list[tuple[Tensor, Tensor]] = []

    def hook(mod: torch.nn.Module, args: tuple, kwargs: dict, out: Tensor) -> None:
        with torch.no_grad():
            mod.eval()
            seen.append((out.detach(), mod.forward(*args, **kwargs).detach()))
            mod.train()

    sub.register_forward_hook(hook, with_kwargs=True)
    ids = torch.randint(1, SMALL["vocab_size"], (2, 9))
    with torch.no_grad():
        for _ in range(n):
            bert(ids)
    return torch.stack([t for t, _ in seen]), torch.stack([e for _, e in seen])


def test_attention_probs_dropout_prob_drops_attention_weights() -> None:
    # transformers' BertModel drops attention probabilities with attention_probs_dropout_prob
    # and hidden states with hidden_dropout_prob; attnlab used hidden_dropout_prob for both
    train, evals = _attention_sublayer(hidden=0.0, attn=0.5, n=600)
    assert not torch.equal(train[0], train[1])  # was equal: no dropout at all
    torch.testing.assert_close(evals[0], evals[1], rtol=0, atol=0)  # no hidden dropout
    # dropout on the weights keeps the expectation of weights @ v: the mean -> eval output
    err = (train.mean(0) - evals[0]).abs().max() / evals[0].abs().max()
    assert err < 0.1, err
    train, evals = _attention_sublayer(hidden=0.4, attn=0.0, n=2)
    torch.testing.assert_close(train, evals, rtol=0, atol=0)  # the attention drops nothing
