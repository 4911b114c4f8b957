"""The OpenAI-compatible server: ``/v1/chat/completions``, ``/v1/completions``,
``/v1/responses``, ``/v1/models`` (and ``/{id}``), ``/healthz``, ``/metrics``;
docs/serving.md has every parameter.

Each app of the settings is an app of one :class:`~guardrail.service.GuardService` (its guard
config, trust policy and store namespace) over one loaded model; the service batches every app's
requests together. Requests go from OpenAI JSON to guard calls directly (no LangChain).
Status codes: 401 (missing or wrong key), 404 (another model),
413 (request too large), 429 with ``Retry-After`` (too many concurrent requests for the app),
400 (bad input, with the typed error's message), 503 (guard unavailable and failing closed).
Every answer carries its decision record as the extra field ``safety`` and the headers
``x-guardrail-call-id`` and ``x-guardrail-decision`` (JSON). A stream's headers carry the
decision as planned before generation, and its last chunk the whole record.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.types import Receive, Scope, Send

from adapters.remote_images import RemoteImageFetcher
from adapters.server.chat import ChatCompletionRequest
from adapters.server.metrics import ServerMetrics
from adapters.server.middleware import REQUEST_ID_HEADER, RequestIds, UnforeseenErrors
from adapters.server.protocol import Endpoint, Streamer, error_body
from adapters.server.responses import ResponsesRequest
from adapters.server.runners import LocalRunner, Runner
from adapters.server.settings import AppSettings, ServerSettings
from adapters.server.text_completions import CompletionRequest
from guardrail import GuardedOutput
from guardrail.decision import GuardDecision, log_decision
from guardrail.errors import (
    GuardrailError,
    GuardUnavailableError,
    InvalidInputError,
    OverloadedError,
)
from guardrail.planning import refusal_record
from guardrail.service import Call, Delta

CALL_ID_HEADER = "x-guardrail-call-id"
# The decision record as one JSON line (ASCII), for clients that read headers but drop unknown
# body fields: ChatOpenAI(include_response_headers=True) puts it in response_metadata.
DECISION_HEADER = "x-guardrail-decision"


def decision_headers(safety: dict[str, Any] | None) -> dict[str, str]:
    """The call id and decision headers of a (non-streamed) answer or refusal."""
    if safety is None:
        return {}
    return {CALL_ID_HEADER: safety["call_id"], DECISION_HEADER: json.dumps(safety)}


class _DeadlineStream(StreamingResponse):
    """A streamed response that ends by ``deadline_s`` however slowly the client reads
    (cancelling it closes the generation)."""

    def __init__(
        self, content: AsyncIterator[str], deadline_s: float, headers: dict[str, str]
    ) -> None:
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self.deadline_s = deadline_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        with anyio.move_on_after(self.deadline_s):
            await super().__call__(scope, receive, send)


class _Slots:
    """Concurrent requests per app (the event loop is the only writer)."""

    def __init__(self) -> None:
        self.busy: dict[str, int] = {}

    def take(self, app: AppSettings) -> bool:
        if self.busy.get(app.name, 0) >= app.max_concurrent:
            return False
        self.busy[app.name] = self.busy.get(app.name, 0) + 1
        return True

    def give(self, app: AppSettings) -> None:
        self.busy[app.name] -= 1


def create_app(settings: ServerSettings, runner: Runner | None = None) -> FastAPI:
    """The ASGI app. Without ``runner``, the model runs in this process and loads at startup
    (the server answers once it is loaded); with one (Ray Serve replicas), calls go to it."""
    metrics = ServerMetrics()
    slots = _Slots()
    fetcher = RemoteImageFetcher(**settings.images.model_dump())

    @asynccontextmanager
    async def lifespan(api: FastAPI) -> AsyncIterator[None]:
        if runner is None:
            local = LocalRunner(settings)
            await local.start()
            api.state.runner = local
        yield

    docs = settings.docs  # the schema and its pages answer without a key: off unless asked
    api = FastAPI(
        title="cmrm-guardrail",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )

    api.add_middleware(
        UnforeseenErrors, on_error=lambda: metrics.requests.labels("unknown", "500").inc()
    )
    if settings.cors_origins:
        api.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", REQUEST_ID_HEADER],
            expose_headers=[REQUEST_ID_HEADER, CALL_ID_HEADER, DECISION_HEADER],
        )
    api.add_middleware(RequestIds)
    api.state.runner = runner

    def running() -> Runner:
        current: Runner | None = api.state.runner
        if current is None:
            raise GuardUnavailableError("the model is not loaded yet")
        return current

    def respond(app: str, status: int, body: dict[str, Any], **headers: str) -> JSONResponse:
        metrics.requests.labels(app, str(status)).inc()
        return JSONResponse(body, status_code=status, headers=headers)

    def refused(app: str, error: GuardrailError) -> JSONResponse:
        decision = error.decision.model_dump(mode="json") if error.decision else None
        metrics.refusal(app, type(error).__name__)
        statuses = {GuardUnavailableError: 503, InvalidInputError: 400, OverloadedError: 429}
        status = next((v for k, v in statuses.items() if isinstance(error, k)), 500)
        headers = decision_headers(decision)
        body = error_body(f"{type(error).__name__}: {error}", "guardrail_error", safety=decision)
        return respond(app, status, body, **headers)

    @api.get("/healthz")
    async def healthz() -> JSONResponse:
        current: Runner | None = api.state.runner
        apps = await current.health() if current is not None else {}
        ready = len(apps) == len(settings.apps)
        body = {"status": "ok" if ready else "loading", "model": settings.model, "apps": apps}
        return JSONResponse(body, status_code=200 if ready else 503)

    @api.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4")

    started = int(time.time())
    model_entry = {
        "id": settings.model,
        "object": "model",
        "created": started,
        "owned_by": "cmrm-guardrail",
    }

    def app_of(request: Request) -> AppSettings | None:
        """The app whose API key the request carries."""
        key = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        return settings.app_for(key or None)

    def denied() -> JSONResponse:
        body = error_body("missing or unknown API key", "authentication_error", "invalid_api_key")
        return respond("unknown", 401, body)

    @api.get("/v1/models")
    async def models(request: Request) -> Response:
        if app_of(request) is None:
            return denied()
        return JSONResponse({"object": "list", "data": [model_entry]})

    @api.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> Response:
        if app_of(request) is None:
            return denied()
        if model_id != settings.model:
            return JSONResponse(model_not_found(f"the model {model_id!r} does not exist"), 404)
        return JSONResponse(model_entry)

    def documented(kind: type[BaseModel]) -> dict[str, Any]:
        """The body is read by hand (counted while it arrives); the schema documents it."""
        schema = {"application/json": {"schema": kind.model_json_schema()}}
        return {"requestBody": {"required": True, "content": schema}}

    @api.post("/v1/chat/completions", openapi_extra=documented(ChatCompletionRequest))
    async def chat_completions(request: Request) -> Response:
        return await serve(request, ChatCompletionRequest)

    @api.post("/v1/completions", openapi_extra=documented(CompletionRequest))
    async def text_completions(request: Request) -> Response:
        return await serve(request, CompletionRequest)

    @api.post("/v1/responses", openapi_extra=documented(ResponsesRequest))
    async def responses(request: Request) -> Response:
        return await serve(request, ResponsesRequest)

    async def serve(request: Request, kind: type[BaseModel]) -> Response:
        """One generating request of any endpoint: key, body, limits, slot, deadline, then the
        guard's answer (streamed or whole) in the endpoint's shape."""
        arrived = time.monotonic()
        app = app_of(request)
        if app is None:
            return denied()
        name = app.name
        declared = request.headers.get("content-length", "0")
        raw = None
        if not (declared.isdigit() and int(declared) > app.max_request_bytes):
            raw = await _read_body(request, app.max_request_bytes)
        if raw is None:
            body = error_body(
                f"request over {app.max_request_bytes:,} bytes", "invalid_request_error"
            )
            return respond(name, 413, body)
        try:
            call: Endpoint = kind.model_validate_json(raw)  # type: ignore[assignment]
        except ValidationError as e:
            errors = e.errors()
            summary = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in errors)
            field = str(errors[0]["loc"][0]) if errors and errors[0]["loc"] else None
            return respond(name, 400, error_body(summary, "invalid_request_error", param=field))
        if call.model != settings.model:
            return respond(name, 404, model_not_found(f"this server runs {settings.model}"))
        tokens = call.requested_tokens or app.max_tokens
        if tokens > app.max_tokens:
            body = error_body(
                f"max_tokens is at most {app.max_tokens}",
                "invalid_request_error",
                param="max_tokens",
            )
            return respond(name, 400, body)
        if not slots.take(app):
            body = error_body(f"more than {app.max_concurrent} concurrent requests", "rate_limit")
            return respond(name, 429, body, **{"Retry-After": "1"})
        handed_over = False
        try:
            # One deadline from arrival: image fetches and generation end a little before the
            # response must (the answer still gets out); the slot is back by then.
            ends = arrived + app.max_request_s
            answer_by = arrived + 0.8 * app.max_request_s
            model_calls = await anyio.to_thread.run_sync(
                call.guard_calls, name, tokens, answer_by, fetcher.until(answer_by)
            )
            if call.stream:
                (model_call,) = model_calls
                response = await _stream(app, model_call, call.streamer(settings.model), arrived)
                handed_over = True  # the stream gives the slot back when it ends
                return response
            with anyio.fail_after(max(0.0, ends - time.monotonic())):
                outputs = await _unless_client_leaves(request, _all(model_calls))
            if outputs is None:  # the client went away: generation stopped, nobody to answer
                metrics.requests.labels(name, "499").inc()
                return Response(status_code=499)
            for output in outputs:
                metrics.decision(name, output.decision.model_dump(mode="json"))
                metrics.usage(name, output.usage.prompt_tokens, output.usage.completion_tokens)
            metrics.latency.labels(name).observe(time.monotonic() - arrived)
            body = call.response(outputs, settings.model)
            one = outputs[0].decision.model_dump(mode="json") if len(outputs) == 1 else None
            return respond(name, 200, body, **decision_headers(one))
        except GuardrailError as e:
            if e.decision is None:  # refused while reading the body (a bad image URL...)
                e.decision = _refusal_record(e, app, settings.model)
            return refused(name, e)
        except TimeoutError:
            body = error_body(f"no answer within {app.max_request_s} s", "timeout")
            return respond(name, 504, body)
        finally:
            if not handed_over:
                slots.give(app)

    async def _all(calls: list[Call]) -> list[GuardedOutput]:
        """Every call's output, the calls run together (the first error is raised)."""
        if len(calls) == 1:
            return [await running().invoke(calls[0])]
        outputs: list[GuardedOutput | None] = [None] * len(calls)

        async def one(index: int, call: Call) -> None:
            outputs[index] = await running().invoke(call)

        try:
            async with anyio.create_task_group() as group:
                for index, call in enumerate(calls):
                    group.start_soon(one, index, call)
        except BaseExceptionGroup as group_error:
            raise group_error.exceptions[0] from None
        return [output for output in outputs if output is not None]

    async def _stream(
        app: AppSettings, model_call: Call, streamer: Streamer, arrived: float
    ) -> Response:
        """Start the stream; errors before the first piece get their own status code."""
        name = app.name
        ends = arrived + app.max_request_s
        pieces = running().stream(model_call)
        planned: dict[str, Any] | None = None
        try:
            first: GuardDecision | Delta | GuardedOutput | None = await anext(pieces)
            if isinstance(first, GuardDecision):
                planned = first.model_dump(mode="json")
                first = await anext(pieces)
        except StopAsyncIteration:
            first = None
        except BaseException:
            await pieces.aclose()
            raise

        async def events() -> AsyncIterator[str]:
            piece = first
            try:
                for event in streamer.start():
                    yield event
                while piece is not None:
                    if isinstance(piece, GuardDecision):
                        pass
                    elif isinstance(piece, GuardedOutput):
                        metrics.decision(name, piece.decision.model_dump(mode="json"))
                        for event in streamer.end(piece):
                            yield event
                        metrics.usage(
                            name, piece.usage.prompt_tokens, piece.usage.completion_tokens
                        )
                    elif piece.text:
                        for event in streamer.delta(piece):
                            yield event
                    piece = await anext(pieces, None)
                for event in streamer.done():
                    yield event
                metrics.requests.labels(name, "200").inc()
                metrics.latency.labels(name).observe(time.monotonic() - arrived)
            finally:  # done, failed, client gone or deadline: generation stops, slot returns
                with anyio.CancelScope(shield=True):
                    await pieces.aclose()
                slots.give(app)

        left = max(0.0, ends - time.monotonic())
        return _DeadlineStream(events(), left, decision_headers(planned))

    return api


def model_not_found(message: str) -> dict[str, Any]:
    """The 404 body of a request for a model this server does not run."""
    return error_body(message, "invalid_request_error", "model_not_found", param="model")


async def _unless_client_leaves(
    request: Request, work: Coroutine[Any, Any, list[GuardedOutput]]
) -> list[GuardedOutput] | None:
    """``work``'s result, or None once the client disconnects (``work`` is then cancelled,
    which stops its generation and frees its slot)."""
    result: list[GuardedOutput] | None = None
    error: Exception | None = None
    async with anyio.create_task_group() as group:

        async def run() -> None:
            nonlocal result, error
            try:
                result = await work
            except Exception as e:  # raised as itself below, not inside an ExceptionGroup
                error = e
            group.cancel_scope.cancel()

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            group.cancel_scope.cancel()

        group.start_soon(run)
        group.start_soon(watch)
    if error is not None:
        raise error
    return result


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The body, or None as soon as it passes ``limit`` bytes (a chunked body declares no
    length: it is counted while it arrives, never held whole)."""
    pieces, size = [], 0
    async for piece in request.stream():
        size += len(piece)
        if size > limit:
            return None
        pieces.append(piece)
    return b"".join(pieces)


def _refusal_record(error: GuardrailError, app: AppSettings, model: str) -> Any:
    """The decision record of a call refused before it reached the guard service."""
    decision = refusal_record(error, app.guard, app.guard.layers or (), model, app.name)
    log_decision(decision)
    return decision
