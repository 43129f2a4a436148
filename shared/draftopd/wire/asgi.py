"""``AuthFirst``: a plain ASGI wrapper that refuses a request before its body is read.

Frameworks parse and validate a request body before they run the route's dependencies, so a
client without a token and with a malformed body would learn about the body first (400/422)
instead of getting its 401. Both services wrap their app in ``AuthFirst`` with a ``check`` that
looks only at the method, the path and the Authorization header. It uses no web framework: it
sends the two raw ASGI messages of a JSON response itself.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True)
class Refusal:
    status: int  # 401 or 403
    detail: str  # the JSON body's "detail"
    headers: dict[str, str] = field(default_factory=dict)  # e.g. WWW-Authenticate


# check(method, path, authorization header or None) -> a refusal, or None to let it through
Check = Callable[[str, str, str | None], Refusal | None]


class AuthFirst:
    def __init__(self, app: ASGIApp, check: Check) -> None:
        self.app, self.check = app, check

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = {k.lower(): v for k, v in scope.get("headers", [])}
            raw = headers.get(b"authorization")
            refusal = self.check(
                scope["method"], scope["path"], None if raw is None else raw.decode("latin-1")
            )
            if refusal is not None:
                await _send_json(send, refusal)
                return
        await self.app(scope, receive, send)


async def _send_json(send: Send, refusal: Refusal) -> None:
    body = json.dumps({"detail": refusal.detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in refusal.headers.items()]
    await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (None if absent or another
    scheme)."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


__all__ = ["AuthFirst", "Check", "Refusal", "bearer_token"]
