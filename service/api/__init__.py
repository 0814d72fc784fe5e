"""The HTTP API: one router per resource, dependencies in :mod:`service.api.deps`."""
from fastapi import APIRouter

from . import catalog, health, leaderboard, runs, trials

api_router = APIRouter()
for _module in (runs, trials, leaderboard, catalog, health):
    api_router.include_router(_module.router)

__all__ = ["api_router"]
