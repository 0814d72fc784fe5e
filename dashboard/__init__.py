"""bitbench dashboard: plotly figures and server-rendered pages over plain records.

``create_router(source)`` returns the FastAPI router that the service mounts at ``/dashboard``;
``dashboard.figures`` holds the pure record → figure functions. Never imports ``service``.
"""

from .router import create_router

__all__ = ["create_router"]
