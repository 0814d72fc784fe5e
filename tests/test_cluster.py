"""The service on a Ray cluster of separate nodes, laid out as docker-compose.yml lays it out
(tests/cluster.py: a head that schedules nothing, two worker nodes of one CPU, token
authentication, Tune storage shared by path; the API and the dispatcher as real processes, the
dispatcher joined by RAY_ADDRESS). Runs posted over HTTP train on both worker nodes; a worker
node killed mid-run, and the head stopped mid-run, cost no epoch and store none twice; trials
asking for a quarter GPU are packed four to a GPU the cluster declares."""
from __future__ import annotations

import shutil
import tempfile
from datetime import datetime
from pathlib import Path

import pytest

from tests.cluster import WORKERS, ClusterStack, LocalCluster, starts
from tests.test_e2e import check_epochs, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]
EPOCHS_LONG = 12  # a wide window to break the cluster in, even on a loaded machine


def spec(name: str, epochs: int, seeds=(0, 1), **extra) -> dict:
    return {"name": name, "dataset": "digits", "estimators": ["ste"], "bits": [{"w": 1, "a": 1}],
            "seeds": list(seeds), "epochs": epochs, "include_full_precision": False, "batch_size": 64, **extra}


@pytest.fixture(scope="module")
def cluster():
    root = Path(tempfile.mkdtemp(prefix="bb-cl-", dir="/tmp"))
    c = LocalCluster(root, gpus="1 0")  # ray-worker-1 declares one GPU (none is needed: see the GPU test)
    try:
        c.up()
        yield c
    finally:
        c.down()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def stack(cluster):
    s = ClusterStack(cluster.root, cluster)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def healthy(cluster, stack):
    """Every node up (a test before may have killed one) and a dispatcher running."""
    cluster.up()
    stack.ensure_dispatcher()
    return stack


def wait_epochs(stack: ClusterStack, run_id: int, at_least: int) -> dict[str, dict]:
    """Until every trial of the run has stored ``at_least`` epochs (and the run still runs)."""
    def progressed():
        trials = stack.trials(run_id)
        return trials if trials and all(t["epochs_done"] >= at_least for t in trials.values()) else None

    trials = wait_until(progressed, 400, f"{at_least} epochs of every trial of run {run_id}", every=0.3,
                        procs=[stack.api, stack.dispatcher])
    assert stack.run(run_id)["status"] == "running"
    return trials


def test_a_run_posted_over_http_trains_on_both_worker_nodes(cluster, healthy):
    stack = healthy
    stack.dispatcher.stop(timeout=20)
    # a dispatcher without the cluster's token is refused: it says so and claims nothing
    stranger = stack.start_dispatcher(RAY_AUTH_TOKEN="0" * 64)
    run_id = stack.post(spec("both-nodes", 3))
    try:
        wait_until(lambda: "cannot be joined" in stranger.log_tail(20000), 180, "the refused dispatcher's error",
                   procs=[stranger])
        log = stranger.log_tail(20000)
        assert f"the Ray cluster at {cluster.address} (RAY_ADDRESS) cannot be joined" in log
        assert "InvalidAuthToken" in log and "RAY_AUTH_TOKEN" in log and "retrying in 1 s" in log
        assert stack.run(run_id)["status"] == "queued"
    finally:
        stranger.kill_group()

    stack.dispatcher = stack.start_dispatcher()
    run = stack.wait_finished(run_id)
    assert run["status"] == "done", (run, stack.dispatcher.log_tail())
    check_epochs(stack, run_id, 3)
    assert f"joined the Ray cluster at {cluster.address} (RAY_ADDRESS)" in stack.dispatcher.log_tail(50000)
    # one CPU per worker node: the two trials ran side by side, one on each node, once each
    placed = cluster.traces(f"run-{run_id}")
    assert set(placed) == {"ste-w1a1-s0", "ste-w1a1-s1"}
    assert sorted(node for nodes in placed.values() for node in nodes) == sorted(WORKERS), placed
    assert all(starts(lines) == [0] for nodes in placed.values() for lines in nodes.values()), placed


def test_a_killed_worker_node_s_trials_resume_on_the_other_node(cluster, healthy):
    """SIGKILL to a worker node's process group (raylet, agents, the trial's Ray worker): the trial it
    ran fails, is retried on the other node from its last checkpoint, and the run ends done."""
    stack = healthy
    run_id = stack.post(spec("node-lost", EPOCHS_LONG))
    wait_epochs(stack, run_id, 2)
    victim, survivor = WORKERS
    [lost] = [key for key, nodes in cluster.traces(f"run-{run_id}").items() if victim in nodes]
    cluster.kill(victim)
    stored = stack.trials(run_id)[lost]["epochs_done"]
    assert 2 <= stored < EPOCHS_LONG

    run = stack.wait_finished(run_id)
    assert run["status"] == "done", (run, stack.dispatcher.log_tail())
    check_epochs(stack, run_id, EPOCHS_LONG)  # epochs 1..12 of each trial, each stored once
    trials = stack.trials(run_id)
    assert trials[lost]["attempts"] >= 2
    placed = cluster.traces(f"run-{run_id}")
    assert starts(placed[lost][victim]) == [0]
    resumed = starts(placed[lost][survivor])
    assert resumed and resumed[-1] >= stored, placed[lost]  # from its checkpoint, not from scratch
    [kept] = set(placed) - {lost}
    assert set(placed[kept]) == {survivor} and starts(placed[kept][survivor]) == [0]


def test_the_head_stopped_mid_run_requeues_the_run_until_it_is_back(cluster, healthy):
    """The head (GCS) goes away: the dispatcher says so, hands the run back and exits 1 (compose restarts
    it); the restarted dispatcher cannot join, says so and retries; once the head (and with it the worker
    nodes) is back, the run resumes from its checkpoints and ends done with every epoch stored once."""
    stack = healthy
    run_id = stack.post(spec("head-lost", EPOCHS_LONG))
    wait_epochs(stack, run_id, 2)
    first = stack.dispatcher
    cluster.stop("ray-head")
    wait_until(lambda: not first.alive(), 120, "the dispatcher to hand the run back and exit")
    assert first.proc.returncode == 1, first.log_tail()
    log = first.log_tail(20000)
    assert "does not answer for 10 s; handing the run back and exiting" in log, log
    assert f"run {run_id}: requeued" in log
    assert stack.run(run_id)["status"] == "queued"
    kept = stack.epochs(run_id)
    assert kept and len(kept) < 2 * EPOCHS_LONG

    stack.dispatcher = stack.start_dispatcher()  # restart: unless-stopped
    wait_until(lambda: "does not answer: nothing accepts connections" in stack.dispatcher.log_tail(), 120,
               "the restarted dispatcher's error", procs=[stack.dispatcher])
    assert stack.run(run_id)["status"] == "queued"
    cluster.up()  # the head is back; its worker nodes, which could not rejoin, are started again

    run = stack.wait_finished(run_id)
    assert run["status"] == "done", (run, stack.dispatcher.log_tail())
    check_epochs(stack, run_id, EPOCHS_LONG)
    assert kept <= stack.epochs(run_id)  # nothing stored before the head went away was lost or rewritten
    placed = cluster.traces(f"run-{run_id}")
    for key, nodes in placed.items():  # each trial resumed from a checkpoint, not from scratch
        assert max(epoch for lines in nodes.values() for epoch in starts(lines)) >= 1, (key, nodes)


def test_quarter_gpu_trials_are_packed_four_to_a_declared_gpu(cluster, healthy):
    """ray-worker-1 declares one GPU, ray-worker-2 none. Six trials asking for 0.25 GPU (and 0.1 CPU, so
    the CPU is not what limits them) all run on ray-worker-1, at most and at some moment exactly four at
    once. This machine has no CUDA: the spec's cpu_fallback lets them train on the CPU."""
    stack = healthy
    run_id = stack.post(spec("quarter-gpus", 4, seeds=range(6),
                             resources={"cpu": 0.1, "gpu": 0.25, "cpu_fallback": True}))
    run = stack.wait_finished(run_id)
    assert run["status"] == "done", (run, stack.dispatcher.log_tail())
    check_epochs(stack, run_id, 4)
    placed = cluster.traces(f"run-{run_id}")
    assert len(placed) == 6 and all(set(nodes) == {"ray-worker-1"} for nodes in placed.values()), placed
    trials = stack.trials(run_id).values()
    events = sorted([(datetime.fromisoformat(t["started_at"]), 1) for t in trials]
                    + [(datetime.fromisoformat(t["finished_at"]), -1) for t in trials])
    running = [sum(step for _, step in events[:i + 1]) for i in range(len(events))]
    assert max(running) == 4, events
