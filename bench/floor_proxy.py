"""The floor: the thinnest useful passthrough proxy (aiohttp server + aiohttp client).

It forwards ``POST /v1/chat/completions`` to the upstream and copies the response back,
streaming or not, and does nothing else: no parsing, no routing, no recording. parley's
throughput is reported as a fraction of this one's, measured in the same run.

    python bench/floor_proxy.py --port 9001 --upstream http://127.0.0.1:9000
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web


def build(upstream: str) -> web.Application:
    app = web.Application()
    session_key = web.AppKey("session", aiohttp.ClientSession)

    async def lifespan(app: web.Application) -> AsyncIterator[None]:
        app[session_key] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=None)
        )
        yield
        await app[session_key].close()

    async def proxy(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        async with app[session_key].post(
            upstream + "/v1/chat/completions",
            data=body,
            headers={"Content-Type": "application/json"},
        ) as upstream_response:
            content_type = upstream_response.headers.get("Content-Type", "application/json")
            if content_type.startswith("text/event-stream"):
                response = web.StreamResponse(headers={"Content-Type": content_type})
                await response.prepare(request)
                async for chunk in upstream_response.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
                return response
            data = await upstream_response.read()
            return web.Response(
                body=data, status=upstream_response.status, content_type="application/json"
            )

    app.cleanup_ctx.append(lifespan)
    app.router.add_post("/v1/chat/completions", proxy)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(build(args.upstream), host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
