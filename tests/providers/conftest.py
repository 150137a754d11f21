"""Fixtures of the adapter tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A fresh pooled client session per test, as the server's lifespan makes one."""
    async with aiohttp.ClientSession() as client:
        yield client
