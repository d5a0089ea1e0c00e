"""The attnlab transformers backend in several threads at once (``attnlab serve``, a
user's thread pool): what one thread's mask request says must not reach another's mask.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from attnlab.integrations.transformers import register  # noqa: E402
from tests.conftest import max_err  # noqa: E402
from tests.test_hf_models import _ids, tiny  # noqa: E402

WAIT = 30.0  # seconds a thread waits for the other before the test fails


def _in_two_threads(
    runs: dict[str, Callable[[], torch.Tensor]], second_after: threading.Event
) -> dict[str, torch.Tensor]:
    """Each run in a thread of its name, the second started once ``second_after`` is set;
    their results, or the first error raised."""
    got: dict[str, Any] = {}

    def run(name: str) -> None:
        try:
            with torch.no_grad():
                got[name] = runs[name]()
        except BaseException as e:  # handed to the test's thread
            got[name] = e

    first, second = (threading.Thread(target=run, args=(n,), name=n) for n in runs)
    first.start()
    if second_after.wait(WAIT):
        second.start()
    for t in (first, second):
        if t.ident is not None:  # started
            t.join(2 * WAIT)
    for value in got.values():
        if isinstance(value, BaseException):
            raise value
    assert len(got) == 2, f"the threads did not finish in time: {sorted(got)} did"
    return got


def test_a_threads_mask_follows_its_own_request_not_another_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Llama (whose mask request has position ids) and an OPT (whose has none) in two
    threads, the OPT's request prepared between the Llama's and the Llama's mask: with the
    answer kept in one global, the Llama read OPT's "none" and mixed its packed rows (0.44
    off its sequences run apart) and the OPT read "not known" and split them (0.32 off
    eager). Each thread's mask now follows its own request."""
    register()
    ids, ones = _ids(1, 16), torch.ones(1, 16, dtype=torch.long)
    pos = torch.tensor([list(range(6)) + list(range(10))])  # two packed sequences, 6 and 10
    kw = {"input_ids": ids, "position_ids": pos, "attention_mask": ones, "use_cache": False}
    llama, opt = tiny("llama"), tiny("opt")
    with torch.no_grad():
        apart = torch.cat(
            [llama(input_ids=ids[:, :6]).logits, llama(input_ids=ids[:, 6:]).logits], 1
        )
        want = {"llama": apart, "opt": opt(**kw).logits}  # eager: OPT's rows attend across
        assert max_err(llama(**kw).logits, apart) > 1e-3  # eager mixes Llama's: can fail
        opt_apart = torch.cat(
            [opt(input_ids=ids[:, :6]).logits, opt(input_ids=ids[:, 6:]).logits], 1
        )
        assert max_err(want["opt"], opt_apart) > 1e-3
    for model in (llama, opt):
        model.set_attn_implementation("attnlab")
    llama_prepared = _interleave_mask_requests(monkeypatch)
    runs = {"llama": lambda: llama(**kw).logits, "opt": lambda: opt(**kw).logits}
    got = _in_two_threads(runs, second_after=llama_prepared)
    assert max_err(got["llama"], want["llama"]) < 1e-5
    assert max_err(got["opt"], want["opt"]) < 1e-5


def _interleave_mask_requests(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Order the two threads' mask requests: the Llama prepares its request, the OPT
    (started once the returned event is set) prepares its own, the Llama builds its mask,
    then the OPT builds its own."""
    table = transformers.masking_utils.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping
    own = table["attnlab"]
    llama_prepared, opt_prepared, llama_built = (threading.Event() for _ in range(3))

    def ordered(*a: Any, **kw: Any) -> Any:  # called after the thread's request is prepared
        if threading.current_thread().name == "llama":
            llama_prepared.set()
            assert opt_prepared.wait(WAIT), "the OPT thread never asked for its mask"
            try:
                return own(*a, **kw)
            finally:
                llama_built.set()
        opt_prepared.set()
        assert llama_built.wait(WAIT), "the Llama thread never built its mask"
        return own(*a, **kw)

    monkeypatch.setitem(table, "attnlab", ordered)
    return llama_prepared
