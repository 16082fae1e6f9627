"""Write the DAG run's note (the text the Airflow UI shows on a run) from a task.

Airflow 3 lets only the REST API set a run note (`PATCH .../dagRuns/{run_id}?update_mask=note`
with a user's token); a task has no ORM access. barman-dr writes the plan and the final
report there, best-effort, through the Airflow connection `airflow_api` (http, with a
user allowed to edit runs). Without that connection the note is skipped: the audit trail
holds the same text and is the record of truth.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

log = logging.getLogger(__name__)
NOTE_LIMIT = 1000


def _api(conn_id: str) -> tuple[str, str, str] | None:
    from airflow.sdk import BaseHook

    try:
        c = BaseHook.get_connection(conn_id)
    except Exception:  # noqa: BLE001 - not configured: notes are optional
        return None
    scheme = c.schema or "http"
    base = f"{scheme}://{c.host}:{c.port or 8080}"
    return base, c.login or "", c.password or ""


def _request(url: str, method: str, body: dict[str, Any], token: str | None = None, timeout: float = 10) -> Any:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method=method, headers=headers)  # noqa: S310
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - URL from an Airflow connection
        return json.loads(resp.read() or b"null")


def set_run_note(dag_id: str, run_id: str, text: str, conn_id: str = "airflow_api") -> bool:
    """Set the note of a DAG run; returns False (and logs why) when it could not."""
    api = _api(conn_id)
    if api is None:
        log.info("no %s connection: run note skipped", conn_id)
        return False
    base, user, password = api
    if len(text) > NOTE_LIMIT:
        text = text[: NOTE_LIMIT - 20] + "\n... (see audit)"
    try:
        token = _request(f"{base}/auth/token", "POST", {"username": user, "password": password})["access_token"]
        path = (f"/api/v2/dags/{urllib.parse.quote(dag_id, safe='')}/dagRuns/"
                f"{urllib.parse.quote(run_id, safe='')}?update_mask=note")
        _request(base + path, "PATCH", {"note": text}, token)
        return True
    except (urllib.error.URLError, OSError, KeyError, ValueError) as exc:
        log.warning("could not set the run note of %s/%s: %s", dag_id, run_id, exc)
        return False
