"""Secrets of a multi-step job kept out of everything shown or stored in clear.

:func:`redact_steps` is the job as shown (every secret value ``"[redacted]"``); :func:`secrets_of`
gathers every secret string of a job so that :func:`scrub` and :func:`scrub_json` can replace
one a server echoes back in a response, an error message or a reason phrase. Which names are
secret is :func:`arqd.stepmodel.is_secret_name`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote_plus

import msgspec
from yarl import URL

from arqd.jsonpointer import pointed, replaced
from arqd.stepmodel import (
    REDACTED,
    SECRET_NAME,
    Credentials,
    StepSecrets,
    StepSpec,
    is_secret_name,
    redact_headers,
    redact_url,
)

__all__ = ["MIN_SCRUBBED", "has_secret_field", "redact_steps", "scrub", "scrub_json", "secrets_of"]

MIN_SCRUBBED = 4  # shorter secrets are not scrubbed from response bodies (would shred the text)


def redact_steps(raw: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The steps (already validated by :func:`parse_steps`) with every secret value replaced by
    ``"[redacted]"``: the values the step marks in ``secret``, and those whose header, query
    parameter or body field name looks like a secret, plus URL passwords; for showing a job."""
    return [_redact_step(step) if isinstance(step, dict) else step for step in raw]


def _redact_step(step: dict[str, Any]) -> dict[str, Any]:
    out = dict(step)
    marks = _marks_of(step)
    if isinstance(out.get("headers"), dict):
        out["headers"] = redact_headers(out["headers"], marks.headers)
    if isinstance(out.get("url"), str):
        out["url"] = redact_url(out["url"], marks.query)
    if "body" in out:
        body = out["body"]
        for pointer in marks.body:
            body = replaced(body, pointer, REDACTED)
        out["body"] = _redact_json(body)
    return out


def _marks_of(step: dict[str, Any]) -> StepSecrets:
    try:
        return msgspec.convert(step.get("secret") or {}, StepSecrets)
    except msgspec.ValidationError:  # pragma: no cover - redact_steps takes validated steps
        return StepSecrets()


def _redact_json(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: REDACTED if SECRET_NAME.search(str(k)) else _redact_json(v) for k, v in value.items()
        }
    if isinstance(value, list):
        return [_redact_json(v) for v in value]
    return value


def has_secret_field(value: Any) -> bool:
    """True if a JSON value holds a field named like a secret, at any depth."""
    if isinstance(value, dict):
        return any(SECRET_NAME.search(str(k)) or has_secret_field(v) for k, v in value.items())
    if isinstance(value, list):
        return any(has_secret_field(v) for v in value)
    return False


# JSON pointers (RFC 6901): "" is the whole value, "/a/0" the first item of field "a";


def _leaves(value: Any) -> list[str]:
    """Every string and number inside a JSON value, as text: what a marked subtree protects."""
    if isinstance(value, dict):
        return [s for v in value.values() for s in _leaves(v)]
    if isinstance(value, list):
        return [s for v in value for s in _leaves(v)]
    if isinstance(value, str):
        return [value]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return [msgspec.json.encode(value).decode()]
    return []


def secrets_of(steps: Iterable[StepSpec], credentials: Credentials | None) -> tuple[str, ...]:
    """Every secret string of a job, longest first, for scrubbing what servers send back."""
    found: set[str] = set(credentials.secrets() if credentials else ())
    for step in steps:
        marks = step.secret
        for name, value in step.headers.items():
            if is_secret_name(name, marks.headers):
                found.update(_header_secrets(value))
        for name, raw in _raw_query(step.url):  # a value both decoded and as written
            if name in marks.query or SECRET_NAME.search(name):
                found.update((raw, unquote_plus(raw)))
        found.update(_json_secrets(step.body))
        for pointer in marks.body:
            found.update(_leaves(pointed(step.body, pointer)))
    return tuple(sorted((s for s in found if len(s) >= MIN_SCRUBBED), key=len, reverse=True))


def _raw_query(url: str) -> list[tuple[str, str]]:
    """``(name, value as written)`` for each query parameter of ``url``."""
    pairs = []
    for part in URL(url).raw_query_string.split("&"):
        name, _, raw = part.partition("=")
        pairs.append((unquote_plus(name), raw))
    return pairs


def _header_secrets(value: str) -> list[str]:
    """The value, the token of ``Scheme token``, and each value of ``a=b; c=d``."""
    parts = [value, value.partition(" ")[2].strip()]
    parts += [p.partition("=")[2].strip() for p in value.split(";") if "=" in p]
    return parts


def _json_secrets(value: Any) -> list[str]:
    if isinstance(value, dict):
        out: list[str] = []
        for k, v in value.items():
            out += _leaves(v) if SECRET_NAME.search(str(k)) else _json_secrets(v)
        return out
    if isinstance(value, list):
        return [s for v in value for s in _json_secrets(v)]
    return []


def scrub(text: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def scrub_json(value: Any, secrets: tuple[str, ...]) -> Any:
    if isinstance(value, str):
        return scrub(value, secrets)
    if isinstance(value, dict):
        return {scrub(k, secrets): scrub_json(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub_json(v, secrets) for v in value]
    return value
