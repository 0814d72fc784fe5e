"""GET /leaderboard: estimators ranked per dataset × model × bits (aggregated in SQL by the store)."""
from fastapi import APIRouter

from service import store

from .deps import RowIdFilter, SessionDep
from .schemas import LeaderboardRow, RankMetric

router = APIRouter(tags=["results"])


@router.get("/leaderboard", response_model=list[LeaderboardRow])
def leaderboard(session: SessionDep, dataset: str | None = None, model: str | None = None,
                run_id: RowIdFilter = None, metric: RankMetric = store.DEFAULT_RANK_METRIC):
    """Mean test accuracy over seeds with std, n and a 95% interval; rank 1 is best per bits.
    ``metric``: ``final`` (the trained network's) or ``selected`` (at the best validation epoch).
    ``run_id`` restricts it to one run."""
    return store.leaderboard(session, dataset=dataset, model=model, run_id=run_id, metric=metric)
