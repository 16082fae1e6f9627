"""`make bench`, part 1: what the orchestration costs against the raw runbook, same data, same run.

Each repetition: a fresh full backup (untimed), the seed's scenario, then a PITR to the GOOD
STATE either by `bench/raw_pitr.sh` (the seed's runbook as a shell script) or by `dr_pitr`
triggered over REST with the real scheduler. RTO = app frozen -> app resumed. Between
repetitions, dr_pitr-style housekeeping (recovery settings cleared, Barman streaming on the
new timeline) is done untimed so every repetition starts from the same kind of state.
Prints a table and writes bench/results/latest.json. Not part of `make test`.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "plugins"), str(REPO)]

from barman_dr.api_client import from_env, incident_run_id  # noqa: E402
from include.lab import seed_scenario  # noqa: E402

BARMAN = os.environ["LAB_BARMAN"].split()
REPS = int(os.environ.get("BENCH_REPS", "3"))


def barman(*args: str, check: bool = True) -> str:
    return subprocess.run([*BARMAN, *args], check=check, capture_output=True, text=True).stdout


def fresh_backup() -> None:
    subprocess.Popen(["sh", "-c", "sleep 2; psql \"$LAB_PRIMARY_DSN\" -qAtc 'select pg_current_xact_id()' >/dev/null"])
    barman("backup", "--wait", "pg-primary")


def housekeeping() -> None:
    """What dr_pitr does after a PITR, for the raw runs (untimed): a clean config and streaming."""
    from barman_dr.hooks.dbhost import DbHostHook
    from barman_dr.inventory import load_inventory
    from barman_dr.operators.pitr import clear_recovery_settings

    inv = load_inventory()
    srv = inv.server("pg-primary")
    clear_recovery_settings(DbHostHook(db_host=inv.db_host("pg-primary")), srv.primary)
    barman("receive-wal", "--stop", "pg-primary", check=False)
    barman("receive-wal", "--reset", "pg-primary", check=False)
    barman("cron")
    time.sleep(3)


def raw_run(target: str) -> dict:
    out = subprocess.run([str(REPO / "bench" / "raw_pitr.sh"), target], check=True, capture_output=True,
                         text=True).stdout.strip().splitlines()[-1]
    t = json.loads(out)
    phases = {"freeze": t["stop"] - t["freeze"], "stop": t["move"] - t["stop"], "move_aside": t["restore"] - t["move"],
              "restore": t["start"] - t["restore"], "start_to_promoted": t["count"] - t["start"],
              "count": t["resume"] - t["count"], "resume": t["end"] - t["resume"]}
    return {"rto_s": t["end"] - t["freeze"], "phases_s": phases, "counts": t["counts"]}


def airflow_run(api: object, target: str, n: int) -> dict:
    incident = f"BENCH-{int(time.time())}-{n}"
    run_id = incident_run_id("dr_pitr", incident)
    t0 = time.monotonic()
    api.trigger("dr_pitr", {"server": "pg-primary", "target_time": target, "incident_id": incident,
                            "expected": {"orders_total": 10500, "orders_completed": 7465},
                            "confirm": "PITR pg-primary"}, run_id=run_id)
    final = api.wait("dr_pitr", run_id, timeout=1800, poll=0.5)
    total = time.monotonic() - t0
    if final["state"] != "success":
        raise SystemExit(f"dr_pitr run {run_id} {final['state']}")
    report = api.xcom("dr_pitr", run_id, "report")
    tis = {t["task_id"]: t for t in api.task_instances("dr_pitr", run_id)}
    # scheduling latency inside the frozen window: time between one task's end and the next one's start
    chain = ["freeze_app", "stop_postgres", "move_aside", "barman_restore", "start_recovery", "verify_target",
             "validate_data", "unfreeze_app"]
    gaps = []
    for a, b in itertools.pairwise(chain):
        end, start = tis[a].get("end_date"), tis[b].get("start_date")
        if end and start:
            gaps.append((datetime.fromisoformat(start) - datetime.fromisoformat(end)).total_seconds())
    work = sum(v for v in report["phases_s"].values() if v)
    return {"rto_s": report["rto_s"], "phases_s": report["phases_s"], "trigger_to_success_s": total,
            "task_gap_s": sum(gaps), "task_work_s": work, "counts": report["counts"]}


def main() -> int:
    api = from_env()
    api.unpause("dr_pitr")
    results: dict[str, list[dict]] = {"raw": [], "airflow": []}
    try:
        for n in range(REPS):
            for kind in ("raw", "airflow"):
                fresh_backup()
                sc = seed_scenario.play()
                r = raw_run(sc.good_state) if kind == "raw" else airflow_run(api, sc.good_state, n)
                if kind == "raw":
                    housekeeping()
                results[kind].append(r)
                print(f"rep {n + 1}/{REPS} {kind:<8} RTO {r['rto_s']:.2f} s  counts {r['counts']}", flush=True)
    finally:
        api._call("PATCH", "/api/v2/dags/dr_pitr", {"is_paused": True})

    def stats(kind: str, key: str = "rto_s") -> dict:
        xs = [r[key] for r in results[kind]]
        return {"min": round(min(xs), 3), "median": round(statistics.median(xs), 3), "max": round(max(xs), 3)}

    raw, air = stats("raw"), stats("airflow")
    summary = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "when": datetime.now(UTC).isoformat(), "reps": REPS,
        "raw_rto_s": raw, "airflow_rto_s": air,
        "ratio_median": round(air["median"] / raw["median"], 2),
        "airflow_task_gap_s": stats("airflow", "task_gap_s"), "airflow_task_work_s": stats("airflow", "task_work_s"),
        "airflow_trigger_to_success_s": stats("airflow", "trigger_to_success_s"),
        "runs": results,
    }
    out = REPO / "bench" / "results" / "latest.json"
    out.write_text(json.dumps(summary, indent=2, default=str))
    print()
    print(f"{'PITR of the seed (RTO = freeze -> resume)':<44} {'min':>8} {'median':>8} {'max':>8}")
    print(f"{'raw runbook (bench/raw_pitr.sh)':<44} {raw['min']:>8} {raw['median']:>8} {raw['max']:>8}")
    print(f"{'dr_pitr via REST + scheduler':<44} {air['min']:>8} {air['median']:>8} {air['max']:>8}")
    g, w = summary["airflow_task_gap_s"], summary["airflow_task_work_s"]
    print(f"{'  of which task work (operators)':<44} {w['min']:>8} {w['median']:>8} {w['max']:>8}")
    print(f"{'  of which scheduling gaps between tasks':<44} {g['min']:>8} {g['median']:>8} {g['max']:>8}")
    print(f"ratio (median): {summary['ratio_median']}x   -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
