"""The benchmark scripts' own bookkeeping: error counts, summaries, argument checks."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str) -> Any:
    """``benchmarks/<name>.py`` as a module."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # (a dataclass looks its module up while it is made)
    spec.loader.exec_module(mod)
    return mod


class _FakeProc:
    pid = 1

    def send_signal(self, sig: int) -> None:
        """Nothing to stop."""

    def wait(self, timeout: float | None = None) -> int:
        """Already stopped."""
        return 0


class _FakeClient:
    def __init__(self, port: int) -> None:
        self.port = port

    def call(self, *args: object, **kwargs: object) -> tuple[int, None]:
        """Every request succeeds."""
        return 200, None


def test_load_serve_counts_a_client_exception_once(monkeypatch: Any) -> None:
    """One dropped connection is one error (it was two: its text, then "exception")."""
    ls = _load("load_serve")
    calls = {"n": 0}

    def one_call(client: object, rng: random.Random) -> tuple[str, bool]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionResetError("dropped")
        return ("health", True) if calls["n"] % 2 else ("attend", False)

    monkeypatch.setattr(ls, "start_server", lambda extra: (_FakeProc(), 1))
    monkeypatch.setattr(ls, "Client", _FakeClient)
    monkeypatch.setattr(ls, "one_call", one_call)
    args = argparse.Namespace(serve_args=[], clients=1, seconds=0.05, warmup=0.0, smoke=False)
    s = ls.run(args)
    failed = calls["n"] // 2  # the even calls answer not ok
    assert s["errors"] == 1 + failed
    assert s["first_errors"][:2] == ["ConnectionResetError: dropped", "attend"]


def _approx_summaries(monkeypatch: Any, capsys: Any, argv: list[str]) -> list[dict]:
    """bench_approx's summary lines, with time n (exact) and n**2 (dense) per call and the
    error replaced by the N it was asked for."""
    ba = _load("bench_approx")
    power = {"exact": 1, "dense": 2, "linear": 1}
    monkeypatch.setattr(ba, "make_step", lambda m, n, h, d: float(n) ** power[m])
    monkeypatch.setattr(ba, "interleaved_ms", lambda steps, repeat: dict(steps))
    monkeypatch.setattr(ba, "peak_memory", lambda methods, n, args: {})
    monkeypatch.setattr(ba, "relative_error", lambda m, n, h, d: n)
    assert ba.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert [_load("smoke").problem(x) for x in out] == [None] * len(out)  # "cpu" on each
    lines = [json.loads(x) for x in out]
    return [r for r in lines if r["bench"] == "approx_summary"]


def test_bench_approx_summary_pairs_each_time_with_its_n(monkeypatch: Any, capsys: Any) -> None:
    """Ns out of order with dense skipped at 1024: dense's exponent is 2 from its own
    (n, ms) pairs (its times were fitted against the first Ns: 1024 and 128), the error is
    at N=1024 (was min(1024, last N) = 256)."""
    argv = ["--ns", "1024,128,256", "--methods", "exact,dense", "--dense-max", "256"]
    exact, dense = _approx_summaries(monkeypatch, capsys, argv)
    assert exact["exponent"] == 1.0 and dense["exponent"] == 2.0
    assert exact["rel_err_1024"] == dense["rel_err_1024"] == 1024


def test_bench_approx_summary_with_one_n(monkeypatch: Any, capsys: Any) -> None:
    """One N (or none for dense) gives a null exponent, not ZeroDivisionError or
    StatisticsError; the error is at the largest N when 1024 is not measured."""
    argv = ["--ns", "128,512", "--methods", "exact,dense", "--dense-max", "128"]
    exact, dense = _approx_summaries(monkeypatch, capsys, argv)
    assert exact["exponent"] == 1.0 and dense["exponent"] is None
    assert dense["rel_err_512"] == 512
    argv = ["--ns", "128", "--methods", "exact,dense", "--dense-max", "64"]
    exact, dense = _approx_summaries(monkeypatch, capsys, argv)
    assert exact["exponent"] is None and dense["exponent"] is None


@pytest.mark.parametrize(
    ("argv", "argument"),
    [
        (["bench_decode.py", "--rounds", "0"], "--rounds"),
        (["bench_hf.py", "--repeat", "0"], "--repeat"),
        (["bench_layers.py", "--heads", "3"], "--heads"),
        (["bench_approx.py", "--methods", "foo"], "--methods"),
        (["bench_flow.py", "--n", "0"], "--n"),
        (["load_serve.py", "--seconds", "0"], "--seconds"),
        (["bench_minilm.py", "--modes", "foo"], "--modes"),
        (["bench_approx.py", "--ns", "128,0"], "--ns"),  # N=0 and -5 were timed
        (["sweep_hf.py", "--timeout", "0"], "--timeout"),  # one line for three flags
        (["bench_rl.py", "--envs", "Bogus-v0"], "--envs"),  # 35 lines from the pool, exit 1
        (["bench_rl.py", "--envs", "MiniGrid-MemoryS99-v0"], "--envs"),  # not registered
    ],
)
def test_benchmarks_refuse_bad_arguments_before_any_work(argv: list[str], argument: str) -> None:
    """Exit 2 with one error line naming the argument and nothing on stdout (these gave
    Infinity/NaN JSON at exit 0, or a traceback after loading models or starting a server);
    stderr is that line alone, as the ``attnlab`` commands' (argparse put its usage above)."""
    env = {**os.environ, "PYTHONPATH": str(BENCH.parent / "src")}
    res = subprocess.run(
        [sys.executable, str(BENCH / argv[0]), *argv[1:]],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    errors = [line for line in res.stderr.splitlines() if "error:" in line]
    assert (res.returncode, res.stdout) == (2, "")
    assert len(errors) == 1 and f"argument {argument}:" in errors[0], res.stderr
    assert res.stderr.splitlines() == errors


@pytest.mark.parametrize(
    ("script", "flag"),
    [
        ("bench_layers", "--length"),
        ("bench_minilm", "--n"),
        ("bench_approx", "--ns"),
        ("bench_decode", "--lengths"),
        ("bench_flow", "--anchor-pairs"),
        ("bench_generative", "--samples"),
        ("bench_hf", "--dense-n"),
        ("listops", "--max-len"),
        ("load_serve", "--seconds"),
        ("bench_robust", "--batch-size"),
        ("sweep_hf", "--families"),
        ("bench_auto", "--repeat"),
        ("bench_distributed", "--reps"),
        ("bench_rl", "--episodes"),
        ("bench_rl", "--seeds"),
    ],
)
def test_smoke_refuses_the_sizes_it_sets(
    script: str, flag: str, monkeypatch: Any, capsys: Any
) -> None:
    """``--smoke`` replaced a size given beside it silently (``--smoke --length 64`` timed
    16 tokens); as ``attnlab bench --smoke --n 4096`` it is one line, exit 2, before work."""
    mod = _load(script)
    argv = ["--smoke", flag, "64"]
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *argv])
    with pytest.raises(SystemExit) as e:
        mod.main(argv) if "argv" in mod.main.__code__.co_varnames else mod.main()
    err = capsys.readouterr().err.splitlines()
    assert (e.value.code, len(err)) == (2, 1), err
    assert f"argument {flag}: and --smoke both set it; give one of them" in err[0]


def test_bench_approx_ns_are_checked_like_the_other_ints(capsys: Any) -> None:
    """A negative N is refused by value, as --heads is (not "expected one argument")."""
    ba = _load("bench_approx")
    for ns in ("-5", "0", "128,x"):
        with pytest.raises(SystemExit) as e:
            ba.main(["--ns", ns])
        err = capsys.readouterr().err.splitlines()
        assert e.value.code == 2 and len(err) == 1, err
        assert f"argument --ns: must be an int >= 1, got '{ns.split(',')[-1]}'" in err[0]


def test_every_benchmark_parses_with_the_shared_parser() -> None:
    """Each script with a command line builds it with ``script_parser`` (one error line,
    exit 2), not a bare ``argparse.ArgumentParser`` (usage lines above the error)."""
    own = [p.name for p in BENCH.glob("*.py") if "ArgumentParser(" in p.read_text()]
    users = [p.name for p in BENCH.glob("*.py") if "script_parser(__doc__)" in p.read_text()]
    assert own == [] and len(users) >= 14, (own, users)


class _Parsed(Exception):
    """Raised where a benchmark's parser would parse: the parser, and no benchmark run."""


def _benchmark_parsers(monkeypatch: Any) -> dict[str, argparse.ArgumentParser]:
    """Each script's parser, as its ``main`` builds it: ``main`` is stopped where it would
    parse the command line (before any work: the scripts check their arguments first)."""
    from attnlab.cli._errors import Parser

    def caught(self: Parser, *args: object, **kw: object) -> None:
        raise _Parsed(self)

    monkeypatch.setattr(Parser, "parse_known_args", caught)
    parsers = {}
    for path in sorted(BENCH.glob("*.py")):
        if "script_parser(__doc__)" in path.read_text():
            main = _load(path.stem).main
            monkeypatch.setattr(sys, "argv", [path.name])
            with pytest.raises(_Parsed) as e:
                main([]) if "argv" in main.__code__.co_varnames else main()
            parsers[path.stem] = e.value.args[0]
    return parsers


def test_every_benchmark_option_with_a_default_shows_it(monkeypatch: Any) -> None:
    """(No benchmark's --help showed a default: ``--heads HEADS``, ``--ns NS comma list of
    N``.) Each option with one says ``(default X)``, as the commands' help does."""
    monkeypatch.setenv("COLUMNS", "1000")  # one line per option (no break at a hyphen)
    parsers = _benchmark_parsers(monkeypatch)
    assert len(parsers) >= 14, sorted(parsers)
    for name, p in parsers.items():
        for action in p._actions:
            said = " ".join(p._get_formatter()._format_action(action).split())
            if "default" in said:  # one form: not "(default: X)" nor "(task default)"
                assert re.search(r"\(default [^:)][^)]*\)", said), (name, said)
            d = action.default
            if any(d is x for x in (None, False, argparse.SUPPRESS)) or d in ("", [], ()):
                continue  # (a flag; an option whose absence means something)
            if action.option_strings and action.help != argparse.SUPPRESS:
                sep = " " if isinstance(d, list) else ","
                shown = sep.join(map(str, d)) if isinstance(d, list | tuple) else str(d)
                assert f"(default {shown})" in said, (name, said)


def test_smoke_check_wants_the_cpu_on_every_timed_row() -> None:
    """``benchmarks/smoke.py``, which ``make test`` runs every benchmark's smoke mode
    through, refuses a time or ratio that does not name the CPU (bench_approx, bench_flow,
    bench_layers, bench_robust, sweep_hf and ``attnlab bench`` printed such rows)."""
    from attnlab.bench import BenchConfig, records

    problem = _load("smoke").problem
    for row in ({"ms": 1.0}, {"p50_ms": 3}, {"ratio": 1.2}, {"speedup_4k": 2.0},
                {"ours_s": 0.1}, {"anchor_us": 5}, {"seconds": 2.0}):  # fmt: skip
        assert f'without "cpu" ({next(iter(row))})' in str(problem(json.dumps(row)))
        assert problem(json.dumps({**row, "cpu": "AVX2"})) is None  # the control
    for row in ({"kind": "simulated", "latency_us": 20.0}, {"threads": 2, "peak_mib": 3.0}):
        assert problem(json.dumps(row)) is None  # a model's figure, a memory figure
    (rec,) = records(BenchConfig(modes=("fwd",)).smoke(), ["causal"])
    assert problem(json.dumps(rec)) is None and rec["cpu"]


# run in a fresh process: in a test worker, threads other tests left running (a server's
# jobs) allocated and freed while the build was measured (64 MiB held 20 ms at a time
# beside it: 143-150 MiB, 3 runs of 4 failed)
_ASK_PEAK = """
import argparse, importlib.util, json, sys
from pathlib import Path
import torch
spec = importlib.util.spec_from_file_location("bench_ask", sys.argv[1])
ba = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = ba  # (a dataclass looks its module up while it is made)
spec.loader.exec_module(ba)
earlier = torch.ones(100 * 2**18)  # 400 MiB, written: the high-water mark rises
del earlier
class FakeIndex:
    sentences = [argparse.Namespace(text="one"), argparse.Namespace(text="two")]
    embedded = 1
def build(docs, enc, folder):
    held = torch.ones(24 * 2**20)  # 96 MiB, written
    del held
    return FakeIndex()
ba.build_index = build
anchor = argparse.Namespace(encode=lambda texts, **kw: None)
ba.bench_index([ba.Document("a", "b")], None, anchor, Path(sys.argv[2]))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux only")
def test_bench_ask_peak_memory_is_the_builds_own(tmp_path: Path) -> None:
    """A build that touches 96 MiB after the process once held 400 MiB more reports about
    96 MiB (ru_maxrss growth, which the models' loading had already set, gave 0.0). In a
    process of its own, where nothing else allocates while the build is measured."""
    pytest.importorskip("torch")
    argv = [sys.executable, "-c", _ASK_PEAK, str(BENCH / "bench_ask.py"), str(tmp_path)]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    row = json.loads(res.stdout.splitlines()[-1])
    assert 90 <= row["peak_rss_added_mb"] <= 130


def test_hf_rows_give_no_ratio_of_noise() -> None:
    """A decoding time is the difference of two timings; on a busy machine a short one
    came out negative (smoke run: -0.0539 s against -0.2497 s), and its ratio read as a
    speed (0.216)."""
    hf = _load("bench_hf")
    row = hf._row("dense", "decode 4", "sdpa", {"sdpa": -0.0539, "attnlab": -0.2497})
    assert row["ratio"] is None and row["cpu"]
    row = hf._row("dense", "decode 4", "sdpa", {"sdpa": 0.3, "attnlab": 0.2})
    assert row["ratio"] == 1.5
