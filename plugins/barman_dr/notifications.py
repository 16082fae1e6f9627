"""DrNotifier: failure notifications of the scheduled DR DAGs (audit trail, optionally e-mail).

An Airflow notifier (BaseNotifier) used as `on_failure_callback`: it always writes a
`notify` event to the audit trail (which the DR page and on-call tooling read), and sends
a plain e-mail when an Airflow connection `smtp_default` exists (host, port, login,
password; `extra` may hold {"from": ..., "to": [...], "starttls": true}). Never raises:
a broken notification must not mask the failure it reports.
"""

from __future__ import annotations

import logging
from typing import Any

from airflow.sdk.bases.notifier import BaseNotifier

log = logging.getLogger(__name__)


def _server_of(context: Any) -> str | None:
    """The server a failed task was about: a fleet task's `server`, else the run's params/conf."""
    task = context.get("task")
    server = getattr(task, "server", None)
    if isinstance(server, str) and server and "{{" not in server:
        return server
    for source in (getattr(context.get("dag_run"), "conf", None), context.get("params")):
        try:
            value = (source or {}).get("server")
        except AttributeError:
            value = None
        if isinstance(value, str) and value:
            return value
    return None


class DrNotifier(BaseNotifier):
    template_fields = ("message",)

    def __init__(self, message: str = "{{ dag.dag_id }} {{ run_id }}: task {{ ti.task_id }} failed",
                 audit_conn_id: str = "dr_audit", smtp_conn_id: str = "smtp_default") -> None:
        super().__init__()
        self.message = message
        self.audit_conn_id = audit_conn_id
        self.smtp_conn_id = smtp_conn_id

    def notify(self, context: Any) -> None:
        details: dict[str, Any] = {"message": self.message}
        ti = context.get("ti")
        if ti is not None:
            details["map_index"] = getattr(ti, "map_index", None)
        details["server"] = _server_of(context)
        exc = context.get("exception")
        if exc is not None:
            text = f"{type(exc).__name__}: {exc}"
            details["error"] = text[:4000]
            # our operators end their messages with "NEXT: <what the on-call DBA does now>"
            details["next_action"] = text.split("NEXT:", 1)[1].strip()[:1000] if "NEXT:" in text else (
                "see the task log and the audit trail (DR page), then clear the task or trigger again")
        try:
            from barman_dr.audit import AuditContext, AuditTrail

            AuditTrail(postgres_conn_id=self.audit_conn_id, context=AuditContext.from_airflow(context)).record(
                "notify", "failed", details=details)
        except Exception:
            log.exception("DrNotifier: could not write the audit event")
        self._mail(details)

    def _mail(self, details: dict[str, Any]) -> None:
        try:
            from airflow.sdk import BaseHook

            conn = BaseHook.get_connection(self.smtp_conn_id)
        except Exception:  # noqa: BLE001 - no smtp connection configured: audit only
            return
        try:
            import smtplib
            from email.message import EmailMessage

            extra = conn.extra_dejson or {}
            to = extra.get("to") or []
            if not to:
                return
            msg = EmailMessage()
            server = details.get("server") or "?"
            msg["Subject"] = f"[barman-dr] {server}: {self.message}"[:200]
            msg["From"] = extra.get("from") or (conn.login or "barman-dr@localhost")
            msg["To"] = ", ".join(to)
            msg.set_content("\n".join(f"{k}: {v}" for k, v in details.items()))
            with smtplib.SMTP(conn.host, conn.port or 25, timeout=20) as s:
                if extra.get("starttls"):
                    s.starttls()
                if conn.login and conn.password:
                    s.login(conn.login, conn.password)
                s.send_message(msg)
        except Exception:
            log.exception("DrNotifier: could not send e-mail")
