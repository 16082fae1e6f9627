"""DbHostHook: PostgreSQL service control on a database host, over SSH as `postgres`.

What a DBA would do by hand on the host during a PITR, as argv lists: status, fast stop,
start with the host's own settings, wait until it accepts connections, wait until
recovery has ended (promotion), move a data directory aside (never delete it), read
`pg_controldata`, read the server log tail.

Host-specific settings (listen address, port, socket directory, cluster name) are passed
on the `pg_ctl -o` command line from the inventory rather than read from the data
directory: a restored data directory carries the *source* server's configuration, and
must not start listening on the source's address.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import time
from functools import cached_property
from typing import Any

from airflow.sdk import BaseHook

from barman_dr.exceptions import BarmanDrError
from barman_dr.hooks.remote import RemoteHost, sh_argv
from barman_dr.inventory import DbHost, Instance
from barman_dr.models import ControlData, utc_stamp

MOVE_TAG_RE = re.compile(r"^[A-Za-z0-9._-]{1,80}\Z")

# Refuse to move a directory a running postmaster uses; mv (same filesystem: a rename) then
# prints the new path. Idempotent: when the source is gone and a directory with this tag
# was already moved aside, report that one instead of failing.
_MOVE_ASIDE = r"""
set -eu
src="$1"; tag="$2"; stamp="$3"; pg_ctl="$4"
existing=""
for d in "$src".pre-*-"$tag"; do [ -d "$d" ] && existing="$d"; done
if [ ! -e "$src" ]; then
  if [ -n "$existing" ]; then echo "already $existing"; exit 0; fi
  echo "missing"; exit 0
fi
if "$pg_ctl" status -D "$src" >/dev/null 2>&1; then echo "PostgreSQL is running on $src: stop it first" >&2; exit 3; fi
dest="$src.pre-$stamp-$tag"
mv -- "$src" "$dest"
echo "moved $dest"
"""

# Put a moved-aside directory back (rollback). The current directory, if any, is itself
# moved aside (never deleted) under the given tag.
_MOVE_BACK = r"""
set -eu
src="$1"; aside="$2"; tag="$3"; stamp="$4"; pg_ctl="$5"
[ -d "$aside" ] || { echo "no such directory: $aside" >&2; exit 4; }
if [ -e "$src" ]; then
  if "$pg_ctl" status -D "$src" >/dev/null 2>&1; then echo "PostgreSQL is running on $src: stop it first" >&2; exit 3; fi
  mv -- "$src" "$src.failed-$stamp-$tag"
  echo "set-aside $src.failed-$stamp-$tag"
fi
mv -- "$aside" "$src"
echo "restored $src"
"""

# Staged restore, step 2 (inside the downtime window, after the live directory was moved
# aside): rename the staging directory into the data directory's place. A rename (same
# parent directory, so the same filesystem): instant, atomic. The staging directory must
# still be the very directory the staging restore produced (device:inode recorded then);
# a retry after a rename that succeeded finds it in place and reports "already".
_SWAP_IN = r"""
set -eu
staged="$1"; dest="$2"; ident="$3"; pg_ctl="$4"
if [ -e "$dest" ] || [ -L "$dest" ]; then
  if [ ! -e "$staged" ] && [ "$(stat -c %d:%i -- "$dest")" = "$ident" ]; then echo "already $dest"; exit 0; fi
  echo "$dest exists and is not this run's staged restore: refusing to rename over it" >&2; exit 3
fi
[ -d "$staged" ] && [ ! -L "$staged" ] || { echo "the staged restore $staged is missing" >&2; exit 4; }
[ "$(stat -c %d:%i -- "$staged")" = "$ident" ] || {
  echo "$staged is not the directory the staging restore produced (device:inode changed)" >&2; exit 5; }
[ "$(dirname -- "$staged")" = "$(dirname -- "$dest")" ] || { echo "$staged is not next to $dest" >&2; exit 6; }
if "$pg_ctl" status -D "$staged" >/dev/null 2>&1; then echo "PostgreSQL is running on $staged" >&2; exit 3; fi
mv -T -- "$staged" "$dest"
echo "renamed $dest"
"""

# Remove a run's own staging directories (a failed attempt's partial copy: not live data,
# and as large as the database, so it is deleted rather than kept). Only paths of the
# exact shape `<data_dir>.staged-<tag>`, `<that>-wal` and `<that>-run` are accepted.
_REMOVE_STAGING = r"""
set -eu
data="$1"; staged="$2"; wal="$3"; pg_ctl="$4"
case "$staged" in "$data".staged-?*) ;; *) echo "refusing: $staged is not a staging directory of $data" >&2; exit 3;; esac
[ "$wal" = "$staged-wal" ] || { echo "refusing: $wal is not the WAL directory of $staged" >&2; exit 3; }
if [ -d "$staged" ] && "$pg_ctl" status -D "$staged" >/dev/null 2>&1; then
  echo "refusing: PostgreSQL is running on $staged" >&2; exit 3; fi
removed=""
for d in "$staged" "$wal" "$staged-run"; do if [ -e "$d" ] || [ -L "$d" ]; then rm -rf -- "$d"; removed="$removed $d"; fi; done
echo "removed$removed"
"""

# Undo `barman restore`'s `archive_command = false` in the restored config files. Barman keeps
# the original as `#BARMAN#<line>` and writes `archive_command = false` right after it, so
# the restored copy cannot push a new timeline into the archive of the server it came from.
# After a PITR the restored server *is* that server: it must archive again (or the next PITR
# lacks WAL). Only that exact pair is rewritten; prints the files changed.
_UNMANGLE_ARCHIVE = r"""
set -eu
for f in "$@"; do
  [ -f "$f" ] || continue
  grep -q '^#BARMAN#[[:space:]]*archive_command' "$f" || continue
  tmp="$f.barman-dr-tmp"
  awk '
    pending != "" {
      if ($0 ~ /^[[:space:]]*archive_command[[:space:]]*=[[:space:]]*false[[:space:]]*$/) { print pending; pending = ""; next }
      print "#BARMAN#" pending; pending = ""
    }
    /^#BARMAN#[[:space:]]*archive_command([[:space:]]|=)/ { pending = substr($0, 9); next }
    { print }
    END { if (pending != "") print "#BARMAN#" pending }
  ' "$f" > "$tmp"
  if cmp -s -- "$f" "$tmp"; then rm -f -- "$tmp"; continue; fi
  chmod --reference="$f" "$tmp"
  mv -- "$tmp" "$f"
  echo "$f"
done
"""

# Wait on the host until PostgreSQL accepts connections ($5 = ready) or, with $5 = promoted,
# until recovery has ended (pg_is_in_recovery() = f); stop early when the postmaster is gone.
# Checks every $6 s for at most $7 s; prints ready/promoted, exited or waiting. One SSH exec
# per window instead of two or three per client-side poll.
_WAIT_PG = r"""
bin="$1"; data="$2"; sock="$3"; port="$4"; what="$5"; step="$6"; window="$7"
end=$(( $(date +%s) + window ))
while :; do
  if "$bin/pg_isready" -q -h "$sock" -p "$port"; then
    if [ "$what" = ready ]; then echo ready; exit 0; fi
    r=$("$bin/psql" -X -At -h "$sock" -p "$port" -d postgres -c "SELECT pg_is_in_recovery()" 2>/dev/null || true)
    if [ "$r" = f ]; then echo promoted; exit 0; fi
  fi
  if ! "$bin/pg_ctl" status -D "$data" >/dev/null 2>&1; then echo exited; exit 0; fi
  if [ "$(date +%s)" -ge "$end" ]; then echo waiting; exit 0; fi
  sleep "$step"
done
"""

#: seconds one `_WAIT_PG` exec may wait on the host; checks every 0.1 s for the first FAST_WAIT_S
WAIT_WINDOW_S = 15
FAST_WAIT_S = 10.0


def staging_paths(data_directory: str, tag: str) -> tuple[str, str]:
    """A run's staging directory (a sibling of the data directory: same filesystem) and its WAL directory.

    The WAL directory is outside the staging directory on purpose: `barman restore` writes
    its absolute path into `restore_command` / `recovery_end_command`, and it must stay valid
    after the staging directory is renamed to the data directory.
    """
    if not MOVE_TAG_RE.match(tag):
        raise ValueError(f"invalid staging tag {tag!r}")
    base = data_directory.rstrip("/")
    return f"{base}.staged-{tag}", f"{base}.staged-{tag}-wal"


def staged_instance(instance: Instance, staged: str) -> Instance:
    """The staging copy as an instance of its own: a private socket directory, no TCP, its own log.

    Both live in `<staged>-run`, outside the staging directory and outside Barman's WAL
    staging directory (which `recovery_end_command` deletes at promotion). The port is the
    instance's own: the socket file is in another directory, and nothing listens on TCP.
    """
    run = f"{staged.rstrip('/')}-run"
    return dataclasses.replace(instance, name=f"{instance.name}-staged", data_directory=staged,
                               socket_directory=run, log_file=f"{run}/postgresql.log")


def staged_start_options(staged: Instance, shared_buffers: str) -> str:
    """A staging copy replays its WAL next to the live server, so it must not act like it.

    - reachable by nobody: no TCP (`listen_addresses` empty), a private socket;
    - `data_directory` pinned (a restored Debian-style postgresql.conf names the *live*
      directory) and an external pid file of its own (a restored one would overwrite, then
      remove, the live server's);
    - no work of its own once promoted: no preloaded libraries (pg_cron and friends would
      run jobs, through `localhost:<port>`, against the live server), no logical
      replication workers (they would consume the production subscriptions' slots), no
      streaming from the live primary;
    - archiving stays as configured (`archive_mode`), but `archive_command` is `false`: the
      new timeline's history file and first segments are then marked `.ready` and get
      archived once the real command is back after the swap; with `archive_mode=off` they
      would never be;
    - bounded resources next to production: `shared_buffers` capped, `max_wal_size` 1GB
      with no `wal_keep_size` (restored segments are recycled at restartpoints), huge
      pages only if available;
    - a log the proof can read: stderr to its own file, messages in English (`lc_messages=C`).
    """
    settings = {
        "listen_addresses": "", "port": str(staged.port), "unix_socket_directories": staged.socket_directory,
        "cluster_name": staged.name, "data_directory": staged.data_directory,
        "external_pid_file": f"{staged.socket_directory}/external.pid",
        "shared_preload_libraries": "", "max_logical_replication_workers": "0",
        "primary_conninfo": "", "primary_slot_name": "",
        "archive_command": "false", "archive_library": "",
        "shared_buffers": shared_buffers, "max_wal_size": "1GB", "wal_keep_size": "0", "huge_pages": "try",
        "logging_collector": "off", "log_destination": "stderr", "lc_messages": "C",
    }
    return shlex.join([arg for k, v in settings.items() for arg in ("-c", f"{k}={v}")])


#: a Unix socket path is at most 107 bytes; the staging socket is `<staged>-run/.s.PGSQL.<port>`
SOCKET_PATH_MAX = 107


def staged_socket_path(staged: Instance) -> str:
    return f"{staged.socket_directory}/.s.PGSQL.{staged.port}"


class DbHostHook(BaseHook):
    """PostgreSQL control on one db host of the inventory."""

    conn_name_attr = "ssh_conn_id"
    hook_name = "PostgreSQL host (over SSH)"

    def __init__(self, *, db_host: DbHost, cmd_timeout: float = 120, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.db_host = db_host
        self.cmd_timeout = cmd_timeout

    @cached_property
    def host(self) -> RemoteHost:
        return RemoteHost(self.db_host.ssh_conn_id, name=self.db_host.name, cmd_timeout=self.cmd_timeout)

    def get_conn(self) -> RemoteHost:
        return self.host

    def close(self) -> None:
        self.host.close()

    def _bin(self, name: str) -> str:
        return f"{self.db_host.pg_bin.rstrip('/')}/{name}"

    # ------------------------------------------------------------------ state
    def status(self, data_directory: str) -> str:
        """`running`, `stopped`, or `no-data` (pg_ctl status exit codes 0, 3, 4)."""
        r = self.host.run([self._bin("pg_ctl"), "status", "-D", data_directory], check=False)
        return {0: "running", 3: "stopped", 4: "no-data"}.get(r.exit_code, f"unknown({r.exit_code})")

    def path_exists(self, path: str) -> bool:
        return self.host.run(["test", "-e", path], check=False).exit_code == 0

    def controldata(self, data_directory: str) -> ControlData:
        out = self.host.run(["env", "LC_ALL=C", self._bin("pg_controldata"), "-D", data_directory]).stdout
        return ControlData.parse(out)

    def log_tail(self, log_file: str, lines: int = 40) -> str:
        return self.host.run(["tail", "-n", str(lines), log_file], check=False).stdout

    def log_size(self, log_file: str) -> int:
        r = self.host.run(["stat", "-c", "%s", log_file], check=False)
        return int(r.stdout.strip()) if r.exit_code == 0 and r.stdout.strip().isdigit() else 0

    def log_since(self, log_file: str, offset: int, max_bytes: int = 2_000_000) -> str:
        """The server log from byte `offset` on (what this start of the server wrote)."""
        return self.host.run(["tail", "-c", f"+{offset + 1}", log_file], check=False).stdout[-max_bytes:]

    def psql(self, instance: Instance, sql: str, database: str = "postgres", timeout: float = 60) -> str:
        """Run SQL as the postgres OS user over the instance's Unix socket (peer auth)."""
        r = self.host.run([self._bin("psql"), "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1",
                           "-h", instance.socket_directory, "-p", str(instance.port), "-d", database, "-c", sql],
                          timeout=timeout)
        return r.stdout.strip()

    def psql_each(self, instance: Instance, statements: list[str], database: str = "postgres",
                  timeout: float = 60) -> str:
        """Several statements in one psql run, each its own transaction (`-c` per statement); stops at the first error."""
        argv = [self._bin("psql"), "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h", instance.socket_directory,
                "-p", str(instance.port), "-d", database]
        for sql in statements:
            argv += ["-c", sql]
        return self.host.run(argv, timeout=timeout).stdout.strip()

    def is_ready(self, instance: Instance) -> bool:
        r = self.host.run([self._bin("pg_isready"), "-q", "-h", instance.socket_directory, "-p", str(instance.port)],
                          check=False)
        return r.exit_code == 0

    def in_recovery(self, instance: Instance) -> bool:
        return self.psql(instance, "SELECT pg_is_in_recovery()") == "t"

    # ---------------------------------------------------------------- actions
    def start_options(self, instance: Instance) -> str:
        return shlex.join(["-c", f"listen_addresses={self.db_host.address}", "-c", f"port={instance.port}",
                           "-c", f"unix_socket_directories={instance.socket_directory}",
                           "-c", f"cluster_name={instance.name}"])

    def start(self, instance: Instance, *, wait: bool = False, timeout: int = 120, options: str | None = None) -> None:
        """Start PostgreSQL on the instance (no-op when already running)."""
        if self.status(instance.data_directory) == "running":
            return
        offset = self.log_size(instance.log_file)
        self.host.run([self._bin("pg_ctl"), "start", "-D", instance.data_directory, "-l", instance.log_file,
                       "-o", options or self.start_options(instance),
                       *(["-w", "-t", str(timeout)] if wait else ["-W"])],
                      timeout=timeout + 30)
        if not wait:
            # `pg_ctl -W` returns before the postmaster has written its pid file: until then
            # `status` says "stopped", which callers would read as "exited during start-up"
            deadline = time.monotonic() + 30
            while self.status(instance.data_directory) != "running":
                if "database system is shut down" in self.log_since(instance.log_file, offset):
                    raise BarmanDrError(f"PostgreSQL on {instance.name} exited during start-up. "
                                        f"Server log tail:\n{self.log_tail(instance.log_file)}")
                if time.monotonic() > deadline:
                    raise BarmanDrError(f"PostgreSQL on {instance.name} did not start (no postmaster after 30s). "
                                        f"Server log tail:\n{self.log_tail(instance.log_file)}")
                time.sleep(0.1)

    def stop(self, instance: Instance, *, mode: str = "fast", timeout: int = 120) -> str:
        """Stop PostgreSQL (fast: roll back open transactions, checkpoint, exit). Idempotent."""
        state = self.status(instance.data_directory)
        if state != "running":
            return state
        self.host.run([self._bin("pg_ctl"), "stop", "-D", instance.data_directory, "-m", mode, "-w",
                       "-t", str(timeout)], timeout=timeout + 30)
        return "stopped"

    def _wait_pg(self, instance: Instance, what: str, timeout: float) -> tuple[str, float]:
        """Long-poll `_WAIT_PG` until `what` (ready/promoted) or the postmaster exits; (outcome, seconds)."""
        start = time.monotonic()
        while True:
            elapsed = time.monotonic() - start
            remaining = timeout - elapsed
            if remaining <= 0:
                return "timeout", round(elapsed, 3)
            window = max(1, int(min(WAIT_WINDOW_S, remaining)))
            step = "0.1" if elapsed < FAST_WAIT_S else "0.5"
            out = self.host.run(sh_argv(_WAIT_PG, self.db_host.pg_bin.rstrip("/"), instance.data_directory,
                                        instance.socket_directory, str(instance.port), what, step, str(window)),
                                timeout=window + 60).stdout.strip()
            if out in (what, "exited"):
                return out, round(time.monotonic() - start, 3)

    def wait_ready(self, instance: Instance, *, timeout: float = 300) -> float:
        """Wait until the instance accepts connections; fail with the server log tail."""
        outcome, waited = self._wait_pg(instance, "ready", timeout)
        if outcome == "ready":
            return waited
        if outcome == "exited":
            raise BarmanDrError(f"PostgreSQL on {instance.name} is not running (it exited during start-up). "
                                f"Server log tail:\n{self.log_tail(instance.log_file)}")
        raise BarmanDrError(f"PostgreSQL on {instance.name} did not accept connections within {timeout:.0f}s. "
                            f"Server log tail:\n{self.log_tail(instance.log_file)}")

    def wait_recovery_end(self, instance: Instance, *, timeout: float = 3600) -> float:
        """Wait until recovery has ended and the server is promoted (pg_is_in_recovery() = false)."""
        outcome, waited = self._wait_pg(instance, "promoted", timeout)
        if outcome == "promoted":
            return waited
        if outcome == "exited":
            raise BarmanDrError(f"PostgreSQL on {instance.name} stopped during recovery. "
                                f"Server log tail:\n{self.log_tail(instance.log_file)}")
        raise BarmanDrError(f"PostgreSQL on {instance.name} still in recovery after {timeout:.0f}s. "
                            f"Server log tail:\n{self.log_tail(instance.log_file)}")

    def move_aside(self, data_directory: str, tag: str) -> str | None:
        """Rename the data directory to `<dir>.pre-<UTC stamp>-<tag>`; never delete it.

        Returns the new path, or None when there was no directory to move. Idempotent for
        the same tag (a retried task finds the directory it already moved).
        """
        if not MOVE_TAG_RE.match(tag):
            raise ValueError(f"invalid move-aside tag {tag!r}")
        stamp = utc_stamp()
        out = self.host.run(sh_argv(_MOVE_ASIDE, data_directory, tag, stamp, self._bin("pg_ctl"))).stdout.strip()
        word, _, path = out.partition(" ")
        if word in ("moved", "already"):
            return path
        return None

    def move_back(self, data_directory: str, aside: str, tag: str) -> str:
        """Rollback: put a moved-aside directory back; whatever is there now is moved aside too."""
        stamp = utc_stamp()
        return self.host.run(sh_argv(_MOVE_BACK, data_directory, aside, tag, stamp, self._bin("pg_ctl"))).stdout

    # ------------------------------------------------------------ staged restore
    def free_space(self, path: str) -> dict[str, Any]:
        """Free bytes on the filesystem holding `path` (`df -P -B1`), and its mount point."""
        out = self.host.run(["df", "-P", "-B1", "--", path]).stdout.strip().splitlines()
        fields = out[-1].split() if out else []
        if len(fields) < 6 or not fields[3].isdigit():
            raise BarmanDrError(f"unexpected `df -P -B1 {path}` output on {self.db_host.name}: {out!r}")
        return {"path": path, "available_bytes": int(fields[3]), "size_bytes": int(fields[1]),
                "mount_point": fields[5]}

    def dir_identity(self, path: str) -> str:
        """`device:inode` of a directory: a rename keeps it, a new directory has another."""
        return self.host.run(["stat", "-c", "%d:%i", "--", path]).stdout.strip()

    def swap_in_staged(self, staged: str, data_directory: str, identity: str) -> str:
        """Rename the staged restore to the data directory (which must not exist). `renamed` or `already`."""
        out = self.host.run(sh_argv(_SWAP_IN, staged, data_directory, identity, self._bin("pg_ctl"))).stdout.strip()
        return out.partition(" ")[0]

    def remove_staging(self, data_directory: str, staged: str, wal_directory: str) -> list[str]:
        """Delete a run's own staging directories (never anything else); the paths removed."""
        out = self.host.run(sh_argv(_REMOVE_STAGING, data_directory.rstrip("/"), staged, wal_directory,
                                    self._bin("pg_ctl"))).stdout.strip()
        return out.split()[1:]

    def replayed(self, data_directory: str) -> bool:
        """A staging copy whose recovery has ended and that was shut down cleanly since."""
        if self.status(data_directory) == "running" or self.path_exists(f"{data_directory}/recovery.signal"):
            return False
        try:
            return self.controldata(data_directory).state == "shut down"
        except BarmanDrError:
            return False

    def restore_archive_command(self, data_directory: str) -> list[str]:
        """Put back the `archive_command` Barman replaced with `false` (see `_UNMANGLE_ARCHIVE`); the files changed."""
        base = data_directory.rstrip("/")
        out = self.host.run(sh_argv(_UNMANGLE_ARCHIVE, f"{base}/postgresql.conf", f"{base}/postgresql.auto.conf"))
        return [line for line in out.stdout.splitlines() if line.strip()]

    def prepare_directory(self, path: str, mode: str = "0700") -> None:
        """Create an empty directory for a restore (Barman refuses non-empty destinations)."""
        self.host.run(["mkdir", "-p", "-m", mode, path])
        self.host.run(["chmod", mode, path])
