"""Approve: the plan waits for a second person, inside Airflow, before anything destructive.

Follows the plan in dr_pitr, dr_surgical_recovery and dr_salvage. It is Airflow's own
human-in-the-loop operator (`HITLOperator`: the Required Actions page, the HITL REST API,
on Airflow 3.3 the `awaiting_input` state and the scheduler's timeout sweep), with the DR
rules of `barman_dr.safety.approval` around it:

- `plan_only` skips it (and so everything after it): a preview asks nobody;
- `confirm` pre-approves it, unless the server has `require_approval: true`;
- otherwise the plan is the body, the assigned users are the server's approvers minus the
  requester, and the run waits up to the server's `approval_timeout_minutes`;
- Approve: the responder is checked again (never the requester) against the plan it was
  shown, the server lock (taken at validate_params) is confirmed as this run's, and the run
  goes on;
- Reject: everything after it is skipped, the run ends with nothing touched;
- no answer in time: the step fails (the failure summary and DrNotifier say so), nothing
  touched.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.providers.standard.operators.hitl import HITLOperator
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from barman_dr.exceptions import ValidationError
from barman_dr.operators.base import DrBaseOperator, utcnow
from barman_dr.safety.approval import (
    APPROVE,
    REJECT,
    approval_body,
    check_response,
    decide,
    eligible_approvers,
    plan_hash,
    simple_auth_users,
)
from barman_dr.safety.locks import ServerLock, ServerLockedError
from barman_dr.surfaces.run_note import _api, set_run_note


def user_roles() -> dict[str, str]:
    """The auth manager's users and roles, for `role:<role>` approvers (SimpleAuthManager's setting)."""
    from airflow.configuration import conf

    return simple_auth_users(conf.get("core", "simple_auth_manager_users", fallback=""))


class FourEyesApprovalOperator(DrBaseOperator, HITLOperator):
    """Wait for a second person to approve the plan (or pass a pre-approved / plan-only run straight through)."""
    runs_on_site = False  # bookkeeping: the `default` queue

    action = "approval"
    ui_color = "#fff4d6"
    template_fields = ("request",)

    def __init__(self, *, noun: str, lock_purpose: str, plan_task_id: str = "plan", **kwargs: Any) -> None:
        kwargs.setdefault("subject", f"{noun}: approve the plan")
        kwargs.setdefault("options", [APPROVE, REJECT])
        kwargs.setdefault("multiple", False)
        super().__init__(**kwargs)
        self.noun = noun
        self.lock_purpose = lock_purpose
        self.plan_task_id = plan_task_id

    # the requests of the three DAGs differ: only these keys are read
    @property
    def server_name(self) -> str:
        return str((self.request or {}).get("server"))

    def audit_target(self) -> str | None:
        return None

    def requester(self, context: Any) -> str | None:
        return getattr(context.get("dag_run"), "triggering_user_name", None) or None

    def rules(self, context: Any) -> tuple[str | None, list[str]]:
        requester = self.requester(context)
        return requester, eligible_approvers(self.server_name, self.srv.approvers, user_roles(), requester)

    def run(self, context: Any) -> dict[str, Any]:
        req = self.request or {}
        srv = self.srv
        decision = decide(confirmed=bool(req.get("confirmed")), plan_only=bool(req.get("plan_only")),
                          require_approval=srv.require_approval)
        plan = self.upstream(context, self.plan_task_id) or {}
        digest = plan_hash(plan)
        if not decision.wait:
            if req.get("plan_only"):
                self.audit(context).record(self.action, "info", server=srv.name,
                                           details={"decision": "plan_only", "plan_hash": digest})
                raise AirflowSkipException(decision.why)
            return {"approved": True, "decision": "pre_approved", "why": decision.why, "plan_hash": digest,
                    "requester": self.requester(context)}
        kept = self.answer_of_a_lost_try(context, digest)
        if kept is not None:
            return kept
        requester, eligible = self.rules(context)
        if not requester:
            raise ValidationError("requester", None, "this run has no triggering user, so a second person cannot be "
                                                     "told apart from the first: trigger it as a named Airflow user "
                                                     "(the UI or the REST API), or pre-approve it with confirm")
        self.subject = f"{self.noun} of {srv.name}: approve the plan"
        self.body = approval_body(noun=self.noun, server=srv.name, plan_text=str(plan.get("text") or plan),
                                  requester=requester, why=decision.why, approvers=eligible,
                                  timeout_s=srv.approval_timeout_seconds, digest=digest)
        self.assigned_users = [{"id": u, "name": u} for u in eligible]
        self.response_timeout = timedelta(seconds=srv.approval_timeout_seconds)
        link = self.required_actions_link(context)
        self.audit(context).record(self.action, "info", server=srv.name, details={
            "decision": "requested", "why": decision.why, "requester": requester, "requested_at": utcnow(),
            "approvers": eligible, "timeout_s": srv.approval_timeout_seconds, "plan_hash": digest, "link": link})
        self.notify_approvers(context, requester, eligible, link)
        HITLOperator.execute(self, context)  # parks the task (awaiting_input); resumes in execute_complete
        raise AssertionError("unreachable: the human-in-the-loop wait did not park the task")  # pragma: no cover

    def answer_of_a_lost_try(self, context: Any, digest: str) -> dict[str, Any] | None:
        """An answer that an earlier try recorded and Airflow then lost, kept instead of asking again.

        Airflow 3.3.2 races a fast answer (apache/airflow#71579, open): the parked try's process
        exits "success" late, the scheduler meets the resumed try running and fails it ("finished
        with state success, but the task instance's state attribute is running"), with a retry.
        CI saw a Reject turn the run red that way. The step has one retry. A retry whose previous
        try recorded an answer (approved, rejected, refused, timed out) for this very plan *and*
        was failed by Airflow with a retry (the listener's `task_failed`, same try number,
        `will_retry`) keeps that answer, whichever of the two was written first: an approval goes
        on (the server lock confirmed again), a rejection skips, a refusal fails again. Anything
        else (a DBA's clear, a try lost before any answer, a changed plan) asks again.
        """
        audit = self.audit(context)
        run = {"run_id": context["run_id"], "dag_id": context["dag"].dag_id}
        answer = None
        for e in audit.events(**run, action=self.action, limit=50):  # newest first
            decision = (e.get("details") or {}).get("decision")
            if decision == "requested":
                break  # asked (again) since any answer
            if decision in ("approved", "rejected", "refused", "locked", "timed_out", "error"):
                answer = e
                break
        if answer is None or (answer.get("details") or {}).get("plan_hash") != digest:
            return None
        tried = answer.get("try_number")
        lost = [e for e in audit.events(**run, action="task_failed", limit=20)
                if e.get("task_id") == self.task_id and tried is not None and e.get("try_number") == tried
                and (e.get("details") or {}).get("will_retry")]
        if not lost:
            return None
        d = answer.get("details") or {}
        decision = d.get("decision")
        srv = self.srv
        audit.record("approval_kept", "info", server=srv.name, details={
            "kept": decision, "approver": d.get("approver"), "plan_hash": digest, "from_try": tried,
            "why": "the earlier try recorded this answer and was then failed by Airflow with a retry"})
        if decision == "rejected":
            raise AirflowSkipException(f"rejected by {d.get('approver')} (kept from try {tried}): nothing was touched")
        if decision != "approved":
            raise AirflowFailException(f"the answer of try {tried} stands ({decision}: {d.get('error') or '-'}). "
                                       "Nothing was touched. NEXT: trigger again and let a second person approve")
        try:
            self.confirm_lock(context)
        except ServerLockedError as exc:
            raise AirflowFailException(str(exc)) from exc
        return {"approved": True, "decision": "approved", "requester": d.get("requester"),
                "approver": d.get("approver"), "responded_at": d.get("responded_at"), "plan_hash": digest,
                "kept_from_try": tried}

    def confirm_lock(self, context: Any) -> None:
        """validate_params took the server lock; confirm it is still this run's before anything moves."""
        ServerLock(postgres_conn_id=self.audit_conn_id).acquire(
            self.srv.name, dag_id=context["dag"].dag_id, run_id=context["run_id"], purpose=self.lock_purpose)

    def required_actions_link(self, context: Any) -> str | None:
        api = _api("airflow_api")
        try:
            return self.generate_link_to_ui(task_instance=context["ti"], base_url=api[0] if api else None)
        except ValueError:
            return None

    def notify_approvers(self, context: Any, requester: str | None, eligible: list[str], link: str | None) -> None:
        from barman_dr.surfaces.notifications import DrNotifier

        DrNotifier().deliver(context, {
            "message": f"{self.noun} of {self.server_name} waits for approval by one of {', '.join(eligible)} "
                       f"(requested by {requester or 'unknown'}, run {context['run_id']})",
            "server": self.server_name, "link": link, "requester": requester, "approvers": eligible,
            "next_action": f"open {link or 'Required Actions'} and approve or reject the plan"}, outcome="info")

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        """The answer (or the timeout): checked, audited, shown on the run note."""
        if self.request is None:
            self.request = context["ti"].xcom_pull(task_ids=self.request_task_id)
        audit = self.audit(context)
        srv = self.srv
        plan = self.upstream(context, self.plan_task_id) or {}
        digest = plan_hash(plan)
        requester = self.requester(context)
        note = str(plan.get("text") or "")
        if "error" in event and event.get("error_type") != "timeout":
            audit.record(self.action, "failed", server=srv.name, details={
                "decision": "error", "requester": requester, "plan_hash": digest, "error": str(event["error"])})
            raise AirflowFailException(f"the approval wait failed ({event['error']}): nothing was touched. NEXT: "
                                       "trigger again")
        if "error" in event:
            audit.record(self.action, "failed", server=srv.name, details={
                "decision": "timed_out", "requester": requester, "plan_hash": digest,
                "error": f"no answer within {srv.approval_timeout_seconds / 60:g} min: nothing was touched "
                         f"({event['error']})"})
            self.note(context, f"NOT APPROVED: no answer within {srv.approval_timeout_seconds / 60:g} min; nothing "
                               "was touched", note)
            raise AirflowFailException(f"no approval within {srv.approval_timeout_seconds / 60:g} min: nothing was "
                                       "touched. NEXT: trigger again and ask an approver, or pre-approve with confirm")
        responder = (event.get("responded_by_user") or {}).get("id") or (event.get("responded_by_user") or {}).get(
            "name")
        responded_at = event.get("responded_at")
        chosen = list(event.get("chosen_options") or [])
        _, eligible = self.rules(context)
        why_not = check_response(responder, requester, eligible)
        shown = self.shown_plan_hash(audit, context)
        if not why_not and chosen == [APPROVE] and shown and shown != digest:
            why_not = (f"the plan changed since it was shown for approval (shown {shown}, now {digest}: the run was "
                       "cleared and planned again); the approver did not see this plan")
        details = {"requester": requester, "approver": responder, "responded_at": str(responded_at),
                   "chosen": chosen, "plan_hash": digest}
        if why_not:
            audit.record(self.action, "refused", server=srv.name, details={**details, "decision": "refused",
                                                                            "error": why_not})
            self.note(context, f"APPROVAL REFUSED: {why_not}; nothing was touched", note)
            raise AirflowFailException(f"approval refused: {why_not}. Nothing was touched. NEXT: trigger again and "
                                       "let a second person approve")
        if chosen != [APPROVE]:
            audit.record(self.action, "refused", server=srv.name, details={**details, "decision": "rejected"})
            self.note(context, f"REJECTED by {responder} at {str(responded_at)[:19]}: nothing was touched", note)
            raise AirflowSkipException(f"rejected by {responder}: nothing was touched")
        try:
            self.confirm_lock(context)
        except ServerLockedError as exc:
            audit.record(self.action, "refused", server=srv.name, details={**details, "decision": "locked",
                                                                            "error": str(exc)})
            self.note(context, f"APPROVED by {responder} but refused: {exc}", note)
            raise AirflowFailException(str(exc)) from exc
        audit.record(self.action, "ok", server=srv.name, details={**details, "decision": "approved"})
        self.note(context, f"APPROVED by {responder} at {str(responded_at)[:19]} (requested by {requester or 'unknown'}"
                           f", plan {digest})", note)
        return {"approved": True, "decision": "approved", "requester": requester, "approver": responder,
                "responded_at": str(responded_at), "plan_hash": digest}

    def shown_plan_hash(self, audit: Any, context: Any) -> str | None:
        """The hash of the plan in the request's body: the run's first request (a clear keeps the first body)."""
        try:
            events = audit.events(run_id=context["run_id"], dag_id=context["dag"].dag_id, action=self.action)
        except Exception:  # noqa: BLE001 - unreadable audit: the base step already refused to run without it
            return None
        requested = sorted((e for e in events if (e.get("details") or {}).get("decision") == "requested"),
                           key=lambda e: e.get("event_id") or 0)
        return (requested[0].get("details") or {}).get("plan_hash") if requested else None

    def note(self, context: Any, head: str, plan_text: str) -> None:
        set_run_note(context["dag"].dag_id, context["run_id"], f"{head}\n{plan_text}" if plan_text else head)
