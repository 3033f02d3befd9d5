"""The reference in ``docs/`` stays complete as the code grows: every config setting, route, CLI
command and option, error code, job field and public name is documented where a reader looks for
it, and nothing sends a reader to a document the repository does not hold.

Each check derives its list from the code (the config structs, ``ROUTES``, the CLI's parser, the
error classes, the job structs, ``arqd.__all__``), so a new setting, route or command without a
line in the reference fails here. Names are looked up as Markdown code spans (```name```), the
way the pages write them.
"""

from __future__ import annotations

import argparse
import re
import types
import typing
from collections.abc import Iterable, Iterator
from pathlib import Path

import msgspec
import pytest

import arqd
from arqd import errors
from arqd.cli import build_parser
from arqd.config import Config
from arqd.http.server import _HTTP_CODES, ROUTES
from arqd.model import JobSpec
from arqd.steps import StepSecrets, StepSpec
from arqd.view import Job, ResultInfo

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = ("http-api.md", "jobs.md", "configuration.md", "cli.md", "python.md")


def page(name: str) -> str:
    return (DOCS / name).read_text()


def spans(text: str) -> set[str]:
    """Every inline code span of a Markdown text, as written between its backticks."""
    return {m.group(1).strip() for m in re.finditer(r"(?<!`)`([^`\n]+)`(?!`)", text)}


def missing(names: Iterable[str], text: str) -> list[str]:
    found = spans(text)
    return sorted({n for n in names if n not in found})


# --- configuration --------------------------------------------------------------------------------


def _section(tp: object) -> type[msgspec.Struct] | None:
    """The config table a field holds: the struct itself, or the struct in a union."""
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if isinstance(arg, type) and issubclass(arg, msgspec.Struct):
                return arg
    return None


def settings(cls: type[msgspec.Struct] = Config, prefix: str = "") -> Iterator[str]:
    """Every setting's full name: ``server.listen``, ``defaults.backoff.base``,
    ``handlers.<name>.call``, ``groups.<name>.jobs[].payload``, ``schedules[].cron``."""
    for field in msgspec.structs.fields(cls):
        if field.name in ("source", "origins"):  # where the config came from: not settings
            continue
        name = prefix + field.name
        tp = field.type
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin is typing.Annotated:
            origin, args = typing.get_origin(args[0]), typing.get_args(args[0])
        if (table := _section(tp)) is not None:
            yield from settings(table, name + ".")
        elif origin is dict and (entry := _section(args[1])) is not None:
            yield from settings(entry, name + ".<name>.")
        elif origin is list and (item := _section(args[0])) is not None:
            yield from settings(item, name + "[].")
        else:
            yield name


def test_the_settings_walk_sees_every_kind_of_setting():
    """The walk reaches plain, nested, named-table and list-of-table settings (a walk that saw
    nothing would make the next test pass vacuously)."""
    found = set(settings())
    for name in (
        "server.listen",
        "defaults.backoff.jitter",
        "handlers.<name>.call",
        "groups.<name>.jobs[].steps",
        "schedules[].catch_up",
        "auth.tokens[].scopes",
        "http_steps.keys",
    ):
        assert name in found
    assert len(found) > 60


def test_every_config_setting_is_in_the_reference():
    """docs/configuration.md names every setting of arqd/config.py by its full name."""
    assert missing(settings(), page("configuration.md")) == []


# --- HTTP -----------------------------------------------------------------------------------------


def test_every_route_is_in_the_reference():
    """docs/http-api.md names every route of ROUTES as ``METHOD /path``."""
    routes = [f"{method} {path}" for method, path, _, _ in ROUTES]
    assert missing(routes, page("http-api.md")) == []


# Errors that are never an answer to a request: a config that does not load, and what ends a
# multi-step job (its error.type, shown in the job JSON).
NOT_ANSWERS = (errors.ConfigError, errors.StepFailed, errors.CredentialsUnreadable)


def error_codes() -> set[str]:
    """Every ``error.code`` the API can answer."""
    codes = set(_HTTP_CODES.values()) | {"invalid_json", "internal"}
    stack: list[type[errors.ArqdError]] = [errors.ArqdError]
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        answered = cls is not errors.ArqdError and not issubclass(cls, NOT_ANSWERS)
        if cls.__module__ == "arqd.errors" and answered:
            codes.add(cls.code)
    return codes - {"backend_error", "conflict"}  # answered as `unavailable`; a base class only


def test_every_error_code_is_in_the_reference():
    """docs/http-api.md lists every error code the API answers."""
    codes = error_codes()
    assert {"not_found", "unsupported_media_type", "misdirected_request", "rate_limited"} <= codes
    assert missing(codes, page("http-api.md")) == []


# --- jobs -----------------------------------------------------------------------------------------


def field_names(cls: type[msgspec.Struct]) -> list[str]:
    return [f.name for f in msgspec.structs.fields(cls)]


def test_every_job_field_is_in_the_reference():
    """docs/jobs.md describes every field of the job spec, the job JSON, its result, a step and
    a step's ``secret`` marks."""
    spec = field_names(JobSpec)
    shown = [n for n in field_names(Job) if n != "version"] + ["links"]  # version: the ETag
    step = [f"steps[].{n}" for n in field_names(StepSpec)]
    marks = [f"secret.{n}" for n in field_names(StepSecrets)]
    result = [f"result.{n}" for n in field_names(ResultInfo)]
    assert missing([*spec, *shown, *step, *marks, *result], page("jobs.md")) == []


# --- the CLI --------------------------------------------------------------------------------------


def commands(
    parser: argparse.ArgumentParser, prefix: str = "arqd"
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every runnable command (``arqd submit``, ``arqd token new``) with its parser."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield prefix, parser
        return
    for name, sub in subs[0].choices.items():
        yield from commands(sub, f"{prefix} {name}")


def sections(text: str) -> dict[str, str]:
    """A page's sections by the first code span of their heading: ``## `arqd submit` `` →
    the text up to the next heading."""
    out: dict[str, str] = {}
    parts = re.split(r"^(#{1,6} .*)$", text, flags=re.MULTILINE)
    for heading, body in zip(parts[1::2], parts[2::2], strict=True):
        m = re.search(r"`([^`]+)`", heading)
        if m:
            out[m.group(1)] = body
    return out


def test_every_cli_command_and_option_is_in_the_reference():
    """docs/cli.md has a section per command (``## `arqd submit` ``) naming each of its options
    and arguments."""
    found = sections(page("cli.md"))
    listed = dict(commands(build_parser()))
    assert len(listed) > 10
    assert sorted(set(listed) - set(found)) == []
    for name, parser in listed.items():
        text = found[name]
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if action.option_strings:
                wanted = max(action.option_strings, key=len)  # --output rather than -o
                assert wanted in text, f"{name}: {wanted} is not in its section of docs/cli.md"
            else:
                assert action.dest.upper() in text, f"{name}: {action.dest.upper()} is missing"


# --- Python ---------------------------------------------------------------------------------------


def test_every_public_name_is_in_the_reference():
    """docs/python.md describes every name of ``arqd.__all__``."""
    names = [f"arqd.{n}" for n in arqd.__all__ if n != "__version__"]
    text = page("python.md")
    assert [n for n in names if n not in text] == []


# --- pointers -------------------------------------------------------------------------------------


def test_readme_reaches_every_reference_page():
    """README.md links each page of the reference."""
    readme = (ROOT / "README.md").read_text()
    assert [p for p in PAGES if f"](docs/{p})" not in readme] == []


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.MULTILINE | re.DOTALL)
    return {anchor(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.MULTILINE)}


LINKED = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


@pytest.mark.parametrize("path", LINKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_between_documents_arrives(path: Path):
    """Every relative link of README.md and docs/ names a file that exists and, with a
    ``#fragment``, a heading of it: a page renamed or a heading reworded breaks no reference."""
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # an absolute URL
        name, _, fragment = target.partition("#")
        file = (path.parent / name).resolve() if name else path
        if not file.exists() or (fragment and fragment not in anchors(file)):
            broken.append(target)
    assert broken == []


def test_anchors_follow_githubs_rule():
    """Anchors are made as GitHub makes them, for the kinds of heading the docs use (code
    spans, punctuation, numbers), so the link check above tests what readers click."""
    assert anchor("5. HTTP API (`arqd/http/server.py`, `arqd/http/client.py`)") == (
        "5-http-api-arqdhttpserverpy-arqdhttpclientpy"
    )
    assert anchor("## `[[schedules]]`".lstrip("# ")) == "schedules"
    assert anchor("Keys and the request cache") == "keys-and-the-request-cache"


@pytest.mark.parametrize(
    "path",
    [
        ROOT / "README.md",
        ROOT / "config.toml",
        *sorted(DOCS.glob("*.md")),
        *sorted((ROOT / "arqd").rglob("*.py")),
    ],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_nothing_points_to_a_document_outside_the_repository(path: Path):
    """No page, comment, docstring or message sends a reader to API.md, which the repository
    does not hold: the reference is docs/."""
    lines = [n for n, line in enumerate(path.read_text().splitlines(), 1) if "API.md" in line]
    assert lines == [], f"{path.relative_to(ROOT)}: lines {lines} mention API.md"
