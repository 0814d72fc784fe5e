"""GET /leaderboard: estimators ranked per protocol × bits (aggregated in SQL by the store)."""
from typing import Annotated

from fastapi import APIRouter, Query

from service import store
from workers.protocol import PROTOCOL_ID_LENGTH, PROTOCOL_ID_PATTERN

from .deps import RowIdFilter, SessionDep
from .schemas import LeaderboardRow, RankMetric

router = APIRouter(tags=["results"])

ProtocolFilter = Annotated[str | None, Query(pattern=PROTOCOL_ID_PATTERN, description=(
    f"a protocol id ({PROTOCOL_ID_LENGTH} lowercase hex digits, as the rows' `protocol`): only its rows"))]


@router.get("/leaderboard", response_model=list[LeaderboardRow])
def leaderboard(session: SessionDep, dataset: str | None = None, model: str | None = None,
                protocol: ProtocolFilter = None, run_id: RowIdFilter = None,
                metric: RankMetric = store.DEFAULT_RANK_METRIC):
    """Mean test accuracy over seeds with std, n and a 95% interval; rank 1 is best per protocol and bits.
    Trials of different protocols (data set and options, model, first/last layer, epochs, batch size,
    optimizer, schedule, definitions' version) are never pooled; within one, the latest finished trial
    of each seed counts and ``set_aside`` says how many older repeats were left out.
    ``metric``: ``final`` (the trained network's) or ``selected`` (at the best validation epoch).
    ``run_id`` restricts it to one run."""
    return store.leaderboard(session, dataset=dataset, model=model, protocol=protocol, run_id=run_id, metric=metric)
