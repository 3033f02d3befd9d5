"""``GET /v1/openapi.json``: the OpenAPI 3.1 document of the HTTP API (docs/http-api.md).

The document is built from small helpers rather than written as one literal:

- ``schemas()`` holds every shared JSON Schema (``components/schemas``) in one place. Request
  schemas mirror msgspec's validation of ``JobSpec``, ``GroupSpec`` and ``StepSpec`` (closed
  objects, patterns, ranges); ``tests/test_openapi.py`` compares them with msgspec's own schema.
  Response schemas are closed too, so a field added to the Job JSON without documenting it fails
  the schemathesis run (``tests/test_openapi_fuzz.py``).
- ``OPERATIONS`` describes each route of ``arqd.http.server.ROUTES``: parameters, body and every
  status its handler answers. The security requirement of each operation is not written there but
  taken from the route's scope in ``ROUTES``, so the document and the auth middleware cannot
  disagree; the errors of the auth and browser guards (401, 403, 421, and 415 for methods that
  may carry a body) are added to every route but the public ones the same way.
- Patterns are written in JSON Schema's dialect: the model's ``\\Z`` (the true end of the
  string; Python's ``$`` also matches before a final newline) becomes ``$`` (``ecma()``).

The document describes the API as it always is: with no tokens configured (loopback only, or
``server.allow_anonymous``) requests need no ``Authorization`` header and never get 401/403.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import cache
from typing import Any

from aiohttp import web

from arqd import __version__
from arqd.http.wire import encode
from arqd.model import (
    AHEAD_MAX,
    BATCH_MAX,
    GROUP_MAX,
    JOB_ID_RE,
    LIST_MAX,
    NAME_PATTERN,
    TEXT_PATTERN,
    WAIT_MAX,
)

Schema = dict[str, Any]

# --- JSON Schema building blocks ------------------------------------------------------------------


def ecma(pattern: str) -> str:
    """A Python pattern anchored at the true end (``\\Z``) in JSON Schema's (ECMA-262) dialect,
    where ``$`` is the true end and ``\\Z`` is not an anchor."""
    return pattern.removesuffix(r"\Z") + "$" if pattern.endswith(r"\Z") else pattern


NAME = ecma(NAME_PATTERN)  # queue, group member and step names
TEXT = ecma(TEXT_PATTERN)  # handler names and keys: no control characters
HOST = r"([A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?|\[[0-9A-Fa-f:.]+\])"
URL = rf"^https?://{HOST}(:[0-9]{{1,5}})?([/?#]\S*)?$"  # steps._check_url
STATES = ["queued", "running", "succeeded", "failed", "cancelled"]  # model.State
STEP_STATES = ["pending", "running", "succeeded", "failed"]  # steps.StepPhase
MAX_WAIT = int(WAIT_MAX)  # a whole number in the document
MARKS_MAX = 64  # steps.StepSecrets: names per list


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def string(description: str | None = None, **constraints: Any) -> Schema:
    return _described({"type": "string", **constraints}, description)


def integer(description: str | None = None, **constraints: Any) -> Schema:
    return _described({"type": "integer", **constraints}, description)


def number(description: str | None = None, **constraints: Any) -> Schema:
    return _described({"type": "number", **constraints}, description)


def boolean(description: str | None = None) -> Schema:
    return _described({"type": "boolean"}, description)


def any_json(description: str) -> Schema:
    return {"description": description}


def datetime(description: str | None = None) -> Schema:
    return string(description, format="date-time")


def nullable(schema: Schema) -> Schema:
    """``schema`` or ``null`` (msgspec accepts ``null`` for every optional spec field)."""
    if isinstance(schema.get("type"), str):
        return {**schema, "type": [schema["type"], "null"]}
    description = schema.get("description")
    inner = {k: v for k, v in schema.items() if k != "description"}
    return _described({"anyOf": [inner, {"type": "null"}]}, description)


def array(items: Schema, description: str | None = None, **constraints: Any) -> Schema:
    return _described({"type": "array", "items": items, **constraints}, description)


def obj(
    properties: dict[str, Schema],
    *,
    optional: Iterable[str] = (),
    description: str | None = None,
    **extra: Any,
) -> Schema:
    """A closed object: every property is required except those named in ``optional``."""
    loose = set(optional)
    schema: Schema = {
        "type": "object",
        "properties": properties,
        "required": [name for name in properties if name not in loose],
        "additionalProperties": False,
        **extra,
    }
    return _described(schema, description)


def _described(schema: Schema, description: str | None) -> Schema:
    return {"description": description, **schema} if description else schema


# --- the shared schemas ---------------------------------------------------------------------------


def _job_spec_properties() -> dict[str, Schema]:
    """The fields of a job spec (docs/jobs.md), as msgspec validates them."""
    return {
        "handler": string(
            "A registered handler's name; required unless `steps`.", maxLength=256, pattern=TEXT
        ),
        "steps": array(ref("Step"), "A multi-step HTTP job (docs/jobs.md).", minItems=1),
        "payload": any_json("Passed to the handler; must be absent or null with `steps`."),
        "queue": nullable(string("Default: the handler's queue, else `default`.", pattern=NAME)),
        "key": nullable(
            string(
                "Dedupe/cache key; the `schedule:` prefix is reserved.",
                minLength=1,
                maxLength=256,
                pattern=TEXT,
                **{"not": {"type": "string", "pattern": "^schedule:"}},
            )
        ),
        "sticky": boolean("The result goes to the persistent cache area."),
        "delay": nullable(
            number("Seconds from now; excludes `run_at`.", minimum=0, maximum=AHEAD_MAX)
        ),
        "run_at": nullable(
            datetime(
                "RFC 3339 time with a UTC offset, at most 366 days ahead; excludes `delay`. A "
                "past time means at once."
            )
        ),
        "max_attempts": nullable(integer(minimum=1, maximum=100)),
        "timeout": nullable(
            number("One attempt's limit in seconds.", exclusiveMinimum=0, maximum=AHEAD_MAX)
        ),
        "meta": nullable(
            {"type": "object", "description": "Free-form labels, at most 4096 bytes of JSON."}
        ),
        "credentials": nullable(ref("Credentials")),
    }


def job_spec(extra: dict[str, Schema] | None = None, description: str = "") -> Schema:
    """A job spec (plus ``extra`` fields): exactly one of ``handler`` and ``steps``."""
    properties = {**_job_spec_properties(), **(extra or {})}
    return obj(
        properties,
        optional=properties,
        description=description + " Unknown fields are rejected (422).",
        oneOf=[{"required": ["handler"]}, {"required": ["steps"]}],
        dependentRequired={"credentials": ["steps"]},
        dependentSchemas={"steps": {"properties": {"payload": {"type": "null"}}}},
    )


def _step() -> Schema:
    properties: dict[str, Schema] = {
        "name": string("Unique within the job.", pattern=NAME),
        "url": string(
            "An absolute http(s) URL without credentials (IDN hosts punycoded), at most 8192 "
            "characters (not a `maxLength`: with this pattern it makes generators crawl).",
            pattern=URL,
        ),
        "method": {"enum": ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"]},
        "headers": {
            "type": "object",
            "description": "Header names as RFC 9110 tokens; framing headers are arqd's.",
            "propertyNames": {"pattern": r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$"},
            "additionalProperties": {"type": "string"},
        },
        "body": any_json("Sent JSON-encoded; absent or null: no body."),
        "expect": nullable(
            array(
                integer(minimum=100, maximum=599),
                "Expected statuses; default any 2xx.",
                minItems=1,
            )
        ),
        "timeout": number("Seconds; default 30.", exclusiveMinimum=0),
        "max_attempts": integer("Default 5.", minimum=1, maximum=100),
        "retry_exponent": number("Retry delay is `retry_exponent ** attempt`.", minimum=1),
        "secret": ref("StepSecrets"),
    }
    return obj(
        properties,
        optional=set(properties) - {"name", "url"},
        description="One HTTP request of a multi-step job.",
    )


def _step_secrets() -> Schema:
    names = r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$"
    return obj(
        {
            "headers": array(
                string(pattern=names), "Header names, in any case.", maxItems=MARKS_MAX
            ),
            "query": array(
                string(maxLength=1024),
                "Query parameter names (case-sensitive).",
                maxItems=MARKS_MAX,
            ),
            "body": array(
                string(maxLength=1024),
                'JSON pointers (RFC 6901) into `body`: `"/card/pin"`, `"/items/0/token"`, `""` '
                "for the whole body.",
                maxItems=MARKS_MAX,
            ),
        },
        optional=["headers", "query", "body"],
        description="Values of the step that are secret, named: sent as given, but stored only "
        'sealed, shown as `"[redacted]"` in the job, scrubbed from the responses kept, never '
        "logged. Each name must name something of the step. Values whose name looks secret "
        "(`Authorization`, `Cookie`, `*token*`, `*password*`, `*api-key*`, `key`, `auth`...) "
        "are treated so without marking. A redirect to another origin carries only `Accept`, "
        "`Accept-Encoding`, `Accept-Language`, `Cache-Control`, `Content-Language`, "
        "`Content-Type` and `User-Agent` (unless marked), and a 307/308 to another origin "
        'whose body holds a secret fails the step (`error.type` `"RedirectRefused"`).',
    )


def _credentials() -> Schema:
    # The 8192-character limit stays in prose: maxLength with these patterns makes generators crawl.
    basic = r"^[^:\x00-\x1f\x7f]+:[^\x00-\x1f\x7f]*$"
    return {
        "type": "object",
        "description": "Sent as `Authorization` on every step; stored only encrypted. The secret "
        "is 1 to 8192 characters without control characters.",
        "oneOf": [
            obj({"basic": string('"user:password"', pattern=basic)}),
            obj(
                {
                    "bearer": string(
                        "A bearer token, without spaces.", pattern=r"^[^ \x00-\x1f\x7f]+$"
                    )
                }
            ),
        ],
    }


def _job() -> Schema:
    maybe_time = nullable(datetime())
    return obj(
        {
            "id": ref("JobId"),
            "queue": string(),
            "handler": string("`arqd.steps` for a multi-step job."),
            "state": ref("State"),
            "payload": any_json("As submitted (a multi-step job's without its secrets)."),
            "key": nullable(string()),
            "sticky": boolean(),
            "meta": {"type": "object"},
            "attempts": integer(minimum=0),
            "max_attempts": integer(minimum=1),
            "timeout": number("One attempt's limit in seconds."),
            "created_at": datetime(),
            "ready_at": datetime(),
            "started_at": maybe_time,
            "finished_at": maybe_time,
            "expires_at": nullable(datetime("When the result expires (temporary area).")),
            "progress": nullable(
                obj(
                    {
                        "fraction": nullable(number()),
                        "message": nullable(string()),
                    }
                )
            ),
            "error": nullable(ref("JobError")),
            "result": nullable(ref("ResultRef")),
            "steps": nullable(array(ref("StepState"))),
            "group_id": nullable(ref("JobId")),
            "name": nullable(string("The job's name within its group.")),
            "cancel_requested": boolean(),
            "links": obj(
                {"self": string(), "result": string(), "events": string()},
            ),
            "deduplicated": {
                "const": True,
                "description": "Only on a submit answered with an existing job.",
            },
        },
        optional=["deduplicated"],
        description="A job as arqd returns it (docs/jobs.md).",
    )


def _group_status(extra: dict[str, Schema] | None = None, description: str = "") -> Schema:
    return obj(
        {
            "id": ref("JobId"),
            "name": string(),
            "state": {
                "enum": ["running", "succeeded", "failed"],
                "description": "Running until every job is terminal; then succeeded if all did.",
            },
            "counts": obj({state: integer(minimum=0) for state in STATES}),
            "progress": number("Mean of the jobs' progress (terminal: 1).", minimum=0, maximum=1),
            "jobs": array(ref("Job")),
            **(extra or {}),
        },
        description=description or None,
    )


def _schedule() -> Schema:
    return obj(
        {
            "name": string(),
            "cron": nullable(string()),
            "every": nullable(number("Interval in seconds.")),
            "handler": string(),
            "timezone": string(),
            "last_run": nullable(datetime()),
            "next_run": datetime(),
        }
    )


def _queue_stats() -> Schema:
    count = integer(minimum=0)
    return obj(
        {
            "name": string(),
            **{state: count for state in STATES},
            "oldest_queued_seconds": nullable(number()),
        }
    )


def _worker() -> Schema:
    return obj(
        {
            "id": string(),
            "host": string(),
            "started_at": datetime(),
            "last_seen": datetime(),
            "running": integer(minimum=0),
            "concurrency": integer(minimum=0),
        }
    )


def schemas() -> dict[str, Schema]:
    """``components/schemas``: every shared schema, requests first."""
    group_job = obj({"id": ref("JobId"), "name": string(), "status_url": string()})
    member_name = nullable(string("Default: `job<n>`; unique in the group.", pattern=NAME))
    return {
        # requests
        "JobSpec": job_spec(description="A job as a client submits it."),
        "Step": _step(),
        "StepSecrets": _step_secrets(),
        "Credentials": _credentials(),
        "BatchSpec": obj(
            {"jobs": array(ref("JobSpec"), minItems=1, maxItems=BATCH_MAX)},
            description="All or nothing: one invalid spec rejects the batch.",
        ),
        "GroupMemberSpec": job_spec({"name": member_name}, "A job of an ad-hoc group."),
        "GroupSpec": obj(
            {
                "name": nullable(string("Default: `group`.", pattern=NAME)),
                "jobs": array(ref("GroupMemberSpec"), minItems=1, maxItems=GROUP_MAX),
            },
            optional=["name"],
        ),
        # responses
        "JobId": string("Time-ordered, unique across hosts.", pattern=ecma(JOB_ID_RE.pattern)),
        "State": {"enum": STATES, "description": "Terminal: succeeded, failed, cancelled."},
        "JobError": obj(
            {
                "type": string("The exception's type, e.g. `TimeoutError`, `HostNotAllowed`."),
                "message": string(),
                "attempt": integer(minimum=0),
                "step": string("The step that failed a multi-step job."),
                "status": integer("The failing step's response status, if any."),
            },
            optional=["step", "status"],
        ),
        "ResultRef": {
            "description": "Inline JSON up to `results.inline_max`, else a blob at `links.result`.",
            "oneOf": [
                obj({"inline": any_json("The handler's JSON result.")}),
                obj({"size": integer(minimum=0), "content_type": nullable(string())}),
            ],
        },
        "StepState": obj(
            {
                "name": string(),
                "state": {"enum": STEP_STATES},
                "status": integer("The last response's status."),
                "attempts": integer(minimum=0),
            },
            optional=["status", "attempts"],
        ),
        "Job": _job(),
        "JobList": obj(
            {
                "jobs": array(ref("Job"), "Newest first."),
                "next": nullable(string("Pass as `cursor` for the next page.")),
            }
        ),
        "Batch": obj({"jobs": array(ref("Job"), "In the order of the specs.")}),
        "Group": obj(
            {"group": obj({"id": ref("JobId"), "name": string(), "jobs": array(group_job)})},
            description="A group just submitted.",
        ),
        "GroupStatus": _group_status(),
        "GroupCancelled": _group_status(
            {"cancelled": integer("Jobs that were not terminal.", minimum=0)},
            "The group after cancelling every job that was not terminal.",
        ),
        "Queues": obj({"queues": array(_queue_stats())}),
        "Requeued": obj({"requeued": integer(minimum=0)}),
        "Purged": obj({"purged": integer(minimum=0)}),
        "Schedules": obj({"schedules": array(_schedule())}),
        "Workers": obj({"workers": array(_worker(), "Seen in the last 15 s.")}),
        "Status": obj({"status": {"enum": ["ok", "ready"]}}),
        "Error": obj(
            {
                "error": obj(
                    {
                        "code": string("snake_case, stable.", pattern="^[a-z][a-z0-9_]*$"),
                        "message": string("A human sentence; never a traceback or a secret."),
                    }
                )
            },
            description="Every error, with a truthful status.",
        ),
    }


# --- parameters, bodies, responses ----------------------------------------------------------------


def path_param(name: str, schema: Schema, description: str) -> Schema:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": schema,
    }


def query_param(name: str, schema: Schema, description: str, required: bool = False) -> Schema:
    return {
        "name": name,
        "in": "query",
        "required": required,
        "description": description,
        "schema": schema,
    }


def header_param(name: str, schema: Schema, description: str) -> Schema:
    return {"name": name, "in": "header", "description": description, "schema": schema}


JOB_ID = path_param("id", ref("JobId"), "A job id; anything else is a 404.")
GROUP_ID = path_param("id", ref("JobId"), "A group id (as given by the submit); else a 404.")


def json_body(schema: Schema, description: str, **examples: Any) -> Schema:
    media: Schema = {"schema": schema}
    if examples:
        media["examples"] = {name: {"value": value} for name, value in examples.items()}
    return {"required": True, "description": description, "content": {"application/json": media}}


EXAMPLE_JOB = {"handler": "echo", "payload": {"url": "https://example.com/a.png"}, "key": "a.png"}
EXAMPLE_STEPS_JOB = {
    "steps": [
        {
            "name": "reserve",
            "method": "PUT",
            "url": "https://api.example.com/reservations",
            "headers": {"X-Partner-Id": "p-8812"},
            "body": {"sku": "a1", "card": {"number": "4111111111111111"}},
            "secret": {"headers": ["X-Partner-Id"], "body": ["/card/number"]},
            "expect": [200, 201],
        },
        {"name": "confirm", "method": "POST", "url": "https://api.example.com/confirmations"},
    ],
    "credentials": {"bearer": "secret-token"},
}


def header(description: str, schema: Schema | None = None) -> Schema:
    return {"description": description, "schema": schema or string(), "required": True}


ETAG = header('`"<last 12 id digits>-<version>"`; changes with every observable change.')


def response(
    description: str,
    schema: Schema | None = None,
    *,
    headers: dict[str, Schema] | None = None,
    content: dict[str, Schema] | None = None,
) -> Schema:
    """A response; ``schema`` is JSON, ``content`` any other media types."""
    out: Schema = {"description": description}
    if schema is not None:
        out["content"] = {"application/json": {"schema": schema}}
    if content is not None:
        out["content"] = {**out.get("content", {}), **content}
    if headers:
        out["headers"] = headers
    return out


def job_answer(description: str, **headers: Schema) -> Schema:
    return response(description, ref("Job"), headers={"ETag": ETAG, **headers})


def error(description: str, *codes: str, headers: dict[str, Schema] | None = None) -> Schema:
    """An error response whose ``error.code`` is one of ``codes``."""
    listed = ", ".join(f"`{c}`" for c in codes)
    schema = {
        "allOf": [
            ref("Error"),
            {"properties": {"error": {"properties": {"code": {"enum": list(codes)}}}}},
        ]
    }
    return response(f"{description} ({listed})", schema, headers=headers)


def common(name: str) -> Schema:
    return {"$ref": f"#/components/responses/{name}"}


def common_responses() -> dict[str, Schema]:
    """``components/responses``: errors many operations share."""
    return {
        "Unauthorized": error(
            "Tokens are configured and the request has no valid bearer token",
            "unauthorized",
            headers={"WWW-Authenticate": header('`Bearer realm="arqd"`')},
        ),
        "Forbidden": error(
            "The token lacks the scope this route needs, or the request comes from another "
            "site's page (`Origin` not this daemon's, `Origin: null`, `Sec-Fetch-Site: "
            "cross-site`)",
            "forbidden",
        ),
        "Misdirected": error(
            "No valid token, and `Host` names neither the listen address, `localhost`, an IP "
            "address nor a name of `server.allowed_hosts` (DNS rebinding)",
            "misdirected_request",
        ),
        "UnsupportedMediaType": error(
            "The body (or, on routes that read one, the request) is not declared "
            "`application/json`",
            "unsupported_media_type",
        ),
        "NotFound": error("No such job or group, or not this token's", "not_found"),
        "InvalidJson": error("The body is not valid JSON", "invalid_json"),
        "TooLarge": error("The body is larger than `server.max_body`", "too_large"),
        "InvalidQuery": error(
            "An invalid or unknown query parameter (every unknown one is refused)",
            "invalid_request",
        ),
        "InvalidSpec": error(
            "The body breaks the contract (shape, ranges, unknown fields), or names a handler "
            "that is not registered",
            "invalid_request",
            "unknown_handler",
        ),
        "Unavailable": error("The queue backend or result store is unavailable", "unavailable"),
        "Busy": error(
            "`server.max_held` long-polls and event streams are open already",
            "rate_limited",
            headers={"Retry-After": header("Seconds to wait before trying again.")},
        ),
    }


# --- the operations -------------------------------------------------------------------------------

Operation = dict[str, Any]


def op(
    tag: str,
    summary: str,
    responses: dict[int, Schema],
    *,
    description: str | None = None,
    parameters: Iterable[Schema] = (),
    body: Schema | None = None,
    backend: bool = True,
) -> Operation:
    """One operation; ``backend`` routes may answer 503 when the backend fails."""
    if backend:
        responses = {**responses, 503: common("Unavailable")}
    out: Operation = {"tags": [tag], "summary": summary}
    if description:
        out["description"] = description
    if parameters:
        out["parameters"] = list(parameters)
    if body is not None:
        out["requestBody"] = body
    out["responses"] = {str(status): responses[status] for status in sorted(responses)}
    return out


def submit() -> Operation:
    return op(
        "jobs",
        "Submit a job",
        {
            200: job_answer(
                "The key matched a live job or cached result: that job, `deduplicated: true`"
            ),
            202: job_answer("Stored and queued", Location=header("The job's URL (`links.self`).")),
            400: common("InvalidJson"),
            413: common("TooLarge"),
            422: common("InvalidSpec"),
        },
        body=json_body(
            ref("JobSpec"), "The job spec.", handler=EXAMPLE_JOB, steps=EXAMPLE_STEPS_JOB
        ),
    )


def submit_batch() -> Operation:
    return op(
        "jobs",
        "Submit up to 1000 jobs at once",
        {
            202: response("Every job (dedupe hits with `deduplicated: true`)", ref("Batch")),
            400: common("InvalidJson"),
            413: common("TooLarge"),
            422: common("InvalidSpec"),
        },
        description="All or nothing: one invalid spec rejects the whole batch.",
        body=json_body(
            ref("BatchSpec"),
            '`{"jobs": [spec, ...]}`, 1 to 1000 specs.',
            batch={"jobs": [EXAMPLE_JOB, {"handler": "echo", "payload": 2, "delay": 60}]},
        ),
    )


def list_jobs() -> Operation:
    return op(
        "jobs",
        "List jobs, newest first",
        {200: response("A page of jobs", ref("JobList")), 422: common("InvalidQuery")},
        description="A token without `admin` lists only its own jobs.",
        parameters=[
            query_param("queue", string(pattern=NAME), "Only jobs of this queue."),
            query_param("state", ref("State"), "Only jobs in this state."),
            query_param(
                "handler", string(maxLength=256, pattern=TEXT), "Only jobs of this handler."
            ),
            query_param("group_id", ref("JobId"), "Only jobs of this group."),
            query_param("limit", integer(minimum=1, maximum=LIST_MAX, default=100), "Page size."),
            query_param(
                "cursor", ref("JobId"), "`next` of the previous page: jobs older than that."
            ),
        ],
    )


def get_job() -> Operation:
    return op(
        "jobs",
        "Read a job",
        {
            200: job_answer("The job"),
            304: response("The job's ETag matches `If-None-Match`", headers={"ETag": ETAG}),
            404: common("NotFound"),
            422: common("InvalidQuery"),
            429: common("Busy"),
        },
        description=(
            "A job read in the last second is answered from memory. `?wait=S` holds the "
            "request until the job changes (with `If-None-Match`: until its ETag differs) or "
            "S seconds pass, then answers as without `wait`; a terminal job is held too (until "
            "S pass, or it is deleted or expires: 404), so a client long-polling in a loop never "
            "spins. A long-poll (`wait` > 0) is refused with 429 while `server.max_held` "
            "requests are held."
        ),
        parameters=[
            JOB_ID,
            query_param(
                "wait", number(minimum=0, maximum=MAX_WAIT), "Long-poll up to this many seconds."
            ),
            header_param("If-None-Match", string(), "ETags (comma-separated); a match is 304."),
        ],
    )


def delete_job() -> Operation:
    return op(
        "jobs",
        "Cancel a live job, or delete a terminal one",
        {
            200: job_answer("A queued job, now cancelled"),
            202: job_answer("A running job, now `cancel_requested`"),
            204: response("A terminal job: its record and result are deleted"),
            404: common("NotFound"),
        },
        parameters=[JOB_ID],
    )


def cancel_job() -> Operation:
    return op(
        "jobs",
        "Cancel a job (never deletes)",
        {
            200: job_answer("Cancelled, or already terminal (unchanged)"),
            202: job_answer("Running: `cancel_requested`, the handler is being cancelled"),
            404: common("NotFound"),
        },
        description="Cancels and never deletes: `DELETE` would delete a job that just finished.",
        parameters=[JOB_ID],
    )


def get_result() -> Operation:
    return op(
        "jobs",
        "Read a succeeded job's result",
        {
            200: response(
                "The whole result: JSON as `application/json`, a blob with its stored type",
                any_json("The JSON result."),
                content={"application/octet-stream": {}, "*/*": {}},
                headers={
                    "ETag": ETAG,
                    "Accept-Ranges": header("`bytes`"),
                    "Content-Length": header("The size in bytes.", integer(minimum=0)),
                },
            ),
            206: response(
                "The requested range of the result's bytes, in the result's content type",
                content={"*/*": {}},
                headers={
                    "ETag": ETAG,
                    "Content-Range": header(
                        "`bytes a-b/size`", string(pattern=r"^bytes \d+-\d+/\d+$")
                    ),
                    "Content-Length": header("The range's size in bytes.", integer(minimum=0)),
                },
            ),
            304: response(
                "The job's ETag matches `If-None-Match`: the copy the client holds is current",
                headers={"ETag": ETAG},
            ),
            404: common("NotFound"),
            409: error("The job has no result", "not_ready", "job_failed", "job_cancelled"),
            410: error("The result expired or was purged from the cache", "expired"),
            416: error(
                "The range is malformed or outside the result",
                "range_not_satisfiable",
                headers={"Content-Range": header("`bytes */size`")},
            ),
        },
        description=(
            "Streamed; one range (`bytes=a-b`, `bytes=a-`, `bytes=-n`) answers 206. A result "
            "never changes, so a client holding it revalidates with `If-None-Match` (304)."
        ),
        parameters=[
            JOB_ID,
            header_param("Range", string(pattern=r"^bytes=\d*-\d*$"), "One byte range."),
            header_param("If-None-Match", string(), "ETags (comma-separated); a match is 304."),
        ],
    )


def job_events() -> Operation:
    event = {
        "type": "object",
        "description": "One event; `data` is the Job JSON.",
        "properties": {
            "event": {"enum": ["state", "progress"]},
            "data": {
                "type": "string",
                "contentMediaType": "application/json",
                "contentSchema": ref("Job"),
            },
        },
        "required": ["event", "data"],
    }
    return op(
        "jobs",
        "Follow a job as server-sent events",
        {
            200: response(
                "`event: state` with the current job first, then `state` and `progress` events "
                "as they happen; a comment line every 15 s; closes after the terminal state",
                content={"text/event-stream": {"schema": event}},
            ),
            404: common("NotFound"),
            429: common("Busy"),
        },
        parameters=[JOB_ID],
    )


def submit_group() -> Operation:
    return op(
        "groups",
        "Submit an ad-hoc group",
        {
            202: response("The group and its jobs", ref("Group")),
            400: common("InvalidJson"),
            413: common("TooLarge"),
            422: common("InvalidSpec"),
        },
        body=json_body(
            ref("GroupSpec"),
            "1 to 1000 job specs, each with an optional `name`.",
            group={
                "name": "reports",
                "jobs": [
                    {"name": "sales", "handler": "echo", "payload": {"kind": "sales"}},
                    {"name": "stock", "handler": "echo", "payload": {"kind": "stock"}},
                ],
            },
        ),
    )


def trigger_group() -> Operation:
    return op(
        "groups",
        "Trigger a group defined in the config",
        {
            202: response("The group and its jobs", ref("Group")),
            422: error(
                "No group of that name, or its jobs do not validate",
                "unknown_group",
                "invalid_request",
                "unknown_handler",
            ),
        },
        description="No body needed.",
        parameters=[path_param("name", string(), "A group of `[groups]` in the config.")],
    )


def configured_group() -> Schema:
    return error(
        "The id is the name of a group of the config, which is triggered by POST",
        "method_not_allowed",
        headers={"Allow": header("`POST`")},
    )


def get_group() -> Operation:
    return op(
        "groups",
        "Read a group's state",
        {
            200: response("The group", ref("GroupStatus")),
            404: common("NotFound"),
            405: configured_group(),
        },
        parameters=[GROUP_ID],
    )


def cancel_group() -> Operation:
    return op(
        "groups",
        "Cancel every job of a group that is not terminal",
        {
            200: response("The group after the cancel", ref("GroupCancelled")),
            404: common("NotFound"),
            405: configured_group(),
        },
        parameters=[GROUP_ID],
    )


def purge_cache() -> Operation:
    return op(
        "operations",
        "Drop every result of a cache area (and their dedupe entries)",
        {
            200: response("How many results were dropped", ref("Purged")),
            422: common("InvalidQuery"),
        },
        description="Their jobs stay; reading such a result answers 410 `expired`.",
        parameters=[
            query_param(
                "area", {"enum": ["temporary", "persistent"]}, "The cache area.", required=True
            )
        ],
    )


def list_schedules() -> Operation:
    return op(
        "operations",
        "List the schedules",
        {200: response("Every configured schedule", ref("Schedules"))},
        backend=False,
    )


def list_queues() -> Operation:
    return op(
        "operations",
        "List queues with their job counts",
        {200: response("Every queue with jobs, and every queue workers consume", ref("Queues"))},
    )


def redrive() -> Operation:
    return op(
        "operations",
        "Requeue a queue's failed jobs",
        {
            200: response(
                "How many failed jobs are queued again (attempts reset)", ref("Requeued")
            ),
            404: error("Not a valid queue name", "not_found"),
        },
        parameters=[path_param("name", string(pattern=NAME), "The queue.")],
    )


def list_workers() -> Operation:
    return op(
        "operations",
        "List live daemons sharing the backend",
        {200: response("Workers seen in the last 15 s", ref("Workers"))},
    )


def metrics() -> Operation:
    return op(
        "operations",
        "Prometheus metrics",
        {
            200: response(
                "Every metric name starts with `arqd_`",
                content={"text/plain": {"schema": string()}},
            )
        },
    )


def openapi_doc() -> Operation:
    return op(
        "meta",
        "This document",
        {200: response("The OpenAPI 3.1 document", {"type": "object", "required": ["openapi"]})},
        backend=False,
    )


def dashboard() -> Operation:
    return op(
        "meta",
        "The dashboard",
        {
            200: response(
                "A self-contained page; it asks for a token and uses this API",
                content={"text/html": {"schema": string()}},
            )
        },
        backend=False,
    )


def healthz() -> Operation:
    return op(
        "meta",
        "Liveness: the process answers",
        {200: response('`{"status": "ok"}`', ref("Status"))},
        backend=False,
    )


def readyz() -> Operation:
    return op(
        "meta",
        "Readiness: the backends answer within 2 s",
        {
            200: response('`{"status": "ready"}`', ref("Status")),
            503: error("A backend did not answer", "unavailable"),
        },
        backend=False,
    )


# Every route of ``arqd.http.server.ROUTES``; tests/test_openapi.py checks the two sets are equal.
OPERATIONS: dict[tuple[str, str], Callable[[], Operation]] = {
    ("POST", "/v1/jobs"): submit,
    ("POST", "/v1/jobs/batch"): submit_batch,
    ("GET", "/v1/jobs"): list_jobs,
    ("GET", "/v1/jobs/{id}"): get_job,
    ("DELETE", "/v1/jobs/{id}"): delete_job,
    ("POST", "/v1/jobs/{id}/cancel"): cancel_job,
    ("GET", "/v1/jobs/{id}/result"): get_result,
    ("GET", "/v1/jobs/{id}/events"): job_events,
    ("POST", "/v1/groups"): submit_group,
    ("POST", "/v1/groups/{name}"): trigger_group,
    ("GET", "/v1/groups/{id}"): get_group,
    ("DELETE", "/v1/groups/{id}"): cancel_group,
    ("DELETE", "/v1/cache"): purge_cache,
    ("GET", "/v1/schedules"): list_schedules,
    ("GET", "/v1/queues"): list_queues,
    ("POST", "/v1/queues/{name}/redrive"): redrive,
    ("GET", "/v1/workers"): list_workers,
    ("GET", "/metrics"): metrics,
    ("GET", "/v1/openapi.json"): openapi_doc,
    ("GET", "/"): dashboard,
    ("GET", "/healthz"): healthz,
    ("GET", "/readyz"): readyz,
}

TAGS = [
    {"name": "jobs", "description": "Submit, read, follow, cancel jobs and read their results."},
    {"name": "groups", "description": "Groups of jobs: from the config or ad hoc."},
    {"name": "operations", "description": "Operator routes (the `admin` scope)."},
    {"name": "meta", "description": "Health, readiness, the dashboard and this document."},
]

DESCRIPTION = """\
The HTTP control API of arqd, an asynchronous request queue daemon.

Errors always have the body `{"error": {"code": "<snake_case>", "message": "<sentence>"}}` and a
truthful status. Unknown fields in a request body and unknown query parameters are refused (422).
Times are RFC 3339 in UTC.

With `[auth]` tokens configured, every route but `/`, `/healthz` and `/readyz` needs
`Authorization: Bearer <secret>`; each operation's security requirement names the scope it needs
(`admin` implies every scope). A token without `admin` sees, cancels and lists only its own jobs:
another token's job is a 404. With no tokens configured, no header is needed.

Browsers are kept out of every route but `/`, `/healthz` and `/readyz`: a request with no valid
token must name the daemon in `Host` (421), an `Origin` must be the daemon's own (403), and a body
must be `application/json` (415)."""


def _secured(operation: Operation, scope: str, method: str) -> Operation:
    """``operation`` with the security requirement of ``scope`` and the errors of the auth and
    browser guards (``arqd/http/guard.py``), which skip public routes."""
    if scope == "public":
        return {**operation, "security": []}
    requirement = [] if scope == "authenticated" else [scope]
    extra = {
        "401": common("Unauthorized"),
        "403": common("Forbidden"),
        "421": common("Misdirected"),
    }
    if method not in ("GET", "HEAD"):
        extra["415"] = common("UnsupportedMediaType")
    responses = dict(sorted({**operation["responses"], **extra}.items()))
    return {**operation, "security": [{"bearer": requirement}], "responses": responses}


@cache
def document() -> dict[str, Any]:
    # Imported here: the server imports this module for its handler, and the scopes are its own.
    from arqd.http.server import ROUTES

    paths: dict[str, dict[str, Operation]] = {}
    for method, path, handler, scope in ROUTES:
        build = OPERATIONS.get((method, path))
        if build is None:
            continue  # undocumented: tests/test_openapi.py fails on it
        operation = {"operationId": handler.__name__, **_secured(build(), scope, method)}
        paths.setdefault(path, {})[method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "arqd",
            "version": __version__,
            "description": DESCRIPTION,
            "license": {"name": "MIT", "identifier": "MIT"},
        },
        "tags": TAGS,
        "paths": paths,
        "components": {
            "schemas": schemas(),
            "responses": common_responses(),
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A token of `[auth] tokens`; scopes `submit`, `read`, "
                    "`cancel`, `admin` (which implies the others and the operator routes).",
                }
            },
        },
    }


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=encode(document()), content_type="application/json")
