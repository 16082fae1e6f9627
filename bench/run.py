"""`make bench`, part 1: what the orchestration costs against the raw runbook, same data, same run.

Each repetition (BENCH_REPS, default 3) plays, for each kind, a fresh full backup (untimed), the
seed's scenario, then a PITR to the GOOD STATE:

- raw:            bench/raw_pitr.sh, the seed's runbook as a shell script (restore inside the downtime)
- airflow:        dr_pitr over REST with the real scheduler, staged_restore=false (same work as raw)
- airflow_staged: dr_pitr with staged_restore=true (the default): restore before the freeze

RTO = downtime = app frozen -> app resumed. For dr_pitr the downtime is split into the operators'
own work, the task overhead (task process start, DAG parse, XCom, audit writes, SSH connects:
task duration minus operator work) and the scheduling gaps between consecutive tasks. Between
repetitions, dr_pitr-style housekeeping (recovery settings cleared, Barman streaming on the new
timeline) is done untimed after raw runs. Prints a table and writes the "orchestration" section
of bench/results/latest.json. Not part of `make test`. BENCH_KINDS=raw,airflow,airflow_staged.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "plugins"), str(Path(__file__).resolve().parents[1])]

from barman_dr.surfaces.api_client import from_env, incident_run_id  # noqa: E402
from bench.common import REPO, barman, loadavg, log, save_section, stats  # noqa: E402
from include.lab import seed_scenario  # noqa: E402

REPS = int(os.environ.get("BENCH_REPS", "3"))
KINDS = [k for k in os.environ.get("BENCH_KINDS", "raw,airflow,airflow_staged").split(",") if k]
#: the tasks inside the downtime window, in order
CHAIN = ["freeze_app", "stop_postgres", "move_aside", "barman_restore", "start_recovery", "verify_target",
         "validate_data", "unfreeze_app"]


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
    return {"rto_s": t["end"] - t["freeze"], "phases_s": {k: round(v, 3) for k, v in phases.items()},
            "counts": t["counts"]}


def airflow_run(api: object, target: str, n: int, staged: bool) -> dict:
    incident = f"BENCH-{int(time.time())}-{n}{'s' if staged else 'u'}"
    run_id = incident_run_id("dr_pitr", incident)
    t0 = time.monotonic()
    api.trigger("dr_pitr", {"server": "pg-primary", "target_time": target, "incident_id": incident,
                            "expected": {"orders_total": 10500, "orders_completed": 7465},
                            "staged_restore": staged, "confirm": "PITR pg-primary"}, run_id=run_id)
    final = api.wait("dr_pitr", run_id, timeout=1800, poll=0.5)
    total = time.monotonic() - t0
    if final["state"] != "success":
        raise SystemExit(f"dr_pitr run {run_id} {final['state']}")
    report = api.xcom("dr_pitr", run_id, "report")
    tis = {t["task_id"]: t for t in api.task_instances("dr_pitr", run_id) if t.get("map_index") in (None, -1)}

    def span(task: str) -> tuple[datetime, datetime]:
        return datetime.fromisoformat(tis[task]["start_date"]), datetime.fromisoformat(tis[task]["end_date"])

    gaps = {f"{a}->{b}": round((span(b)[0] - span(a)[1]).total_seconds(), 3) for a, b in itertools.pairwise(CHAIN)}
    work = {t: report["phases_s"].get(t) or 0.0 for t in CHAIN}
    overhead = {t: round((span(t)[1] - span(t)[0]).total_seconds() - work[t], 3) for t in CHAIN}
    stage = (report.get("outside_downtime_s") or {}).get("stage_restore")
    return {"run_id": run_id, "rto_s": report["rto_s"], "phases_s": report["phases_s"], "stage_restore_s": stage,
            "trigger_to_success_s": round(total, 3), "task_gap_s": round(sum(gaps.values()), 3),
            "task_work_s": round(sum(work.values()), 3), "task_overhead_s": round(sum(overhead.values()), 3),
            "gaps_s": gaps, "overhead_s": overhead, "counts": report["counts"]}


def main() -> int:
    api = from_env()
    api.unpause("dr_pitr")
    results: dict[str, list[dict]] = {k: [] for k in KINDS}
    load_before = loadavg()
    try:
        for n in range(REPS):
            for kind in KINDS:
                fresh_backup()
                sc = seed_scenario.play()
                if kind == "raw":
                    r = raw_run(sc.good_state)
                    housekeeping()
                else:
                    r = airflow_run(api, sc.good_state, n, staged=kind == "airflow_staged")
                r["loadavg"] = loadavg()
                results[kind].append(r)
                extra = f" (+ staging {r['stage_restore_s']} s before the freeze)" if r.get("stage_restore_s") else ""
                log(f"rep {n + 1}/{REPS} {kind:<15} downtime {r['rto_s']:.2f} s{extra}  counts {r['counts']}  "
                    f"load {r['loadavg'][0]}")
    finally:
        api._call("PATCH", "/api/v2/dags/dr_pitr", {"is_paused": True})

    def st(kind: str, key: str = "rto_s") -> dict:
        return stats([r.get(key) for r in results.get(kind, [])])

    summary: dict = {"reps": REPS, "loadavg_before": load_before, "loadavg_after": loadavg(),
                     "downtime_s": {k: st(k) for k in KINDS}}
    for kind in ("airflow", "airflow_staged"):
        if kind in KINDS:
            summary[kind] = {key: st(kind, key) for key in ("task_work_s", "task_overhead_s", "task_gap_s",
                                                            "stage_restore_s", "trigger_to_success_s")}
    raw_med = summary["downtime_s"].get("raw", {}).get("median")
    for kind in ("airflow", "airflow_staged"):
        med = summary["downtime_s"].get(kind, {}).get("median")
        if raw_med and med:
            summary[f"{kind}_ratio_median"] = round(med / raw_med, 2)
            summary[f"{kind}_added_s_median"] = round(med - raw_med, 2)
    summary["runs"] = results
    out = save_section("orchestration", summary)

    print()
    print(f"{'PITR of the seed: downtime (freeze -> resume), s':<50} {'min':>8} {'median':>8} {'max':>8}")
    labels = {"raw": "raw runbook (bench/raw_pitr.sh)", "airflow": "dr_pitr via REST, staged_restore=false",
              "airflow_staged": "dr_pitr via REST, staged_restore=true"}
    for kind in KINDS:
        s = summary["downtime_s"][kind]
        print(f"{labels[kind]:<50} {s['min']:>8} {s['median']:>8} {s['max']:>8}")
        if kind in summary:
            for key, label in (("task_work_s", "operator work"), ("task_overhead_s", "task overhead (start, parse, "
                               "audit, SSH)"), ("task_gap_s", "scheduling gaps between tasks"),
                               ("stage_restore_s", "staging before the freeze (not downtime)")):
                v = summary[kind][key]
                if v["n"]:
                    print(f"{'  ' + label:<50} {v['min']:>8} {v['median']:>8} {v['max']:>8}")
    for kind in ("airflow", "airflow_staged"):
        if f"{kind}_ratio_median" in summary:
            print(f"{kind}: ratio to raw (median) {summary[f'{kind}_ratio_median']}x, "
                  f"added {summary[f'{kind}_added_s_median']} s")
    print(f"load average before/after: {load_before} / {summary['loadavg_after']}   -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
