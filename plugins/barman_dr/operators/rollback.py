"""dr_pitr_rollback: put the data directory a PITR moved aside back in place.

The way back when a PITR failed after the move (the restored server does not start, the
target was not reached) or when the recovered data is judged wrong. The moved-aside path
is read from the audit trail of the PITR run (never typed by hand); whatever is in the
data directory now is itself moved aside, never deleted. The app stays frozen until the
old server accepts connections again.
"""

from __future__ import annotations

import re
from typing import Any

from barman_dr.exceptions import PreflightError, ValidationError
from barman_dr.operators.base import DrBaseOperator, utcnow
from barman_dr.operators.pitr import app_connectivity, freeze_app, staging_leftover
from barman_dr.safety.appfreeze import PgBouncerAdmin
from barman_dr.safety.locks import ServerLock

RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,249}\Z")


def validate_rollback_conf(conf: dict[str, Any], servers: list[str]) -> dict[str, Any]:
    server = conf.get("server")
    if not isinstance(server, str) or server not in servers:
        raise ValidationError("server", server, f"must be one of: {', '.join(servers)}")
    run_id = conf.get("pitr_run_id")
    if not isinstance(run_id, str) or not RUN_ID_RE.match(run_id):
        raise ValidationError("pitr_run_id", run_id, "the run id of the dr_pitr run to roll back (see its audit trail)")
    confirm = conf.get("confirm")
    expected = f"ROLLBACK {server}"
    if confirm != expected:
        raise ValidationError("confirm", confirm, f"type exactly '{expected}' to put the old data directory back")
    return {"server": server, "pitr_run_id": run_id}


class PitrRollbackOperator(DrBaseOperator):
    """Freeze, stop, move the PITR's result aside, move the original back, start, unfreeze."""

    action = "rollback"
    request_task_id = None

    def audit_server(self) -> str | None:
        return (self.request or {}).get("server") if isinstance(self.request, dict) else None

    def audit_target(self) -> str | None:
        return None

    def run(self, context: Any) -> dict[str, Any]:
        conf = {**dict(context["params"]), **dict(getattr(context.get("dag_run"), "conf", None) or {})}
        req = validate_rollback_conf(conf, self.inventory.server_names)
        self.request = req
        srv = self.srv
        trail = self.audit(context)
        events = trail.events(run_id=req["pitr_run_id"], action="move_aside", dag_id="dr_pitr")
        moved = [e for e in events if e["outcome"] == "ok" and (e["details"] or {}).get("moved_to")]
        # a staged restore's directories (restore copies, never live data): reported, never touched here
        staged = [e["details"] for e in trail.events(run_id=req["pitr_run_id"], action="staging_directory",
                                                     dag_id="dr_pitr") if isinstance(e["details"], dict)]
        leftover = sorted({p for d in staged for p in staging_leftover(self, d)})
        if not moved:
            raise PreflightError(f"the audit trail has no moved-aside data directory for dr_pitr run "
                                 f"{req['pitr_run_id']!r}: nothing to roll back"
                                 + (f"; its staging directories are still there: {', '.join(leftover)} (restore "
                                    "copies, not live data: delete them once no longer needed)" if leftover else ""))
        d = moved[0]["details"]
        instance = next((i for i in (srv.primary, *srv.standbys) if i.data_directory == d["data_directory"]), None)
        if instance is None:
            raise PreflightError(f"{d['data_directory']} is not a data directory of {srv.name} in the inventory")
        lock = ServerLock(postgres_conn_id=self.audit_conn_id)
        lock.acquire(srv.name, dag_id=context["dag"].dag_id, run_id=context["run_id"], purpose="rollback")
        try:
            db = self.db(instance.host)
            if not db.path_exists(d["moved_to"]):
                raise PreflightError(f"{d['moved_to']} no longer exists on {instance.host}")
            freeze = freeze_app(self)
            if freeze.get("frozen"):
                # the rollback owns the server until its own "rollback ok": a failure after this leaves the app
                # frozen, and the ownership rule and dr_freeze_guard must see who froze it
                self.audit(context).record("freeze_app", "ok", server=srv.name, details={**freeze, "by": "rollback"})
            db.stop(instance)
            out = db.move_back(instance.data_directory, d["moved_to"], f"rollback-{self.run_tag(context)}")
            db.start(instance, wait=False)
            db.wait_ready(instance, timeout=300)
            in_recovery = db.in_recovery(instance)
            if srv.app_freeze.method == "pgbouncer":
                PgBouncerAdmin(srv.app_freeze).resume()
            check = app_connectivity(srv.app_freeze.app_conn_id)
            try:
                self.barman.cron()  # WAL streaming from the server that is back
            except Exception as exc:  # noqa: BLE001 - reported, the rollback itself succeeded
                self.log.warning("barman cron after rollback: %s", exc)
        finally:
            lock.release(srv.name, dag_id=context["dag"].dag_id, run_id=context["run_id"])
        return {"server": srv.name, "restored": d["moved_to"], "into": instance.data_directory,
                "move_back": out.strip().splitlines(), "in_recovery": in_recovery, "freeze": freeze,
                "app_check": check, "resumed_at": utcnow(), "staging_leftover": leftover,
                "warning": "Barman's archive now also holds the PITR's timeline; take a new full backup."
                + (f" The PITR's staging directories are left: {', '.join(leftover)} (restore copies, not live data: "
                   "delete them once no longer needed)." if leftover else "")}

    @property
    def server_name(self) -> str:
        """The validated `server` param (set in run()); the base's `srv` and `barman` follow from it."""
        return self.request["server"]

    def next_action(self, context: Any, exc: BaseException) -> str | None:
        return ("Nothing is deleted: the original and the PITR result are both kept as directories next to the data "
                "directory. The app may still be frozen: RESUME it on the PgBouncer console once a server runs.")
