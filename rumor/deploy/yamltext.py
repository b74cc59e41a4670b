"""A small YAML writer for the generated manifests (mappings, lists and scalars only).

Why not PyYAML: it is not a runtime dependency of rumor, and the generators only ever write
plain data. Every string is written double-quoted with JSON escapes (a JSON string is a valid
YAML double-quoted scalar), so values such as ``"on"``, ``"0755"`` or ``"node-1:50051"`` keep
their type; multi-line strings (the node TOML files of a ConfigMap) are written as literal
blocks so they stay readable. Mapping keys that are plain identifiers stay unquoted.

This module must not read YAML or know about Docker or Kubernetes.
"""

from __future__ import annotations

import json
import re
from typing import Any

_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-/]*$")
_RESERVED = {"y", "n", "yes", "no", "on", "off", "true", "false", "null", "~"}


def dumps(data: Any) -> str:
    """YAML text for ``data`` (dicts keep their order)."""
    return "".join(_block(data, 0)).rstrip("\n") + "\n"


def dumps_all(documents: list[Any]) -> str:
    """Several YAML documents in one stream, separated by ``---``."""
    return "".join("---\n" + dumps(doc) for doc in documents)


def _key(key: Any) -> str:
    text = str(key)
    if _PLAIN_KEY.match(text) and text.lower() not in _RESERVED:
        return text
    return json.dumps(text)


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    raise TypeError(f"cannot write {type(value).__name__} as YAML")


def _is_literal(value: Any) -> bool:
    return (
        isinstance(value, str)
        and "\n" in value
        and value.endswith("\n")
        and not value.endswith("\n\n")
        and not value.startswith((" ", "\n"))
        and all(line == line.rstrip() and "\t" not in line for line in value.splitlines())
    )


def _inline(value: Any, indent: int) -> list[str]:
    """What follows ``key:`` or ``-``: a scalar on the same line, or a nested block."""
    pad = "  " * indent
    if isinstance(value, dict):
        if not value:
            return [" {}\n"]
        return ["\n", *_block(value, indent + 1)]
    if isinstance(value, list):
        if not value:
            return [" []\n"]
        return ["\n", *_block(value, indent + 1)]
    if _is_literal(value):
        body = "".join(f"{pad}  {line}\n" if line else "\n" for line in value.splitlines())
        return [" |\n", body]
    return [f" {_scalar(value)}\n"]


def _block(data: Any, indent: int) -> list[str]:
    pad = "  " * indent
    out: list[str] = []
    if isinstance(data, dict):
        for key, value in data.items():
            out.append(f"{pad}{_key(key)}:")
            out.extend(_inline(value, indent))
    elif isinstance(data, list):
        for item in data:
            if isinstance(item, dict) and item:
                first, *rest = _block(item, indent + 1)
                out.append(f"{pad}- {first.lstrip()}")
                out.extend(rest)
            else:
                out.append(f"{pad}-")
                out.extend(_inline(item, indent))
    else:
        out.append(f"{pad}{_scalar(data)}\n")
    return out
