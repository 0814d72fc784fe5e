"""The bitbench HTTP service: ``create_app(settings=None)``; ASGI app ``service.app:app``.

On startup the database is brought to the current schema (:func:`service.db.migrate`). The
routes live in :mod:`service.api`; the dashboard is mounted at ``/dashboard``; ``/`` redirects
there; OpenAPI docs are at ``/docs`` and ``/redoc``, served without a CDN (:mod:`service.api_docs`).
"""
from __future__ import annotations

import json
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dashboard import create_router as create_dashboard_router
from service import db
from service.api import api_router
from service.api.dashboard_source import StoreSource
from service.api_docs import add_docs
from service.config import Settings, get_settings
from service.request_log import RequestLog, configure_logging
from workers.spec import ExperimentSpec


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with a JSON 413, before anything parses them.

    The declared ``Content-Length`` is checked first; then the body is read and counted as it
    arrives (chunked or not, whatever the header claims) and handed on only if it fits.
    (FastAPI's own ``max_body_size`` answers an oversized Content-Length in plain text.)
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_bytes:
            return await self._too_large(send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._too_large(send)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, send: Send) -> None:
        msg = f"the request body is over {self.max_bytes} bytes (BITBENCH_MAX_BODY_BYTES)"
        body = json.dumps({"detail": [{"loc": ["body"], "msg": msg, "type": "body_too_large"}]}).encode()
        await send({"type": "http.response.start", "status": 413, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


async def method_not_allowed(request: Request, exc: Exception) -> Response:
    """A 405 whose ``Allow`` names every method of the path (RFC 9110, 15.5.6), not only those of the
    first route that matched it, as Starlette's does: GET and POST /runs are two routes."""
    assert isinstance(exc, StarletteHTTPException)  # registered for status 405 only

    def matched(method: str) -> bool:
        scope = {**request.scope, "method": method}
        return any(route.matches(scope)[0] is Match.FULL for route in request.app.router.routes)

    allowed = [m for m in HTTP_METHODS if matched(m)]
    headers = {**(exc.headers or {}), "Allow": ", ".join(allowed)}
    return await http_exception_handler(request, StarletteHTTPException(exc.status_code, exc.detail, headers))


@asynccontextmanager
async def _lifespan(app: FastAPI):
    db.migrate(app.state.engine)
    yield
    app.state.engine.dispose()


def _document_spec(app: FastAPI) -> None:
    """Publish ExperimentSpec (and its parts) in the OpenAPI components: POST /runs refers to it."""
    build = app.openapi

    def openapi() -> dict:
        fresh = app.openapi_schema is None
        schema = build()
        if fresh:
            spec = ExperimentSpec.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(spec.pop("$defs", {}), ExperimentSpec=spec)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend the schema


def create_app(settings: Settings | None = None) -> FastAPI:
    """The application over ``settings.database_url`` (default: :func:`service.config.get_settings`)."""
    settings = settings or get_settings()
    app = FastAPI(
        title="bitbench",
        version="0.1.0",
        summary="Which gradient estimator trains the best N-bit network?",
        description="Queue sweeps of estimators × bits × seeds; read runs, trials, metrics and leaderboards. "
                    "Writes take `Content-Type: application/json`, from this service's own pages or from clients "
                    "that send no `Origin`, and need `Authorization: Bearer <token>` when BITBENCH_API_TOKEN is set.",
        lifespan=_lifespan,
        docs_url=None, redoc_url=None,  # add_docs serves them, without a CDN
    )
    app.state.settings = settings
    app.state.engine = db.make_engine(settings.database_url)
    app.state.session_factory = db.session_factory(app.state.engine)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestLog)  # outermost: it also times and logs the 413s
    app.add_exception_handler(405, method_not_allowed)
    app.include_router(api_router)
    app.include_router(create_dashboard_router(StoreSource(app.state.session_factory)), prefix="/dashboard")

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/dashboard")

    add_docs(app)
    _document_spec(app)
    return app


configure_logging()  # uvicorn configures its own loggers only
app = create_app()
