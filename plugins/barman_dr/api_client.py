"""A small client of the Airflow 3 REST API, for incident tooling, the demo and the e2e tests.

Incident tooling triggers `dr_pitr` with a run id derived from the incident id: a second
trigger for the same incident returns the existing run instead of starting a second
PITR (the API answers 409 Conflict; we then read that run).
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

TERMINAL = {"success", "failed"}


class ApiError(Exception):
    def __init__(self, status: int, body: str, url: str) -> None:
        self.status, self.body, self.url = status, body, url
        super().__init__(f"HTTP {status} from {url}: {body[:500]}")


def incident_run_id(dag_id: str, incident_id: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", incident_id)
    return f"{dag_id}__incident__{safe}"


@dataclass
class AirflowApi:
    base_url: str
    username: str
    password: str
    timeout: float = 30
    _token: str | None = None

    def _call(self, method: str, path: str, body: Any = None, auth: bool = True) -> Any:
        url = self.base_url.rstrip("/") + path
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if auth:
            headers["Authorization"] = f"Bearer {self.token()}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method, headers=headers)  # noqa: S310
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310 - operator-given URL
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise ApiError(exc.code, exc.read().decode("utf-8", "replace"), url) from None
        return json.loads(raw) if raw else None

    def token(self) -> str:
        if self._token is None:
            out = self._call("POST", "/auth/token", {"username": self.username, "password": self.password}, auth=False)
            self._token = out["access_token"]
        return self._token

    def unpause(self, dag_id: str) -> None:
        self._call("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})

    def dag_exists(self, dag_id: str) -> bool:
        try:
            self._call("GET", f"/api/v2/dags/{dag_id}")
            return True
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise

    def get_run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        return self._call("GET", f"/api/v2/dags/{dag_id}/dagRuns/{urllib.parse.quote(run_id, safe='')}")

    def trigger(self, dag_id: str, conf: dict[str, Any], run_id: str | None = None,
                note: str | None = None) -> tuple[dict[str, Any], bool]:
        """Trigger a run; returns (run, created). An existing run with that id is returned, not duplicated."""
        body: dict[str, Any] = {"logical_date": None, "conf": conf}
        if run_id:
            body["dag_run_id"] = run_id
        if note:
            body["note"] = note
        try:
            return self._call("POST", f"/api/v2/dags/{dag_id}/dagRuns", body), True
        except ApiError as exc:
            if exc.status == 409 and run_id:
                return self.get_run(dag_id, run_id), False
            raise

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        out = self._call("GET", f"/api/v2/dags/{dag_id}/dagRuns/{urllib.parse.quote(run_id, safe='')}"
                                "/taskInstances?limit=100")
        return out.get("task_instances", [])

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value") -> Any:
        try:
            out = self._call("GET", f"/api/v2/dags/{dag_id}/dagRuns/{urllib.parse.quote(run_id, safe='')}"
                                    f"/taskInstances/{task_id}/xcomEntries/{key}?deserialize=true")
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise
        value = out.get("value")
        if isinstance(value, str):
            try:
                return json.loads(value)
            except ValueError:
                return value
        return value

    def wait(self, dag_id: str, run_id: str, timeout: float = 1800, poll: float = 2.0,
             on_progress: Any = None) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            run = self.get_run(dag_id, run_id)
            if on_progress:
                on_progress(run)
            if run.get("state") in TERMINAL:
                return run
            if time.monotonic() > deadline:
                raise TimeoutError(f"{dag_id} run {run_id} still {run.get('state')} after {timeout:.0f}s")
            time.sleep(poll)


def from_env() -> AirflowApi:
    import os

    return AirflowApi(os.environ["LAB_AIRFLOW_URL"], os.environ["LAB_AIRFLOW_USER"], os.environ["LAB_AIRFLOW_PASSWORD"])
