"""The incident CLI (`bin/barman-dr`) against the real Airflow API server and scheduler."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from barman_dr.surfaces.api_client import ApiError, incident_run_id
from include.lab import seed_scenario
from tests.fault_support import kill_airflow, make_lab_up
from tests.pitr_support import counts, pgbouncer_paused

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
CLI = str(Path(__file__).resolve().parents[2] / "bin" / "barman-dr")


@pytest.fixture
def drill_dag(api):
    deadline = time.monotonic() + 120
    while not api.dag_exists("dr_monthly_restore_drill"):
        assert time.monotonic() < deadline
        time.sleep(2)
    api.unpause("dr_monthly_restore_drill")
    yield api
    api._call("PATCH", "/api/v2/dags/dr_monthly_restore_drill", {"is_paused": True})


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=timeout, check=False)


def test_plan_waits_and_prints_the_plan_then_is_idempotent(api):
    incident = f"INC-CLI-{int(time.time())}"
    target = (datetime.now(UTC) - timedelta(seconds=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    r = cli("plan", "--server", "pg-primary", "--target-time", target, "--incident", incident,
            "--expect", "orders_total=10500", "--wait")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "plan only" in r.stdout and "WAL proven" in r.stdout and "SUCCESS" in r.stdout
    again = cli("plan", "--server", "pg-primary", "--target-time", target, "--incident", incident)
    assert again.returncode == 0 and "already exists" in again.stdout
    status = cli("status", "--incident", incident)
    assert status.returncode == 0 and "wal_coverage" in status.stdout and "success" in status.stdout


def test_a_naive_time_is_refused_before_the_api(api):
    r = cli("pitr", "--server", "pg-primary", "--target-time", "2026-11-25T10:00:00", "--incident", "INC-CLI-BAD",
            "--confirm")
    assert r.returncode == 2
    assert "--target-time 2026-11-25T10:00:00: needs a timezone" in r.stderr
    with pytest.raises(ApiError):  # refused by the CLI itself: no run was created
        api.get_run("dr_pitr", incident_run_id("dr_pitr", "INC-CLI-BAD"))


def test_usage_errors_exit_2():
    assert cli("pitr", "--server", "pg-primary", "--incident", "X").returncode == 2  # no target
    r = cli("pitr", "--server", "pg-primary", "--incident", "X", "--target-xid", "7", "--expect", "orders_total")
    assert r.returncode != 0 and "NAME=INTEGER" in r.stderr


def test_pitr_confirm_wait_recovers_the_seed_and_reports(api):
    """The whole incident from a terminal: seed disaster, `pitr --confirm --wait`, exit 0, report."""
    scenario = seed_scenario.play()
    incident = f"INC-CLI-PITR-{int(time.time())}"
    args = ("pitr", "--server", "pg-primary", "--target-time", scenario.good_state, "--incident", incident,
            "--expect", "orders_total=10500", "--expect", "orders_completed=7465", "--reason", "CLI e2e",
            "--confirm", "--wait", "--timeout", "900")
    r = cli(*args, timeout=960)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "triggered:" in out and "[EXECUTE]" in out
    # the progress display: one line per task state change, in order
    done = {line.split()[1] for line in out.splitlines() if line.startswith("  ") and line.rstrip().endswith(" success")
            and len(line.split()) == 3}
    assert {"wal_coverage", "freeze_app", "barman_restore", "verify_target", "unfreeze_app"} <= done, out
    assert out.index("wal_coverage") < out.index("barman_restore") < out.index("unfreeze_app")
    assert "SUCCESS" in out and '"orders_total": 10500' in out and '"orders_completed": 7465' in out
    assert counts() == {"orders_total": 10500, "orders_completed": 7465}
    assert not pgbouncer_paused()
    # the incident tool retries the same call: no second PITR, it follows the finished run
    again = cli(*args, timeout=120)
    assert again.returncode == 0 and "already exists" in again.stdout and "SUCCESS" in again.stdout


def test_drill_wait_runs_the_restore_drill(drill_dag):
    r = cli("drill", "--wait", "--timeout", "900", timeout=960)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "triggered: dr_monthly_restore_drill" in r.stdout
    assert "drill__" in r.stdout and "summary" in r.stdout and "dr_monthly_restore_drill: SUCCESS" in r.stdout


def test_api_server_down_the_cli_retries_then_the_same_incident_reaches_one_run(api):
    """Incident tooling triggers while the API server is down (issue 18, fault 4).

    A short --api-wait gives up with exit 4 and a message that says what happened and what to
    do; the same command with a longer wait rides out the outage (the api-server is brought
    back by `make lab-up` meanwhile) and triggers; running it a third time follows that same
    run. Exactly one run exists for the incident.
    """
    incident = f"INC-CLI-APIDOWN-{int(time.time())}"
    target = (datetime.now(UTC) - timedelta(seconds=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    plan = ("plan", "--server", "pg-primary", "--target-time", target, "--incident", incident)
    killed = kill_airflow("api-server")
    assert killed
    try:
        r = cli("--api-wait", "4", *plan, timeout=120)
        assert r.returncode == 4, r.stdout + r.stderr
        assert "did not answer for" in r.stderr and "same incident id reaches the same single run" in r.stderr
        back = threading.Timer(8, make_lab_up)
        back.start()
        try:
            r = cli("--api-wait", "300", *plan, "--wait", "--timeout", "600", timeout=900)
        finally:
            back.cancel()
            back.join()
    finally:
        make_lab_up()  # idempotent: the api-server is up whatever happened above (never two lab-ups at once)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "triggered:" in r.stdout and "SUCCESS" in r.stdout
    again = cli(*plan)
    assert again.returncode == 0 and "already exists (same incident)" in again.stdout
    runs = api._call("GET", "/api/v2/dags/dr_pitr/dagRuns?limit=100&order_by=-start_date")["dag_runs"]
    assert [x["dag_run_id"] for x in runs if (x.get("conf") or {}).get("incident_id") == incident] == [
        incident_run_id("dr_pitr", incident)]


def test_servers_shows_the_fleet(api):
    """`barman-dr servers`: every server of the inventory, from the DR page's summary; `--json` for tooling."""
    r = cli("servers", "--json")
    assert r.returncode in (0, 1), r.stdout + r.stderr  # 1: a server is CRITICAL (the lab's tests break some)
    servers = {s["server"]: s for s in json.loads(r.stdout)}
    assert {"pg-primary", "pg-primary2"} <= set(servers)
    assert servers["pg-primary"]["rto_objective_s"] == 900
    table = cli("servers")
    assert table.returncode == r.returncode
    assert table.stdout.splitlines()[0].split()[:2] == ["server", "verification"]
    assert any(line.startswith("pg-primary2 ") for line in table.stdout.splitlines())


# ---------------------------------------------------------------- the complete CLI: every DR DAG (issue 16 item 6)


@contextmanager
def unpaused(api, dag_id: str) -> Iterator[None]:
    """`dag_id` unpaused while the block runs, paused again after (in-process `dag.test` suites must not race it)."""
    deadline = time.monotonic() + 120
    while not api.dag_exists(dag_id):
        assert time.monotonic() < deadline, f"{dag_id} never appeared in the API"
        time.sleep(2)
    api.unpause(dag_id)
    try:
        yield
    finally:
        api._call("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": True})


@pytest.fixture(scope="module")
def found(api):
    """The seed's disaster, then `barman-dr find-target --json --wait` on the real scheduler."""
    scenario = seed_scenario.play()
    incident = f"INC-CLI-FIND-{int(time.time())}"
    args = ("find-target", "--server", "pg-primary", "--window-start", scenario.good_state, "--incident", incident,
            "--json")
    with unpaused(api, "dr_find_target"):
        r = cli(*args, "--wait", "--timeout", "600", timeout=660)
        again = cli(*args, timeout=120)
    return {"scenario": scenario, "incident": incident, "r": r, "again": again}


def test_find_target_json_names_the_delete(found):
    r, scenario = found["r"], found["scenario"]
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    assert doc["dag_id"] == "dr_find_target" and doc["state"] == "success" and doc["mode"] == "read_only"
    assert doc["run_id"] == incident_run_id("dr_find_target", found["incident"])
    top = doc["candidates"][0]
    assert top["xid"] == scenario.delete_xid and top["kind"] == "DELETE"
    assert top["target"]["target_xid"] == str(scenario.delete_xid) and top["target"]["target_inclusive"] is False
    assert f"--target-xid {scenario.delete_xid} --exclusive" in doc["next"][0]
    # the same command again follows the same run
    assert found["again"].returncode == 0, found["again"].stderr
    again = json.loads(found["again"].stdout)
    assert again["created"] is False and again["run_id"] == doc["run_id"]


def test_status_of_a_non_pitr_dag(found):
    r = cli("status", "--dag", "dr_find_target", "--incident", found["incident"], "--json", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    assert doc["dag_id"] == "dr_find_target" and doc["state"] == "success"
    assert {t["task_id"] for t in doc["tasks"]} >= {"validate_params", "find_candidates"}
    human = cli("status", "--dag", "dr_find_target", "--incident", found["incident"], timeout=120)
    assert human.returncode == 0 and human.stdout.startswith("dr_find_target run ")


def test_surgical_plan_only_json_shows_the_missing_rows_and_touches_nothing(api, found):
    xid = found["scenario"].delete_xid
    before = counts()
    with unpaused(api, "dr_surgical_recovery"):
        r = cli("surgical", "--server", "pg-primary", "--target-xid", str(xid), "--exclusive", "--table",
                "public.critical_orders", "--incident", f"{found['incident']}.surgical", "--plan-only", "--json",
                "--wait", "--timeout", "900", timeout=960)
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    assert doc["dag_id"] == "dr_surgical_recovery" and doc["mode"] == "plan_only" and doc["state"] == "success"
    assert doc["conf"]["plan_only"] is True and "confirm" not in doc["conf"]
    plan = doc["result"]["plan"]
    assert plan["totals"]["missing"] == 7465 and plan["confirmed"] is False
    assert doc["result"]["apply"] is None  # a preview: nothing applied
    assert counts() == before
