"""Parse-time view of the fleet for the scheduled DAGs: servers grouped by barman host pool, schedules.

Read from the raw inventory YAML without `${VAR}` expansion and without any network or
database access (DAG files import this; the dag processor must stay fast and offline).
Names never contain `${...}`, so the unexpanded document is enough.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from barman_dr.inventory import BarmanHost, inventory_path

#: default schedules (cron, the scheduler's timezone, UTC by default); override per DAG in the
#: inventory's top-level `schedules:` section, e.g. `schedules: {dr_daily_verification: "30 3 * * *"}`
DEFAULT_SCHEDULES = {
    "dr_weekly_full_backup": "0 2 * * 0",      # Sunday 02:00
    "dr_daily_verification": "30 3 * * *",     # every day 03:30
    "dr_monthly_restore_drill": "0 4 1 * *",   # the 1st of the month 04:00
    "dr_freeze_guard": "*/5 * * * *",          # every 5 minutes: an app left frozen is an outage
}


def _raw(path: str | Path | None) -> dict[str, Any]:
    p = Path(path) if path else inventory_path()
    try:
        raw = yaml.safe_load(p.read_text()) or {}
        return raw if isinstance(raw, dict) else {}
    except (OSError, yaml.YAMLError):
        return {}


def pool_name(barman_host: str) -> str:
    """The Airflow pool of a barman host (same rule as inventory.BarmanHost.pool)."""
    return BarmanHost(name=barman_host, address="", ssh_conn_id="-", barman_command=("barman",), job_dir="/",
                      backup_directory="/").pool


def servers_by_pool(path: str | Path | None = None) -> dict[str, list[str]]:
    """{pool name: [server names]}; never raises (a broken inventory must not hide DAGs)."""
    out: dict[str, list[str]] = {}
    try:
        for name, d in sorted((_raw(path).get("servers") or {}).items()):
            bh = (d or {}).get("barman_host") if isinstance(d, dict) else None
            if isinstance(bh, str):
                out.setdefault(pool_name(bh), []).append(str(name))
    except (AttributeError, TypeError):
        return {}
    return out


def pool_slots(path: str | Path | None = None) -> dict[str, int]:
    """{pool name: slots} from `barman_hosts.<name>.pool_slots` (for creating the pools)."""
    out = {}
    for name, d in (_raw(path).get("barman_hosts") or {}).items():
        try:
            out[pool_name(str(name))] = int((d or {}).get("pool_slots", 4))
        except (TypeError, ValueError, AttributeError):
            continue
    return out


def schedule_for(dag_id: str, path: str | Path | None = None) -> str:
    sched = (_raw(path).get("schedules") or {})
    value = sched.get(dag_id) if isinstance(sched, dict) else None
    return str(value) if isinstance(value, str) and value.strip() else DEFAULT_SCHEDULES[dag_id]


def queue_by_pool(path: str | Path | None = None) -> dict[str, str]:
    """{pool name: Celery queue} from `barman_hosts.<name>.queue` (default `default`): the scheduled
    DAGs' per-host tasks are sent to the workers beside that host. Never raises; a bad value is
    reported by `load_inventory` when a task runs."""
    out = {}
    for name, d in (_raw(path).get("barman_hosts") or {}).items():
        q = (d or {}).get("queue", "default") if isinstance(d, dict) else "default"
        out[pool_name(str(name))] = q if isinstance(q, str) and q else "default"
    return out


def workers(path: str | Path | None = None) -> dict[str, list[str]]:
    """{worker name: [queues]} from the inventory's `workers:` (what the lab starts and compose mirrors)."""
    out = {}
    for name, d in (_raw(path).get("workers") or {}).items():
        qs = (d or {}).get("queues") if isinstance(d, dict) else None
        if isinstance(qs, list):
            out[str(name)] = [str(q) for q in qs]
    return out


def pool_of(server: str, path: str | Path | None = None) -> str:
    """The pool (and so the per-host task id suffix) of `server`'s barman host; KeyError if unknown."""
    for pool, servers in servers_by_pool(path).items():
        if server in servers:
            return pool
    raise KeyError(server)


def worker_specs(path: str | Path | None = None) -> dict[str, tuple[list[str], int]]:
    """{worker name: (queues, concurrency)}: what the lab starts and docker-compose.yaml runs."""
    raw = _raw(path).get("workers") or {}
    out = {}
    for name, qs in workers(path).items():
        d = raw.get(name) if isinstance(raw, dict) else None
        conc = d.get("concurrency", 4) if isinstance(d, dict) else 4
        out[name] = (qs, conc if isinstance(conc, int) and not isinstance(conc, bool) else 4)
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m barman_dr.fleet queues <worker>`: the comma-joined queues of one inventory worker
    (docker-compose.yaml's worker commands read their `-q` from here, so compose and the lab share
    one queue layout); `python -m barman_dr.fleet pools`: `<pool> <slots>` lines for `airflow pools set`."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) == 2 and args[0] == "queues":
        spec = worker_specs().get(args[1])
        if not spec:
            print(f"no worker {args[1]!r} in the inventory's workers: ({', '.join(workers()) or 'none'})",
                  file=sys.stderr)
            return 2
        print(",".join(spec[0]))
        return 0
    if args == ["pools"]:
        for pool, slots in sorted(pool_slots().items()):
            print(pool, slots)
        return 0
    print("usage: python -m barman_dr.fleet queues <worker> | pools", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
