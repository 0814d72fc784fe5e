"""Request logging: one line per HTTP request on the ``bitbench.api`` logger.

    GET /runs/7/trials 200 12.3 ms (run 7)

The ids a route names (``run_id``, ``trial_id``) are taken from the matched route's path
parameters, so a line can be found by the run or trial it concerns. Query strings are left out
(they may carry anything a client typed); bodies are never logged.
"""
from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("bitbench.api")
LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
ID_PARAMS = (("run_id", "run"), ("trial_id", "trial"))


def configure_logging(level: int = logging.INFO) -> None:
    """Log to stderr at ``level`` unless the process has configured logging itself (a no-op then)."""
    logging.basicConfig(level=level, format=LOG_FORMAT)


class RequestLog:
    """ASGI middleware: after each HTTP response, log method, path, status, time and the ids in its path."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500  # 500: the app raised before it answered

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            params = scope.get("path_params") or {}  # the router fills them in when a route matches
            ids = ", ".join(f"{name} {params[key]}" for key, name in ID_PARAMS if key in params)
            log.info("%s %s %d %.1f ms%s", scope["method"], scope["path"], status,
                     (time.perf_counter() - start) * 1e3, f" ({ids})" if ids else "")
