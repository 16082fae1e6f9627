"""Shared fixtures: the inventory, the lab's environment, and skips when the lab is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"

# `dag.test()` re-parses the dags folder and writes every DAG to the metadata DB, but Airflow skips
# that write when the DAG's row changed less than `[core] min_serialized_dag_update_interval` (30 s)
# ago. A test that parsed the DAGs with an edited inventory (temp_inventory: fewer servers, so fewer
# per-pool tasks) would then leave its version in place for the next test's run, whose tasks missing
# from it are marked `removed` (a drill's teardown never ran and its lock leaked: CI, 2026-12-04).
# In-process runs always write the DAG they run.
os.environ["AIRFLOW__CORE__MIN_SERIALIZED_DAG_UPDATE_INTERVAL"] = "0"


def lab_is_up() -> bool:
    return bool(os.environ.get("LAB_DIR")) and Path(os.environ["LAB_DIR"], "env.sh").exists() \
        and bool(os.environ.get("AIRFLOW_CONN_BARMAN_HOST"))


@pytest.fixture(autouse=True)
def dags_back_to_the_lab_inventory():
    """After a test that used an edited inventory (scheduled_support.temp_inventory): the lab's DAGs re-synced.

    Autouse, so it is torn down after the test's monkeypatch has put BARMAN_DR_INVENTORY back.
    """
    yield
    try:
        import scheduled_support
    except ImportError:
        return
    if scheduled_support.TEMP_INVENTORY_USED["used"]:
        scheduled_support.TEMP_INVENTORY_USED["used"] = False
        scheduled_support.resync_dags()


@pytest.fixture(autouse=True)
def delayed_standby_applies_again(request):
    """After a lab test, the lab's delayed standby applies WAL again.

    A PITR that fails at or after the freeze keeps the delayed standby paused on purpose (it may
    be the last copy without the damage: operators/pitr/delayed.py) and says so; the DBA resumes
    it once the server is recovered. The suites after a fault test play that DBA here, so a
    later "healthy lab" check does not meet a standby left paused by an earlier, failed run.
    """
    yield
    dsn = os.environ.get("LAB_DELAYED_DSN")
    lab_test = bool({"integration", "e2e"} & set(request.keywords)) or "faults" in str(request.fspath)
    if not dsn or not lab_test:
        return
    try:
        import psycopg2

        conn = psycopg2.connect(dsn, connect_timeout=5)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT pg_is_in_recovery() AND pg_is_wal_replay_paused()")
            if cur.fetchone()[0]:
                cur.execute("SELECT pg_wal_replay_resume()")
        conn.close()
    except Exception:  # a stopped delayed standby (a fault test) has nothing to resume
        pass


@pytest.fixture(scope="module", autouse=True)
def set_aside_directories_pruned(request):
    """After each lab module, the data directories its DR runs set aside are deleted (`labctl prune-set-aside`).

    The product never deletes a data directory (each PITR, drill, rollback and failback keeps one
    `data.pre-*` / `data.failed-*` for forensics). Kept over a whole `make test` they took 15-20 GB
    and pushed a CI disk past the verification's disk threshold (CI, 2026-12-05). A module may still
    read its own runs' copies (rollback); none reads another module's.
    """
    yield
    try:
        kind = Path(str(request.fspath)).resolve().relative_to(REPO / "tests").parts[0]
    except ValueError:
        return
    if kind not in ("integration", "e2e", "faults") or not lab_is_up():
        return
    import subprocess
    import sys
    import warnings

    try:
        r = subprocess.run([sys.executable, str(REPO / "include" / "lab" / "labctl.py"), "prune-set-aside"],
                           capture_output=True, text=True, check=False, timeout=300)
    except subprocess.TimeoutExpired:
        warnings.warn("labctl prune-set-aside did not finish in 300 s: set-aside directories may fill the disk",
                      stacklevel=1)
        return
    if r.returncode != 0:
        warnings.warn(f"labctl prune-set-aside failed ({r.returncode}): {(r.stderr or r.stdout)[-500:]}", stacklevel=1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Integration and e2e tests need the lab's environment (`source .lab/env.sh`); the Celery
    suites need a Celery lab (make test runs them in a second phase, LAB_EXECUTOR=celery)."""
    if os.environ.get("LAB_EXECUTOR") != "celery":
        not_celery = pytest.mark.skip(reason="needs the Celery lab: make test's Celery phase (LAB_EXECUTOR=celery)")
        for item in items:
            if "celery_lab" in item.keywords:
                item.add_marker(not_celery)
    if lab_is_up():
        return
    skip = pytest.mark.skip(reason="the lab is not up: run `make test` (or make lab-up && source .lab/env.sh)")
    for item in items:
        if "integration" in item.keywords or "e2e" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def inventory():
    """The lab inventory; without the lab's environment, placeholders expand its `${VAR}`s (unit tests)."""
    from barman_dr.inventory import load_inventory

    if lab_is_up():
        return load_inventory()
    import yaml

    from barman_dr.inventory import inventory_path, parse_inventory

    env = {**os.environ, "LAB_DIR": os.environ.get("LAB_DIR", "/var/tmp/no-lab"),
           "LAB_NET": os.environ.get("LAB_NET", "127.0.10")}
    return parse_inventory(yaml.safe_load(inventory_path().read_text()), str(inventory_path()), env)


@pytest.fixture(scope="module")
def api():
    """The real API server's client, with dr_pitr unpaused for the module and paused again after it.

    Paused again because the in-process `dag.test` runs of the other suites must not be
    picked up by the real scheduler.
    """
    import time

    from barman_dr.surfaces.api_client import from_env

    client = from_env()
    deadline = time.monotonic() + 120
    while not client.dag_exists("dr_pitr"):  # the dag-processor parses the folder every few seconds
        assert time.monotonic() < deadline, "dr_pitr never appeared in the API"
        time.sleep(2)
    client.unpause("dr_pitr")
    yield client
    client._call("PATCH", "/api/v2/dags/dr_pitr", {"is_paused": True})
