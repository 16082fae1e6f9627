"""dr_salvage: after a PITR, put back the rows the PITR discarded that were *inserted* after the target.

A PITR rewinds the whole cluster: every good write committed after the target is gone
with the bad one (in staged mode, everything the app wrote until the freeze). The old
timeline is not lost: dr_pitr moved the old data directory aside and listed the xids of
every transaction it discarded (`discarded` step). This is surgical recovery with the two
sides swapped: the *newer* data is the source, the recovered server the destination.

validate (lock, the PITR's facts from the audit trail) -> prepare_copy (a copy of the
moved-aside directory, `cp --reflink=auto`, started as a private postmaster like the
staging one: no TCP, its own socket, nothing archived; the moved-aside directory itself
is never touched: evidence) -> plan (per table, the copy's rows whose `xmin` is one of the
discarded transactions, staged on live in a rolled-back transaction and diffed by primary
key) -> apply (confirmed runs: one transaction, `INSERT ... ON CONFLICT DO NOTHING`,
verified before COMMIT; sequences behind the re-inserted keys are advanced) -> teardown
(always: stop the private postmaster, delete the copy, release the lock).

What is never overwritten: a key the recovered server holds with other content (a row
updated after the target, or a key the app re-used since the recovery) is a conflict,
reported with samples; rows deleted after the target (the incident itself, usually) stay
deleted and are reported from the WAL's counts.
"""

from __future__ import annotations

import json
import posixpath
from functools import cached_property
from typing import Any

from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException
from psycopg import sql

from barman_dr.exceptions import BarmanDrError, PreflightError, ValidationError
from barman_dr.forensics.rowdiff import (
    check_same_shape,
    read_table_spec,
    spec_from_catalog,
    spec_sql_for_psql,
    stage_name,
    stage_table_from,
)
from barman_dr.forensics.target_resolution import subtract_xids
from barman_dr.hooks.dbhost import staged_instance, staged_start_options
from barman_dr.hooks.remote import sh_argv
from barman_dr.inventory import Instance
from barman_dr.operators.base import DrBaseOperator
from barman_dr.operators.pitr.plan import plan_state
from barman_dr.operators.surgical import SurgicalApplyOperator, SurgicalPlanOperator
from barman_dr.params.salvage_request import SalvageRequest, validate_salvage_conf
from barman_dr.safety.audit import AuditTrail
from barman_dr.safety.locks import ServerLock
from barman_dr.surfaces.run_note import set_run_note

#: ranges per INSERT into the copy's xid table (one psql -c each: well under the 128 KiB argument limit)
XID_CHUNK = 2000

# Remove a salvage copy: only `<parent>/salvage-<tag>` and its `-run` directory, never while a postmaster runs on it.
_REMOVE_COPY = r"""
set -eu
parent="$1"; copy="$2"; pg_ctl="$3"
[ "$(dirname -- "$copy")" = "$parent" ] || { echo "refusing: $copy is not in $parent" >&2; exit 3; }
case "$(basename -- "$copy")" in *-run) echo "refusing: $copy" >&2; exit 3;; salvage-?*) ;;
  *) echo "refusing: $copy is not a salvage copy" >&2; exit 3;; esac
if [ -d "$copy" ] && "$pg_ctl" status -D "$copy" >/dev/null 2>&1; then
  echo "refusing: PostgreSQL is running on $copy" >&2; exit 3; fi
removed=""
for d in "$copy" "$copy-run"; do if [ -e "$d" ] || [ -L "$d" ]; then rm -rf -- "$d"; removed="$removed $d"; fi; done
echo "removed$removed"
"""


#: foreign keys among user tables, as JSON pairs [child, parent] (`schema.table`)
FK_SQL = ("SELECT coalesce(json_agg(json_build_array(format('%s.%s', cn.nspname, cc.relname), "
          "format('%s.%s', pn.nspname, pc.relname))), '[]') FROM pg_constraint k "
          "JOIN pg_class cc ON cc.oid = k.conrelid JOIN pg_namespace cn ON cn.oid = cc.relnamespace "
          "JOIN pg_class pc ON pc.oid = k.confrelid JOIN pg_namespace pn ON pn.oid = pc.relnamespace "
          "WHERE k.contype = 'f' AND k.conrelid <> k.confrelid")


def parents_first(tables: list[str], edges: list[list[str]]) -> list[str]:
    """The tables ordered so a referenced table comes before the tables referencing it (stable otherwise)."""
    chosen = set(tables)
    parents = {t: {p for c, p in edges if c == t and p in chosen} for t in tables}
    out: list[str] = []
    while len(out) < len(tables):
        ready = [t for t in tables if t not in out and parents[t] <= set(out)]
        if not ready:  # a cycle: keep the given order for the rest (the apply's FK check decides)
            ready = [t for t in tables if t not in out]
        out.append(ready[0])
    return out


def pitr_facts(audit: AuditTrail, server: str, run_id: str | None) -> dict[str, Any]:
    """What dr_salvage needs from a dr_pitr run, from the audit trail (the record of truth).

    `run_id` None: the server's newest dr_pitr run with a successful report.
    """
    if run_id is None:
        reports = [e for e in audit.events(server=server, dag_id="dr_pitr", action="report", limit=50)
                   if e.get("outcome") == "ok"]
        if not reports:
            raise ValidationError("pitr_run_id", None, f"no successful dr_pitr of {server} in the audit trail: there is "
                                                       "nothing to salvage. Name the run with pitr_run_id")
        run_id = reports[0]["run_id"]
    events = audit.events(run_id=run_id, dag_id="dr_pitr", limit=2000)
    if not events:
        raise ValidationError("pitr_run_id", run_id, "no dr_pitr run with this id in the audit trail: copy the run id "
                                                     "from the Airflow UI or the DR page")

    def last_ok(action: str) -> dict[str, Any] | None:
        for e in events:  # newest first
            if e.get("action") == action and e.get("outcome") == "ok" and isinstance(e.get("details"), dict):
                return e["details"]
        return None

    if {e.get("server") for e in events if e.get("server")} - {server}:
        raise ValidationError("pitr_run_id", run_id, f"that dr_pitr run recovered another server, not {server}")
    report, aside, resolved, discarded = (last_ok(a) for a in ("report", "move_aside", "resolve_target", "discarded"))
    validate = last_ok("validate") or {}
    if report is None:
        raise ValidationError("pitr_run_id", run_id, "that dr_pitr run has not finished successfully: salvage runs "
                                                     "after a completed PITR (roll a failed one back instead)")
    if not resolved or not discarded or discarded.get("error") or not discarded.get("xid_ranges"):
        why = (discarded or {}).get("error") or "no list of discarded transactions (a PITR older than barman-dr's " \
                                                "target resolution, or nothing was discarded)"
        raise PreflightError(f"dr_pitr {run_id} recorded no usable list of discarded transactions ({why}): the "
                             "discarded rows cannot be told apart from the others. Nothing was touched. Fix: clear "
                             f"the task `discarded` of dr_pitr run {run_id} (only that task) so it decodes again, "
                             "then trigger dr_salvage again")
    requested = resolved.get("requested") or {}
    stop = resolved.get("stop") or {}
    stop_tx = discarded.get("stop_transaction") or {}
    incident: list[int] = []
    if requested.get("kind") == "xid" and not requested.get("inclusive", True) and stop_tx.get("xid") is not None:
        # the PITR targeted this very transaction (exclusive): it is the incident, never put back
        incident = [int(stop_tx["xid"]), *(int(x) for x in stop_tx.get("subxacts") or [])]
    # where the PITR recovered: the request's restore_to, or the delayed standby it promoted (source decision)
    chosen = (resolved.get("source") or {}) if isinstance(resolved.get("source"), dict) else {}
    restore_to = chosen.get("restore_to") if chosen.get("chosen") == "delayed_standby" else None
    return {"pitr_run_id": run_id, "restore_to": restore_to or validate.get("restore_to", "in_place"),
            "moved_to": (aside or {}).get("moved_to"), "moved_host": (aside or {}).get("host"),
            "stop": stop, "xid_ranges": discarded["xid_ranges"], "incident_xids": incident,
            "discarded_tables": discarded.get("tables") or {}, "discarded_total": discarded.get("total") or {},
            "updated_not_hot": discarded.get("updated_not_hot") or {}, "largest": discarded.get("largest") or [],
            "old_end_lsn": discarded.get("old_end_lsn")}


class SalvageMixin:
    """The typed salvage request, the PITR's facts, and where the rows come from and go to."""

    request: Any
    inventory: Any
    srv: Any

    @cached_property
    def sreq(self) -> SalvageRequest:
        if not isinstance(self.request, dict):
            raise ValidationError("request", self.request, "the validated request (XCom of validate_params) is missing")
        return SalvageRequest.from_dict(self.request)

    @property
    def server_name(self) -> str:
        return self.sreq.server

    def audit_target(self) -> str | None:
        try:
            return self.sreq.describe()
        except Exception:  # noqa: BLE001 - the request may be what failed
            return None

    @property
    def facts(self) -> dict[str, Any]:
        return dict(self.request.get("facts") or {})

    def excluded_xids(self) -> list[int]:
        """The incident (when the PITR targeted it by xid) and the transactions the request excludes."""
        return sorted({*(int(x) for x in self.facts.get("incident_xids") or []), *self.sreq.exclude_xids})

    def salvage_ranges(self) -> list[list[int]]:
        """The discarded transactions whose rows are put back: the PITR's list minus the excluded ones."""
        return subtract_xids(self.facts.get("xid_ranges") or [], self.excluded_xids())

    @property
    def target_instance(self) -> Instance:
        """The recovered server: where the rows go (the primary, or the standby the PITR recovered onto)."""
        rt = self.facts.get("restore_to") or "in_place"
        return self.srv.primary if rt == "in_place" else self.srv.standby(rt)

    def source(self) -> tuple[str, str]:
        """(host, directory) of the old timeline's data at the freeze: the moved-aside directory, or the fenced primary."""
        f = self.facts
        if f.get("restore_to", "in_place") == "in_place":
            if not f.get("moved_to"):
                raise PreflightError("the dr_pitr run recorded no moved-aside directory: nothing to read from")
            return str(f["moved_host"] or self.srv.primary.host), str(f["moved_to"])
        # recovered onto a standby: the old primary was fenced (stopped, untouched)
        return self.srv.primary.host, self.srv.primary.data_directory

    def copy_paths(self, tag: str) -> tuple[str, str]:
        host, src = self.source()
        return host, f"{posixpath.dirname(src.rstrip('/'))}/salvage-{tag}"

    def copy_instance(self, tag: str) -> Instance:
        _, copy = self.copy_paths(tag)
        return staged_instance(self.target_instance, copy)


class ValidateSalvageOperator(SalvageMixin, DrBaseOperator):
    """Step 1: params validated (no I/O), the audit trail writable, the server lock, the PITR's facts."""

    action = "salvage_validate"
    request_task_id = None

    def run(self, context: Any) -> dict[str, Any]:
        conf = {**dict(context["params"]), **dict(getattr(context.get("dag_run"), "conf", None) or {})}
        req = validate_salvage_conf(conf, self.inventory)
        self.request = req.to_dict()
        self.__dict__.pop("sreq", None)
        self.require_workers(req.server, context)
        # every run starts a postmaster on a copy: one DR run per server, plan-only included
        ServerLock(postgres_conn_id=self.audit_conn_id).acquire(req.server, dag_id=context["dag"].dag_id,
                                                                run_id=context["run_id"], purpose="salvage")
        facts = pitr_facts(self.audit(context), req.server, req.pitr_run_id)
        self.request = {**req.to_dict(), "pitr_run_id": facts["pitr_run_id"], "facts": facts}
        host, src = self.source()
        if not self.db(host).path_exists(f"{src}/PG_VERSION"):
            raise PreflightError(f"{host}:{src} (the old timeline's data directory of dr_pitr {facts['pitr_run_id']}) "
                                 "is gone: nothing to salvage from")
        tables = list(req.tables)
        if not tables:
            tables = sorted(t for t, c in facts["discarded_tables"].items()
                            if c.get("inserted") and "." in t and not t.startswith("relfilenode") and ":" not in t)
            # parents before children: the apply inserts in this order and checks foreign keys per statement
            dest = self.target_instance
            edges = json.loads(self.db(dest.host).psql(dest, FK_SQL, database=self.srv.database) or "[]")
            tables = parents_first(tables, edges)
        if not tables:
            raise ValidationError("tables", [], f"dr_pitr {facts['pitr_run_id']} discarded no inserted rows in a named "
                                               "table: nothing to salvage (name tables to check anyway)")
        self.request["tables"] = tables
        self.request["excluded_xids"] = self.excluded_xids()
        return self.request

    def next_action(self, context: Any, exc: BaseException) -> str | None:
        return "Nothing was touched. Correct the field named above and trigger again."


class PrepareCopyOperator(SalvageMixin, DrBaseOperator):
    """Step 2: copy the old data directory (never touch it) and start the copy as a private postmaster.

    `cp -a --reflink=auto` (instant on XFS/Btrfs, a full copy elsewhere) as a detached job
    on the database host (a retry attaches to it; a failed attempt's partial copy is
    removed and the copy starts again). The postmaster has no TCP, its own socket and log,
    archives nothing (`staged_start_options`); its stale files from the old primary are
    its own, in the copy.
    """

    action = "salvage_prepare"

    def __init__(self, *, shared_buffers: str = "128MB", copy_timeout: float = 6 * 3600, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.shared_buffers = shared_buffers
        self.copy_timeout = copy_timeout

    def run(self, context: Any) -> dict[str, Any]:
        tag = self.run_tag(context)
        host, src = self.source()
        _, copy = self.copy_paths(tag)
        db = self.db(host)
        jobs = self.inventory.db_host(host).job_dir
        job_id = f"salvage-copy-{tag}"
        status, stamp = db.host.reset_if_failed(jobs, job_id)
        parent = posixpath.dirname(copy)
        if stamp:
            db.host.run(sh_argv(_REMOVE_COPY, parent, copy, db._bin("pg_ctl")))
        elif status.state == "absent" and db.path_exists(copy):
            raise PreflightError(f"{copy} exists on {host} but no copy job of this run wrote it: refusing to use it")
        self.track_job(db.host, jobs, job_id)
        db.host.run_job(jobs, job_id, ["cp", "-a", "--reflink=auto", "--", src, copy], timeout=self.copy_timeout)
        inst = self.copy_instance(tag)
        what = f"stop the salvage PostgreSQL on {copy}"
        self.track_cleanup(db.host, [db._bin("pg_ctl"), "stop", "-D", copy, "-m", "immediate", "-w"], what)
        db.prepare_directory(inst.socket_directory)
        if db.status(copy) != "running":
            # a stale pid file copied from a primary that did not stop cleanly would keep the copy from starting;
            # never removed while a postmaster (an earlier attempt's) runs on the copy
            db.host.run(["rm", "-f", "--", f"{copy}/postmaster.pid", f"{copy}/standby.signal",
                         f"{copy}/recovery.signal"])
        db.start(inst, options=staged_start_options(inst, self.shared_buffers))
        ready_s = db.wait_ready(inst, timeout=600)
        self.untrack_cleanup(what)
        return {"host": host, "source": src, "copy": copy, "socket_directory": inst.socket_directory,
                "port": inst.port, "log_file": inst.log_file, "ready_s": ready_s, "job_id": job_id}

    def next_action(self, context: Any, exc: BaseException) -> str | None:
        return ("Nothing live was touched (the copy is this run's own; the old directory is untouched). Fix the cause "
                "and clear this task; the teardown removes the copy.")


class SalvageSource:
    """The copy's rows, read over SSH through psql on its private socket (it has no TCP)."""

    def __init__(self, op: DrBaseOperator, host: str, inst: Instance, database: str, xid_ranges: list[list[int]]):
        self.op, self.db, self.inst, self.database, self.xid_ranges = op, op.db(host), inst, database, xid_ranges
        self._loaded = False

    def __enter__(self) -> SalvageSource:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def rollback(self) -> None:
        """(a psycopg connection's method; the copy is read through psql, nothing to roll back)"""

    def psql(self, query: str) -> str:
        return self.db.psql(self.inst, query, database=self.database, timeout=600)

    def load_xids(self) -> None:
        """The discarded transactions' xid ranges, into a table of the copy (the copy is this run's own)."""
        if self._loaded:
            return
        stmts = ["CREATE SCHEMA IF NOT EXISTS barman_dr_salvage", "DROP TABLE IF EXISTS barman_dr_salvage.xids",
                 "CREATE TABLE barman_dr_salvage.xids (lo bigint NOT NULL, hi bigint NOT NULL)"]
        self.db.psql_each(self.inst, stmts, database=self.database)
        for i in range(0, len(self.xid_ranges), XID_CHUNK):
            chunk = self.xid_ranges[i:i + XID_CHUNK]
            values = ", ".join(f"({int(lo)}, {int(hi)})" for lo, hi in chunk)
            self.psql(f"INSERT INTO barman_dr_salvage.xids VALUES {values}")
        self._loaded = True

    def spec(self, qualified: str) -> Any:
        out = self.psql(spec_sql_for_psql(qualified))
        return spec_from_catalog(qualified, json.loads(out) if out else None, f"the old timeline's copy ({self.inst.name})")

    def copy_query(self, spec: Any, conn: Any) -> str:
        """The copy's rows of one table written by a discarded transaction (their xmin), as COPY text."""
        cols = sql.SQL(", ").join(sql.Identifier("t", c) for c in spec.column_names)
        lo = min((r[0] for r in self.xid_ranges), default=0)
        hi = max((r[1] for r in self.xid_ranges), default=-1)
        # the window first (cheap, and most rows are older than every discarded transaction), then the ranges
        q = sql.SQL("COPY (SELECT {cols} FROM {table} t WHERE t.xmin::text::bigint BETWEEN {lo} AND {hi} AND EXISTS "
                    "(SELECT 1 FROM barman_dr_salvage.xids x WHERE t.xmin::text::bigint BETWEEN x.lo AND x.hi)) "
                    "TO STDOUT").format(cols=cols, table=spec.ident, lo=sql.Literal(int(lo)), hi=sql.Literal(int(hi)))
        return q.as_string(conn)

    def feed(self, spec: Any, conn: Any) -> Any:
        self.load_xids()
        query = self.copy_query(spec, conn)
        argv = ["env", "PGCLIENTENCODING=UTF8", self.db._bin("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h",
                self.inst.socket_directory, "-p", str(self.inst.port), "-d", self.database, "-c", query]

        def run(write: Any) -> None:
            r = self.db.host.stream_lines(argv, lambda line: write(line + "\n"), timeout=600)
            if r.exit_code != 0:
                raise BarmanDrError(f"reading {spec.qualified} from the copy failed (exit {r.exit_code}): "
                                    f"{r.stderr.strip()[-500:]}")
        return run


class SalvageDiffMixin(SalvageMixin):
    """The surgical diff machinery, with the copy of the old timeline as the source."""

    #: the running task's context (the source is found through prepare_copy's XCom)
    context_ref: Any = None

    def connect_live(self) -> Any:
        from barman_dr.operators.surgical import pg_connect

        return pg_connect(self.target_instance.postgres_conn_id, self.srv.database, application_name="barman-dr-salvage")

    def connect_restored(self) -> Any:
        prep = self.upstream(self.context_ref, "prepare_copy") or {}  # type: ignore[attr-defined]
        if not prep.get("copy"):
            raise PreflightError("the salvage copy (XCom of prepare_copy) is missing: clear the run from prepare_copy")
        inst = self.copy_instance(self.run_tag(self.context_ref))  # type: ignore[attr-defined]
        return SalvageSource(self, prep["host"], inst, self.srv.database,  # type: ignore[arg-type]
                             self.salvage_ranges())

    def specs(self, live: Any, restored: Any) -> list[Any]:
        out = []
        for t in self.request["tables"]:
            spec = read_table_spec(live, t, f"the recovered server ({self.target_instance.name})")
            check_same_shape(spec, restored.spec(t))
            out.append(spec)
        return out

    def stage_rows(self, live: Any, restored: Any, spec: Any, n: int) -> int:
        return stage_table_from(live, spec, stage_name(n), restored.feed(spec, live))

    def deleted_after_target(self, table: str) -> int:
        return int((self.facts.get("discarded_tables") or {}).get(table, {}).get("deleted") or 0)


class SalvagePlanOperator(SalvageDiffMixin, SurgicalPlanOperator):
    """Step 3: per table, the discarded rows (the copy's rows written by a discarded transaction) diffed by key.

    Staged on the recovered server inside a transaction that is rolled back: a plan leaves
    nothing behind. Stops here (skipped) unless confirmed.
    """

    action = "salvage_plan"

    def run(self, context: Any) -> dict[str, Any]:
        self.context_ref = context
        req, srv = self.sreq, self.srv
        tables = self.diff_tables()
        rows = []
        for t in tables:
            rows.append({"table": t["table"], "primary_key": t["primary_key"], "discarded_rows": t["restored_rows"],
                         "to_insert": t["missing"], "conflicts": t["changed"], "identical": t["unchanged"],
                         "deleted_after_target_left_alone": self.deleted_after_target(t["table"]),
                         "insert_keys": t["missing_keys"], "insert_sample": t["missing_sample"],
                         "conflict_sample": t["changed_sample"]})
        not_hot = self.facts.get("updated_not_hot") or {}
        warnings = [f"{t}: {not_hot[t]} row(s) were UPDATEd (not HOT) after the target; an UPDATE that changed the "
                    "primary key (or moved the row to another partition) leaves a new key that is re-inserted next to "
                    "the recovered old row: check the insert sample" for t in self.request["tables"] if not_hot.get(t)]
        plan = {"server": srv.name, "pitr_run_id": req.pitr_run_id, "stop": self.facts.get("stop"),
                "excluded_xids": self.excluded_xids(), "incident_xids": self.facts.get("incident_xids") or [],
                "largest_discarded": self.facts.get("largest") or [], "warnings": warnings,
                "destination": self.target_instance.name, "confirmed": req.confirmed, "tables": rows,
                "totals": {k: sum(r[k] for r in rows) for k in ("discarded_rows", "to_insert", "conflicts",
                                                                "deleted_after_target_left_alone")}}
        self.audit(context).record("salvage_plan", "planned", server=srv.name, target=req.describe(), details=plan)
        lines = [f"SALVAGE plan for {srv.name}" + plan_state(req),
                 f"from dr_pitr {req.pitr_run_id} (stopped {(self.facts.get('stop') or {}).get('described', '?')})"]
        if plan["incident_xids"]:
            lines.append(f"never put back: transaction {plan['incident_xids'][0]} (the PITR's target: the incident)")
        if req.exclude_xids:
            lines.append(f"excluded on request: {', '.join(map(str, req.exclude_xids))}")
        largest = [f"xid {t['xid']} ({t['rows']} rows, {str(t['commit_time'])[11:19]})"
                   for t in plan["largest_discarded"][:5]]
        if largest:
            lines.append("largest discarded transactions (exclude_xids to leave one out): " + ", ".join(largest))
        for r in rows:
            keys = r["insert_keys"] or {}
            lines.append(f"{r['table']}: {r['discarded_rows']} rows written after the target; INSERT {r['to_insert']}"
                         + (f" (keys {keys.get('first')}..{keys.get('last')})" if keys else "")
                         + f", CONFLICTS {r['conflicts']} (left alone), identical {r['identical']}; deleted after the "
                           f"target: {r['deleted_after_target_left_alone']} (left deleted)")
        lines += [f"warning: {w}" for w in warnings]
        if not req.confirmed:
            lines.append(f"to apply: approve in Required Actions (a second person), or trigger again with confirm = "
                         f"{req.confirm_text()}")
        set_run_note(context["dag"].dag_id, context["run_id"], "\n".join(lines))
        self.log.info("%s", "\n".join(lines))
        plan["text"] = "\n".join(lines)
        return plan

    def next_action(self, context: Any, exc: BaseException) -> str | None:
        return "Nothing was changed (the plan's transaction is rolled back). Fix the cause and trigger again."


class SalvageApplyOperator(SalvageDiffMixin, SurgicalApplyOperator):
    """Step 4 (confirmed runs): the discarded rows re-inserted in ONE transaction, conflicts never overwritten.

    The surgical apply (REPEATABLE READ, bounded lock waits, verified counts, retried whole
    on a serialization failure, audited before COMMIT) with `restore_changed` off. After
    COMMIT, each sequence owned by a salvaged table's columns is advanced past the highest
    re-inserted key, so the app's next inserts do not collide with them.
    """

    action = "salvage_apply"
    applying_action = "salvage_apply"
    applied_action = "salvage_applied"
    noun = "SALVAGE"

    def confirmed(self) -> bool:
        return self.sreq.confirmed

    def restore_changed(self) -> bool:
        return False

    def target_text(self) -> str:
        return self.sreq.describe()

    def before_commit(self, live: Any) -> Any:
        """Advance the sequences past the re-inserted keys *before* COMMIT (setval is not transactional):
        from the moment the rows are visible, the app's next inserts cannot collide with them."""
        return self.advance_sequences(live)

    def advance_sequences(self, live: Any) -> list[dict[str, Any]]:
        """Each sequence owned by a salvaged table's column, moved to the column's highest value when behind."""
        out = []
        with live.cursor() as cur:
            for t in self.request["tables"]:
                ident = sql.Identifier(*t.split(".", 1))
                cur.execute("SELECT a.attname, pg_get_serial_sequence(%s, a.attname) FROM pg_attribute a "
                            "WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped",
                            (ident.as_string(live),) * 2)
                for col, seq in cur.fetchall():
                    if not seq:
                        continue
                    cur.execute(sql.SQL("SELECT max({c})::bigint FROM {t}").format(c=sql.Identifier(col), t=ident))
                    top = cur.fetchone()[0]
                    cur.execute("SELECT pg_sequence_last_value(%s::regclass)", (seq,))
                    last = cur.fetchone()[0]
                    if top is not None and (last is None or top > last):
                        cur.execute("SELECT setval(%s::regclass, %s)", (seq, top))
                        out.append({"sequence": seq, "column": f"{t}.{col}", "from": last, "to": top})
        return out

    def run(self, context: Any) -> dict[str, Any]:
        self.context_ref = context
        req, srv = self.sreq, self.srv
        if not self.approved(context):
            raise AirflowSkipException("not approved")
        done = self.apply_once(context)
        results = done["tables"]
        sequences = done.pop("before_commit", None) or []
        counts = self.live_counts()
        applied = {"server": srv.name, "pitr_run_id": req.pitr_run_id, **done, "sequences_advanced": sequences,
                   "totals": {"inserted": sum(int(t["inserted"]) for t in results),
                              "skipped_on_conflict": sum(int(t["skipped_on_conflict"]) for t in results),
                              "conflicts_left_alone": sum(int(t["changed_left_alone"]) for t in results)},
                   "live_counts_after": counts}
        self.audit(context).record(self.applied_action, "ok", server=srv.name, target=req.describe(), details=applied)
        lines = [f"SALVAGE {srv.name} APPLIED in one transaction ({done['transaction_s']}s): rows discarded by dr_pitr "
                 f"{req.pitr_run_id}"]
        for t in results:
            keys = t["inserted_keys"] or {}
            lines.append(f"{t['table']}: re-inserted {t['inserted']}"
                         + (f" (keys {keys.get('first')}..{keys.get('last')})" if keys else "")
                         + f", skipped on a unique conflict {t['skipped_on_conflict']}, conflicts left alone "
                           f"{t['changed_left_alone']}")
        if sequences:
            lines.append("sequences advanced: " + ", ".join(f"{s['sequence']} -> {s['to']}" for s in sequences))
        lines.append(f"counts now {counts}")
        set_run_note(context["dag"].dag_id, context["run_id"], "\n".join(lines))
        return applied

    def next_action(self, context: Any, exc: BaseException) -> str | None:
        return ("Nothing was applied unless the audit trail holds a salvage_applied event for this run (one "
                "transaction). Read the error above, then clear this task or trigger again.")


class SalvageTeardownOperator(SalvageMixin, DrBaseOperator):
    """Always runs (all_done): stop the copy's postmaster, delete the copy (this run's own), release the lock."""

    action = "salvage_teardown"

    def execute(self, context: Any) -> Any:
        conf = {**dict(context.get("params") or {}), **dict(getattr(context.get("dag_run"), "conf", None) or {})}
        server = conf.get("server")
        if not isinstance(server, str) or server not in self.inventory.servers:
            return {"server": server, "skipped": "unknown server: nothing to tear down"}
        dag_id, run_id = context["dag"].dag_id, context["run_id"]
        lock = ServerLock(postgres_conn_id=self.audit_conn_id)
        holder = lock.holder(server)
        out: dict[str, Any] = {"server": server, "lock_released": False}
        if holder is None or (holder.dag_id, holder.run_id) != (dag_id, run_id):
            out["skipped"] = (f"server locked by {holder.dag_id} {holder.run_id}" if holder
                              else "this run holds no lock: it touched nothing")
            return out
        prep = context["ti"].xcom_pull(task_ids="prepare_copy") or {}
        request = context["ti"].xcom_pull(task_ids="validate_params")
        try:
            if isinstance(request, dict) and request.get("facts"):
                self.request = request
                tag = self.run_tag(context)
                host, copy = self.copy_paths(tag)
                db = self.db(host)
                inst = self.copy_instance(tag)
                if db.path_exists(copy):
                    out["stopped"] = db.stop(inst, mode="fast", timeout=120)
                out["removed"] = db.host.run(sh_argv(_REMOVE_COPY, posixpath.dirname(copy), copy,
                                                     db._bin("pg_ctl"))).stdout.split()[1:]
                out["copy"] = prep.get("copy") or copy
        finally:
            out["lock_released"] = lock.release(server, dag_id=dag_id, run_id=run_id)
            AuditTrail(postgres_conn_id=self.audit_conn_id, context=self.audit_context(context)).record(
                self.action, "ok", server=server, details=out)
        return out


class SalvageFailureSummaryOperator(SalvageMixin, DrBaseOperator):
    """Runs when any step failed: whether the recovered server was changed, and what next; then fails."""
    runs_on_site = False  # bookkeeping: the `default` queue

    action = "failure_summary"

    def run(self, context: Any) -> dict[str, Any]:
        failures = self.run_failures(context)
        failed = [f["task"] for f in failures]
        applied = False
        try:
            applied = any(e["outcome"] == "ok" for e in self.audit(context).events(
                run_id=context["run_id"], dag_id=context["dag"].dag_id, action="salvage_applied", limit=5))
        except BarmanDrError:
            applied = False
        live = ("the rows WERE re-inserted (see the salvage_applied audit event)" if applied else
                "the recovered server was not changed by this run")
        summary = {"failed_tasks": failed, "live": live,
                   "next_action": "read the failed task's log; the teardown removed the copy; fix and trigger again"}
        set_run_note(context["dag"].dag_id, context["run_id"],
                     f"SALVAGE FAILED at {failures[0]['task'] + ': ' + failures[0]['error'][:600] if failures else '?'}; "
                     f"{live}; next: {summary['next_action']}")
        return summary

    def execute(self, context: Any) -> Any:
        summary = super().execute(context)
        raise AirflowFailException(f"salvage failed at {', '.join(summary['failed_tasks']) or 'a step'}; "
                                   f"{summary['live']}. NEXT: {summary['next_action']}")
