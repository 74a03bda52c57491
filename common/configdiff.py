"""Differences between two nested configurations, named by dotted keys: the one comparison a resumed build
(``common.store``) and a rerun training run (``train.runs``) both report with."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

ABSENT = "<absent>"


def flatten_mapping(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> ``{"a.b.c": leaf}``: the dotted keys config comparisons name. A non-mapping ``d`` is one
    leaf named ``prefix``."""
    if not isinstance(d, Mapping):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten_mapping(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def short_value(v: Any, width: int = 80) -> str:
    """A value as JSON (strings bare), cut to ``width`` characters."""
    s = v if isinstance(v, str) else json.dumps(v)
    return s if len(s) <= width else s[: width - 3] + "..."


def dotted_differences(old: Any, new: Any, old_name: str, new_name: str = "this run", prefix: str = "") -> list[str]:
    """``key: OLD_NAME x, NEW_NAME y`` for every dotted key whose leaf differs, sorted by key.

    A key absent from ``old`` whose new value is None is not a difference: a setting added to the code later and
    left at its "off" default does not make an existing store or run incompatible.
    """
    a, b = flatten_mapping(old, prefix), flatten_mapping(new, prefix)
    out = []
    for key in sorted(set(a) | set(b)):
        was, now = a.get(key, ABSENT), b.get(key, ABSENT)
        if was != now and not (was == ABSENT and now is None):
            out.append(f"{key}: {old_name} {short_value(was)}, {new_name} {short_value(now)}")
    return out
