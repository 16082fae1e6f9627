"""The DR page: a read-only FastAPI app mounted in the Airflow API server at /barman-dr.

Everything it shows comes from the audit trail (the record of truth, on the ops cluster):
per server the last backup and its age, the verification status, the recovery window, the
latest PITR runs (target, outcome, RTO per phase, link to the Airflow run), the candidate
targets dr_find_target found (ranked, with the xid/LSN target and a dr_pitr conf), the drill
history with an RTO trend against the objective, and the audit trail filtered by server,
run or incident. Authentication is Airflow's own (`get_user`: the UI's session cookie or a
bearer token); the page never writes anything. Rendered server-side with escaped values:
no JavaScript, nothing from the audit trail is ever interpreted as HTML.
"""

from __future__ import annotations

import html
import json
from datetime import UTC, datetime
from typing import Any

from fastapi import Depends, FastAPI, Header, Query
from fastapi.responses import HTMLResponse, PlainTextResponse

try:  # the API server's dependency; absent in unit tests that only render
    from airflow.api_fastapi.core_api.security import get_user
except ImportError:  # pragma: no cover
    def get_user() -> None:  # type: ignore[misc]
        return None

PREFIX = "/barman-dr"


def _events(**filters: Any) -> list[dict[str, Any]]:
    from barman_dr.audit import AuditTrail

    return AuditTrail().events(**filters)


def _age(iso: str | None, now: datetime) -> str:
    if not iso:
        return "-"
    seconds = (now - datetime.fromisoformat(iso)).total_seconds()
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 86400 * 2:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def summary(limit: int = 500) -> dict[str, Any]:
    """Everything the page shows, as JSON (also served at /barman-dr/api/summary)."""
    from barman_dr.inventory import load_inventory

    now = datetime.now(UTC)
    inv = load_inventory()
    events = _events(limit=limit)
    servers: dict[str, dict[str, Any]] = {
        name: {"server": name, "recovery_window_days": s.recovery_window_days,
               "rto_objective_s": s.rto_objective_seconds, "last_backup": None, "verification": None,
               "last_pitr": None, "last_drill": None} for name, s in inv.servers.items()}
    pitrs, drills = [], []
    for e in events:  # newest first
        srv = servers.get(e.get("server") or "")
        d = e.get("details") if isinstance(e.get("details"), dict) else {}
        if e["action"] in ("backup_taken", "rebase_barman") and srv is not None and srv["last_backup"] is None:
            backup_id = d.get("backup_id") or d.get("new_backup_id")
            if backup_id:
                srv["last_backup"] = {"backup_id": backup_id, "at": e["event_time"], "age": _age(e["event_time"], now)}
        elif e["action"] == "verify_report" and srv is not None and srv["verification"] is None:
            srv["verification"] = {"status": d.get("status") or e["outcome"].upper(), "at": e["event_time"],
                                   "reasons": d.get("reasons") or d.get("findings") or []}
        elif e["dag_id"] == "dr_pitr" and e["action"] in ("report", "failure_summary") and e["outcome"] == "ok":
            row = {"at": e["event_time"], "server": e.get("server"), "run_id": e["run_id"],
                   "incident_id": e.get("incident_id"), "target": e.get("target"),
                   "outcome": "success" if e["action"] == "report" else "failed", "rto_s": d.get("rto_s"),
                   "phases_s": d.get("phases_s") or {}, "counts": d.get("counts"),
                   "outside_downtime_s": d.get("outside_downtime_s") or {},
                   "failed_tasks": d.get("failed_tasks"), "next_action": d.get("next_action")}
            pitrs.append(row)
            if srv is not None and srv["last_pitr"] is None:
                srv["last_pitr"] = row
        elif e["action"] == "drill_result":
            row = {"at": e["event_time"], "server": e.get("server"), "run_id": e["run_id"], "rto_s": d.get("rto_s"),
                   "rto_objective_s": d.get("rto_objective_s"), "rto_met": d.get("rto_met"),
                   "outcome": e["outcome"], "backup_id": d.get("backup_id")}
            drills.append(row)
            if srv is not None and srv["last_drill"] is None:
                srv["last_drill"] = row
    return {"generated_at": now.isoformat(), "servers": list(servers.values()), "pitr_runs": pitrs[:20],
            "drills": list(reversed(drills[:50])), "find_target_runs": find_target_runs(_events(action="find_target",
                                                                                                 limit=20))}


def find_target_runs(events: list[dict[str, Any]], runs: int = 5, per_run: int = 10) -> list[dict[str, Any]]:
    """The latest dr_find_target results (audit events `find_target`/`ok`), newest first, bounded."""
    out = []
    for e in events:
        d = e.get("details") if isinstance(e.get("details"), dict) else {}
        if e.get("action") != "find_target" or e.get("outcome") != "ok" or "candidates" not in d:
            continue
        out.append({"at": e["event_time"], "server": e.get("server"), "run_id": e.get("run_id"),
                    "incident_id": e.get("incident_id"), "window": d.get("window") or {}, "table": d.get("table"),
                    "min_rows": d.get("min_rows"), "matched": d.get("matched"),
                    "candidates": (d.get("candidates") or [])[:per_run], "warnings": (d.get("warnings") or [])[:5]})
        if len(out) >= runs:
            break
    return out


# ------------------------------------------------------------------------ rendering

def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


CSS = """
body{font-family:system-ui,sans-serif;margin:1.5rem;color:#1d2733}h1{font-size:1.4rem}h2{font-size:1.1rem;margin-top:2rem}
table{border-collapse:collapse;width:100%;font-size:.85rem}th,td{border-bottom:1px solid #dde3ea;padding:.35rem .5rem;
text-align:left;vertical-align:top}th{background:#f3f6f9}.OK,.success,.ok{color:#1a7f37;font-weight:600}
.WARNING,.warning{color:#9a6700;font-weight:600}.CRITICAL,.failed,.critical,.refused{color:#cf222e;font-weight:600}
code{font-size:.8rem}form input{margin-right:.5rem}.muted{color:#6b7785}
"""


def rto_svg(drills: list[dict[str, Any]], objective: float | None) -> str:
    """The drill RTO trend as an inline SVG polyline, with the objective as a dashed line."""
    values = [float(d["rto_s"]) for d in drills if d.get("rto_s") is not None]
    if not values:
        return '<p class="muted">No drill yet.</p>'
    width, height, pad = 600, 160, 20
    top = max([*values, float(objective or 0)]) * 1.1 or 1.0
    step = (width - 2 * pad) / max(len(values) - 1, 1)

    def y(v: float) -> float:
        return height - pad - (height - 2 * pad) * v / top

    points = " ".join(f"{pad + i * step:.1f},{y(v):.1f}" for i, v in enumerate(values))
    obj = (f'<line x1="{pad}" x2="{width - pad}" y1="{y(float(objective)):.1f}" y2="{y(float(objective)):.1f}" '
           f'stroke="#cf222e" stroke-dasharray="4"/><text x="{width - pad}" y="{y(float(objective)) - 4:.1f}" '
           f'text-anchor="end" font-size="10">objective {esc(objective)} s</text>') if objective else ""
    dots = "".join(f'<circle cx="{pad + i * step:.1f}" cy="{y(v):.1f}" r="3"><title>{v} s</title></circle>'
                   for i, v in enumerate(values))
    return (f'<svg id="rto-trend" width="{width}" height="{height}" role="img" aria-label="drill RTO trend">'
            f'{obj}<polyline fill="none" stroke="#0969da" stroke-width="2" points="{points}"/>{dots}</svg>')


def render(data: dict[str, Any], audit_rows: list[dict[str, Any]], filters: dict[str, str | None]) -> str:
    rows = []
    for s in data["servers"]:
        lb, ver, lp, ld = s["last_backup"] or {}, s["verification"] or {}, s["last_pitr"] or {}, s["last_drill"] or {}
        rows.append(
            f"<tr><td><a href='?server={esc(s['server'])}'>{esc(s['server'])}</a></td>"
            f"<td>{esc(lb.get('backup_id', '-'))} <span class='muted'>{esc(lb.get('age', ''))}</span></td>"
            f"<td class='{esc(ver.get('status', ''))}'>{esc(ver.get('status', '-'))}</td>"
            f"<td>{esc(s['recovery_window_days'])} days</td>"
            f"<td class='{esc(lp.get('outcome', ''))}'>{esc(lp.get('outcome', '-'))} {esc(lp.get('rto_s') or '')}</td>"
            f"<td>{esc(ld.get('rto_s', '-'))} / {esc(s['rto_objective_s'])} s</td></tr>")
    pitr_rows = []
    for p in data["pitr_runs"]:
        phases = ", ".join(f"{esc(k)} {esc(v)}" for k, v in (p["phases_s"] or {}).items() if v is not None)
        before = ", ".join(f"{esc(k)} {esc(v)}" for k, v in (p.get("outside_downtime_s") or {}).items() if v is not None)
        if before:
            phases += f"<br><span class='muted'>before the freeze (app running): {before}</span>"
        link = f"/dags/dr_pitr/runs/{esc(p['run_id'])}"
        pitr_rows.append(
            f"<tr><td>{esc(p['at'][:19])}</td><td>{esc(p['server'])}</td><td>{esc(p['incident_id'] or '')}</td>"
            f"<td>{esc(p['target'] or '')}</td><td class='{esc(p['outcome'])}'>{esc(p['outcome'])}</td>"
            f"<td>{esc(p['rto_s'] if p['rto_s'] is not None else '-')}</td><td><code>{phases}</code></td>"
            f"<td><a href='{link}'>{esc(p['run_id'])}</a></td></tr>")
    drill_rows = [f"<tr><td>{esc(d['at'][:19])}</td><td>{esc(d['server'])}</td><td>{esc(d['backup_id'])}</td>"
                  f"<td>{esc(d['rto_s'])}</td><td>{esc(d['rto_objective_s'])}</td>"
                  f"<td class='{'ok' if d['rto_met'] else 'failed'}'>{esc(d['rto_met'])}</td></tr>"
                  for d in reversed(data["drills"])]
    objective = next((s["rto_objective_s"] for s in data["servers"]), None)
    candidates_html = render_candidates(data.get("find_target_runs") or [])
    audit_html = [f"<tr><td>{esc(e['event_time'][:19])}</td><td>{esc(e['dag_id'])}</td><td>{esc(e['run_id'])}</td>"
                  f"<td>{esc(e['task_id'])}</td><td>{esc(e['server'])}</td><td>{esc(e['incident_id'])}</td>"
                  f"<td>{esc(e['action'])}</td><td class='{esc(e['outcome'])}'>{esc(e['outcome'])}</td>"
                  f"<td>{esc(e['duration_s'])}</td></tr>" for e in audit_rows]
    f = {k: esc(v or "") for k, v in filters.items()}
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>barman-dr: disaster recovery</title>
<style>{CSS}</style></head><body>
<h1>Disaster recovery <span class="muted">barman-dr, generated {esc(data['generated_at'][:19])} UTC</span></h1>
<h2>Servers</h2><table id="servers"><tr><th>Server</th><th>Last backup (age)</th><th>Verification</th>
<th>Recovery window</th><th>Last PITR (RTO s)</th><th>Last drill RTO / objective</th></tr>{''.join(rows)}</table>
<h2>PITR runs</h2><table id="pitr-runs"><tr><th>Finished</th><th>Server</th><th>Incident</th><th>Target</th>
<th>Outcome</th><th>RTO s</th><th>Phases (s)</th><th>Airflow run</th></tr>{''.join(pitr_rows)}</table>
<h2>Candidate targets</h2>{candidates_html}
<h2>Restore drills</h2>{rto_svg(data['drills'], objective)}
<table id="drills"><tr><th>Finished</th><th>Server</th><th>Backup</th><th>RTO s</th><th>Objective s</th>
<th>Met</th></tr>{''.join(drill_rows)}</table>
<h2>Audit trail</h2><form method="get"><input name="server" placeholder="server" value="{f['server']}">
<input name="run_id" placeholder="run id" value="{f['run_id']}"><input name="incident_id" placeholder="incident id"
value="{f['incident_id']}"><button type="submit">Filter</button></form>
<table id="audit"><tr><th>Time</th><th>DAG</th><th>Run</th><th>Task</th><th>Server</th><th>Incident</th>
<th>Action</th><th>Outcome</th><th>s</th></tr>{''.join(audit_html)}</table></body></html>"""


def render_candidates(runs: list[dict[str, Any]]) -> str:
    """dr_find_target's ranked candidates, per run: what each transaction did and the exact target that undoes it."""
    if not runs:
        return '<p class="muted">No dr_find_target run yet.</p>'
    parts = []
    for r in runs:
        w = r["window"]
        parts.append(
            f"<p><b>{esc(r['server'])}</b> {esc((r['at'] or '')[:19])} UTC, commits {esc(str(w.get('start', ''))[:19])}"
            f" .. {esc(str(w.get('end', ''))[:19])}" + (f", table {esc(r['table'])}" if r["table"] else "")
            + f", {esc(r['matched'])} matched"
            + (f", incident {esc(r['incident_id'])}" if r["incident_id"] else "")
            + f" <a href='/dags/dr_find_target/runs/{esc(r['run_id'])}'>{esc(r['run_id'])}</a></p>")
        rows = []
        for c in r["candidates"]:
            t = c.get("target") or {}
            conf = json.dumps(c.get("pitr_conf") or {}, sort_keys=True)
            rows.append(
                f"<tr><td>{esc(c.get('rank'))}</td><td class='failed'>{esc(c.get('kind'))}</td>"
                f"<td>{esc(c.get('summary'))}</td><td>{esc('all' if c.get('whole_relation') else c.get('rows_affected'))}"
                f"</td><td>{esc(c.get('xid'))}</td><td>{esc(str(c.get('commit_time', ''))[:26])}</td>"
                f"<td>{esc(c.get('commit_lsn'))}</td><td>target_xid {esc(t.get('target_xid'))} / target_lsn "
                f"{esc(t.get('target_lsn'))}, inclusive false</td><td><code>{esc(conf)}</code></td></tr>")
        parts.append("<table class='candidates'><tr><th>#</th><th>Kind</th><th>What</th><th>Rows</th><th>xid</th>"
                     "<th>Committed (UTC)</th><th>Commit LSN</th><th>Recommended target</th><th>dr_pitr conf</th></tr>"
                     + "".join(rows) + "</table>")
        parts.extend(f"<p class='warning'>{esc(x)}</p>" for x in r["warnings"])
    return f'<div id="candidate-targets">{"".join(parts)}</div>'


def create_app() -> FastAPI:
    app = FastAPI(title="barman-dr", description="Disaster recovery: backups, verification, PITR runs, drills, audit")

    @app.get("/", response_class=HTMLResponse)
    def page(user: Any = Depends(get_user), server: str | None = Query(None, max_length=63),  # noqa: B008
             run_id: str | None = Query(None, max_length=250),
             incident_id: str | None = Query(None, max_length=64)) -> HTMLResponse:
        data = summary()
        rows = _events(server=server or None, run_id=run_id or None, incident_id=incident_id or None, limit=200)
        return HTMLResponse(render(data, rows, {"server": server, "run_id": run_id, "incident_id": incident_id}))

    @app.get("/api/summary")
    def api_summary(user: Any = Depends(get_user)) -> dict[str, Any]:  # noqa: B008
        return summary()

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics(authorization: str | None = Header(None)) -> PlainTextResponse:
        """Prometheus scrapes this with the read-only bearer token of connection `dr_metrics` (not Airflow auth)."""
        from barman_dr.metrics import gather, token_ok

        expected = metrics_token()
        if not expected:
            return PlainTextResponse("metrics disabled: create the Airflow connection dr_metrics (its password is the "
                                     "bearer token Prometheus sends)\n", status_code=503)
        if not token_ok(authorization, expected):
            return PlainTextResponse("unauthorized: send Authorization: Bearer <dr_metrics password>\n",
                                     status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return PlainTextResponse(gather(datetime.now(UTC)), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def metrics_token(conn_id: str = "dr_metrics") -> str | None:
    """The bearer token for /barman-dr/metrics: the password of an Airflow connection (None: not configured)."""
    try:
        from airflow.sdk import BaseHook

        return BaseHook.get_connection(conn_id).password or None
    except Exception:  # noqa: BLE001 - an absent connection disables the endpoint
        return None
