"""The torchrun training example (examples/context_parallel_lm.py): its first 20 losses
with 2 context-parallel processes equal a single-process run on the same data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "context_parallel_lm.py"


def _losses(processes: int) -> list[float]:
    cmd = [sys.executable, str(EXAMPLE), "--local", str(processes), "--seq", "512", "--steps", "20"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, check=True)
    losses: list[float] = json.loads(done.stdout.strip().splitlines()[-1])["losses"]
    return losses


def test_twenty_losses_equal_one_process() -> None:
    one, two = _losses(1), _losses(2)
    assert len(one) == len(two) == 20
    assert one[-1] < 0.5 * one[0]  # it trains
    for step, (a, b) in enumerate(zip(one, two, strict=True)):
        assert abs(a - b) <= 1e-4 * abs(a), (step, a, b)


def test_options_that_do_not_fit_are_one_line() -> None:
    """``--cp`` that does not divide the ranks, ``--steps 0`` and a row too short for
    the sentences ended in IndexError or RuntimeError tracebacks; a bad flag printed
    argparse's usage above its error."""
    cases = {
        "--local 3 --cp 2": "argument --cp: must divide the 3 ranks, got 2",
        "--local 2 --cp 4": "argument --cp: must divide the 2 ranks, got 4",
        "--local 1 --steps 0": "argument --steps: must be >= 1, got 0",
        "--local 2 --seq 3": "argument --seq: must be >= 16 x cp = 32, got 3",
        "--local 2 --seq x": "argument --seq: invalid int value: 'x'",  # (usage lines above)
        "--local 2 --bogus": "unrecognized arguments: --bogus",
    }
    for args, words in cases.items():
        done = subprocess.run(
            [sys.executable, str(EXAMPLE), *args.split()],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 2 and done.stdout == "", (args, done.stderr)
        lines = done.stderr.strip().splitlines()  # one line, as the commands' errors
        assert len(lines) == 1 and words in lines[0], (args, done.stderr)
        assert "Traceback" not in done.stderr
