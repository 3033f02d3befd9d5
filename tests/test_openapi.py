"""The OpenAPI document (``GET /v1/openapi.json``): complete, valid, and in step with the code.

``tests/test_openapi_fuzz.py`` checks the document against a running daemon; these checks are
static and fast: every route is documented, the document validates as OpenAPI 3.1, security
follows the scopes of ``ROUTES``, request schemas carry msgspec's constraints, and the Job schema
has exactly the fields of the Job JSON.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer
from openapi_spec_validator import validate

import arqd
from arqd.config import Config
from arqd.http.openapi import OPERATIONS, document, ecma
from arqd.http.server import ROUTES, make_app
from arqd.http.wire import job_dict
from arqd.model import GroupMemberSpec, GroupSpec, Job, JobSpec, State
from arqd.steps import StepPhase, StepSecrets, StepSpec

METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
# Constraint keywords msgspec emits for validation, compared one by one with the document.
CONSTRAINTS = ("type", "pattern", "minimum", "maximum", "exclusiveMinimum", "minLength")
CONSTRAINTS += ("maxLength", "minItems", "maxItems", "enum")
# Constraints the document states in prose only (see arqd/http/openapi.py for why).
IN_PROSE = {("Step", "url", "maxLength")}


def documented() -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, item in document()["paths"].items()
        for method in item
        if method in METHODS
    }


def test_every_route_is_documented_and_nothing_else():
    """The document's operations are exactly the routes of ROUTES, so a new route needs docs."""
    routes = {(method, path) for method, path, _, _ in ROUTES}
    assert documented() == routes
    assert set(OPERATIONS) == routes


def test_document_is_valid_openapi_3_1():
    """openapi-spec-validator accepts the document as OpenAPI 3.1."""
    doc = document()
    assert doc["openapi"].startswith("3.1.")
    validate(doc)


def test_security_follows_the_scopes_of_routes():
    """Public routes need no token and pass the browser guards; every other route names its
    scope, and can answer 401, 403 and 421 (and 415 if its method may carry a body)."""
    paths = document()["paths"]
    for method, path, _, scope in ROUTES:
        operation = paths[path][method.lower()]
        responses = operation["responses"]
        if scope == "public":
            assert operation["security"] == [], path
            assert not {"401", "403", "415", "421"} & set(responses), path
            continue
        wanted = [] if scope == "authenticated" else [scope]
        assert operation["security"] == [{"bearer": wanted}], (method, path)
        assert {"401", "403", "421"} <= set(responses), (method, path)
        assert ("415" in responses) == (method != "GET"), (method, path)


def test_every_operation_has_an_id_summary_and_responses():
    """Each operation has a unique operationId (its handler's name), a summary and responses."""
    operations = [
        op for item in document()["paths"].values() for m, op in item.items() if m in METHODS
    ]
    ids = [op["operationId"] for op in operations]
    assert len(ids) == len(set(ids))
    for operation in operations:
        assert operation["summary"] and operation["responses"], operation["operationId"]


def _constraints(schema: dict[str, Any]) -> dict[str, Any]:
    """A property's validation keywords, ignoring the ``null`` msgspec allows for optionals."""
    if "anyOf" in schema:
        (schema,) = [s for s in schema["anyOf"] if s != {"type": "null"}]
    if "$ref" in schema:
        schema = document()["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    out = {k: schema[k] for k in CONSTRAINTS if k in schema}
    if isinstance(out.get("type"), list):  # the document spells nullable as ["string", "null"]
        out["type"] = next(t for t in out["type"] if t != "null")
    if "enum" in out:
        out["enum"] = sorted(out["enum"])
    if "pattern" in out:  # msgspec's Python pattern, written in JSON Schema's dialect
        out["pattern"] = ecma(out["pattern"])
    return out


REQUESTS = [(JobSpec, "JobSpec"), (GroupMemberSpec, "GroupMemberSpec"), (GroupSpec, "GroupSpec")]


@pytest.mark.parametrize(
    ("struct", "name"), [*REQUESTS, (StepSpec, "Step"), (StepSecrets, "StepSecrets")]
)
def test_request_schemas_carry_msgspecs_constraints(struct: type, name: str):
    """Each request schema is closed, has the struct's fields and at least msgspec's checks."""
    ours = document()["components"]["schemas"][name]
    _, defs = msgspec.json.schema_components([struct])
    theirs = defs[struct.__name__]
    assert ours["additionalProperties"] is False
    assert set(ours["properties"]) == set(theirs["properties"])
    assert set(ours["required"]) >= set(theirs.get("required", []))
    for field, schema in theirs["properties"].items():
        mine = _constraints(ours["properties"][field])
        for keyword, value in _constraints(schema).items():
            if (name, field, keyword) in IN_PROSE:
                continue
            assert mine.get(keyword) == value, (name, field, keyword)


def test_job_schema_has_the_fields_of_the_job_json():
    """The Job schema lists exactly job_dict's keys, all required but ``deduplicated``."""
    now = datetime.now(UTC)
    job = Job(id="0" * 32, queue="q", handler="h", state=State.QUEUED, created_at=now, ready_at=now)
    keys = set(job_dict(msgspec.structs.replace(job, deduplicated=True)))
    schema = document()["components"]["schemas"]["Job"]
    assert set(schema["properties"]) == keys
    assert set(schema["required"]) == keys - {"deduplicated"}


def test_state_enums_are_the_models():
    """The job and step state enums list the values of State and StepPhase."""
    schemas = document()["components"]["schemas"]
    assert schemas["State"]["enum"] == [s.value for s in State]
    assert schemas["StepState"]["properties"]["state"]["enum"] == [p.value for p in StepPhase]


@pytest.fixture
async def client() -> AsyncIterator[TestClient[Any, Any]]:
    """An HTTP client on an in-process app with the memory backends."""
    config = Config.from_dict({"queue": {"backend": "memory"}, "results": {"backend": "memory"}})
    app = arqd.App(config)
    async with app, TestClient(TestServer(make_app(app), host="127.0.0.1")) as http:
        yield http


async def test_the_document_is_served(client: TestClient[Any, Any]):
    """``GET /v1/openapi.json`` answers the document as JSON."""
    resp = await client.get("/v1/openapi.json")
    assert resp.status == 200
    assert resp.content_type == "application/json"
    assert await resp.json() == document()
