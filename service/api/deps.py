"""Request dependencies: settings, a DB session per request, id and paging parameters, the guards
of writes (same-origin JSON, bearer token), the spec body."""
from __future__ import annotations

import json
import secrets
import typing
from collections.abc import Iterator, Sequence
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Path, Query, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ValidationError
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from service.config import Settings
from service.origins import canonical_origin
from service.tables import MAX_ID
from workers.spec import ExperimentSpec, parse_spec


def http_error(code: int, loc: Sequence[str | int], msg: str, kind: str,
               headers: dict[str, str] | None = None) -> HTTPException:
    """An HTTPException whose body has FastAPI's 422 shape: ``{"detail": [{loc, msg, type}]}``."""
    return HTTPException(code, detail=[{"loc": list(loc), "msg": msg, "type": kind}], headers=headers)


def not_found(what: str, ident: int, param: str) -> HTTPException:
    return http_error(status.HTTP_404_NOT_FOUND, ("path", param), f"{what} {ident} not found", "not_found")


# -- settings and session ---------------------------------------------------------------------
# trivial dependencies are coroutines: no worker-thread hop per request
async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_engine(request: Request) -> Engine:
    return request.app.state.engine


def get_session(request: Request) -> Iterator[Session]:
    """One session per request, committed when the handler returns and rolled back if it raises."""
    with request.app.state.session_factory() as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]
# At most this many requests of a process hold a session at once; the rest wait without a thread.
# More only queue on SQLite's one writer and the GIL: 20 concurrent POST /runs on 2 CPUs went
# from 134 to ~280 requests/s and p99 from 670 to ~100 ms (bench/api_latency.py).
DB_CONCURRENCY = 4
SessionDep = Annotated[Session, Depends(get_session, scope="function", max_concurrency=DB_CONCURRENCY)]

# -- ids and paging ---------------------------------------------------------------------------
# An id outside its column's range names no row: it is refused here (422, like any bad parameter)
# instead of reaching the database driver, where it overflows (a 500).
RowId = Annotated[int, Path(ge=1, le=MAX_ID, description=f"an id, 1 … {MAX_ID}")]
RowIdFilter = Annotated[int | None, Query(ge=1, le=MAX_ID, description=f"an id, 1 … {MAX_ID}")]
Offset = Annotated[int, Query(ge=0, le=MAX_ID, description="rows to skip")]

# -- writes: same-origin JSON ------------------------------------------------------------------
async def same_origin_json(request: Request, settings: SettingsDep) -> None:
    """Writes come from this service's own pages or from clients that are not browsers, as JSON.

    A browser names the sending page in ``Origin``; an origin that is neither the request's own
    (its scheme, ``Host`` and port) nor in ``BITBENCH_ALLOWED_ORIGINS`` is refused (403). A request
    without ``Origin`` (curl, the CLI) passes. The body must be ``application/json`` (415
    otherwise): the forms and ``text/plain`` posts that another site may send without a CORS
    preflight cannot be. Both hold with a token configured or not.
    """
    origin = request.headers.get("origin")
    if origin is not None:
        own = canonical_origin(f"{request.url.scheme}://{request.url.netloc}")
        if canonical_origin(origin) not in (own, *settings.allowed_origins):
            raise http_error(status.HTTP_403_FORBIDDEN, ("header", "Origin"),
                             f"a write from {origin[:200]!r} is refused: only this service's own pages ({own}) "
                             "and the origins in BITBENCH_ALLOWED_ORIGINS may write", "cross_origin")
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        got = f"not {media_type[:100]!r}" if media_type else "and this request has no Content-Type"
        raise http_error(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, ("header", "Content-Type"),
                         f"writes take Content-Type: application/json, {got}", "unsupported_media_type")


# -- auth -------------------------------------------------------------------------------------
_bearer = HTTPBearer(auto_error=False, description="BITBENCH_API_TOKEN; writes need it when it is set")


async def require_token(settings: SettingsDep,
                        creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    """Writes need ``Authorization: Bearer <BITBENCH_API_TOKEN>`` when a token is configured."""
    expected = settings.api_token
    if not expected:
        return
    if creds is None:
        raise http_error(status.HTTP_401_UNAUTHORIZED, ("header", "Authorization"),
                         "a bearer token is required (Authorization: Bearer <token>)", "missing_token",
                         {"WWW-Authenticate": 'Bearer realm="bitbench"'})
    if not secrets.compare_digest(creds.credentials.encode(), expected.encode()):
        raise http_error(status.HTTP_401_UNAUTHORIZED, ("header", "Authorization"), "the bearer token is wrong",
                         "invalid_token", {"WWW-Authenticate": 'Bearer realm="bitbench", error="invalid_token"'})


WRITE_GUARDS = [Depends(same_origin_json), Depends(require_token)]  # every write route's dependencies

# -- the spec body ----------------------------------------------------------------------------
def _field_names(model: type[BaseModel], seen: set[type] | None = None) -> set[str]:
    """Field names of ``model`` and of the models nested in its annotations."""
    seen = seen if seen is not None else set()
    seen.add(model)
    names = set(model.model_fields)
    stack: list[Any] = [f.annotation for f in model.model_fields.values()]
    while stack:
        tp = stack.pop()
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            if tp not in seen:
                names |= _field_names(tp, seen)
        else:
            stack.extend(typing.get_args(tp))
    return names


_SPEC_FIELDS = _field_names(ExperimentSpec)


def spec_errors(exc: ValidationError) -> list[dict[str, Any]]:
    """pydantic errors of a spec as request errors: loc under ``body``, union-branch tags removed.

    A union (``"aqe"`` or ``{"name": …}``; one bits cell or a list) reports a failure per
    branch, with the branch's type name in ``loc``. The tags go; a branch that failed only on
    its type is dropped when another branch of the same union says something more specific.
    """
    rows = []
    for err in exc.errors(include_url=False, include_context=False):
        loc = tuple(err["loc"])
        keys = loc[:-1] if err["type"] == "extra_forbidden" else loc  # an unknown field ends its loc
        tags = [i for i, p in enumerate(keys) if isinstance(p, str) and p not in _SPEC_FIELDS]
        vague = bool(tags) and tags[-1] == len(loc) - 1 and err["type"].endswith("_type")
        row = {"loc": ["body", *(p for i, p in enumerate(loc) if i not in tags)], "msg": err["msg"],
               "type": err["type"]}
        if loc:  # the whole body is not echoed back
            row["input"] = err["input"]
        rows.append(([loc[:t] for t in tags], vague, row))
    specific = {u for unions, vague, _ in rows for u in (unions[:-1] if vague else unions)}
    out: list[dict[str, Any]] = []
    for unions, vague, row in rows:
        if not (vague and unions[-1] in specific) and row not in out:
            out.append(row)
    return out


async def spec_body(request: Request, settings: SettingsDep) -> ExperimentSpec:
    """The request body parsed with :func:`workers.spec.parse_spec` (grid limit from settings)."""
    raw = await request.body()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestValidationError([{"loc": ["body"], "msg": f"the body is not UTF-8 JSON: {e.reason}",
                                       "type": "json_invalid"}]) from None
    try:
        return parse_spec(text, max_trials_limit=settings.max_trials)
    except ValidationError as e:
        raise RequestValidationError(spec_errors(e)) from None


SpecBody = Annotated[ExperimentSpec, Depends(spec_body)]

NO_PARAMETERS_BODY = {  # how no_parameters' body shows in /docs
    "requestBody": {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "maxProperties": 0, "description": "{} (or an empty body): no parameters"}}}},
}


async def no_parameters(request: Request) -> None:
    """The body of a write that takes no parameters: ``{}``, or nothing at all (422 otherwise)."""
    raw = await request.body()
    if not raw.strip():
        return
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, nested past the parser's limit
        raise RequestValidationError([{"loc": ["body"], "msg": f"the body is not JSON: {e}"[:300],
                                       "type": "json_invalid"}]) from None
    if value != {}:
        raise RequestValidationError([{"loc": ["body"], "msg": "this request takes no parameters: send {} or nothing",
                                       "type": "no_parameters"}])
