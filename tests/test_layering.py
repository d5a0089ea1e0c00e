"""The structure README describes, checked on the source: one-way imports, no private
mask names outside ``masks/``, rooms of readable size, and every module named in README's
"Layout of the code".

Each check runs on the real tree and, as a positive control, on a small snippet that
breaks the rule, so a checker that sees nothing cannot pass.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "attnlab"
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
README = Path(__file__).resolve().parents[1] / "README.md"

# A room may import rooms of a lower rank (or itself). README's order, bottom to top.
RANKS = {
    "_grid": 0,
    "_cpu": 0,
    "_eager": 0,  # what torch.compile runs as written; whether torch.func.vmap runs
    "_rows": 0,  # the normalizers' row helpers
    "_warnings": 0,  # a block's warnings held back and passed on
    "_timing": 0,  # the benchmarks' timers (attnlab.bench re-exports them)
    "_scalars": 0,  # numbers and flags checked, numpy scalars as plain values
    "_hosts": 0,  # Host header names: serve's guard reads them, cli's --allow-host checks them
    "_devices": 0,  # host-to-device copies without a sync; whether a read stalls the host
    "normalize": 1,
    "scores": 1,
    "_validate": 2,
    "_io": 2,
    "masks": 3,
    "bias": 3,
    "positional": 4,
    "engines": 5,
    "_request": 6,  # an attention call's request, its output type, unsupported_by
    "_observe": 6,
    "functional": 7,
    "approximation": 8,
    "nn": 8,
    "distributed": 8,  # context parallelism: beside nn, over functional and the vocabulary
    "attnlab": 8,  # the package root: functional, nn and the vocabulary re-exported
    "models": 9,
    "train": 9,
    "interpret": 10,
    "integrations": 11,  # attnlab under other libraries (transformers); cli imports it
    "tasks": 11,
    "apps": 11,  # what users run on real text (ask, summarize): over models and interpret
    "robust": 11,  # adversarial training, regularizers, faithfulness; its studies build tasks
    "rl": 11,  # agents: policies over functional and masks, PPO through the trainer; tasks
    "bench": 11,
    "serve": 12,  # the local explorer: over interpret, models and tasks; cli starts it
    "cli": 13,
}
# Beyond the ranks: interpret observes attention only through functional and its hook, and
# the training loop knows nothing of any model.
FORBIDDEN = {"interpret": {"engines", "models", "train"}, "train": {"models", "nn"}}
MAX_LINES = 450


def room_of(path: Path) -> str:
    """The room of a source file: its top-level module or package under attnlab/."""
    rel = path.relative_to(SRC).with_suffix("")
    return "attnlab" if rel.parts == ("__init__",) else rel.parts[0]


def imported_rooms(tree: ast.AST) -> set[str]:
    """Rooms of attnlab that a module imports (anywhere in it, functions included)."""
    rooms: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mod = node.module.split(".")
            if mod[0] != "attnlab":
                continue
            if len(mod) > 1:
                rooms.add(mod[1])
            else:
                rooms.update(a.name if a.name in RANKS else "attnlab" for a in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                mod = alias.name.split(".")
                if mod[0] == "attnlab":
                    rooms.add(mod[1] if len(mod) > 1 else "attnlab")
    return rooms


def layering_violations(room: str, tree: ast.AST) -> list[str]:
    """What ``room`` imports against the layering (empty when it keeps it)."""
    bad = []
    for target in sorted(imported_rooms(tree) - {room}):
        if target not in RANKS:
            bad.append(f"{room} imports {target}, a room with no place in the layering")
        elif RANKS[target] > RANKS[room] or target in FORBIDDEN.get(room, ()):
            bad.append(f"{room} imports {target}")
    return bad


def sources() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def test_every_room_has_a_place_and_imports_only_downward() -> None:
    bad = []
    for path in sources():
        room = room_of(path)
        assert room in RANKS, f"{path}: room {room!r} is not in the layering"
        bad += [
            f"{path.relative_to(SRC)}: {v}"
            for v in layering_violations(room, ast.parse(path.read_text()))
        ]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    ("room", "code"),
    [
        ("interpret", "from attnlab.engines import get_engine"),
        ("interpret", "def f():\n    from attnlab.models import BertEncoder"),
        ("models", "from attnlab.interpret import rollout"),
        ("train", "from attnlab.models import LanguageModel"),
        ("masks", "import attnlab.functional"),
        ("engines", "from attnlab import nn"),
        ("functional", "from attnlab import attention"),  # the package root sits above
    ],
)
def test_layering_check_catches_an_upward_import(room: str, code: str) -> None:
    assert layering_violations(room, ast.parse(code))


def private_mask_names() -> set[str]:
    """Private names defined in masks/: module-level and class-level, not dunders."""
    names: set[str] = set()
    for path in (SRC / "masks").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef):
                names.add(node.name)
            elif isinstance(node, ast.Assign):
                names.update(t.id for t in node.targets if isinstance(t, ast.Name))
                names.update(t.attr for t in node.targets if isinstance(t, ast.Attribute))
    return {n for n in names if n.startswith("_") and not n.endswith("__")}


def private_mask_uses(tree: ast.AST, private: set[str]) -> list[str]:
    """Imports of private names from ``attnlab.masks`` and attribute reads of them."""
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("attnlab.masks"):
            uses += [f"imports {a.name}" for a in node.names if a.name.startswith("_")]
        elif isinstance(node, ast.Attribute) and node.attr in private:
            uses.append(f"uses .{node.attr}")
    return uses


def test_no_private_mask_name_outside_masks() -> None:
    private = private_mask_names()
    assert {"_layout", "_sizes"} <= private  # the collector sees the package
    outside = [p for p in sources() if room_of(p) != "masks"] + sorted(BENCHMARKS.glob("*.py"))
    bad = [
        f"{p}: {use}"
        for p in outside
        for use in private_mask_uses(ast.parse(p.read_text()), private)
    ]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    "code",
    [
        "from attnlab.masks import _Causal",
        "from attnlab.masks.base import _Combination",
        "def f(m):\n    return m._layout(1, 1, 1, 1, None, 1, None)",
    ],
)
def test_private_name_check_catches_a_use(code: str) -> None:
    assert private_mask_uses(ast.parse(code), private_mask_names())


def test_no_source_module_is_over_the_size_limit() -> None:
    sizes = {p.relative_to(SRC): len(p.read_text().splitlines()) for p in sources()}
    big = {str(p): n for p, n in sizes.items() if n > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"
    assert max(sizes.values()) > 100  # the count reads real files


def test_no_page_script_is_over_the_size_limit() -> None:
    """The pages' JavaScript keeps the modules' limit too (app.js had grown to 498 lines)."""
    sizes = {p.relative_to(SRC): len(p.read_text().splitlines()) for p in SRC.rglob("*.js")}
    big = {str(p): n for p, n in sizes.items() if n > MAX_LINES}
    assert len(sizes) >= 4 and not big, f"scripts over {MAX_LINES} lines: {big}"


def layout_block() -> str:
    """README's "Layout of the code" block (the text between its fences)."""
    return README.read_text().split("## Layout of the code", 1)[1].split("```", 2)[1]


def unnamed_modules(block: str) -> list[str]:
    """Modules the layout block does not name: a top-level one by its file name anywhere
    in it, a package's public one by its name as a word in the package's own entry."""
    entries: dict[str, str] = {}
    name = ""
    for line in block.splitlines():
        if re.match(r"  \S", line):  # an entry starts at column 2; its text runs on below
            name = line.split()[0]
        entries[name] = entries.get(name, "") + line + "\n"
    missing = []
    for path in sources():
        rel = path.relative_to(SRC)
        if path.name.startswith("__") or (len(rel.parts) > 1 and path.stem.startswith("_")):
            continue
        text, word = (
            (block, path.name)
            if len(rel.parts) == 1
            else (entries.get(f"{rel.parts[0]}/", ""), path.stem)
        )
        if not re.search(rf"(?<![\w/.]){re.escape(word)}(?![\w])", text):
            missing.append(str(rel))
    return missing


def test_every_module_is_named_in_the_readme_layout() -> None:
    """The list had fallen behind the tree (blocked_fold, flex_mods, zeros, ulysses, the
    top-level helpers, and interpret's plot called "plots")."""
    missing = unnamed_modules(layout_block())
    assert not missing, f"modules README's Layout of the code does not name: {missing}"


@pytest.mark.parametrize(
    ("old", "new", "module"),
    [
        ("flex_mods", "flex's mods", "engines/flex_mods.py"),
        (" plot (", " plots (", "interpret/plot.py"),
        ("_timing.py", "_timing", "_timing.py"),
    ],
)
def test_layout_check_catches_an_unnamed_module(old: str, new: str, module: str) -> None:
    block = layout_block()
    assert old in block
    assert module in unnamed_modules(block.replace(old, new))
