"""The public surface of ``arqd`` is deliberate: changing it must change this test."""

import arqd


def test_all_is_pinned():
    """``arqd.__all__`` lists exactly the public names, each importable."""
    assert sorted(arqd.__all__) == sorted(
        [
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
    )
    for name in arqd.__all__:
        assert getattr(arqd, name) is not None


def test_every_arqd_error_maps_to_an_http_status():
    """Each error class carries the HTTP status and code the API answers with."""
    for cls in (
        arqd.JobNotFound,
        arqd.InvalidRequest,
        arqd.UnknownHandler,
        arqd.NotReady,
        arqd.JobFailed,
        arqd.JobCancelled,
        arqd.ResultExpired,
        arqd.BackendUnavailable,
    ):
        assert issubclass(cls, arqd.ArqdError)
        assert 400 <= cls.status < 600 and cls.code.islower()
