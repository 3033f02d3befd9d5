"""The result store contract, run against every store (see ``conftest.RESULT_STORES``)."""

from __future__ import annotations

import pytest

from arqd.errors import ArqdError, ResultExpired
from arqd.model import blob_name, new_job_id, new_token
from arqd.results.base import ResultStore


def a_name() -> str:
    return blob_name(new_job_id(), new_token())


async def read_all(store: ResultStore, name: str, start: int = 0, end: int | None = None) -> bytes:
    return b"".join([c async for c in store.read("temporary", name, start, end)])


async def test_streamed_write_reads_back(results: ResultStore):
    """Chunks written through a writer read back whole after commit, with the size answered."""
    name = a_name()
    writer = await results.writer("temporary", name)
    for i in range(10):
        await writer.write(bytes([i]) * 100_000)
    assert await writer.commit() == 1_000_000
    data = await read_all(results, name)
    assert len(data) == 1_000_000 and data[:100_000] == b"\x00" * 100_000
    assert await results.size("temporary", name) == 1_000_000


async def test_nothing_is_visible_before_commit(results: ResultStore):
    """A reader never sees a result that is still being written."""
    name = a_name()
    writer = await results.writer("temporary", name)
    await writer.write(b"half")
    assert await results.size("temporary", name) is None
    with pytest.raises(ResultExpired):
        await read_all(results, name)
    await writer.commit()
    assert await read_all(results, name) == b"half"


async def test_abort_leaves_nothing(results: ResultStore):
    """An aborted writer publishes nothing, and aborting twice is harmless."""
    name = a_name()
    writer = await results.writer("temporary", name)
    await writer.write(b"x" * 1000)
    await writer.abort()
    await writer.abort()
    assert await results.size("temporary", name) is None


async def test_ranged_read(results: ResultStore):
    """A ranged read answers exactly the bytes asked for."""
    name = a_name()
    await results.put("temporary", name, bytes(range(256)) * 1000)
    assert await read_all(results, name, 10, 20) == bytes(range(10, 20))
    assert await read_all(results, name, 255_990) == bytes(range(246, 256))
    assert len(await read_all(results, name, 1000, 200_000)) == 199_000


async def test_areas_are_separate(results: ResultStore):
    """The same name in the two areas is two results."""
    name = a_name()
    await results.put("temporary", name, b"t")
    await results.put("persistent", name, b"p")
    assert b"".join([c async for c in results.read("persistent", name)]) == b"p"
    await results.delete("temporary", name)
    assert await results.size("temporary", name) is None
    assert await results.size("persistent", name) == 1


async def test_names_lists_an_area(results: ResultStore):
    """names() answers every result of one area, in pages, and nothing of the other or of a
    writer still writing."""
    temporary = {a_name() for _ in range(3)}
    for name in temporary:
        await results.put("temporary", name, b"t")
    kept = a_name()
    await results.put("persistent", kept, b"p")
    writing = await results.writer("temporary", a_name())
    await writing.write(b"half")
    pages = [page async for page in results.names("temporary")]
    assert all(0 < len(page) <= 1000 for page in pages)
    assert sorted(n for page in pages for n in page) == sorted(temporary)
    assert [n async for page in results.names("persistent") for n in page] == [kept]
    await writing.abort()


async def test_delete_missing_is_harmless(results: ResultStore):
    """Deleting a result that is not there is not an error."""
    await results.delete("temporary", a_name())


@pytest.mark.parametrize("bad", ["../../etc/passwd", "x" * 41, "", "a/b"])
async def test_unsafe_names_are_refused(results: ResultStore, bad: str):
    """Only well-formed blob names are accepted by every store, so no path can escape one."""
    with pytest.raises(ArqdError):
        await results.writer("temporary", bad)
