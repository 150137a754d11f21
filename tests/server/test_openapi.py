"""The chat API's OpenAPI document lists every /api route, each with a real summary."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness import ParleyServer, settings_for


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ParleyServer]:
    settings = settings_for(
        tmp_path, f"sqlite:///{tmp_path / 'p.db'}", PARLEY_MASTER_KEY="mk-0123456789abcdef"
    )
    with ParleyServer(settings) as running:
        yield running


def test_every_api_route_is_documented_and_the_document_needs_no_key(
    server: ParleyServer,
) -> None:
    response = httpx.get(f"{server.root}/api/openapi.json", timeout=10)
    assert response.status_code == 200
    document = response.json()
    assert document["openapi"].startswith("3.1")
    documented = {
        (method.upper(), path)
        for path, operations in document["paths"].items()
        for method in operations
    }
    app = server.app
    assert app is not None
    registered = set()
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("formatter") or info.get("path")
        if isinstance(path, str) and path.startswith("/api") and route.method != "HEAD":
            registered.add((route.method, path))
    assert documented == registered
    assert len(registered) > 20
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            # A summary from the handler's docstring, not the fallback "METHOD path".
            assert operation["summary"] != f"{method.upper()} {path}", (method, path)
            assert len(operation["summary"]) > 10
