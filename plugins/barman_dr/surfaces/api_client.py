"""A small client of the Airflow 3 REST API, for incident tooling, the demo and the e2e tests.

Incident tooling triggers the DR DAGs (`dr_pitr`, `dr_surgical_recovery`, ...) with a run id
derived from the incident id: a second trigger for the same incident returns the existing
run instead of starting a second one (the API answers 409 Conflict; we then read that run).
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


class ApiUnavailableError(Exception):
    """The API server did not answer (refused, reset, timed out, 502/503/504) for the whole retry window."""

    def __init__(self, url: str, waited_s: float, attempts: int, last_error: str) -> None:
        self.url, self.waited_s, self.attempts, self.last_error = url, waited_s, attempts, last_error
        super().__init__(
            f"the Airflow API at {url} did not answer for {waited_s:.0f}s ({attempts} attempts; last error: "
            f"{last_error}). Whether the request reached it is unknown. Check the Airflow api-server, then run the "
            "same command again: the same incident id reaches the same single run, never a second one.")


#: HTTP answers that mean "the API server is not there right now" (a proxy in front of it, a restart)
RETRY_STATUSES = frozenset({502, 503, 504})


def backoff_delays(retry_for: float, first: float = 1.0, cap: float = 10.0) -> list[float]:
    """Sleeps between attempts: 1, 2, 4, 8, 10, 10 ... s, summing to at most `retry_for`."""
    delays, total, d = [], 0.0, first
    while total + d <= retry_for:
        delays.append(d)
        total += d
        d = min(d * 2, cap)
    if retry_for - total > 0.05:
        delays.append(round(retry_for - total, 3))
    return delays


def incident_run_id(dag_id: str, incident_id: str) -> str:
    """The run id of `dag_id` for an incident: the same incident always names the same run (idempotent triggers)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", incident_id)
    return f"{dag_id}__incident__{safe}"


@dataclass
class AirflowApi:
    base_url: str
    username: str
    password: str
    timeout: float = 30
    #: how long to keep retrying while the API server does not answer (0: fail at once)
    retry_for: float = 0
    _token: str | None = None

    def _call(self, method: str, path: str, body: Any = None, auth: bool = True) -> Any:
        """One API call; while the server does not answer, retried with backoff for `retry_for` seconds.

        Retrying a POST is safe for what this client posts: a trigger carries its run id, so a
        trigger whose answer was lost comes back as 409 and reads the existing run.
        """
        url = self.base_url.rstrip("/") + path
        delays = backoff_delays(self.retry_for)
        start, attempts = time.monotonic(), 0
        deadline = start + self.retry_for  # each attempt's own timeout counts against the window too
        while True:
            attempts += 1
            try:
                return self._once(method, url, body, auth)
            except ApiError as exc:
                if exc.status not in RETRY_STATUSES:
                    raise
                last = f"HTTP {exc.status}"
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                last = f"{type(reason).__name__}: {reason}"
            remaining = deadline - time.monotonic()
            if not delays or remaining <= 0:
                raise ApiUnavailableError(self.base_url, time.monotonic() - start, attempts, last) from None
            time.sleep(min(delays.pop(0), remaining))

    def _once(self, method: str, url: str, body: Any, auth: bool) -> Any:
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

    def get_dag(self, dag_id: str) -> dict[str, Any]:
        """The DAG's details (`is_paused`, ...); ApiError 404 when Airflow does not know it."""
        return self._call("GET", f"/api/v2/dags/{dag_id}")

    def dr_summary(self) -> dict[str, Any]:
        """The DR page's summary (the plugin's `/barman-dr/api/summary`): per server, the last runs."""
        return self._call("GET", "/barman-dr/api/summary")

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

    def hitl_details(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        """The run's human-in-the-loop requests (answered or not)."""
        out = self._call("GET", f"/api/v2/dags/{dag_id}/dagRuns/{urllib.parse.quote(run_id, safe='')}/hitlDetails")
        return out.get("hitl_details", [])

    def respond(self, dag_id: str, run_id: str, task_id: str, option: str, map_index: int = -1) -> dict[str, Any]:
        """Answer one human-in-the-loop request as this client's user (403 when that user may not)."""
        return self._call("PATCH", f"/api/v2/dags/{dag_id}/dagRuns/{urllib.parse.quote(run_id, safe='')}"
                                   f"/taskInstances/{task_id}/{map_index}/hitlDetails",
                          {"chosen_options": [option], "params_input": {}})

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


def pending_approvals(api: Any, dag_id: str, run_id: str) -> list[dict[str, Any]]:
    """The run's human-in-the-loop requests nobody has answered yet (the approval a DR run waits on)."""
    return [h for h in api.hitl_details(dag_id, run_id) if not h.get("response_received")]


def from_env() -> AirflowApi:
    import os

    return AirflowApi(os.environ["LAB_AIRFLOW_URL"], os.environ["LAB_AIRFLOW_USER"], os.environ["LAB_AIRFLOW_PASSWORD"])
