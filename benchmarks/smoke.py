"""Runs one benchmark in its smoke mode and checks what it prints: every line of its
standard output must be one strict JSON object (no ``NaN`` or ``Infinity``, which
``json.dumps`` writes by default and JSON parsers refuse), and one with a measured time
or ratio names the CPU it ran on (``"cpu": torch.backends.cpu.get_cpu_capability()``).

The benchmark's lines pass through as they come; its standard error is untouched. The
exit status is the benchmark's own, or 1 when a line is not such an object (each one
named on standard error).

python benchmarks/smoke.py benchmarks/bench_flow.py --smoke
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

# a time (ms, _s, _us, seconds) or a ratio of times; rows of a model ("simulated") are not
TIMED = re.compile(r"(^|_)(ms|s|us|seconds)(_|$)|ratio|speedup")


def _refuse(constant: str) -> float:
    raise ValueError(f"{constant} is not JSON")


def problem(line: str) -> str | None:
    """What is wrong with one output line, or None.

    Example:
        >>> problem('{"bench": "x", "ms": 1.5, "cpu": "AVX2"}') is None
        True
        >>> problem('{"bench": "x", "err": NaN}')
        'NaN is not JSON'
        >>> problem('{"bench": "x", "anchor_ms_per_pair": 2.0}')
        'a timed row without "cpu" (anchor_ms_per_pair)'
    """
    try:
        row = json.loads(line, parse_constant=_refuse)
    except ValueError as e:
        return str(e)
    if not isinstance(row, dict):
        return "not a JSON object"
    timed = [k for k in row if TIMED.search(k)]
    if timed and "cpu" not in row and row.get("kind") != "simulated":
        return f'a timed row without "cpu" ({", ".join(timed)})'
    return None


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python benchmarks/smoke.py BENCHMARK.py [ARGS...]", file=sys.stderr)
        return 2
    proc = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    bad = []
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        if line.strip() and (why := problem(line)):
            bad.append(f"{argv[0]}: {why}: {line.strip()[:200]}")
    code = proc.wait()
    for b in bad:
        print(b, file=sys.stderr)
    return code or (1 if bad else 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
