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
import signal
import subprocess
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
