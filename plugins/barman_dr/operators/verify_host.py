"""dr_daily_verification's task per barman host: every server of that host, from batched probes.

The per-server task ran ~12 Barman/SSH commands for each server (each Barman start costs
~0.3 s of Python startup, and 50 servers queued 4 at a time behind the host's pool). This
task runs, per barman host, `barman -f json check`, `list-backups`, `show-servers` and (when
a server has standbys) `replication-status`, each once with all the host's server names
(`all` would also check the servers of another inventory entry sharing that Barman
installation), concurrently over one SSH connection, then one SSH exec for every server's
WAL catalogue, WAL files, oldest backup's begin WAL and `df -P` (barman_files.py), one SSH exec per database host for orphaned
staging/salvage copies, and one query each for the audit trail and the locks. Each
server's report is then evaluated in-process (fleet_verification.py), with the same
findings, facts and `verify_report` audit event as before. Nothing stays mapped: the only
per-server contact with PostgreSQL is Barman's own (`show-servers`, `check`), so the wall
time is that of one `check all`, whatever the number of servers.

Like the per-server task, it never fails on a CRITICAL *result* (the summary fails the
run): a probe that fails for the whole host is a CRITICAL finding for each of its servers,
a server missing from Barman's output is one for that server, and a server whose
evaluation itself crashes gets a CRITICAL report saying so. It fails only when it could
not produce the reports at all (the inventory, the audit trail).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from functools import cached_property
from typing import Any

from barman_dr.exceptions import InventoryError
from barman_dr.fleet_verification import (
    HostSnapshot,
    Probe,
    ServerSpec,
    describe_error,
    evaluate_server,
    oldest_done_backup_ids,
    own_sections,
)
from barman_dr.hooks.barman import BarmanHook
from barman_dr.hooks.remote import sh_argv
from barman_dr.inventory import BarmanHost, Server
from barman_dr.operators.base import DrBaseOperator
from barman_dr.safety.locks import ServerLock
from barman_dr.safety.orphans import LIST_MANY_SCRIPT, Orphan, classify, parse_listing_many, recorded_paths
from barman_dr.verification import CRITICAL, DELAYED_REPLAY_SQL, DelayedReplay, Finding, build_report


class BarmanHostVerificationOperator(DrBaseOperator):
    """Daily verification of every server of one barman host: one report per server (a list, in XCom).

    `servers`: the host's servers (from the inventory at parse time, `fleet.servers_by_pool`);
    they must all be on one barman host entry.
    """

    action = "verify"
    template_fields: Sequence[str] = ("servers",)
    request_task_id = None

    def __init__(self, *, servers: Sequence[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.servers = servers

    # ------------------------------------------------------------------ inventory
    @cached_property
    def fleet(self) -> list[Server]:
        return [self.inventory.server(str(s)) for s in self.servers]

    @cached_property
    def barman_host(self) -> BarmanHost:
        hosts = {s.barman_host for s in self.fleet}
        if len(hosts) != 1:
            raise InventoryError(f"{self.task_id}: servers {list(self.servers)} are on barman hosts {sorted(hosts)}, "
                                 "not one (the inventory changed since the DAG was parsed?)")
        return self.inventory.barman_hosts[hosts.pop()]

    @property
    def server_name(self) -> str:
        raise InventoryError("a barman host task has no single server")

    @cached_property
    def barman(self) -> BarmanHook:
        return self.new_barman_hook()

    def new_barman_hook(self) -> BarmanHook:
        """A hook (and so an SSH connection) of its own on this barman host."""
        bh = self.barman_host
        return BarmanHook(ssh_conn_id=bh.ssh_conn_id, barman_command=bh.barman_command, job_dir=bh.job_dir)

    def audit_target(self) -> str | None:
        return None

    # ------------------------------------------------------------------ probes
    def measure(self, context: Any) -> tuple[HostSnapshot, dict[str, float]]:
        """Every host-level probe, concurrently; each a Probe (value or error). Returns their timings too."""
        names = [s.name for s in self.fleet]
        timings: dict[str, float] = {}

        def timed(key: str, fn: Any) -> Any:
            def call() -> Any:
                t0 = time.monotonic()
                try:
                    return fn()
                finally:
                    timings[key] = round(time.monotonic() - t0, 3)
            return call

        # the host must answer before anything else is asked (one clear reason when it does not)
        connect = Probe.run(lambda: self.barman.host.run(["true"], timeout=60))
        if connect.error is not None:
            failed = Probe.failed(connect.error)
            return HostSnapshot(check=failed, backups=failed, servers=failed, replication=failed, files=failed,
                                orphans=Probe.run(lambda: self._orphans(context)),
                                delayed=Probe.run(self._delayed_replay),  # on the db hosts: still measurable
                                backup_directory=self.barman_host.backup_directory), timings
        # each concurrent Barman probe on an SSH connection of its own: a probe that times out or
        # breaks closes only its own connection, never the channels of the others
        hooks: list[BarmanHook] = []

        def own(fn: Any) -> Any:
            hook = self.new_barman_hook()
            hooks.append(hook)
            return lambda: fn(hook)

        try:
            with ThreadPoolExecutor(max_workers=6, thread_name_prefix="verify") as pool:
                f_check = pool.submit(timed("check_all", own(lambda b: own_sections(b.check_all(names), names))))
                f_backups = pool.submit(timed("list_backups_all",
                                              own(lambda b: own_sections(b.list_backups_all(names), names))))
                f_servers = pool.submit(timed("show_servers_all",
                                              own(lambda b: own_sections(b.show_servers_all(names), names))))
                with_standbys = [s.name for s in self.fleet if s.active_standbys]
                f_repl = pool.submit(timed("replication_status_all", own(lambda b: own_sections(
                    b.replication_status_all(with_standbys), with_standbys)))) if with_standbys else None
                f_orphans = pool.submit(timed("orphans", lambda: self._orphans(context)))
                backups, servers = _probe(f_backups), _probe(f_servers)
                files = Probe.run(timed("server_files", lambda: self._files(backups, servers)))
                snap = HostSnapshot(check=_probe(f_check), backups=backups, servers=servers,
                                    replication=_probe(f_repl) if f_repl else Probe(value={}), files=files,
                                    orphans=_probe(f_orphans), backup_directory=self.barman_host.backup_directory)
            # after the orphan listing, which uses the same db-host SSH connections (a hook is not thread-safe)
            snap.delayed = Probe.run(timed("delayed_standbys", self._delayed_replay))
        finally:
            for hook in hooks:
                with contextlib.suppress(Exception):
                    hook.close()
        return snap, timings

    def _files(self, backups: Probe, servers: Probe) -> Any:
        """WAL catalogue, WAL files, oldest begin WAL of every server, and df: one SSH exec.

        The paths come from show-servers: without it only `df` is read (the disk check stays
        independent), and each server's catalogue finding points at show-servers' own.
        """
        known = servers.value if servers.error is None and isinstance(servers.value, dict) else {}
        names = [s.name for s in self.fleet if s.name in known]
        oldest = oldest_done_backup_ids(backups.value or {}, names) if backups.error is None else {}
        entries = []
        for name in names:
            raw = known[name]
            info = raw if isinstance(raw, dict) else {}
            xlogdb_dir = info.get("xlogdb_directory") or info.get("wals_directory")
            entries.append((name, f"{xlogdb_dir}/{name}-xlog.db" if xlogdb_dir else "",
                            str(info.get("wals_directory") or ""), str(info.get("backup_directory") or ""),
                            oldest.get(name)))
        return self.barman.server_files(self.barman_host.backup_directory, entries)

    def _delayed_replay(self) -> dict[str, DelayedReplay | str]:
        """Each delayed standby's own view of its replay (DELAYED_REPLAY_SQL): one psql on each.

        A standby that does not answer is that standby's finding (the error), not the host's.
        """
        out: dict[str, DelayedReplay | str] = {}
        for srv in self.fleet:
            for sb in srv.delayed_standbys:
                try:
                    out[sb.name] = DelayedReplay.from_row(self.db(sb.host).psql(sb, DELAYED_REPLAY_SQL).split("|"))
                except Exception as exc:  # noqa: BLE001 - one standby's error, reported as its finding
                    out[sb.name] = f"{sb.host}: {describe_error(exc)}"
        return out

    def _orphans(self, context: Any) -> dict[str, list[Orphan] | str]:
        """Staging/salvage copies next to every data directory of the host's servers: one SSH exec per db host."""
        names = [s.name for s in self.fleet]
        holders = ServerLock(postgres_conn_id=self.audit_conn_id).holders(names)
        events = self.audit(context).events_per_server(names, {"staging_directory": 500, "salvage_prepare": 200})
        by_host: dict[str, list[str]] = {}
        for srv in self.fleet:
            for inst in (srv.primary, *srv.standbys):
                dirs = by_host.setdefault(inst.host, [])
                if inst.data_directory not in dirs:
                    dirs.append(inst.data_directory)
        listings: dict[str, Probe] = {}
        for host, dirs in sorted(by_host.items()):
            listings[host] = Probe.run(lambda host=host, dirs=dirs: parse_listing_many(
                self.db(host).host.run(sh_argv(LIST_MANY_SCRIPT, *dirs), timeout=120).stdout))
        out: dict[str, list[Orphan] | str] = {}
        for srv in self.fleet:
            recorded = recorded_paths(events.get(srv.name, []))
            holder = holders.get(srv.name)
            found: list[Orphan] = []
            for inst in (srv.primary, *srv.standbys):
                listing = listings[inst.host]
                if listing.error is not None:  # that db host only: its servers' finding, not the others'
                    out[srv.name] = f"{inst.host}: {listing.error}"
                    break
                per_dir, postmasters = listing.value
                found += classify(inst.host, per_dir.get(inst.data_directory, []), postmasters, recorded,
                                  holder.run_id if holder else None)
            else:
                out[srv.name] = found
        return out

    # ------------------------------------------------------------------ run
    def run(self, context: Any) -> list[dict[str, Any]]:
        t0 = time.monotonic()
        snap, timings = self.measure(context)
        measured_s = round(time.monotonic() - t0, 3)
        now = datetime.now(UTC)
        reports = []
        for srv in self.fleet:
            # a spare delayed standby is not run day to day: not expected to stream
            spec = ServerSpec(srv.name, tuple(s.name for s in srv.active_standbys), srv.verification,
                              delayed=tuple((s.name, int(s.apply_delay_s or 0), int(s.delay_tolerance_s or 0))
                                            for s in srv.delayed_standbys))
            try:
                findings, facts = evaluate_server(spec, snap, now)
                report = build_report(srv.name, findings, facts, checked_at=now.isoformat())
            except Exception as exc:  # one server's broken evaluation must not hide the others
                self.log.exception("evaluating %s failed", srv.name)
                report = build_report(srv.name, [Finding("evaluation", CRITICAL, f"the report could not be evaluated: "
                                                         f"{describe_error(exc)}")], {}, checked_at=now.isoformat())
            reports.append(report)
        self.audit(context).record_many([{"action": "verify_report", "outcome": r["status"].lower(),
                                          "server": r["server"], "details": r} for r in reports])
        for r in reports:
            log = self.log.error if r["status"] == CRITICAL else self.log.info
            log("%s: %s\n%s", r["server"], r["status"], "\n".join(r["reasons"]) or "all checks OK")
        self.log.info("%d servers of %s verified: probes %.2f s %s", len(reports), self.barman_host.name,
                      measured_s, timings)
        self._summary = {"barman_host": self.barman_host.name, "probes_s": timings, "measured_s": measured_s,
                         "servers": {r["server"]: r["status"] for r in reports}}
        return reports

    def audit_details(self, result: Any) -> dict[str, Any]:
        """The `verify` ok event: statuses and probe timings (the reports have their own events)."""
        return dict(getattr(self, "_summary", {}))


def _probe(future: Future | None) -> Probe:
    """A submitted probe's result as a Probe (its exception as the error)."""
    if future is None:
        return Probe(value={})
    try:
        return Probe(value=future.result())
    except Exception as exc:  # noqa: BLE001 - a failed probe becomes findings, not a crash
        return Probe(error=describe_error(exc))
