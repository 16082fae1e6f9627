"""Assess: the request validated, a usable backup, the WAL proven to cover the target (nothing moves yet).

validate_params -> resolve_target (see resolve.py) -> preflight -> wal_coverage. Every
refusal here happens before anything is stopped or written, and names the field, the
value and the fix."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from barman_dr.exceptions import PreflightError
from barman_dr.forensics.recovery_proof import parse_history_file
from barman_dr.hooks.barman import compute_coverage, timeline_for_segment
from barman_dr.models import Lsn, WalSegment, is_wal_segment_name
from barman_dr.operators.base import DrBaseOperator
from barman_dr.operators.pitr.resolve import resolution_for
from barman_dr.params.pitr_request import PitrRequest, validate_pitr_conf
from barman_dr.safety.locks import ServerLock


class ValidatePitrRequestOperator(DrBaseOperator):
    """Step 1: the params, validated and typed, before any command runs anywhere.

    Order matters: pure validation first (no I/O: hostile input never gets further),
    then the audit trail must be writable (no unaudited DR run), then the server lock
    (every run but a plan-only preview). It runs on the `default` queue, so it needs no barman
    host: the catalogue checks (`refuse_unrecoverable_request`) open resolve_target, on the site.
    """
    runs_on_site = False  # bookkeeping: the `default` queue

    action = "validate"
    request_task_id = None

    def validate(self, conf: dict[str, Any]) -> PitrRequest:
        """The pure validation (no I/O); other DR DAGs override it with their own request type."""
        return validate_pitr_conf(conf, self.inventory)

    def take_lock(self, req: PitrRequest, context: Any) -> None:
        """Every run that may execute takes the server lock now: a plan waiting for approval reserves the server,
        so what the approver sees cannot be changed under it by another DR run. A plan-only preview only warns."""
        if not req.plan_only:
            ServerLock(postgres_conn_id=self.audit_conn_id).acquire(
                req.server, dag_id=context["dag"].dag_id, run_id=context["run_id"], purpose="pitr")
        else:
            holder = ServerLock(postgres_conn_id=self.audit_conn_id).holder(req.server)
            if holder:
                self.log.warning("server %s is locked by %s %s: this plan-only run will not touch it",
                                 req.server, holder.dag_id, holder.run_id)

    def run(self, context: Any) -> dict[str, Any]:
        conf = {k: v for k, v in dict(context["params"]).items()}
        dag_run = context.get("dag_run")
        conf.update(dict(getattr(dag_run, "conf", None) or {}))
        req = self.validate(conf)
        self.request = req.to_dict()
        self.__dict__.pop("req", None)
        self.require_workers(req.server, context)
        self.take_lock(req, context)
        return req.to_dict()

    def next_action(self, context: Any, exc: BaseException) -> str | None:
        return "Nothing was touched. Correct the field named above and trigger again."


class PitrPreflightOperator(DrBaseOperator):
    """Step 2: the resolved backup is usable, the stop point inside the recovery window; `barman check` OK.

    The backup itself was chosen by `resolve_target` (the newest DONE backup on the
    recovery's timeline path that ended before the resolved stop record).
    """

    action = "preflight"
    #: `barman check` results that make a restore unsafe: the archive itself is broken or is
    #: not this server's. The others (PostgreSQL reachable, streaming, slot, backup age...)
    #: describe the *live* server, which is down or damaged in a disaster: they are reported
    #: as warnings, and the WAL coverage proof decides.
    BLOCKING_CHECKS = frozenset({"directories", "systemid_coherence", "compression_settings"})

    def run(self, context: Any) -> dict[str, Any]:
        req, srv = self.req, self.srv
        res = resolution_for(self, context)
        backup = res["backup"]
        backup_id = res["backup_id"]
        stop = res["stop"]
        problems = []
        if backup.get("status") != "DONE":
            problems.append(f"backup {backup_id} is {backup.get('status')}, not DONE")
        if not backup.get("begin_wal"):
            problems.append(f"backup {backup_id} has no begin WAL in its metadata")
        window = timedelta(days=srv.recovery_window_days)
        stop_time = datetime.fromisoformat(stop["time"]) if stop.get("time") else req.target.time
        if stop_time and stop_time < datetime.now(UTC) - window:
            problems.append(f"the stop point ({stop_time.isoformat()}) is older than the recovery window "
                            f"({srv.recovery_window_days} days): WAL for it may be removed by retention")
        check = self.barman.check(srv.name)
        blocking = [c for c in check.failed if c.name in self.BLOCKING_CHECKS]
        for c in blocking:
            problems.append(f"barman check {c.name} FAILED" + (f" ({c.hint})" if c.hint else ""))
        instance = self.target_instance
        if req.staging:
            problems.append("staging restores are done by dr_monthly_restore_drill, not dr_pitr")
        if problems:
            raise PreflightError("preflight refused, nothing was touched:\n- " + "\n- ".join(problems))
        return {
            "backup_id": backup_id,
            "backup": backup,
            "stop": stop,
            "check": check.to_dict(),
            "warnings": [f"{c.name}: {c.hint}" for c in check.failed] + list(res.get("warnings") or []),
            "target_instance": instance.name,
            "target_host": instance.host,
            "data_directory": instance.data_directory,
        }

    def next_action(self, context: Any, exc: BaseException) -> str | None:
        return "Nothing was stopped or changed. Fix the reported problem (or choose another backup/target) and trigger again."


class WalCoverageOperator(DrBaseOperator):
    """Step 3: prove every segment from the backup to the resolved stop record is in Barman's archive.

    The seed's recovery fell short because the WAL after the backup was still in
    PostgreSQL's current segment. `resolve_target` already committed one empty transaction
    on the damaged server and ran `switch-wal --force --archive` (Barman then holds the
    closed segment); the stop record itself was found in Barman's WAL. Here every segment
    from the backup's begin WAL to the one holding the end of the stop record must be in
    Barman's WAL catalogue (archived: a restore reads nothing else), each on the timeline
    recovery will ask for. A gap, or a stop record still only in Barman's streaming
    directory, fails here with nothing stopped.
    """

    action = "wal_coverage"

    def run(self, context: Any) -> dict[str, Any]:
        srv = self.srv
        pre = self.upstream(context, "preflight")
        res = resolution_for(self, context)
        sw = res.get("switch") or {}
        backup = pre["backup"]
        stop = res["stop"]
        closed, current = sw.get("closed_wal"), sw.get("current_wal")
        catalog = [e for e in self.barman.wal_catalog(srv.name) if is_wal_segment_name(e.name)]
        names = [e.name for e in catalog]
        if not names:
            raise PreflightError("Barman's WAL catalogue is empty: no WAL archived at all")
        first = backup["begin_wal"]
        tli = int(res["recovery_timeline"])
        stop_end = Lsn.parse(stop.get("end_lsn") or stop["lsn"]).value
        needed = WalSegment.from_lsn(int(stop["timeline"]), Lsn(max(stop_end - 1, Lsn.parse(stop["lsn"]).value)))
        last_name = WalSegment(timeline_for_segment(needed.segno, self._switches(tli), tli), needed.segno).name
        switches = self._switches(tli) if tli > WalSegment.parse(first).timeline else None
        coverage = compute_coverage(names, first, last_name, switches)
        newest = max(catalog, key=lambda e: (WalSegment.parse(e.name).segno, e.time)) if catalog else None
        result = {
            "first_wal": first, "last_wal": last_name, "closed_wal": closed, "server_current_wal": current,
            "primary_running": bool(sw.get("primary_up")), "coverage": coverage.to_dict(),
            "newest_archived": newest.name if newest else None,
            "newest_archived_at": datetime.fromtimestamp(newest.time, UTC).isoformat() if newest else None,
            "wal_segments": coverage.present, "stop_lsn": stop["lsn"],
        }
        problems = []
        if sw.get("error"):
            problems.append(f"`barman switch-wal --force --archive` did not archive the current WAL within "
                            f"{srv.switch_wal_timeout_seconds}s ({sw['error']}): WAL streaming/archiving is not working")
        if not coverage.complete:
            where = ""
            if last_name in coverage.missing:
                where = (f" (the stop record at {stop['lsn']} is in {last_name}, which Barman has not archived yet: it "
                         "may only be in its streaming directory; a restore reads the archive only)")
            problems.append(f"WAL missing from Barman's archive between {first} and {last_name}: "
                            + ", ".join(coverage.missing_ranges()) + where)
        if problems:
            raise PreflightError("WAL coverage NOT proven, nothing was stopped:\n- " + "\n- ".join(problems))
        return result

    def _switches(self, tli: int) -> list[tuple[int, str]]:
        if tli <= 1:
            return []
        if not hasattr(self, "_switch_cache"):
            history = self.barman.timeline_history(self.srv.name, tli)
            if history is None:
                raise PreflightError(f"timeline {tli} has no history file in Barman's archive: recovery cannot follow "
                                     "it. Nothing was stopped.")
            self._switch_cache = [(e.parent_timeline, e.switch_lsn) for e in parse_history_file(history)]
        return self._switch_cache

    def next_action(self, context: Any, exc: BaseException) -> str | None:
        return ("Nothing was stopped. Restore WAL streaming on the barman host (`barman cron`, `barman check`), "
                "make sure the missing segments exist, then trigger again.")
