"""`make bench`, part 3: dr_daily_verification over 1, 10 and 50 servers; DAG parse time with 50.

The fleet shares the lab's instances: every inventory entry `fleet-NNN` is the lab's second
primary (pg-primary2, its host, its database) behind a Barman server of its own name in a
separate Barman configuration ($LAB_DIR/bench/fleet: `archiver = on`, no streaming, no cron,
so no extra processes), whose catalogue is a clone of pg-primary2's backups and WAL (data files
hard-linked, metadata copied: the lab's own catalogue is never written through a link). The
lab's Barman, its servers and the inventory `make test` uses are untouched.

Barman's checks of those servers fail on archiving (PostgreSQL does not archive to them), so
each verification reports CRITICAL: every probe still runs (check, backups, WAL catalogue,
processes, disk), which is what is timed. Per fleet size the Airflow components are restarted
with the generated inventory (BARMAN_DR_INVENTORY via labctl's LAB_INVENTORY), the DAG is
triggered over REST and timed; the lab's inventory is put back at the end.

Scheduler overhead per mapped task = (wall time x pool slots - sum of task durations) / tasks:
the slot time no task used (scheduling, queueing, process start before the task's start date).
BENCH_FLEET=1,10,50  BENCH_PARSE_REPS=3
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "plugins"), str(Path(__file__).resolve().parents[1])]

from bench.common import REPO, loadavg, log, save_section, stats  # noqa: E402

LAB = Path(os.environ["LAB_DIR"])
F = LAB / "bench" / "fleet"
SOURCE = "pg-primary2"
DAG_ID = "dr_daily_verification"


def sh(argv: list[str], *, user: str | None = None, env: dict | None = None, timeout: float = 600) -> str:
    if user:
        argv = ["runuser", "-u", user, "--", *argv]
    r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"{argv} -> {r.returncode}: {r.stderr[-2000:]}")
    return r.stdout


def name(i: int) -> str:
    return f"fleet-{i:03d}"


def setup_barman(n: int) -> None:
    """The fleet's Barman configuration and catalogue clones (idempotent)."""
    home = F / "home"
    for d in (F, home, F / "jobs", F / "conf.d"):
        d.mkdir(parents=True, exist_ok=True)
    passfile = LAB / "secrets" / "pgpass-barman"
    (F / "barman.conf").write_text("\n".join([
        "; barman-dr benchmarks: fleet-scale Barman servers sharing pg-primary2 (bench/fleet_scale.py)",
        "[barman]", "barman_user = barman", f"barman_home = {home}", f"configuration_files_directory = {F / 'conf.d'}",
        f"log_file = {F / 'barman.log'}", "log_level = WARNING", ""]))
    src = LAB / "barman" / "home" / SOURCE
    addr = f"{os.environ['LAB_NET']}.21"
    for i in range(1, n + 1):
        srv = name(i)
        (F / "conf.d" / f"{srv}.conf").write_text("\n".join([
            f"[{srv}]", f"description = fleet benchmark clone of {SOURCE}",
            f"conninfo = host={addr} port=5432 user=barman dbname=postgres passfile={passfile}",
            "backup_method = postgres", "archiver = on", "streaming_archiver = off",
            "path_prefix = /usr/lib/postgresql/15/bin", "minimum_redundancy = 0", ""]))
        dest = home / srv
        if dest.exists():
            continue
        # data files hard-linked (Barman never rewrites them); metadata copied so nothing writes through a link
        sh(["cp", "-al", str(src), str(dest)])
        for meta in [*dest.glob("meta/*"), *dest.glob("wals/*.db"), dest / "identity.json"]:
            if meta.is_file():
                sh(["cp", "--remove-destination", str(src / meta.relative_to(dest)), str(meta)])
                meta.write_text(meta.read_text().replace(f"server_name={SOURCE}", f"server_name={srv}"))
        db = dest / "wals" / f"{SOURCE}-xlog.db"
        if db.exists():
            db.rename(dest / "wals" / f"{srv}-xlog.db")
        for d in ("streaming", "incoming", "errors"):
            for f in (dest / d).glob("*"):
                f.unlink()
    wrapper = F / "barman"
    wrapper.write_text(f"#!/bin/sh\nexec /opt/barman-dr/barman-3.19.1/bin/barman -c {F / 'barman.conf'} \"$@\"\n")
    os.chmod(wrapper, 0o755)
    sh(["chown", "-R", "barman", str(F)])


def inventory(n: int) -> Path:
    import yaml

    lab = yaml.safe_load((REPO / "include" / "inventory" / "lab.yaml").read_text())
    base = lab["servers"][SOURCE]
    inv = {"version": 1, "barman_hosts": {"barman-fleet": {
        "address": "${LAB_NET}.2", "ssh_conn_id": "barman_host", "barman_command": [str(F / "barman")],
        "job_dir": str(F / "jobs"), "backup_directory": str(F / "home"), "pool_slots": 4}},
        "db_hosts": lab["db_hosts"],
        "servers": {name(i): {**base, "description": f"fleet benchmark entry {i} (shares {SOURCE})",
                              "barman_host": "barman-fleet"} for i in range(1, n + 1)}}
    path = F / f"inventory-{n}.yaml"
    path.write_text(f"# generated by bench/fleet_scale.py: {n} servers sharing {SOURCE}\n"
                    + yaml.safe_dump(inv, sort_keys=False))
    return path


def restart_airflow(inv: Path | None) -> None:
    env = {**os.environ}
    if inv:
        env["LAB_INVENTORY"] = str(inv)
    else:
        env.pop("LAB_INVENTORY", None)
    sh([str(REPO / ".venv" / "bin" / "python"), str(REPO / "include" / "lab" / "labctl.py"), "restart-airflow"],
       env=env, timeout=600)


def parse_time(inv: Path | None, reps: int) -> dict:
    """All DAG files parsed by a DagBag in a fresh interpreter (after `import airflow.sdk`)."""
    code = ("import time, airflow.sdk\nfrom airflow.dag_processing.dagbag import DagBag\n"
            f"t=time.monotonic(); b=DagBag({str(REPO / 'dags')!r}); "
            "print(time.monotonic()-t, len(b.dags), len(b.import_errors))")
    env = {**os.environ, "PYTHONPATH": str(REPO / "plugins")}
    if inv:
        env["BARMAN_DR_INVENTORY"] = str(inv)
    runs = []
    for _ in range(reps):
        out = sh([str(REPO / ".venv" / "bin" / "python"), "-c", code], env=env).split()
        runs.append(float(out[-3]))
        dags, errors = int(out[-2]), int(out[-1])
    return {"seconds": stats(runs), "dags": dags, "import_errors": errors}


def verification_run(api: object, n: int) -> dict:
    # the dag processor must have parsed the DAG with this inventory (one mapped task per pool) before the trigger
    want = {"verify__barman_barman_fleet", "summary"}
    deadline = time.monotonic() + 300
    while True:
        try:
            tasks = {t["task_id"] for t in api._call("GET", f"/api/v2/dags/{DAG_ID}/tasks")["tasks"]}
        except Exception:  # not parsed yet
            tasks = set()
        if tasks == want:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"{DAG_ID} still has tasks {sorted(tasks)}, not {sorted(want)}")
        time.sleep(2)
    api.unpause(DAG_ID)
    run_id = f"bench_fleet_{n}_{int(time.time())}"
    t0 = time.monotonic()
    api.trigger(DAG_ID, {}, run_id=run_id)
    final = api.wait(DAG_ID, run_id, timeout=3600, poll=1)
    wall = time.monotonic() - t0
    api._call("PATCH", f"/api/v2/dags/{DAG_ID}", {"is_paused": True})
    tis = api.task_instances(DAG_ID, run_id)
    mapped = [t for t in tis if t["task_id"].startswith("verify__") and t.get("start_date") and t.get("end_date")]
    if len(mapped) != n:
        raise RuntimeError(f"{DAG_ID} run {run_id}: {len(mapped)} mapped verification tasks, expected {n}")

    def ts(t: dict, k: str) -> datetime:
        return datetime.fromisoformat(t[k])

    durations = [(ts(t, "end_date") - ts(t, "start_date")).total_seconds() for t in mapped]
    run = api.get_run(DAG_ID, run_id)
    run_start = datetime.fromisoformat(run["start_date"]) if run.get("start_date") else None
    first = min(ts(t, "start_date") for t in mapped)
    last = max(ts(t, "end_date") for t in mapped)
    span = (last - first).total_seconds()
    slots = 4
    lanes = min(slots, n)
    statuses: dict[str, int] = {}
    import psycopg2

    conn = psycopg2.connect(os.environ["LAB_AUDIT_DSN"])
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT coalesce(details->>'status', outcome) FROM audit.events WHERE run_id = %s AND "
                        "action = 'verify_report'", (run_id,))
            for (st,) in cur.fetchall():
                statuses[st] = statuses.get(st, 0) + 1
    finally:
        conn.close()
    return {"servers": n, "run_id": run_id, "state": final["state"], "wall_s": round(wall, 2),
            "mapped_span_s": round(span, 2), "task_s": stats(durations),
            "task_seconds_total": round(sum(durations), 2),
            "overhead_per_task_s": round((span * lanes - sum(durations)) / n, 3),
            "first_task_latency_s": round((first - run_start).total_seconds(), 3) if run_start else None,
            "statuses": statuses}


def main() -> int:
    sizes = [int(x) for x in os.environ.get("BENCH_FLEET", "1,10,50").split(",") if x]
    reps = int(os.environ.get("BENCH_PARSE_REPS", "3"))
    setup_barman(max(sizes))
    load_before = loadavg()
    parse = {"lab_inventory": parse_time(None, reps)}
    invs = {n: inventory(n) for n in sizes}
    for n in sizes:
        parse[f"{n}_servers"] = parse_time(invs[n], reps)
        log(f"[fleet] DAG parse, {n} servers: {parse[f'{n}_servers']['seconds']['median']} s")
    runs = []
    from barman_dr.surfaces.api_client import from_env

    try:
        for n in sizes:
            restart_airflow(invs[n])
            api = from_env()
            time.sleep(5)
            r = verification_run(api, n)
            r["loadavg"] = loadavg()
            runs.append(r)
            log(f"[fleet] {n} servers: wall {r['wall_s']} s, task median {r['task_s']['median']} s, overhead/task "
                f"{r['overhead_per_task_s']} s ({r['state']})")
    finally:
        restart_airflow(None)
    summary = {"parse": parse, "runs": runs, "loadavg_before": load_before, "loadavg_after": loadavg(),
               "pool_slots": 4, "median_task_s_all": statistics.median([r["task_s"]["median"] for r in runs])
               if runs else None}
    out = save_section("fleet_scale", summary)
    print()
    print(f"{'servers':>8} {'wall s':>8} {'task s (med)':>13} {'overhead/task s':>16} {'state':>8}")
    for r in runs:
        print(f"{r['servers']:>8} {r['wall_s']:>8} {r['task_s']['median']:>13} {r['overhead_per_task_s']:>16} "
              f"{r['state']:>8}")
    for k, v in parse.items():
        print(f"DAG parse ({k}): median {v['seconds']['median']} s for {v['dags']} DAGs, {v['import_errors']} errors")
    print(f"load average before/after: {load_before} / {summary['loadavg_after']}  -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
