"""The S3 result store: one object per result, ``<prefix><area>/<name>``.

- A writer buffers at most one part (``part_size``, ≥ 5 MiB, S3's minimum for every part but the
  last). A result that ends within the first part is one ``PutObject``; a longer one becomes a
  multipart upload, started when the first part is full and completed on ``commit``. Either way
  nothing is visible until then, and memory stays bounded whatever the result's size.
- A writer that fails or is aborted aborts its multipart upload, so no upload is left half done.
  A process killed while writing leaves its upload open (invisible, but its parts are billed):
  the lifecycle rule from :func:`init_bucket` aborts any upload a day after it began. Nothing
  aborts uploads at start: an upload does not say whether its writer (on any host sharing the
  bucket) still lives, and a handler may stream for longer than any age we could pick.
- Reads are ranged ``GetObject`` calls, streamed; a missing object is :class:`ResultExpired`.
- ``names`` lists an area (ListObjectsV2, 1,000 keys a page).
- ``temporary/`` objects also expire by the bucket's lifecycle rule (``results.temporary_ttl``
  rounded up to whole days: S3 expires by day), so an unpurged cache cannot grow forever.

``aioboto3`` is imported when the store opens (extra ``arqd[aws]``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from arqd.backends import aws
from arqd.clock import SYSTEM_CLOCK, Clock
from arqd.errors import BackendError, BackendUnavailable, ConfigError, ResultExpired
from arqd.results.base import AREAS, Area, ResultStore, ResultWriter, checked

MIN_PART = 5 * 1024 * 1024  # S3 refuses smaller parts (except the last)
CHUNK = 64 * 1024  # bytes per chunk handed to readers
NAMES_PAGE = 1000  # as many keys as one ListObjectsV2 answers
LIFECYCLE_TEMPORARY = "arqd-temporary-expiry"
LIFECYCLE_ABORT = "arqd-abort-incomplete-uploads"

MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
UNAVAILABLE_CODES = frozenset(
    {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling"}
)


@dataclass(frozen=True, kw_only=True)
class S3Settings:
    """Where results go and how to talk to S3; ``stores.make_results`` builds it from config."""

    bucket: str = "arqd-results"
    prefix: str = ""
    region: str | None = None
    endpoint_url: str | None = None
    access_key_id: str | None = None  # None: botocore's usual credential chain
    secret_access_key: str | None = None
    retry_mode: str = "standard"  # botocore's: "standard" or "adaptive"
    max_attempts: int = 8
    connect_timeout: float = 2.0
    read_timeout: float = 30.0
    part_size: int = 8 * 1024 * 1024  # multipart part size; also the writer's memory bound
    create_missing: bool | None = None  # create the bucket on open; default: with endpoint_url

    def __post_init__(self) -> None:
        if self.part_size < MIN_PART:
            raise ConfigError(f"s3 part_size must be at least {MIN_PART} bytes (S3's minimum)")


class _Missing(Exception):
    """The object (or bucket) is not there."""


def _missing(op: str, answer: aws.Refusal) -> Exception | None:
    return _Missing(answer.code) if answer.code in MISSING_CODES or answer.status == 404 else None


def _translate(op: str, exc: BaseException) -> Exception:
    return aws.translate("s3", op, exc, unavailable=UNAVAILABLE_CODES, refine=_missing)


def _client_config(s: S3Settings, *, attempts: int | None = None, timeout: float = 0) -> Any:
    # A custom endpoint (moto, MinIO) rarely resolves bucket subdomains.
    style = {"addressing_style": "path" if s.endpoint_url else "auto"}
    return aws.client_config(s, attempts=attempts, timeout=timeout, s3=style)


class S3Writer(ResultWriter):
    """Streams one result; see the module docstring."""

    def __init__(self, store: S3Results, key: str) -> None:
        self._store, self._key = store, key
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self._size = 0
        self._done = False

    @property
    def buffered(self) -> int:
        """Bytes held in memory until a part is full: below ``part_size`` between writes."""
        return len(self._buffer)

    async def write(self, data: bytes) -> None:
        assert not self._done, "writer already finished"
        self._buffer += data
        self._size += len(data)
        part = self._store.settings.part_size
        while len(self._buffer) >= part:
            chunk = bytes(self._buffer[:part])
            del self._buffer[:part]
            await self._guarded(self._upload_part(chunk))

    async def commit(self) -> int:
        assert not self._done, "writer already finished"
        if self._upload_id is None:
            await self._guarded(self._put_whole())
        else:
            if self._buffer or not self._parts:
                await self._guarded(self._upload_part(bytes(self._buffer)))
            await self._guarded(self._complete())
        self._done = True
        self._buffer.clear()
        return self._size

    async def abort(self) -> None:
        self._done = True
        self._buffer.clear()
        if self._upload_id is None:
            return
        try:
            await self._store._call(
                "abort_multipart_upload",
                Bucket=self._store.settings.bucket,
                Key=self._key,
                UploadId=self._upload_id,
            )
        except (BackendError, _Missing):
            return  # kept for a later abort(); the bucket's lifecycle rule is the last resort
        self._upload_id = None

    async def _guarded(self, step: Any) -> None:
        """Run one step; on failure abort the upload (best effort) and re-raise."""
        try:
            await step
        except BaseException:
            await self.abort()
            raise

    async def _put_whole(self) -> None:
        await self._store._call(
            "put_object",
            Bucket=self._store.settings.bucket,
            Key=self._key,
            Body=bytes(self._buffer),
        )

    async def _upload_part(self, data: bytes) -> None:
        s = self._store
        if self._upload_id is None:
            out = await s._call("create_multipart_upload", Bucket=s.settings.bucket, Key=self._key)
            self._upload_id = str(out["UploadId"])
        number = len(self._parts) + 1
        out = await s._call(
            "upload_part",
            Bucket=s.settings.bucket,
            Key=self._key,
            UploadId=self._upload_id,
            PartNumber=number,
            Body=data,
        )
        self._parts.append({"ETag": out["ETag"], "PartNumber": number})

    async def _complete(self) -> None:
        await self._store._call(
            "complete_multipart_upload",
            Bucket=self._store.settings.bucket,
            Key=self._key,
            UploadId=self._upload_id,
            MultipartUpload={"Parts": self._parts},
        )
        self._upload_id = None


class S3Results(ResultStore):
    """Result blobs in one S3 bucket under ``prefix``; see the module docstring."""

    name = "s3"

    def __init__(self, settings: S3Settings, *, clock: Clock = SYSTEM_CLOCK) -> None:
        super().__init__(clock=clock)
        self.settings = settings
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None
        self._ping_client: Any = None

    @property
    def client(self) -> Any:
        """The aiobotocore client once open (tests list its multipart uploads)."""
        return self._client

    @property
    def _where(self) -> str:
        s = self.settings
        return f"s3:{s.endpoint_url or s.region or 'default'}/{s.bucket}"

    async def open(self) -> None:
        s = self.settings
        with aws.remembering_open_failure(self._where):
            clients = await aws.open_clients(self._stack, "s3", s, _client_config)
            self._client, self._ping_client = clients
            create = (
                s.create_missing if s.create_missing is not None else s.endpoint_url is not None
            )
            if create:
                await ensure_bucket(self._client, s)

    async def aclose(self) -> None:
        await self._stack.aclose()
        self._client = self._ping_client = None

    async def _call(self, op: str, client: Any = None, **kw: Any) -> dict[str, Any]:
        if self._client is None:
            raise aws.not_open("the s3 result store", self._where)
        try:
            result: dict[str, Any] = await getattr(client or self._client, op)(**kw)
            return result
        except aws.driver_errors() as exc:
            raise _translate(op, exc) from exc

    def _key(self, area: Area, name: str) -> str:
        return f"{self.settings.prefix}{area}/{checked(area, name)}"

    async def writer(self, area: Area, name: str) -> ResultWriter:
        return S3Writer(self, self._key(area, name))

    async def read(
        self, area: Area, name: str, start: int = 0, end: int | None = None
    ) -> AsyncIterator[bytes]:
        key = self._key(area, name)
        if end is not None and end <= start:
            if await self.size(area, name) is None:
                raise ResultExpired(f"the result of job {name} is no longer stored")
            return
        kw: dict[str, Any] = {"Bucket": self.settings.bucket, "Key": key}
        if start or end is not None:
            kw["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        try:
            out = await self._call("get_object", **kw)
        except _Missing:
            raise ResultExpired(f"the result of job {name} is no longer stored") from None
        except BackendError as exc:
            if "InvalidRange" in str(exc):  # start at or past the end: nothing to give
                return
            raise
        async for chunk in self._stream(out["Body"]):
            yield chunk

    async def _stream(self, body: Any) -> AsyncIterator[bytes]:
        from botocore.exceptions import BotoCoreError

        try:
            while chunk := await body.read(CHUNK):
                yield chunk
        except (BotoCoreError, OSError, TimeoutError) as exc:
            raise BackendUnavailable(f"s3 read interrupted: {exc}") from exc
        finally:
            body.close()

    async def size(self, area: Area, name: str) -> int | None:
        try:
            out = await self._call(
                "head_object", Bucket=self.settings.bucket, Key=self._key(area, name)
            )
        except _Missing:
            return None
        try:
            return int(out["ContentLength"])
        except (KeyError, TypeError, ValueError):
            raise BackendError(f"S3 answered head_object without a length for {name}") from None

    async def delete(self, area: Area, name: str) -> None:
        await self._call("delete_object", Bucket=self.settings.bucket, Key=self._key(area, name))

    async def names(self, area: Area) -> AsyncIterator[list[str]]:
        if area not in AREAS:
            raise BackendError(f"unknown result area {area!r}")
        prefix = f"{self.settings.prefix}{area}/"
        page: list[str] = []
        async for obj in self._objects(prefix):
            page.append(obj["Key"][len(prefix) :])
            if len(page) == NAMES_PAGE:
                yield page
                page = []
        if page:
            yield page

    async def _objects(self, prefix: str) -> AsyncIterator[dict[str, Any]]:
        kw: dict[str, Any] = {"Bucket": self.settings.bucket, "Prefix": prefix}
        while True:
            out = await self._call("list_objects_v2", **kw)
            for obj in out.get("Contents", []):
                yield obj
            if not out.get("IsTruncated"):
                return
            kw["ContinuationToken"] = out["NextContinuationToken"]

    async def ping(self) -> None:
        try:
            await self._call("head_bucket", client=self._ping_client, Bucket=self.settings.bucket)
        except _Missing:
            raise BackendError(f"s3 bucket {self.settings.bucket} does not exist") from None


# --- creating the bucket --------------------------------------------------------------------------


def lifecycle_rules(prefix: str, temporary_ttl: float) -> list[dict[str, Any]]:
    """Ours: expire ``temporary/`` (in whole days, rounded up), abort orphan uploads."""
    days = max(1, math.ceil(temporary_ttl / 86400))
    return [
        {
            "ID": LIFECYCLE_TEMPORARY,
            "Filter": {"Prefix": f"{prefix}temporary/"},
            "Status": "Enabled",
            "Expiration": {"Days": days},
        },
        {
            "ID": LIFECYCLE_ABORT,
            "Filter": {"Prefix": prefix},
            "Status": "Enabled",
            "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1},
        },
    ]


async def ensure_bucket(
    client: Any, s: S3Settings, temporary_ttl: float | None = None
) -> list[str]:
    """Create the bucket when missing and (given ``temporary_ttl``) set our lifecycle rules,
    keeping any others the bucket has. Idempotent; answers what was done."""
    try:
        done = await _create_bucket(client, s)
        if temporary_ttl is not None:
            done += await _set_lifecycle(client, s, temporary_ttl)
        return done
    except aws.driver_errors() as exc:
        error = _translate("init", exc)
        raise (BackendError(f"s3 init: {exc}") if isinstance(error, _Missing) else error) from exc


async def _create_bucket(client: Any, s: S3Settings) -> list[str]:
    from botocore.exceptions import ClientError

    try:
        await client.head_bucket(Bucket=s.bucket)
        return []
    except ClientError as exc:
        if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") != 404:
            raise
    kw: dict[str, Any] = {"Bucket": s.bucket}
    region = client.meta.region_name
    if region and region != "us-east-1":  # us-east-1 refuses an explicit location
        kw["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        await client.create_bucket(**kw)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "BucketAlreadyOwnedByYou":
            raise
        return []
    return [f"created bucket {s.bucket}"]


async def _set_lifecycle(client: Any, s: S3Settings, temporary_ttl: float) -> list[str]:
    from botocore.exceptions import ClientError

    try:
        current = (await client.get_bucket_lifecycle_configuration(Bucket=s.bucket))["Rules"]
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "NoSuchLifecycleConfiguration":
            raise
        current = []
    ours = lifecycle_rules(s.prefix, temporary_ttl)
    mine = {r["ID"] for r in ours}
    if [r for r in current if r.get("ID") in mine] == ours:
        return []
    rules = [r for r in current if r.get("ID") not in mine] + ours
    await client.put_bucket_lifecycle_configuration(
        Bucket=s.bucket, LifecycleConfiguration={"Rules": rules}
    )
    days = ours[0]["Expiration"]["Days"]
    return [f"set lifecycle on {s.bucket}: {s.prefix}temporary/ expires after {days} day(s)"]


async def init_bucket(settings: S3Settings, *, temporary_ttl: float) -> list[str]:
    """``arqd init-aws`` for results: bucket and lifecycle rules; answers what was done."""
    async with contextlib.AsyncExitStack() as stack:
        client = await aws.open_client(stack, "s3", settings, _client_config(settings))
        done = await ensure_bucket(client, settings, temporary_ttl)
    return done or [f"bucket {settings.bucket} is ready (nothing to do)"]
