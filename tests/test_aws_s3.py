"""What the S3 result store adds to the contract: multipart streaming, no orphan uploads, and a
bucket set up (lifecycle rules included) idempotently. Runs against the session's moto server."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from arqd.errors import BackendUnavailable, ConfigError
from arqd.model import blob_name, new_job_id, new_token
from arqd.results.s3 import (
    LIFECYCLE_ABORT,
    LIFECYCLE_TEMPORARY,
    MIN_PART,
    S3Results,
    S3Writer,
    init_bucket,
)

from .conftest import s3_settings
from .faultproxy import FaultProxy, Faults

MIB = 1024 * 1024


@pytest.fixture
async def store(moto_url: str) -> AsyncIterator[S3Results]:
    async with S3Results(s3_settings(moto_url, part_size=MIN_PART)) as s:
        yield s


def a_name() -> str:
    return blob_name(new_job_id(), new_token())


def chunk(i: int) -> bytes:
    """1 MiB that differs from every other chunk, so a misplaced part shows."""
    return hashlib.sha256(str(i).encode()).digest() * (MIB // 32)


async def in_progress(store: S3Results) -> list[str]:
    out = await store.client.list_multipart_uploads(Bucket=store.settings.bucket)
    return [u["Key"] for u in out.get("Uploads", [])]


async def read(store: S3Results, name: str, start: int = 0, end: int | None = None) -> bytes:
    return b"".join([c async for c in store.read("temporary", name, start, end)])


async def test_a_long_stream_is_a_multipart_upload_that_reads_back_intact(store: S3Results):
    """12 MiB written in 1 MiB chunks become three parts (5 + 5 + 2 MiB) of one object, read
    back byte for byte, whole and across a part boundary."""
    name = a_name()
    writer = await store.writer("temporary", name)
    for i in range(12):
        await writer.write(chunk(i))
    assert len(await in_progress(store)) == 1  # started, and invisible until committed
    assert await store.size("temporary", name) is None
    assert await writer.commit() == 12 * MIB
    expected = b"".join(chunk(i) for i in range(12))
    assert await read(store, name) == expected
    assert (
        await read(store, name, 5 * MIB - 10, 5 * MIB + 10) == expected[5 * MIB - 10 : 5 * MIB + 10]
    )
    head = await store.client.head_object(
        Bucket=store.settings.bucket, Key=f"temporary/{name}", PartNumber=1
    )
    assert head["PartsCount"] == 3 and head["ContentLength"] == 5 * MIB
    assert await in_progress(store) == []


async def test_an_aborted_writer_leaves_no_upload(store: S3Results):
    """Aborting after some parts went up aborts the multipart upload: nothing stays in progress
    and nothing is published."""
    name = a_name()
    writer = await store.writer("temporary", name)
    for i in range(6):
        await writer.write(chunk(i))
    assert len(await in_progress(store)) == 1
    await writer.abort()
    await writer.abort()
    assert await in_progress(store) == []
    assert await store.size("temporary", name) is None


async def test_a_failed_part_upload_leaves_no_upload_once_aborted(moto_url: str):
    """When S3 stops answering mid-stream the write raises BackendUnavailable; the writer's abort
    (as the pool calls it) then removes the upload, so no orphan remains."""
    async with FaultProxy(moto_url) as proxy:
        settings = s3_settings(proxy.url, part_size=MIN_PART, max_attempts=2)
        async with S3Results(settings) as store:
            writer = await store.writer("temporary", a_name())
            for i in range(5):
                await writer.write(chunk(i))  # the first part goes up
            proxy.faults = Faults(unavailable=1.0)
            with pytest.raises(BackendUnavailable):
                await writer.write(b"".join(chunk(i) for i in range(5, 10)))
            proxy.faults = Faults()
            assert len(await in_progress(store)) == 1  # its own abort met the outage too
            await writer.abort()
            assert await in_progress(store) == []


async def test_memory_stays_within_one_part(store: S3Results):
    """A writer holds at most one part of data, however long the stream (here 3 parts)."""
    writer = await store.writer("temporary", a_name())
    assert isinstance(writer, S3Writer)
    peak = 0
    for i in range(15):
        await writer.write(chunk(i))
        peak = max(peak, writer.buffered)
    await writer.commit()
    assert 0 < peak < MIN_PART


def test_parts_below_the_s3_minimum_are_refused():
    """A part size S3 would refuse is a configuration error, not a failed upload later."""
    with pytest.raises(ConfigError):
        s3_settings("http://127.0.0.1:1", part_size=MIN_PART - 1)


async def test_init_bucket_is_idempotent_and_keeps_other_rules(moto_url: str):
    """init_bucket creates the bucket with our lifecycle rules, keeps rules it did not write,
    and does nothing the second time."""
    settings = s3_settings(moto_url, prefix="arqd/")
    first = await init_bucket(settings, temporary_ttl=36 * 3600)
    assert any("created bucket" in line for line in first)
    async with S3Results(settings) as store:
        rules = await lifecycle(store)
        assert rules[LIFECYCLE_TEMPORARY]["Expiration"] == {"Days": 2}
        assert rules[LIFECYCLE_TEMPORARY]["Filter"] == {"Prefix": "arqd/temporary/"}
        assert rules[LIFECYCLE_ABORT]["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"] == 1
        theirs = {"ID": "theirs", "Filter": {"Prefix": "logs/"}, "Status": "Enabled"}
        theirs["Expiration"] = {"Days": 7}
        await store.client.put_bucket_lifecycle_configuration(
            Bucket=settings.bucket,
            LifecycleConfiguration={"Rules": [theirs, *rules.values()]},
        )
    assert await init_bucket(settings, temporary_ttl=36 * 3600) == [
        f"bucket {settings.bucket} is ready (nothing to do)"
    ]
    changed = await init_bucket(settings, temporary_ttl=24 * 3600)
    assert any("1 day" in line for line in changed)
    async with S3Results(settings) as store:
        rules = await lifecycle(store)
    assert set(rules) == {"theirs", LIFECYCLE_TEMPORARY, LIFECYCLE_ABORT}
    assert rules[LIFECYCLE_TEMPORARY]["Expiration"] == {"Days": 1}


async def lifecycle(store: S3Results) -> dict[str, dict[str, Any]]:
    out = await store.client.get_bucket_lifecycle_configuration(Bucket=store.settings.bucket)
    return {r["ID"]: r for r in out["Rules"]}
