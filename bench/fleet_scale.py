"""`make bench`, part 3: dr_daily_verification over 1, 10 and 50 HEALTHY servers, per executor; DAG parse time.

The fleet is real: `BENCH_FLEET_CLUSTERS` (5) PostgreSQL 15 clusters started by this script
under $LAB_DIR/bench/fleet-pg (Unix sockets only, peer authentication for the `barman` OS
user, on the pg-primary2 host), and 50 Barman servers `fleet-NNN` spread over them, ~10 per
cluster, in a Barman configuration of their own ($LAB_DIR/bench/fleet-healthy): each with its
own replication slot, `streaming_archiver = on` and `receive-wal` running, and a base backup
(`backup_method = postgres`), so `barman check` is all OK and every verification does its
full work (no short-circuit on a failed check). The lab's Barman, its servers and the
inventory `make test` uses are untouched.

Per executor (`BENCH_EXECUTORS`, default `local`; e.g. `local,celery`) and fleet size
(`BENCH_FLEET`, default 1,10,50) the Airflow components are restarted through labctl with
`LAB_EXECUTOR=<executor> LAB_INVENTORY=<generated inventory>`, the DAG is triggered over REST
and timed (trigger → run end). Side by side, the raw commands over the same servers through
the same SSH door: `barman -f json check`, `list-backups` and `show-servers` of those servers,
one after the other (`BENCH_RAW_REPS`, median). Every report must be OK; the statuses are
recorded per run. At the end the lab's Airflow is restarted as it was, and everything this
script started (every `receive-wal`, the clusters) is stopped; the clusters' data and the
backups stay for the next run (`rm -rf "$LAB_DIR"/bench/fleet-*` to rebuild).

BENCH_FLEET=1,10,50  BENCH_EXECUTORS=local  BENCH_FLEET_CLUSTERS=5  BENCH_RAW_REPS=3  BENCH_PARSE_REPS=3
"""

from __future__ import annotations

import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "plugins"), str(Path(__file__).resolve().parents[1])]

from bench.common import PG_BIN, REPO, loadavg, log, save_section, stats  # noqa: E402

LAB = Path(os.environ["LAB_DIR"])
F = LAB / "bench" / "fleet-healthy"      # Barman configuration, home, jobs, inventories (owned by barman)
P = LAB / "bench" / "fleet-pg"           # the PostgreSQL clusters (owned by postgres)
DB_HOST = "pg-primary2"
DAG_ID = "dr_daily_verification"
BARMAN_HOST = "barman-fleet"
PORT0 = 5440


def sh(argv: list[str], *, user: str | None = None, env: dict | None = None, timeout: float = 600,
       check: bool = True) -> str:
    if user:
        argv = ["runuser", "-u", user, "--", *argv]
    r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    if check and r.returncode != 0:
        raise RuntimeError(f"{argv} -> {r.returncode}: {r.stderr[-2000:]}")
    return r.stdout


def name(i: int) -> str:
    return f"fleet-{i:03d}"


def cluster_of(i: int, per: int) -> int:
    return (i - 1) // per + 1


def barman(*args: str, check: bool = True, timeout: float = 600) -> str:
    """The fleet's Barman, locally as the barman user (setup and cleanup; the timed commands go over SSH)."""
    return sh([str(F / "barman"), *args], user="barman", check=check, timeout=timeout)


# ---------------------------------------------------------------------------------- the fleet


def start_clusters(clusters: int) -> None:
    """initdb (first run) and start each cluster: sockets only, peer auth, a superuser `barman` role."""
    P.mkdir(parents=True, exist_ok=True)
    sh(["chown", "postgres", str(P)])
    for c in range(1, clusters + 1):
        data, sock = P / f"c{c}" / "data", P / f"c{c}" / "run"
        if not (data / "PG_VERSION").exists():
            sh(["mkdir", "-p", str(data), str(sock)], user="postgres")
            sh([f"{PG_BIN}/initdb", "-D", str(data), "-U", "postgres", "--auth-local=peer", "--no-sync"],
               user="postgres")
            with (data / "postgresql.auto.conf").open("a") as f:
                f.write("\n".join([
                    "# bench/fleet_scale.py: a small cluster for ~10 Barman servers (a slot and a WAL sender each)",
                    "listen_addresses = ''", f"unix_socket_directories = '{sock}'", f"port = {PORT0 + c}",
                    "wal_level = replica", "max_wal_senders = 40", "max_replication_slots = 40",
                    "max_connections = 80", "shared_buffers = 16MB", "fsync = off", "synchronous_commit = off",
                    f"cluster_name = 'fleet-c{c}'", ""]))
            hba = data / "pg_hba.conf"
            hba.write_text("local all postgres peer\nlocal all barman peer\nlocal replication barman peer\n")
        if not (data / "postmaster.pid").exists():
            sh([f"{PG_BIN}/pg_ctl", "-D", str(data), "-l", str(P / f"c{c}" / "log"), "-w", "-t", "60", "start"],
               user="postgres")
        sock = P / f"c{c}" / "run"
        sh([f"{PG_BIN}/psql", "-X", "-q", "-h", str(sock), "-p", str(PORT0 + c), "-d", "postgres", "-c",
            "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'barman') THEN "
            "CREATE ROLE barman SUPERUSER REPLICATION LOGIN; END IF; END $$"], user="postgres")


def stop_clusters(clusters: int) -> None:
    for c in range(1, clusters + 1):
        data = P / f"c{c}" / "data"
        if (data / "postmaster.pid").exists():
            sh([f"{PG_BIN}/pg_ctl", "-D", str(data), "-m", "fast", "-w", "-t", "60", "stop"], user="postgres",
               check=False)


def write_barman_config(n: int, per: int) -> None:
    home = F / "home"
    for d in (F, home, F / "jobs", F / "conf.d"):
        d.mkdir(parents=True, exist_ok=True)
    (F / "barman.conf").write_text("\n".join([
        "; barman-dr benchmarks: a healthy fleet of streaming Barman servers (bench/fleet_scale.py)",
        "[barman]", "barman_user = barman", f"barman_home = {home}", f"configuration_files_directory = {F / 'conf.d'}",
        f"log_file = {F / 'barman.log'}", "log_level = WARNING", ""]))
    for i in range(1, n + 1):
        c = cluster_of(i, per)
        sock = P / f"c{c}" / "run"
        conn = f"host={sock} port={PORT0 + c} user=barman dbname=postgres"
        (F / "conf.d" / f"{name(i)}.conf").write_text("\n".join([
            f"[{name(i)}]", f"description = fleet benchmark server {i} on cluster fleet-c{c}",
            f"conninfo = {conn}", f"streaming_conninfo = {conn}", "backup_method = postgres",
            "streaming_archiver = on", "archiver = off", f"slot_name = {name(i).replace('-', '_')}",
            "create_slot = auto", "immediate_checkpoint = true", f"path_prefix = {PG_BIN}",
            "minimum_redundancy = 0", ""]))
    wrapper = F / "barman"
    wrapper.write_text(f"#!/bin/sh\nexec /opt/barman-dr/barman-3.19.1/bin/barman -c {F / 'barman.conf'} \"$@\"\n")
    os.chmod(wrapper, 0o755)
    sh(["chown", "-R", "barman", str(F)])


def switch_wal(clusters: int) -> None:
    """A write and a WAL switch on each cluster: the segment is complete, receive-wal streams it whole."""
    for c in range(1, clusters + 1):
        sh([f"{PG_BIN}/psql", "-X", "-q", "-h", str(P / f"c{c}" / "run"), "-p", str(PORT0 + c), "-d", "postgres",
            "-c", "CREATE TABLE IF NOT EXISTS bench_tick (t timestamptz)", "-c", "INSERT INTO bench_tick VALUES (now())",
            "-c", "SELECT pg_switch_wal()"], user="postgres")


def check_payload(servers: list[str]) -> dict[str, Any]:
    out = barman("-f", "json", "check", *servers, check=False, timeout=900)
    try:
        return json.loads(out)
    except ValueError:
        return {}


def failing(servers: list[str]) -> dict[str, list[str]]:
    payload = check_payload(servers)
    return {s: sorted(k for k, v in (payload.get(s) or {"missing": {"status": "FAILED"}}).items()
                      if v.get("status") != "OK") for s in servers
            if not payload.get(s) or any(v.get("status") != "OK" for v in payload[s].values())}


def wait_healthy(servers: list[str], timeout: float, what: str, ignore: frozenset[str] = frozenset()) -> None:
    deadline = time.monotonic() + timeout
    while True:
        barman("cron", check=False)
        bad = {s: [c for c in cs if c not in ignore] for s, cs in failing(servers).items()}
        bad = {s: cs for s, cs in bad.items() if cs}
        if not bad:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: still failing after {timeout:.0f} s: {dict(list(bad.items())[:5])}")
        log(f"[fleet] {what}: {len(bad)} servers not ready yet, e.g. {next(iter(bad.items()))}")
        time.sleep(3)


def wait_backups_done(servers: list[str], clusters: int, timeout: float) -> None:
    """Until every server's newest backup is DONE: its end WAL streamed whole (a WAL switch) and archived (cron).

    `barman backup` without `--wait` leaves a backup WAITING_FOR_WALS; `barman cron`'s archive-wal marks
    it DONE once the segment it ended in is archived, which needs a switch after the backup.
    """
    deadline = time.monotonic() + timeout
    while True:
        switch_wal(clusters)
        time.sleep(1)
        barman("cron", check=False)
        time.sleep(1)
        listed = json.loads(barman("-f", "json", "list-backups", *servers))
        waiting = [s for s in servers if not any(b["status"] == "DONE" for b in listed.get(s) or [])]
        if not waiting:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"backups not DONE after {timeout:.0f} s: {waiting[:10]}")
        log(f"[fleet] {len(waiting)} backups not DONE yet (WAITING_FOR_WALS), e.g. {waiting[0]}")
        time.sleep(2)


def setup_fleet(n: int, clusters: int) -> list[str]:
    """The healthy fleet, idempotent: clusters up, slots, receive-wal, a WAL archived and a backup each."""
    per = math.ceil(n / clusters)
    clusters = math.ceil(n / per)
    servers = [name(i) for i in range(1, n + 1)]
    t0 = time.monotonic()
    start_clusters(clusters)
    write_barman_config(n, per)
    barman("cron")  # creates the slots and starts one receive-wal per server
    time.sleep(2)
    switch_wal(clusters)
    wait_healthy(servers, 300, "first WAL archived", ignore=frozenset({"minimum_redundancy_requirements"}))
    listed = json.loads(barman("-f", "json", "list-backups", *servers))
    todo = [s for s in servers if not any(b["status"] == "DONE" for b in listed.get(s) or [])]
    if todo:
        log(f"[fleet] base backups of {len(todo)} servers (backup_method = postgres), 2 at a time")
        by_cluster: dict[int, list[str]] = {}
        for s in todo:
            by_cluster.setdefault(cluster_of(int(s.split("-")[1]), per), []).append(s)
        with ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(lambda ss: barman("backup", *ss, timeout=3600), by_cluster.values()))
    wait_backups_done(servers, clusters, 300)
    wait_healthy(servers, 300, "fleet healthy")
    log(f"[fleet] {n} healthy servers on {clusters} clusters ready in {time.monotonic() - t0:.0f} s")
    return servers


def teardown_fleet(servers: list[str], clusters: int) -> None:
    """Stop everything this script started: each receive-wal, then the clusters (data and backups stay)."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda s: barman("receive-wal", "--stop", s, check=False, timeout=120), servers))
    stop_clusters(clusters)
    left = sh(["pgrep", "-f", str(F / "barman.conf")], check=False).split()
    if left:
        log(f"[fleet] WARNING: Barman processes of the fleet still running: {left}")


# ------------------------------------------------------------------------------- measurements


def inventory(n: int, per: int) -> Path:
    import yaml

    lab = yaml.safe_load((REPO / "include" / "inventory" / "lab.yaml").read_text())
    base = lab["servers"]["pg-primary2"]
    queue = lab["barman_hosts"]["barman-lab"].get("queue", "default")
    servers = {}
    for i in range(1, n + 1):
        c = cluster_of(i, per)
        servers[name(i)] = {
            **base, "description": f"fleet benchmark server {i} (cluster fleet-c{c})", "barman_host": BARMAN_HOST,
            "database": "postgres", "standbys": [],
            "primary": {"name": f"fleet-c{c}", "host": DB_HOST, "data_directory": str(P / f"c{c}" / "data"),
                        "port": PORT0 + c, "socket_directory": str(P / f"c{c}" / "run"),
                        "log_file": str(P / f"c{c}" / "log"), "postgres_conn_id": "pg_primary2"}}
    inv = {"version": 1, "barman_hosts": {BARMAN_HOST: {
        "address": "${LAB_NET}.2", "ssh_conn_id": "barman_host", "barman_command": [str(F / "barman")],
        "job_dir": str(F / "jobs"), "backup_directory": str(F / "home"), "pool_slots": 4, "queue": queue}},
        "workers": lab.get("workers") or {}, "db_hosts": lab["db_hosts"], "servers": servers}
    path = F / f"inventory-{n}.yaml"
    path.write_text(f"# generated by bench/fleet_scale.py: {n} healthy servers on {DB_HOST}\n"
                    + yaml.safe_dump(inv, sort_keys=False))
    return path


def restart_airflow(inv: Path | None, executor: str | None) -> None:
    env = {**os.environ}
    for key, value in (("LAB_INVENTORY", str(inv) if inv else None), ("LAB_EXECUTOR", executor)):
        if value:
            env[key] = value
        else:
            env.pop(key, None)
    sh([str(REPO / ".venv" / "bin" / "python"), str(REPO / "include" / "lab" / "labctl.py"), "restart-airflow"],
       env=env, timeout=900)


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


def raw_commands(servers: list[str], reps: int) -> dict:
    """check + list-backups + show-servers of `servers`, one Barman run each, over SSH like the task: timed."""
    door = ["ssh", "-F", str(LAB / "ssh" / "ssh_config"), "barman-lab", str(F / "barman"), "-f", "json"]
    per: dict[str, list[float]] = {"check": [], "list-backups": [], "show-servers": []}
    totals = []
    for _ in range(reps):
        total = 0.0
        for cmd, times in per.items():
            t0 = time.monotonic()
            r = subprocess.run([*door, cmd, *servers], capture_output=True, text=True, timeout=900, check=False)
            dt = time.monotonic() - t0
            if r.returncode not in (0, 1) or not r.stdout.startswith("{"):
                raise RuntimeError(f"raw {cmd}: exit {r.returncode}: {r.stderr[-500:]}")
            times.append(dt)
            total += dt
        totals.append(total)
    return {"servers": len(servers), "total_s": stats(totals), "per_command_s": {k: stats(v) for k, v in per.items()},
            "argv": shlex.join([*door, "<cmd>", servers[0], "..."])}


def verification_run(api: Any, n: int, executor: str) -> dict:
    want = {f"verify__barman_{BARMAN_HOST.replace('-', '_')}", "summary"}
    deadline = time.monotonic() + 300
    while True:  # the dag processor must have parsed the DAG with this inventory before the trigger
        try:
            tasks = {t["task_id"] for t in api._call("GET", f"/api/v2/dags/{DAG_ID}/tasks")["tasks"]}
        except Exception:
            tasks = set()
        if tasks == want:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"{DAG_ID} still has tasks {sorted(tasks)}, not {sorted(want)}")
        time.sleep(2)
    api.unpause(DAG_ID)
    run_id = f"bench_fleet_{executor}_{n}_{int(time.time())}"
    t0 = time.monotonic()
    api.trigger(DAG_ID, {}, run_id=run_id)
    final = api.wait(DAG_ID, run_id, timeout=3600, poll=0.5)
    wall = time.monotonic() - t0
    api._call("PATCH", f"/api/v2/dags/{DAG_ID}", {"is_paused": True})
    tis = {t["task_id"]: t for t in api.task_instances(DAG_ID, run_id)}
    import psycopg2

    statuses: dict[str, int] = {}
    conn = psycopg2.connect(os.environ["LAB_AUDIT_DSN"])
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT coalesce(details->>'status', outcome) FROM audit.events WHERE run_id = %s AND "
                        "action = 'verify_report'", (run_id,))
            for (st,) in cur.fetchall():
                statuses[st] = statuses.get(st, 0) + 1
            cur.execute("SELECT details FROM audit.events WHERE run_id = %s AND action = 'verify' AND outcome = 'ok'"
                        " ORDER BY event_id DESC LIMIT 1", (run_id,))
            row = cur.fetchone()
            probes = (row[0] if isinstance(row[0], dict) else json.loads(row[0])) if row else {}
    finally:
        conn.close()
    verify = next((t for k, t in tis.items() if k.startswith("verify__")), {})
    return {"executor": executor, "servers": n, "run_id": run_id, "state": final["state"], "wall_s": round(wall, 2),
            "verify_task_s": verify.get("duration"), "verify_queue": verify.get("queue"),
            "verify_hostname": verify.get("hostname"), "probes_s": probes.get("probes_s"),
            "measured_s": probes.get("measured_s"), "statuses": statuses}


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def main() -> int:
    sizes = [int(x) for x in os.environ.get("BENCH_FLEET", "1,10,50").split(",") if x]
    executors = [x for x in os.environ.get("BENCH_EXECUTORS", "local").split(",") if x]
    n_clusters = int(os.environ.get("BENCH_FLEET_CLUSTERS", "5"))
    reps = int(os.environ.get("BENCH_PARSE_REPS", "3"))
    raw_reps = int(os.environ.get("BENCH_RAW_REPS", "3"))
    top = max(sizes)
    per = math.ceil(top / n_clusters)
    clusters = math.ceil(top / per)
    load_before = loadavg()
    servers: list[str] = [name(i) for i in range(1, top + 1)]
    runs: list[dict] = []
    raw: dict[str, dict] = {}
    parse: dict[str, dict] = {}
    errors: list[str] = []
    from barman_dr.surfaces.api_client import from_env

    try:
        servers = setup_fleet(top, n_clusters)
        invs = {n: inventory(n, per) for n in sizes}
        parse["lab_inventory"] = parse_time(None, reps)
        for n in sizes:
            parse[f"{n}_servers"] = parse_time(invs[n], reps)
            raw[str(n)] = raw_commands(servers[:n], raw_reps)
            log(f"[fleet] raw check + list-backups + show-servers of {n}: {raw[str(n)]['total_s']['median']} s")
        for executor in executors:
            for n in sizes:
                try:
                    restart_airflow(invs[n], executor)
                except RuntimeError as exc:
                    errors.append(f"{executor}: restart-airflow failed: {str(exc)[-800:]}")
                    log(f"[fleet] {executor}: restart-airflow failed, executor skipped: {str(exc)[-300:]}")
                    break
                api = from_env()
                time.sleep(3)
                r = verification_run(api, n, executor)
                r["loadavg"] = loadavg()
                runs.append(r)
                log(f"[fleet] {executor} {n} servers: wall {r['wall_s']} s, verify task {r['verify_task_s']} s, "
                    f"statuses {r['statuses']} ({r['state']})")
    finally:
        try:
            restart_airflow(None, os.environ.get("LAB_EXECUTOR"))
        finally:
            teardown_fleet(servers, clusters)
    ratios: dict[str, dict] = {}
    for executor in executors:
        by = {r["servers"]: r for r in runs if r["executor"] == executor}
        if 1 in by and top in by:
            raw_top = raw[str(top)]["total_s"]["median"]
            ratios[executor] = {f"wall_{top}_over_1": round(by[top]["wall_s"] / by[1]["wall_s"], 2),
                                f"wall_{top}_over_raw_{top}": round(by[top]["wall_s"] / raw_top, 2),
                                f"raw_{top}_s": raw_top, f"wall_{top}_s": by[top]["wall_s"], "wall_1_s": by[1]["wall_s"],
                                # the operator's own work (probes + evaluation + audit), without the task start
                                f"step_{top}_over_1": _ratio(by[top].get("measured_s"), by[1].get("measured_s")),
                                f"step_{top}_over_raw_{top}": _ratio(by[top].get("measured_s"), raw_top),
                                "all_ok": all(set(r["statuses"]) == {"OK"} and sum(r["statuses"].values()) ==
                                              r["servers"] for r in by.values())}
    summary = {"parse": parse, "runs": runs, "raw_commands": raw, "ratios": ratios, "errors": errors,
               "fleet": {"servers": top, "clusters": clusters, "per_cluster": per, "backup_method": "postgres",
                         "streaming_archiver": True},
               "goal": f"wall({top}) < 3 x wall(1) and <= 1.5 x the raw commands over the same {top}",
               "loadavg_before": load_before, "loadavg_after": loadavg(),
               "median_wall_s": statistics.median([r["wall_s"] for r in runs]) if runs else None}
    out = save_section("fleet_scale", summary)
    print()
    print(f"{'executor':>9} {'servers':>8} {'wall s':>8} {'verify task s':>14} {'raw cmds s':>11} {'statuses':>20}")
    for r in runs:
        print(f"{r['executor']:>9} {r['servers']:>8} {r['wall_s']:>8} {r['verify_task_s']!s:>14} "
              f"{raw[str(r['servers'])]['total_s']['median']:>11} {json.dumps(r['statuses']):>20}")
    for executor, ra in ratios.items():
        print(f"{executor}: {ra}")
    for k, v in parse.items():
        print(f"DAG parse ({k}): median {v['seconds']['median']} s for {v['dags']} DAGs, {v['import_errors']} errors")
    for e in errors:
        print(f"ERROR: {e}")
    print(f"load average before/after: {load_before} / {summary['loadavg_after']}  -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
