"""GET /runs/{id}/report: the run's report folder as a zip (RESULTS.md, figures, LaTeX, spec)."""
import re
import tempfile

from fastapi import APIRouter, Response
from fastapi.concurrency import run_in_threadpool

from service.report import build_report, zip_folder

from .deps import SessionDep, not_found

router = APIRouter(tags=["results"])


@router.get("/runs/{run_id}/report", response_class=Response,
            responses={200: {"content": {"application/zip": {}}, "description": "the report folder, zipped"}})
async def run_report(run_id: int, session: SessionDep, png: bool = True):
    """Build the report from the database now; ``png=false`` skips the PNG figures (no Chromium needed)."""
    with tempfile.TemporaryDirectory(prefix="bitbench-report-") as tmp:
        files = await run_in_threadpool(build_report, session, run_id, tmp, png=png)
        if files is None:
            raise not_found("run", run_id, "run_id")
        name = f"run-{run_id}-report"
        body = zip_folder(tmp, name)
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    return Response(body, media_type="application/zip",
                    headers={"Content-Disposition": f'attachment; filename="{safe}.zip"'})
