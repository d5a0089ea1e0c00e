"""The HTML report in a real browser: Debian's chromium, driven by Playwright, offline.

Screenshots go to ``$ATTNLAB_ARTIFACTS`` (default ``test-artifacts/``) and are kept.
Skipped when Playwright or ``/usr/bin/chromium`` is missing (``make test`` installs both).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from attnlab.interpret import capture
from attnlab.interpret.report import report
from attnlab.nn import Encoder, EncoderLayer, LayerConfig
from tests.conftest import ARTIFACTS, check_and_control


def _attentions(n: int, layers: int, heads: int) -> list[torch.Tensor]:
    torch.manual_seed(0)
    enc = Encoder(
        EncoderLayer(LayerConfig(32, heads, 64, dropout=0.0, engine="blocked")), layers
    ).eval()
    with torch.no_grad(), capture(enc) as cap:
        enc(torch.randn(1, n, 32))
    return [c.weights[0] for c in cap]  # per layer (H, n, n)


def _open(browser: Any, page_path: Path) -> tuple[Any, list[str]]:
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(page_path.resolve().as_uri())
    page.wait_for_function("document.body.dataset.ready === '1'", timeout=30_000)
    return page, requests


def _status(page: Any, where: str = "#status") -> str:
    """A status line as read: tokens in it are isolated (U+2068 ... U+2069)."""
    return str(page.inner_text(where)).replace("\u2068", "").replace("\u2069", "")


_INK = """c => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let s = 0; for (let i = 0; i < d.length; i += 4) s += (d[i] < 250 || d[i+3] > 0 && d[i] < 250);
  return s; }"""
_LINES_INK = """() => { const c = document.getElementById('lines');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let s = 0; for (let i = 3; i < d.length; i += 4) s += d[i] > 0; return s; }"""


def test_report_draws_heads_and_hover_shows_a_tokens_lines(browser: Any, tmp_path: Path) -> None:
    tokens = [f"w{i}" for i in range(12)]
    attns = _attentions(12, 2, 4)
    path = report(tmp_path / "r.html", tokens, attns, saliency={"test": list(range(12))})
    page, requests = _open(browser, path)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "report_small.png"), full_page=True)

    thumbs = page.query_selector_all("#grid canvas")
    assert len(thumbs) == 2 * (4 + 1)  # every layer's heads plus their mean
    assert all(t.evaluate(_INK) > 0 for t in thumbs)  # each head is drawn
    all_lines = page.evaluate(_LINES_INK)
    assert all_lines > 0 and "lines" in _status(page)

    page.select_option("#layer", "1")
    page.select_option("#head", "2")
    page.hover("#left .tok >> nth=5")
    status = _status(page)
    assert status.startswith('layer 1, head 2: "w5" attends to')
    want = int(attns[1][2, 5].argmax())  # the strongest key of token 5 in that head
    assert status.split("attends to ")[1].startswith(f"w{want} (")
    bg = page.eval_on_selector(f"#right .tok >> nth={want}", "d => d.style.background")
    assert bg.startswith("rgba(31, 111, 180")
    assert 0 < page.evaluate(_LINES_INK) < all_lines  # only that token's lines now
    page.screenshot(path=str(ARTIFACTS / "report_small_hover.png"), full_page=True)

    page.mouse.move(1, 1)  # leaving the token restores the full view
    assert "lines" in _status(page)
    page.click("#grid canvas >> nth=0")  # a thumbnail picks layer 0, head 0
    assert _status(page).startswith("layer 0, head 0")
    assert page.query_selector_all(".sal span") and len(page.query_selector_all(".sal span")) == 12
    assert all(u.startswith(("file:", "data:")) for u in requests), requests  # offline


def test_report_tokens_take_keyboard_focus_and_show_the_hover_readout(
    browser: Any, tmp_path: Path
) -> None:
    """(Tab went from the head select past the tokens: their readout was for a mouse only.)"""
    tokens = [f"w{i}" for i in range(12)]
    attns = _attentions(12, 2, 4)
    path = report(tmp_path / "r.html", tokens, attns, saliency={"test": [i / 8 for i in range(12)]})
    page, _ = _open(browser, path)
    page.select_option("#layer", "1")
    page.select_option("#head", "2")
    page.focus("#grid canvas[data-layer='1'][data-head='4']")  # the last thumbnail
    page.keyboard.press("Tab")  # the query tokens are the next Tab stop
    for _ in range(5):
        page.keyboard.press("ArrowDown")
    page.keyboard.press("Alt+ArrowDown")  # a browser's shortcut, not a move (Alt+Left: Back)
    assert page.evaluate("document.activeElement.dataset.i") == "5"
    status = _status(page)
    want = int(attns[1][2, 5].argmax())
    assert status.startswith(f'layer 1, head 2: "w5" attends to w{want} (')
    tok = "document.activeElement"
    assert page.evaluate(
        f"[{tok}.getAttribute('role'), {tok}.getAttribute('aria-describedby')]"
    ) == [
        "option",
        "status",
    ]
    assert page.evaluate(f"getComputedStyle({tok}).outlineStyle") == "solid"
    page.keyboard.press("ArrowRight")  # across: key w5
    assert _status(page).endswith('tokens attend to "w5"')
    page.keyboard.press("ArrowLeft")
    page.screenshot(path=str(ARTIFACTS / "report_small_focus.png"), full_page=True)
    page.hover("#left .tok >> nth=5")
    assert _status(page) == status  # the mouse shows the same
    page.keyboard.press("Tab")  # on to the key column, then the saliency row
    page.keyboard.press("Tab")
    for _ in range(3):
        page.keyboard.press("ArrowRight")
    assert _status(page, "#sal-status") == 'test: "w3" (3) 0.3750'
    page.keyboard.press("Tab")  # focus leaves the tokens: the full view again
    assert "lines" in _status(page)


def test_report_thumbnails_take_keyboard_focus_and_pick_a_head(
    browser: Any, tmp_path: Path
) -> None:
    """(The thumbnails took clicks only: Tab went from the head select past them, Enter on
    one did nothing.) Each is a button, as in the explorer: Enter or Space picks its head."""
    path = report(tmp_path / "r.html", [f"w{i}" for i in range(12)], _attentions(12, 2, 4))
    page, _ = _open(browser, path)
    page.focus("#head")
    page.keyboard.press("Tab")  # the first thumbnail is the next Tab stop
    got = "[document.activeElement.dataset.layer, document.activeElement.dataset.head]"
    assert page.evaluate(got) == ["0", "0"]
    for _ in range(6):  # one Tab stop each: layer 1, head 1 is the 7th
        page.keyboard.press("Tab")
    assert page.evaluate(got) == ["1", "1"]
    tok = "document.activeElement"
    assert page.evaluate(f"[{tok}.getAttribute('role'), {tok}.getAttribute('aria-label')]") == [
        "button",
        "layer 1, head 1",
    ]
    assert page.evaluate(f"getComputedStyle({tok}).outlineStyle") == "solid"  # focus is seen
    page.keyboard.press("Enter")
    assert _status(page).startswith("layer 1, head 1: ")
    assert (page.input_value("#layer"), page.input_value("#head")) == ("1", "1")
    assert page.evaluate(f"{tok}.getAttribute('aria-pressed')") == "true"
    page.keyboard.press("Shift+Tab")
    page.keyboard.press("Space")  # layer 1, head 0
    assert _status(page).startswith("layer 1, head 0: ")
    assert page.evaluate("window.scrollY") == 0  # Space picked, it did not scroll the page
    assert page.get_attribute("#grid canvas.sel", "data-head") == "0"


def test_report_stays_usable_at_512_tokens(browser: Any, tmp_path: Path) -> None:
    n = 512
    path = report(tmp_path / "big.html", [f"t{i}" for i in range(n)], _attentions(n, 6, 4))
    size_mb = path.stat().st_size / 2**20
    page, _ = _open(browser, path)
    first = float(page.evaluate("document.body.dataset.drawMs"))
    page.hover("#left .tok >> nth=300")
    hover = float(page.evaluate("document.body.dataset.drawMs"))
    assert _status(page).startswith('layer 0, head mean: "t300" attends to')
    page.screenshot(path=str(ARTIFACTS / "report_512.png"))
    (ARTIFACTS / "report_512.txt").write_text(
        f"size {size_mb:.2f} MiB, full draw {first:.1f} ms, hover draw {hover:.1f} ms\n"
    )
    assert size_mb < 3 and len(page.query_selector_all("#grid canvas")) == 6 * 5
    assert hover < 1000  # generous: a redraw of one token's lines, not a benchmark


def test_report_runs_only_its_own_scripts(browser: Any, tmp_path: Path) -> None:
    """(The page had no Content-Security-Policy: escaping was its only guard.) A script
    added to the saved page does not run; the control, the same page without the policy,
    runs it; the report's own scripts still draw."""
    path = report(tmp_path / "r.html", ["a", "b", "c"], _attentions(3, 1, 2))
    page_text = path.read_text(encoding="utf-8")
    assert page_text.count("Content-Security-Policy") == 1
    injected = "<script>document.documentElement.dataset.pwned = '1'</script></body>"
    for name, policy in (("with.html", True), ("without.html", False)):
        text = page_text.replace("</body>", injected)
        if not policy:
            text = re.sub(r"<meta http-equiv=\"Content-Security-Policy\"[^>]*>", "", text)
        (tmp_path / name).write_text(text, encoding="utf-8")
        page, _ = _open(browser, tmp_path / name)  # the report's own scripts ran
        assert page.evaluate("document.documentElement.dataset.pwned") == (None if policy else "1")
        assert page.query_selector_all("#grid canvas")


NAN = float("nan")


def test_report_rejects_bad_input(tmp_path: Path) -> None:
    a = [torch.rand(2, 3, 3).softmax(-1)]
    ok = lambda: report(tmp_path / "ok.html", ["a", "b", "c"], a)  # noqa: E731
    check_and_control(lambda: report(tmp_path / "x.html", ["a"], a), ok, ValueError, "tokens has 1")
    check_and_control(
        lambda: report(tmp_path / "x.html", ["a", "b", "c"], [torch.rand(2, 3, 4)]),
        ok,
        ValueError,
        "expected \\(H, n, n\\)",
    )
    check_and_control(
        lambda: report(tmp_path / "x.html", ["a", "b", "c"], a, saliency={"s": [1.0]}),
        ok,
        ValueError,
        "one per token",
    )
    check_and_control(
        lambda: report(tmp_path / "x.html", ["a", "b", "c"], a, top_k=0), ok, ValueError, "top_k"
    )
    check_and_control(
        lambda: report(tmp_path / "x.html", ["a", "b", "c"], a, saliency={"s": [1.0, NAN, 2]}),
        ok,
        ValueError,
        r"saliency\['s'\] has nan at token 1, expected finite scores",
    )
    page = report(tmp_path / "esc.html", ["</script>", "b", "c"], a, title="<b>").read_text()
    blob = page.split('id="data">')[1].split("</script>")[0]
    assert "\\u003c/script>" in blob and "<" not in blob and "&lt;b&gt;" in page


def test_tokens_that_look_like_markup_are_shown_as_text(browser: Any, tmp_path: Path) -> None:
    """ "<!--" then "<script>" in the tokens put the HTML parser in a state that skipped
    the data's real end tag (only "</" was escaped): the page drew nothing."""
    tokens = ["<!--", "<script>", "x</script>", "y"]
    path = report(tmp_path / "m.html", tokens, _attentions(4, 1, 2), saliency={"s": [1, 2, 3, 4]})
    page, _ = _open(browser, path)
    assert page.inner_text("#left .tok >> nth=0") == "<!--"
    assert page.inner_text("#left .tok >> nth=2") == "x</script>"


def test_a_text_and_picture_name_that_were_not_utf8_are_written(tmp_path: Path) -> None:
    """A text or picture name from bytes that were not UTF-8 (lone surrogates) made the
    write fail with UnicodeEncodeError after all the work; they show U+FFFD now."""
    from PIL import Image

    pic = tmp_path / "heads_caf\udce9.png"
    Image.new("L", (4, 4), 0).save(pic)
    a = [torch.rand(2, 3, 3).softmax(-1)]
    page = report(tmp_path / "r.html", ["a", "b", "c"], a, text="caf\udce9", pictures=[pic])
    html = page.read_text(encoding="utf-8")
    assert "caf\ufffd" in html and "heads_caf\ufffd" in html


def test_a_diffuse_head_still_names_and_draws_each_tokens_strongest_key(
    browser: Any, tmp_path: Path
) -> None:
    """Every weight of a diffuse head below 0.02 (MiniLM layer 0 head 11 at 256 tokens:
    0.0135 at most) was dropped: hovering a token read 'attends to ' with no key and drew
    nothing, hovering a key read '0 tokens attend to'."""
    n = 100
    logits = torch.zeros(2, n, n)
    logits[:, torch.arange(n), (torch.arange(n) + 1) % n] = math.log(2.0)
    attns = [logits.softmax(-1)]  # each token: 2/101 = 0.0198 on the next one, 1/101 elsewhere
    path = report(tmp_path / "diffuse.html", [f"w{i}" for i in range(n)], attns)
    page, _ = _open(browser, path)
    page.select_option("#head", "1")
    page.hover("#left .tok >> nth=5")
    assert _status(page).startswith('layer 0, head 1: "w5" attends to w6 (0.02), w')
    assert int(page.evaluate("document.body.dataset.lines")) >= 1
    assert page.evaluate(_LINES_INK) > 0
    bg = page.eval_on_selector("#right .tok >> nth=6", "d => d.style.background")
    assert bg.startswith("rgba(31, 111, 180")
    page.hover("#right .tok >> nth=6")  # token 5 attends to key 6 most of all
    status = _status(page)
    assert status.endswith('tokens attend to "w6"') and "head 1: 0 tokens" not in status
    assert int(page.evaluate("document.body.dataset.lines")) >= 1


def test_a_right_to_left_override_in_the_text_or_a_token_stays_inside_it(
    browser: Any, tmp_path: Path
) -> None:
    """A text with U+202E (right-to-left override) and no U+202C reversed the rest of its
    line, the note after it too ('cats (noitcerid ...) nur sgod'); a token with one reversed
    the status line after it. Each is isolated now: the note reads left to right after the
    text, the status line's words after the token."""
    rlo = "\u202e"
    attns = [torch.full((1, 3, 3), 1 / 3)]
    path = report(tmp_path / "rlo.html", ["a", f"b{rlo}c", "d"], attns,
                  text=f"cats {rlo}dogs run", note="(score: x)")  # fmt: skip
    page, _ = _open(browser, path)
    x_of = """s => { const p = document.querySelector('p.muted');
      const w = document.createTreeWalker(p, 4);
      for (let t = w.nextNode(); t; t = w.nextNode()) { const i = t.data.indexOf(s);
        if (i >= 0) { const r = document.createRange(); r.setStart(t, i); r.setEnd(t, i + 1);
          return r.getBoundingClientRect().x; } } return null; }"""
    opening, closing = page.evaluate(x_of, "(score"), page.evaluate(x_of, ": x)")
    assert opening is not None and closing is not None and opening < closing, (opening, closing)
    page.hover("#left .tok >> nth=1")
    raw = page.inner_text("#status")
    assert f"\u2068b{rlo}c\u2069" in raw and raw.index("attends to") > raw.index(rlo), raw
