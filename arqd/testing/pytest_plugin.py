"""The ``arqd_app`` fixture: a fresh ``arqd.testing.TestApp`` per test, open, with your config.

Enable it in your ``conftest.py`` with ``pytest_plugins = ["arqd.testing.pytest_plugin"]`` (or
``pytest -p arqd.testing.pytest_plugin``); it needs pytest-asyncio. Override ``arqd_config`` to
give your handlers, defaults and workers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from arqd.config import Config
from arqd.testing import TestApp


@pytest.fixture
def arqd_config() -> Config:
    """The config of ``arqd_app``: the defaults unless you override this fixture."""
    return Config()


@pytest_asyncio.fixture
async def arqd_app(arqd_config: Config) -> AsyncIterator[TestApp]:
    """An open ``TestApp`` with the handlers of ``arqd_config``; jobs run in ``drain()``."""
    async with TestApp(arqd_config) as app:
        yield app
