"""The API's front door, as ASGI middleware around the app: the token is checked before
anything else happens (a caller without one costs a header's worth of work), a body over the
limit is refused before it is read, and every answer carries the security headers."""

from __future__ import annotations

from collections.abc import Callable

from fastapi.responses import JSONResponse

from cicd_ray import tokens


class _TooLarge(Exception):
    pass


SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    # The page's own script and style only: no inline code, nothing from elsewhere.
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self'; style-src 'self'; "
        b"img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
        b"frame-ancestors 'none'; form-action 'self'",
    ),
]
# Served without a token: the page (it asks for one), the health probe, and git hosts'
# webhooks (a delivery carries its repository's signature instead, checked by its route).
OPEN_PATHS = frozenset({"/", "/healthz"})
OPEN_PREFIXES = ("/ui/", "/api/v1/hooks/")


def _is_open(scope) -> bool:
    """Whether the request's path is open, read below the app's mount point: behind a Serve
    `route_prefix` (or any proxy setting `root_path`) the paths arrive with the prefix."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :] or "/"
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


class Guard:
    """Checks `Authorization` before anything else happens: a caller without a valid token
    gets its 401 before a byte of its body is read, parsed or stored; a valid one's grant is
    put in the request's state. Adds the security headers to every answer."""

    def __init__(self, app, grants: Callable[[], list[tokens.Grant]]) -> None:
        self.app = app
        self.grants = grants

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        if not _is_open(scope):
            authorization = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            scheme, _, token = authorization.partition(" ")
            grant = (
                tokens.match(token.strip(), self.grants()) if scheme.lower() == "bearer" else None
            )
            if grant is None:
                reason = "missing" if not authorization else "invalid"
                await JSONResponse(
                    {"detail": f"{reason} token: send 'Authorization: Bearer <token>'"},
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )(scope, receive, with_headers)
                return
            # What the token may do, for the routes (cicd_ray.api.dependencies):
            # request.state.grant.
            scope.setdefault("state", {})["grant"] = grant
        await self.app(scope, receive, with_headers)


class BodyLimit:
    """Answers 413 for a body over the limit: by its Content-Length before reading anything,
    or, for a chunked body, as soon as the bytes received pass the limit."""

    def __init__(self, app, limit: Callable[[], int]) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit()
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await self._reject(send, int(declared), limit)
            return
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise _TooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._reject(send, received, limit)

    @staticmethod
    async def _reject(send, size: int, limit: int) -> None:
        await JSONResponse(
            {"detail": f"body of {size} bytes is over the {limit} byte limit"}, status_code=413
        )({"type": "http"}, None, send)
