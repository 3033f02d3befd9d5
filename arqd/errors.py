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
    ├── StepFailed             a step failed its multi-step job    error.type StepFailed
    │   ├── HostNotAllowed     the allow-list refused the host     error.type HostNotAllowed
    │   └── RedirectRefused    a redirect would resend secrets     error.type RedirectRefused
    └── CredentialsUnreadable  no key of this daemon opens a job's sealed step data

Handlers raise ``Fail`` to fail a job at once, or ``Retry`` to ask for another attempt later.
The step errors end a job (their class name becomes ``error.type``); they are never an answer
to a request, so their ``status`` is no HTTP status a client sees.
"""

from __future__ import annotations

from typing import ClassVar


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
    """A step of a multi-step HTTP job failed the job: an unexpected status, or its attempts
    ran out. ``response_status`` is the last response's status, if there was one (``status``
    stays the HTTP status of the error class, as for every ``ArqdError``); ``attempts`` counts
    the step's attempts. The message names the step and never holds a secret."""

    code = "step_failed"
    type: ClassVar[str] = "StepFailed"  # error.type of the failed job: the class's name

    def __init__(
        self, step: str, message: str, *, response_status: int | None = None, attempts: int = 0
    ) -> None:
        super().__init__(message)
        self.step = step
        self.response_status = response_status
        self.attempts = attempts


class HostNotAllowed(StepFailed):
    """A step's host (or a redirect's) is refused by ``http_steps.allow_hosts``, or resolves to
    a non-public address without being listed."""

    type = "HostNotAllowed"


class RedirectRefused(StepFailed):
    """A redirect to another origin would resend a body holding a secret: not followed."""

    type = "RedirectRefused"


class CredentialsUnreadable(ArqdError):
    """A job's sealed step data (steps, credentials) opens with no key of this daemon (the key
    changed, or the record is damaged)."""

    code = "credentials_unreadable"


class Fail(Exception):
    """Raised by a handler: fail the job now, without further attempts."""


class Retry(Exception):
    """Raised by a handler: this attempt failed, try again after ``delay`` seconds."""

    def __init__(self, message: str = "retry requested", *, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay
