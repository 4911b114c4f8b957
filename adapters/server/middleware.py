"""ASGI middleware of the server: request ids, and unforeseen errors answered in OpenAI's error
shape without dropping the connection."""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapters.server.protocol import error_body

REQUEST_ID_HEADER = "x-request-id"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
log = logging.getLogger("adapters.server")


class RequestIds:
    """Every response carries ``x-request-id``: the client's, when it sent a plain one (at
    most 128 letters, digits and ``._:-``), else a new one."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1")
        request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex

        async def with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0] != b"x-request-id"]
                headers.append((REQUEST_ID_HEADER.encode(), request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_id)


class UnforeseenErrors:
    """An exception that escapes a route before its response started is answered as HTTP 500
    in OpenAI's error shape, counted by ``on_error``, and the connection stays usable (Starlette's
    own handler re-raises after answering, and the server then drops the keep-alive
    connection)."""

    def __init__(self, app: ASGIApp, on_error: Callable[[], None]) -> None:
        self.app, self.on_error = app, on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as error:
            if started:
                raise  # nothing left to answer with: the server closes the stream
            log.exception("unforeseen error in %s", scope.get("path"))
            self.on_error()
            body = error_body(f"internal error: {type(error).__name__}", "server_error")
            await JSONResponse(body, status_code=500)(scope, receive, send)
