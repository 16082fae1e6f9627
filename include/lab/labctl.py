#!/usr/bin/env python3
"""Bring the barman-dr lab up or down: a small fleet of real components on loopback.

Hosts are loopback addresses (127.0.10.x), each with its own sshd and host key, so the
inventory and the Airflow connections look like a real fleet:

    ops         127.0.10.1   PostgreSQL 15 (Airflow metadata + dr_audit), Airflow
    barman-lab  127.0.10.2   sshd (user barman), Barman 3.19.1, `barman cron` loop
    pg-primary  127.0.10.11  sshd (user postgres), PostgreSQL 15 primary, PgBouncer :6432
    pg-standby  127.0.10.12  sshd (user postgres), streaming standby of the primary
    pg-nonprod  127.0.10.13  sshd (user postgres), drill target (PostgreSQL only during drills)
    pg-primary2 127.0.10.21  sshd (user postgres), a second PostgreSQL 15 primary (its own Barman
                             server `pg-primary2`, no standby, no nonprod): the fleet has two servers

Everything lives under $LAB_DIR (default: `.lab/` in the repository). `up` is idempotent;
`down` stops, by pid, every process `up` started. Commands are argv lists, never shell
strings. Run as root: PostgreSQL runs as `postgres`, Barman as `barman`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import pwd
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
PG_BIN = Path("/usr/lib/postgresql/15/bin")
BARMAN_VENV = Path(os.environ.get("BARMAN_DR_OPT", "/opt/barman-dr")) / "barman-3.19.1"
SSH_PORT = 2222
PG_PORT = 5432
PGBOUNCER_PORT = 6432
SMTP_PORT = 2525
WEBHOOK_PORT = 2580  # the chat-webhook sink (Slack-style), same process as the SMTP sink
AIRFLOW_API_PORT = 8080
PROMETHEUS_PORT = 9090
REDIS_PORT = 6379  # on the ops address; Debian's packaged instance (never started here) would be 127.0.0.1

# LocalExecutor by default (make demo); LAB_EXECUTOR=celery make lab-up runs CeleryExecutor with
# a private Redis broker and the Celery workers of the inventory's `workers:` section. The mode is
# remembered in $LAB_DIR/executor: a later command without LAB_EXECUTOR keeps the lab's mode, and
# one with another mode restarts the Airflow components in it (Lab.executor).
LAB_EXECUTOR_ENV = os.environ.get("LAB_EXECUTOR")
if LAB_EXECUTOR_ENV not in (None, "", "local", "celery"):
    raise SystemExit(f"[lab] LAB_EXECUTOR={LAB_EXECUTOR_ENV!r}: use local (the default) or celery")

# A second lab (a CI check from a fresh clone next to a developer's lab) takes another
# /24 of the loopback range: LAB_NET=127.0.20 make lab-up.
LAB_NET = os.environ.get("LAB_NET", "127.0.10")
if not (LAB_NET.startswith("127.") and len(LAB_NET.split(".")) == 3 and all(p.isdigit() for p in LAB_NET.split("."))):
    raise SystemExit(f"[lab] LAB_NET={LAB_NET!r}: use three octets inside 127.0.0.0/8, e.g. 127.0.10")
OPS = f"{LAB_NET}.1"
HOSTS = {  # lab host name -> (address, the OS user SSH logs in as)
    "barman-lab": (f"{LAB_NET}.2", "barman"),
    "pg-primary": (f"{LAB_NET}.11", "postgres"),
    "pg-standby": (f"{LAB_NET}.12", "postgres"),
    "pg-nonprod": (f"{LAB_NET}.13", "postgres"),
    "pg-primary2": (f"{LAB_NET}.21", "postgres"),
}
WORKER_LOG_PORT = 8793 + int(LAB_NET.split(".")[2]) - 10
BARMAN_SERVER = "pg-primary"
# the second Barman server of the lab's fleet (a small primary of its own, no standby)
BARMAN_SERVER2 = "pg-primary2"
BARMAN_SERVERS = (BARMAN_SERVER, BARMAN_SERVER2)
AIRFLOW_COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
# lab hosts whose $LAB_DIR/pg/<host> is a small filesystem of its own (MiB, a loop-mounted ext4
# image under $LAB_DIR/disks; tmpfs where loop devices are not available): the staging-space fault
# test fills it while a staged restore copies, as another writer on a production volume would
SMALL_FS_MIB = {"pg-primary2": 1024}
# the delayed standby of pg-primary (issue 17): a second PostgreSQL on pg-standby's host, its own port.
# Its delay is the inventory's `delayed` (include/inventory/lab.yaml: minutes, so tests stay fast)
DELAYED = "pg-delayed"
#: pg-delayed's spare (inventory `spare: true`): built by dr_pitr when pg-delayed is promoted
SPARE = "pg-delayed2"
PG_PORTS = {DELAYED: 5433, SPARE: 5434}
PG_ADDRS = {DELAYED: HOSTS["pg-standby"][0], SPARE: HOSTS["pg-standby"][0]}
# what a DR run of each Barman server may touch: while a run owns the server (its lock, or an
# app it froze and has not resumed: barman_dr.safety.ownership), `up` initialises, starts and
# reconfigures none of these
OWNED_BY_SERVER = {
    BARMAN_SERVER: ("pg-primary", "pg-standby", "pg-delayed", SPARE, "pg-nonprod", "pgbouncer",
                    f"barman:{BARMAN_SERVER}"),
    BARMAN_SERVER2: ("pg-primary2", f"barman:{BARMAN_SERVER2}"),
}


def log(msg: str) -> None:
    print(f"[lab] {msg}", flush=True)


def run(argv: list[str], *, user: str | None = None, check: bool = True, env: dict | None = None,
        capture: bool = True, timeout: float | None = 600, cwd: str | None = None,
        input_text: str | None = None) -> subprocess.CompletedProcess:
    if user and user != "root":
        argv = ["runuser", "-u", user, "--", *argv]
    proc = subprocess.run(argv, capture_output=capture, text=True, env=env, timeout=timeout, cwd=cwd,
                          input=input_text)
    if check and proc.returncode != 0:
        raise SystemExit(f"[lab] command failed ({proc.returncode}): {shlex.join(argv)}\n{proc.stdout}\n{proc.stderr}")
    return proc


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie still "exists": check its state
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        return state != "Z"
    except OSError:
        return False


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


WAL_SEGMENT_BYTES = 16 * 1024 * 1024


def lsn_int(lsn: str) -> int:
    hi, lo = lsn.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def seg_number(name: str) -> int:
    """A WAL file name's segment number (16 MiB segments: 256 per 4 GiB `log` id)."""
    return int(name[8:16], 16) * 0x100 + int(name[16:24], 16)


def history_switches(text: str) -> dict[int, int]:
    """A timeline history file's `parent timeline -> switch LSN` (the LSN where that timeline ended)."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit() and "/" in parts[1]:
            out[int(parts[0])] = lsn_int(parts[1])
    return out


def seg_name(tli: int, segno: int) -> str:
    return f"{tli:08X}{segno // 0x100:08X}{segno % 0x100:08X}"


def expected_timeline(segno: int, tli_now: int, switches: dict[int, int]) -> int:
    """The timeline a server with this history reads segment `segno` from (the switch segment: the child's)."""
    for tli in sorted(switches):
        if segno < switches[tli] // WAL_SEGMENT_BYTES:
            return tli
    return tli_now


def resumable(partial: str, tli_now: int, switches: dict[int, int], pg_wal: set[str]) -> bool:
    """Whether pg_receivewal can resume from this `.partial` on a server at `tli_now` (its pg_wal listed).

    pg_receivewal restarts at the start of the `.partial`'s segment on that segment's timeline.
    On the server's own timeline that works. On an ancestor it works only when that timeline
    ended at or after that start (the walsender refuses a start point past the switch), the
    server still has the ancestor's history file (pg_receivewal asks for it first, and Barman
    has moved its own copy out of the streaming directory), and it still has the segment (the
    switch segment is read from the child timeline's file). Then the server sends the rest
    of the ancestor and pg_receivewal follows the switch: nothing is skipped.
    """
    tli, segno = int(partial[:8], 16), seg_number(partial)
    if tli == tli_now:
        return True
    if tli not in switches or segno * WAL_SEGMENT_BYTES > switches[tli]:
        return False
    if tli != 1 and f"{tli:08X}.history" not in pg_wal:  # timeline 1 has no history file, and none is asked for
        return False
    return seg_name(expected_timeline(segno, tli_now, switches), segno) in pg_wal


def segments_to_backfill(first_segno: int, current_segno: int, archived: set[str], in_pg_wal: set[str],
                         tli_now: int, switches: dict[int, int]) -> list[str]:
    """The whole segments from `first_segno` up to (not including) the server's current one that Barman lacks
    on the timeline the server's history reads each from, and that the server still has."""
    out = []
    for segno in range(first_segno, current_segno):
        name = seg_name(expected_timeline(segno, tli_now, switches), segno)
        if name not in archived and name in in_pg_wal:
            out.append(name)
    return out


def wait_for(predicate, what: str, timeout: float = 60, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise SystemExit(f"[lab] timed out after {timeout}s waiting for {what}")


class Lab:
    def __init__(self, lab_dir: Path) -> None:
        self.dir = lab_dir
        self.secrets_file = lab_dir / "secrets" / "lab.json"
        self.venv = REPO / ".venv"
        #: lab component -> why a DR run owns it (filled by `claim_owned` after the ops database is up)
        self.owned: dict[str, str] = {}

    # ------------------------------------------------------------ DR ownership
    def dr_owners(self, server: str) -> list[str]:
        """The DR runs that own `server` now, from the ops database (barman_dr.safety.ownership.OWNER_SQL)."""
        if not self.pg_running("ops"):
            return []
        if self.psql("ops", "SELECT 1 FROM pg_database WHERE datname = 'dr_audit'") != "1":
            return []
        if self.psql("ops", "SELECT to_regclass('control.server_locks') IS NOT NULL", db="dr_audit") != "t":
            return []
        sys.path.insert(0, str(REPO / "plugins"))
        from barman_dr.safety.ownership import OWNER_SQL

        sql = OWNER_SQL.replace("%(server)s", ":'server'")
        out = run([str(PG_BIN / "psql"), "-X", "-q", "-At", "-F", "\t", "-v", "ON_ERROR_STOP=1",
                   "-v", f"server={server}", "-h", str(self.p("run", "ops")), "-p", str(PG_PORT), "-d", "dr_audit"],
                  user="postgres", input_text=sql).stdout
        owners = []
        for line in out.splitlines():
            reason, dag_id, run_id, _detail, since = (line.split("\t") + [""] * 5)[:5]
            if reason == "app_frozen" and server == BARMAN_SERVER and self.app_paused() is False:
                continue  # someone resumed the app by hand: the freeze, and with it the ownership, is over
            what = "holds its lock" if reason == "lock" else "froze its app and has not resumed it"
            owners.append(f"{dag_id} run {run_id!r} {what} (since {since})")
        return owners

    def app_paused(self) -> bool | None:
        """PgBouncer's live `paused` state of the shop pool (None: PgBouncer is not running)."""
        pid = read_pid(self.p("run", "pgbouncer.pid"))
        if not (pid and pid_alive(pid)):
            return None
        r = run([str(PG_BIN / "psql"), "-X", "-A", "-F", "|", "-P", "footer=off", "-h", HOSTS["pg-primary"][0],
                 "-p", str(PGBOUNCER_PORT), "-U", "pgbouncer_admin", "-d", "pgbouncer", "-c", "SHOW DATABASES"],
                env={**os.environ, "PGPASSWORD": self.secrets()["pgbouncer_admin"]}, check=False)
        lines = r.stdout.splitlines()
        if r.returncode != 0 or not lines:
            return None
        header = lines[0].split("|")
        for line in lines[1:]:
            row = dict(zip(header, line.split("|"), strict=False))
            if row.get("name") == "shop":
                return row.get("paused") == "1"
        return None

    def claim_owned(self) -> None:
        """Which lab components a DR run owns: `up` leaves each of them exactly as it is."""
        self.owned = {}
        for server, parts in OWNED_BY_SERVER.items():
            owners = self.dr_owners(server)
            if owners:
                for part in parts:
                    self.owned[part] = f"server {server}: " + "; ".join(owners)
        for part, why in self.owned.items():
            log(f"{part}: left alone, owned by a DR run ({why}). Finish or roll back that run "
                "(dr_pitr / dr_pitr_rollback), then run this again")

    def leave_alone(self, part: str) -> bool:
        return part in self.owned

    # ---------------------------------------------------------------- layout
    @property
    def executor(self) -> str:
        """`celery` or `local`: LAB_EXECUTOR when set, else the mode this lab was last started in, else local."""
        if LAB_EXECUTOR_ENV:
            return LAB_EXECUTOR_ENV
        saved = self.p("executor")
        return saved.read_text().strip() if saved.exists() and saved.read_text().strip() in ("local", "celery") else "local"

    def p(self, *parts: str) -> Path:
        return self.dir.joinpath(*parts)

    def chown(self, path: Path, user: str, recursive: bool = False) -> None:
        """Give `path` (and, recursive, everything under it) to `user`.

        A file that vanishes between the listing and the chown is skipped: Barman's home is
        live while the lab comes up (receive-wal's lock file goes when it exits, `barman cron`
        moves segments), and `up` must not fail on that (CI, 2026-12-05: a crash test's
        `make lab-up` died on `.pg-primary-receive-wal.lock`).
        """
        pw = pwd.getpwnam(user)
        os.lchown(path, pw.pw_uid, pw.pw_gid)
        if not recursive:
            return
        for root, dirs, files in os.walk(path):
            for name in (*dirs, *files):
                with contextlib.suppress(FileNotFoundError):
                    os.lchown(os.path.join(root, name), pw.pw_uid, pw.pw_gid)

    def ensure_dirs(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        net_file = self.p("lab-net")
        if net_file.exists() and net_file.read_text().strip() != LAB_NET:
            raise SystemExit(f"[lab] {self.dir} was built for LAB_NET={net_file.read_text().strip()}, not {LAB_NET}: "
                             "use that LAB_NET, or another LAB_DIR")
        net_file.write_text(LAB_NET + "\n")
        os.chmod(self.dir, 0o755)
        for d in ("run", "log", "pg", "ssh", "ssh/keys", "ssh/authorized_keys", "secrets", "bin",
                  "barman", "barman/log", "barman/home", "pgbouncer", "airflow", "hosts"):
            self.p(d).mkdir(parents=True, exist_ok=True)
        os.chmod(self.p("secrets"), 0o700)
        for d in ("log", "run"):
            os.chmod(self.p(d), 0o1777)  # postgres, barman and root all write logs/sockets here
        for name in ("ops", *HOSTS):
            self.p("run", name).mkdir(exist_ok=True)
            self.p("hosts", name, "jobs").mkdir(parents=True, exist_ok=True)
        for name in (DELAYED, SPARE):
            self.p("run", name).mkdir(exist_ok=True)
            self.chown(self.p("run", name), "postgres")
        for name in ("pg-primary", "pg-standby", "pg-nonprod", "pg-primary2", "ops"):
            self.chown(self.p("run", name), "postgres")
            self.chown(self.p("hosts", name), "postgres", recursive=True)
        self.chown(self.p("pg"), "postgres")
        self.chown(self.p("hosts", "barman-lab"), "barman", recursive=True)
        self.chown(self.p("barman"), "barman", recursive=True)
        self.chown(self.p("run", "barman-lab"), "barman")
        self.chown(self.p("pgbouncer"), "postgres")
        # every service user must be able to reach $LAB_DIR: fail early with the fix
        for user in ("postgres", "barman"):
            if run(["test", "-x", str(self.dir)], user=user, check=False).returncode != 0:
                raise SystemExit(
                    f"[lab] user {user!r} cannot enter LAB_DIR={self.dir}: a parent directory is not "
                    "traversable (mode 0700?). Set LAB_DIR to a path under /var/tmp or /srv, e.g. "
                    "`make lab-up LAB_DIR=/var/tmp/barman-dr-lab`."
                )

    # --------------------------------------------------------------- secrets
    def secrets(self) -> dict[str, str]:
        names = ("dr_admin", "barman", "streaming_barman", "replicator", "app", "pgbouncer_admin",
                 "airflow", "dr_audit_owner", "dr_audit_writer", "airflow_admin_ui", "jwt", "webhook_token",
                 "metrics_token", "airflow_approver_ui", "redis")
        data = json.loads(self.secrets_file.read_text()) if self.secrets_file.exists() else {}
        if all(n in data for n in names):
            return data
        data.update({n: secrets.token_hex(16) for n in names if n not in data})  # a newer lab may need more
        self.secrets_file.write_text(json.dumps(data, indent=2))
        os.chmod(self.secrets_file, 0o600)
        return data

    # ------------------------------------------------------------------- ssh
    def setup_ssh(self) -> None:
        Path("/run/sshd").mkdir(exist_ok=True)
        keys = self.p("ssh", "keys")
        for name, owner in (("airflow_ed25519", "root"), ("barman_ed25519", "barman"), ("postgres_ed25519", "postgres")):
            key = keys / name
            if not key.exists():
                run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"barman-dr-lab-{name}", "-f", str(key)])
            self.chown(key, owner)
            os.chmod(key, 0o600)
        airflow_pub = (keys / "airflow_ed25519.pub").read_text().strip()
        barman_pub = (keys / "barman_ed25519.pub").read_text().strip()
        # who may log in as whom: Airflow -> barman@barman-host, postgres@db-hosts; barman -> postgres@db-hosts
        postgres_pub = (keys / "postgres_ed25519.pub").read_text().strip()
        ak = self.p("ssh", "authorized_keys")
        # the db hosts' postgres (barman-wal-restore of a standby) may only run `barman get-wal`
        # ... and only for the Barman server whose standbys use it
        # get-wal of pg-primary (the lab's Barman), and of the benchmark cluster through its own Barman
        bench = f"pg-bench={self.p('bench', 'bin', 'barman')}"
        forced = f'command="{self.p("bin", "barman-get-wal-only")} {BARMAN_SERVER} {bench}",restrict {postgres_pub}'
        (ak / "barman").write_text(airflow_pub + "\n" + forced + "\n")
        (ak / "postgres").write_text(airflow_pub + "\n" + barman_pub + "\n")
        for f in ak.iterdir():
            os.chmod(f, 0o644)
        known = []
        for name, (addr, user) in HOSTS.items():
            hdir = self.p("ssh", "hosts", name)
            hdir.mkdir(parents=True, exist_ok=True)
            hkey = hdir / "ssh_host_ed25519_key"
            if not hkey.exists():
                run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{name}-hostkey", "-f", str(hkey)])
            os.chmod(hkey, 0o600)
            pub = (hdir / "ssh_host_ed25519_key.pub").read_text().split()
            known.append(f"[{addr}]:{SSH_PORT} {pub[0]} {pub[1]}")
            (hdir / "sshd_config").write_text("\n".join([
                f"# sshd for lab host {name}: loopback only, key auth only",
                f"ListenAddress {addr}:{SSH_PORT}",
                f"HostKey {hkey}",
                f"PidFile {self.p('run', f'sshd-{name}.pid')}",
                f"AuthorizedKeysFile {ak}/%u",
                "StrictModes no",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "PermitRootLogin no",
                "UsePAM yes",
                f"AllowUsers {user}",
                "MaxStartups 200:30:400",
                "MaxSessions 100",
                "ClientAliveInterval 15",
                "ClientAliveCountMax 8",
                "LogLevel VERBOSE",
                "X11Forwarding no",
                "AllowTcpForwarding no",
                "",
            ]))
        self.p("ssh", "known_hosts").write_text("\n".join(known) + "\n")
        os.chmod(self.p("ssh", "known_hosts"), 0o644)
        # ssh client configs: one for the lab's own use (root/Airflow key), one for the barman user
        mux = self.p("run", "barman-lab")
        for cfg, key in (("ssh_config", keys / "airflow_ed25519"), ("barman_ssh_config", keys / "barman_ed25519"),
                         ("postgres_ssh_config", keys / "postgres_ed25519")):
            lines = []
            for name, (addr, user) in HOSTS.items():
                lines += [
                    f"Host {name}",
                    f"  HostName {addr}",
                    f"  Port {SSH_PORT}",
                    f"  User {user}",
                    f"  IdentityFile {key}",
                    "  IdentitiesOnly yes",
                    f"  UserKnownHostsFile {self.p('ssh', 'known_hosts')}",
                    "  StrictHostKeyChecking yes",
                    "  BatchMode yes",
                    "  ServerAliveInterval 15",
                    "  ServerAliveCountMax 8",
                ]
                if cfg == "barman_ssh_config":  # multiplex the many logins of `barman restore`
                    lines += ["  ControlMaster auto", f"  ControlPath {mux}/cm-%C", "  ControlPersist 30"]
            self.p("ssh", cfg).write_text("\n".join(lines) + "\n")
            os.chmod(self.p("ssh", cfg), 0o644)
        for name, (addr, _user) in HOSTS.items():
            pidf = self.p("run", f"sshd-{name}.pid")
            pid = read_pid(pidf)
            if pid and pid_alive(pid):
                continue
            run(["/usr/sbin/sshd", "-f", str(self.p("ssh", "hosts", name, "sshd_config")),
                 "-E", str(self.p("log", f"sshd-{name}.log"))])
            wait_for(lambda a=addr: port_open(a, SSH_PORT), f"sshd {name} on {addr}:{SSH_PORT}", 15)

    # ------------------------------------------------------------ postgresql
    def pg_running(self, name: str) -> bool:
        pidf = self.p("pg", name, "data", "postmaster.pid")
        pid = read_pid(pidf)
        return bool(pid and pid_alive(pid))

    def pg_start(self, name: str, addr: str) -> None:
        data = self.p("pg", name, "data")
        if self.pg_running(name):
            return
        opts = shlex.join(["-c", f"listen_addresses={addr}", "-c", f"port={PG_PORTS.get(name, PG_PORT)}",
                           "-c", f"unix_socket_directories={self.p('run', name)}", "-c", f"cluster_name={name}"])
        run([str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(self.p("log", f"{name}.log")),
             "-w", "-t", "120", "-o", opts, "start"], user="postgres")

    def psql(self, name: str, sql: str, db: str = "postgres") -> str:
        return run([str(PG_BIN / "psql"), "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h", str(self.p("run", name)),
                    "-p", str(PG_PORTS.get(name, PG_PORT)), "-d", db, "-c", sql], user="postgres").stdout.strip()

    def psql_file(self, name: str, path: Path, db: str, variables: dict[str, str] | None = None) -> None:
        argv = [str(PG_BIN / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", str(self.p("run", name)),
                "-p", str(PG_PORT), "-d", db, "-f", str(path)]
        for k, v in (variables or {}).items():
            argv += ["-v", f"{k}={v}"]
        run(argv, user="postgres")

    def initdb(self, name: str, extra_conf: list[str]) -> bool:
        data = self.p("pg", name, "data")
        if (data / "PG_VERSION").exists():
            return False
        # a data directory that is missing while a DR run's moved-aside or staged copies sit next to
        # it is a recovery in progress (or one that crashed): initdb there would put an empty cluster
        # in front of the app. Refuse, whatever the ops database says.
        evidence = sorted(q.name for q in self.p("pg", name).glob("data.*") if q.is_dir()) \
            if self.p("pg", name).is_dir() else []
        if evidence:
            raise SystemExit(
                f"[lab] {name}: {data} is missing but {', '.join(evidence)} exist next to it: a DR run moved the data "
                "directory aside (or staged a restore) and did not finish. `up` does not initialise a new cluster "
                "over that. Finish the run, or put the original back with dr_pitr_rollback, then run `make lab-up` "
                "again. Nothing was changed.")
        self.p("pg", name).mkdir(parents=True, exist_ok=True)
        self.chown(self.p("pg", name), "postgres")
        run([str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth-local=peer",
             "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8", "--data-checksums"], user="postgres")
        conf = [
            "# barman-dr lab settings (host-specific ones are passed by pg_ctl -o, see the inventory)",
            "wal_level = replica",
            "max_wal_senders = 10",
            "max_replication_slots = 10",
            "wal_keep_size = 256MB",
            "hot_standby = on",
            "shared_buffers = 64MB",
            "log_line_prefix = '%m [%p] %q%u@%d '",
            "log_checkpoints = on",
            "password_encryption = scram-sha-256",
            *extra_conf,
        ]
        with open(data / "postgresql.conf", "a") as fh:
            fh.write("\n" + "\n".join(conf) + "\n")
        (data / "pg_hba.conf").write_text("\n".join([
            "# barman-dr lab: peer for local postgres, scram for everything over TCP",
            "local   all          postgres                 peer",
            "local   all          all                      peer",
            "host    all          all        127.0.0.0/8   scram-sha-256",
            "host    replication  all        127.0.0.0/8   scram-sha-256",
            "",
        ]))
        self.chown(data, "postgres", recursive=True)
        return True

    def pgpass(self) -> Path:
        """One libpq password file per OS user that needs one (0600, owned by that user)."""
        s = self.secrets()
        entries = {
            "postgres": [(h, u, s[u]) for h in ("*",) for u in ("replicator", "dr_admin")],
            "barman": [("*", u, s[u]) for u in ("barman", "streaming_barman")],
        }
        for user, rows in entries.items():
            path = self.p("secrets", f"pgpass-{user}")
            # any port: the delayed standby (5433) and its spare (5434) become the primary after a PITR from it
            path.write_text("".join(f"{h}:*:*:{u}:{pw}\n" for h, u, pw in rows))
            self.chown(path, user)
            os.chmod(path, 0o600)
        # the secrets dir must be traversable by the service users, but not listable
        os.chmod(self.p("secrets"), 0o711)
        return self.p("secrets")

    def setup_ops(self) -> None:
        s = self.secrets()
        self.initdb("ops", ["max_connections = 200"])
        self.pg_start("ops", OPS)
        self.psql_file("ops", REPO / "include" / "sql" / "lab_ops_roles.sql", "postgres", {
            "airflow_pw": s["airflow"], "owner_pw": s["dr_audit_owner"], "writer_pw": s["dr_audit_writer"]})
        for db, owner in (("airflow", "airflow"), ("dr_audit", "dr_audit_owner")):
            if self.psql("ops", f"SELECT 1 FROM pg_database WHERE datname = '{db}'") != "1":
                self.psql("ops", f"CREATE DATABASE {db} OWNER {owner}")
        # the audit schema is applied as its owner so the writer role cannot alter it
        run([str(PG_BIN / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", OPS, "-p", str(PG_PORT),
             "-U", "dr_audit_owner", "-d", "dr_audit", "-f", str(REPO / "include" / "sql" / "audit_schema.sql")],
            env={**os.environ, "PGPASSWORD": s["dr_audit_owner"]})

    def setup_primary(self) -> None:
        if self.leave_alone("pg-primary"):
            return
        s = self.secrets()
        fresh = self.initdb("pg-primary", ["archive_mode = off", "max_connections = 100"])
        self.pg_start("pg-primary", HOSTS["pg-primary"][0])
        self.psql_file("pg-primary", REPO / "include" / "sql" / "lab_primary_roles.sql", "postgres", {
            "dr_admin_pw": s["dr_admin"], "barman_pw": s["barman"], "streaming_barman_pw": s["streaming_barman"],
            "replicator_pw": s["replicator"], "app_pw": s["app"]})
        if self.psql("pg-primary", "SELECT 1 FROM pg_database WHERE datname = 'shop'") != "1":
            self.psql("pg-primary", "CREATE DATABASE shop OWNER app")
        run([str(PG_BIN / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", HOSTS["pg-primary"][0],
             "-p", str(PG_PORT), "-U", "app", "-d", "shop", "-f", str(REPO / "include" / "sql" / "shop_schema.sql")],
            env={**os.environ, "PGPASSWORD": s["app"]})
        if fresh:
            log("primary initialised")

    def mount_small_fs(self, name: str) -> None:
        """Put $LAB_DIR/pg/<name> on a filesystem of its own (see SMALL_FS_MIB); idempotent."""
        mnt = self.p("pg", name)
        if os.path.ismount(mnt):
            return
        if (mnt / "data").exists():
            log(f"{name}: its data directory is not on a filesystem of its own (a lab built before that): the "
                "staging-space fault test will skip. A new LAB_DIR gets one")
            return
        size = SMALL_FS_MIB[name]
        img = self.p("disks", f"{name}.img")
        img.parent.mkdir(exist_ok=True)
        mnt.mkdir(parents=True, exist_ok=True)
        new = not img.exists()
        if new:
            run(["truncate", "-s", f"{size}M", str(img)])  # sparse: only what is written takes disk space
            run(["mkfs.ext4", "-q", "-F", "-m", "0", "-L", f"lab-{name}"[:16], str(img)])
        how = "loop-mounted ext4"
        if run(["mount", "-o", "loop", str(img), str(mnt)], check=False).returncode != 0:
            if not new:  # the image holds the cluster: an empty tmpfs over it would get a fresh initdb
                raise SystemExit(f"[lab] {name}: could not loop-mount {img}, which holds its data. Nothing was "
                                 f"changed. Fix: `losetup -f` must find a free loop device, then `make lab-up` again")
            how = "tmpfs"
            if run(["mount", "-t", "tmpfs", "-o", f"size={size}m,mode=0755", "tmpfs", str(mnt)],
                   check=False).returncode != 0:
                log(f"{name}: could not mount a small filesystem (no loop device, no tmpfs mount allowed): the "
                    "staging-space fault test will skip")
                return
        self.chown(mnt, "postgres")
        log(f"{name}: {mnt} is a {size} MiB {how} filesystem of its own")

    def setup_primary2(self) -> None:
        """A second, small primary: database `shop` with a few critical_orders, its own Barman server."""
        # mounting changes nothing of the server, and without it an owned server's data would be hidden
        self.mount_small_fs("pg-primary2")
        if self.leave_alone("pg-primary2"):
            return
        s = self.secrets()
        # little WAL kept: its data shares a small filesystem with the staging copies of its restores
        fresh = self.initdb("pg-primary2", ["archive_mode = off", "max_connections = 50", "wal_keep_size = 64MB",
                                            "max_wal_size = 256MB", "min_wal_size = 64MB"])
        self.pg_start("pg-primary2", HOSTS["pg-primary2"][0])
        self.psql_file("pg-primary2", REPO / "include" / "sql" / "lab_primary_roles.sql", "postgres", {
            "dr_admin_pw": s["dr_admin"], "barman_pw": s["barman"], "streaming_barman_pw": s["streaming_barman"],
            "replicator_pw": s["replicator"], "app_pw": s["app"]})
        if self.psql("pg-primary2", "SELECT 1 FROM pg_database WHERE datname = 'shop'") != "1":
            self.psql("pg-primary2", "CREATE DATABASE shop OWNER app")
        env = {**os.environ, "PGPASSWORD": s["app"]}
        base = [str(PG_BIN / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", HOSTS["pg-primary2"][0],
                "-p", str(PG_PORT), "-U", "app", "-d", "shop"]
        run([*base, "-f", str(REPO / "include" / "sql" / "shop_schema.sql")], env=env)
        run([*base, "-c", "INSERT INTO critical_orders (order_id, customer_id, amount, status) "
                          "SELECT g, 100 + g, 10 * g, CASE WHEN g % 3 = 0 THEN 'pending' ELSE 'completed' END "
                          "FROM generate_series(1, 12) g ON CONFLICT (order_id) DO NOTHING"], env=env)
        if fresh:
            log("second primary (pg-primary2) initialised")

    def setup_standby(self) -> None:
        if self.leave_alone("pg-standby"):
            return
        data = self.p("pg", "pg-standby", "data")
        if not (data / "PG_VERSION").exists():
            if self.psql("pg-primary", "SELECT 1 FROM pg_replication_slots WHERE slot_name = 'pg_standby'") != "1":
                self.psql("pg-primary", "SELECT pg_create_physical_replication_slot('pg_standby')")
            self.p("pg", "pg-standby").mkdir(parents=True, exist_ok=True)
            self.chown(self.p("pg", "pg-standby"), "postgres")
            conninfo = (f"host={HOSTS['pg-primary'][0]} port={PG_PORT} user=replicator "
                        f"passfile={self.p('secrets', 'pgpass-postgres')} application_name=pg-standby")
            run([str(PG_BIN / "pg_basebackup"), "-d", conninfo, "-D", str(data), "-X", "stream", "-R",
                 "-S", "pg_standby", "-c", "fast"], user="postgres")
            log("standby cloned from the primary")
        self.pg_start("pg-standby", HOSTS["pg-standby"][0])

    def delayed_standby(self) -> Any:
        """pg-primary's delayed standby as the lab inventory describes it (its delay, restore_command)."""
        sys.path.insert(0, str(REPO / "plugins"))
        import yaml

        from barman_dr.inventory import parse_inventory

        path = self.inventory_file()
        env = {**os.environ, "LAB_DIR": str(self.dir), "LAB_NET": LAB_NET}
        inv = parse_inventory(yaml.safe_load(path.read_text()), str(path), env=env)
        return inv.server(BARMAN_SERVER).standby(DELAYED)

    def setup_delayed_standby(self) -> None:
        """A copy of pg-primary that applies WAL `delayed` late, and falls back to Barman's archive.

        It streams at once (its slot pg_delayed), replays `recovery_min_apply_delay` late, and its
        `restore_command` is barman-wal-restore (get-wal over SSH, the key restricted to get-wal on
        the barman host): with the primary gone it still reaches what Barman archived. The
        settings are the ones dr_pitr's rebuild writes (barman_dr...post_incident.start_settings, delay_settings).
        """
        if self.leave_alone(DELAYED):
            return
        data = self.p("pg", DELAYED, "data")
        if not (data / "PG_VERSION").exists():
            sys.path.insert(0, str(REPO / "plugins"))
            from barman_dr.operators.pitr.post_incident import SET_CONF_SCRIPT, delay_settings, start_settings

            sb = self.delayed_standby()
            if self.psql("pg-primary", "SELECT 1 FROM pg_replication_slots WHERE slot_name = 'pg_delayed'") != "1":
                self.psql("pg-primary", "SELECT pg_create_physical_replication_slot('pg_delayed')")
            self.p("pg", DELAYED).mkdir(parents=True, exist_ok=True)
            self.chown(self.p("pg", DELAYED), "postgres")
            conninfo = (f"host={HOSTS['pg-primary'][0]} port={PG_PORT} user=replicator "
                        f"passfile={self.p('secrets', 'pgpass-postgres')} application_name={DELAYED}")
            run([str(PG_BIN / "pg_basebackup"), "-d", conninfo, "-D", str(data), "-X", "stream", "-R",
                 "-S", "pg_delayed", "-c", "fast"], user="postgres")
            run(["sh", "-c", SET_CONF_SCRIPT, "sh", str(data / "postgresql.auto.conf"), *start_settings(sb)],
                user="postgres")
            self.pg_start(DELAYED, PG_ADDRS[DELAYED])
            # streaming first, then the delay (as dr_pitr's rebuild does: post_incident.delay_settings)
            wait_for(lambda: self.follows_primary(DELAYED, wait_s=0), "pg-delayed streaming", 120, 1)
            run(["sh", "-c", SET_CONF_SCRIPT, "sh", str(data / "postgresql.auto.conf"), *delay_settings(sb)],
                user="postgres")
            self.psql(DELAYED, "SELECT pg_reload_conf()")
            log(f"delayed standby cloned from the primary (recovery_min_apply_delay {sb.apply_delay_s}s)")
        self.pg_start(DELAYED, PG_ADDRS[DELAYED])

    def write_wal_restore(self) -> None:
        """barman-wal-restore for the db hosts' postgres user: its own SSH config, get-wal only on the barman side."""
        path_dir = self.p("bin", "wal-restore-path")
        path_dir.mkdir(parents=True, exist_ok=True)
        ssh = path_dir / "ssh"  # barman-wal-restore runs `ssh` from PATH: this one uses the lab's config
        ssh.write_text(f"#!/bin/sh\nexec /usr/bin/ssh -F {self.p('ssh', 'postgres_ssh_config')} \"$@\"\n")
        wrapper = self.p("bin", "barman-wal-restore")
        wrapper.write_text(f"#!/bin/sh\n# barman-wal-restore with the lab's ssh (Barman 3.19.1's client)\n"
                           f"PATH={path_dir}:/usr/bin:/bin exec {BARMAN_VENV}/bin/barman-wal-restore \"$@\"\n")
        forced = self.p("bin", "barman-get-wal-only")
        forced.write_text("\n".join([
            f"#!{BARMAN_VENV}/bin/python",
            "# the barman host's forced command for the db hosts' key: `barman get-wal` and nothing else",
            "import os, shlex, sys",
            "argv = shlex.split(os.environ.get('SSH_ORIGINAL_COMMAND', ''))",
            "if argv[:1] == ['barman']:",
            "    argv = argv[1:]",
            "if argv[:1] in (['--config'], ['-c']):",
            "    argv = argv[2:]",
            "ok = {'--partial', '--test', '--gzip', '--bzip2', '--keep-compression'}",
            "positional, rest = [], argv[1:]",
            "while rest:",
            "    a = rest.pop(0)",
            "    if a == '--peek' and rest and rest[0].isdigit():",
            "        rest.pop(0)",
            "    elif a.startswith('-') and a not in ok:",
            "        positional = None",
            "        break",
            "    elif not a.startswith('-'):",
            "        positional.append(a)",
            "# the allowed servers: `name` (the lab's Barman) or `name=<barman command>` (its own Barman)",
            f"allowed = dict(a.split('=', 1) if '=' in a else (a, {str(self.p('bin', 'barman'))!r}) "
            "for a in sys.argv[1:])",
            "if not argv or argv[0] != 'get-wal' or positional is None or len(positional) != 2 \\",
            "        or positional[0] not in allowed:",
            "    sys.exit('only `barman get-wal` of ' + ', '.join(allowed) + ' is allowed with this key')",
            "os.execv(allowed[positional[0]], [allowed[positional[0]], *argv])",
            "",
        ]))
        for f in (ssh, wrapper, forced):
            os.chmod(f, 0o755)

    # --------------------------------------------------------------- failback
    def in_recovery(self, name: str) -> bool:
        return self.psql(name, "SELECT pg_is_in_recovery()") == "t"

    def is_primary(self, name: str) -> bool:
        return self.pg_running(name) and not self.in_recovery(name)

    def follows_primary(self, name: str, wait_s: float = 20) -> bool:
        """`name` streams from pg-primary (in pg_stat_replication there; `catchup` given time to finish)."""
        if not (self.pg_running(name) and self.in_recovery(name)):
            return False
        deadline = time.monotonic() + wait_s
        while True:
            state = self.psql("pg-primary", f"SELECT state FROM pg_stat_replication WHERE application_name = '{name}'")
            if state == "streaming":
                return True
            if state != "catchup" and time.monotonic() > deadline - wait_s + 3:  # absent: give it a few seconds
                return False
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)

    def failback(self) -> None:
        """The lab's topology back after `dr_pitr` onto a standby (a lab chore, not a DR step).

        `restore_to: pg-standby` leaves pg-standby serving, `source: delayed_standby` pg-delayed
        (with the spare pg-delayed2 as its delayed standby); PgBouncer and Barman point at it and
        pg-primary is fenced. The inventory names pg-primary as the primary, so the suites after it need it
        back, with the *recovered* data: pg-primary's fenced directory is moved aside (kept), a
        copy of pg-standby streams into it, pg-standby stops cleanly (every WAL record sent),
        pg-primary is promoted, pg-standby and the delayed standby are cloned from it again,
        and PgBouncer and Barman point at pg-primary (a WAL switch archived, a fresh backup).

        Every step checks the state first, so a failback interrupted anywhere converges when
        run again, and on a lab that needs none it changes nothing. Refused while a DR run owns
        pg-primary, and when two primaries run.
        """
        self.claim_owned()
        if self.leave_alone("pg-primary"):
            raise SystemExit(f"[lab] failback refused: {self.owned['pg-primary']}")
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        data = self.p("pg", "pg-primary", "data")
        # the instance a run onto a standby left serving: pg-standby (restore_to) or pg-delayed (source)
        candidates = ("pg-standby", DELAYED)
        serving = [n for n in candidates if self.is_primary(n)]
        if len(serving) > 1 or (serving and self.is_primary("pg-primary")):
            raise SystemExit(f"[lab] failback refused: {', '.join([*serving, 'pg-primary'][:3])} run as primaries. "
                             "Fence one (pg_ctl stop) before anything else")
        if serving:
            name = serving[0]
            addr, port = PG_ADDRS.get(name, HOSTS["pg-standby"][0]), PG_PORTS.get(name, PG_PORT)
            if not self.pg_running("pg-primary"):  # the fenced primary: kept aside, a copy of the server instead
                if data.exists():
                    aside = data.with_name(f"data.pre-failback-{stamp}")
                    data.rename(aside)
                    log(f"failback: pg-primary's fenced data directory kept at {aside}")
                conninfo = (f"host={addr} port={port} user=replicator "
                            f"passfile={self.p('secrets', 'pgpass-postgres')} application_name=pg-primary")
                run([str(PG_BIN / "pg_basebackup"), "-d", conninfo, "-D", str(data), "-X", "stream", "-R", "-c",
                     "fast"], user="postgres")
                self.pg_start("pg-primary", HOSTS["pg-primary"][0])
            wait_for(lambda: self.psql(name, "SELECT count(*) FROM pg_stat_replication WHERE "
                                       "application_name = 'pg-primary' AND state = 'streaming'") == "1",
                     f"pg-primary streaming from {name}", 60, 0.5)
            # a clean (fast) shutdown sends every WAL record, its shutdown checkpoint included, to pg-primary
            run([str(PG_BIN / "pg_ctl"), "-D", str(self.p("pg", name, "data")), "-m", "fast", "-w", "stop"],
                user="postgres")
        if self.pg_running("pg-primary") and self.in_recovery("pg-primary"):
            # only failback's own copy (it follows a candidate that is stopped now): never another recovering
            # pg-primary (an in-place PITR's)
            follows = self.psql("pg-primary", "SHOW primary_conninfo") + " "
            source = next((n for n in candidates if f"host={PG_ADDRS.get(n, HOSTS['pg-standby'][0])} " in follows
                           and f"port={PG_PORTS.get(n, PG_PORT)} " in follows), None)
            if source and not self.pg_running(source):
                run([str(PG_BIN / "pg_ctl"), "-D", str(data), "-w", "-t", "120", "promote"], user="postgres")
                log(f"failback: pg-primary promoted with the recovered data (from {source})")
        if self.is_primary("pg-primary") and self.psql("pg-primary", "SHOW primary_conninfo"):
            self.psql("pg-primary", "ALTER SYSTEM RESET primary_conninfo")
            self.psql("pg-primary", "SELECT pg_reload_conf()")
        if not self.is_primary("pg-primary"):
            raise SystemExit("[lab] failback: pg-primary is not running as a primary and pg-standby is not serving "
                             "either: nothing safe to do automatically. Look at both logs")
        # the standbys: cloned from pg-primary again unless they already stream from it
        for name, setup in (("pg-standby", self.setup_standby), (DELAYED, self.setup_delayed_standby)):
            if self.follows_primary(name):
                continue
            d = self.p("pg", name, "data")
            if self.pg_running(name):
                run([str(PG_BIN / "pg_ctl"), "-D", str(d), "-m", "fast", "-w", "stop"], user="postgres")
            if d.exists():
                d.rename(d.with_name(f"data.pre-failback-{stamp}"))
            setup()
            log(f"failback: {name} cloned from pg-primary")
        # the spare delayed standby is not run day to day: a run that promoted pg-delayed built it
        spare = self.p("pg", SPARE, "data")
        if self.pg_running(SPARE):
            run([str(PG_BIN / "pg_ctl"), "-D", str(spare), "-m", "fast", "-w", "stop"], user="postgres")
        if spare.exists():
            spare.rename(spare.with_name(f"data.pre-failback-{stamp}"))
            log(f"failback: the spare {SPARE} stopped and set aside (not run day to day)")
        if self.psql("pg-primary", f"SELECT count(*) FROM pg_replication_slots WHERE slot_name = "
                                   f"'{SPARE.replace('-', '_')}'") == "1":
            self.psql("pg-primary", f"SELECT pg_drop_replication_slot('{SPARE.replace('-', '_')}')")
        ini = self.p("pgbouncer", "pgbouncer.ini")
        lines = ini.read_text().splitlines()
        line = f"shop = host={HOSTS['pg-primary'][0]} port={PG_PORT} dbname=shop"
        if line not in lines:
            ini.write_text("\n".join(line if ln.startswith("shop = ") else ln for ln in lines) + "\n")
            pid = read_pid(self.p("run", "pgbouncer.pid"))
            if pid and pid_alive(pid):
                os.kill(pid, signal.SIGHUP)  # PgBouncer re-reads its config (RELOAD)
            log("failback: PgBouncer points at pg-primary")
        show = json.loads(self.barman(["-f", "json", "show-server", BARMAN_SERVER]).stdout).get(BARMAN_SERVER, {})
        if f"host={HOSTS['pg-primary'][0]} " not in str(show.get("conninfo")) + " ":
            change = {"scope": "server", "server_name": BARMAN_SERVER,
                      "conninfo": f"host={HOSTS['pg-primary'][0]} port={PG_PORT} user=barman dbname=postgres "
                                  f"passfile={self.p('secrets', 'pgpass-barman')}",
                      "streaming_conninfo": f"host={HOSTS['pg-primary'][0]} port={PG_PORT} user=streaming_barman "
                                            f"passfile={self.p('secrets', 'pgpass-barman')}"}
            self.barman(["config-update", json.dumps([change])])

        # Barman resumes from its newest `.partial`. When pg-primary cannot serve it (a timeline not in its
        # history, past that ancestor's end, or a history file or segment it no longer has: a run that failed
        # before Barman followed the new primary) the partials are set aside and receive-wal is reset to
        # pg-primary's current segment. Otherwise it is left alone: pg_receivewal resumes from it and follows the
        # switch. Resetting there too skipped the segments written since the promotion (CI, 2026-12-05: three
        # segments missing, the daily verification CRITICAL for the rest of the run)
        tli_now = int(self.psql("pg-primary", "SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)"), 16)
        switches = self.timeline_switches("pg-primary", tli_now)
        stream_dir = Path(show.get("streaming_wals_directory") or self.p("barman", "home", BARMAN_SERVER, "streaming"))
        partials = sorted((f for f in stream_dir.glob("*.partial") if len(f.name) == 32),
                          key=lambda f: (seg_number(f.name), f.name)) if stream_dir.exists() else []
        pg_wal = {f.name for f in self.p("pg", "pg-primary", "data", "pg_wal").iterdir()}
        if partials and not resumable(partials[-1].name, tli_now, switches, pg_wal):
            self.barman(["receive-wal", "--stop", BARMAN_SERVER], check=False)
            # whole segments still waiting in the streaming directory are archived first: one on a higher
            # timeline would make `--reset` refuse too
            self.barman(["archive-wal", BARMAN_SERVER], check=False)
            kept = self.p("run", "barman-streaming-set-aside")
            kept.mkdir(exist_ok=True)
            for f in partials:  # `--reset` refuses a position "ahead" of pg-primary's (a higher timeline)
                f.rename(kept / f"{f.name}.{stamp}")
            self.barman(["receive-wal", "--reset", BARMAN_SERVER], check=False)
            log(f"failback: Barman's receive-wal was on {partials[-1].name}, which pg-primary cannot serve: "
                f"reset to its current segment (the .partial files kept in {kept})")

        def streaming() -> bool:  # cron creates Barman's slot on pg-primary (create_slot = auto), then streams
            self.barman(["cron"], check=False)
            return self.receive_wal_running()

        wait_for(streaming, "barman receive-wal from pg-primary", 90, 2)
        self.backfill_from_primary(show, stream_dir, tli_now, switches)
        # the timeline WAL is written on now (a checkpoint's may still be the one before a promotion)
        tli = int(self.psql("pg-primary", "SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)"), 16)
        backups = json.loads(self.barman(["-f", "json", "list-backups", BARMAN_SERVER]).stdout).get(BARMAN_SERVER, [])
        newest = next((b for b in backups if b.get("status") == "DONE"), None)
        on_tli = newest is not None and json.loads(self.barman(
            ["-f", "json", "show-backup", BARMAN_SERVER, newest["backup_id"]]).stdout)[BARMAN_SERVER][
            "base_backup_information"].get("timeline") == tli
        if not on_tli:
            self.barman(["switch-wal", "--force", "--archive", "--archive-timeout", "60", BARMAN_SERVER])
            self.barman(["backup", "--wait", "--wait-timeout", "120", BARMAN_SERVER])
            log("failback: Barman streams from pg-primary; a fresh backup taken on its timeline")

    def timeline_switches(self, name: str, tli: int) -> dict[int, int]:
        """`name`'s timeline history (`parent -> switch LSN`), read from its own pg_wal; {} on timeline 1."""
        if tli <= 1:
            return {}
        return history_switches(self.psql(name, f"SELECT pg_read_file('pg_wal/{tli:08X}.history')"))

    def backfill_from_primary(self, show: dict, stream_dir: Path, tli_now: int, switches: dict[int, int]) -> None:
        """Hand Barman every whole segment of pg-primary's history it lacks and pg-primary still has in pg_wal.

        On every failback, not only after a reset of its own, so a failback interrupted after the
        reset still converges. Streaming is caught up first (`switch-wal --archive`): pg_receivewal
        only moves forward, so what is still missing below the switched segment is a gap it will
        never fill, and nothing copied here is a file it is about to write. Each segment is written
        beside the streaming directory and renamed into it whole (`barman cron` takes anything it
        finds there), then `barman archive-wal` archives it like a streamed one.
        """
        wals = Path(show.get("wals_directory") or self.p("barman", "home", BARMAN_SERVER, "wals"))
        pg_wal = self.p("pg", "pg-primary", "data", "pg_wal")

        def todo() -> list[str]:
            archived = {f.name for f in wals.glob("*/*")} | {f.name for f in stream_dir.iterdir()}
            in_pg_wal = {f.name for f in pg_wal.iterdir() if len(f.name) == 24}
            current = seg_number(self.psql("pg-primary", "SELECT pg_walfile_name(pg_current_wal_lsn())"))
            first = min((seg_number(n) for n in in_pg_wal), default=current)
            return segments_to_backfill(first, current, archived, in_pg_wal, tli_now, switches)

        if not todo():
            return
        self.barman(["switch-wal", "--force", "--archive", "--archive-timeout", "60", BARMAN_SERVER], check=False)
        copied = []
        pw = pwd.getpwnam("barman")
        for name in todo():
            tmp = stream_dir.parent / f".backfill-{name}.{os.getpid()}"
            try:
                shutil.copyfile(pg_wal / name, tmp)
            except FileNotFoundError:  # recycled meanwhile: nothing left to hand over
                tmp.unlink(missing_ok=True)
                continue
            if tmp.stat().st_size != WAL_SEGMENT_BYTES:
                tmp.unlink()
                continue
            os.chown(tmp, pw.pw_uid, pw.pw_gid)
            tmp.rename(stream_dir / name)
            copied.append(name)
        if copied:
            self.barman(["archive-wal", BARMAN_SERVER], check=False)
            log(f"failback: {len(copied)} segment(s) Barman lacked handed over from pg-primary's pg_wal: {copied}")

    # -------------------------------------------------------------- pgbouncer
    def prune_set_aside(self) -> None:
        """Delete the data directories DR runs set aside on the lab's hosts (a lab chore, never a DR step).

        dr_pitr, the drills, rollback and failback never delete a data directory: each is renamed
        `data.pre-*` / `data.failed-*` and kept for forensics. A production DBA removes them once
        the incident is closed; the test suites do it here between modules, or a whole `make test`
        leaves 15-20 GB of them behind on the host's disk (and the daily verification's disk check
        rightly turns CRITICAL on a small CI disk). Only directories of that shape; never one a
        postmaster claims (postmaster.pid); refused while a DR run owns the server.
        """
        if not (self.pg_running("ops") and self.psql(
                "ops", "SELECT to_regclass('control.server_locks') IS NOT NULL", db="dr_audit") == "t"):
            raise SystemExit("[lab] prune refused: the DR runs' ownership cannot be read (ops PostgreSQL down, or no "
                             "dr_audit): a set-aside directory may be what a failed run's rollback needs. Start the "
                             "lab first (make lab-up)")
        self.claim_owned()
        freed = 0
        for host in sorted(self.p("pg").iterdir()):
            if not host.is_dir() or self.leave_alone(host.name):
                continue
            for d in sorted(host.iterdir()):
                if not d.is_dir() or d.is_symlink() or not d.name.startswith(("data.pre-", "data.failed-")):
                    continue
                pid = read_pid(d / "postmaster.pid")
                if pid and pid_alive(pid):
                    log(f"prune: {d} has a running postmaster: kept")
                    continue
                freed += sum(f.stat().st_size for f in d.rglob("*") if f.is_file() and not f.is_symlink())
                shutil.rmtree(d)
        log(f"prune: set-aside data directories removed ({freed / 2**20:.0f} MiB)")

    def setup_pgbouncer(self) -> None:
        # a DR run froze the app with PAUSE: a (re)started PgBouncer would silently unfreeze it
        if self.leave_alone("pgbouncer"):
            return
        s = self.secrets()
        d = self.p("pgbouncer")
        (d / "userlist.txt").write_text(f'"app" "{s["app"]}"\n"pgbouncer_admin" "{s["pgbouncer_admin"]}"\n')
        ini = d / "pgbouncer.ini"
        if not ini.exists():  # the PITR may repoint [databases]; never clobber a live target
            ini.write_text("\n".join([
                "[databases]",
                f"shop = host={HOSTS['pg-primary'][0]} port={PG_PORT} dbname=shop",
                "",
                "[pgbouncer]",
                f"listen_addr = {HOSTS['pg-primary'][0]}",
                f"listen_port = {PGBOUNCER_PORT}",
                f"unix_socket_dir = {self.p('run', 'pg-primary')}",
                "auth_type = scram-sha-256",
                f"auth_file = {d / 'userlist.txt'}",
                "admin_users = pgbouncer_admin",
                "pool_mode = transaction",
                "max_client_conn = 500",
                "default_pool_size = 20",
                "ignore_startup_parameters = extra_float_digits,options",
                f"logfile = {self.p('log', 'pgbouncer.log')}",
                f"pidfile = {self.p('run', 'pgbouncer.pid')}",
                "",
            ]))
        for f in (ini, d / "userlist.txt"):
            self.chown(f, "postgres")
            os.chmod(f, 0o600)
        pid = read_pid(self.p("run", "pgbouncer.pid"))
        if not (pid and pid_alive(pid)):
            run(["pgbouncer", "-d", str(ini)], user="postgres")
            wait_for(lambda: port_open(HOSTS["pg-primary"][0], PGBOUNCER_PORT), "pgbouncer", 15)

    # ----------------------------------------------------------------- barman
    def setup_barman(self) -> None:
        b = self.p("barman")
        passfile = self.p("secrets", "pgpass-barman")
        (b / "barman.conf").write_text("\n".join([
            "; barman-dr lab: Barman acting as the barman host (generated by labctl.py)",
            "[barman]",
            "barman_user = barman",
            f"barman_home = {b / 'home'}",
            f"configuration_files_directory = {b / 'barman.d'}",
            f"log_file = {b / 'log' / 'barman.log'}",
            "log_level = INFO",
            "backup_method = postgres",
            "retention_policy = RECOVERY WINDOW OF 7 DAYS",
            "minimum_redundancy = 2",
            "",
        ]))
        (b / "barman.d").mkdir(exist_ok=True)
        for server, description in ((BARMAN_SERVER, "Lab primary (shop)"),
                                    (BARMAN_SERVER2, "Lab second primary (small shop)")):
            addr = HOSTS[server][0]
            if self.leave_alone(f"barman:{server}") and (b / "barman.d" / f"{server}.conf").exists():
                continue  # the run may have changed it (bandwidth, conninfo after a failover)
            (b / "barman.d" / f"{server}.conf").write_text("\n".join([
                f"[{server}]",
                f"description = {description}",
                f"conninfo = host={addr} port={PG_PORT} user=barman dbname=postgres passfile={passfile}",
                f"streaming_conninfo = host={addr} port={PG_PORT} user=streaming_barman passfile={passfile}",
                "backup_method = postgres",
                "streaming_archiver = on",
                "slot_name = barman",
                "create_slot = auto",
                f"path_prefix = {PG_BIN}",
                "retention_policy = RECOVERY WINDOW OF 7 DAYS",
                "retention_policy_mode = auto",
                "wal_retention_policy = main",
                "minimum_redundancy = 2",
                "",
            ]))
        wrapper = self.p("bin", "barman")
        conf = b / "barman.conf"
        wrapper.write_text(f"#!/bin/sh\n# barman with the lab's configuration\nexec {BARMAN_VENV}/bin/barman -c {conf} \"$@\"\n")
        os.chmod(wrapper, 0o755)
        self.chown(b, "barman", recursive=True)
        # `barman cron` keeps receive-wal running and applies retention: the lab runs it in a loop
        pidf = self.p("run", "barman-cron.pid")
        pid = read_pid(pidf)
        pause = self.p("run", "barman-cron.paused")
        if not (pid and pid_alive(pid)):
            loop = self.p("bin", "barman-cron-loop")
            loop.write_text(f"#!/bin/sh\n# the lab's stand-in for the seed's `*/5 * * * * barman cron`\n"
                            f"# tests pause it (to simulate a stopped WAL stream) by creating {pause}\n"
                            f"while true; do [ -e {pause} ] || {wrapper} cron >/dev/null 2>&1; sleep 20; done\n")
            os.chmod(loop, 0o755)
            proc = subprocess.Popen(["runuser", "-u", "barman", "--", "setsid", str(loop)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            pidf.write_text(str(proc.pid))
        self.barman(["cron"])
        for server in BARMAN_SERVERS:
            if self.leave_alone(f"barman:{server}"):
                continue  # its PostgreSQL may be stopped by the run: streaming resumes when the run ends
            wait_for(lambda sv=server: self.receive_wal_running(sv), f"barman receive-wal of {server}", 60, 1)

    def barman(self, args: list[str], check: bool = True) -> subprocess.CompletedProcess:
        return run([str(self.p("bin", "barman")), *args], user="barman", check=check)

    def receive_wal_running(self, server: str = BARMAN_SERVER) -> bool:
        out = self.barman(["-f", "json", "list-processes", server], check=False).stdout
        try:
            return any(p.get("name") == "receive-wal" for p in json.loads(out).get(server, []))
        except ValueError:
            return False

    def ensure_backups(self, server: str = BARMAN_SERVER, minimum: int = 2) -> None:
        def done() -> int:
            out = self.barman(["-f", "json", "list-backups", server]).stdout
            return sum(1 for b in json.loads(out).get(server, []) if b.get("status") == "DONE")

        def check_ok() -> dict:
            out = self.barman(["-f", "json", "check", server], check=False).stdout
            return {k: v for k, v in json.loads(out).get(server, {}).items() if v.get("status") != "OK"}

        # the first WAL must reach Barman before check passes the WAL archive test
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            failing = set(check_ok()) - {"minimum_redundancy_requirements"}
            if not failing:
                break
            log(f"waiting for barman check of {server}: {sorted(failing)}")
            if failing & {"receive_wal_running", "replication_slot", "wal_archive"}:
                self.barman(["cron"], check=False)
                self.barman(["switch-wal", "--force", "--archive", "--archive-timeout", "30", server], check=False)
            time.sleep(1)
        have = done()
        while have < minimum:
            log(f"{server}: taking backup {have + 1} of {minimum} (barman backup --wait)")
            self.barman(["backup", "--wait", "--wait-timeout", "120", server])
            have = done()
        failing = check_ok()
        if failing:
            raise SystemExit(f"[lab] barman check of {server} is not all OK: {json.dumps(failing)}")

    # ---------------------------------------------------------------- airflow
    @staticmethod
    def inventory_file() -> Path:
        """The lab's inventory; `LAB_INVENTORY` replaces it (the benchmarks' fleets), e.g. for restart-airflow."""
        return Path(os.environ.get("LAB_INVENTORY") or REPO / "include" / "inventory" / "lab.yaml").resolve()

    def restart_airflow(self) -> None:
        """Stop and start the Airflow components only (new settings or inventory), then rewrite env.sh."""
        for comp in reversed(AIRFLOW_COMPONENTS):
            self.stop_pid(self.p("run", f"airflow-{comp}.pid"), f"airflow {comp}", group=True)
        self.stop_celery()
        self.write_env()
        self.setup_airflow(start=True)
        log(f"airflow restarted with inventory {self.inventory_file()}")

    def airflow_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.exports())
        env["PATH"] = f"{self.venv / 'bin'}:{env.get('PATH', '')}"
        return env

    def setup_airflow(self, start: bool) -> None:
        env = self.airflow_env()
        home = Path(env["AIRFLOW_HOME"])
        home.mkdir(parents=True, exist_ok=True)
        # two people: `admin` requests DR runs, `approver` (role op) is the second pair of eyes
        (home / "simple_auth_manager_passwords.json").write_text(json.dumps(
            {"admin": self.secrets()["airflow_admin_ui"], "approver": self.secrets()["airflow_approver_ui"]}))
        os.chmod(home / "simple_auth_manager_passwords.json", 0o600)
        airflow = str(self.venv / "bin" / "airflow")
        stamp = home / ".migrated"
        want = hashlib.sha256((REPO / "requirements.txt").read_bytes()).hexdigest()
        if not stamp.exists() or stamp.read_text() != want:
            log("airflow db migrate")
            run([airflow, "db", "migrate"], env=env, timeout=600)
            stamp.write_text(want)
        # one pool per barman host, sized from the inventory: the scheduler never runs a task
        # whose pool does not exist (dag.test ignores pools, so tests alone would not notice)
        pools_stamp = home / ".pools"
        inventory = self.inventory_file().read_bytes()
        if not pools_stamp.exists() or pools_stamp.read_bytes() != inventory:
            sys.path.insert(0, str(REPO / "plugins"))
            from barman_dr.fleet import pool_slots

            for pool, slots in pool_slots(self.inventory_file()).items():
                run([airflow, "pools", "set", pool, str(slots), "barman-dr: concurrent commands on this barman host"],
                    env=env, timeout=120)
            pools_stamp.write_bytes(inventory)
        if not start:
            return
        saved = self.p("executor")
        if saved.exists() and saved.read_text().strip() != self.executor:
            log(f"executor {saved.read_text().strip()} -> {self.executor}: restarting the Airflow components")
            for comp in reversed(AIRFLOW_COMPONENTS):
                self.stop_pid(self.p("run", f"airflow-{comp}.pid"), f"airflow {comp}", group=True)
            self.stop_celery()
        saved.write_text(self.executor + "\n")
        if self.executor == "celery":
            self.setup_redis()
        for comp in AIRFLOW_COMPONENTS:
            pidf = self.p("run", f"airflow-{comp}.pid")
            pid = read_pid(pidf)
            if pid and pid_alive(pid):
                continue
            argv = [airflow, *comp.split()]
            if comp == "api-server":
                argv += ["--host", OPS, "--port", str(AIRFLOW_API_PORT)]
            with open(self.p("log", f"airflow-{comp}.log"), "ab") as out:
                proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                        cwd=str(home))
            pidf.write_text(str(proc.pid))
        wait_for(lambda: self.airflow_healthy(), "the Airflow api-server /api/v2/monitor/health", 120, 1)
        if self.executor == "celery":
            self.start_workers(env)

    def airflow_healthy(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://{OPS}:{AIRFLOW_API_PORT}/api/v2/monitor/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    # ------------------------------------------------------------- env & conns
    def connections(self) -> dict[str, dict]:
        s = self.secrets()
        key = str(self.p("ssh", "keys", "airflow_ed25519"))
        known = {}
        for line in self.p("ssh", "known_hosts").read_text().splitlines():
            hostport, kind, blob = line.split()
            known[hostport] = f"{kind} {blob}"

        def ssh(host: str) -> dict:
            addr, user = HOSTS[host]
            return {"conn_type": "ssh", "host": addr, "port": SSH_PORT, "login": user,
                    "extra": {"key_file": key, "no_host_key_check": False, "allow_host_key_change": False,
                              "host_key": known[f"[{addr}]:{SSH_PORT}"], "look_for_keys": False,
                              "keepalive_interval": 15, "conn_timeout": 10}}

        def pg(host: str, login: str, pw: str, schema: str, port: int = PG_PORT) -> dict:
            return {"conn_type": "postgres", "host": host, "port": port, "login": login, "password": pw, "schema": schema}

        return {
            "barman_host": ssh("barman-lab"),
            "pg_primary_ssh": ssh("pg-primary"),
            "pg_standby_ssh": ssh("pg-standby"),
            "pg_nonprod_ssh": ssh("pg-nonprod"),
            "pg_primary2_ssh": ssh("pg-primary2"),
            "pg_primary": pg(HOSTS["pg-primary"][0], "dr_admin", s["dr_admin"], "shop"),
            "pg_standby": pg(HOSTS["pg-standby"][0], "dr_admin", s["dr_admin"], "shop"),
            "pg_delayed": pg(PG_ADDRS[DELAYED], "dr_admin", s["dr_admin"], "shop", port=PG_PORTS[DELAYED]),
            "pg_delayed2": pg(PG_ADDRS[SPARE], "dr_admin", s["dr_admin"], "shop", port=PG_PORTS[SPARE]),
            "pg_nonprod": pg(HOSTS["pg-nonprod"][0], "dr_admin", s["dr_admin"], "shop"),
            "pg_primary2": pg(HOSTS["pg-primary2"][0], "dr_admin", s["dr_admin"], "shop"),
            "pgbouncer_admin": pg(HOSTS["pg-primary"][0], "pgbouncer_admin", s["pgbouncer_admin"], "pgbouncer",
                                  PGBOUNCER_PORT),
            "dr_audit": pg(OPS, "dr_audit_writer", s["dr_audit_writer"], "dr_audit"),
            # the application's own path (through PgBouncer): "app connectivity" after a PITR
            "app_shop": pg(HOSTS["pg-primary"][0], "app", s["app"], "shop", PGBOUNCER_PORT),
            # notifications (DrNotifier) go to the lab's SMTP sink
            "smtp_default": {"conn_type": "smtp", "host": OPS, "port": SMTP_PORT,
                             "extra": {"from": "barman-dr@lab.invalid", "to": ["oncall@lab.invalid"]}},
            # ... and to a Slack-style incoming webhook (the URL is a secret: it is the password)
            "dr_webhook": {"conn_type": "http", "password": f"http://{OPS}:{WEBHOOK_PORT}/services/{s['webhook_token']}",
                           "extra": {"format": "slack", "channel": "#dr-oncall"}},
            # the read-only bearer token Prometheus sends to /barman-dr/metrics (not an Airflow login)
            "dr_metrics": {"conn_type": "generic", "password": s["metrics_token"]},
            # the Airflow REST API, for run notes written by DR tasks
            "airflow_api": {"conn_type": "http", "host": OPS, "port": AIRFLOW_API_PORT, "schema": "http",
                            "login": "admin", "password": s["airflow_admin_ui"]},
        }

    def exports(self) -> dict[str, str]:
        s = self.secrets()
        home = self.p("airflow")
        env = {
            "LAB_DIR": str(self.dir),
            "BARMAN_DR_REPO": str(REPO),
            "BARMAN_DR_INVENTORY": str(self.inventory_file()),
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor" if self.executor == "celery" else "LocalExecutor",
            "LAB_EXECUTOR": self.executor,
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin,approver:op",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "simple_auth_manager_passwords.json"),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://{OPS}:{AIRFLOW_API_PORT}/execution/",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"postgresql+psycopg2://airflow:{s['airflow']}@{OPS}:{PG_PORT}/airflow",
            "AIRFLOW__API_AUTH__JWT_SECRET": s["jwt"],
            "AIRFLOW__API__BASE_URL": f"http://{OPS}:{AIRFLOW_API_PORT}",
            "AIRFLOW__API__HOST": OPS,
            "AIRFLOW__API__PORT": str(AIRFLOW_API_PORT),
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(WORKER_LOG_PORT),
            "LAB_NET": LAB_NET,
            "AIRFLOW__SCHEDULER__MIN_FILE_PROCESS_INTERVAL": "5",
            # the scheduler sleeps this long after a loop with nothing to do (default 1 s): the next
            # task of a DAG run starts on average half of it after the previous one ended. 0.25 s
            # cuts the gap between dr_pitr's tasks from ~0.5 to ~0.15 s for ~4x the idle scheduler
            # CPU (measured on the lab: 2.5% -> ~10% of a core)
            "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.25",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            # when the scheduler dies mid-run (SIGKILL, OOM, host restart), its successor finds the
            # task instances the dead one was running and resets them for another try: it looks
            # every orphaned_tasks_check_interval (default 300 s) for jobs silent for longer than
            # scheduler_health_check_threshold (30 s). A task whose worker alone died is failed (and
            # retried) after task_instance_heartbeat_timeout (default 300 s). Shorter in the lab, so
            # the crash tests converge in a minute; production may keep the defaults (docs/lab.md)
            "AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL": "15",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_THRESHOLD": "30",
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "90",
            "LAB_AIRFLOW_URL": f"http://{OPS}:{AIRFLOW_API_PORT}",
            "LAB_AIRFLOW_USER": "admin",
            "LAB_AIRFLOW_PASSWORD": s["airflow_admin_ui"],
            "LAB_APPROVER_USER": "approver",
            "LAB_APPROVER_PASSWORD": s["airflow_approver_ui"],
            "LAB_PRIMARY_DSN": f"host={HOSTS['pg-primary'][0]} port={PG_PORT} dbname=shop user=dr_admin password={s['dr_admin']}",
            "LAB_APP_DSN": f"host={HOSTS['pg-primary'][0]} port={PGBOUNCER_PORT} dbname=shop user=app password={s['app']}",
            "LAB_STANDBY_DSN": f"host={HOSTS['pg-standby'][0]} port={PG_PORT} dbname=shop user=dr_admin password={s['dr_admin']}",
            "LAB_DELAYED_DSN": (f"host={PG_ADDRS[DELAYED]} port={PG_PORTS[DELAYED]} dbname=shop user=dr_admin "
                                f"password={s['dr_admin']}"),
            "LAB_SPARE_DSN": (f"host={PG_ADDRS[SPARE]} port={PG_PORTS[SPARE]} dbname=shop user=dr_admin "
                              f"password={s['dr_admin']}"),
            "LAB_AUDIT_DSN": f"host={OPS} port={PG_PORT} dbname=dr_audit user=dr_audit_writer password={s['dr_audit_writer']}",
            "LAB_BARMAN_SERVER": BARMAN_SERVER,
            "LAB_BARMAN_SERVER2": BARMAN_SERVER2,
            "LAB_PRIMARY2_DSN": (f"host={HOSTS['pg-primary2'][0]} port={PG_PORT} dbname=shop user=dr_admin "
                                 f"password={s['dr_admin']}"),
            "LAB_BARMAN": shlex.join(["ssh", "-F", str(self.p("ssh", "ssh_config")), "barman-lab", str(self.p("bin", "barman"))]),
            "LAB_SSH_CONFIG": str(self.p("ssh", "ssh_config")),
            "LAB_MAIL_DIR": str(self.p("mail")),
            "LAB_PROMETHEUS_URL": f"http://{OPS}:{PROMETHEUS_PORT}",
        }
        if self.executor == "celery":
            env.update(self.celery_exports())
        for conn_id, conn in self.connections().items():
            env[f"AIRFLOW_CONN_{conn_id.upper()}"] = json.dumps(conn, separators=(",", ":"))
        return env

    def celery_exports(self) -> dict[str, str]:
        """CeleryExecutor settings: Redis as the broker, the ops PostgreSQL as the result backend."""
        s = self.secrets()
        return {
            # hex-only password: nothing to percent-encode in the URL
            "AIRFLOW__CELERY__BROKER_URL": f"redis://:{s['redis']}@{OPS}:{REDIS_PORT}/0",
            "AIRFLOW__CELERY__RESULT_BACKEND": f"db+postgresql+psycopg2://airflow:{s['airflow']}@{OPS}:{PG_PORT}/airflow",
            # ti.hostname names the worker (all lab workers share one machine: the FQDN would not)
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "barman_dr.routing.worker_hostname",
            # a worker SIGKILLed mid-task: its task is failed and retried this long after its last
            # heartbeat (default 300 s; the lab's worker-loss tests converge within a minute)
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "45",
            # a task nobody picks up (no worker serves its queue) fails after this (default 600 s);
            # validate_params refuses such a run first, through Celery's inspect
            "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": "300",
            # an unacknowledged task (its worker died) is redelivered after this; longer than any
            # DR copy, so a running task is never delivered twice (apache/airflow#58441); the
            # heartbeat timeout above is what retries a lost task
            "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT": "21600",
            "LAB_REDIS_URL": f"redis://{OPS}:{REDIS_PORT}/0",
        }

    # ------------------------------------------------------------------ celery
    def celery_workers(self) -> dict[str, tuple[list[str], int]]:
        """{worker name: (queues, concurrency)} from the inventory's `workers:` (docker-compose.yaml reads the same)."""
        sys.path.insert(0, str(REPO / "plugins"))
        from barman_dr.fleet import queue_by_pool, worker_specs

        # no `workers:` section: one worker serving every queue a task may be sent to
        every = sorted({"default", *queue_by_pool(self.inventory_file()).values()})
        return worker_specs(self.inventory_file()) or {"worker-a": (every, 8)}

    def setup_redis(self) -> None:
        """A private redis-server for this lab: loopback ops address, a password, no persistence."""
        d = self.p("redis")
        d.mkdir(parents=True, exist_ok=True)
        conf = d / "redis.conf"
        conf.touch(mode=0o600)
        os.chmod(conf, 0o600)  # before the password is written
        conf.write_text("\n".join([
            "# the lab's Celery broker (generated by labctl.py); the password stays out of argv",
            f"bind {OPS}", f"port {REDIS_PORT}", "protected-mode yes", f"requirepass {self.secrets()['redis']}",
            "daemonize no", f"dir {d}", f"logfile {self.p('log', 'redis.log')}", 'save ""', "appendonly no", "",
        ]))
        os.chmod(conf, 0o600)
        pidf = self.p("run", "redis.pid")
        pid = read_pid(pidf)
        if pid and pid_alive(pid):
            return
        proc = subprocess.Popen(["redis-server", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True, cwd=str(d))
        pidf.write_text(str(proc.pid))
        wait_for(lambda: self.redis_ping(), f"redis-server on {OPS}:{REDIS_PORT}", 30)

    def redis_ping(self) -> bool:
        env = {**os.environ, "REDISCLI_AUTH": self.secrets()["redis"]}
        r = subprocess.run(["redis-cli", "-h", OPS, "-p", str(REDIS_PORT), "ping"], capture_output=True, text=True,
                           env=env, check=False, timeout=10)
        return r.stdout.strip() == "PONG"

    def start_workers(self, env: dict[str, str]) -> None:
        """`airflow celery worker` per inventory worker, each in its own session with its own pid file."""
        airflow = str(self.venv / "bin" / "airflow")
        home = Path(env["AIRFLOW_HOME"])
        for name, (queues, conc) in self.celery_workers().items():
            pidf = self.p("run", f"airflow-celery-{name}.pid")
            pid = read_pid(pidf)
            if pid and pid_alive(pid):
                continue
            wenv = {**env, "BARMAN_DR_WORKER_HOSTNAME": name}
            # every lab worker shares one machine and one log folder: none serves logs (port clash);
            # the api-server reads the task logs from the shared folder
            argv = [airflow, "celery", "worker", "-q", ",".join(queues), "-c", str(conc), "-H", f"{name}@{LAB_NET}",
                    "--skip-serve-logs", "--without-mingle", "--without-gossip"]
            with open(self.p("log", f"airflow-celery-{name}.log"), "ab") as out:
                proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=wenv, start_new_session=True,
                                        cwd=str(home))
            pidf.write_text(str(proc.pid))
        want = set(self.celery_workers())
        wait_for(lambda: want <= set(self.celery_queues(env)), f"celery workers {sorted(want)} answering", 120, 2)

    def celery_queues(self, env: dict[str, str] | None = None) -> dict[str, list[str]]:
        """{worker name: [queues]} of the workers answering Celery's inspect now (barman_dr.routing)."""
        env = env or self.airflow_env()
        r = subprocess.run([str(self.venv / "bin" / "python"), "-c",
                            "import json; from barman_dr.routing import served_queues; "
                            "print(json.dumps(served_queues(timeout=2.0)))"],
                           capture_output=True, text=True, env={**env, "PYTHONPATH": str(REPO / "plugins")},
                           check=False, timeout=60)
        try:
            return json.loads(r.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return {}

    def stop_celery(self) -> None:
        for pidf in sorted(self.p("run").glob("airflow-celery-*.pid")):
            name = pidf.stem.removeprefix("airflow-celery-")
            pid = read_pid(pidf)
            if pid and pid_alive(pid):
                # SIGTERM to the worker alone is Celery's warm shutdown (running tasks finish); then the
                # whole session (pool, supervisors, tasks) goes with SIGKILL after 30 s
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + 30
                while pid_alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.2)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                log(f"stopped airflow celery worker {name} (pid {pid})")
            pidf.unlink(missing_ok=True)
        self.stop_pid(self.p("run", "redis.pid"), "redis-server", group=True)

    def write_env(self) -> None:
        env = self.exports()
        lines = ["# barman-dr lab environment: `source` this file (generated by include/lab/labctl.py)"]
        lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
        lines.append(f"export PATH={shlex.quote(str(self.venv / 'bin'))}:\"$PATH\"")
        path = self.p("env.sh")
        path.write_text("\n".join(lines) + "\n")
        os.chmod(path, 0o600)

    # ----------------------------------------------------------------- status
    def status_rows(self) -> list[tuple[str, str, str, str]]:
        rows = []

        def pgver() -> str:
            return run([str(PG_BIN / "postgres"), "--version"]).stdout.split()[2]

        for name, (addr, _u) in HOSTS.items():
            pid = read_pid(self.p("run", f"sshd-{name}.pid"))
            rows.append((f"sshd {name}", f"{addr}:{SSH_PORT}", "up" if pid and pid_alive(pid) else "down",
                         run(["ssh", "-V"]).stderr.split(",")[0]))
        for name, addr in (("ops", OPS), ("pg-primary", HOSTS["pg-primary"][0]), ("pg-standby", HOSTS["pg-standby"][0]),
                           (DELAYED, PG_ADDRS[DELAYED]), (SPARE, PG_ADDRS[SPARE]), ("pg-nonprod", HOSTS["pg-nonprod"][0]),
                           ("pg-primary2", HOSTS["pg-primary2"][0])):
            if not self.p("pg", name, "data").exists() and name in ("pg-nonprod", SPARE):
                idle = "idle (drill target)" if name == "pg-nonprod" else "spare (built by dr_pitr when pg-delayed is promoted)"
                rows.append((f"postgresql {name}", f"{addr}:{PG_PORTS.get(name, PG_PORT)}", idle, f"PostgreSQL {pgver()}"))
                continue
            state = "down"
            if self.pg_running(name):
                state = "up"
                if name in ("pg-standby", DELAYED, SPARE) and (self.p("pg", name, "data", "standby.signal")).exists():
                    state = "up (delayed standby)" if name in (DELAYED, SPARE) else "up (standby)"
            rows.append((f"postgresql {name}", f"{addr}:{PG_PORTS.get(name, PG_PORT)}", state, f"PostgreSQL {pgver()}"))
        pid = read_pid(self.p("run", "pgbouncer.pid"))
        ver = run(["pgbouncer", "--version"], check=False).stdout.splitlines()[0] if shutil.which("pgbouncer") else "?"
        rows.append(("pgbouncer", f"{HOSTS['pg-primary'][0]}:{PGBOUNCER_PORT}", "up" if pid and pid_alive(pid) else "down", ver))
        pid = read_pid(self.p("run", "barman-cron.pid"))
        bver = run([str(BARMAN_VENV / "bin" / "barman"), "--version"], check=False).stdout.split()[:1]
        rows.append(("barman cron loop", HOSTS["barman-lab"][0], "up" if pid and pid_alive(pid) else "down",
                     f"Barman {bver[0] if bver else '?'}"))
        pid = read_pid(self.p("run", "prometheus.pid"))
        rows.append(("prometheus (scrapes /barman-dr/metrics)", f"{OPS}:{PROMETHEUS_PORT}",
                     "up" if pid and pid_alive(pid) else "down", "$LAB_PROMETHEUS_URL"))
        pid = read_pid(self.p("run", "smtp-sink.pid"))
        rows.append(("smtp + webhook sink (notifications)", f"{OPS}:{SMTP_PORT},{WEBHOOK_PORT}",
                     "up" if pid and pid_alive(pid) else "down", "$LAB_DIR/mail"))
        for server in BARMAN_SERVERS:
            rows.append((f"barman receive-wal {server}", HOSTS["barman-lab"][0],
                         "up" if self.p("bin", "barman").exists() and self.receive_wal_running(server) else "down", ""))
        aver = "?"
        if (self.venv / "bin" / "airflow").exists():
            aver = run([str(self.venv / "bin" / "python"), "-c", "import airflow; print(airflow.__version__)"],
                       check=False).stdout.strip()
        for comp in AIRFLOW_COMPONENTS:
            pid = read_pid(self.p("run", f"airflow-{comp}.pid"))
            addr = f"{OPS}:{AIRFLOW_API_PORT}" if comp == "api-server" else OPS
            rows.append((f"airflow {comp}", addr, "up" if pid and pid_alive(pid) else "down", f"Airflow {aver}"))
        pid = read_pid(self.p("run", "redis.pid"))
        if pid or self.executor == "celery":
            rows.append(("redis (celery broker)", f"{OPS}:{REDIS_PORT}", "up" if pid and pid_alive(pid) else "down", ""))
        for pidf in sorted(self.p("run").glob("airflow-celery-*.pid")):
            pid = read_pid(pidf)
            rows.append((f"airflow celery {pidf.stem.removeprefix('airflow-celery-')}", OPS,
                         "up" if pid and pid_alive(pid) else "down", f"Airflow {aver}"))
        return rows

    def print_status(self) -> None:
        rows = [("component", "address", "state", "version"), *self.status_rows()]
        if self.pg_running("ops"):
            for server in BARMAN_SERVERS:
                owners = self.dr_owners(server)
                rows.append((f"dr ownership {server}", "", "owned by a DR run" if owners else "free",
                             "; ".join(owners)[:120]))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        for i, r in enumerate(rows):
            print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)))
            if i == 0:
                print("  ".join("-" * w for w in widths))
        print(f"\nLAB_DIR={self.dir}\nsource {self.p('env.sh')}")

    # --------------------------------------------------------------- up/down
    def setup_smtp_sink(self) -> None:
        """The on-call mailbox stand-in: every notification lands in $LAB_DIR/mail/*.eml."""
        pidf = self.p("run", "smtp-sink.pid")
        pid = read_pid(pidf)
        if pid and pid_alive(pid):
            if port_open(OPS, WEBHOOK_PORT):
                return
            self.stop_pid(pidf, "smtp sink (no webhook port: an older lab)", group=True)
        with open(self.p("log", "smtp-sink.log"), "ab") as out:
            proc = subprocess.Popen([str(self.venv / "bin" / "python"), str(REPO / "include" / "lab" / "smtp_sink.py"),
                                     OPS, str(SMTP_PORT), str(self.p("mail")), str(WEBHOOK_PORT)],
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        pidf.write_text(str(proc.pid))
        wait_for(lambda: port_open(OPS, SMTP_PORT) and port_open(OPS, WEBHOOK_PORT), "the SMTP/webhook sink", 15)

    def up(self, airflow: bool) -> None:
        if not (self.venv / "bin" / "python").exists():
            raise SystemExit("[lab] the venvs are missing: run `make install` (include/lab/install.sh) first")
        self.ensure_dirs()
        self.secrets()
        self.pgpass()
        self.setup_ssh()
        self.setup_ops()
        self.claim_owned()
        self.setup_primary()
        self.setup_standby()
        self.write_wal_restore()
        self.setup_delayed_standby()
        self.setup_primary2()
        self.setup_pgbouncer()
        self.setup_barman()
        self.setup_smtp_sink()
        self.write_env()
        for server in BARMAN_SERVERS:
            if not self.leave_alone(f"barman:{server}"):
                self.ensure_backups(server)
        self.setup_airflow(start=airflow)
        self.setup_prometheus()
        self.write_env()
        self.print_status()

    def setup_prometheus(self) -> None:
        """Debian's Prometheus scraping /barman-dr/metrics with the read-only token; the shipped alert rules loaded."""
        if not shutil.which("prometheus"):
            log("prometheus is not installed (make install): no metrics scraping in this lab")
            return
        d = self.p("prometheus")
        (d / "data").mkdir(parents=True, exist_ok=True)
        token = d / "metrics-token"
        token.write_text(self.secrets()["metrics_token"])
        os.chmod(token, 0o600)
        (d / "prometheus.yml").write_text("\n".join([
            "# the lab's Prometheus (generated by labctl.py): scrapes barman-dr's DR metrics",
            "global:",
            "  scrape_interval: 5s",
            "  evaluation_interval: 5s",
            "rule_files:",
            f"  - {REPO / 'deploy' / 'prometheus' / 'barman-dr.rules.yml'}",
            "scrape_configs:",
            "  - job_name: barman-dr",
            "    metrics_path: /barman-dr/metrics",
            "    authorization:",
            "      type: Bearer",
            f"      credentials_file: {token}",
            "    static_configs:",
            f"      - targets: ['{OPS}:{AIRFLOW_API_PORT}']",
            "",
        ]))
        pidf = self.p("run", "prometheus.pid")
        pid = read_pid(pidf)
        if pid and pid_alive(pid):
            os.kill(pid, signal.SIGHUP)  # reload the configuration and the rules
            return
        with open(self.p("log", "prometheus.log"), "ab") as out:
            proc = subprocess.Popen(["prometheus", f"--config.file={d / 'prometheus.yml'}",
                                     f"--storage.tsdb.path={d / 'data'}", "--storage.tsdb.retention.time=2d",
                                     f"--web.listen-address={OPS}:{PROMETHEUS_PORT}"],
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=str(d))
        pidf.write_text(str(proc.pid))
        wait_for(lambda: port_open(OPS, PROMETHEUS_PORT), "prometheus", 30)

    def stop_pid(self, pidf: Path, what: str, group: bool = False, timeout: float = 20) -> None:
        pid = read_pid(pidf)
        if not pid or not pid_alive(pid):
            pidf.unlink(missing_ok=True)
            return
        try:
            if group:
                os.killpg(pid, signal.SIGTERM)
            else:
                os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if pid_alive(pid):
            log(f"{what} did not stop on SIGTERM: SIGKILL")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL) if group else os.kill(pid, signal.SIGKILL)
        pidf.unlink(missing_ok=True)
        log(f"stopped {what} (pid {pid})")

    def down(self) -> None:
        if not self.dir.exists():
            log(f"nothing to stop: {self.dir} does not exist")
            return
        for comp in reversed(AIRFLOW_COMPONENTS):
            self.stop_pid(self.p("run", f"airflow-{comp}.pid"), f"airflow {comp}", group=True)
        self.stop_celery()
        self.stop_pid(self.p("run", "barman-cron.pid"), "barman cron loop", group=True)
        self.stop_pid(self.p("run", "smtp-sink.pid"), "smtp sink", group=True)
        self.stop_pid(self.p("run", "prometheus.pid"), "prometheus", group=True)
        if self.p("bin", "barman").exists():
            for server in BARMAN_SERVERS:
                self.barman(["receive-wal", "--stop", server], check=False)
        # what bench/size_scaling.py may have left running: its Barman's receive-wal, its cluster
        bench_barman = self.p("bench", "bin", "barman")
        if bench_barman.exists():
            run([str(bench_barman), "receive-wal", "--stop", "pg-bench"], user="barman", check=False)
        bench_pg = self.p("bench", "pg-bench", "data")
        if (bench_pg / "postmaster.pid").exists():
            run([str(PG_BIN / "pg_ctl"), "-D", str(bench_pg), "-m", "fast", "-w", "-t", "60", "stop"], user="postgres",
                check=False)
            log("stopped postgresql pg-bench (benchmark cluster)")
        self.stop_pid(self.p("run", "pgbouncer.pid"), "pgbouncer")
        for name in ("pg-nonprod", SPARE, DELAYED, "pg-standby", "pg-primary", "pg-primary2", "ops"):
            if self.pg_running(name):
                run([str(PG_BIN / "pg_ctl"), "-D", str(self.p("pg", name, "data")), "-m", "fast", "-w", "-t", "60",
                     "stop"], user="postgres", check=False)
                log(f"stopped postgresql {name}")
        for name in SMALL_FS_MIB:
            # a loop-mounted image keeps its data: unmount it (up mounts it again); a tmpfs would lose it: keep it
            mnt = self.p("pg", name)
            if os.path.ismount(mnt) and self.p("disks", f"{name}.img").exists() and not self.pg_running(name):
                src = run(["findmnt", "-n", "-o", "FSTYPE", str(mnt)], check=False).stdout.strip()
                if src == "ext4" and run(["umount", str(mnt)], check=False).returncode == 0:
                    log(f"unmounted the small filesystem of {name}")
        for name in HOSTS:
            self.stop_pid(self.p("run", f"sshd-{name}.pid"), f"sshd {name}")
        # ssh ControlMaster processes of the barman user (multiplexed restore logins)
        for sock in self.p("run", "barman-lab").glob("cm-*"):
            run(["ssh", "-F", str(self.p("ssh", "barman_ssh_config")), "-O", "exit", "-S", str(sock), "x"],
                user="barman", check=False)
        self.print_status()


def resolve_lab_dir() -> Path:
    env = os.environ.get("LAB_DIR")
    return Path(env).resolve() if env else REPO / ".lab"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["up", "down", "status", "env", "restart-airflow", "workers", "failback",
                                       "prune-set-aside"])
    ap.add_argument("--no-airflow", action="store_true", help="do not start the Airflow components")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("[lab] run as root (PostgreSQL runs as postgres, Barman as barman)")
    lab = Lab(resolve_lab_dir())
    if args.action == "up":
        lab.up(airflow=not args.no_airflow)
    elif args.action == "down":
        lab.down()
    elif args.action == "status":
        lab.print_status()
    elif args.action == "env":
        lab.write_env()
        print(lab.p("env.sh"))
    elif args.action == "restart-airflow":
        lab.restart_airflow()
    elif args.action == "prune-set-aside":  # between test modules: the forensic copies DR runs kept
        lab.prune_set_aside()
    elif args.action == "failback":  # after dr_pitr restore_to: pg-standby (tests, demos)
        lab.failback()
    elif args.action == "workers":  # (re)start the Celery workers that are not running (a lost worker's restart)
        if lab.executor != "celery":
            sys.exit("[lab] `workers` needs a Celery lab (LAB_EXECUTOR=celery)")
        lab.start_workers(lab.airflow_env())


if __name__ == "__main__":
    main()
