"""arqd: an asynchronous request queue daemon.

The public surface is re-exported here; ``tests/test_public_api.py`` pins ``__all__``.
"""

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
from arqd.view import Job, ResultInfo

__version__ = "0.1.0"

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
    "NotReady",
    "Progress",
    "ResultExpired",
    "ResultInfo",
    "ResultUnavailable",
    "Retry",
    "State",
    "UnknownGroup",
    "UnknownHandler",
    "__version__",
    "load_config",
]
