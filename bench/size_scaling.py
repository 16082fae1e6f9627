"""`make bench`, part 2: how restore time, WAL replay and RTO grow with database size and WAL volume.

A separate benchmark cluster (`pg-bench`: PostgreSQL 15 on the pg-primary host, port 5433,
under $LAB_DIR/bench) with its own Barman configuration (`$LAB_DIR/bench/bin/barman`, server
`pg-bench`, no cron loop) and its own pgBackRest repository, so the lab that `make test` uses
stays small and untouched. Per size (pgbench scale factor), one full backup of each tool
(untimed), then WAL generated after it in steps (BENCH_WAL, cumulative), a recovery target
after each step, and, per target, timed:

- barman restore --jobs 1 and --jobs 2 (over SSH, like dr_pitr), then start until promoted
- pgBackRest 2.45 restore, process-max=2, no compression, then start until promoted
- `cp -a` of the Barman backup's data directory (the copy floor on this disk; not started)

"total" = restore + start until promoted. With BENCH_DR_PITR=1 (default), dr_pitr runs too
(staged and unstaged, through the real scheduler; Airflow is restarted with an inventory that
adds pg-bench, and restarted back at the end), after a fresh BENCH_PITR_WAL of WAL each.
Then a least-squares fit total = a + b*size_GB + c*wal_GB per method, extrapolated to 500 GB.

With BENCH_DELAYED=1 (default, needs BENCH_DR_PITR), a third dr_pitr per size recovers from pg-bench's
delayed standby (`source: delayed_standby`, on the pg-standby host, port 5435, delay BENCH_DELAY): dr_pitr's
own rebuild builds it after the Barman runs, the damage (BENCH_PITR_WAL of WAL) is younger than its delay, it
replays forward to the target and is promoted; pg-bench is put back afterwards. Per size and source the
time-to-recovered (trigger -> app serving recovered data) and the downtime, side by side with the raw
runbook and pgBackRest restore + start, fitted against size (issue 17's goal: under pgBackRest at 4 GB,
under 0.5 s per GB).

BENCH_SIZES=100M,1G,4G  BENCH_WAL=0,256M,1G  BENCH_SIZE_REPS=1  BENCH_DR_PITR=1  BENCH_PITR_WAL=256M
BENCH_DELAYED=1  BENCH_DELAY=10min
"""

from __future__ import annotations

import itertools
import json
import os
import shlex
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "plugins"), str(Path(__file__).resolve().parents[1])]

from bench.common import PG_BIN, REPO, drop_section, loadavg, log, save_section, stats  # noqa: E402

LAB = Path(os.environ["LAB_DIR"])
NET = os.environ["LAB_NET"]
B = LAB / "bench"
ADDR = f"{NET}.11"          # the pg-primary host: the bench cluster listens there on its own port
PORT, RPORT = 5433, 5434    # bench cluster, restored copies
DATA = B / "pg-bench" / "data"
SOCK = B / "run"
RESTORE = B / "restore" / "dest"
BARMAN_HOME = B / "barman" / "home"
BARMAN = B / "bin" / "barman"
PGBR_CONF = B / "pgbackrest" / "pgbackrest.conf"
SERVER = "pg-bench"
#: pg-bench's delayed standby (issue 17), on the pg-standby host: built by dr_pitr's rebuild after the first
#: Barman run of each size, then the recovery source of the delayed-standby run
DSTANDBY, DADDR, DPORT = "pg-bench-delayed", f"{NET}.12", 5435
DDATA = B / DSTANDBY / "data"
BENCH_DELAY = os.environ.get("BENCH_DELAY", "10min")
#: pgbench scale factors: ~15 MB per unit with indexes
SCALES = {"100M": 7, "1G": 68, "4G": 270}
MIB = 1024 * 1024


def parse_size(text: str) -> int:
    t = text.strip().upper()
    if t in ("0", ""):
        return 0
    mult = {"M": MIB, "G": 1024 * MIB}[t[-1]]
    return int(float(t[:-1]) * mult)


def sh(argv: list[str], *, user: str | None = None, check: bool = True, env: dict | None = None,
       timeout: float | None = None) -> subprocess.CompletedProcess:
    if user:
        argv = ["runuser", "-u", user, "--", *argv]
    r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    if check and r.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} -> {r.returncode}: {r.stderr[-2000:]}{r.stdout[-500:]}")
    return r


def psql(sql: str, db: str = "postgres", port: int = PORT) -> str:
    return sh([f"{PG_BIN}/psql", "-X", "-At", "-v", "ON_ERROR_STOP=1", "-h", str(SOCK), "-p", str(port), "-d", db,
               "-c", sql], user="postgres").stdout.strip()


def bbarman(*args: str, check: bool = True, timeout: float | None = None) -> subprocess.CompletedProcess:
    return sh([str(BARMAN), *args], user="barman", check=check, timeout=timeout)


def pgbr(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return sh(["pgbackrest", f"--config={PGBR_CONF}", "--stanza=bench", *args], user="postgres", check=check)


def secrets() -> dict[str, str]:
    return json.loads((LAB / "secrets" / "lab.json").read_text())


# ------------------------------------------------------------------ setup


def write_configs() -> None:
    for d, owner in ((B, "root"), (B / "pg-bench", "postgres"), (SOCK, "postgres"), (B / "log", "postgres"),
                     (B / "restore", "postgres"), (B / "barman", "barman"), (B / "jobs", "barman"),
                     (B / "pgbackrest", "postgres"), (B / "secrets", "root"), (B / "bin", "root"),
                     (B / DSTANDBY, "postgres")):
        d.mkdir(parents=True, exist_ok=True)
        sh(["chown", owner, str(d)])
    os.chmod(B / "secrets", 0o711)
    os.chmod(B / "log", 0o1777)
    s = secrets()
    passfile = B / "secrets" / "pgpass-barman"
    # any port: after the delayed-standby run Barman follows pg-bench-delayed (DPORT)
    passfile.write_text(f"*:*:*:barman:{s['barman']}\n*:*:*:streaming_barman:{s['streaming_barman']}\n")
    sh(["chown", "barman", str(passfile)])
    os.chmod(passfile, 0o600)
    (B / "barman" / "barman.conf").write_text("\n".join([
        "; barman-dr benchmarks: a Barman of its own for the pg-bench cluster (bench/size_scaling.py)",
        "[barman]", "barman_user = barman", f"barman_home = {BARMAN_HOME}",
        f"log_file = {B / 'barman' / 'barman.log'}", "log_level = INFO", "",
        f"[{SERVER}]", "description = barman-dr benchmark cluster",
        f"conninfo = host={ADDR} port={PORT} user=barman dbname=postgres passfile={passfile}",
        f"streaming_conninfo = host={ADDR} port={PORT} user=streaming_barman passfile={passfile}",
        "backup_method = postgres", "streaming_archiver = on", "slot_name = barman_bench", "create_slot = auto",
        f"path_prefix = {PG_BIN}", "minimum_redundancy = 0", "parallel_jobs = 1",
        # as the lab's: a spread checkpoint (checkpoint_timeout 15 min here) would hold every backup ~13 min
        "immediate_checkpoint = true", "",
    ]))
    sh(["chown", "-R", "barman", str(B / "barman")])
    BARMAN.write_text(f"#!/bin/sh\nexec /opt/barman-dr/barman-3.19.1/bin/barman -c {B / 'barman' / 'barman.conf'} \"$@\"\n")
    os.chmod(BARMAN, 0o755)
    PGBR_CONF.write_text("\n".join([
        "[global]", f"repo1-path={B / 'pgbackrest' / 'repo'}", "repo1-retention-full=1", "compress-type=none",
        "process-max=2", f"log-path={B / 'pgbackrest' / 'log'}", f"lock-path={B / 'pgbackrest' / 'lock'}",
        "log-level-console=warn", "start-fast=y", "archive-async=n", "",
        "[bench]", f"pg1-path={DATA}", f"pg1-port={PORT}", f"pg1-socket-path={SOCK}", "",
    ]))
    sh(["chown", "postgres", str(PGBR_CONF)])


def pg_ctl(*args: str, data: Path = DATA, check: bool = True) -> subprocess.CompletedProcess:
    return sh([f"{PG_BIN}/pg_ctl", "-D", str(data), *args], user="postgres", check=check, timeout=3600)


def start_bench() -> None:
    if pg_ctl("status", check=False).returncode == 0:
        return
    opts = shlex.join(["-c", f"listen_addresses={ADDR}", "-c", f"port={PORT}", "-c", f"unix_socket_directories={SOCK}",
                       "-c", "cluster_name=pg-bench"])
    pg_ctl("start", "-w", "-t", "300", "-l", str(B / "log" / "pg-bench.log"), "-o", opts)


def current_scale() -> int | None:
    """The scale of the existing bench cluster, or None when it must be rebuilt (absent, or grown by the
    previous runs' updates by more than 25%: sizes must stay comparable)."""
    if not (DATA / "PG_VERSION").exists():
        return None
    start_bench()
    try:
        scale, built = psql("SELECT scale || ' ' || built_bytes FROM bench_meta", db="bench").split()
        if int(psql("SELECT pg_database_size('bench')")) > 1.25 * int(built):
            return None
        return int(scale)
    except (RuntimeError, ValueError):
        return None


def build(scale: int) -> float:
    """A fresh cluster with `pgbench -i -s scale` (and fresh Barman/pgBackRest state for it)."""
    t0 = time.monotonic()
    bbarman("receive-wal", "--stop", SERVER, check=False)
    if (DATA / "PG_VERSION").exists():
        pg_ctl("stop", "-m", "fast", "-w", check=False)
    for path in (DATA, BARMAN_HOME, B / "pgbackrest" / "repo", B / "pgbackrest" / "lock"):
        sh(["rm", "-rf", "--", str(path)])
    sh([f"{PG_BIN}/initdb", "-D", str(DATA), "-U", "postgres", "--auth-local=peer", "--auth-host=scram-sha-256",
        "-E", "UTF8", "--locale=C.UTF-8"], user="postgres")
    archive = f"pgbackrest --config={PGBR_CONF} --stanza=bench archive-push %p"
    with open(DATA / "postgresql.conf", "a") as fh:
        fh.write("\n".join(["", "# barman-dr benchmark cluster", "wal_level = replica", "max_wal_senders = 6",
                            "max_replication_slots = 6", "shared_buffers = 128MB", "max_wal_size = 2GB",
                            "checkpoint_timeout = 15min", "archive_mode = on", f"archive_command = '{archive}'",
                            "log_checkpoints = on", ""]))
    (DATA / "pg_hba.conf").write_text("local all all peer\nhost all all 127.0.0.0/8 scram-sha-256\n"
                                      "host replication all 127.0.0.0/8 scram-sha-256\n")
    sh(["chown", "-R", "postgres", str(DATA)])
    start_bench()
    s = secrets()
    sh([f"{PG_BIN}/psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", str(SOCK), "-p", str(PORT), "-d", "postgres",
        "-f", str(REPO / "include" / "sql" / "lab_primary_roles.sql"), "-v", f"dr_admin_pw={s['dr_admin']}",
        "-v", f"barman_pw={s['barman']}", "-v", f"streaming_barman_pw={s['streaming_barman']}",
        "-v", f"replicator_pw={s['replicator']}", "-v", f"app_pw={s['app']}"], user="postgres")
    psql("CREATE DATABASE bench")
    log(f"[size] pgbench -i -s {scale} (about {scale * 15} MB)")
    sh(["pgbench", "-i", "-q", "-s", str(scale), "-h", str(SOCK), "-p", str(PORT), "bench"], user="postgres",
       timeout=7200)
    psql(f"CREATE TABLE bench_meta AS SELECT {scale}::int AS scale, pg_database_size('bench') AS built_bytes",
         db="bench")
    psql("CHECKPOINT")
    BARMAN_HOME.mkdir(parents=True, exist_ok=True)
    sh(["chown", "-R", "barman", str(B / "barman")])
    bbarman("receive-wal", "--create-slot", SERVER, check=False)
    bbarman("cron")
    pgbr("stanza-create")
    return round(time.monotonic() - t0, 1)


def wait_streaming(timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        bbarman("cron")
        if "receive-wal" in bbarman("-f", "json", "list-processes", SERVER).stdout:
            return
        time.sleep(1)
    raise RuntimeError("receive-wal of pg-bench did not start")


def switch_and_archive() -> None:
    """Close the current WAL and wait until both Barman and pgBackRest hold it."""
    switch_and_archive_barman()
    pgbr("check")


def backups(pgbackrest: bool = True) -> tuple[str, float, float | None]:
    """A fresh full Barman backup and a fresh full pgBackRest backup of the bench cluster (untimed for RTO)."""
    wait_streaming()
    t0 = time.monotonic()
    bbarman("backup", "--wait", "--wait-timeout", "600", SERVER, timeout=7200)
    barman_s = time.monotonic() - t0
    pgbr_s = None
    if pgbackrest:
        t0 = time.monotonic()
        pgbr("backup", "--type=full")
        pgbr_s = round(time.monotonic() - t0, 1)
    out = json.loads(bbarman("-f", "json", "list-backups", SERVER).stdout)[SERVER]
    backup_id = max(b["backup_id"] for b in out if b["status"] == "DONE")
    return backup_id, round(barman_s, 1), pgbr_s


def make_wal(nbytes: int) -> float:
    """Generate about `nbytes` of WAL with updates (full-page writes included); returns the bytes made."""
    if nbytes <= 0:
        return 0.0
    start = psql("SELECT pg_current_wal_lsn()")
    made = 0.0
    step = 0
    while made < nbytes:
        # one UPDATE of a slice of pgbench_accounts: ~10k-row batches keep each transaction short
        lo = (step * 20000) % max(int(psql("SELECT max(aid) FROM pgbench_accounts", db="bench") or 1), 1)
        psql(f"UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid > {lo} AND aid <= {lo + 20000}", db="bench")
        made = float(psql(f"SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '{start}')"))
        step += 1
    return made


def target_now() -> str:
    """A recovery target: the database's clock now, then a commit after it (recovery stops at a later commit).

    At least 1.5 s after the last backup: pgBackRest compares the target with backup stop times in whole
    seconds, and refuses a target in the second its backup stopped.
    """
    time.sleep(1.5)
    t = psql("SELECT to_json(clock_timestamp())").strip('"')  # ISO 8601 with its offset: Barman, pgBackRest, the form
    time.sleep(0.05)
    psql("SELECT pg_current_xact_id()", db="bench")
    return t


# ------------------------------------------------------------------ timed restores


def clean_dest() -> None:
    pg_ctl("stop", "-m", "immediate", "-w", data=RESTORE, check=False)
    sh(["rm", "-rf", "--", str(RESTORE), f"{RESTORE}-wal"])


def start_until_promoted() -> float:
    t0 = time.monotonic()
    opts = shlex.join(["-c", f"listen_addresses={ADDR}", "-c", f"port={RPORT}", "-c", f"unix_socket_directories={SOCK}",
                       "-c", "cluster_name=pg-bench-restored", "-c", "archive_mode=off"])
    pg_ctl("start", "-W", "-l", str(B / "log" / "restored.log"), "-o", opts, data=RESTORE)
    while True:
        r = sh([f"{PG_BIN}/psql", "-X", "-At", "-h", str(SOCK), "-p", str(RPORT), "-d", "postgres", "-c",
                "SELECT pg_is_in_recovery()"], user="postgres", check=False)
        if r.stdout.strip() == "f":
            return round(time.monotonic() - t0, 3)
        if pg_ctl("status", data=RESTORE, check=False).returncode != 0 and time.monotonic() - t0 > 5:
            tail = sh(["tail", "-n", "20", str(B / "log" / "restored.log")]).stdout
            raise RuntimeError(f"restored cluster exited during recovery:\n{tail}")
        time.sleep(0.1)


def timed_barman(backup_id: str, target: str, jobs: int) -> dict:
    clean_dest()
    remote = shlex.join(["ssh", "-F", str(LAB / "ssh" / "barman_ssh_config"), "postgres@pg-primary"])
    argv = ["restore", "--remote-ssh-command", remote, "--target-time", target, "--target-action", "promote",
            "--staging-wal-directory", f"{RESTORE}-wal", *(["--jobs", str(jobs)] if jobs > 1 else []),
            SERVER, backup_id, str(RESTORE)]
    t0 = time.monotonic()
    bbarman(*argv, timeout=7200)
    restore_s = round(time.monotonic() - t0, 3)
    replay_s = start_until_promoted()
    clean_dest()
    return {"restore_s": restore_s, "start_to_promoted_s": replay_s, "total_s": round(restore_s + replay_s, 3)}


def timed_pgbackrest(target: str) -> dict:
    clean_dest()
    t0 = time.monotonic()
    # pgBackRest wants "YYYY-MM-DD HH:MM:SS.ffffff+00:00" (a space, not the ISO "T")
    pgbr(f"--pg1-path={RESTORE}", "--type=time", f"--target={target.replace('T', ' ')}", "--target-action=promote",
         "--process-max=2", "restore")
    restore_s = round(time.monotonic() - t0, 3)
    replay_s = start_until_promoted()
    clean_dest()
    return {"restore_s": restore_s, "start_to_promoted_s": replay_s, "total_s": round(restore_s + replay_s, 3)}


def timed_cp(backup_id: str) -> dict:
    clean_dest()
    src = BARMAN_HOME / SERVER / "base" / backup_id / "data"
    t0 = time.monotonic()
    sh(["cp", "-a", str(src), str(RESTORE)])
    s = round(time.monotonic() - t0, 3)
    clean_dest()
    return {"copy_s": s}


def raw_runbook(target: str, jobs: int = 2) -> dict:
    """The seed's runbook by hand on pg-bench itself, as bench/raw_pitr.sh does it on the lab primary.

    Downtime = stop -> move aside -> `barman restore --target-time` (over SSH, --jobs as dr_pitr) ->
    start until promoted -> count. pg-bench has no PgBouncer (dr_pitr runs it with app_freeze none),
    so there is no pause/resume here either: the two downtimes hold the same work.
    """
    switch_and_archive_barman()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    aside = Path(f"{DATA}.raw-{stamp}")
    remote = shlex.join(["ssh", "-F", str(LAB / "ssh" / "barman_ssh_config"), "postgres@pg-primary"])
    t = {"stop": time.monotonic()}
    pg_ctl("stop", "-m", "fast", "-w", "-t", "300")
    t["move"] = time.monotonic()
    sh(["mv", str(DATA), str(aside)])
    t["restore"] = time.monotonic()
    bbarman("restore", "--remote-ssh-command", remote, "--target-time", target, "--target-action", "promote",
            *(["--jobs", str(jobs)] if jobs > 1 else []), SERVER, "latest", str(DATA), timeout=7200)
    t["start"] = time.monotonic()
    start_bench()
    while psql("SELECT pg_is_in_recovery()") != "f":
        time.sleep(0.2)
    t["count"] = time.monotonic()
    accounts = int(psql("SELECT count(*) FROM pgbench_accounts", db="bench"))
    t["end"] = time.monotonic()
    names = list(t)
    phases = {a: round(t[b] - t[a], 3) for a, b in itertools.pairwise(names)}
    sh(["rm", "-rf", "--", str(aside)])  # the bench's own cluster: no need to keep it
    # what dr_pitr does after a PITR (untimed): recovery settings reset, Barman streaming on the new timeline
    from barman_dr.operators.pitr import RECOVERY_SETTINGS

    for name in RECOVERY_SETTINGS:
        psql(f"ALTER SYSTEM RESET {name}")
    psql("SELECT pg_reload_conf()")
    bbarman("receive-wal", "--stop", SERVER, check=False)
    bbarman("receive-wal", "--reset", SERVER, check=False)
    wait_streaming()
    return {"downtime_s": round(t["end"] - t["stop"], 3), "phases_s": phases, "accounts": accounts}


def switch_and_archive_barman() -> None:
    """The seed's lesson, before anything stops (dr_pitr does it in wal_coverage): the WAL to the target archived."""
    psql("SELECT pg_current_xact_id()", db="bench")
    bbarman("switch-wal", "--force", "--archive", "--archive-timeout", "120", SERVER, timeout=300)


# ------------------------------------------------------------------ dr_pitr


def bench_inventory() -> Path:
    """The lab's inventory plus pg-bench (its own barman host entry: the bench Barman configuration)."""
    import yaml

    inv = yaml.safe_load((REPO / "include" / "inventory" / "lab.yaml").read_text())
    inv["barman_hosts"]["barman-bench"] = {
        "address": "${LAB_NET}.2", "ssh_conn_id": "barman_host", "barman_command": [str(BARMAN)],
        "job_dir": str(B / "jobs"), "backup_directory": str(BARMAN_HOME), "pool_slots": 2}
    inv["servers"][SERVER] = {
        "description": "benchmark cluster (bench/size_scaling.py)", "barman_host": "barman-bench", "database": "bench",
        "primary": {"name": SERVER, "host": "pg-primary", "data_directory": str(DATA), "port": PORT,
                    "socket_directory": str(SOCK), "log_file": str(B / "log" / "pg-bench.log"),
                    "postgres_conn_id": "pg_primary"},
        # its delayed standby: dr_pitr's rebuild builds it (and writes its delay), the delayed-standby run promotes it
        "standbys": [{"name": DSTANDBY, "host": "pg-standby", "data_directory": str(DDATA), "port": DPORT,
                      "socket_directory": str(SOCK), "log_file": str(B / "log" / f"{DSTANDBY}.log"),
                      "postgres_conn_id": "pg_standby", "replication_slot": "pg_bench_delayed",
                      "delayed": BENCH_DELAY,
                      # Barman's archive through the bench's own Barman (the lab's get-wal-only key allows pg-bench)
                      "restore_command": f"{LAB / 'bin' / 'barman-wal-restore'} -U barman barman-lab {SERVER} %f %p"}],
        "replication": {"user": "replicator", "passfile": str(LAB / "secrets" / "pgpass-postgres")},
        "app_freeze": {"method": "none"},
        "recovery_window_days": 7, "minimum_redundancy": 0, "rto_objective_seconds": 3600,
        "validation_queries": {"accounts": "SELECT count(*) FROM pgbench_accounts"},
    }
    path = B / "inventory.yaml"
    path.write_text("# generated by bench/size_scaling.py: the lab's inventory plus pg-bench\n"
                    + yaml.safe_dump(inv, sort_keys=False))
    return path


def restart_airflow(inventory: Path | None) -> None:
    env = {**os.environ}
    if inventory:
        env["LAB_INVENTORY"] = str(inventory)
    else:
        env.pop("LAB_INVENTORY", None)
    sh([str(REPO / ".venv" / "bin" / "python"), str(REPO / "include" / "lab" / "labctl.py"), "restart-airflow"],
       env=env, timeout=600)


def app_writer() -> subprocess.Popen:
    """The benchmark's "application": one tiny commit per second (errors ignored while the server is down).

    rebase_barman's `switch-wal --archive` returns only once a WAL record follows the switch;
    on an idle cluster it waits for one that never comes (the lab's seed scenario has its app).
    """
    # to whichever serves: pg-bench, or its delayed standby once promoted (read-only before: the write fails)
    write = "-X -q -h {} -p {} -d bench -c 'select pg_current_xact_id()' >/dev/null 2>&1"
    loop = (f"while :; do {PG_BIN}/psql {write.format(SOCK, PORT)} || {PG_BIN}/psql {write.format(SOCK, DPORT)}; "
            "sleep 1; done")
    return subprocess.Popen(["runuser", "-u", "postgres", "--", "sh", "-c", loop], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def release_stale_lock() -> None:
    """A benchmark run interrupted earlier may still hold pg-bench's server lock: release it (bench runs only)."""
    from barman_dr.safety.locks import ServerLock

    holder = ServerLock().holder(SERVER)
    if holder and holder.run_id.startswith("dr_pitr__incident__BENCH-SIZE-"):
        ServerLock().release(SERVER, dag_id=holder.dag_id, run_id=holder.run_id)
        log(f"[size] released the stale lock of {holder.run_id}")


def dr_pitr(api: object, target: str, staged: bool, tag: str, source: str = "barman") -> dict:
    from barman_dr.surfaces.api_client import incident_run_id

    kind = "d" if source == "delayed_standby" else "s" if staged else "u"
    incident = f"BENCH-SIZE-{tag}-{kind}-{int(time.time())}"
    run_id = incident_run_id("dr_pitr", incident)
    accounts = int(psql("SELECT count(*) FROM pgbench_accounts", db="bench"))
    api.trigger("dr_pitr", {"server": SERVER, "target_time": target, "incident_id": incident, "jobs": 2,
                            "expected": {"accounts": accounts}, "staged_restore": staged, "source": source,
                            "confirm": f"PITR {SERVER}"}, run_id=run_id)
    final = api.wait("dr_pitr", run_id, timeout=7200, poll=2)
    if final["state"] != "success":
        raise RuntimeError(f"dr_pitr {run_id}: {final['state']}")
    rep = api.xcom("dr_pitr", run_id, "report")
    moved = rep.get("moved_aside")
    if moved and moved.startswith(str(DATA) + ".pre-"):  # the bench's own cluster: no need to keep it
        sh(["rm", "-rf", "--", moved])
    return {"run_id": run_id, "downtime_s": rep["rto_s"], "phases_s": rep["phases_s"],
            "time_to_recovered_s": rep.get("time_to_recovered_s"), "source": rep.get("source"),
            "staging_s": (rep.get("outside_downtime_s") or {}).get("stage_restore")}


def delayed_ready(timeout: float = 300) -> None:
    """pg-bench-delayed streams from pg-bench with its delay (the staged run's rebuild wrote it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = sh([f"{PG_BIN}/psql", "-X", "-At", "-h", str(SOCK), "-p", str(DPORT), "-d", "postgres", "-c",
                "SELECT pg_is_in_recovery()::text || current_setting('recovery_min_apply_delay')"], user="postgres",
               check=False)
        state = psql(f"SELECT state FROM pg_stat_replication WHERE application_name = '{DSTANDBY}'")
        if r.stdout.strip().startswith("true") and not r.stdout.strip().endswith("0") and state == "streaming":
            return
        time.sleep(1)
    raise RuntimeError(f"{DSTANDBY} is not streaming with its delay: {r.stdout.strip()!r}, {state!r}")


def restore_topology() -> None:
    """After the delayed-standby run: pg-bench serves again (its Barman config rewritten), the promoted copy gone."""
    pg_ctl("stop", "-m", "fast", "-w", "-t", "300", data=DDATA, check=False)
    # its data directory and the copies dr_pitr's rebuilds moved aside next to it (data.pre-*): GBs per size
    sh(["sh", "-c", 'rm -rf -- "$1"/data "$1"/data.*', "sh", str(DDATA.parent)])
    bbarman("receive-wal", "--stop", SERVER, check=False)
    write_configs()  # Barman's conninfo back to pg-bench (config-update pointed it at the promoted standby)
    start_bench()
    psql("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = 'pg_bench_delayed'")
    bbarman("receive-wal", "--reset", SERVER, check=False)
    wait_streaming()


def ttr_table(results: list[dict], pitr: list[dict], pitr_wal: int) -> dict:
    """Per size, each source's time-to-recovered (trigger -> app serving recovered data) and downtime, side by side.

    dr_pitr runs: from the report. The raw runbook: everything is inside its downtime. pgBackRest (the
    reference): restore + start until promoted at the same WAL volume, all of it inside the downtime too.
    """
    out: dict[str, dict] = {}
    for size in dict.fromkeys(p["size"] for p in pitr):
        row: dict[str, dict] = {}
        for p in pitr:
            if p["size"] != size:
                continue
            ttr = p["downtime_s"] if p["kind"] == "raw_runbook" else p.get("time_to_recovered_s")
            row[p["kind"]] = {"time_to_recovered_s": ttr, "downtime_s": p["downtime_s"],
                              "backup_bytes": p.get("backup_bytes")}
        ref = next((r for r in results if r["size"] == size and parse_size(r["wal_after_backup"]) == pitr_wal), None)
        if ref:
            total = ref["pgbackrest_p2"]["total_s"]["median"]
            row["pgbackrest_restore_start"] = {"time_to_recovered_s": total, "downtime_s": total,
                                               "backup_bytes": ref["backup_bytes"]}
        out[size] = row
    return out


def ttr_fits(table: dict, sizes_bytes: dict[str, int]) -> dict:
    """time-to-recovered = a + b * size_GB per source (least squares over the sizes measured)."""
    gb = 1024 * MIB
    fits: dict[str, dict | None] = {}
    kinds = dict.fromkeys(k for row in table.values() for k in row)
    for kind in kinds:
        pts = [(sizes_bytes[size] / gb, row[kind]["time_to_recovered_s"]) for size, row in table.items()
               if kind in row and row[kind]["time_to_recovered_s"] is not None and size in sizes_bytes]
        if len(pts) < 2:
            fits[kind] = None
            continue
        n = len(pts)
        mx, my = sum(x for x, _ in pts) / n, sum(y for _, y in pts) / n
        sxx = sum((x - mx) ** 2 for x, _ in pts)
        b = sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx else 0.0
        fits[kind] = {"a_s": round(my - b * mx, 2), "s_per_GB": round(b, 3), "points": n}
    return fits


# ------------------------------------------------------------------ fit


def fit(points: list[tuple[float, float, float]]) -> dict | None:
    """Least squares total = a + b*size_GB + c*wal_GB (numpy-free normal equations)."""
    if len(points) < 3 or len({p[0] for p in points}) < 2:
        return None
    rows = [(1.0, s, w) for s, w, _ in points]
    ys = [y for _, _, y in points]
    cols = 3 if len({p[1] for p in points}) > 1 else 2
    ata = [[sum(r[i] * r[j] for r in rows) for j in range(cols)] for i in range(cols)]
    aty = [sum(r[i] * y for r, y in zip(rows, ys, strict=True)) for i in range(cols)]
    m = [[*row, v] for row, v in zip(ata, aty, strict=True)]  # Gauss-Jordan on the normal equations
    for i in range(cols):
        piv = max(range(i, cols), key=lambda r: abs(m[r][i]))
        m[i], m[piv] = m[piv], m[i]
        if abs(m[i][i]) < 1e-12:
            return None
        m[i] = [v / m[i][i] for v in m[i]]
        for r in range(cols):
            if r != i:
                m[r] = [a - m[r][i] * b for a, b in zip(m[r], m[i], strict=True)]
    coef = [m[i][-1] for i in range(cols)] + ([0.0] if cols == 2 else [])
    a, b, c = coef
    return {"a_s": round(a, 3), "s_per_GB": round(b, 3), "s_per_GB_wal": round(c, 3), "points": len(points),
            "predict_500GB_0wal_s": round(a + 500 * b, 1), "predict_500GB_50GBwal_s": round(a + 500 * b + 50 * c, 1)}


def ratios(results: list[dict], pitr: list[dict], pitr_wal: int) -> dict:
    """Per size, dr_pitr's downtime against the raw runbook and the raw tools' restore + start (same WAL volume)."""
    out: dict[str, dict] = {}
    for size in dict.fromkeys(p["size"] for p in pitr):
        by = {p["kind"]: p["downtime_s"] for p in pitr if p["size"] == size}
        row = next((r for r in results if r["size"] == size and parse_size(r["wal_after_backup"]) == pitr_wal), None)
        refs = {"raw_runbook": by.get("raw_runbook")}
        if row:
            refs |= {"pgbackrest_p2": row["pgbackrest_p2"]["total_s"]["median"],
                     "barman_j2": row["barman_j2"]["total_s"]["median"]}
        r: dict[str, float] = {}
        for kind in ("dr_pitr_staged", "dr_pitr_unstaged"):
            for ref, v in refs.items():
                if by.get(kind) and v:
                    r[f"{kind}/{ref}"] = round(by[kind] / v, 2)
        out[size] = r
    return out


def save_partial(results: list[dict], pitr: list[dict]) -> None:
    """Keep what was measured so far (an interrupted run loses nothing); main() writes the final section."""
    save_section("size_scaling_partial", {"results": results, "dr_pitr": pitr})


def main() -> int:
    sizes = [s for s in os.environ.get("BENCH_SIZES", "100M,1G,4G").split(",") if s]
    wal_steps = [w for w in os.environ.get("BENCH_WAL", "0,256M,1G").split(",") if w]
    reps = int(os.environ.get("BENCH_SIZE_REPS", "1"))
    do_pitr = os.environ.get("BENCH_DR_PITR", "1") == "1"
    pitr_wal = parse_size(os.environ.get("BENCH_PITR_WAL", "256M"))
    do_delayed = os.environ.get("BENCH_DELAYED", "1") == "1"
    for s in sizes:
        if s not in SCALES:
            raise SystemExit(f"BENCH_SIZES: {s!r} is not one of {', '.join(SCALES)}")
    write_configs()
    load_before = loadavg()
    results: list[dict] = []
    pitr: list[dict] = []
    writer: subprocess.Popen | None = None
    try:
        for size in sizes:
            scale = SCALES[size]
            build_s = None
            if current_scale() != scale:
                build_s = build(scale)
            start_bench()
            # Barman's `backup --wait` and `switch-wal --archive` return only once a WAL record follows the
            # switch: the bench's tiny "application" commits once a second for the whole size run
            writer = app_writer()
            backup_id, backup_s, pgbr_backup_s = backups()
            db_bytes = int(psql("SELECT pg_database_size('bench')"))
            info = json.loads(bbarman("-f", "json", "show-backup", SERVER, backup_id).stdout)[SERVER]
            backup_bytes = int(info["base_backup_information"]["backup_size_bytes"])
            log(f"[size] {size}: scale {scale}, database {db_bytes / MIB:.0f} MiB, backup {backup_bytes / MIB:.0f} MiB")
            floor = [timed_cp(backup_id) for _ in range(reps)]
            made = 0.0
            for step in wal_steps:
                made += make_wal(parse_size(step) - made) if parse_size(step) > made else 0.0
                target = target_now()
                switch_and_archive()
                row = {"size": size, "scale": scale, "db_bytes": db_bytes, "backup_bytes": backup_bytes,
                       "wal_after_backup": step, "wal_bytes": int(made), "target": target,
                       "build_s": build_s, "barman_backup_s": backup_s, "pgbackrest_backup_s": pgbr_backup_s,
                       "loadavg_at_start": loadavg()}
                for name, fn in (("barman_j1", lambda t=target, b=backup_id: timed_barman(b, t, 1)),
                                 ("barman_j2", lambda t=target, b=backup_id: timed_barman(b, t, 2)),
                                 ("pgbackrest_p2", lambda t=target: timed_pgbackrest(t))):
                    runs = [fn() for _ in range(reps)]
                    row[name] = {k: stats([r[k] for r in runs]) for k in runs[0]}
                row["cp_a_floor"] = {"copy_s": stats([f["copy_s"] for f in floor])}
                results.append(row)
                save_partial(results, pitr)
                log(f"[size] {size} wal {step}: barman j1 {row['barman_j1']['total_s']['median']} s, j2 "
                    f"{row['barman_j2']['total_s']['median']} s, pgbackrest {row['pgbackrest_p2']['total_s']['median']}"
                    f" s, cp -a {row['cp_a_floor']['copy_s']['median']} s (load {loadavg()[0]})")
            if do_pitr:
                from barman_dr.surfaces.api_client import from_env

                # Barman's restore sets archive_command = false in the restored config: with archive_mode on
                # (pgBackRest's archiving above), rebase_barman's backup would wait for archiving forever.
                # pgBackRest is done for this size: archiving off, and a fresh Barman backup without it
                psql("ALTER SYSTEM SET archive_mode = off")
                # -l: a postmaster started without a log file keeps our stdout pipe open (run() never returns)
                pg_ctl("restart", "-m", "fast", "-w", "-t", "300", "-l", str(B / "log" / "pg-bench.log"))
                backups(pgbackrest=False)
                restart_airflow(bench_inventory())
                api = from_env()
                deadline = time.monotonic() + 180
                while not api.dag_exists("dr_pitr") and time.monotonic() < deadline:
                    time.sleep(2)
                api.unpause("dr_pitr")
                release_stale_lock()
                try:
                    # the raw runbook on the same cluster, same WAL volume, same jobs (from the fresh backup above)
                    make_wal(pitr_wal)
                    target = target_now()
                    raw = raw_runbook(target)
                    raw.update({"size": size, "kind": "raw_runbook", "wal_bytes": pitr_wal})
                    pitr.append(raw)
                    log(f"[size] {size} raw runbook: downtime {raw['downtime_s']} s {raw['phases_s']}")
                    save_partial(results, pitr)
                    backups(pgbackrest=False)  # dr_pitr starts from a backup on the current timeline, as raw did
                    for staged in (False, True):
                        make_wal(pitr_wal)
                        target = target_now()
                        r = dr_pitr(api, target, staged, size)
                        r.update({"size": size, "staged": staged, "kind": "dr_pitr_staged" if staged else
                                  "dr_pitr_unstaged", "wal_bytes": pitr_wal})
                        pitr.append(r)
                        log(f"[size] {size} dr_pitr {'staged' if staged else 'unstaged'}: downtime {r['downtime_s']} s"
                            + (f" (+ staging {r['staging_s']} s before the freeze)" if staged else ""))
                        save_partial(results, pitr)
                    if do_delayed:
                        # the delayed-standby source: the damage (this WAL) is younger than its delay
                        delayed_ready()
                        make_wal(pitr_wal)
                        target = target_now()
                        try:
                            r = dr_pitr(api, target, True, size, source="delayed_standby")
                        finally:
                            restore_topology()
                        r.update({"size": size, "staged": False, "kind": "dr_pitr_delayed_standby",
                                  "wal_bytes": pitr_wal})
                        pitr.append(r)
                        log(f"[size] {size} dr_pitr delayed standby: downtime {r['downtime_s']} s, time-to-recovered "
                            f"{r['time_to_recovered_s']} s (promoted before the freeze: {r['staging_s']} s)")
                        save_partial(results, pitr)
                finally:
                    api._call("PATCH", "/api/v2/dags/dr_pitr", {"is_paused": True})
                    # recovered twice, archiving off: the next run rebuilds it
                    psql("DROP TABLE IF EXISTS bench_meta", db="bench")
            os.killpg(writer.pid, 15)
            writer = None
    finally:
        if writer is not None:
            os.killpg(writer.pid, 15)
        bbarman("receive-wal", "--stop", SERVER, check=False)
        clean_dest()
        pg_ctl("stop", "-m", "fast", "-w", check=False)
        if do_pitr:
            restart_airflow(None)

    gb = 1024 * MIB
    fits = {}
    for method in ("barman_j1", "barman_j2", "pgbackrest_p2"):
        pts = [(r["backup_bytes"] / gb, r["wal_bytes"] / gb, r[method]["total_s"]["median"]) for r in results]
        fits[method] = fit(pts)
    fits["cp_a_floor"] = fit([(r["backup_bytes"] / gb, 0.0, r["cp_a_floor"]["copy_s"]["median"]) for r in results])
    ttr = ttr_table(results, pitr, pitr_wal)
    sizes_bytes = {r["size"]: r["backup_bytes"] for r in results}
    ttr_fit = ttr_fits(ttr, sizes_bytes)
    top = sizes[-1] if sizes else None
    d_top = ((ttr.get(top) or {}).get("dr_pitr_delayed_standby") or {}).get("time_to_recovered_s")
    ref_top = ((ttr.get(top) or {}).get("pgbackrest_restore_start") or {}).get("time_to_recovered_s")
    slope = (ttr_fit.get("dr_pitr_delayed_standby") or {}).get("s_per_GB")
    goal = {"size": top, "delayed_time_to_recovered_s": d_top, "pgbackrest_restore_start_s": ref_top,
            "below_pgbackrest": d_top is not None and ref_top is not None and d_top < ref_top,
            "delayed_s_per_GB": slope, "slope_under_0_5": slope is not None and slope < 0.5}
    summary = {"ratios": ratios(results, pitr, pitr_wal), "sizes": sizes, "wal_steps": wal_steps, "reps": reps,
               "time_to_recovered": ttr, "time_to_recovered_fit": ttr_fit, "delayed_goal": goal,
               "loadavg_before": load_before,
               "loadavg_after": loadavg(), "results": results, "dr_pitr": pitr, "fit": fits,
               "finished_at": datetime.now(UTC).isoformat()}
    out = save_section("size_scaling", summary)
    drop_section("size_scaling_partial")
    print()
    print(f"{'size':>5} {'WAL':>5} | {'barman -j1':>11} {'barman -j2':>11} {'pgBackRest':>11} {'cp -a':>7} "
          "| total = restore + start until promoted (s, median)")
    for r in results:
        def t(m: str, r: dict = r) -> str:
            d = r[m]["total_s"]["median"]
            return f"{d:>11}"
        print(f"{r['size']:>5} {r['wal_after_backup']:>5} | {t('barman_j1')} {t('barman_j2')} {t('pgbackrest_p2')} "
              f"{r['cp_a_floor']['copy_s']['median']:>7}")
    for p in pitr:
        extra = f", staging before the freeze {p['staging_s']} s" if p.get("staged") else ""
        print(f"{p['kind']:<17} {p['size']:>4}: downtime {p['downtime_s']} s{extra}")
    for size, r in summary["ratios"].items():
        print(f"ratios at {size}: " + ", ".join(f"{k} {v}" for k, v in r.items()))
    for m, f in fits.items():
        if f:
            print(f"fit {m:<14}: {f['a_s']} s + {f['s_per_GB']} s/GB + {f['s_per_GB_wal']} s/GB of WAL -> 500 GB: "
                  f"{f['predict_500GB_0wal_s']} s (no WAL), {f['predict_500GB_50GBwal_s']} s (50 GB WAL)")
    if ttr:
        kinds = ["dr_pitr_delayed_standby", "dr_pitr_staged", "dr_pitr_unstaged", "raw_runbook",
                 "pgbackrest_restore_start"]
        print()
        print(f"{'size':>5} | " + " | ".join(f"{k.replace('dr_pitr_', ''):>24}" for k in kinds)
              + "   time-to-recovered / downtime (s)")
        for size, row in ttr.items():
            cells = []
            for k in kinds:
                c = row.get(k) or {}
                cells.append(f"{c.get('time_to_recovered_s', '-')!s:>11} / {c.get('downtime_s', '-')!s:>10}")
            print(f"{size:>5} | " + " | ".join(cells))
        for k, f in ttr_fit.items():
            if f:
                print(f"time-to-recovered fit {k:<26}: {f['a_s']} s + {f['s_per_GB']} s/GB")
        print(f"goal at {goal['size']}: delayed standby {goal['delayed_time_to_recovered_s']} s < pgBackRest "
              f"restore + start {goal['pgbackrest_restore_start_s']} s: {goal['below_pgbackrest']}; slope "
              f"{goal['delayed_s_per_GB']} s/GB < 0.5: {goal['slope_under_0_5']}")
    print(f"load average before/after: {load_before} / {summary['loadavg_after']}  -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
