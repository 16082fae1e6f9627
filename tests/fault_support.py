"""Real faults for the fault suites: an SSH outage, a slow restore, WAL taken out of Barman's archive.

Nothing here mocks a component: sshd processes are really killed and restarted, Barman's
own configuration throttles the copy, WAL files are really moved out of Barman's archive
(and put back afterwards so later suites find a whole archive).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

LAB = Path(os.environ.get("LAB_DIR", "."))


def barman(*args: str) -> str:
    return subprocess.run([*shlex.split(os.environ["LAB_BARMAN"]), *args], check=True, capture_output=True,
                          text=True, timeout=300).stdout


def _descendants(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False).stdout.split()
    kids = [int(p) for p in out]
    return kids + [d for k in kids for d in _descendants(k)]


def kill_sshd(host: str) -> int:
    """SIGKILL a lab host's sshd: the listener and every session it serves (connections drop)."""
    pid = int((LAB / "run" / f"sshd-{host}.pid").read_text())
    victims = [*_descendants(pid), pid]
    for p in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    return len(victims)


def start_sshd(host: str) -> None:
    subprocess.run(["/usr/sbin/sshd", "-f", str(LAB / "ssh" / "hosts" / host / "sshd_config"),
                    "-E", str(LAB / "log" / f"sshd-{host}.log")], check=True)


@contextlib.contextmanager
def barman_bandwidth_limit(kbps: int, server: str = "pg-primary") -> Iterator[None]:
    """Throttle Barman's copies for `server` (its own `bandwidth_limit`), so a restore lasts long enough."""
    conf = LAB / "barman" / "barman.d" / f"{server}.conf"
    original = conf.read_text()
    conf.write_text(original.rstrip("\n") + f"\nbandwidth_limit = {kbps}\n")
    try:
        yield
    finally:
        conf.write_text(original)


def unthrottle(server: str = "pg-primary") -> None:
    conf = LAB / "barman" / "barman.d" / f"{server}.conf"
    conf.write_text("".join(line for line in conf.read_text().splitlines(keepends=True)
                            if not line.startswith("bandwidth_limit")))


def wait_for(predicate, what: str, timeout: float = 120, every: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(every)


class SshOutageDuringRestore:
    """A `pre_execute` hook for `barman_restore`: once the copy is under way, both sshds die for a while.

    The barman host's sshd drops the task's own session (the task fails while polling);
    the target host's sshd drops rsync's session (the restore job itself fails, leaving a
    partial destination). Only the first try is hit; the retry meets a healthy network.
    """

    def __init__(self, destination: str, hosts: tuple[str, ...] = ("barman-lab", "pg-primary"),
                 outage_s: float = 4.0) -> None:
        #: a path, or a glob pattern (the staging directory's name carries the run's tag)
        self.destination = destination
        self.hosts = hosts
        self.outage_s = outage_s
        self.fired = threading.Event()
        self.killed: dict[str, int] = {}
        self.error: BaseException | None = None

    def __call__(self, context) -> None:
        if self.fired.is_set():
            return
        self.fired.set()
        threading.Thread(target=self._outage, daemon=True).start()

    def _outage(self) -> None:
        try:
            def copying() -> bool:
                return any(Path(p, "base").is_dir() for p in glob.glob(self.destination))

            wait_for(copying, "the restore to start copying", 300)
            time.sleep(1.0)
            for h in self.hosts:
                self.killed[h] = kill_sshd(h)
            time.sleep(self.outage_s)
            unthrottle()
            for h in self.hosts:
                start_sshd(h)
        except BaseException as exc:
            self.error = exc


@contextlib.contextmanager
def wal_taken_out_of_the_archive(server: str = "pg-primary") -> Iterator[dict[str, list[str]]]:
    """Yields a dict; calling `take(after_segment)` inside moves every later WAL segment out of Barman's archive.

    The archive is rebuilt (`barman rebuild-xlogdb`) so Barman really no longer knows them; on
    exit they are put back and the catalogue rebuilt again.
    """
    wals = LAB / "barman" / "home" / server / "wals"
    stash = LAB / "fault-stash" / f"wals-{int(time.time())}"
    state: dict[str, list[str]] = {"moved": []}

    def take(after_segment: str) -> list[str]:
        stash.mkdir(parents=True, exist_ok=True)
        for f in sorted(wals.glob("*/*")):
            name = f.name
            if len(name) == 24 and all(c in "0123456789ABCDEF" for c in name) and name[8:] > after_segment[8:]:
                f.rename(stash / name)
                state["moved"].append(str(f))
        barman("rebuild-xlogdb", server)
        return state["moved"]

    state["take"] = take  # type: ignore[assignment]
    try:
        yield state
    finally:
        for original in state["moved"]:
            src = stash / Path(original).name
            if src.exists():
                src.rename(original)
        subprocess.run(["chown", "-R", "barman:barman", str(wals)], check=False)
        barman("rebuild-xlogdb", server)


# ------------------------------------------------------------------ the orchestrator itself fails (issue 18)

REPO = Path(__file__).resolve().parents[1]


def session_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[3])


def kill_airflow(component: str = "scheduler") -> list[int]:
    """SIGKILL an Airflow component and everything it started (its session): for the scheduler on
    LocalExecutor that is every worker, every task supervisor and every task process, as when the
    Airflow host runs out of memory. Remote jobs (barman restore on the barman host) are not in it:
    they run under the lab hosts' sshd, as they would on other machines."""
    leader = int((LAB / "run" / f"airflow-{component}.pid").read_text().split()[0])
    sid = session_of(leader)
    victims = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if session_of(int(entry.name)) == sid:
                victims.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return victims


def kill_celery_worker(name: str) -> list[int]:
    """SIGKILL a Celery worker as if its machine died: its session (the worker, its pool, the task
    supervisors) and every process it started, whatever their session. Remote jobs on the barman
    host survive (they run under that host's sshd)."""
    leader = int((LAB / "run" / f"airflow-celery-{name}.pid").read_text().split()[0])
    victims = set(_descendants(leader)) | {leader}
    sid = session_of(leader)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if session_of(int(entry.name)) == sid:
                    victims.add(int(entry.name))
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return sorted(victims)


def restart_celery_workers() -> subprocess.CompletedProcess:
    """What a supervisor (systemd) does for a lost worker: start the inventory's workers that are not running."""
    return subprocess.run([sys.executable, str(REPO / "include" / "lab" / "labctl.py"), "workers"], capture_output=True,
                          text=True, timeout=300, check=False, env=dict(os.environ))


def make_lab_up(timeout: float = 900) -> subprocess.CompletedProcess:
    """Bring the lab back the way an operator would after a crash: `make lab-up` (idempotent)."""
    return subprocess.run(["make", "-s", "-C", str(REPO), "lab-up"], capture_output=True, text=True,
                          timeout=timeout, check=False, env=dict(os.environ))


def postmaster_pid(data_directory: Path) -> int | None:
    try:
        pid = int((data_directory / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    return pid


class KillPostmasterOnStart:
    """A `pre_execute` hook: on the first try only, SIGKILL the postmaster that starts on `pattern` (a glob).

    The moment its pid file appears, recovery is under way (the startup process replays WAL
    first): the kill lands during the replay, as an OOM killer or a crash would.
    """

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.fired = threading.Event()
        self.killed: list[int] = []
        self.error: BaseException | None = None

    def __call__(self, context) -> None:
        if self.fired.is_set():
            return
        self.fired.set()
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        try:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                for d in glob.glob(self.pattern):
                    pid = postmaster_pid(Path(d))
                    if pid:
                        os.kill(pid, signal.SIGKILL)
                        self.killed.append(pid)
                        return
                time.sleep(0.02)
            raise TimeoutError(f"no postmaster started on {self.pattern}")
        except BaseException as exc:
            self.error = exc


class FillWhenStaging:
    """A `pre_execute` hook for stage_restore: once the staging copy appears on `mount`, another writer
    fills that filesystem, leaving `leave_bytes` free (a real file, fallocate'd)."""

    def __init__(self, mount: Path, leave_bytes: int = 32 * 1024 * 1024) -> None:
        self.mount, self.leave_bytes = mount, leave_bytes
        self.filler = mount / "another-writer.fill"
        self.fired = threading.Event()
        self.filled: int | None = None
        self.error: BaseException | None = None

    def __call__(self, context) -> None:
        if self.fired.is_set():
            return
        self.fired.set()
        threading.Thread(target=self._fill, daemon=True).start()

    def _fill(self) -> None:
        try:
            wait_for(lambda: any(Path(p, "base").is_dir() for p in glob.glob(str(self.mount / "data.staged-*"))),
                     "the staging copy to start", 300, 0.05)
            st = os.statvfs(self.mount)
            size = st.f_bavail * st.f_frsize - self.leave_bytes
            subprocess.run(["fallocate", "-l", str(size), str(self.filler)], check=True)
            self.filled = size
        except BaseException as exc:
            self.error = exc

    def remove(self) -> None:
        self.filler.unlink(missing_ok=True)


@contextlib.contextmanager
def orphan_postmaster(name: str = "data.staged-0rphan00000") -> Iterator[tuple[str, int]]:
    """A real postmaster on a staging-named directory no run recorded (a crashed run's, as far as anyone knows).

    A tiny cluster (initdb) next to pg-primary's data directory, on a private socket, no TCP.
    Stopped and removed on exit.
    """
    path = LAB / "pg" / "pg-primary" / name
    sock = LAB / "run" / "orphan"
    sock.mkdir(exist_ok=True)
    shutil.chown(sock, "postgres", "postgres")
    pg = "/usr/lib/postgresql/15/bin"
    as_pg = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*as_pg, f"{pg}/initdb", "-D", str(path), "-U", "postgres", "--auth-local=peer"], check=True,
                   capture_output=True)
    subprocess.run([*as_pg, f"{pg}/pg_ctl", "start", "-w", "-D", str(path), "-l", str(sock / "log"), "-o",
                    f"-c listen_addresses= -c unix_socket_directories={sock} -c port=5439"], check=True,
                   capture_output=True)
    try:
        yield str(path), int((path / "postmaster.pid").read_text().split()[0])
    finally:
        subprocess.run([*as_pg, f"{pg}/pg_ctl", "stop", "-D", str(path), "-m", "immediate", "-w"], check=False,
                       capture_output=True)
        shutil.rmtree(path, ignore_errors=True)


def verification_report(server: str) -> dict:
    """Run dr_daily_verification in-process and return `server`'s report."""
    from tests.pitr_support import run_dag, sql

    state, run_id, _ = run_dag("dr_daily_verification", {})
    rows = sql("LAB_AUDIT_DSN", "SELECT details::text FROM audit.events WHERE run_id = %s AND action = 'verify_report'"
                                " AND server = %s ORDER BY event_id DESC LIMIT 1", (run_id, server))
    assert rows, f"no verification report of {server} (run {state})"
    import json

    return json.loads(rows[0][0])
