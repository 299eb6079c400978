"""The server's door: API key and request-body size, checked before anything else runs.

A pure ASGI middleware, so that a request without the right key is refused before its body is
read, and a body over the limit is refused as soon as its ``Content-Length`` (or, when chunked,
its running size) passes the limit -- never read into memory in full.
"""

from __future__ import annotations

import hmac
import json
from typing import Optional

from .schema import error_body

OPEN_PATHS = ("/health",)  # served without the API key (load balancers, start-up checks)


async def send_error(send, status: int, body: dict, headers=()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode()), *headers]})
    await send({"type": "http.response.body", "body": data})


class Guard:
    """``Authorization: Bearer KEY`` on every route but :data:`OPEN_PATHS` (constant-time
    comparison), and request bodies of at most ``max_body_bytes``."""

    def __init__(self, app, api_key: Optional[str], max_body_bytes: int):
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.max_body = int(max_body_bytes)

    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)
        return False

    def _too_large(self, size: int) -> dict:
        return error_body(f"the request body is {size / 2**20:.1f} MB, more than this server's "
                          f"{self.max_body / 2**20:g} MB limit (--max-body-mb)",
                          code="request_too_large")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.key is not None and scope["path"] not in OPEN_PATHS and not self._authorized(scope):
            return await send_error(
                send, 401, error_body("missing or incorrect API key: send 'Authorization: Bearer KEY'",
                                      code="invalid_api_key"),
                headers=[(b"www-authenticate", b"Bearer")])
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            return await send_error(send, 413, self._too_large(int(declared)))
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        body = bytearray()
        while True:  # read it all here (bounded), then hand it on in one piece
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            body += message.get("body", b"")
            if len(body) > self.max_body:
                return await send_error(send, 413, self._too_large(len(body)))
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # later calls: http.disconnect, when the client goes

        await self.app(scope, replay, send)
