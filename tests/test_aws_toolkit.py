"""The AWS toolkit (``arqd/backends/aws.py``) that both AWS stores share: botocore's failures
become arqd's errors in one place, sessions are shared, the ping client gives up fast, and the
S3 store works without loading the DynamoDB backend (no store imports another)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import textwrap

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

from arqd.backends import aws
from arqd.errors import BackendError, BackendUnavailable

from .conftest import s3_settings
from .daemons import ROOT


def refused(code: str, status: int, **more: object) -> ClientError:
    """A ClientError as botocore raises it for an answer with ``code`` and ``status``."""
    response = {
        "Error": {"Code": code, "Message": "m"},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return ClientError({**response, **more}, "DoIt")  # type: ignore[arg-type]


class _Gone(Exception):
    pass


def test_no_answer_is_unavailable_and_names_missing_credentials():
    """A request that got no answer is BackendUnavailable; missing credentials say where
    botocore looked, not botocore's bare "Unable to locate credentials"."""
    unreachable = aws.translate("s3", "get_object", EndpointConnectionError(endpoint_url="x"))
    assert type(unreachable) is BackendUnavailable and "s3 get_object" in str(unreachable)
    for exc in (TimeoutError("slow"), ConnectionResetError("reset")):
        assert type(aws.translate("dynamodb", "query", exc)) is BackendUnavailable
    no_keys = aws.translate("dynamodb", "query", NoCredentialsError())
    assert type(no_keys) is BackendUnavailable
    assert "no AWS credentials found" in str(no_keys) and "AWS_ACCESS_KEY_ID" in str(no_keys)


def test_throttling_and_5xx_are_unavailable_other_refusals_are_errors():
    """Codes the store calls transient and any 5xx are BackendUnavailable (the daemon retries);
    any other refusal is a BackendError carrying the service, the operation and the code."""
    busy = frozenset({"SlowDown"})
    assert type(aws.translate("s3", "put", refused("SlowDown", 400), unavailable=busy)) is (
        BackendUnavailable
    )
    assert type(aws.translate("s3", "put", refused("Whatever", 503))) is BackendUnavailable
    denied = aws.translate("s3", "put", refused("AccessDenied", 403), unavailable=busy)
    assert type(denied) is BackendError
    assert str(denied).startswith("s3 put: AccessDenied:")


def test_a_stores_own_reading_of_a_refusal_comes_first():
    """``refine`` sees the operation, the code, the status and the whole response before the
    general rules, and its answer wins; a refusal it does not claim falls through to them."""
    seen: list[aws.Refusal] = []

    def refine(op: str, answer: aws.Refusal) -> Exception | None:
        assert op == "update"
        seen.append(answer)
        return _Gone(answer.response["Item"]) if answer.code == "Gone" else None

    got = aws.translate("dynamodb", "update", refused("Gone", 500, Item={"a": 1}), refine=refine)
    assert isinstance(got, _Gone) and got.args == ({"a": 1},)
    assert seen[0].code == "Gone" and seen[0].status == 500
    assert type(aws.translate("dynamodb", "update", refused("No", 400), refine=refine)) is (
        BackendError
    )


def test_the_ping_client_makes_one_short_attempt():
    """The ping config makes one attempt with PING_TIMEOUT, whatever the settings' retries;
    the working config keeps the settings' and adds the store's own options."""
    s = s3_settings("http://127.0.0.1:1", max_attempts=7, read_timeout=30.0)
    ping = aws.client_config(s, attempts=1, timeout=aws.PING_TIMEOUT)
    assert ping.retries["total_max_attempts"] == 1
    assert ping.read_timeout == ping.connect_timeout == aws.PING_TIMEOUT
    work = aws.client_config(s, max_pool_connections=64)
    assert work.retries["total_max_attempts"] == 7 and work.read_timeout == 30.0
    assert work.max_pool_connections == 64


def test_one_session_per_credentials_and_region():
    """Stores on the same credentials and region share a session (and its model cache);
    other credentials or another region get their own."""
    one = aws.session("k", "s", "eu-west-1")
    assert aws.session("k", "s", "eu-west-1") is one
    assert aws.session("k", "other", "eu-west-1") is not one
    assert aws.session("k", "s", "us-east-1") is not one


async def test_a_store_not_open_says_why_its_last_open_failed():
    """After a failed open the "not open" error carries its reason; a later open that
    succeeds forgets it."""
    where = "s3:test/toolkit"
    with pytest.raises(BackendUnavailable), aws.remembering_open_failure(where):
        raise BackendUnavailable("s3 head_bucket: refused")
    assert "its last open failed: s3 head_bucket: refused" in str(aws.not_open("the store", where))
    with aws.remembering_open_failure(where):
        pass
    assert str(aws.not_open("the store", where)) == "the store is not open"


async def test_open_clients_gives_a_working_and_a_ping_client(moto_url: str):
    """open_clients opens two clients on the settings' endpoint, the ping one with one attempt."""
    async with contextlib.AsyncExitStack() as stack:
        clients = await aws.open_clients(stack, "s3", s3_settings(moto_url))
        assert clients.ping.meta.config.retries["total_max_attempts"] == 1
        assert clients.work.meta.config.retries["total_max_attempts"] == 8
        assert (await clients.work.list_buckets())["ResponseMetadata"]["HTTPStatusCode"] == 200


S3_ALONE = textwrap.dedent(
    """
    import asyncio, sys
    from arqd.results.s3 import S3Results, S3Settings

    async def main():
        settings = S3Settings(
            bucket=sys.argv[2], region="us-east-1", endpoint_url=sys.argv[1],
            access_key_id="testing", secret_access_key="testing",
        )
        async with S3Results(settings) as store:
            await store.put("temporary", sys.argv[3], b"x")
            await store.ping()
        print(*sorted(m for m in sys.modules if m.startswith("arqd.backends.")))

    asyncio.run(main())
    """
)


async def test_the_s3_store_does_not_load_the_dynamodb_backend(moto_url: str):
    """Opening, writing to and pinging an S3 store loads the AWS toolkit, never the DynamoDB
    backend: a store does not import a backend."""
    from arqd.model import blob_name, new_job_id, new_token

    bucket = s3_settings(moto_url).bucket
    name = blob_name(new_job_id(), new_token())
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", S3_ALONE, moto_url, bucket, name],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr
    loaded = done.stdout.split()
    assert "arqd.backends.aws" in loaded and "arqd.backends.dynamodb" not in loaded
