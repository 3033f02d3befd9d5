"""The exceptions arqd raises, and the two that handlers raise.

    ArqdError
    ├── JobNotFound            no such job (or not yours)          HTTP 404 not_found
    ├── InvalidRequest         the request breaks the contract     HTTP 422 invalid_request
    │   ├── UnknownHandler     no handler of that name             HTTP 422 unknown_handler
    │   ├── UnknownGroup       no group of that name               HTTP 422 unknown_group
    │   └── Unstorable         a value the storage cannot hold     HTTP 422 invalid_request
    ├── ResultUnavailable      the job has no result to give
    │   ├── NotReady           not finished yet                    HTTP 409 not_ready
    │   ├── JobFailed          finished as failed                  HTTP 409 job_failed
    │   ├── JobCancelled       finished as cancelled               HTTP 409 job_cancelled
    │   └── ResultExpired      the cache dropped it                HTTP 410 expired
    ├── ConfigError            a config file that does not validate
    ├── BackendError           a storage backend failed (driver errors become this)
    │   └── BackendUnavailable cannot be reached right now         HTTP 503 unavailable
    ├── StepFailed             a step of a multi-step job failed it (the job's error)
    └── CredentialsUnreadable  sealed step data no key of this daemon opens (the job's error)

Handlers raise ``Fail`` to fail a job at once, or ``Retry`` to ask for another attempt later.
"""

from __future__ import annotations


class ArqdError(Exception):
    """Root of every error arqd raises on purpose."""

    code = "error"
    status = 500


class JobNotFound(ArqdError):
    code, status = "not_found", 404


class InvalidRequest(ArqdError):
    code, status = "invalid_request", 422


class UnknownHandler(InvalidRequest):
    code = "unknown_handler"


class UnknownGroup(InvalidRequest):
    code = "unknown_group"


class Unstorable(InvalidRequest):
    """A submitted value the queue backend cannot hold (a time out of range, a payload that is
    not JSON, an item too large for DynamoDB). Raised before anything of the request is stored."""


class ResultUnavailable(ArqdError):
    code, status = "conflict", 409


class NotReady(ResultUnavailable):
    code = "not_ready"


class JobFailed(ResultUnavailable):
    code = "job_failed"


class JobCancelled(ResultUnavailable):
    code = "job_cancelled"


class ResultExpired(ResultUnavailable):
    code, status = "expired", 410


class ConfigError(ArqdError):
    code, status = "invalid_config", 500


class BackendError(ArqdError):
    code, status = "backend_error", 503


class BackendUnavailable(BackendError):
    code, status = "unavailable", 503


class StepFailed(ArqdError):
    """A step failed a multi-step job: ``type`` is ``"StepFailed"`` (an unexpected status, or
    attempts exhausted) or ``"HostNotAllowed"``; ``status`` is the last response's, if any."""

    code = "step_failed"
    # The step's last HTTP response, not an answer's status: a StepFailed never reaches one.
    status: int | None  # type: ignore[assignment]

    def __init__(
        self,
        step: str,
        message: str,
        *,
        status: int | None = None,
        type: str = "StepFailed",
        attempts: int = 0,
    ) -> None:
        super().__init__(message)
        self.step = step
        self.status = status
        self.type = type
        self.attempts = attempts


class CredentialsUnreadable(ArqdError):
    """Stored step credentials cannot be decrypted (the key changed, or the record is damaged)."""

    code, status = "credentials_unreadable", 500


class Fail(Exception):
    """Raised by a handler: fail the job now, without further attempts."""


class Retry(Exception):
    """Raised by a handler: this attempt failed, try again after ``delay`` seconds."""

    def __init__(self, message: str = "retry requested", *, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay
