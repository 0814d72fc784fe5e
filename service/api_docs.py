"""The API's documentation pages, ``/docs`` (Swagger UI) and ``/redoc``, served whole by the app.

FastAPI's own pages load Swagger UI, ReDoc, a favicon and Google Fonts from CDNs, so on a cluster
without internet they are blank. Here the scripts, the stylesheet and the favicon come from the
``fastapi-offline`` package (the Swagger UI and ReDoc bundles it ships), under
``/docs/assets/``, as the dashboard serves plotly.js from the installed plotly. ReDoc's bundle
hard-wires one remote image, the Redocly logo in its sidebar; it is served with an empty image there.
"""
from __future__ import annotations

from functools import lru_cache
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, swagger_ui_default_parameters
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

DOCS_URL, REDOC_URL, ASSETS_URL = "/docs", "/redoc", "/docs/assets"
# validatorUrl None: no badge that asks validator.swagger.io about the schema
SWAGGER_PARAMETERS = {**swagger_ui_default_parameters, "validatorUrl": None}
ASSETS = resources.files("fastapi_offline") / "static"
REDOC_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"
EMPTY_IMAGE = "data:image/svg+xml,%3Csvg%20xmlns%3D%22http%3A%2F%2Fwww.w3.org%2F2000%2Fsvg%22%2F%3E"


@lru_cache(maxsize=1)
def redoc_bundle() -> bytes:
    """ReDoc's standalone bundle with its remote logo replaced by an empty inline image."""
    return (ASSETS / "redoc.standalone.js").read_text(encoding="utf-8").replace(REDOC_LOGO, EMPTY_IMAGE).encode()


def add_docs(app: FastAPI) -> None:
    """Add ``/docs``, ``/redoc`` and their assets to ``app`` (made with ``docs_url=None, redoc_url=None``)."""
    @app.get(f"{ASSETS_URL}/redoc.standalone.js", include_in_schema=False)
    def redoc_js() -> Response:
        return Response(redoc_bundle(), media_type="text/javascript; charset=utf-8",
                        headers={"Cache-Control": "public, max-age=86400"})

    app.mount(ASSETS_URL, StaticFiles(directory=str(ASSETS)), name="docs-assets")  # after: redoc_js wins

    def urls(request: Request) -> tuple[str, str]:
        root = request.scope.get("root_path", "")
        return root + (app.openapi_url or ""), root + ASSETS_URL

    @app.get(DOCS_URL, include_in_schema=False)
    def swagger_ui(request: Request) -> HTMLResponse:
        openapi, assets = urls(request)
        return get_swagger_ui_html(openapi_url=openapi, title=f"{app.title} - API",
                                   swagger_js_url=f"{assets}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{assets}/swagger-ui.css",
                                   swagger_favicon_url=f"{assets}/favicon.png",
                                   swagger_ui_parameters=SWAGGER_PARAMETERS)

    @app.get(REDOC_URL, include_in_schema=False)
    def redoc(request: Request) -> HTMLResponse:
        openapi, assets = urls(request)
        return get_redoc_html(openapi_url=openapi, title=f"{app.title} - API",
                              redoc_js_url=f"{assets}/redoc.standalone.js", redoc_favicon_url=f"{assets}/favicon.png",
                              with_google_fonts=False)

    app.docs_url, app.redoc_url = DOCS_URL, REDOC_URL  # where they are, for links (the dashboard's)
