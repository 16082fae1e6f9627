"""RTO deadline alerts: Airflow's own `DeadlineAlert`, one per RTO objective in the inventory.

A DAG's deadline is fixed when the DAG is parsed, while a DR run's server (and so its RTO
objective) comes with the run. So each DAG gets one alert per distinct objective of the
inventory's servers, measured from when the run was queued (trigger -> recovered, the
incident commander's clock). When one fires, its callback looks at the run's server and
pages only if that server's objective is the one that passed: exactly one alert speaks for
a run, at its own server's objective, and none after the run has finished (Airflow prunes
a finished run's deadlines).

The callback is a `SyncCallback`: it runs on an executor (LocalExecutor and Celery both
run callbacks), where the audit trail and DrNotifier's connections are available.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

log = logging.getLogger(__name__)

CALLBACK = "barman_dr.surfaces.deadlines.rto_missed"


def objectives(servers: list[Any]) -> list[int]:
    """The distinct RTO objectives (seconds) of these servers, smallest first."""
    return sorted({int(s.rto_objective_seconds) for s in servers if s.rto_objective_seconds})


def rto_deadlines(kind: str, servers: list[Any] | None = None) -> list[Any]:
    """`DeadlineAlert`s for a DAG (`kind`: pitr or drill); [] when the inventory cannot be read at parse time."""
    from airflow.sdk import DeadlineAlert, DeadlineReference, SyncCallback

    if servers is None:
        try:
            from barman_dr.inventory import load_inventory

            servers = list(load_inventory().servers.values())
        except Exception:  # noqa: BLE001 - a DAG file must parse without its inventory (CI, docs)
            return []
    return [DeadlineAlert(reference=DeadlineReference.DAGRUN_QUEUED_AT, interval=timedelta(seconds=s),
                          callback=SyncCallback(CALLBACK, kwargs={"objective_s": s, "kind": kind}),
                          name=f"rto_{kind}_{s}s") for s in objectives(servers)]


def servers_at(kind: str, conf: dict[str, Any], objective_s: int, inventory: Any) -> list[str]:
    """The run's servers whose RTO objective is `objective_s` (the one alert that speaks for them)."""
    if kind == "pitr":
        if conf.get("plan_only"):
            return []  # a preview: nothing to recover, no objective to miss
        names = [conf.get("server") or sorted(inventory.servers)[0]]  # the form's default: the first sorted name
    else:  # the drill restores every server that has a nonprod target
        names = [n for n, s in inventory.servers.items() if s.nonprod is not None]
    return [n for n in names if n in inventory.servers and inventory.servers[n].rto_objective_seconds == objective_s]


def rto_missed(objective_s: int, kind: str, context: dict[str, Any] | None = None) -> None:
    """A run is still unfinished `objective_s` after it was queued: page through DrNotifier (audited)."""
    from barman_dr.inventory import load_inventory
    from barman_dr.surfaces.notifications import DrNotifier

    run = (context or {}).get("dag_run") or {}
    state = str(run.get("state") or "")
    if state in ("success", "failed"):
        return
    conf = run.get("conf") or {}
    servers = servers_at(kind, conf, objective_s, load_inventory())
    if not servers:
        return  # another objective's alert speaks for this run
    dag_id, run_id = run.get("dag_id"), run.get("dag_run_id") or run.get("run_id")
    what = "PITR" if kind == "pitr" else "restore drill"
    ctx = {"dag_run": SimpleNamespace(run_id=run_id, conf=conf, triggering_user_name=run.get("triggering_user_name")),
           "ti": SimpleNamespace(dag_id=dag_id, run_id=run_id, task_id="rto_deadline", try_number=None)}
    DrNotifier().deliver(ctx, {
        "message": f"RTO objective missed: {what} {dag_id} run {run_id} of {', '.join(servers)} is still {state or 'running'} "
                   f"{objective_s}s after it was queued (objective {objective_s}s)",
        "server": servers[0], "servers": servers, "run_id": run_id, "dag_id": dag_id, "objective_s": objective_s,
        "queued_at": run.get("queued_at"), "deadline": (context or {}).get("deadline"),
        "next_action": "open the run: is it waiting for an approval, stuck in a step, or just slow? The app stays "
                       "frozen only while the run is between freeze_app and unfreeze_app"}, outcome="critical")
