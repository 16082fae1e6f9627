"""Every recovery target resolved in the WAL before anything moves (issue 14), on the real lab.

* A restore point name created twice, rows committed between: refused (both occurrences
  listed, nothing stopped) until the request picks one; the chosen one then recovers its
  exact counts. The name has quotes, spaces, a dash and a non-ASCII letter. Through the
  REST API, as incident tooling triggers.
* An xid target starts from the newest backup before the xid, not the oldest.
* The plan lists what the PITR would discard, per table, exactly.
* A run whose resolved stop LSN differs from where recovery stopped fails verify_target
  (forced mismatch), keeps the app frozen and the old data; dr_pitr_rollback undoes it.
* Targets that cannot be resolved (unknown, aborted or future xid, unknown name, LSN
  beyond the WAL) are refused in resolve_target, naming the field, before anything moves.
"""

from __future__ import annotations

import json
import re
import time

import pytest

from barman_dr.forensics.target_resolution import StopPoint
from barman_dr.models import Lsn
from barman_dr.surfaces.api_client import incident_run_id
from tests.fault_support import barman
from tests.pitr_support import audit, counts, dagbag, one, pgbouncer_paused, primary_timeline, run_dag, sql, xcom

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NAME = 'before "deploy" 42 \u2014 \u00fc'
PRIMARY, APP = "LAB_PRIMARY_DSN", "LAB_APP_DSN"


def insert_orders(first: int, last: int, status: str = "pending") -> None:
    sql(APP, "INSERT INTO critical_orders (order_id, customer_id, amount, status) "
             "SELECT i, 1, 10.00, %s FROM generate_series(%s, %s) i", (status, first, last))


def nudge() -> None:
    sql(PRIMARY, "SELECT pg_current_xact_id()")


def refusal(run_id: str, task: str = "resolve_target") -> str:
    events = [e for e in audit(run_id) if e["action"] == task and e["outcome"] == "refused"]
    assert events, [(e["action"], e["outcome"]) for e in audit(run_id)]
    return json.loads(events[0]["details"])["error"]


def wait_all(api, runs: dict[str, str], timeout: float = 600) -> dict[str, dict]:
    return {k: api.wait("dr_pitr", run_id, timeout=timeout) for k, run_id in runs.items()}


# ------------------------------------------------------------------------------ a reused restore point name


@pytest.fixture(scope="module")
def reused_name():
    sql(APP, "TRUNCATE critical_orders")
    insert_orders(1, 1000)
    first = one(PRIMARY, "SELECT pg_create_restore_point(%s)::text", (NAME,))
    insert_orders(1001, 1100)                   # committed between the two points of the same name
    second = one(PRIMARY, "SELECT pg_create_restore_point(%s)::text", (NAME,))
    insert_orders(1101, 1150)
    sql(APP, "DELETE FROM critical_orders WHERE order_id <= 500")  # the damage
    return {"first_end": first, "second_end": second, "damaged": counts(), "tli": primary_timeline()}


def test_a_name_created_twice_is_refused_listing_both_occurrences(api, reused_name):
    incident = f"INC-RP-{int(time.time())}"
    run_id = incident_run_id("dr_pitr", incident)
    api.trigger("dr_pitr", {"server": "pg-primary", "target_name": NAME, "incident_id": incident,
                            "confirm": "PITR pg-primary"}, run_id=run_id)
    final = api.wait("dr_pitr", run_id, timeout=600)
    states = {t["task_id"]: t["state"] for t in api.task_instances("dr_pitr", run_id)}
    assert final["state"] == "failed" and states["resolve_target"] == "failed", states
    assert states["freeze_app"] == "upstream_failed" and states["stop_postgres"] == "upstream_failed"
    # nothing moved
    assert counts() == reused_name["damaged"] and primary_timeline() == reused_name["tli"]
    assert not pgbouncer_paused()
    error = refusal(run_id)
    listed = re.findall(r"LSN ([0-9A-F]+/[0-9A-F]+) \(timeline", error)
    # ours are the newest two (a rerun on the same lab also finds an earlier run's, still on this timeline's history)
    assert len(listed) >= 2 and f"created {len(listed)} times" in error and "target_name_lsn" in error, error
    reused_name["listed"] = listed[-2:]


def test_the_chosen_occurrence_recovers_exactly_its_counts(api, reused_name):
    listed = reused_name.get("listed") or pytest.skip("the refusal did not list the occurrences")
    incident = f"INC-RP2-{int(time.time())}"
    run_id = incident_run_id("dr_pitr", incident)
    api.trigger("dr_pitr", {"server": "pg-primary", "target_name": NAME, "target_name_lsn": listed[1],
                            "incident_id": incident, "confirm": "PITR pg-primary",
                            "expected": {"orders_total": 1100, "orders_completed": 0}}, run_id=run_id)
    final = api.wait("dr_pitr", run_id, timeout=900)
    states = {t["task_id"]: t["state"] for t in api.task_instances("dr_pitr", run_id)}
    assert final["state"] == "success", states
    # the second occurrence: the 100 rows committed between the two points are there (the first gives 1000)
    assert counts() == {"orders_total": 1100, "orders_completed": 0}
    resolved = api.xcom("dr_pitr", run_id, "resolve_target")
    assert resolved["stop"]["kind"] == "restore_point" and resolved["stop"]["lsn"] == listed[1]
    assert resolved["stop"]["name"] == NAME
    assert resolved["restore_target"] == {"kind": "lsn", "value": listed[1], "inclusive": True}
    assert [o["lsn"] for o in resolved["occurrences"] if o["chosen"]] == [listed[1]]
    assert listed[0] in [o["lsn"] for o in resolved["occurrences"]]  # the other one is listed, not chosen
    proof = api.xcom("dr_pitr", run_id, "verify_target")
    assert proof["reached"] and any(f'"{listed[1]}"' in line for line in proof["stop"]["lines"])
    assert proof["history_reason"] == f"after LSN {listed[1]}"


# ------------------------------------------------------------------------------ xid: the newest backup before it


def newest_backup() -> str:
    return json.loads(barman("-f", "json", "list-backups", "pg-primary"))["pg-primary"][0]["backup_id"]


def test_an_xid_target_starts_from_the_newest_backup_before_it(write_soon):
    sql(PRIMARY, "CREATE TABLE IF NOT EXISTS resolution_scratch (id bigserial PRIMARY KEY, pad text)")
    between_xid = int(one(PRIMARY, "WITH i AS (INSERT INTO resolution_scratch (pad) SELECT repeat('x', 200) "
                                   "FROM generate_series(1, 20000) RETURNING 1) "
                                   "SELECT pg_current_xact_id()::text FROM i LIMIT 1"))  # WAL between two backups
    older = newest_backup()
    t = write_soon(1.0)
    barman("backup", "--wait", "pg-primary")
    t.join()
    newer = newest_backup()
    assert newer != older
    xid = int(one(PRIMARY, "WITH d AS (DELETE FROM critical_orders WHERE order_id BETWEEN 501 AND 510 RETURNING 1) "
                           "SELECT pg_current_xact_id()::text FROM d LIMIT 1"))
    nudge()
    state, run_id, tasks = run_dag("dr_pitr", {"server": "pg-primary", "target_xid": str(xid),
                                               "target_inclusive": False})
    assert state == "success" and tasks["approve"] == "skipped", tasks
    resolved = xcom("dr_pitr", run_id, "resolve_target")
    assert resolved["backup_id"] == newer  # not the oldest backup: only the WAL after it is replayed
    assert resolved["stop"]["kind"] == "commit" and resolved["stop"]["xid"] == xid
    assert resolved["stop"]["when"] == "before"
    wal = xcom("dr_pitr", run_id, "wal_coverage")
    assert wal["first_wal"] == resolved["backup"]["begin_wal"]
    assert xcom("dr_pitr", run_id, "preflight")["backup_id"] == newer
    # the same stop as an LSN that is not a record boundary: the first record at or after it
    inside = Lsn(Lsn.parse(resolved["stop"]["lsn"]).value - 1)
    state, run_id, _ = run_dag("dr_pitr", {"server": "pg-primary", "target_lsn": str(inside),
                                           "target_inclusive": False})
    by_lsn = xcom("dr_pitr", run_id, "resolve_target")
    assert state == "success" and by_lsn["stop"]["lsn"] == resolved["stop"]["lsn"]
    assert by_lsn["stop"]["when"] == "before" and by_lsn["backup_id"] == newer
    # an xid committed before that backup starts from an older one (the general rule, not "the newest")
    state, run_id, _ = run_dag("dr_pitr", {"server": "pg-primary", "target_xid": str(between_xid)})
    before = xcom("dr_pitr", run_id, "resolve_target")
    assert state == "success" and before["backup_id"] == older
    assert before["stop"]["when"] == "after"


# ------------------------------------------------------------------------------ the discarded list


def test_the_plan_lists_exactly_what_was_committed_after_the_target():
    sql(APP, "DELETE FROM critical_orders WHERE order_id BETWEEN 700001 AND 900010")  # a rerun starts clean
    insert_orders(900001, 900010)  # rows of its own, before the target
    target = one(PRIMARY, "SELECT now()").isoformat()
    insert_orders(700001, 700007)                                                          # 7 inserted
    sql(APP, "UPDATE critical_orders SET amount = amount + 1 WHERE order_id BETWEEN 900001 AND 900003")  # 3 updated
    sql(APP, "DELETE FROM critical_orders WHERE order_id BETWEEN 900004 AND 900008")      # 5 deleted
    for _ in range(4):
        sql(APP, "INSERT INTO app_heartbeat DEFAULT VALUES")                               # 4 transactions
    state, run_id, tasks = run_dag("dr_pitr", {"server": "pg-primary", "target_time": target})
    assert state == "success" and tasks["approve"] == "skipped", tasks
    plan = next(json.loads(e["details"]) for e in audit(run_id) if e["action"] == "plan" and e["outcome"] == "planned")
    disc = plan["discarded"]
    assert disc["tables"] == {"public.critical_orders": {"inserted": 7, "updated": 3, "deleted": 5},
                              "public.app_heartbeat": {"inserted": 4, "updated": 0, "deleted": 0}}
    assert disc["total"] == {"inserted": 11, "updated": 3, "deleted": 5}
    assert disc["transactions_with_changes"] == 7
    assert disc["first_commit"] > target
    assert "discarded: 7 transaction(s)" in plan["text"]


# ------------------------------------------------------------------------------ the exact stop point, forced off


def test_verify_target_fails_when_recovery_did_not_stop_at_the_resolved_lsn():
    sql(APP, "DELETE FROM critical_orders WHERE order_id BETWEEN 800001 AND 800003")  # a rerun starts clean
    before, tli = counts(), primary_timeline()
    target = one(PRIMARY, "SELECT now()").isoformat()
    insert_orders(800001, 800003)  # a commit after the target: the stop record
    verify = dagbag().dags["dr_pitr"].get_task("verify_target")
    real = verify.upstream

    def one_record_later(context, task_id):
        value = real(context, task_id)
        if task_id == "resolve_target":
            stop = value["stop"]
            # as if the resolution had found the record after the real stop record
            moved = StopPoint.from_dict({**stop, "prev_lsn": stop["lsn"], "lsn": stop["end_lsn"]})
            value = {**value, "stop": moved.to_dict()}
        return value

    state, run_id, tasks = run_dag("dr_pitr", {"server": "pg-primary", "target_time": target,
                                               "incident_id": "INC-MISMATCH", "confirm": "PITR pg-primary"},
                                   patch={"verify_target": {"upstream": one_record_later}})
    try:
        assert state == "failed", tasks
        assert tasks["stage_restore"] == "success"  # the real stop was proven on the staging copy
        assert tasks["verify_target"] == "failed" and tasks["unfreeze_app"] == "upstream_failed"
        assert pgbouncer_paused()  # fail safe: the app never sees a server not proven at the target
        failed = [json.loads(e["details"]) for e in audit(run_id) if e["action"] == "verify_target"
                  and e["outcome"] == "failed"]
        assert failed and "forks at" in failed[0]["error"] and "not at the resolved stop point" in failed[0]["error"]
    finally:
        state, _, rb = run_dag("dr_pitr_rollback", {"server": "pg-primary", "pitr_run_id": run_id,
                                                    "confirm": "ROLLBACK pg-primary"})
    assert state == "success", rb
    assert counts() == {**before, "orders_total": before["orders_total"] + 3}
    assert primary_timeline() == tli and not pgbouncer_paused()


# ------------------------------------------------------------------------------ refusals, before anything moves


def test_unresolvable_targets_are_refused_naming_the_field(api):
    api.unpause("dr_pitr")  # the in-process runs above paused it (they keep the real scheduler away)
    tli, before = primary_timeline(), counts()
    # an xid that was assigned, then rolled back
    with pytest.raises(Exception, match="abort on purpose"):
        sql(PRIMARY, "DO $$BEGIN PERFORM pg_current_xact_id(); RAISE EXCEPTION 'abort on purpose'; END$$")
    # the aborted transaction's xid: the newest xid before the next one assigned
    next_xid = int(one(PRIMARY, "SELECT pg_current_xact_id()::text"))
    aborted = next_xid - 1
    nudge()
    stamp = int(time.time())
    cases = {
        "unknown xid": ({"target_xid": "3"}, "target_xid", "no COMMIT or ABORT"),
        "aborted xid": ({"target_xid": str(aborted)}, "target_xid", "ABORTED"),
        "future xid": ({"target_xid": str(next_xid + 100000)}, "target_xid", "not been assigned yet"),
        "unknown name": ({"target_name": "no such point \u00e9"}, "target_name", "no restore point"),
        "lsn beyond": ({"target_lsn": "FFF/0"}, "target_lsn", "in the future"),
    }
    runs = {}
    for key, (conf, _, _) in cases.items():
        incident = f"INC-REF-{key.replace(' ', '-')}-{stamp}"
        runs[key] = incident_run_id("dr_pitr", incident)
        # plan-only previews (a run that may execute takes the server lock: five at once would refuse each other)
        api.trigger("dr_pitr", {"server": "pg-primary", "incident_id": incident, "plan_only": True, **conf},
                    run_id=runs[key])
    finals = wait_all(api, runs)
    for key, (_, field, why) in cases.items():
        assert finals[key]["state"] == "failed", key
        error = refusal(runs[key])
        assert error.startswith(f"ValidationError: {field}: ") and why in error, (key, error)
    assert primary_timeline() == tli and counts() == before and not pgbouncer_paused()
