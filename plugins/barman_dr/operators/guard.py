"""dr_freeze_guard's step: alert when a DR run left an app frozen longer than the server allows.

See `barman_dr.safety.freeze_guard` for the why. One task for the whole inventory: it reads the
PgBouncer consoles and the ops database only (no Barman, no SSH), so it is cheap enough
to run every few minutes, and it does not depend on any task of the frozen run.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from airflow.sdk import BaseOperator

from barman_dr.inventory import Server, load_inventory
from barman_dr.safety.appfreeze import PgBouncerAdmin
from barman_dr.safety.audit import AuditContext, AuditTrail
from barman_dr.safety.freeze_guard import ALERT, assess
from barman_dr.safety.ownership import Owner, owner_of
from barman_dr.surfaces.notifications import DrNotifier


class FreezeGuardOperator(BaseOperator):
    """For every server: frozen? by which run? for how long? Alert past `max_freeze_seconds`; never unfreeze."""

    ui_color = "#fdecea"

    def __init__(self, *, audit_conn_id: str = "dr_audit", inventory_path: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.audit_conn_id = audit_conn_id
        self.inventory_path = inventory_path

    def paused(self, srv: Server) -> bool | None:
        if srv.app_freeze.method != "pgbouncer":
            return None  # a freeze command cannot be observed: the audit trail alone decides
        try:
            return PgBouncerAdmin(srv.app_freeze).state().paused
        except Exception as exc:  # noqa: BLE001 - an unreachable console must not hide the audit's answer
            self.log.warning("%s: PgBouncer state unknown: %s", srv.name, exc)
            return None

    def execute(self, context: Any) -> dict[str, Any]:
        inventory = load_inventory(self.inventory_path)
        audit = AuditTrail(postgres_conn_id=self.audit_conn_id, context=AuditContext.from_airflow(context))
        now = datetime.now(UTC)
        verdicts: dict[str, Any] = {}
        errors = {}
        for name in inventory.server_names:
            try:
                verdicts[name] = self.check(context, audit, inventory.server(name), now)
            except Exception as exc:  # one server's broken check must not hide the others
                self.log.exception("%s: the freeze check failed", name)
                errors[name] = f"{type(exc).__name__}: {exc}"[:500]
        if errors:  # after every server was checked: the run fails, DrNotifier pages that the guard is blind
            raise RuntimeError(f"dr_freeze_guard could not check {sorted(errors)}: {errors}")
        return {"checked_at": now.isoformat(), "servers": verdicts,
                "alerts": sorted(n for n, v in verdicts.items() if v["status"] == ALERT)}

    def check(self, context: Any, audit: AuditTrail, srv: Server, now: datetime) -> dict[str, Any]:
        """One server: frozen? by which run? past max_freeze? Alert (once per max_freeze) when it is."""
        name = srv.name
        owners = owner_of(name, postgres_conn_id=self.audit_conn_id)
        frozen_by = next((o for o in owners if o.reason == "app_frozen"), None)
        lock = next((o for o in owners if o.reason == "lock"), None)
        run_events = audit.events(run_id=frozen_by.run_id, dag_id=frozen_by.dag_id, limit=300) if frozen_by else []
        verdict = assess(name, paused=self.paused(srv), frozen_by=frozen_by, lock=lock, run_events=run_events,
                         last_alert_at=self.last_alert(audit, name, frozen_by), now=now,
                         max_freeze_s=srv.max_freeze_seconds)
        self.log.log(40 if verdict.status == ALERT else 20, "%s%s", verdict.message,
                     f"\nNEXT: {verdict.next_step}" if verdict.next_step else "")
        if verdict.status == ALERT and not verdict.repeat:
            audit.record("freeze_guard", "critical", server=name, details=verdict.to_dict())
            DrNotifier().deliver(context, {
                "message": f"{name}: app frozen for {verdict.frozen_for_s or 0:.0f}s by "
                           f"{verdict.dag_id or '?'} run {verdict.run_id or '?'}",
                "server": name, "error": verdict.message, "next_action": verdict.next_step,
                "run_id_frozen": verdict.run_id}, outcome="critical")
        return verdict.to_dict()

    @staticmethod
    def last_alert(audit: AuditTrail, server: str, frozen_by: Owner | None) -> str | None:
        """When this freeze (the same run, or no run) was last alerted on: alerts repeat once per max_freeze."""
        run_id = frozen_by.run_id if frozen_by else None
        for e in audit.events(server=server, action="freeze_guard", limit=50):
            if (e.get("details") or {}).get("run_id") == run_id:
                return e["event_time"]
        return None
