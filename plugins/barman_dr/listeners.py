"""Airflow listener: every failed DR task leaves an audit event, even if the operator crashed.

Operators write their own, richer events; this is the safety net for the failures they
never saw (an exception before their first audit call, a timeout, a killed worker that
Airflow marks failed). It runs in the task's process (Airflow 3 task runner) and must
never raise: a listener error would hide the task's real error.
"""

from __future__ import annotations

import logging
from typing import Any

from airflow.listeners import hookimpl

log = logging.getLogger(__name__)

DR_DAG_PREFIX = "dr_"


def _state_name(state: Any) -> str | None:
    return getattr(state, "value", None) or (str(state) if state is not None else None)


@hookimpl
def on_task_instance_failed(previous_state: Any, task_instance: Any, error: Any) -> None:
    dag_id = getattr(task_instance, "dag_id", "") or ""
    if not dag_id.startswith(DR_DAG_PREFIX):
        return
    try:
        from barman_dr.safety.audit import AuditContext, AuditTrail

        conf: dict[str, Any] = {}
        try:
            dag_run = task_instance.get_template_context().get("dag_run")  # RuntimeTaskInstance
            conf = dict(getattr(dag_run, "conf", None) or {})
        except Exception:  # noqa: BLE001 - ORM task instances (API server) have no template context
            conf = {}
        ctx = AuditContext(
            dag_id=dag_id,
            run_id=getattr(task_instance, "run_id", None),
            task_id=getattr(task_instance, "task_id", None),
            try_number=getattr(task_instance, "try_number", None),
            incident_id=str(conf.get("incident_id")) if conf.get("incident_id") else None,
        )
        final = _state_name(getattr(task_instance, "state", None))
        AuditTrail(context=ctx).record(
            "task_failed",
            "failed",
            server=str(conf.get("server")) if conf.get("server") else None,
            details={
                "error": f"{type(error).__name__}: {error}"[:4000] if error is not None else None,
                "state": final,
                "previous_state": _state_name(previous_state),
                "map_index": getattr(task_instance, "map_index", None),
                "will_retry": final == "up_for_retry",
            },
        )
    except Exception:  # noqa: BLE001 - never let the listener mask the task failure
        log.warning("barman-dr: could not record the task failure in the audit trail", exc_info=True)
