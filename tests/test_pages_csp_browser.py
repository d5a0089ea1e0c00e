"""The written pages without scripts (a run's ``report.html``, ``attnlab ask --out`` and
``attnlab summarize --out``) in a real browser: their Content-Security-Policy runs no
script added to the saved page, and the page still shows fully (its styles apply, its
inlined pictures load, no policy violation is reported).

Skipped when Playwright or ``/usr/bin/chromium`` is missing (``make test`` installs both).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from attnlab.apps import Answer, Sentence
from attnlab.apps.match import WordMatch
from attnlab.apps.report import answers_html, summary_html
from attnlab.apps.summarize import Summary
from attnlab.tasks.report import Section, write_html

CSP = re.compile(r"<meta http-equiv=\"Content-Security-Policy\"[^>]*>")
INJECTED = "<script>document.documentElement.dataset.pwned = '1'</script>"


def _run_report(folder: Path) -> Path:
    from PIL import Image

    pics = []
    for name, size in (("loss_curve", (40, 20)), ("heads", (16, 16))):
        pics.append(folder / f"{name}.png")
        Image.new("RGB", size, (200, 40, 40)).save(pics[-1])
    sections = [Section("Curves", "loss", pics[:1]), Section("Heads", "| a |", pics[1:], True)]
    return write_html(folder / "report.html", "Run", {"exact": 99.5}, sections)


def _answers(folder: Path) -> Path:
    pairs = torch.tensor([[0.125, 0, 0, 0], [0, 0.5, 0.25, 0], [0, 0, 0, 0.125]])
    m = WordMatch(
        ["[CLS]", "cats", "[SEP]"],
        ["[CLS]", "cats", "purr", "[SEP]"],
        pairs,
        1.0,
        [0, 1, 0],
        [0, 0.6, -0.4, 0],
        (1.0, 1.0),
        (0.0, 0.0),
    )
    a = Answer(Sentence("Cats purr.", "pets.txt", "", 0), 0.5, {"cosine": 0.5}, ["Cats purr."])
    a.matches = m
    return answers_html("Do cats purr?", [a], folder / "ask.html")


def _summary(folder: Path) -> Path:
    return summary_html(Summary(["Cats purr.", "Dogs bark."], [0.6, 0.4], [0]), folder / "s.html")


PAGES: dict[str, tuple[Callable[[Path], Path], int]] = {  # writer, pictures on the page
    "run_report": (_run_report, 2),
    "answers": (_answers, 0),
    "summary": (_summary, 0),
}

_SHOWN = """() => ({
  images: [...document.images].filter(i => i.complete && i.naturalWidth > 0).length,
  styled: getComputedStyle(document.body).maxWidth,
  shaded: [...document.querySelectorAll('span.w')].map(s => getComputedStyle(s).backgroundColor),
})"""


def _open(browser: Any, path: Path) -> tuple[Any, list[str]]:
    """The page loaded, and every console message and page error it gave."""
    page = browser.new_page()
    said: list[str] = []
    page.on("console", lambda m: said.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: said.append(f"pageerror: {e}"))
    page.goto(path.resolve().as_uri())
    page.wait_for_load_state("load")
    return page, said


@pytest.mark.parametrize("name", PAGES)
def test_a_page_without_scripts_runs_none_and_still_shows_fully(
    browser: Any, tmp_path: Path, name: str
) -> None:
    """(Only the attention report had a policy: on these pages escaping was the only guard.)
    A script added to the saved page does not run; the control, the same page without the
    policy, runs it. The policy's page shows as the control does, with nothing refused."""
    write, pictures = PAGES[name]
    text = write(tmp_path).read_text(encoding="utf-8")
    assert len(CSP.findall(text)) == 1, "the page has no Content-Security-Policy"
    assert text.index("Content-Security-Policy") < text.index("<style>")  # before what it governs
    shown = {}
    for policy in (True, False):
        changed = text + INJECTED if policy else CSP.sub("", text) + INJECTED
        (tmp_path / f"{policy}.html").write_text(changed, encoding="utf-8")
        page, said = _open(browser, tmp_path / f"{policy}.html")
        pwned = page.evaluate("document.documentElement.dataset.pwned")
        assert pwned == (None if policy else "1"), (policy, pwned)
        shown[policy] = page.evaluate(_SHOWN)
        refused = [s for s in said if "Content Security Policy" in s]
        assert len(refused) == policy, said  # the injected script's, and nothing else
        page.close()
    assert shown[True] == shown[False]  # styles and pictures as without the policy
    assert shown[True]["images"] == pictures and shown[True]["styled"] != "none"
    assert all(c != "rgba(0, 0, 0, 0)" for c in shown[True]["shaded"])  # style attributes
