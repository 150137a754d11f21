"""``GET /api/openapi.json``: the chat API described as OpenAPI 3.1, built from the routes.

The document is generated from the application's router when first asked for, so it can
never list a route that does not exist or miss one that does: every ``/api`` route appears
with its method, path parameters and the first paragraph of its handler's docstring as
summary and description. Request and response shapes are described in prose in
``docs/chat-api.md``.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

import orjson
from aiohttp import web

from parley import __version__

_PARAM = re.compile(r"\{(\w+)(?::[^}]*)?\}")


def document(app: web.Application) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("formatter") or info.get("path")
        if not isinstance(path, str) or not path.startswith("/api") or route.method == "HEAD":
            continue
        doc = inspect.getdoc(route.handler) or ""
        summary, _, rest = doc.partition("\n\n")
        operation: dict[str, Any] = {
            "summary": " ".join(summary.split()) or f"{route.method} {path}",
            "operationId": _operation_id(route.method, path),
            "responses": {"default": {"description": "JSON; errors as OpenAI error JSON"}},
        }
        if rest.strip():
            operation["description"] = rest.strip()
        names = _PARAM.findall(path)
        if names:
            operation["parameters"] = [
                {"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
                for n in names
            ]
        paths.setdefault(_PARAM.sub(r"{\1}", path), {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "parley chat API", "version": __version__},
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
                "session": {"type": "apiKey", "in": "cookie", "name": "parley_session"},
            }
        },
        "security": [{"bearer": []}, {"apiKey": []}, {"session": []}],
        "paths": dict(sorted(paths.items())),
    }


async def openapi_json(request: web.Request) -> web.Response:
    """The chat API as an OpenAPI 3.1 document."""
    # Built per request: a few dozen routes, and rarely asked for.
    return web.Response(body=orjson.dumps(document(request.app)), content_type="application/json")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/openapi.json", openapi_json)


def _operation_id(method: str, path: str) -> str:
    return method.lower() + "_" + _PARAM.sub(r"\1", path).strip("/").replace("/", "_")
