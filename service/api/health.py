"""GET /healthz: the database answers and carries a schema version."""
from fastapi import APIRouter, Response, status
from sqlalchemy.exc import SQLAlchemyError

from service.db import current_revision

from .deps import EngineDep
from .schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, responses={503: {"model": Health}})
def healthz(engine: EngineDep, response: Response):
    """200 with the Alembic revision when the database is reachable and migrated, else 503."""
    try:
        version = current_revision(engine)
    except SQLAlchemyError as e:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        return Health(status="error", database=f"unreachable: {type(e).__name__}: {str(e).splitlines()[0]}")
    if version is None:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        return Health(status="error", database="not migrated")
    return Health(status="ok", database=engine.dialect.name, schema_version=version)
