"""The docs stay true to the code where they restate it: every store array is described in docs/store.md."""

from __future__ import annotations

from pathlib import Path

from common.store.schema import ARRAYS

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_the_store_page_names_every_array_of_the_schema():
    text = (DOCS / "store.md").read_text(encoding="utf-8")
    missing = [a.name for a in ARRAYS if f"`{a.name}`" not in text]
    assert not missing, f"docs/store.md does not describe {missing} (common/store/schema.py ARRAYS)"
