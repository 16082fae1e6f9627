"""Overlapping dr_pitr runs share a delayed standby's pause: the last holder resumes it, a DBA's never.

A plan-only run beside a real one waiting for approval both pause the same standby. The first to
end must not resume a replay the other relies on, or the window slides past that run's target
while people read its plan (barman_dr.operators.pitr.delayed.other_pause_holders).
"""

from __future__ import annotations

from types import SimpleNamespace

from barman_dr.inventory import Instance
from barman_dr.operators.pitr.delayed import (
    PAUSE_SQL,
    RESUME_SQL,
    ResumeDelayedReplayOperator,
    pause_delayed_replay,
)


class Lab:
    """One audit trail shared by every run, one delayed standby, and each run's Airflow state."""

    def __init__(self, paused: bool = False):
        self.events: list[dict] = []
        self.paused = paused
        self.sql: list[tuple[str, str]] = []  # (run, statement)
        self.states: dict[str, str] = {}
        self.gone: set[str] = set()

    def audit_for(self, run_id: str):
        lab = self

        class Audit:
            def events(self, *, server=None, run_id=None, dag_id=None, action=None, limit=500):
                rows = [e for e in reversed(lab.events) if (action is None or e["action"] == action)
                        and (run_id is None or e["run_id"] == run_id) and (server is None or e["server"] == server)]
                return rows[:limit]

            def record(self, action, outcome, *, server=None, target=None, details=None):
                lab.events.append({"event_id": len(lab.events) + 1, "dag_id": "dr_pitr", "run_id": run_id,
                                   "action": action, "outcome": outcome, "server": server, "target": target,
                                   "details": details or {}})

        return Audit()

    def psql(self, run_id: str, sql: str) -> str:
        self.sql.append((run_id, sql))
        if sql == PAUSE_SQL:
            self.paused = True
        elif sql == RESUME_SQL:
            self.paused = False
        if "pause_state" in sql:
            return "paused" if self.paused else "not paused"
        if "pg_is_wal_replay_paused() ELSE" in sql:
            return "t" if self.paused else "f"
        return f"t|{'t' if self.paused else 'f'}|0/1|2026-12-05 00:00:00+00|7"

    def ctx(self, run_id: str) -> dict:
        def state(*, dag_id: str, run_id: str):
            """As the task SDK answers: the run's `DagRunState` (a str Enum: str() of it is 'DagRunState.RUNNING')."""
            from airflow.sdk.execution_time.comms import DagRunStateResult

            if run_id in self.gone:
                raise RuntimeError(f"API_SERVER_ERROR: 404 Not Found: dag run {run_id}")
            if run_id not in self.states:
                raise RuntimeError("connection refused")
            return DagRunStateResult(state=self.states[run_id]).state

        return {"run_id": run_id, "dag": SimpleNamespace(dag_id="dr_pitr"), "ti": SimpleNamespace(get_dagrun_state=state)}

    def op(self, run_id: str, cls=None):
        sb = Instance(name="pg-delayed", host="h", data_directory="/d", port=5433, socket_directory="/s",
                      log_file="/l", postgres_conn_id="c", apply_delay_s=180)
        op = (cls or ResumeDelayedReplayOperator)(task_id="resume_delayed_replay")
        audit = self.audit_for(run_id)
        op.audit = lambda context: audit
        op.__dict__["srv"] = SimpleNamespace(name="pg-primary", standbys=(sb,), delayed_standbys=(sb,))
        op.__dict__["req"] = SimpleNamespace(in_place=True, source="barman", restore_to="in_place")
        op.db = lambda host: SimpleNamespace(psql=lambda inst, sql: self.psql(run_id, sql))
        return op

    def pause(self, run_id: str) -> dict:
        self.states[run_id] = "running"
        return pause_delayed_replay(self.op(run_id), self.ctx(run_id), settle_s=0)[0]

    def end(self, run_id: str) -> dict:
        out = self.op(run_id).run(self.ctx(run_id))
        self.events.append({"event_id": len(self.events) + 1, "dag_id": "dr_pitr", "run_id": run_id,
                            "action": "resume_delayed_replay", "outcome": "ok", "server": "pg-primary",
                            "target": None, "details": {}})
        self.states[run_id] = "success"
        return out

    def keep(self, run_id: str) -> None:
        """That run failed after its freeze: its resume step kept the standby paused on purpose, and finished."""
        self.audit_for(run_id).record("delayed_replay_kept_paused", "ok", server="pg-primary", target="pg-delayed")
        self.audit_for(run_id).record("resume_delayed_replay", "ok", server="pg-primary")

    def resumes_by(self, run_id: str) -> int:
        return sum(1 for r, s in self.sql if r == run_id and s == RESUME_SQL)


def test_the_first_run_to_end_leaves_the_pause_to_the_other_and_the_last_resumes():
    lab = Lab()
    assert lab.pause("plan")["shared_with"] == []  # it paused it itself
    shared = lab.pause("real")  # found paused, by a live run: a shared pause, not a DBA's
    assert shared["already_paused"] and shared["shared_with"] == ["plan"]
    out = lab.end("plan")
    assert out["resumed"] == [] and out["left_paused_for"] == [{"standby": "pg-delayed", "held_by": ["real"]}]
    assert lab.paused and lab.resumes_by("plan") == 0
    assert [e["details"] for e in lab.events if e["action"] == "delayed_replay_left_paused"] == [{"held_by": ["real"]}]
    out = lab.end("real")
    assert [s["standby"] for s in out["resumed"]] == ["pg-delayed"] and not lab.paused


def test_the_real_run_ending_first_leaves_it_to_the_plan_only_run():
    lab = Lab()
    lab.pause("real")
    lab.pause("plan")
    assert lab.end("real")["left_paused_for"][0]["held_by"] == ["plan"] and lab.paused
    assert lab.end("plan")["resumed"] and not lab.paused


def test_a_dba_pause_is_never_undone_by_any_run():
    lab = Lab(paused=True)
    found = lab.pause("a")
    assert found["already_paused"] and found["shared_with"] == []
    assert lab.end("a") == {"resumed": [], "recovered_onto": None} and lab.paused


def test_a_run_that_ended_without_its_resume_step_holds_nothing():
    """Its Airflow state says it is over (crashed, marked failed): the live run is the last holder."""
    lab = Lab()
    lab.pause("crashed")
    lab.pause("live")
    lab.states["crashed"] = "failed"
    assert lab.end("live")["resumed"] and not lab.paused


def test_a_run_whose_state_cannot_be_read_counts_as_live():
    lab = Lab()
    lab.pause("a")
    lab.pause("b")
    del lab.states["a"]  # the state lookup raises
    assert lab.end("b")["left_paused_for"][0]["held_by"] == ["a"] and lab.paused


def test_a_pause_kept_by_a_failed_run_is_not_undone_by_the_run_that_shared_it():
    lab = Lab()
    lab.pause("failed")
    lab.pause("plan")
    lab.keep("failed")
    lab.states["failed"] = "failed"
    out = lab.end("plan")
    assert out["left_paused_for"][0]["held_by"] == ["failed (kept paused)"] and lab.paused


def test_a_pause_kept_before_a_run_started_is_a_dbas_until_someone_resumes_it():
    lab = Lab()
    lab.pause("failed")
    lab.keep("failed")
    lab.states["failed"] = "running"  # its summary is still running: live, but a keeper, not a sharer
    assert lab.pause("later")["shared_with"] == []
    assert lab.end("later")["resumed"] == [] and lab.paused
    lab.paused = False  # the DBA resumed it; a new run pauses it fresh and resumes it when it ends
    assert lab.pause("next")["already_paused"] is False
    assert lab.end("next")["resumed"] and not lab.paused


def test_a_run_that_paused_while_the_last_holder_resumed_gets_its_pause_back():
    lab = Lab()
    lab.pause("a")
    op = lab.op("a")
    real_psql = lab.psql

    def psql(run_id, sql):  # run b arrives between a's holder check and a's resume
        if sql == RESUME_SQL and "b" not in lab.states:
            lab.psql = real_psql
            lab.pause("b")
        return real_psql(run_id, sql)

    lab.psql = psql
    op.db = lambda host: SimpleNamespace(psql=lambda inst, sql: lab.psql("a", sql))
    out = op.run(lab.ctx("a"))
    assert out["resumed"] == [] and out["left_paused_for"][0]["held_by"] == ["b"] and lab.paused
    assert [s for r, s in lab.sql if r == "a"][-1] == PAUSE_SQL


def test_a_run_airflow_no_longer_has_holds_nothing():
    lab = Lab()
    lab.pause("deleted")
    lab.pause("live")
    lab.gone.add("deleted")
    assert lab.end("live")["resumed"] and not lab.paused


def test_a_dba_pause_after_a_run_finished_its_resume_step_is_not_taken_for_that_runs():
    """Run a resumed and finished its resume step (the run itself still ends its last tasks); a DBA pauses."""
    lab = Lab()
    lab.pause("a")
    lab.op("a").run(lab.ctx("a"))  # resumed
    lab.audit_for("a").record("resume_delayed_replay", "ok", server="pg-primary")
    assert not lab.paused and lab.states["a"] == "running"
    lab.paused = True  # the DBA
    assert lab.pause("b")["shared_with"] == []  # a DBA's pause: never b's to undo
    assert lab.end("b")["resumed"] == [] and lab.paused
