"""GET /catalog: what a spec may name (estimators with parameters and formulas, named methods, models,
datasets, bits)."""
from fastapi import APIRouter

import estimators
from workers.datasets import list_datasets
from workers.methods import method_catalog
from workers.models import list_models
from workers.spec import ALLOWED_BITS

from .deps import SettingsDep
from .schemas import Catalog

router = APIRouter(tags=["catalog"])


@router.get("/catalog", response_model=Catalog)
def catalog(settings: SettingsDep):
    """The registries behind the spec's names, and the grid-size limit."""
    return Catalog(estimators=estimators.estimator_catalog(), methods=method_catalog(), models=list_models(),
                   datasets=list_datasets(),
                   bits=list(ALLOWED_BITS), max_trials=settings.max_trials)
