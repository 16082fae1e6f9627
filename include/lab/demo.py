"""`make demo`: the seed's disaster, recovered through the Airflow REST API like an incident tool would.

Needs the lab's environment (include/lab/demo.sh sources it). Prints the timeline as it is
played, follows the dr_pitr run task by task, then a short report.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[2] / "plugins"), str(Path(__file__).resolve().parents[2])]

from barman_dr.surfaces.api_client import from_env, incident_run_id  # noqa: E402
from include.lab import seed_scenario  # noqa: E402
from tests.pitr_support import counts, one, primary_timeline, sql  # noqa: E402


def say(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main() -> int:
    api = from_env()
    say("waiting for Airflow to list dr_pitr ...")
    deadline = time.monotonic() + 180
    while not api.dag_exists("dr_pitr"):
        if time.monotonic() > deadline:
            say("dr_pitr never appeared: see $LAB_DIR/log/airflow-*.log")
            return 1
        time.sleep(2)
    api.unpause("dr_pitr")

    tli_before = primary_timeline()
    writer = seed_scenario.AppWriter()
    writer.start()
    say("the application writes through PgBouncer (a heartbeat commit every 200 ms)")
    sc = seed_scenario.play()
    say(f"CP1  {sc.cp1['orders_total']:,} orders ({sc.cp1['orders_completed']:,} completed)")
    say(f"CP2  {sc.cp2['orders_total']:,} orders ({sc.cp2['orders_completed']:,} completed)")
    say(f"GOOD STATE  {sc.good_state}   <- recovery target")
    say(f"INCIDENT  DELETE FROM critical_orders WHERE status='completed'  -> {sc.deleted_rows:,} rows gone "
        f"(xid {sc.delete_xid}); {sc.after_delete['orders_total']:,} left")

    incident = f"DEMO-{time.strftime('%Y%m%dT%H%M%S')}"
    run_id = incident_run_id("dr_pitr", incident)
    conf = {"server": "pg-primary", "target_time": sc.good_state, "incident_id": incident,
            "reason": "make demo: mass DELETE of completed orders",
            "expected": {"orders_total": 10500, "orders_completed": 7465}, "confirm": "PITR pg-primary"}
    say(f"POST /api/v2/dags/dr_pitr/dagRuns  run_id={run_id}  (immediately, no waiting for archive_timeout)")
    api.trigger("dr_pitr", conf, run_id=run_id)

    seen: dict[str, str] = {}

    def progress(_run: dict) -> None:
        for ti in api.task_instances("dr_pitr", run_id):
            key = ti["task_id"] + (f"[{ti['map_index']}]" if ti.get("map_index", -1) >= 0 else "")
            state = ti.get("state") or "none"
            if seen.get(key) != state and state in ("running", "success", "failed", "skipped", "up_for_retry"):
                seen[key] = state
                say(f"  {key:<18} {state}")

    final = api.wait("dr_pitr", run_id, timeout=1200, poll=1.0, on_progress=progress)
    app = writer.stop()
    if final["state"] != "success":
        say(f"dr_pitr {final['state']}: see the Airflow UI ({api.base_url}) and the run note:")
        print(api.get_run("dr_pitr", run_id).get("note"))
        return 1
    r = api.xcom("dr_pitr", run_id, "report")
    wal = api.xcom("dr_pitr", run_id, "wal_coverage") or {}
    now = counts()
    standby = sql("LAB_PRIMARY_DSN", "SELECT application_name, state FROM pg_stat_replication")
    print()
    print("=" * 72)
    print(f" barman-dr PITR report  (incident {incident})")
    print("=" * 72)
    print(f" counts before  : {sc.after_delete['orders_total']:,} orders / {sc.after_delete['orders_completed']:,} completed")
    print(f" counts after   : {now['orders_total']:,} orders / {now['orders_completed']:,} completed   (expected 10,500 / 7,465)")
    print(f" target         : {r['target']['value']}  ->  {r['recovery_stop'][1] if len(r['recovery_stop']) > 1 else ''}")
    print(f" backup used    : {r['backup_id']}")
    print(f" WAL proven     : {wal.get('first_wal')} .. {wal.get('last_wal')} ({wal.get('wal_segments')} segments, "
          f"closed by switch-wal: {wal.get('closed_wal')})")
    print(f" timeline       : {r['old_timeline']} -> {r['new_timeline']} (primary now on {primary_timeline()}, "
          f"was {tli_before})")
    print(f" standby        : {', '.join(f'{n} {s}' for n, s in standby) or 'none streaming'}; "
          f"in recovery: {one('LAB_STANDBY_DSN', 'SELECT pg_is_in_recovery()')}")
    print(f" old data kept  : {r['moved_aside']}")
    print(f" new backup     : {r['new_backup_id']} (timeline {r['new_timeline']})")
    print(f" app            : {app['commits']} commits, {app['errors']} errors, longest stall {app['longest_stall_s']} s")
    for err in app["first_errors"]:
        print(f"   app error    : {err}")
    print(f" RTO            : {r['rto_s']} s (freeze -> resume; objective {r['rto_objective_s']} s, "
          f"estimated {r['estimated_rto_s']} s)")
    for phase, secs in r["phases_s"].items():
        print(f"   {phase:<16} {secs} s")
    for phase, secs in (r.get("outside_downtime_s") or {}).items():
        print(f"   {phase:<16} {secs} s  (before the freeze, app running: not downtime)")
    print(f" Airflow UI     : {api.base_url}/dags/dr_pitr/runs/{run_id}")
    print("=" * 72)
    return 0 if now == {"orders_total": 10500, "orders_completed": 7465} else 1


if __name__ == "__main__":
    raise SystemExit(main())
