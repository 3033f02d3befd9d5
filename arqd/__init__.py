"""arqd: an asynchronous request queue daemon.

The public surface is re-exported here; ``tests/test_public_api.py`` pins ``__all__``. Each name
is imported when first used (PEP 562), so ``import arqd.http.client`` (or ``arqd.model``) loads
that module and what it imports, not the core, the pool and every backend; type checkers read
the imports below as usual.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from arqd.api import JobsAPI
    from arqd.app import App
    from arqd.client import Client
    from arqd.config import Config, load_config
    from arqd.errors import (
        ArqdError,
        BackendError,
        BackendUnavailable,
        ConfigError,
        Fail,
        InvalidRequest,
        JobCancelled,
        JobFailed,
        JobNotFound,
        NotReady,
        ResultExpired,
        ResultUnavailable,
        Retry,
        UnknownGroup,
        UnknownHandler,
    )
    from arqd.groups import Group, GroupJob, GroupStatus
    from arqd.handlers import JobContext
    from arqd.http.client import HttpClient
    from arqd.model import ErrorInfo, Progress, State
    from arqd.view import Job, QueueInfo, ResultInfo, WorkerInfo

__version__ = "0.1.0"

# Each public name and the module it lives in.
_HOMES = {
    "App": "arqd.app",
    "Client": "arqd.client",
    "Config": "arqd.config",
    "load_config": "arqd.config",
    "JobsAPI": "arqd.api",
    "Group": "arqd.groups",
    "GroupJob": "arqd.groups",
    "GroupStatus": "arqd.groups",
    "JobContext": "arqd.handlers",
    "HttpClient": "arqd.http.client",
    "ErrorInfo": "arqd.model",
    "Progress": "arqd.model",
    "State": "arqd.model",
    "Job": "arqd.view",
    "QueueInfo": "arqd.view",
    "ResultInfo": "arqd.view",
    "WorkerInfo": "arqd.view",
    **{
        name: "arqd.errors"
        for name in (
            "ArqdError",
            "BackendError",
            "BackendUnavailable",
            "ConfigError",
            "Fail",
            "InvalidRequest",
            "JobCancelled",
            "JobFailed",
            "JobNotFound",
            "NotReady",
            "ResultExpired",
            "ResultUnavailable",
            "Retry",
            "UnknownGroup",
            "UnknownHandler",
        )
    },
}


def __getattr__(name: str) -> Any:
    """``arqd.<name>``: the public name, imported from its module on first use."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'arqd' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})


__all__ = [
    "App",
    "ArqdError",
    "BackendError",
    "BackendUnavailable",
    "Client",
    "Config",
    "ConfigError",
    "ErrorInfo",
    "Fail",
    "Group",
    "GroupJob",
    "GroupStatus",
    "HttpClient",
    "InvalidRequest",
    "Job",
    "JobCancelled",
    "JobContext",
    "JobFailed",
    "JobNotFound",
    "JobsAPI",
    "NotReady",
    "Progress",
    "QueueInfo",
    "ResultExpired",
    "ResultInfo",
    "ResultUnavailable",
    "Retry",
    "State",
    "UnknownGroup",
    "UnknownHandler",
    "WorkerInfo",
    "__version__",
    "load_config",
]
