"""The server's door (the rules and why: README, "Serve"): ``Host`` (DNS rebinding), ``Origin``,
the API key (constant-time comparison), JSON bodies only (a web page can send text/plain or form
bodies anywhere without a CORS preflight, never JSON), and the body size, counted as it arrives.

A pure ASGI middleware, so that a refused request's body is never read.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from collections.abc import Iterable

from .schema import error_body

OPEN_PATHS = ("/health",)  # served without the API key (load balancers, start-up checks)
JSON_TYPES = ("application/json",)  # and application/*+json


def is_loopback_name(host: str) -> bool:
    """``localhost``, ``*.localhost`` (browsers resolve those to loopback themselves), or a
    loopback address."""
    host = host.strip("[]").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def allowed_hosts(bind: str, extra: Iterable[str] = ()) -> tuple[str, ...] | None:
    """The ``Host`` names to serve besides loopback names; None = any (``*``, or a non-loopback
    bind without ``extra``)."""
    extra = tuple(h.strip().lower() for h in extra if h.strip())
    if "*" in extra or (not extra and not is_loopback_name(bind)):
        return None
    return extra


def host_name(value: bytes) -> str:
    """A ``Host`` header without its port: ``[::1]:8080`` -> ``::1``."""
    text = value.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[1:text.find("]")] if "]" in text else text
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


async def send_error(send, status: int, body: dict, headers=()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode()), *headers]})
    await send({"type": "http.response.body", "body": data})


class Guard:
    """The checks of this module, in its docstring's order; ``hosts`` None = any ``Host``."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int,
                 hosts: tuple[str, ...] | None = (), origins: tuple[str, ...] = ()):
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.max_body = int(max_body_bytes)
        self.hosts = hosts
        self.origins = tuple(o.rstrip("/").lower() for o in origins)

    def _refusal(self, scope, headers: dict) -> tuple[int, dict, list] | None:
        host = headers.get(b"host")
        if host is not None and self.hosts is not None:
            name = host_name(host)
            if not (is_loopback_name(name) or name in self.hosts):
                return 403, error_body(
                    f"this server does not answer to the host name {name!r}; start it with "
                    f"--allowed-hosts {name} to allow it", code="host_not_allowed"), []
        origin = headers.get(b"origin")
        if origin is not None and origin.decode("latin-1").rstrip("/").lower() not in self.origins:
            origin = origin.decode("latin-1")
            return 403, error_body(
                f"requests from web pages of {origin} are not allowed; start the server with "
                f"--allowed-origins {origin} to allow them", code="origin_not_allowed"), []
        if self.key is not None and scope["path"] not in OPEN_PATHS and not self._authorized(scope):
            return 401, error_body("missing or incorrect API key: send 'Authorization: Bearer KEY'",
                                   code="invalid_api_key"), [(b"www-authenticate", b"Bearer")]
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            return 413, self._too_large(int(declared)), []
        if scope["method"] in ("POST", "PUT", "PATCH"):
            kind = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
            if not (kind in JSON_TYPES or (kind.startswith("application/") and kind.endswith("+json"))):
                return 415, error_body(
                    f"the request body must be JSON, sent with 'Content-Type: application/json' "
                    f"(got {kind or 'no content type'!r})", code="unsupported_media_type"), []
        return None

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
        refused = self._refusal(scope, dict(scope.get("headers", ())))
        if refused is not None:
            return await send_error(send, *refused)
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
