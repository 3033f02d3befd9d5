"""The files result store translates ``OSError`` at its seam (``arqd/results/files.py``): a
result that is not there is the contract's "missing"; a directory it may not write, a file where
a directory should be (or the reverse), a write past what the disk takes become a
``BackendError`` naming the path and the error, never a raw ``OSError``, and leave no partial.
Every condition here is real (no patched ``os``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from arqd.errors import BackendError, ResultExpired
from arqd.model import blob_name, new_job_id, new_token
from arqd.results import files
from arqd.results.files import PARTIAL, FileResults

from .daemons import ROOT
from .util import eventually


def a_name() -> str:
    return blob_name(new_job_id(), new_token())


def fan(root: Path, name: str) -> Path:
    """The fan-out directory ``name`` is published under, in the temporary area."""
    return root / "temporary" / name[-11:-9]


def open_files() -> list[str]:
    """What this process's descriptors point at."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor is gone by now
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
    return out


def leftovers(root: Path) -> list[str]:
    return sorted(os.listdir(root / PARTIAL))


async def read_all(store: FileResults, name: str) -> bytes:
    return b"".join([c async for c in store.read("temporary", name)])


async def test_a_file_where_the_root_should_be_fails_open_clearly(tmp_path: Path):
    """A regular file at the results path makes open() a BackendError naming that path."""
    root = tmp_path / "results"
    root.write_text("not a directory")
    with pytest.raises(BackendError, match="cannot create the directory") as caught:
        await FileResults(str(root)).open()
    assert str(root / "temporary") in str(caught.value) and "(ENOTDIR)" in str(caught.value)


async def test_a_file_where_a_fan_directory_should_be(tmp_path: Path):
    """With a file in place of a fan-out directory, publishing fails as a BackendError leaving
    no partial, and reading, sizing or deleting a result there is a BackendError too (not
    "missing": the store is damaged, the result may well exist)."""
    async with FileResults(str(tmp_path)) as store:
        name = a_name()
        fan(tmp_path, name).write_text("in the way")
        writer = await store.writer("temporary", name)
        await writer.write(b"x" * 1000)
        with pytest.raises(BackendError, match="cannot publish") as caught:
            await writer.commit()
        assert "(EEXIST)" in str(caught.value)
        await writer.abort()  # what every caller does next: harmless
        assert leftovers(tmp_path) == []
        with pytest.raises(BackendError, match=r"cannot read .*\(ENOTDIR\)"):
            await read_all(store, name)
        with pytest.raises(BackendError, match=r"\(ENOTDIR\)"):
            await store.size("temporary", name)
        with pytest.raises(BackendError, match=r"cannot delete .*\(ENOTDIR\)"):
            await store.delete("temporary", name)


async def test_a_directory_where_a_result_should_be(tmp_path: Path):
    """A directory at a result's path is a BackendError on read, size and delete; its size is
    not the directory's."""
    async with FileResults(str(tmp_path)) as store:
        name = a_name()
        (fan(tmp_path, name) / name).mkdir(parents=True)
        with pytest.raises(BackendError, match=r"cannot read .*\(EISDIR\)"):
            await read_all(store, name)
        with pytest.raises(BackendError, match="not a regular file"):
            await store.size("temporary", name)
        with pytest.raises(BackendError, match="cannot delete"):
            await store.delete("temporary", name)


async def test_a_file_where_the_partial_directory_should_be(tmp_path: Path):
    """With ``.partial`` replaced by a file, a new writer and the sweep of partials are
    BackendErrors naming it; results already published still read back."""
    async with FileResults(str(tmp_path)) as store:
        kept = a_name()
        await store.put("temporary", kept, b"kept")
        shutil.rmtree(tmp_path / PARTIAL)
        (tmp_path / PARTIAL).write_text("in the way")
        with pytest.raises(BackendError, match=r"cannot create a partial result in .*ENOTDIR"):
            await store.writer("temporary", a_name())
        with pytest.raises(BackendError, match=r"cannot sweep partial results in .*ENOTDIR"):
            await store.sweep_partials()
        assert await read_all(store, kept) == b"kept"


async def test_missing_is_still_missing(tmp_path: Path):
    """What is not there keeps the contract's answers: ResultExpired, None, a harmless delete,
    and an area nobody wrote to lists nothing."""
    async with FileResults(str(tmp_path)) as store:
        name = a_name()
        with pytest.raises(ResultExpired):
            await read_all(store, name)
        assert await store.size("temporary", name) is None
        await store.delete("temporary", name)
        shutil.rmtree(tmp_path / "persistent")
        assert [page async for page in store.names("persistent")] == []


async def test_a_stray_file_in_an_area_is_not_a_result_directory(tmp_path: Path):
    """``names`` lists every result of an area even when a stray file sits among its fan-out
    directories (it would otherwise fail on the file)."""
    async with FileResults(str(tmp_path)) as store:
        names = sorted(a_name() for _ in range(3))
        for name in names:
            await store.put("temporary", name, b"r")
        (tmp_path / "temporary" / "README").write_text("someone's notes")
        listed = sorted(n for page in [p async for p in store.names("temporary")] for n in page)
        assert listed == names


# In a child process: root may write anywhere, so as root it runs as nobody (65534); otherwise it
# makes the directories read-only. Either way the daemon's user may not write them.
READ_ONLY = textwrap.dedent(
    """
    import asyncio, json, os, sys
    from pathlib import Path
    from arqd.errors import BackendError
    from arqd.results.files import FileResults

    async def main(root, name, other):
        errors = {}
        async with FileResults(str(root)) as store:
            await store.size("temporary", name)  # its threads and lazy imports, while we may
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            else:
                for directory in (root / ".partial", root / "temporary" / name[-11:-9]):
                    directory.chmod(0o555)
            for what, call in (
                ("writer", lambda: store.writer("temporary", other)),
                ("delete", lambda: store.delete("temporary", name)),
            ):
                try:
                    await call()
                    errors[what] = None
                except BackendError as exc:
                    errors[what] = str(exc)
            errors["size"] = await store.size("temporary", name)
        print(json.dumps(errors))

    asyncio.run(main(Path(sys.argv[1]), sys.argv[2], sys.argv[3]))
    """
)


@pytest.fixture
def open_root() -> Iterator[Path]:
    """A results root another user can reach (pytest's own tmp_path is private to its user)."""
    root = Path(tempfile.mkdtemp(prefix="arqd-files-"))
    root.chmod(0o755)
    yield root
    for directory, subdirs, _ in os.walk(root):  # a child may have left some read-only
        for sub in subdirs:
            Path(directory, sub).chmod(0o755)
    shutil.rmtree(root)


async def test_a_read_only_directory_is_a_clear_error(open_root: Path):
    """A result directory the daemon's user may not write makes a new writer and a delete
    BackendErrors naming the directory and EACCES; the stored result is still there."""
    async with FileResults(str(open_root)) as store:
        name = a_name()
        await store.put("temporary", name, b"x" * 10)
    done = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        READ_ONLY,
        str(open_root),
        name,
        a_name(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    out, err = await done.communicate()
    assert done.returncode == 0, err.decode()
    errors = json.loads(out)
    assert f"cannot create a partial result in {open_root / PARTIAL}" in errors["writer"]
    assert "Permission denied (EACCES)" in errors["writer"]
    assert f"cannot delete {fan(open_root, name) / name}" in errors["delete"]
    assert "(EACCES)" in errors["delete"]
    assert errors["size"] == 10


# In a child process whose files may not grow past 64 KiB (RLIMIT_FSIZE, SIGXFSZ ignored so the
# write fails with EFBIG instead of killing it): the closest real condition to a full disk that
# needs no privilege and no mount.
FULL = textwrap.dedent(
    """
    import asyncio, json, os, resource, signal, sys
    from arqd.errors import BackendError
    from arqd.results.files import FileResults

    async def main(root, big, small):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
        async with FileResults(root) as store:
            try:
                await store.put("temporary", big, b"x" * (1024 * 1024))
                error = None
            except BackendError as exc:
                error = str(exc)
            after = await store.put("temporary", small, b"y" * 1000)
            partials = os.listdir(os.path.join(root, ".partial"))
            print(json.dumps({"error": error, "after": after, "partials": partials}))

    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3]))
    """
)


async def test_a_write_the_disk_refuses_is_a_clear_error_and_leaves_nothing(tmp_path: Path):
    """A result write the file system refuses mid-stream (EFBIG here, as ENOSPC on a full disk)
    is a BackendError naming the partial and the error; no partial is left, and the store goes
    on taking results that fit."""
    big, small = a_name(), a_name()
    done = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        FULL,
        str(tmp_path),
        big,
        small,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    out, err = await done.communicate()
    assert done.returncode == 0, err.decode()
    answer = json.loads(out)
    assert answer["error"] is not None, answer
    assert f"cannot write {tmp_path / PARTIAL}" in answer["error"]
    assert "File too large (EFBIG)" in answer["error"]
    assert answer["after"] == 1000 and answer["partials"] == []
    async with FileResults(str(tmp_path)) as store:
        assert await store.size("temporary", big) is None
        assert await read_all(store, small) == b"y" * 1000


async def test_a_read_cancelled_while_its_file_opens_closes_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A request that goes away while its result file is being opened (in a thread) leaves no
    open file behind: the file is closed when the open finishes. It was left to the garbage
    collector (an unclosed-file warning that failed a CI run)."""
    opened: list[Any] = []
    release = threading.Event()

    def slow_open(path: Path) -> Any:
        release.wait(10)
        opened.append(path.open("rb"))
        return opened[-1]

    async with FileResults(str(tmp_path)) as store:
        name = a_name()
        writer = await store.writer("temporary", name)
        await writer.write(b"x" * 10)
        await writer.commit()
        monkeypatch.setattr(files, "_open_read", slow_open)
        reading = asyncio.create_task(anext(store.read("temporary", name)))
        await asyncio.sleep(0.05)
        reading.cancel()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await reading
        await eventually(lambda: len(opened) == 1 and opened[0].closed, 10)


async def test_a_writer_cancelled_while_its_partial_is_made_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A writer whose caller is cancelled while the locked partial is being created (in a
    thread) closes the descriptor and removes the partial when the creation finishes."""
    made: list[tuple[Path, int]] = []
    release = threading.Event()
    create = files._create_locked

    def slow_create(where: Path, name: str) -> tuple[Path, int]:
        release.wait(10)
        made.append(create(where, name))
        return made[-1]

    async with FileResults(str(tmp_path)) as store:
        monkeypatch.setattr(files, "_create_locked", slow_create)
        starting = asyncio.create_task(store.writer("temporary", a_name()))
        await asyncio.sleep(0.05)
        starting.cancel()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await starting

        def cleaned() -> bool:
            return len(made) == 1 and not made[0][0].exists()

        await eventually(cleaned, 10)
        partial = str(made[0][0])
        assert not [p for p in open_files() if p.startswith(partial)]  # its descriptor is closed
