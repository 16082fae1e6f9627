"""dr_find_target on the seed's disaster, then dr_pitr with its recommendation (in-process `dag.test`, real lab).

The app writes through PgBouncer the whole time. Right before the DELETE, in the same
second, the test commits a marker row: a time target cannot separate it from the DELETE,
the recommended xid target (exclusive) must keep it.
"""

from __future__ import annotations

import json
import time
from datetime import datetime

import pytest

from barman_dr.models import Lsn
from include.lab import seed_scenario
from tests.pitr_support import audit, counts, one, run_dag, sql, xcom

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MARKER_DDL = ("CREATE TABLE IF NOT EXISTS find_target_marker (id bigserial PRIMARY KEY, note text, "
              "at timestamptz NOT NULL DEFAULT clock_timestamp())")


@pytest.fixture(scope="module")
def incident():
    sql("LAB_APP_DSN", MARKER_DDL)  # the app owns it, like its other tables
    marker: dict = {}

    def commit_marker(cur) -> None:
        # start of a fresh second: the marker and the DELETE (~0.1 s) commit within it
        time.sleep(1.05 - time.time() % 1)
        cur.execute("INSERT INTO find_target_marker (note) VALUES ('committed just before the DELETE') "
                    "RETURNING id, at, pg_current_xact_id()::text")
        marker["id"], at, xid = cur.fetchone()
        marker["at"], marker["xid"] = at.isoformat(), int(xid)

    writer = seed_scenario.AppWriter()
    writer.start()
    scenario = seed_scenario.play(before_delete=commit_marker)
    assert scenario.after_delete == {"orders_total": 3035, "orders_completed": 0}
    conf = {"server": "pg-primary", "window_start": scenario.good_state, "incident_id": "INC-FIND-1"}
    state, run_id, tasks = run_dag("dr_find_target", conf)
    found = xcom("dr_find_target", run_id, "find_candidates")
    yield {"scenario": scenario, "marker": marker, "state": state, "run_id": run_id, "tasks": tasks,
           "found": found, "writer": writer}
    writer.stop()


def test_find_target_succeeded(incident):
    assert incident["state"] == "success", incident["tasks"]
    assert incident["found"]["catalogue"] is True
    assert incident["found"]["wal"]["segments"] >= 1


def test_top_candidate_is_the_delete(incident):
    top = incident["found"]["candidates"][0]
    assert top["xid"] == incident["scenario"].delete_xid
    assert top["kind"] == "DELETE"
    assert top["rows_deleted"] == 7465 and top["rows_updated"] == 0
    assert [r["relation"] for r in top["relations"]] == ["public.critical_orders"]
    assert top["relations"][0]["database"] == "shop"
    assert top["target"] == {"target_xid": str(incident["scenario"].delete_xid), "target_inclusive": False,
                             "target_lsn": top["commit_lsn"]}


def test_the_marker_committed_in_the_same_second_before_the_delete(incident):
    top, marker = incident["found"]["candidates"][0], incident["marker"]
    delete_at, marker_at = datetime.fromisoformat(top["commit_time"]), datetime.fromisoformat(marker["at"])
    assert marker_at < delete_at
    assert marker_at.replace(microsecond=0) == delete_at.replace(microsecond=0), (marker_at, delete_at)
    # an INSERT is never a candidate
    assert marker["xid"] not in {c["xid"] for c in incident["found"]["candidates"]}


def test_surgical_recovery_defaults_to_the_tables_the_found_transaction_touched(incident):
    """dr_surgical_recovery with the found xid and no `tables`: the candidate's tables, from the audit trail."""
    from barman_dr.operators.surgical import ValidateSurgicalRequestOperator

    op = ValidateSurgicalRequestOperator(task_id="validate_params")
    req = op.validate({"server": "pg-primary", "target_xid": str(incident["scenario"].delete_xid),
                       "target_inclusive": False})
    assert req.tables == ("public.critical_orders",) and req.tables_source == "dr_find_target"


def test_recommended_conf_is_a_valid_dr_pitr_request(incident):
    from barman_dr.inventory import load_inventory
    from barman_dr.params.pitr_request import validate_pitr_conf

    conf = incident["found"]["candidates"][0]["pitr_conf"]
    assert conf["incident_id"] == "INC-FIND-1"
    req = validate_pitr_conf(conf, load_inventory())
    assert req.target.kind == "xid" and req.target.inclusive is False and not req.confirmed


def test_candidates_are_in_the_audit_trail(incident):
    events = [e for e in audit(incident["run_id"]) if e["action"] == "find_target" and e["outcome"] == "ok"]
    assert len(events) == 1
    details = json.loads(events[0]["details"])
    assert details["candidates"][0]["xid"] == incident["scenario"].delete_xid
    assert events[0]["incident_id"] == "INC-FIND-1"


def test_table_filter_and_min_rows(incident):
    scenario = incident["scenario"]
    conf = {"server": "pg-primary", "window_start": scenario.good_state, "table": "app_heartbeat", "min_rows": 1}
    state, run_id, _ = run_dag("dr_find_target", conf)
    assert state == "success"
    assert xcom("dr_find_target", run_id, "find_candidates")["candidates"] == []
    conf = {"server": "pg-primary", "window_start": scenario.good_state, "table": "public.critical_orders",
            "min_rows": 8000}
    state, run_id, _ = run_dag("dr_find_target", conf)
    assert state == "success"
    assert xcom("dr_find_target", run_id, "find_candidates")["candidates"] == []


def test_pitr_to_the_recommended_xid_keeps_the_marker(incident):
    top = incident["found"]["candidates"][0]
    conf = {**top["pitr_conf"], "expected": {"orders_total": 10500, "orders_completed": 7465},
            "confirm": "PITR pg-primary"}
    state, run_id, tasks = run_dag("dr_pitr", conf)
    assert state == "success", tasks
    assert counts() == {"orders_total": 10500, "orders_completed": 7465}
    marker = incident["marker"]
    assert one("LAB_PRIMARY_DSN", "SELECT count(*) FROM find_target_marker WHERE id = %s", (marker["id"],)) == 1
    proof = xcom("dr_pitr", run_id, "verify_target")
    assert proof["reached"] is True
    assert any(f"recovery stopping before commit of transaction {top['xid']}," in line
               for line in proof["stop"]["lines"]), proof["stop"]["lines"]
    # the new timeline forks where the commit record starts: what target_lsn (exclusive) names
    switch, target = Lsn.parse(proof["switch_lsn"]).value, Lsn.parse(top["target"]["target_lsn"]).value
    assert switch == target or (0 < target - switch <= 40 and target % 8192 in (24, 40)), (proof["switch_lsn"], target)
