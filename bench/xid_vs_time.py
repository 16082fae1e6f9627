"""`make bench`, part 1b: an xid target against the equivalent time target, on the same data, WAL between backups.

Issue 14: `backup_id: auto` started xid and restore-point targets from the *oldest* backup, so
an xid target replayed the whole retention window (39.6 s against 4.4 s for the equivalent
time target, with 2.6 GiB of WAL between the oldest and the newest backup). Now every target
is resolved in the WAL first and starts from the newest backup before its stop record.

Each repetition (BENCH_REPS, default 3), for each kind, builds the same situation: a full
backup, BENCH_XID_WAL (default 512M) of WAL written, a second full backup, the seed's
scenario (GOOD STATE, the DELETE); then a staged dr_pitr over REST:

- time:        target_time = GOOD STATE (backup_id auto)
- xid:         target_xid = the DELETE's xid, target_inclusive=false (backup_id auto): the same stop
- xid_oldest:  the same xid with backup_id = the older backup: what `auto` used to do

Reported per kind: the resolution (resolve_target), the staging (restore + replay before the
freeze), the downtime and trigger -> success; the ratios xid/time (goal <= 1.2x) and
xid_oldest/time. Writes the "xid_vs_time" section of bench/results/latest.json.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "plugins"), str(Path(__file__).resolve().parents[1])]

from barman_dr.surfaces.api_client import from_env, incident_run_id  # noqa: E402
from bench.common import loadavg, log, save_section, stats  # noqa: E402
from bench.run import fresh_backup  # noqa: E402
from include.lab import seed_scenario  # noqa: E402

REPS = int(os.environ.get("BENCH_REPS", "3"))
KINDS = [k for k in os.environ.get("BENCH_XID_KINDS", "time,xid,xid_oldest").split(",") if k]


def wal_bytes(spec: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    return int(float(spec[:-1]) * units[spec[-1].upper()]) if spec[-1].upper() in units else int(spec)


WAL = wal_bytes(os.environ.get("BENCH_XID_WAL", "512M"))


def newest_backups() -> list[str]:
    import json

    from bench.common import barman

    return [b["backup_id"] for b in json.loads(barman("-f", "json", "list-backups", "pg-primary"))["pg-primary"]]


def write_wal(nbytes: int) -> float:
    """About `nbytes` of WAL on the primary (1 KiB rows in batches, then truncated: the disk stays small)."""
    import psycopg2

    t0 = time.monotonic()
    conn = psycopg2.connect(os.environ["LAB_PRIMARY_DSN"])
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS bench_wal (id bigserial PRIMARY KEY, pad text)")
        cur.execute("SELECT pg_current_wal_lsn()")
        start = cur.fetchone()[0]
        while True:
            cur.execute("INSERT INTO bench_wal (pad) SELECT repeat(md5(i::text), 32) FROM generate_series(1, 20000) i")
            cur.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)", (start,))
            if cur.fetchone()[0] >= nbytes:
                break
            cur.execute("TRUNCATE bench_wal")
        cur.execute("TRUNCATE bench_wal")
    conn.close()
    return time.monotonic() - t0


def one_run(api: object, kind: str, n: int) -> dict:
    fresh_backup()
    older = newest_backups()[0]
    wal_s = write_wal(WAL)
    fresh_backup()
    newer = newest_backups()[0]
    sc = seed_scenario.play()
    incident = f"BENCHX-{int(time.time())}-{n}-{kind}"
    run_id = incident_run_id("dr_pitr", incident)
    conf = {"server": "pg-primary", "incident_id": incident, "confirm": "PITR pg-primary",
            "expected": {"orders_total": 10500, "orders_completed": 7465}}
    if kind == "time":
        conf["target_time"] = sc.good_state
    else:
        conf.update(target_xid=str(sc.delete_xid), target_inclusive=False)
        if kind == "xid_oldest":
            conf["backup_id"] = older
    t0 = time.monotonic()
    api.trigger("dr_pitr", conf, run_id=run_id)
    final = api.wait("dr_pitr", run_id, timeout=3600, poll=0.5)
    total = time.monotonic() - t0
    if final["state"] != "success":
        raise SystemExit(f"dr_pitr run {run_id} {final['state']}")
    report = api.xcom("dr_pitr", run_id, "report")
    resolved = api.xcom("dr_pitr", run_id, "resolve_target")
    stage = api.xcom("dr_pitr", run_id, "stage_restore")
    return {"run_id": run_id, "backup_id": resolved["backup_id"], "older": older, "newer": newer,
            "replay_bytes": resolved["replay"]["bytes"], "resolve_s": resolved.get("duration_s"),
            "stage_restore_s": stage.get("duration_s"), "rto_s": report["rto_s"],
            "time_to_recovered_s": report.get("time_to_recovered_s"), "trigger_to_success_s": round(total, 3),
            "wal_written_s": round(wal_s, 1), "counts": report["counts"]}


def main() -> int:
    api = from_env()
    api.unpause("dr_pitr")
    results: dict[str, list[dict]] = {k: [] for k in KINDS}
    load_before = loadavg()
    try:
        for n in range(REPS):
            for kind in KINDS:
                r = one_run(api, kind, n)
                r["loadavg"] = loadavg()
                results[kind].append(r)
                log(f"rep {n + 1}/{REPS} {kind:<10} backup {r['backup_id']} replay {r['replay_bytes'] / 2**20:.0f} MiB "
                    f"resolve {r['resolve_s']} s staging {r['stage_restore_s']} s downtime {r['rto_s']} s "
                    f"total {r['trigger_to_success_s']} s load {r['loadavg'][0]}")
    finally:
        api._call("PATCH", "/api/v2/dags/dr_pitr", {"is_paused": True})
    keys = ("resolve_s", "stage_restore_s", "rto_s", "time_to_recovered_s", "trigger_to_success_s", "replay_bytes")
    summary: dict = {"reps": REPS, "wal_between_backups_bytes": WAL, "loadavg_before": load_before,
                     "loadavg_after": loadavg(), **{k: {key: stats([r[key] for r in results[k]]) for key in keys}
                                                    for k in KINDS}}
    for kind in ("xid", "xid_oldest"):
        for key in ("stage_restore_s", "trigger_to_success_s"):
            a, b = summary.get(kind, {}).get(key, {}).get("median"), summary.get("time", {}).get(key, {}).get("median")
            if a and b:
                summary[f"{kind}_to_time_{key}_ratio"] = round(a / b, 2)
    summary["runs"] = results
    out = save_section("xid_vs_time", summary)
    print()
    print(f"xid vs time target, {WAL / 2**20:.0f} MiB of WAL between two backups (median of {REPS}, s)")
    print(f"{'kind':<12} {'replay MiB':>10} {'resolve':>8} {'staging':>8} {'downtime':>9} {'trigger->done':>14}")
    for kind in KINDS:
        s = summary[kind]
        print(f"{kind:<12} {s['replay_bytes']['median'] / 2**20:>10.1f} {s['resolve_s']['median']:>8} "
              f"{s['stage_restore_s']['median']:>8} {s['rto_s']['median']:>9} {s['trigger_to_success_s']['median']:>14}")
    for k, v in summary.items():
        if k.endswith("_ratio"):
            print(f"{k}: {v}x")
    print(f"load average before/after: {load_before} / {summary['loadavg_after']}   -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
