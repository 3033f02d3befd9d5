"""The job's JSON form (docs/jobs.md), shared by the server and ``arqd.HttpClient``, and the
error body and error classes each ``error.code`` maps to."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from arqd import errors
from arqd.model import Job as StoredJob
from arqd.model import links_of, version_of
from arqd.view import Job, public_fields

_encode = msgspec.json.Encoder().encode


def job_dict(job: StoredJob | Job) -> dict[str, Any]:
    """The job JSON: the public view (``arqd.view``) of a stored record, or the view itself,
    with its links; ``deduplicated`` only when true; the version only in the ``ETag`` header."""
    out = msgspec.structs.asdict(job) if isinstance(job, Job) else public_fields(job)
    del out["version"]
    deduplicated = out.pop("deduplicated")
    out["links"] = links_of(job.id)
    if deduplicated:
        out["deduplicated"] = True
    return out


def encode(value: Any) -> bytes:
    return _encode(value)


def job_from_dict(data: Mapping[str, Any], etag: str | None = None) -> Job:
    """The inverse of ``job_dict``, for the HTTP client: the same ``arqd.Job`` as in-process,
    its version read from the answer's ``etag`` when there is one."""
    fields = {k: v for k, v in data.items() if k not in ("links", "version")}
    fields["version"] = version_of(etag, str(data.get("id", "")))
    return msgspec.convert(fields, Job, strict=False)


def error_body(code: str, message: str) -> bytes:
    return _encode({"error": {"code": code, "message": message}})


# error.code → the exception the HTTP client raises, the same the in-process client raises
ERRORS: dict[str, type[errors.ArqdError]] = {
    "not_found": errors.JobNotFound,
    "invalid_request": errors.InvalidRequest,
    "unknown_handler": errors.UnknownHandler,
    "unknown_group": errors.UnknownGroup,
    "not_ready": errors.NotReady,
    "job_failed": errors.JobFailed,
    "job_cancelled": errors.JobCancelled,
    "expired": errors.ResultExpired,
    "unavailable": errors.BackendUnavailable,
}
