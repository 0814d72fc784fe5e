"""GET /trials/{id}: one trial with its per-epoch metrics."""
from fastapi import APIRouter

from service import store

from .deps import RowId, SessionDep, not_found
from .schemas import ErrorOut, TrialDetail

router = APIRouter(prefix="/trials", tags=["trials"])


@router.get("/{trial_id}", response_model=TrialDetail, responses={404: {"model": ErrorOut}})
def get_trial(trial_id: RowId, session: SessionDep):
    """A trial (estimator, bits, seed, status, final metrics) and its metrics, one row per epoch."""
    trial = store.get_trial(session, trial_id)
    if trial is None:
        raise not_found("trial", trial_id, "trial_id")
    return trial
