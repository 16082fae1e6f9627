"""BarmanHook: Barman on the barman host, over SSH, always with `-f json`.

Every barman command is an argv list (`barman_command` from the inventory, then `-f json`,
then the subcommand): nothing a user typed becomes shell syntax. Output is parsed into
typed models (`barman_dr.models`); a non-zero exit raises `BarmanCommandError` with the
exit code and stderr. `backup` and `restore` run as detached remote jobs (see
`hooks/remote.py`) so they cannot die from an SSH inactivity timeout, and a retry
attaches to the job instead of starting a second one.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from airflow.sdk import BaseHook

from barman_dr.barman_files import FILES_SCRIPT, FileSection, ServerFiles, files_args, parse_files_output
from barman_dr.exceptions import BarmanCommandError, BarmanDrError, BarmanOutputError
from barman_dr.hooks.remote import RemoteHost, parse_json_output, sh_argv
from barman_dr.models import (
    BackupInfo,
    BackupSummary,
    CheckReport,
    CommandResult,
    Lsn,
    RecoveryTarget,
    WalSegment,
    is_wal_segment_name,
    parse_list_backups,
    server_section,
)

_CLOSED_WAL_RE = re.compile(r"WAL file ([0-9A-F]{24}) has been closed")

#: the connection strings Barman uses for a server: each one set follows a new primary (Barman 3.19.1
#: also has wal_conninfo / wal_streaming_conninfo, which receive-wal and the WAL checks use when set)
CONNINFO_KEYS = ("conninfo", "streaming_conninfo", "wal_conninfo", "wal_streaming_conninfo")


def repointed_conninfo(conninfo: str, host: str, port: int) -> str:
    """`conninfo` with its host and port replaced, every other keyword (user, passfile, sslmode...) kept.

    Barman's own value is the base, so its user, database and credentials stay what the DBA
    configured; only where the server lives changes. A password Barman shows redacted cannot
    be written back, so it is refused (a passfile or .pgpass is the fix).
    """
    from psycopg2.extensions import make_dsn, parse_dsn

    params = parse_dsn(conninfo)
    if "password" in params:
        # never copied: it would go on the barman host's argv (`ps`), into Barman's change queue, and
        # into error text; Barman's own output may show it redacted as *REDACTED*
        raise BarmanOutputError("this server's Barman conninfo carries a password: barman-dr does not copy "
                                "passwords into commands. Fix: keep it in a passfile (libpq `passfile=`) or the "
                                "barman user's ~/.pgpass, remove `password=` from barman.conf, then retry")
    params.pop("hostaddr", None)
    params.update(host=host, port=str(int(port)))
    return make_dsn(**params)


def _host_port(conninfo: Any) -> str | None:
    from psycopg2.extensions import parse_dsn

    if not conninfo:
        return None
    p = parse_dsn(str(conninfo))
    return f"{p.get('host', '')}:{p.get('port') or 5432}"


def conninfo_points_at(conninfo: str | None, host: str, port: int) -> bool:
    """Does this libpq conninfo name exactly this host and port (5432 when it names none)?"""
    from psycopg2.extensions import parse_dsn

    if not conninfo:
        return False
    params = parse_dsn(conninfo)
    return params.get("host") == host and str(params.get("port") or 5432) == str(int(port))


@dataclass(frozen=True)
class WalCatalogEntry:
    name: str
    size: int
    time: float
    #: Barman's compression of the archived file (`gzip`, `bzip2`...), None when stored as is
    compression: str | None = None


@dataclass(frozen=True)
class WalCoverage:
    """Proof (or disproof) that every WAL segment from `first` to `last` is in Barman's archive."""

    first: str
    last: str
    present: int
    missing: tuple[str, ...]
    timelines: tuple[int, ...]

    @property
    def complete(self) -> bool:
        return not self.missing

    def missing_ranges(self) -> list[str]:
        """Missing segments folded into ranges: `A..B (n segments)`."""
        if not self.missing:
            return []
        segs = sorted(WalSegment.parse(m) for m in self.missing)
        out, start, prev = [], segs[0], segs[0]
        for s in segs[1:]:
            if s.timeline == prev.timeline and s.segno == prev.segno + 1:
                prev = s
                continue
            out.append(start.name if start == prev else f"{start.name}..{prev.name} ({prev.segno - start.segno + 1})")
            start = prev = s
        out.append(start.name if start == prev else f"{start.name}..{prev.name} ({prev.segno - start.segno + 1})")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"first": self.first, "last": self.last, "present": self.present, "complete": self.complete,
                "missing": self.missing_ranges(), "timelines": list(self.timelines)}


def timeline_for_segment(segno: int, switches: Sequence[tuple[int, str]] | None, last_timeline: int) -> int:
    """The timeline recovery reads segment `segno` from, following a timeline history.

    `switches` are the history file's `(parent timeline, switch LSN)` lines: the parent
    timeline before its switch segment, the child from the switch segment on (PostgreSQL
    requests the switch segment under the new timeline's name).
    """
    for switch_segno, parent in sorted((WalSegment.from_lsn(tli, Lsn.parse(lsn)).segno, tli)
                                       for tli, lsn in (switches or ())):
        if segno < switch_segno:
            return parent
    return last_timeline


def compute_coverage(catalog: Sequence[str], first: str, last: str,
                     switches: Sequence[tuple[int, str]] | None = None) -> WalCoverage:
    """Which segments between `first` and `last` (inclusive) are absent from the catalogue.

    Without `switches`, a segment number counts as present on any timeline between the two
    ends' timelines. With the target timeline's history (`switches`: the history file's
    `(parent timeline, switch LSN)` lines), each segment must exist on the timeline recovery
    will ask for: the parent timeline before its switch segment, the child from the switch
    segment on (PostgreSQL requests the switch segment under the new timeline's name).
    """
    a, b = WalSegment.parse(first), WalSegment.parse(last)
    if b < a:
        a, b = b, a
    tlis = range(a.timeline, b.timeline + 1)
    have: dict[int, set[int]] = {}
    for name in catalog:
        if is_wal_segment_name(name):
            seg = WalSegment.parse(name)
            if seg.timeline in tlis:
                have.setdefault(seg.segno, set()).add(seg.timeline)

    def wanted(segno: int) -> int | None:
        return timeline_for_segment(segno, switches, b.timeline) if switches else None

    missing = []
    present = 0
    for segno in range(a.segno, b.segno + 1):
        need = wanted(segno)
        ok = bool(have.get(segno)) if need is None else need in have.get(segno, set())
        if ok:
            present += 1
        else:
            tli = need if need is not None else (a.timeline if segno < b.segno else b.timeline)
            missing.append(WalSegment(tli, segno).name)
    return WalCoverage(first=a.name, last=b.name, present=present, missing=tuple(missing),
                       timelines=tuple(sorted({t for ts in have.values() for t in ts})))


def receive_wal_running(processes: Sequence[dict[str, Any]]) -> bool:
    """Whether `barman -f json list-processes` lists a receive-wal (entries are `{"name", "pid"}`)."""
    return any(p.get("name") == "receive-wal" for p in processes)


class BarmanHook(BaseHook):
    """Runs `barman -f json ...` on a barman host reached through an SSH connection."""

    conn_name_attr = "ssh_conn_id"
    hook_name = "Barman (over SSH)"

    def __init__(self, *, ssh_conn_id: str, barman_command: Sequence[str] = ("barman",),
                 job_dir: str = "/var/lib/barman/barman-dr-jobs", cmd_timeout: float = 300, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ssh_conn_id = ssh_conn_id
        self.barman_command = list(barman_command)
        self.job_dir = job_dir
        self.cmd_timeout = cmd_timeout

    @cached_property
    def host(self) -> RemoteHost:
        return RemoteHost(self.ssh_conn_id, name=f"barman host ({self.ssh_conn_id})", cmd_timeout=self.cmd_timeout)

    def get_conn(self) -> RemoteHost:
        return self.host

    def close(self) -> None:
        self.host.close()

    def argv(self, *args: str, json_output: bool = True) -> list[str]:
        return [*self.barman_command, *(["-f", "json"] if json_output else []), *args]

    def run(self, *args: str, timeout: float | None = None, json_output: bool = True) -> CommandResult:
        try:
            return self.host.run(self.argv(*args, json_output=json_output), timeout=timeout,
                                 error_cls=BarmanCommandError)
        except BarmanCommandError as exc:
            # with -f json Barman prints its errors on stdout as {"_ERROR": [...]}: surface them as stderr
            if not exc.stderr.strip() and exc.stdout.strip().startswith("{"):
                try:
                    errors = parse_json_output(exc.stdout, "barman").get("_ERROR") or []
                except (BarmanOutputError, AttributeError):
                    errors = []
                if errors:
                    raise BarmanCommandError(exc.host, exc.argv, exc.exit_code, "\n".join(map(str, errors)),
                                             exc.stdout) from None
            raise

    def run_json(self, *args: str, timeout: float | None = None) -> Any:
        result = self.run(*args, timeout=timeout)
        return parse_json_output(result.stdout, f"barman {args[0]}")

    # ------------------------------------------------------------------ queries
    def list_backups(self, server: str) -> list[BackupSummary]:
        return parse_list_backups(self.run_json("list-backups", server), server)

    def show_backup(self, server: str, backup_id: str) -> BackupInfo:
        return BackupInfo.from_json(self.run_json("show-backup", server, backup_id), server)

    def check(self, server: str) -> CheckReport:
        """`barman check`: exits 1 when a check fails, which is a result here, not an error."""
        try:
            payload = self.run_json("check", server)
        except BarmanCommandError as exc:
            if exc.exit_code == 1 and exc.stdout.strip().startswith("{"):
                payload = parse_json_output(exc.stdout, "barman check")
            else:
                raise
        return CheckReport.from_json(payload, server)

    # ------------------------------------------------ batched queries (one barman run per host)
    def run_batch(self, command: str, servers: Sequence[str] | None = None) -> dict[str, Any]:
        """`barman -f json COMMAND s1 s2 ...` (or `all`): every server's section in one Barman run.

        Barman exits 1 and still prints every known server's section when a name is unknown
        (`{"_ERROR": ["Unknown server 'x'"], ...}`) or, for `check`, when any check fails: that
        is a result here, with the errors under `_ERROR`. With `all`, an installation shared by
        two inventory entries returns the other entry's servers too: callers keep their own
        (`fleet_verification.own_sections`).
        """
        argv = [command, *(list(servers) if servers else ["all"])]
        try:
            payload = self.run_json(*argv)
        except BarmanCommandError as exc:
            if exc.exit_code == 1 and exc.stdout.strip().startswith("{"):
                payload = parse_json_output(exc.stdout, f"barman {command}")
            else:
                raise
        if not isinstance(payload, dict):
            raise BarmanOutputError(f"barman {command}: expected an object keyed by server, got "
                                    f"{type(payload).__name__}")
        return payload

    def check_all(self, servers: Sequence[str] | None = None) -> dict[str, Any]:
        """`barman -f json check` of many servers at once: {server: {check: {status, hint}}}."""
        return self.run_batch("check", servers)

    def list_backups_all(self, servers: Sequence[str] | None = None) -> dict[str, Any]:
        """`barman -f json list-backups` of many servers: {server: [backup rows]} (`parse_list_backups`)."""
        return self.run_batch("list-backups", servers)

    def show_servers_all(self, servers: Sequence[str] | None = None) -> dict[str, Any]:
        """`barman -f json show-servers` of many servers: configuration and live PostgreSQL view.

        Barman connects to each server for it: `current_xlog` (the primary's current WAL
        file), `replication_slot` (its slot: name, active, restart LSN) and
        `connection_error` when PostgreSQL cannot be reached.
        """
        return self.run_batch("show-servers", servers)

    def replication_status_all(self, servers: Sequence[str] | None = None) -> dict[str, Any]:
        """`barman -f json replication-status` of many servers: {server: {"streaming_clients": [...]}}."""
        return self.run_batch("replication-status", servers)

    def server_files(self, backup_directory: str, entries: Sequence[tuple[str, str, str, str | None, str | None]],
                     ) -> tuple[FileSection, dict[str, ServerFiles]]:
        """WAL catalogue, WAL files and oldest begin WAL of many servers, `df -P`: one SSH exec (barman_files).

        `entries`: (server, xlog.db path, wals directory, server's backup directory, oldest
        DONE backup id or None). A failed read is that server's section error, not an exception.
        """
        out = self.host.run(sh_argv(FILES_SCRIPT, *files_args(backup_directory, entries)),
                            timeout=max(self.cmd_timeout, 120)).stdout
        return parse_files_output(out)

    def show_server(self, server: str, *, timeout: float | None = None) -> dict[str, Any]:
        data = server_section(self.run_json("show-server", server, timeout=timeout), server, "show-server")
        if not isinstance(data, dict):
            raise BarmanOutputError("show-server: expected an object")
        return data

    def list_processes(self, server: str) -> list[dict[str, Any]]:
        return list(server_section(self.run_json("list-processes", server), server, "list-processes"))

    def receive_wal_running(self, server: str) -> bool:
        return receive_wal_running(self.list_processes(server))

    def replication_status(self, server: str) -> dict[str, Any]:
        return dict(server_section(self.run_json("replication-status", server), server, "replication-status"))

    def wal_catalog(self, server: str) -> list[WalCatalogEntry]:
        """Barman's WAL catalogue (`<xlogdb_directory>/<server>-xlog.db`, tab-separated).

        Barman 3.19.1 has no `check-archived-wal-range`; `list-files --target wal` stops at
        the next backup's begin. The catalogue is the complete list of archived WAL.
        """
        info = self.show_server(server)
        directory = info.get("xlogdb_directory") or info.get("wals_directory")
        if not directory:
            raise BarmanOutputError("show-server: no xlogdb_directory / wals_directory")
        out = self.host.run(["cat", f"{directory}/{server}-xlog.db"], timeout=60).stdout
        entries = []
        for line in out.splitlines():
            parts = line.split("\t")
            if len(parts) >= 3:
                compression = parts[3].strip() if len(parts) >= 4 and parts[3].strip() not in ("", "None") else None
                entries.append(WalCatalogEntry(parts[0], int(parts[1]), float(parts[2]), compression))
        return entries

    def wal_coverage(self, server: str, first: str, last: str) -> WalCoverage:
        return compute_coverage([e.name for e in self.wal_catalog(server)], first, last)

    def timeline_history(self, server: str, timeline: int) -> str | None:
        """The archived history file of a timeline (`0000000N.history`), or None when Barman has none."""
        if timeline <= 1:
            return None
        info = self.show_server(server)
        directory = info.get("wals_directory")
        if not directory:
            raise BarmanOutputError("show-server: no wals_directory")
        r = self.host.run(["cat", f"{directory}/{timeline:08X}.history"], check=False, timeout=60)
        return r.stdout if r.exit_code == 0 else None

    # ----------------------------------------------------------------- actions
    def switch_wal(self, server: str, *, archive_timeout: int = 60) -> str | None:
        """`switch-wal --force --archive`: close the current WAL and wait until Barman has it.

        Returns the name of the WAL file that was closed (now archived), or None when
        PostgreSQL had nothing to switch (the current segment was empty).
        """
        payload = self.run_json("switch-wal", "--force", "--archive", "--archive-timeout", str(archive_timeout),
                                server, timeout=archive_timeout + 60)
        messages = payload.get("_INFO", []) if isinstance(payload, dict) else []
        for msg in messages:
            m = _CLOSED_WAL_RE.search(str(msg))
            if m:
                self.wait_catalogued(server, m.group(1), timeout=archive_timeout)
                return m.group(1)
        return None

    def wait_catalogued(self, server: str, wal_name: str, *, timeout: float = 60, poll: float = 0.5) -> bool:
        """Wait until `wal_name` is in Barman's WAL catalogue (xlog.db), not only in the archive directory.

        `switch-wal --archive` returns once the segment *file* is in the archive, but Barman's
        archiver writes the catalogue lines of a batch when the batch ends (seen: a segment
        file archived 10 s before its line appeared). `barman restore` picks the WAL to copy
        from the catalogue, and so does the coverage proof: they must wait for it.
        """
        deadline = time.monotonic() + timeout
        while True:
            if any(e.name == wal_name for e in self.wal_catalog(server)):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(poll)

    def cron(self) -> CommandResult:
        return self.run("cron", json_output=False, timeout=120)

    def point_at(self, server: str, host: str, port: int) -> dict[str, Any]:
        """Barman's `conninfo` and `streaming_conninfo` for `server` name `host:port`: `barman config-update`.

        config-update rewrites the option where it is defined (the server's file in barman.d, or
        `.barman.auto.conf` for a default) and restarts the server's receive-wal. It logs and exits 0
        when a change cannot be applied, so the result is read back with `show-server`: a value still
        pointing elsewhere raises. Idempotent: nothing is written when both already point there.
        """
        import json

        before = self.show_server(server)
        changes = {k: repointed_conninfo(str(before[k]), host, port) for k in CONNINFO_KEYS
                   if before.get(k) and not conninfo_points_at(str(before[k]), host, port)}
        out: dict[str, Any] = {"server": server, "host": host, "port": int(port), "changed": sorted(changes),
                               "previous": {k: _host_port(before.get(k)) for k in CONNINFO_KEYS}}
        if not changes:
            return out
        self.run("config-update", json.dumps([{"scope": "server", "server_name": server, **changes}]),
                 json_output=False, timeout=120)
        after = self.show_server(server)
        wrong = [k for k in changes if not conninfo_points_at(str(after.get(k) or ""), host, port)]
        if wrong:
            raise BarmanDrError(f"`barman config-update` exited 0 but left {', '.join(wrong)} of {server} pointing at "
                                f"{[_host_port(after.get(k)) for k in wrong]}, not {host}:{port}. Fix: see Barman's "
                                "log (a config file it cannot write, or a concurrent config-update), then retry")
        return out

    def start_receive_wal(self, server: str) -> None:
        """(Re)start WAL streaming: `barman cron` starts receive-wal and creates the slot if needed."""
        self.cron()

    def backup_job(self, server: str, job_id: str, *, wait_timeout: int = 3600, timeout: float = 6 * 3600,
                   extra: Sequence[str] = ()) -> CommandResult:
        """`barman backup --wait` as a detached remote job (attach on retry)."""
        argv = self.argv("backup", "--wait", "--wait-timeout", str(wait_timeout), *extra, server)
        return self.host.run_job(self.job_dir, job_id, argv, timeout=timeout, error_cls=BarmanCommandError)

    def restore_argv(self, server: str, backup_id: str, destination: str, target: RecoveryTarget, *,
                     remote_ssh_command: Sequence[str] | None, jobs: int = 1,
                     target_action: str = "promote", target_tli: int | None = None,
                     staging_wal_directory: str | None = None) -> list[str]:
        args = ["restore"]
        if remote_ssh_command:
            # Barman runs this through a shell itself; we hand it a correctly quoted string.
            import shlex

            args += ["--remote-ssh-command", shlex.join(remote_ssh_command)]
        args += target.barman_args()
        if target_tli is not None:
            # without it Barman copies only the backup's timeline WAL: a target on a later
            # timeline (a second PITR from a backup older than the first) is never reached
            args += ["--target-tli", str(int(target_tli))]
        if target.kind != "immediate" or target_action:
            args += ["--target-action", target_action]
        if jobs > 1:
            args += ["--jobs", str(jobs)]
        if staging_wal_directory:
            # the WAL for recovery goes here instead of `<destination>/barman_wal`; its absolute
            # path is written into restore_command, so it must not move with the destination
            args += ["--staging-wal-directory", staging_wal_directory]
        args += [server, backup_id, destination]
        return self.argv(*args)

    def restore_job(self, job_id: str, argv: Sequence[str], *, timeout: float = 6 * 3600,
                    on_poll: Callable[[Any], None] | None = None) -> CommandResult:
        """`barman restore` as a detached job; `on_poll` sees each status while it runs (and may raise to stop)."""
        return self.host.run_job(self.job_dir, job_id, argv, timeout=timeout, error_cls=BarmanCommandError,
                                 on_poll=on_poll)

    def delete_backup(self, server: str, backup_id: str) -> CommandResult:
        return self.run("delete", server, backup_id, timeout=600)

    def check_backup(self, server: str, backup_id: str) -> CommandResult:
        return self.run("check-backup", server, backup_id, timeout=600)
