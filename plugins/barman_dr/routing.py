"""Which Celery queue a task goes to: the workers beside the server's barman host, or `default`.

A barman host is often reachable only from nearby (its site), so every task that runs Barman
or SSH for a server must run on a worker beside that server's barman host. The inventory names
each host's `queue` (`barman_hosts.<name>.queue`). Two cases:

- The scheduled DAGs build one task per barman host at parse time, so they set `queue=` there
  (`barman_dr.fleet.queue_by_pool`).
- `dr_pitr`, `dr_surgical_recovery`, `dr_salvage`, `dr_pitr_rollback` and `dr_find_target`
  learn their server from a runtime Param, after parsing. Their site-bound operators carry the
  placeholder queue `SITE_QUEUE`, and the cluster policy `task_instance_mutation_hook` (loaded
  through `plugins/airflow_local_settings.py`) replaces it with the queue of the run's server
  when the scheduler creates the task instance. A retry keeps the queue of its first try.

LocalExecutor ignores queues, so all of this is inert there.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from barman_dr.exceptions import PreflightError

log = logging.getLogger(__name__)

#: parse-time placeholder of a site-bound task; never a real queue (no worker serves it)
SITE_QUEUE = "barman-dr-site"
DEFAULT_QUEUE = "default"


def queue_for_run(conf: dict[str, Any] | None) -> str:
    """The queue of the run's server (`conf["server"]`, else the Param default: the first server).

    An unknown or hostile server goes to `default`: validate_params refuses the run there, and
    nothing site-bound runs after a refusal. Never raises (the scheduler calls this).
    """
    try:
        from barman_dr.inventory import load_inventory, server_names_for_dags

        inv = load_inventory()
        server = (conf or {}).get("server")
        if isinstance(server, str):
            server = server.strip() or None  # as the request's validation reads it
        if server is None:
            names = server_names_for_dags()
            server = names[0] if names else None
        if not isinstance(server, str) or server not in inv.servers:
            return DEFAULT_QUEUE
        return inv.queue_of(server)
    except Exception:
        log.exception("barman-dr routing: cannot read the inventory; routing to %r", DEFAULT_QUEUE)
        return DEFAULT_QUEUE


def task_instance_mutation_hook(task_instance: Any, dag_run: Any = None) -> None:
    """Cluster policy: route a site-bound task instance to its run's server's queue.

    Runs inside the scheduler's transaction: no database access here (the inventory is a file).
    `dag_run` is None while a task instance is being constructed; the scheduler calls again
    with the run before the instance is stored.
    """
    if getattr(task_instance, "queue", None) != SITE_QUEUE or dag_run is None:
        return
    task_instance.queue = queue_for_run(getattr(dag_run, "conf", None))


def worker_hostname() -> str:
    """`[core] hostname_callable`: each lab worker records its own name on the task instances it
    runs (all workers share one machine, so the FQDN would not tell them apart)."""
    return os.environ.get("BARMAN_DR_WORKER_HOSTNAME") or socket.getfqdn()


class QueueNotServedError(PreflightError):
    """The broker is unreachable, or no live worker serves a queue this run needs."""


def celery_enabled() -> bool:
    from airflow.configuration import conf

    return "CeleryExecutor" in (conf.get("core", "executor", fallback="") or "")


def served_queues(timeout: float = 3.0) -> dict[str, list[str]]:
    """{worker name: [queues]} of the Celery workers answering a broadcast now (`inspect active_queues`).

    The worker name is the part of the Celery node name before '@'. Raises QueueNotServedError when
    the broker cannot be reached (Redis down, wrong password).
    """
    from airflow.providers.celery.executors.celery_executor_utils import app

    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=timeout)
        answers = app.control.inspect(timeout=timeout).active_queues() or {}
    except Exception as exc:
        broker = str(app.conf.broker_url or "")
        safe = broker.split("@")[-1] if "@" in broker else broker
        why = str(exc).rstrip(".")
        raise QueueNotServedError(f"the Celery broker ({safe}) cannot be reached: {type(exc).__name__}: {why}. "
                                  "Start Redis (or fix [celery] broker_url); nothing was run") from exc
    return {node.split("@")[0]: sorted(q["name"] for q in qs) for node, qs in answers.items()}


def require_served(queues: list[str], timeout: float = 3.0) -> dict[str, list[str]]:
    """Refuse a run whose queues no live worker serves (before any side effect), naming the queue and the fix.

    LocalExecutor: nothing to check (returns {}).
    """
    if not celery_enabled():
        return {}
    missing: list[str] = []
    for _attempt in range(3):  # a busy worker may miss one broadcast's window: ask again before refusing
        live = served_queues(timeout)
        served = {q for qs in live.values() for q in qs}
        missing = [q for q in queues if q not in served]
        if not missing:
            break
    if missing:
        who = "; ".join(f"{w}: {', '.join(qs)}" for w, qs in sorted(live.items())) or "no worker answered"
        raise QueueNotServedError(f"no live Celery worker serves queue(s) {', '.join(missing)} that this run needs "
                                  f"(live workers: {who}). Start a worker with `airflow celery worker -q "
                                  f"{','.join(missing)}` beside the barman host, or fix barman_hosts.*.queue in the "
                                  "inventory; nothing was run")
    return live
