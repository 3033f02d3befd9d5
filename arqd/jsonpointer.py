"""JSON pointers (RFC 6901), as multi-step jobs mark secret body fields with them.

``""`` is the whole value, ``"/a/0"`` the first item of field ``a``; ``~1`` stands for ``/`` and
``~0`` for ``~`` inside a token; an array index has no leading zero. Model level: imports nothing
of arqd.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["MISSING", "pointed", "replaced"]

MISSING: Any = object()  # what a pointer naming nothing points at
_INDEX = re.compile(r"^(0|[1-9][0-9]*)$")
_BAD_ESCAPE = re.compile(r"~(?![01])")


def _tokens(pointer: str) -> list[str] | None:
    if pointer == "":
        return []
    if not pointer.startswith("/") or _BAD_ESCAPE.search(pointer):
        return None
    return [t.replace("~1", "/").replace("~0", "~") for t in pointer[1:].split("/")]


def _child_key(node: Any, token: str) -> Any:
    """The key or index ``token`` names in ``node``, or MISSING."""
    if isinstance(node, dict):
        return token if token in node else MISSING
    if isinstance(node, list) and _INDEX.match(token) and int(token) < len(node):
        return int(token)
    return MISSING


def pointed(doc: Any, pointer: str) -> Any:
    """The value ``pointer`` names in ``doc``, or MISSING."""
    tokens = _tokens(pointer)
    if tokens is None:
        return MISSING
    for token in tokens:
        key = _child_key(doc, token)
        if key is MISSING:
            return MISSING
        doc = doc[key]
    return doc


def replaced(doc: Any, pointer: str, value: Any) -> Any:
    """``doc`` with the value at ``pointer`` replaced (copied along the path, never in place);
    ``doc`` itself when the pointer names nothing."""
    tokens = _tokens(pointer)
    if tokens is None or pointed(doc, pointer) is MISSING:
        return doc
    if not tokens:
        return value
    root = copy = doc.copy()
    for token in tokens[:-1]:
        key = _child_key(copy, token)
        copy[key] = copy[key].copy()
        copy = copy[key]
    copy[_child_key(copy, tokens[-1])] = value
    return root
