"""The README's examples run and print what the README says."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def test_python_example_runs() -> None:
    namespace: dict[str, object] = {}
    exec(compile(_blocks("python")[0], "README.md", "exec"), namespace)
    out, r = namespace["out"], namespace["r"]
    assert isinstance(out, torch.Tensor) and out.shape == (2, 8, 1024, 64)
    assert r.weights.shape == (2, 8, 1024, 1024)  # type: ignore[attr-defined]
    rows = r.weights.sum(-1)  # type: ignore[attr-defined]
    assert torch.allclose(rows, torch.ones_like(rows), atol=1e-5)


def test_mask_repr_example_matches() -> None:
    block = _blocks("python")[1]
    import attnlab  # noqa: F401

    namespace: dict[str, object] = {"torch": torch}
    exec("from attnlab import masks", namespace)
    lines = block.strip().splitlines()
    for i, line in enumerate(lines):
        if line.startswith(">>> ") and i + 1 < len(lines) and not lines[i + 1].startswith(">>>"):
            src = line[4:]
            if src.startswith("print("):
                got = str(eval(src[6:-1], namespace))
            else:
                got = repr(eval(src, namespace))
            assert got == lines[i + 1], (src, got)
        elif line.startswith(">>> "):
            exec(line[4:], namespace)


def test_attention_weights_example_runs() -> None:
    namespace: dict[str, object] = {}
    blocks = _blocks("python")
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    exec(compile(blocks[2], "README.md", "exec"), namespace)
    w = namespace["w"]
    assert isinstance(w, torch.Tensor) and w.shape == (2, 2, 20, 1024)
    assert torch.allclose(w.sum(-1), torch.ones(2, 2, 20, dtype=w.dtype), atol=1e-5)


def test_building_blocks_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    namespace: dict[str, object] = {}
    exec(compile(_blocks("python")[3], "README.md", "exec"), namespace)
    assert capsys.readouterr().out.strip() == "True"
    w = namespace["w"]
    assert isinstance(w, torch.Tensor) and w.shape == (2, 8, 10, 10)
    assert torch.allclose(w.sum(-1), torch.ones(2, 8, 10), atol=1e-5)
