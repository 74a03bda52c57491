"""The folder tree is the data flow: ``common/`` imports neither side, ``train/`` never imports ``preprocess/``.

Every ``.py`` file under ``common/`` and ``train/`` is parsed (not imported) and every import in it is checked,
wherever it is (module level, inside functions, under ``if TYPE_CHECKING``): ``import x``, ``from x import y``,
relative imports (resolved against the file's package) and ``importlib.import_module("x")`` / ``__import__("x")``
with a literal name.

Also: no module is named like a standard-library one (it would shadow it for a script run from its folder), and
there is no import circle among our modules (imports inside functions count, ``if TYPE_CHECKING`` ones do not).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

FORBIDDEN = {"common": ("preprocess", "train"), "train": ("preprocess",)}


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = list(path.relative_to(ROOT).with_suffix("").parts[:-1])  # the file's package, e.g. ["common"]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: drop (level - 1) packages from the file's own
                base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
                names = [".".join([*base, node.module])] if node.module else [".".join([*base, a.name])
                                                                               for a in node.names]
                found += [(node.lineno, n) for n in names]
            else:
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if name in ("import_module", "__import__"):
                found.append((node.lineno, node.args[0].value))
    return found


def _violations(folder: str) -> list[str]:
    bad = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for line, module in sorted(_imported_modules(path)):
            top = module.split(".")[0]
            if top in FORBIDDEN[folder]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return bad


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_layering(folder):
    assert (ROOT / folder).is_dir()
    bad = _violations(folder)
    assert not bad, (f"{folder}/ may not import {' or '.join(FORBIDDEN[folder])} (move what both sides need into "
                     f"common/):\n" + "\n".join(bad))


def test_the_checker_finds_every_kind_of_import(tmp_path, monkeypatch):
    pkg = tmp_path / "train"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "ok.py").write_text("import numpy\nfrom common.store import StoreReader\nfrom . import data\n")
    (pkg / "sub" / "bad.py").write_text(
        "import os, preprocess.build\n"
        "def f():\n    from preprocess.crops import cut_partial_crops\n"
        "from ...preprocess import stages\n"  # relative, two levels up from train/sub: the repository root
        "import importlib\nimportlib.import_module('preprocess.unwrap')\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert _violations("train") == [
        "train/sub/bad.py:1 imports preprocess.build",
        "train/sub/bad.py:3 imports preprocess.crops",
        "train/sub/bad.py:4 imports preprocess",
        "train/sub/bad.py:6 imports preprocess.unwrap",
    ]


# ------------------------------------------------------------------------------ module names and import circles
PACKAGES = ("common", "preprocess", "train", "pipelines")
SCRIPT_FOLDERS = ("benchmarks", "scripts", "tests")  # run as scripts or by pytest: their folder is on sys.path


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _stdlib_shadows(root: Path, folders) -> list[str]:
    """Files and packages under ``folders`` whose own name is a standard-library module name."""
    bad = []
    for folder in folders:
        for path in sorted((root / folder).rglob("*")):
            name = path.stem if path.suffix == ".py" else path.name if (path / "__init__.py").is_file() else None
            if name in sys.stdlib_module_names and "__pycache__" not in path.parts:
                bad.append(f"{path.relative_to(root)} is named like the standard library's {name!r}")
    return bad


def test_no_module_is_named_like_a_standard_library_module():
    bad = _stdlib_shadows(ROOT, PACKAGES + SCRIPT_FOLDERS)
    assert not bad, ("a module named like a standard-library one shadows it for any script run from its folder "
                     "(`python preprocess/cli.py` put preprocess/ first on sys.path, and `dataclasses` imported "
                     "preprocess/inspect.py as `inspect`); rename it:\n" + "\n".join(bad))


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (isinstance(t, ast.Attribute)
                                                                      and t.attr == "TYPE_CHECKING")


def _runtime_imports(path: Path, root: Path, modules: set[str]) -> set[str]:
    """Our modules a file imports when it runs: at module level or in functions, not under ``if TYPE_CHECKING``.

    ``from a import b`` counts as importing ``a.b`` when that is a module of ours, else ``a``.
    """
    own = _module_name(path, root)
    package = own.split(".") if path.name == "__init__.py" else own.split(".")[:-1]
    names: set[str] = set()

    def visit(nodes) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and _is_type_checking(node):
                visit(node.orelse)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join([*package[:len(package) - (node.level - 1)], *([base] if base else [])])
                for a in node.names:
                    names.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
            else:
                visit(ast.iter_child_nodes(node))

    visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)).body)
    found = set()
    for name in names:
        while name and name not in modules:  # `import common.faces.tddfa.x` -> the module that holds it
            name = name.rpartition(".")[0]
        if name and name != own:
            found.add(name)
    return found


def _import_circles(root: Path, packages) -> list[list[str]]:
    """Every import circle among our modules (strongly connected components of the import graph, Tarjan)."""
    files = {_module_name(p, root): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}
    graph = {m: sorted(_runtime_imports(p, root, set(files))) for m, p in files.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = stack[stack.index(v):]
            del stack[stack.index(v):]
            if len(component) > 1:
                circles.append(sorted(component))

    for v in graph:
        if v not in index:
            connect(v)
    return sorted(circles)


def test_no_import_circle_among_our_modules():
    circles = _import_circles(ROOT, PACKAGES)
    assert not circles, ("import circles (imports inside functions count; `if TYPE_CHECKING:` ones do not): move "
                         "what both need into the lower module, or import for annotations only:\n"
                         + "\n".join(" <-> ".join(c) for c in circles))


def test_the_circle_and_name_checkers_find_what_they_look_for(tmp_path):
    pkg = tmp_path / "common"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import b\n")
    (pkg / "a.py").write_text("def f():\n    from common.sub.b import g\n")  # a function-level import counts
    (pkg / "sub" / "b.py").write_text("from ..c import h\n")
    (pkg / "c.py").write_text("import common.a\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                              "    import common.d\n")
    (pkg / "d.py").write_text("from common import c\n")  # d -> c only under TYPE_CHECKING the other way: no circle
    (pkg / "inspect.py").write_text("")
    assert _import_circles(tmp_path, ["common"]) == [["common.a", "common.c", "common.sub.b"]]
    assert _stdlib_shadows(tmp_path, ["common"]) == ["common/inspect.py is named like the standard library's "
                                                     "'inspect'"]


# ------------------------------------------------------------------------------ the command lines start light
HEAVY = ("torch", "numpy", "zarr", "cv2", "scipy", "dask", "distributed", "fsspec", "kornia")
"""Libraries ``uvtrain --help`` / ``uvprep --help`` must not import (they made every start take 3 s)."""
LIGHT = {"common", "common.config", "common.options", "pipelines", "pipelines.dask_slurm", "preprocess",
         "preprocess.cli", "preprocess.config", "train", "train.cli", "train.config"}
"""Our modules the two command lines may import at start: the configs their options read their defaults from."""


def test_the_command_lines_import_only_their_configs():
    # a fresh interpreter: this one has long imported everything
    tops = sorted({*HEAVY, *PACKAGES})
    code = (f"import json, sys, train.cli, preprocess.cli; "
            f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {tops!r})))")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    loaded = set(json.loads(res.stdout))
    heavy = sorted({m.split(".")[0] for m in loaded} & set(HEAVY))
    ours = sorted(m for m in loaded - LIGHT if m.split(".")[0] in PACKAGES)
    assert not heavy and not ours, (
        f"`import train.cli, preprocess.cli` imports {heavy + ours}: the command lines read their defaults from the "
        f"light config modules (train/config.py, preprocess/config.py, common/config.py) and import each command's "
        f"implementation inside the command")
