"""Four-eyes approval rules (pure): who may approve, when the run waits, what the approver sees."""

from __future__ import annotations

import pytest

from barman_dr.exceptions import ValidationError
from barman_dr.inventory import InventoryError, parse_inventory
from barman_dr.safety.approval import (
    approval_body,
    check_response,
    decide,
    eligible_approvers,
    expand_approvers,
    plan_hash,
    simple_auth_users,
)

ROLES = simple_auth_users("admin:admin, approver:op,lead:op,viewer1:viewer,nobody")


def test_simple_auth_users_setting_is_read_as_user_roles():
    assert ROLES == {"admin": "admin", "approver": "op", "lead": "op", "viewer1": "viewer", "nobody": "viewer"}
    assert simple_auth_users(None) == {} and simple_auth_users("") == {}


def test_roles_expand_to_their_users_and_names_stay_as_given():
    assert expand_approvers(["role:op"], ROLES) == ["approver", "lead"]
    assert expand_approvers(["carol", "role:OP", "lead"], ROLES) == ["carol", "approver", "lead"]
    assert expand_approvers(["role:nosuchrole"], ROLES) == []


def test_the_requester_is_never_an_approver():
    assert eligible_approvers("pg-primary", ["approver", "role:admin"], ROLES, "admin") == ["approver"]
    assert eligible_approvers("pg-primary", ["role:op"], ROLES, "lead") == ["approver"]
    assert eligible_approvers("pg-primary", ["approver"], ROLES, None) == ["approver"]


@pytest.mark.parametrize(("entries", "requester", "says"), [
    ([], "admin", "names no approvers"),
    (["admin"], "admin", "nobody but the requester"),
    (["role:admin"], "admin", "nobody but the requester"),
    (["role:nosuchrole"], "admin", "nobody but the requester"),
])
def test_no_second_person_is_refused_before_waiting(entries, requester, says):
    with pytest.raises(ValidationError) as exc:
        eligible_approvers("pg-primary", entries, ROLES, requester)
    assert exc.value.field == "approvers" and says in str(exc.value)
    assert "approvers" in str(exc.value)  # the fix names the inventory key


@pytest.mark.parametrize(("confirmed", "plan_only", "required", "wait", "why"), [
    (True, False, False, False, "pre-approved by confirm"),
    (False, False, False, True, "second person"),
    (True, False, True, True, "confirm is ignored"),
    (False, True, False, False, "plan only"),
    (False, True, True, False, "plan only"),
])
def test_when_the_run_waits(confirmed, plan_only, required, wait, why):
    d = decide(confirmed=confirmed, plan_only=plan_only, require_approval=required)
    assert d.wait is wait and why in d.why


def test_a_response_counts_only_from_an_eligible_second_person():
    assert check_response("approver", "admin", ["approver"]) is None
    assert "cannot also approve" in check_response("admin", "admin", ["approver", "admin"])
    assert "not one of this server's approvers" in check_response("mallory", "admin", ["approver"])
    assert "names no user" in check_response(None, "admin", ["approver"])


def test_plan_hash_ignores_timing_and_sees_every_change():
    plan = {"server": "pg-primary", "stop": {"lsn": "0/9000150"}, "steps": ["a", "b"]}
    assert plan_hash(plan) == plan_hash({**plan, "started_at": "x", "duration_s": 3})
    assert plan_hash(plan) != plan_hash({**plan, "stop": {"lsn": "0/9000151"}})
    assert len(plan_hash(plan)) == 16


def test_the_body_is_the_plan_with_who_asks_and_who_may_answer():
    text = ("PITR plan for pg-primary (awaiting approval by a second person)\ntarget: xid 812 exclusive\n"
            "discarded: 3 transaction(s)\nsteps:\n1. freeze app\n```evil```")
    body = approval_body(noun="PITR", server="pg-primary", plan_text=text, requester="admin",
                         why="not pre-approved", approvers=["approver"], timeout_s=1800, digest="abc123")
    assert "requested by **admin**" in body and "may approve: approver" in body and "30 min" in body
    assert "target: xid 812 exclusive" in body and "discarded: 3" in body and "1. freeze app" in body
    assert "`abc123`" in body and body.count("```") == 2  # the plan cannot close its own code block


def inventory_with(**server_keys):
    """The lab inventory, with its pg-primary2 entry's approval keys replaced."""
    import copy
    from pathlib import Path

    import yaml

    raw = copy.deepcopy(yaml.safe_load((Path(__file__).parents[2] / "include/inventory/lab.yaml").read_text()))
    srv = raw["servers"]["pg-primary2"]
    for key in ("require_approval", "approvers", "approval_timeout_minutes"):
        srv.pop(key, None)
    srv.update(server_keys)
    return parse_inventory(raw, "lab.yaml", {"LAB_DIR": "/tmp/lab", "LAB_NET": "127.0.10"})


def test_inventory_approval_keys_and_defaults():
    srv = inventory_with().server("pg-primary2")
    assert (srv.require_approval, srv.approvers, srv.approval_timeout_seconds) == (False, (), 1800)
    srv = inventory_with(require_approval=True, approvers=["alice", "role:op", "alice"],
                         approval_timeout_minutes=0.5).server("pg-primary2")
    assert (srv.require_approval, srv.approvers, srv.approval_timeout_seconds) == (True, ("alice", "role:op"), 30)


@pytest.mark.parametrize(("key", "value"), [
    ("require_approval", "yes"), ("approvers", "alice"), ("approvers", ["alice; rm -rf /"]),
    ("approvers", ["role:"]), ("approval_timeout_minutes", 0), ("approval_timeout_minutes", 20000),
    ("approval_timeout_minutes", True),
])
def test_inventory_approval_keys_are_validated(key, value):
    with pytest.raises(InventoryError) as exc:
        inventory_with(**{key: value})
    assert key in str(exc.value)


@pytest.mark.parametrize("validate", ["pitr", "surgical", "salvage"])
def test_plan_only_is_a_preview_and_contradicts_confirm(inventory, validate):
    from barman_dr.params.pitr_request import validate_pitr_conf
    from barman_dr.params.salvage_request import validate_salvage_conf
    from barman_dr.params.surgical_request import validate_surgical_conf

    fn, word = {"pitr": (validate_pitr_conf, "PITR"), "surgical": (validate_surgical_conf, "SURGICAL"),
                "salvage": (validate_salvage_conf, "SALVAGE")}[validate]
    base = {"server": "pg-primary"} | ({} if validate == "salvage" else {"target_time": "2026-11-25T10:00:00+00:00"})
    assert fn({**base, "plan_only": True}, inventory).plan_only is True
    assert fn(base, inventory).plan_only is False
    with pytest.raises(ValidationError) as exc:
        fn({**base, "plan_only": True, "confirm": f"{word} pg-primary"}, inventory)
    assert exc.value.field == "plan_only" and "remove `confirm`" in str(exc.value)
    with pytest.raises(ValidationError) as exc:
        fn({**base, "plan_only": "yes"}, inventory)
    assert exc.value.field == "plan_only"


def test_destructive_pitr_steps_refuse_without_an_approval_or_this_runs_lock(monkeypatch):
    """An `approve` marked success by hand leaves no approval: stage_restore and the in-window steps refuse."""
    from types import SimpleNamespace

    from barman_dr.exceptions import ApprovalMissingError
    from barman_dr.operators.pitr.execute import FreezeAppOperator, MoveAsideOperator
    from barman_dr.operators.pitr.stage import StageRestoreOperator
    from barman_dr.safety.locks import LockHolder, ServerLock

    op = StageRestoreOperator(task_id="stage_restore", request={"server": "pg-primary"})
    assert op.gated_by_approval and FreezeAppOperator.gated_by_approval and MoveAsideOperator.gated_by_approval
    monkeypatch.setattr(type(op), "server_name", property(lambda self: "pg-primary"))
    dag = SimpleNamespace(dag_id="dr_pitr", task_ids=["plan", "approve", "stage_restore"])
    xcom: dict = {}
    ti = SimpleNamespace(xcom_pull=lambda task_ids: xcom.get(task_ids))
    ctx = {"dag": dag, "run_id": "r1", "ti": ti}
    holder: list = [None]
    monkeypatch.setattr(ServerLock, "holder", lambda self, server: holder[0])

    with pytest.raises(ApprovalMissingError, match="no approval"):
        op.check_approval_gate(ctx)
    xcom["approve"] = {"approved": True, "decision": "approved"}
    with pytest.raises(ApprovalMissingError, match="held by nobody"):
        op.check_approval_gate(ctx)
    holder[0] = LockHolder("pg-primary", "dr_pitr", "other-run", "pitr", "2026-12-04T00:00:00")
    with pytest.raises(ApprovalMissingError, match="other-run"):
        op.check_approval_gate(ctx)
    holder[0] = LockHolder("pg-primary", "dr_pitr", "r1", "pitr", "2026-12-04T00:00:00")
    op.check_approval_gate(ctx)  # approved, and this run holds the lock
    op.check_approval_gate({**ctx, "dag": SimpleNamespace(dag_id="dr_other", task_ids=["x"])})  # no approve step


class _Audit:
    def __init__(self, events):
        self.rows = events  # newest first, as AuditTrail.events returns them
        self.recorded = []

    def events(self, *, run_id=None, dag_id=None, action=None, limit=500, **_):
        return [e for e in self.rows if action is None or e["action"] == action][:limit]

    def record(self, action, outcome, **kw):
        self.recorded.append((action, outcome, kw.get("details")))


def _approve_op(events, monkeypatch):
    from types import SimpleNamespace

    from barman_dr.operators.approve import FourEyesApprovalOperator
    from barman_dr.safety import locks

    op = FourEyesApprovalOperator(task_id="approve", noun="PITR", lock_purpose="pitr")
    audit = _Audit(events)
    op.audit = lambda context: audit
    op.__dict__["srv"] = SimpleNamespace(name="pg-primary")
    acquired = []
    monkeypatch.setattr(locks.ServerLock, "acquire", lambda self, *a, **kw: acquired.append(a))
    ctx = {"run_id": "r", "dag": SimpleNamespace(dag_id="dr_pitr")}
    return op, audit, acquired, ctx


def _answer(decision, event_id, plan_hash="h1", try_number=1):
    return {"action": "approval", "event_id": event_id, "try_number": try_number, "task_id": "approve",
            "details": {"decision": decision, "approver": "approver", "requester": "admin", "plan_hash": plan_hash,
                        "responded_at": "2026-12-05 04:05:16", "error": "a reason" if decision == "refused" else None}}


LOST = {"action": "task_failed", "event_id": 9, "task_id": "approve", "try_number": 1,
        "details": {"will_retry": True, "state": "up_for_retry",
                    "error": "str: Executor LocalExecutor(parallelism=32) reported that the task instance ... "
                             "finished with state success, but the task instance's state attribute is running"}}


def _newest_first(events):
    return sorted(events, key=lambda e: -e["event_id"])


@pytest.mark.parametrize("failed_id", [9, 4])  # the listener's task_failed after, or before, the answer
def test_an_answer_airflow_lost_after_it_was_recorded_is_kept_not_asked_again(monkeypatch, failed_id):
    """apache/airflow#71579: a fast answer, then the scheduler fails the resumed try from outside, with a retry."""
    from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

    lost = {**LOST, "event_id": failed_id}
    op, audit, acquired, ctx = _approve_op(_newest_first([lost, _answer("rejected", 5), _answer("requested", 3)]),
                                           monkeypatch)
    with pytest.raises(AirflowSkipException, match="rejected by approver"):
        op.answer_of_a_lost_try(ctx, "h1")
    assert audit.recorded[0][:2] == ("approval_kept", "info") and audit.recorded[0][2]["kept"] == "rejected"
    op, audit, acquired, ctx = _approve_op(_newest_first([lost, _answer("refused", 5), _answer("requested", 3)]),
                                           monkeypatch)
    with pytest.raises(AirflowFailException, match="stands"):  # a refusal is never turned into a new question
        op.answer_of_a_lost_try(ctx, "h1")
    op, audit, acquired, ctx = _approve_op(_newest_first([lost, _answer("approved", 5), _answer("requested", 3)]),
                                           monkeypatch)
    kept = op.answer_of_a_lost_try(ctx, "h1")
    assert kept["decision"] == "approved" and kept["approver"] == "approver" and kept["kept_from_try"] == 1
    assert acquired, "an approval is confirmed against the server lock again"


def test_anything_but_a_lost_answer_asks_again(monkeypatch):
    cases = [
        [_answer("requested", 3)],  # never answered (the try died waiting)
        [_answer("approved", 5), _answer("requested", 3)],  # answered, never failed by Airflow: a DBA's clear
        [LOST, _answer("requested", 6), _answer("approved", 5)],  # asked again since
        [LOST, _answer("approved", 5, plan_hash="old")],  # the plan changed
        [{**LOST, "try_number": 2}, _answer("approved", 5)],  # another try failed, not the one that answered
        [{**LOST, "details": {"will_retry": False, "state": "failed"}}, _answer("approved", 5)],  # marked failed
        [{**LOST, "task_id": "plan"}, _answer("approved", 5)],  # another step failed
    ]
    for events in cases:
        op, audit, acquired, ctx = _approve_op(_newest_first(events), monkeypatch)
        assert op.answer_of_a_lost_try(ctx, "h1") is None, events
        assert audit.recorded == [] and acquired == []
