"""numpy's numbers where a function takes a real number: taken as Python's
(``simulate(..., bandwidth=np.float32(...))`` was a TypeError "bandwidth must be a number,
got float32", ``run_local(timeout=np.int64(60))`` a ValueError), and what is passed on or
stored is Python's number. Each call is compared with the same call given the Python
number (the control); bool, numpy's bool and strings are still refused, naming the
argument. (:mod:`tests.test_numpy_ints` does the same for counts and sizes.)"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import pytest
import torch

from attnlab import distributed as D
from attnlab import masks
from attnlab.distributed.launch import _rank_times_two, run_local
from attnlab.interpret import integrated_gradients

Case = Callable[[Any], object]


class _Stop(Exception):
    """Stops ``demo`` at its config, before any training."""


def _simulate_with(arg: str, v: Any) -> tuple[str, float]:
    """``simulate``'s efficiency (and its type) with ``arg=v``."""
    p = D.plan(1024, 4, mask=masks.causal())
    rates = {"bandwidth": 2.0**30, "flops": 2.0**36, "latency": 2.0**-20, arg: v}
    e = D.simulate(p, **rates)
    return type(e).__name__, e


def _demo(v: Any) -> tuple[str, object]:
    """``demo(seconds=v)``'s time limit as ``demo_config`` is given it."""
    from attnlab.tasks import run

    seen: list[object] = []

    def config(seconds: object, **_: object) -> None:
        seen.append(seconds)
        raise _Stop

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run, "demo_config", config)
        with pytest.raises(_Stop):
            run.demo("unused-folder", seconds=v)
    return type(seen[0]).__name__, seen[0]


def _digits(v: Any) -> str:
    from attnlab.tasks.vision import DigitsTask

    task = DigitsTask(100, label_smoothing=v)
    return json.dumps({"smoothing": task.label_smoothing, "data": task.data_options})


def _ig(v: Any) -> list[float]:
    x = torch.tensor([[1.0, 2.0, 3.0]])
    return integrated_gradients(lambda t: (t**2).sum(-1), x, v, steps=8).attributions.tolist()


ALL = (np.int64, np.float32, np.float64)
SIMULATE = {"bandwidth": 2**30, "flops": 2**36, "latency": 0}

# name -> (the call, the Python number it is given, numpy's kinds, the error it raises for
# a bool or a str, and the start of its message)
CASES: dict[str, tuple[Case, float, tuple[type, ...], type[Exception], str]] = {
    "run_local timeout": (  # (each a launch: two kinds)
        lambda v: run_local(_rank_times_two, 1, timeout=v),
        *(60, (np.int64, np.float32), ValueError, "timeout must be a number of seconds > 0"),
    ),
    **{
        f"simulate {arg}": (
            partial(_simulate_with, arg),
            x,
            ALL,
            TypeError,
            f"{arg} must be a number",
        )
        for arg, x in SIMULATE.items()
    },
    "demo seconds": (_demo, 30, ALL, TypeError, "seconds must be None or a number > 0"),
    "DigitsTask label_smoothing": (
        _digits,
        *(0, ALL, ValueError, r"label_smoothing must be a number in \[0, 1\)"),
    ),
    "integrated_gradients baselines": (
        _ig,
        *(1, ALL, TypeError, "baselines must be a Tensor, a number or None"),
    ),
}
PAIRS = [(name, kind) for name, case in CASES.items() for kind in case[2]]


@pytest.mark.parametrize(("name", "kind"), PAIRS, ids=[f"{n}-{k.__name__}" for n, k in PAIRS])
def test_numpy_reals_are_taken_as_python_numbers(name: str, kind: type) -> None:
    call, x = CASES[name][:2]
    assert call(kind(x)) == call(x)  # (the control: the Python number)


@pytest.mark.parametrize(
    ("name", "x"),
    [
        ("simulate bandwidth", 0.5),  # (floats exact in float32, so both calls agree)
        ("simulate latency", 2.0**-20),
        ("demo seconds", 0.5),
        ("DigitsTask label_smoothing", 0.25),
        ("integrated_gradients baselines", 0.5),
    ],
)
def test_numpy_fractions_are_taken_as_python_floats(name: str, x: float) -> None:
    call = CASES[name][0]
    for kind in (np.float32, np.float64):
        assert call(kind(x)) == call(x)


@pytest.mark.parametrize("bad", [True, np.bool_(True), "1"], ids=repr)
@pytest.mark.parametrize("name", list(CASES))
def test_bools_and_strings_are_still_refused(name: str, bad: object) -> None:
    call, _, _, exc, match = CASES[name]
    with pytest.raises(exc, match=match):
        call(bad)
