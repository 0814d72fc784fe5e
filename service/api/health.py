"""GET /healthz: the database answers and carries a schema version."""
import logging

from fastapi import APIRouter, Response, status
from sqlalchemy.exc import SQLAlchemyError

from service.db import current_revision

from .deps import EngineDep
from .schemas import Health

router = APIRouter(tags=["health"])
log = logging.getLogger(__name__)


@router.get("/healthz", response_model=Health, responses={503: {"model": Health}})
def healthz(engine: EngineDep, response: Response):
    """200 with the Alembic revision when the database is reachable and migrated, else 503. A public
    read: a failure shows its error type only (the driver's message names the host, port and
    user); the details go to the service log."""
    try:
        version = current_revision(engine)
    except SQLAlchemyError as e:
        log.error("healthz: the database %s is unreachable", engine.url.render_as_string(hide_password=True),
                  exc_info=True)
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        return Health(status="error", database=f"unreachable ({type(e).__name__}; details in the service log)")
    if version is None:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        return Health(status="error", database="not migrated")
    return Health(status="ok", database=engine.dialect.name, schema_version=version)
