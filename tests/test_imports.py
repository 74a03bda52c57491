"""The folder tree is the data flow: ``common/`` imports neither side, ``train/`` never imports ``preprocess/``.

Every ``.py`` file under ``common/`` and ``train/`` is parsed (not imported) and every import in it is checked,
wherever it is (module level, inside functions, under ``if TYPE_CHECKING``): ``import x``, ``from x import y``,
relative imports (resolved against the file's package) and ``importlib.import_module("x")`` / ``__import__("x")``
with a literal name.
"""

from __future__ import annotations

import ast
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
