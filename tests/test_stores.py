"""Config picks a result store by name in ``arqd/stores.py``, which imports that store's module
alone: the others, and optional drivers (botocore, aioboto3 for ``s3``), stay unloaded."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .daemons import ROOT

CHOOSE = textwrap.dedent(
    """
    import sys
    from arqd.config import ResultsConfig
    from arqd.stores import make_results

    store = make_results(ResultsConfig(backend=sys.argv[1], path=sys.argv[2]))
    print(type(store).__module__)
    print(*sorted(m for m in sys.modules if m.split(".")[0] in ("arqd", "botocore", "aioboto3")))
    """
)

STORES = {
    "memory": "arqd.results.memory",
    "files": "arqd.results.files",
    "s3": "arqd.results.s3",
}


@pytest.mark.parametrize("backend", sorted(STORES))
def test_only_the_configured_store_is_imported(backend: str, tmp_path: Path):
    """make_results builds the configured store from its own module, without importing the
    other stores, a queue backend it does not need, or any AWS driver before it opens."""
    done = subprocess.run(
        [sys.executable, "-c", CHOOSE, backend, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    module, loaded = done.stdout.splitlines()
    assert module == STORES[backend]
    modules = set(loaded.split())
    assert modules & set(STORES.values()) == {STORES[backend]}
    assert not {m for m in modules if m.split(".")[0] in ("botocore", "aioboto3")}
    assert "arqd.backends.dynamodb" not in modules
    assert ("arqd.backends.aws" in modules) is (backend == "s3")  # the toolkit, not its drivers
