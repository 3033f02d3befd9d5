"""The job's JSON form (API.md section 1), shared by the server and ``arqd.HttpClient``, and the
error body and error classes each ``error.code`` maps to."""

from __future__ import annotations

from typing import Any

import msgspec

from arqd import errors
from arqd.core import SEALED, STEPS_HANDLER, public_key
from arqd.model import DROPPED, Job, ResultRef

_encode = msgspec.json.Encoder().encode


def job_dict(job: Job) -> dict[str, Any]:
    """The public view of a job: no lease token, owner, version or storage names."""
    out: dict[str, Any] = {
        "id": job.id,
        "queue": job.queue,
        "handler": job.handler,
        "state": job.state,
        "payload": _shown_payload(job),
        "key": public_key(job),
        "sticky": job.sticky,
        "meta": job.meta,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "timeout": job.timeout,
        "created_at": job.created_at,
        "ready_at": job.ready_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "expires_at": job.expires_at,
        "progress": job.progress,
        "error": job.error,
        "result": result_dict(job.result),
        "steps": job.steps,
        "group_id": job.group_id,
        "name": job.name,
        "cancel_requested": job.cancel_requested,
        "links": job.links,
    }
    if job.deduplicated:
        out["deduplicated"] = True
    return out


def _shown_payload(job: Job) -> Any:
    """A multi-step job's payload without its sealed secrets (they are encrypted anyway)."""
    if job.handler == STEPS_HANDLER and isinstance(job.payload, dict):
        return {k: v for k, v in job.payload.items() if k != SEALED}
    return job.payload


def result_dict(ref: ResultRef | None) -> dict[str, Any] | None:
    if ref is None or ref.area == DROPPED:  # a purged result: reading it answers 410
        return None
    if ref.is_inline:
        return {"inline": ref.inline}
    return {"size": ref.size, "content_type": ref.content_type}


def encode(value: Any) -> bytes:
    return _encode(value)


_job_decoder = msgspec.json.Decoder(Job)


def job_from_dict(data: dict[str, Any]) -> Job:
    """The inverse of ``job_dict``, for the HTTP client: same ``arqd.Job`` as in-process."""
    fields = {k: v for k, v in data.items() if k != "links"}
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
