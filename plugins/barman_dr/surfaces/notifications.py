"""DrNotifier: failure notifications of the DR DAGs (audit trail, e-mail, chat webhook).

An Airflow notifier (BaseNotifier) used as `on_failure_callback`: it always writes a
`notify` event to the audit trail (which the DR page and on-call tooling read), then
sends to whichever channels are configured as Airflow connections:

* `smtp_default`: a plain e-mail (host, port, login, password; `extra` may hold
  {"from": ..., "to": [...], "starttls": true}).
* `dr_webhook`: a Slack-style incoming webhook. The webhook URL is a secret (whoever has
  it can post), so it lives in the connection's **password** (Airflow masks passwords in
  logs) or, failing that, in `extra.webhook_url`. `extra.format` is `slack` (default:
  `{"text": ...}`, also accepted by Mattermost, Rocket.Chat and Teams workflow hooks) or
  `json` (the full details object, for incident tooling); `extra.channel` is passed on.

Never raises: a broken notification must not mask the failure it reports.
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
                 audit_conn_id: str = "dr_audit", smtp_conn_id: str = "smtp_default",
                 webhook_conn_id: str = "dr_webhook") -> None:
        super().__init__()
        self.message = message
        self.audit_conn_id = audit_conn_id
        self.smtp_conn_id = smtp_conn_id
        self.webhook_conn_id = webhook_conn_id
        self._message_template = message

    def render_template_fields(self, context: Any, jinja_env: Any = None) -> None:
        """Render from the template every time: one notifier instance serves every task of the
        DAG (`default_args`), and Airflow renders template fields in place, so without this a
        second failure in the same process would repeat the first one's task id."""
        self.message = self._message_template
        super().render_template_fields(context, jinja_env)

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
        self.deliver(context, details)

    def deliver(self, context: Any, details: dict[str, Any], outcome: str = "failed") -> None:
        """Audit, mail and post `details` (its `message` is the subject); never raises.

        Failure callbacks go through `notify`; a check that finds something wrong without a
        task failing (dr_freeze_guard) calls this directly with outcome `critical`.
        """
        details.setdefault("message", self.message)
        try:
            from barman_dr.safety.audit import AuditContext, AuditTrail

            AuditTrail(postgres_conn_id=self.audit_conn_id, context=AuditContext.from_airflow(context)).record(
                "notify", outcome, server=details.get("server"), details=details)
        except Exception:
            log.exception("DrNotifier: could not write the audit event")
        self.message = str(details["message"])
        self._mail(details)
        self._webhook(details)

    def _mail(self, details: dict[str, Any]) -> None:
        conn = _connection(self.smtp_conn_id)
        if conn is None:
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

    def _webhook(self, details: dict[str, Any]) -> None:
        conn = _connection(self.webhook_conn_id)
        if conn is None:
            return
        extra = conn.extra_dejson or {}
        url = str(conn.password or extra.get("webhook_url") or "")
        if not url.startswith(("http://", "https://")):
            log.warning("DrNotifier: connection %s has no http(s) webhook URL (password or extra.webhook_url)",
                        self.webhook_conn_id)
            return
        payload = webhook_payload(self.message, details, fmt=extra.get("format", "slack"), channel=extra.get("channel"))
        try:
            import json
            import urllib.request

            req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",  # noqa: S310 - http(s) only
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=15) as resp:  # noqa: S310 - checked above
                resp.read(1024)
        except Exception as exc:  # noqa: BLE001 - never mask the failure being reported
            # the URL is a secret: log the error type only, never the URL
            log.error("DrNotifier: webhook %s failed: %s", self.webhook_conn_id, type(exc).__name__)


def _connection(conn_id: str) -> Any | None:
    try:
        from airflow.sdk import BaseHook

        return BaseHook.get_connection(conn_id)
    except Exception:  # noqa: BLE001 - not configured: that channel is off
        return None


def webhook_payload(message: str, details: dict[str, Any], *, fmt: str = "slack",
                    channel: str | None = None) -> dict[str, Any]:
    """The webhook body: Slack's `{"text": ...}` with server, what failed and what to do next."""
    if fmt == "json":
        return {"source": "barman-dr", **details}
    server = details.get("server") or "?"
    lines = [f":rotating_light: *barman-dr* `{server}`: {message}"]
    if details.get("error"):
        lines.append(f"*What failed:* {details['error'][:1500]}")
    if details.get("next_action"):
        lines.append(f"*Next:* {details['next_action']}")
    body: dict[str, Any] = {"text": "\n".join(lines)}
    if channel:
        body["channel"] = channel
    return body
