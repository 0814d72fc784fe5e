"""GET /leaderboard: estimators ranked per dataset × model × bits (aggregated in SQL by the store)."""
from fastapi import APIRouter

from service import store

from .deps import RowIdFilter, SessionDep
from .schemas import LeaderboardRow

router = APIRouter(tags=["results"])


@router.get("/leaderboard", response_model=list[LeaderboardRow])
def leaderboard(session: SessionDep, dataset: str | None = None, model: str | None = None,
                run_id: RowIdFilter = None):
    """Mean final test accuracy over seeds with std, n and a 95% interval; rank 1 is best per bits.
    ``run_id`` restricts it to one run."""
    return store.leaderboard(session, dataset=dataset, model=model, run_id=run_id)
