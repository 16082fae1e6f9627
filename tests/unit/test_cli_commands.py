"""`barman-dr` (plugins/barman_dr/surfaces/cli.py) against a fake AirflowApi: confs, --json, validation, exit codes.

No real API is ever called: `api_from_env` is replaced by a fake that records what would
have been sent and answers like Airflow 3 does (409 -> the existing run, 400 with a body, ...).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from barman_dr.surfaces import cli
from barman_dr.surfaces.api_client import ApiError, ApiUnavailableError, incident_run_id


class FakeApi:
    """Just enough of AirflowApi: runs in a dict, triggers recorded, failures injectable."""

    username = "admin"

    def __init__(self) -> None:
        self.runs: dict[tuple[str, str], dict[str, Any]] = {}
        self.triggers: list[dict[str, Any]] = []
        self.paused: set[str] = set()
        self.unknown_dags: set[str] = set()
        self.refuse: ApiError | None = None
        self.unavailable = False
        self.final_state = "success"
        self.never_ends = False
        self.tasks: dict[str, list[dict[str, Any]]] = {}
        self.xcoms: dict[tuple[str, str], Any] = {}
        self.hitl: list[dict[str, Any]] = []
        self.responses: list[tuple[str, str, str, str, int]] = []
        self.summary: dict[str, Any] = {"servers": []}

    def _down(self) -> None:
        if self.unavailable:
            raise ApiUnavailableError("http://airflow:8080", 0.0, 1, "ConnectionRefusedError: refused")

    def get_dag(self, dag_id: str) -> dict[str, Any]:
        self._down()
        if dag_id in self.unknown_dags:
            raise ApiError(404, '{"detail": "not found"}', f"/api/v2/dags/{dag_id}")
        return {"dag_id": dag_id, "is_paused": dag_id in self.paused}

    def trigger(self, dag_id: str, conf: dict[str, Any], run_id: str | None = None,
                note: str | None = None) -> tuple[dict[str, Any], bool]:
        self._down()
        if self.refuse:
            raise self.refuse
        assert run_id
        self.triggers.append({"dag_id": dag_id, "conf": json.loads(json.dumps(conf)), "run_id": run_id, "note": note})
        key = (dag_id, run_id)
        if key in self.runs:
            return self.runs[key], False
        self.runs[key] = {"dag_run_id": run_id, "dag_id": dag_id, "state": "queued",
                          "conf": json.loads(json.dumps(conf)), "note": note}
        return self.runs[key], True

    def get_run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        self._down()
        if (dag_id, run_id) not in self.runs:
            raise ApiError(404, '{"detail": "DagRun not found"}', run_id)
        return self.runs[(dag_id, run_id)]

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        return self.tasks.get(dag_id, [])

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value") -> Any:
        return self.xcoms.get((dag_id, task_id))

    def wait(self, dag_id: str, run_id: str, timeout: float = 1800, poll: float = 2.0,
             on_progress: Any = None) -> dict[str, Any]:
        run = self.runs[(dag_id, run_id)]
        if on_progress:
            on_progress(run)
        if self.never_ends:
            raise TimeoutError(f"{dag_id} run {run_id} still running after {timeout:.0f}s")
        run["state"] = self.final_state
        return run

    def hitl_details(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        if (dag_id, run_id) not in self.runs:
            raise ApiError(404, "not found", run_id)
        return self.hitl

    def respond(self, dag_id: str, run_id: str, task_id: str, option: str, map_index: int = -1) -> dict[str, Any]:
        self.responses.append((dag_id, run_id, task_id, option, map_index))
        return {"chosen_options": [option], "responded_by_user": {"name": "approver"}}

    def dr_summary(self) -> dict[str, Any]:
        self._down()
        return self.summary


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> FakeApi:
    fake = FakeApi()
    monkeypatch.setattr(cli, "api_from_env", lambda retry_for=cli.API_WAIT_S: fake)
    return fake


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any, str]:
    code, out, err = run(capsys, *argv, "--json")
    return code, json.loads(out), err  # exactly one JSON document on stdout


SERVER = ("--server", "pg-primary")


# ---------------------------------------------------------------- pitr / plan


def test_pitr_confirm_sends_the_typed_confirmation(api, capsys):
    code, out, _ = run(capsys, "pitr", *SERVER, "--target-time", "2026-11-25T11:45:00Z", "--incident", "INC-1",
                       "--expect", "orders_total=10500", "--confirm")
    assert code == 0
    [t] = api.triggers
    assert t["dag_id"] == "dr_pitr" and t["run_id"] == "dr_pitr__incident__INC-1"
    assert t["conf"] == {"server": "pg-primary", "incident_id": "INC-1", "jobs": 1, "backup_id": "auto",
                         "restore_to": "in_place", "expected": {"orders_total": 10500}, "target_inclusive": True,
                         "target_time": "2026-11-25T11:45:00Z", "confirm": "PITR pg-primary"}
    assert "triggered: dr_pitr run dr_pitr__incident__INC-1 [EXECUTE]" in out


def test_pitr_sends_the_source_only_when_not_barman(api, capsys):
    code, _, _ = run(capsys, "pitr", *SERVER, "--target-xid", "7312", "--exclusive", "--incident", "INC-9",
                     "--source", "delayed_standby", "--confirm")
    assert code == 0 and api.triggers[0]["conf"]["source"] == "delayed_standby"
    code, _, _ = run(capsys, "plan", *SERVER, "--target-xid", "7312", "--incident", "INC-10")
    assert code == 0 and "source" not in api.triggers[1]["conf"]


def test_plan_sends_plan_only_and_pitr_without_confirm_waits_for_approval(api, capsys):
    code, out, _ = run(capsys, "plan", *SERVER, "--target-xid", "7312", "--exclusive", "--incident", "INC-2")
    assert code == 0 and "[plan only]" in out
    assert api.triggers[0]["conf"]["plan_only"] is True and "confirm" not in api.triggers[0]["conf"]
    assert api.triggers[0]["conf"]["target_xid"] == "7312" and api.triggers[0]["conf"]["target_inclusive"] is False

    code, out, _ = run(capsys, "pitr", *SERVER, "--target-lsn", "0/7000028", "--incident", "INC-3")
    conf = api.triggers[1]["conf"]
    assert code == 0 and "plan_only" not in conf and "confirm" not in conf
    assert "[waits for a second person to approve]" in out
    assert "barman-dr approve --incident INC-3" in out  # dr_pitr is approve's default --dag

    code, _, _ = run(capsys, "pitr", *SERVER, "--target-immediate", "--incident", "INC-4", "--plan-only")
    assert code == 0 and api.triggers[2]["conf"]["plan_only"] is True and api.triggers[2]["conf"]["target_immediate"]


def test_pitr_json_shape(api, capsys):
    code, doc, err = run_json(capsys, "pitr", *SERVER, "--target-time", "2026-11-25T11:45:00+01:00",
                              "--incident", "INC-5")
    assert code == 0
    assert doc["dag_id"] == "dr_pitr" and doc["run_id"] == incident_run_id("dr_pitr", "INC-5")
    assert doc["created"] is True and doc["mode"] == "awaits_approval" and doc["state"] == "queued"
    assert doc["approve_with"] == "barman-dr approve --incident INC-5"
    assert doc["conf"]["target_time"] == "2026-11-25T11:45:00+01:00"
    assert "triggered:" in err  # the human line goes to stderr with --json


def test_pitr_wait_reports_and_exit_code_follows_the_run(api, capsys):
    api.tasks["dr_pitr"] = [{"task_id": "wal_coverage", "state": "success", "map_index": -1}]
    api.xcoms[("dr_pitr", "report")] = {"counts": {"orders_total": 10500}, "rto_s": 42, "other": 1}
    code, out, _ = run(capsys, "pitr", *SERVER, "--target-xid", "7312", "--incident", "INC-6", "--confirm", "--wait")
    assert code == 0 and "SUCCESS" in out and '"orders_total": 10500' in out and "wal_coverage" in out

    api.final_state = "failed"
    code, doc, err = run_json(capsys, "pitr", *SERVER, "--target-xid", "7312", "--incident", "INC-7", "--confirm",
                              "--wait")
    assert code == 1 and doc["state"] == "failed" and doc["result"]["rto_s"] == 42
    assert "wal_coverage" in err  # progress on stderr, stdout holds the document


def test_wait_timeout_exits_3(api, capsys):
    api.never_ends = True
    code, doc, _ = run_json(capsys, "plan", *SERVER, "--target-xid", "7312", "--incident", "INC-8", "--wait",
                            "--timeout", "5")
    assert code == 3 and doc["exit_code"] == 3 and "still running" in doc["error"]


# ---------------------------------------------------------------- idempotent run ids


def test_the_same_incident_follows_the_same_run(api, capsys):
    args = ("pitr", *SERVER, "--target-time", "2026-11-25T11:45:00Z", "--incident", "INC-9", "--confirm")
    assert run(capsys, *args)[0] == 0
    code, out, _ = run(capsys, *args)
    assert code == 0 and "already exists (same incident)" in out
    assert {t["run_id"] for t in api.triggers} == {"dr_pitr__incident__INC-9"} and len(api.runs) == 1
    code, doc, _ = run_json(capsys, *args)
    assert code == 0 and doc["created"] is False and doc["mode"] == "execute"


def test_a_cosmetic_difference_follows_the_run_with_a_note(api, capsys):
    base = ("plan", *SERVER, "--target-time", "2026-11-25T11:45:00Z", "--incident", "INC-10")
    assert run(capsys, *base, "--expect", "orders_total=10500")[0] == 0
    code, out, err = run(capsys, *base)
    assert code == 0 and "already exists" in out and "differs in expected" in err


def test_a_plan_is_never_silently_taken_for_an_execution(api, capsys):
    """`plan` then `pitr --confirm` for one incident: the existing run only plans; say so, exit 2."""
    base = (*SERVER, "--target-time", "2026-11-25T11:45:00Z", "--incident", "INC-11")
    assert run(capsys, "plan", *base)[0] == 0
    code, doc, err = run_json(capsys, "pitr", *base, "--confirm")
    assert code == 2 and doc["exit_code"] == 2 and set(doc["differs"]) == {"confirm", "plan_only"}
    assert "already exists with other parameters" in err and "INC-11.2" in err
    assert api.runs[("dr_pitr", "dr_pitr__incident__INC-11")]["conf"]["plan_only"] is True  # untouched


@pytest.mark.parametrize(("command", "dag"), [("surgical", "dr_surgical_recovery"), ("salvage", "dr_salvage"),
                                               ("find-target", "dr_find_target"), ("rollback", "dr_pitr_rollback"),
                                               ("drill", "dr_monthly_restore_drill")])
def test_every_dag_run_id_derives_from_the_incident(api, capsys, command, dag):
    extra = {"surgical": ("--target-xid", "7312", "--plan-only"), "salvage": ("--plan-only",),
             "find-target": (), "rollback": ("--confirm",), "drill": ()}[command]
    server = () if command == "drill" else SERVER
    for _ in range(2):
        assert run(capsys, command, *server, "--incident", "INC-12", *extra)[0] == 0
    assert [t["run_id"] for t in api.triggers] == [f"{dag}__incident__INC-12"] * 2
    assert [t["dag_id"] for t in api.triggers] == [dag, dag] and len(api.runs) == 1


# ---------------------------------------------------------------- surgical / salvage / rollback / find-target / drill


def test_surgical_confs(api, capsys):
    base = ("surgical", *SERVER, "--target-xid", "7312", "--exclusive", "--table", "public.critical_orders",
            "--table", "public.order_lines", "--table", "public.critical_orders")
    code, doc, _ = run_json(capsys, *base, "--incident", "INC-20", "--confirm", "--restore-changed", "--reason",
                            "undo the DELETE")
    assert code == 0 and doc["mode"] == "execute" and doc["dag_id"] == "dr_surgical_recovery"
    assert api.triggers[-1]["conf"] == {"server": "pg-primary", "incident_id": "INC-20", "target_inclusive": False,
                                        "backup_id": "auto", "target_xid": "7312",
                                        "tables": ["public.critical_orders", "public.order_lines"],
                                        "restore_changed": True, "reason": "undo the DELETE",
                                        "confirm": "SURGICAL pg-primary"}
    code, doc, _ = run_json(capsys, *base, "--incident", "INC-21", "--plan-only")
    assert code == 0 and doc["mode"] == "plan_only" and api.triggers[-1]["conf"]["plan_only"] is True
    assert "confirm" not in api.triggers[-1]["conf"]
    code, out, _ = run(capsys, *base, "--incident", "INC-22")
    conf = api.triggers[-1]["conf"]
    assert code == 0 and "confirm" not in conf and "plan_only" not in conf
    assert "barman-dr approve --dag dr_surgical_recovery --incident INC-22" in out


def test_salvage_confs(api, capsys):
    code, doc, _ = run_json(capsys, "salvage", *SERVER, "--incident", "INC-30.salvage", "--pitr-incident", "INC-30",
                            "--exclude-xid", "759", "--table", "public.critical_orders", "--confirm")
    assert code == 0 and doc["dag_id"] == "dr_salvage" and doc["run_id"] == "dr_salvage__incident__INC-30.salvage"
    assert api.triggers[-1]["conf"] == {"server": "pg-primary", "incident_id": "INC-30.salvage",
                                        "pitr_run_id": "dr_pitr__incident__INC-30", "tables": ["public.critical_orders"],
                                        "exclude_xids": [759], "confirm": "SALVAGE pg-primary"}
    code, out, _ = run(capsys, "salvage", *SERVER, "--incident", "INC-31")
    assert code == 0 and api.triggers[-1]["conf"] == {"server": "pg-primary", "incident_id": "INC-31"}
    assert "barman-dr approve --dag dr_salvage --incident INC-31" in out
    code, _, _ = run(capsys, "salvage", *SERVER, "--incident", "INC-32", "--pitr-run-id",
                     "manual__2026-12-04T05:26:53.594262+00:00", "--plan-only")
    assert code == 0 and api.triggers[-1]["conf"]["pitr_run_id"] == "manual__2026-12-04T05:26:53.594262+00:00"
    assert api.triggers[-1]["conf"]["plan_only"] is True


def test_rollback_needs_confirm_and_defaults_to_the_incidents_pitr(api, capsys):
    code, _, err = run(capsys, "rollback", *SERVER, "--incident", "INC-40")
    assert code == 2 and "--confirm" in err and "ROLLBACK pg-primary" in err and not api.triggers
    code, doc, _ = run_json(capsys, "rollback", *SERVER, "--incident", "INC-40", "--confirm")
    assert code == 0 and doc["mode"] == "execute"
    assert api.triggers[-1]["conf"] == {"server": "pg-primary", "pitr_run_id": "dr_pitr__incident__INC-40",
                                        "confirm": "ROLLBACK pg-primary"}
    run(capsys, "rollback", *SERVER, "--incident", "INC-41", "--pitr-incident", "INC-40", "--confirm")
    assert api.triggers[-1]["conf"]["pitr_run_id"] == "dr_pitr__incident__INC-40"


FOUND = {"server": "pg-primary", "window": {"start": "2026-11-25T11:00:00+00:00", "end": "2026-11-25T12:00:00+00:00"},
         "matched": 1, "warnings": [],
         "candidates": [{"rank": 1, "xid": 7312, "kind": "DELETE", "summary": "DELETE 7465 rows from critical_orders",
                         "commit_time": "2026-11-25T11:46:01+00:00", "commit_lsn": "0/7000028",
                         "relations": [{"relation": "public.critical_orders"}],
                         "target": {"target_xid": "7312", "target_inclusive": False, "target_lsn": "0/7000028"}}]}


def test_find_target_conf_and_json(api, capsys):
    api.xcoms[("dr_find_target", "find_candidates")] = FOUND
    code, doc, _ = run_json(capsys, "find-target", *SERVER, "--incident", "INC-50", "--window-start",
                            "2026-11-25 11:00:00+00:00", "--table", "critical_orders", "--min-rows", "100", "--wait")
    assert code == 0
    assert api.triggers[-1]["conf"] == {"server": "pg-primary", "incident_id": "INC-50",
                                        "window_start": "2026-11-25T11:00:00+00:00", "table": "critical_orders",
                                        "min_rows": 100}
    assert doc["mode"] == "read_only" and doc["state"] == "success" and doc["matched"] == 1
    assert doc["candidates"][0]["xid"] == 7312
    assert doc["next"][0] == "barman-dr plan --server pg-primary --target-xid 7312 --exclusive --incident INC-50"
    assert "--table public.critical_orders" in doc["next"][1] and "--plan-only" in doc["next"][1]


def test_find_target_human_lists_the_candidates(api, capsys):
    api.xcoms[("dr_find_target", "find_candidates")] = FOUND
    code, out, _ = run(capsys, "find-target", *SERVER, "--incident", "INC-51", "--wait")
    assert code == 0 and api.triggers[-1]["conf"] == {"server": "pg-primary", "incident_id": "INC-51"}
    assert "1. DELETE 7465 rows" in out and "xid 7312" in out and "--target-xid 7312 --exclusive" in out


def test_surgical_wait_json_carries_the_plan(api, capsys):
    api.xcoms[("dr_surgical_recovery", "plan")] = {"totals": {"missing": 7465}}
    code, doc, _ = run_json(capsys, "surgical", *SERVER, "--target-time", "2026-11-25T11:45:00Z", "--incident",
                            "INC-52", "--plan-only", "--wait")
    assert code == 0 and doc["result"]["plan"]["totals"]["missing"] == 7465 and doc["result"]["apply"] is None


def test_drill(api, capsys):
    code, out, _ = run(capsys, "drill", "--wait")
    assert code == 0 and "triggered: dr_monthly_restore_drill" in out and "dr_monthly_restore_drill: SUCCESS" in out
    assert api.triggers[-1]["conf"] == {} and api.triggers[-1]["run_id"].startswith("dr_monthly_restore_drill__cli__")
    code, doc, _ = run_json(capsys, "drill", "--target", "immediate", "--incident", "DRILL-1")
    assert code == 0 and doc["conf"] == {"target": "immediate"}
    assert doc["run_id"] == "dr_monthly_restore_drill__incident__DRILL-1"


# ---------------------------------------------------------------- status / servers / approve


def test_status_of_any_dag(api, capsys):
    api.runs[("dr_salvage", "dr_salvage__incident__INC-60")] = {"state": "running", "conf": {"server": "pg-primary"},
                                                                 "note": "SALVAGE plan for pg-primary"}
    api.tasks["dr_salvage"] = [{"task_id": "plan", "state": "success", "map_index": -1},
                               {"task_id": "approve", "state": "deferred", "map_index": -1}]
    api.hitl = [{"task_instance": {"task_id": "approve"}, "subject": "SALVAGE of pg-primary: approve the plan",
                 "response_received": False}]
    code, doc, _ = run_json(capsys, "status", "--dag", "dr_salvage", "--incident", "INC-60")
    assert code == 0 and doc["dag_id"] == "dr_salvage" and doc["state"] == "running"
    assert [t["task_id"] for t in doc["tasks"]] == ["plan", "approve"]
    assert doc["awaiting_approval"] == [{"task_id": "approve", "subject": "SALVAGE of pg-primary: approve the plan"}]
    code, out, _ = run(capsys, "status", "--dag", "dr_salvage", "--incident", "INC-60")
    assert code == 0 and "dr_salvage run dr_salvage__incident__INC-60: running" in out
    assert "barman-dr approve --dag dr_salvage --incident INC-60" in out and "SALVAGE plan" in out

    api.runs[("dr_find_target", "manual__1")] = {"state": "failed", "conf": {}}
    code, doc, _ = run_json(capsys, "status", "--dag", "dr_find_target", "--run-id", "manual__1")
    assert code == 1 and doc["state"] == "failed"


def test_status_default_dag_and_unknown_run(api, capsys):
    api.runs[("dr_pitr", "dr_pitr__incident__INC-61")] = {"state": "success", "conf": {}}
    assert run(capsys, "status", "--incident", "INC-61")[0] == 0
    code, doc, err = run_json(capsys, "status", "--incident", "INC-NONE")
    assert code == 2 and doc["http_status"] == 404 and "no run dr_pitr__incident__INC-NONE" in err


def test_servers_json_and_exit_1_on_critical(api, capsys):
    api.summary = {"servers": [{"server": "pg-primary", "verification": {"status": "OK"}},
                               {"server": "pg-primary2", "verification": {"status": "CRITICAL"}}]}
    code, doc, _ = run_json(capsys, "servers")
    assert code == 1 and [s["server"] for s in doc] == ["pg-primary", "pg-primary2"]
    api.summary["servers"].pop()
    code, out, _ = run(capsys, "servers")
    assert code == 0 and out.splitlines()[0].split()[:2] == ["server", "verification"]


def test_approve_still_answers_the_pending_request(api, capsys):
    api.runs[("dr_surgical_recovery", "dr_surgical_recovery__incident__INC-70")] = {"state": "running"}
    api.hitl = [{"task_instance": {"task_id": "approve", "map_index": -1}, "response_received": False,
                 "body": "### SURGICAL ...\n- plan hash `0123abcd` (recorded)\n```text\nSURGICAL plan\n```"}]
    code, doc, _ = run(capsys, "approve", "--dag", "dr_surgical_recovery", "--incident", "INC-70", "--json")
    assert code == 0 and json.loads(doc) == {"run_id": "dr_surgical_recovery__incident__INC-70", "task_id": "approve",
                                             "answered": True, "chosen": ["Approve"], "by": "approver",
                                             "plan_hash": "0123abcd"}
    assert api.responses == [("dr_surgical_recovery", "dr_surgical_recovery__incident__INC-70", "approve", "Approve",
                              -1)]
    code, out, _ = run(capsys, "approve", "--dag", "dr_surgical_recovery", "--incident", "INC-70", "--reject")
    assert code == 0 and out.startswith("rejected: dr_surgical_recovery")
    api.hitl = []
    code, out, _ = run(capsys, "approve", "--dag", "dr_surgical_recovery", "--incident", "INC-70", "--json")
    assert code == 2 and json.loads(out)["answered"] is False


# ---------------------------------------------------------------- validation before any API call


@pytest.mark.parametrize(("argv", "needle"), [
    (("pitr", *SERVER, "--incident", "INC-1", "--target-time", "2026-11-25T10:00", "--confirm"),
     "--target-time 2026-11-25T10:00: needs a timezone, e.g. 2026-11-25T10:00Z"),
    (("pitr", *SERVER, "--incident", "INC-1", "--target-time", "yesterday"), "--target-time yesterday: not an ISO 8601"),
    (("plan", *SERVER, "--incident", "INC-1", "--target-xid", "12a"), "--target-xid 12a: must be a transaction id"),
    (("plan", *SERVER, "--incident", "INC-1", "--target-xid", "2"), "digits only, 3 or more"),
    (("plan", *SERVER, "--incident", "INC-1", "--target-lsn", "0-7000028"), "--target-lsn 0-7000028: must be an LSN"),
    (("plan", *SERVER, "--incident", "INC 1", "--target-xid", "7312"), "--incident 'INC 1': use letters, digits"),
    (("plan", *SERVER, "--incident", "INC/1", "--target-xid", "7312"), "--incident 'INC/1'"),
    (("plan", *SERVER, "--incident", "INC-1", "--target-xid", "7312", "--expect", "orders_total"), "NAME=INTEGER"),
    (("plan", *SERVER, "--incident", "INC-1", "--target-xid", "7312", "--jobs", "99"), "--jobs 99"),
    (("plan", *SERVER, "--incident", "INC-1", "--target-xid", "7312", "--backup-id", "latest"), "--backup-id latest"),
    (("plan", *SERVER, "--incident", "INC-1", "--target-xid", "7312", "--target-name-lsn", "0/1"),
     "--target-name-lsn"),
    (("plan", "--server", "pg primary", "--incident", "INC-1", "--target-xid", "7312"), "--server 'pg primary'"),
    (("surgical", *SERVER, "--incident", "INC-1", "--target-xid", "7312", "--table", "critical_orders"),
     "--table 'critical_orders': use schema.table"),
    (("surgical", *SERVER, "--incident", "INC-1", "--target-time", "2026-11-25T10:00:00"), "needs a timezone"),
    (("salvage", *SERVER, "--incident", "INC-1", "--exclude-xid", "x"), "--exclude-xid x"),
    (("salvage", *SERVER, "--incident", "INC-1", "--pitr-run-id", "bad id"), "--pitr-run-id 'bad id'"),
    (("salvage", *SERVER, "--incident", "INC-1", "--reason", "a;b"), "--reason 'a;b'"),
    (("find-target", *SERVER, "--incident", "INC-1", "--window-start", "2026-11-25T10:00"),
     "--window-start 2026-11-25T10:00: needs a timezone"),
    (("find-target", *SERVER, "--incident", "INC-1", "--window-end", "noon"), "--window-end noon"),
    (("find-target", *SERVER, "--incident", "INC-1", "--table", "a.b.c"), "--table 'a.b.c'"),
    (("find-target", *SERVER, "--incident", "INC-1", "--min-rows", "-1"), "--min-rows -1"),
    (("status", "--incident", "INC 1"), "--incident 'INC 1'"),
    (("drill", "--incident", "../x"), "--incident '../x'"),
    (("plan", *SERVER, "--incident", "INC-1", "--target-xid", "7312", "--wait", "--timeout", "0"), "--timeout"),
    (("--api-wait", "inf", "status", "--incident", "X"), "--api-wait inf"),
])
def test_bad_usage_is_refused_before_any_api_call(api, capsys, argv, needle):
    code, out, err = run(capsys, *argv)
    assert code == 2, err
    assert needle in err and not api.triggers and not out


def test_bad_usage_with_json_is_one_json_document(api, capsys):
    code, doc, _ = run_json(capsys, "surgical", *SERVER, "--incident", "INC-1", "--target-xid", "7312", "--confirm",
                            "--plan-only")
    assert code == 2 and doc["exit_code"] == 2 and "not allowed with argument --confirm" in doc["error"]
    code, doc, _ = run_json(capsys, "pitr", *SERVER, "--incident", "INC-1")  # no target: argparse
    assert code == 2 and "one of the arguments" in doc["error"]


def test_argparse_errors_exit_2(api, capsys):
    assert run(capsys, "pitr", *SERVER, "--incident", "X")[0] == 2  # no target
    assert run(capsys, "frobnicate")[0] == 2
    assert run(capsys, "status", "--dag", "nope", "--incident", "X")[0] == 2


def test_missing_credentials_exit_2(monkeypatch, capsys):
    for var in ("BARMAN_DR_API_URL", "BARMAN_DR_API_USER", "BARMAN_DR_API_PASSWORD", "LAB_AIRFLOW_URL",
                "LAB_AIRFLOW_USER", "LAB_AIRFLOW_PASSWORD"):
        monkeypatch.delenv(var, raising=False)
    code, _, err = run(capsys, "status", "--incident", "INC-1")
    assert code == 2 and "BARMAN_DR_API_URL" in err


# ---------------------------------------------------------------- the API's answers


def test_the_apis_400_body_is_passed_through(api, capsys):
    api.refuse = ApiError(400, '{"detail": "server: must be one of the inventory\'s servers"}', "/dagRuns")
    code, _, err = run(capsys, "surgical", "--server", "pg-nope", "--incident", "INC-80", "--target-xid", "7312")
    assert code == 2 and "HTTP 400" in err and "must be one of the inventory" in err
    code, doc, _ = run_json(capsys, "surgical", "--server", "pg-nope", "--incident", "INC-80", "--target-xid", "7312")
    assert code == 2 and doc["http_status"] == 400 and "must be one of" in doc["body"]["detail"]


def test_a_paused_or_unknown_dag_exits_2(api, capsys):
    api.paused.add("dr_salvage")
    code, _, err = run(capsys, "salvage", *SERVER, "--incident", "INC-81")
    assert code == 2 and "dr_salvage is paused" in err and not api.triggers
    api.unknown_dags.add("dr_find_target")
    code, _, err = run(capsys, "find-target", *SERVER, "--incident", "INC-81")
    assert code == 2 and "not known to this Airflow" in err


def test_api_down_exits_4(api, capsys):
    api.unavailable = True
    code, _, err = run(capsys, "plan", *SERVER, "--incident", "INC-82", "--target-xid", "7312")
    assert code == 4 and "did not answer" in err
    code, doc, _ = run_json(capsys, "servers")
    assert code == 4 and doc["exit_code"] == 4


def test_a_rejected_plan_is_not_a_success(api):
    """Airflow ends a rejected run `success`; the CLI says nothing was executed (exit 5), a preview stays 0."""
    from barman_dr.surfaces.cli import EXIT_OK, EXIT_REJECTED, outcome_code

    api.task_instances = lambda dag_id, run_id: [{"task_id": "approve", "state": "skipped"}]
    assert outcome_code(api, "dr_pitr", "r", {"state": "success"}, {"mode": "approval"}) == EXIT_REJECTED
    assert outcome_code(api, "dr_pitr", "r", {"state": "success"}, {"mode": "plan_only"}) == EXIT_OK
    assert outcome_code(api, "dr_find_target", "r", {"state": "success"}, {}) == EXIT_OK
    assert outcome_code(api, "dr_pitr", "r", {"state": "failed"}, {}) == 1
