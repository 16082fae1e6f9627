"""DR metrics for Prometheus, in the text exposition format, served at `/barman-dr/metrics`.

What the peers' exporters do not report: when a restore was last *proven* (drill), how long
recoveries really took against the objective, whether a PITR is running or left the app
frozen. Everything comes from the audit trail and the last daily verification's facts:
reading the metrics never runs Barman or touches a managed server, so a scrape every 15 s
costs one small query on the ops database.

Authentication: Prometheus cannot log in to Airflow, so the endpoint takes a read-only
bearer token of its own, the password of the Airflow connection `dr_metrics` (a secrets
backend works). Without that connection the endpoint answers 503; with a wrong or missing
token, 401. The token grants these numbers only, nothing else in Airflow.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

STATUS_VALUE = {"OK": 0, "WARNING": 1, "CRITICAL": 2}

#: newest event per (server, action) worth exporting, one query (DISTINCT ON), plus the lock table
LATEST_SQL = """
SELECT DISTINCT ON (server, action, outcome) server, action, outcome, event_time, details
  FROM audit.events
 WHERE server IS NOT NULL AND action IN ('verify_report', 'drill_result', 'report', 'failure_summary')
   AND (dag_id IS NULL OR action <> 'report' OR dag_id = 'dr_pitr')
 ORDER BY server, action, outcome, event_id DESC
"""
LOCKS_SQL = "SELECT server, dag_id, purpose FROM control.server_locks"


@dataclass
class Family:
    name: str
    help: str
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)
    kind: str = "gauge"

    def add(self, labels: dict[str, str], value: float | None) -> None:
        if value is not None:
            self.samples.append((labels, float(value)))


def _ts(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.timestamp()
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def collect(servers: Mapping[str, int], latest: Iterable[Mapping[str, Any]], locks: Iterable[Mapping[str, Any]],
            frozen: Mapping[str, bool], now: datetime) -> list[Family]:
    """The metric families, from the inventory (`servers`: name -> RTO objective), the newest audit events,
    the lock table and which servers' apps a DR run left frozen."""
    fam = {f.name: f for f in (
        Family("barman_dr_last_backup_age_seconds", "Seconds since the newest DONE backup ended (last verification)."),
        Family("barman_dr_recoverable_since_timestamp_seconds",
               "Oldest point a PITR can reach: the end of the oldest DONE backup (last verification)."),
        Family("barman_dr_wal_archive_lag_seconds", "Seconds since the newest WAL segment Barman archived (that segment as "
                                                   "known at the last verification)."),
        Family("barman_dr_verification_status", "Last daily verification: 0 OK, 1 WARNING, 2 CRITICAL."),
        Family("barman_dr_last_verification_timestamp_seconds", "When the last daily verification reported."),
        Family("barman_dr_last_successful_drill_timestamp_seconds", "When a restore drill last passed."),
        Family("barman_dr_last_drill_rto_seconds", "Measured RTO of the last restore drill."),
        Family("barman_dr_last_pitr_rto_seconds", "Downtime (freeze to resume) of the last successful PITR."),
        Family("barman_dr_last_pitr_time_to_recovered_seconds",
               "Trigger to the app serving recovered data, last successful PITR."),
        Family("barman_dr_last_pitr_timestamp_seconds", "When the last successful PITR finished."),
        Family("barman_dr_last_pitr_failure_timestamp_seconds", "When a PITR last failed."),
        Family("barman_dr_rto_objective_seconds", "The server's RTO objective (inventory)."),
        Family("barman_dr_pitr_in_progress", "1 while a dr_pitr run holds the server's lock."),
        Family("barman_dr_run_in_progress", "1 while any DR run holds the server's lock.", ),
        Family("barman_dr_app_frozen", "1 while a DR run has left the server's app frozen (not resumed)."),
        Family("barman_dr_delayed_standby_window_seconds",
               "Delayed standby: damage younger than this can be undone from it (age of its last replayed "
               "transaction, last verification)."),
        Family("barman_dr_delayed_standby_delay_seconds", "Delayed standby: its apply delay (inventory)."),
    )}
    by = {(e["server"], e["action"], e["outcome"]): e for e in latest if e.get("server") in servers}
    held = {str(lk["server"]): lk for lk in locks}
    t_now = now.timestamp()
    for name, objective in sorted(servers.items()):
        lab = {"server": name}
        fam["barman_dr_rto_objective_seconds"].add(lab, objective)
        verify = max((e for (s, a, _o), e in by.items() if s == name and a == "verify_report"),
                     key=lambda e: _ts(e["event_time"]) or 0, default=None)
        if verify is not None:
            d = verify.get("details") or {}
            facts = d.get("facts") or {}
            fam["barman_dr_verification_status"].add(lab, STATUS_VALUE.get(str(d.get("status")).upper(), 2))
            fam["barman_dr_last_verification_timestamp_seconds"].add(lab, _ts(verify["event_time"]))
            newest, oldest, wal = (_ts(facts.get(k)) for k in ("newest_backup_end", "oldest_backup_end",
                                                                "newest_wal_time"))
            fam["barman_dr_last_backup_age_seconds"].add(lab, t_now - newest if newest else None)
            fam["barman_dr_recoverable_since_timestamp_seconds"].add(lab, oldest)
            fam["barman_dr_wal_archive_lag_seconds"].add(lab, t_now - wal if wal else None)
            for w in facts.get("delayed_standbys") or []:
                sb = {"server": name, "standby": str(w.get("standby"))}
                fam["barman_dr_delayed_standby_window_seconds"].add(sb, w.get("protected_window_s"))
                fam["barman_dr_delayed_standby_delay_seconds"].add(sb, w.get("delay_s"))
        drill = by.get((name, "drill_result", "ok"))
        if drill is not None:
            fam["barman_dr_last_successful_drill_timestamp_seconds"].add(lab, _ts(drill["event_time"]))
        last_drill = max((e for (s, a, _o), e in by.items() if s == name and a == "drill_result"),
                         key=lambda e: _ts(e["event_time"]) or 0, default=None)
        if last_drill is not None:
            fam["barman_dr_last_drill_rto_seconds"].add(lab, (last_drill.get("details") or {}).get("rto_s"))
        pitr = by.get((name, "report", "ok"))
        if pitr is not None:
            d = pitr.get("details") or {}
            fam["barman_dr_last_pitr_rto_seconds"].add(lab, d.get("rto_s"))
            fam["barman_dr_last_pitr_time_to_recovered_seconds"].add(lab, d.get("time_to_recovered_s"))
            fam["barman_dr_last_pitr_timestamp_seconds"].add(lab, _ts(pitr["event_time"]))
        failed = by.get((name, "failure_summary", "ok"))
        if failed is not None:
            fam["barman_dr_last_pitr_failure_timestamp_seconds"].add(lab, _ts(failed["event_time"]))
        lock = held.get(name)
        fam["barman_dr_pitr_in_progress"].add(lab, 1 if lock and lock.get("dag_id") == "dr_pitr" else 0)
        fam["barman_dr_run_in_progress"].add(lab, 1 if lock else 0)
        fam["barman_dr_app_frozen"].add(lab, 1 if frozen.get(name) else 0)
    return list(fam.values())


def _label_value(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(v: float) -> str:
    return repr(round(v, 3)) if v != int(v) else str(int(v))


def render(families: Sequence[Family]) -> str:
    """The text exposition format (version 0.0.4): HELP, TYPE, then one line per sample."""
    lines = []
    for f in families:
        lines.append(f"# HELP {f.name} {f.help}")
        lines.append(f"# TYPE {f.name} {f.kind}")
        for labels, value in f.samples:
            lab = ",".join(f'{k}="{_label_value(v)}"' for k, v in sorted(labels.items()))
            lines.append(f"{f.name}{{{lab}}} {_number(value)}")
    return "\n".join(lines) + "\n"


def gather(now: datetime, postgres_conn_id: str = "dr_audit") -> str:
    """Read the ops database and render (the endpoint's body)."""
    import json

    from airflow.providers.postgres.hooks.postgres import PostgresHook

    from barman_dr.inventory import load_inventory
    from barman_dr.safety.ownership import owner_of

    inv = load_inventory()
    conn = PostgresHook(postgres_conn_id=postgres_conn_id, log_sql=False).get_conn()
    try:
        with conn.cursor() as cur:
            cur.execute(LATEST_SQL)
            cols = [c[0] for c in cur.description]
            latest = [dict(zip(cols, r, strict=False)) for r in cur.fetchall()]
            cur.execute(LOCKS_SQL)
            cols = [c[0] for c in cur.description]
            locks = [dict(zip(cols, r, strict=False)) for r in cur.fetchall()]
    finally:
        conn.close()
    for e in latest:
        if isinstance(e.get("details"), str):
            e["details"] = json.loads(e["details"])
    frozen = {name: any(o.reason == "app_frozen" for o in owner_of(name, postgres_conn_id=postgres_conn_id))
              for name in inv.server_names}
    servers = {name: inv.server(name).rto_objective_seconds for name in inv.server_names}
    return render(collect(servers, latest, locks, frozen, now))


def token_ok(header: str | None, expected: str) -> bool:
    """`Authorization: Bearer <token>`, compared in constant time."""
    import hmac

    if not header or not expected:
        return False
    scheme, _, value = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), expected.encode())
