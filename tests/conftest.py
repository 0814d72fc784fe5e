pytest_plugins = ["tests.db_fixtures"]


# --- Ray (ray_session) ------------------------------------------------------------------------
import shutil  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@dataclass(frozen=True)
class RaySession:
    storage: Path  # Tune storage for tests (also $BITBENCH_TUNE_DIR)
    fault_dir: Path  # the files of the test-only trial hooks (tests.faults), one folder per experiment


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the session (2 CPUs, no dashboard), started on first use.

    Ray's temp dir, HOME, Tune storage and the fault-injection files point into one short
    temporary folder (Ray's socket paths must stay short); workers inherit the environment
    set here, so it is set before ``ray.init``.
    """
    import ray

    root = Path(tempfile.mkdtemp(prefix="bb-ray-", dir="/tmp"))
    session = RaySession(storage=root / "tune", fault_dir=root / "faults")
    mp = pytest.MonkeyPatch()
    for var, path in {"RAY_TMPDIR": root / "r", "HOME": root / "home", "BITBENCH_TUNE_DIR": session.storage}.items():
        path.mkdir(parents=True, exist_ok=True)
        mp.setenv(var, str(path))
    mp.delenv("RAY_ADDRESS", raising=False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield session
    finally:
        ray.shutdown()
        mp.undo()
        shutil.rmtree(root, ignore_errors=True)
