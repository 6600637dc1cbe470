"""ASGI middleware of `cdm serve`: a body size limit checked before parsing, a body that must
arrive in time, and security headers on every answer (docs/security.md)."""

import asyncio
import time

from fastapi.responses import JSONResponse
from starlette.datastructures import MutableHeaders


class BodyLimit:
    """ASGI middleware: bodies over `limit` bytes get a 422 naming the limit (before parsing);
    a body not all in within `timeout` seconds gets a 408."""

    def __init__(self, app, limit: int, timeout: float = 10.0):
        self.app, self.limit, self.timeout = app, limit, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        until = time.monotonic() + self.timeout
        while more:
            try:
                msg = await asyncio.wait_for(receive(), max(0.0, until - time.monotonic()))
            except asyncio.TimeoutError:
                resp = JSONResponse({"detail": f"request body not received within {self.timeout:g} s"}, 408,
                                    headers={"Connection": "close"})
                return await resp(scope, receive, send)
            if msg["type"] == "http.disconnect":
                return
            body = msg.get("body", b"")
            size += len(body)
            if size > self.limit:
                resp = JSONResponse({"detail": [{"loc": ["body"], "msg": f"request body is larger than "
                                                 f"{self.limit} bytes", "type": "body_too_large"}]}, 422)
                return await resp(scope, receive, send)
            chunks.append(body)
            more = msg.get("more_body", False)
        done = False

        async def replay():
            nonlocal done
            if not done:
                done = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
DOCS_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc")  # FastAPI's pages load their own inline script


class SecurityHeaders:
    """ASGI middleware: no framing, no sniffing, no referrer; a strict CSP except on the API docs."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(msg):
            if msg["type"] == "http.response.start":
                h = MutableHeaders(scope=msg)
                h["X-Frame-Options"] = "DENY"
                h["X-Content-Type-Options"] = "nosniff"
                h["Referrer-Policy"] = "no-referrer"
                h["Content-Security-Policy"] = "frame-ancestors 'none'" if scope["path"] in DOCS_PATHS else CSP
                if scope["path"].startswith("/v1/"):
                    h["Cache-Control"] = "no-store"
            await send(msg)

        return await self.app(scope, receive, send_with_headers)
