"""One source for every default: a command-line option reads its default from the config dataclass field it sets.

Each option of ``uvprep`` / ``uvtrain`` that fills a config field defaults to ``None``, meaning "the field's
default"; the command passes on only the flags that were given (:func:`given`) and the dataclass fills the rest,
as NVlabs' edm2 fills its ``None`` options from one preset table. ``--help`` still shows the effective default:
:func:`option` computes it from the field. ``tests/test_defaults.py`` checks every option against its field.
"""

from __future__ import annotations

import dataclasses
from typing import Any


def field_default(cls: type, name: str) -> Any:
    """The default of dataclass ``cls``'s field ``name`` (its ``default_factory`` called); raises KeyError for a
    field ``cls`` lacks and TypeError for a field without a default."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if name not in fields:
        raise KeyError(f"{cls.__name__} has no field {name!r}; expected one of {', '.join(fields)}")
    f = fields[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise TypeError(f"{cls.__name__}.{name} has no default: make the option required")


def shown(value: Any) -> str | bool:
    """A default as ``--help`` shows it (``False``: none shown, for ``None`` defaults the help text explains)."""
    if value is None:
        return False
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple | list):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return str(value)


def option(cls: type, name: str, *param_decls: str, help: str, **kwargs: Any) -> Any:
    """A typer option defaulting to ``None`` -- "``cls.name``'s default" -- whose ``--help`` shows that default."""
    import typer  # here, not at the top: the config modules import field_default, and build workers need no typer

    return typer.Option(None, *param_decls, help=help, show_default=shown(field_default(cls, name)), **kwargs)


def given(**values: Any) -> dict[str, Any]:
    """The keyword arguments whose value is not ``None`` (the flags given), for ``Config(**given(...))``."""
    return {k: v for k, v in values.items() if v is not None}
