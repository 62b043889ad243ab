"""The Starlette app: OpenAI's routes, /healthz and /metrics, behind one guard.

    Guard (ASGI) ── counts every answer by route and status (sllmd_http_requests_total);
       │            /v1 while stopping: 503 shutting_down; /v1 without the key: 401
       └── Starlette routes
             POST /v1/chat/completions, /v1/completions  -> an InferJob (streaming.py)
             GET  /v1/models, /v1/models/{model}          -> catalog.py
             GET  /healthz, /metrics

Every endpoint answers its own failures in OpenAI's error shape (`_answers_errors`),
so nothing a request holds reaches Starlette's or uvicorn's error pages, and
nothing in a body (however large, deep or odd) can stop the daemon: a body over
`max_body` bytes is a 413, malformed JSON a 400.
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sllmd.errors import (BadMessageError, CancelledError, ModelNotFoundError, OversizedError, ShuttingDownError,
                          SllmError)
from sllmd.http import catalog
from sllmd.http.auth import check_bearer
from sllmd.http.errors import HttpError, http_error
from sllmd.http.metrics import Metrics
from sllmd.http.openai_schema import parse_chat, parse_completion
from sllmd.http.streaming import InferJob, InferResponse, Streams

log = logging.getLogger(__name__)

DISCARD_BYTES = 64 << 20   # past the limit, a body is read (and dropped) this far so the client hears the 413
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/healthz", "/metrics")


@dataclass
class Frontend:
    """What the routes serve from: the node, the cluster (None: this node only) and the limits."""

    node: Any
    cluster: Any
    node_name: str
    max_body: int
    streams: Streams
    api_key: str | None = None
    metrics: Metrics = field(default_factory=Metrics)
    accepting: bool = True

    def infer(self, request, cancelled):
        """An infer exactly as the IPC server runs it: placed cluster-wide, else on this node."""
        if self.cluster is not None:
            return self.cluster.infer(request, cancelled)
        return self.node.infer(request, cancelled=cancelled)


def error_response(error: HttpError) -> Response:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers())


def _answers_errors(fn: Callable) -> Callable:
    @functools.wraps(fn)
    async def wrapped(request: Request):
        try:
            return await fn(request)
        except (HttpError, SllmError) as e:
            return error_response(http_error(e))
        except Exception as e:
            log.exception("%s %s failed unexpectedly", request.method, request.url.path)
            return error_response(http_error(e))
    return wrapped


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON: 413 past `limit` bytes, 400 when it is not (strict) JSON."""
    too_large = False
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        too_large = True
    body = bytearray()
    seen = 0
    chunks = request.stream()
    while True:
        try:
            chunk = await chunks.__anext__()
        except StopAsyncIteration:
            break
        except ClientDisconnect:
            raise CancelledError("the client went away while sending its request") from None
        seen += len(chunk)
        if seen > limit:
            too_large = True
        if too_large:
            if seen > limit + DISCARD_BYTES:
                break
            continue
        body += chunk
    if too_large:
        raise http_error(OversizedError(f"the request body is larger than {limit} bytes"))
    try:
        return json.loads(bytes(body), parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:
        raise http_error(BadMessageError(f"the request body is not valid JSON: {str(e)[:200]}")) from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def build_app(front: Frontend) -> "Guard":
    async def completions(request: Request, parse) -> Response:
        parsed = parse(await read_json(request, front.max_body))
        job = InferJob(front.infer, parsed.request, front.streams, asyncio.get_running_loop())   # 429 when full
        front.metrics.http_in_flight.inc()
        model = parsed.request.model

        def on_done(status: int, stats: dict | None) -> None:
            front.metrics.http_in_flight.dec()
            front.metrics.completion(model, stats)

        job.start()
        return InferResponse(job, parsed, on_done)   # type: ignore[return-value]  (an ASGI app, as a Response is)

    @_answers_errors
    async def chat(request: Request) -> Response:
        return await completions(request, parse_chat)

    @_answers_errors
    async def text(request: Request) -> Response:
        return await completions(request, parse_completion)

    async def _objects() -> list[dict]:
        rows = await anyio.to_thread.run_sync(catalog.model_rows, front.node, front.cluster, front.node_name)
        return catalog.model_objects(rows)

    @_answers_errors
    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": await _objects()})

    @_answers_errors
    async def model(request: Request) -> Response:
        name = request.path_params["model"]
        for obj in await _objects():
            if obj["id"] == name:
                return JSONResponse(obj)
        raise ModelNotFoundError(f"no model named {name!r}")

    async def healthz(request: Request) -> Response:
        if not front.accepting:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        return JSONResponse({"status": "ok", "node": front.node_name})

    @_answers_errors
    async def metrics(request: Request) -> Response:
        return Response(await anyio.to_thread.run_sync(front.metrics.render), media_type=front.metrics.content_type)

    async def http_exception(request: Request, exc: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
        what = f"{request.method} {request.url.path}"
        message = {404: f"no such route: {what}", 405: f"method not allowed: {what}"}.get(exc.status_code,
                                                                                           str(exc.detail))
        return error_response(HttpError(exc.status_code, message, code))

    app = Starlette(routes=[
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", text, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model:path}", model, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ], exception_handlers={HTTPException: http_exception})
    return Guard(app, front)


def route_label(path: str) -> str:
    """A bounded label for a path (unknown paths are "other")."""
    if path in ROUTES:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "other"


class Guard:
    """Counts answers; refuses /v1 while stopping (503) or without the key (401)."""

    def __init__(self, app, front: Frontend):
        self.app, self.front = app, front

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [0]

        async def counted(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        path = scope.get("path", "")
        try:
            refusal = self._refusal(scope) if path.startswith("/v1") else None
            if refusal is not None:
                await error_response(refusal)(scope, receive, counted)
            else:
                await self.app(scope, receive, counted)
        finally:
            self.front.metrics.request(route_label(path), status[0] or 500)

    def _refusal(self, scope) -> HttpError | None:
        if not self.front.accepting:
            return http_error(ShuttingDownError("sllmd is shutting down"))
        if self.front.api_key is not None:
            header = None
            for k, v in scope.get("headers") or []:
                if k == b"authorization":
                    header = v.decode("latin-1")
                    break
            try:
                check_bearer(header, self.front.api_key)
            except SllmError as e:
                return http_error(e)
        return None
