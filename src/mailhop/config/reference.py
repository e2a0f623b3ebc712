"""Render the configuration reference (docs/configuration.md) from the schema, so the docs cannot drift."""

from __future__ import annotations

import socket
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from .schema import Config

__all__ = ["render_reference"]


def _default(field: FieldInfo) -> str:
    if field.default_factory is socket.getfqdn:
        return "(this host's FQDN)"
    if field.default_factory is not None:
        value: Any = field.default_factory()  # type: ignore[call-arg]
    elif field.default is PydanticUndefined:
        return "(required)"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return ""
    if isinstance(value, list) and value and isinstance(value[0], BaseModel):
        return ""
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, list):
        return "`[" + ", ".join(f'"{v}"' for v in value) + "]`"
    return f"`{value}`"


def _section_model(field: FieldInfo) -> type[BaseModel] | None:
    ann = field.annotation
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    args = getattr(ann, "__args__", ())
    if args and isinstance(args[0], type) and issubclass(args[0], BaseModel):
        return args[0]
    return None


def render_reference() -> str:
    """The whole reference as Markdown."""
    out = [
        "# Configuration reference",
        "",
        "mailhop reads one TOML file (`mailhop serve --config FILE`). Unknown keys are errors. Relative paths are",
        "relative to the directory of the configuration file. `mailhop check-config --config FILE` validates it.",
        "This page is generated from the schema by `mailhop config-reference`; a test keeps it current.",
        "",
        "## Top level",
        "",
        "| key | default | meaning |",
        "|---|---|---|",
    ]
    sections = []
    for name, field in Config.model_fields.items():
        model = _section_model(field)
        if model is not None:
            sections.append((name, field, model))
            continue
        out.append(f"| `{name}` | {_default(field)} | {field.description} |")
    for name, field, model in sections:
        out += _section(name, field, model)
    return "\n".join(out) + "\n"


def _section(path: str, field: FieldInfo, model: type[BaseModel]) -> list[str]:
    """One table's section, then a section for each table nested in it (``[checks.greylist]``, ...)."""
    is_list = getattr(field.annotation, "__origin__", None) is list
    header = f"[[{path}]]" if is_list else f"[{path}]"
    out = ["", f"## `{header}`", "", field.description or "", "", "| key | default | meaning |", "|---|---|---|"]
    nested = []
    for key, sub in model.model_fields.items():
        out.append(f"| `{key}` | {_default(sub)} | {sub.description} |")
        sub_model = _section_model(sub)
        if sub_model is not None:
            nested.append((f"{path}.{key}", sub, sub_model))
    for sub_path, sub, sub_model in nested:
        out += _section(sub_path, sub, sub_model)
    return out
