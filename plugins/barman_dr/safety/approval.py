"""Four-eyes approval: who may approve a destructive run, and what they are shown.

A DR run that was not pre-approved with `confirm` (or whose server has
`require_approval: true`) stops after its plan and asks a second person inside Airflow
(the human-in-the-loop Required Actions, or the HITL REST API). The rules, pure so they
are unit-tested without Airflow:

- the requester is the run's triggering user; the approvers are the inventory's
  `approvers` (user names, or `role:<role>` for every user of that role) **minus the
  requester**: Airflow's API then answers 403 to the requester (`assigned_users`);
- a response is checked again when the run resumes (an auth manager may let everyone
  answer, e.g. `simple_auth_manager_all_admins`): the requester, or anyone not eligible, is
  refused and nothing moves;
- the approver sees the plan itself, and its hash goes to the audit trail with both names.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from barman_dr.exceptions import ValidationError

APPROVE = "Approve"
REJECT = "Reject"


def simple_auth_users(users_setting: str | None) -> dict[str, str]:
    """`[core] simple_auth_manager_users` ("alice:admin,bob:op") as user -> role."""
    out: dict[str, str] = {}
    for entry in (users_setting or "").split(","):
        name, _, role = entry.strip().partition(":")
        if name:
            out[name] = (role or "viewer").strip().lower()
    return out


def expand_approvers(entries: Iterable[str], user_roles: Mapping[str, str]) -> list[str]:
    """User names as given; `role:<role>` as every known user of that role (sorted, deduplicated)."""
    out: list[str] = []
    for entry in entries:
        if entry.startswith("role:"):
            role = entry[5:].lower()
            out += sorted(u for u, r in user_roles.items() if r == role)
        else:
            out.append(entry)
    return list(dict.fromkeys(out))


def eligible_approvers(server: str, entries: Iterable[str], user_roles: Mapping[str, str],
                       requester: str | None) -> list[str]:
    """Who may approve this run: the inventory's approvers, never the requester. None eligible is an error."""
    entries = list(entries)
    if not entries:
        raise ValidationError("approvers", server, f"the inventory names no approvers for {server}: add "
                                                   "`approvers: [<user>, role:<role>]` to the server, or pre-approve "
                                                   "with `confirm` (not possible with require_approval)")
    eligible = [u for u in expand_approvers(entries, user_roles) if u != requester]
    if not eligible:
        raise ValidationError("approvers", entries, f"nobody but the requester ({requester}) may approve runs of "
                                                    f"{server}: a second person must approve. Add another user (or a "
                                                    "role with other users) to the server's `approvers`")
    return eligible


@dataclass(frozen=True)
class Decision:
    """What the approval step does before asking anyone."""

    wait: bool
    why: str


def decide(*, confirmed: bool, plan_only: bool, require_approval: bool) -> Decision:
    """Pre-approved by `confirm`, a plan-only preview, or wait for a second person."""
    if plan_only:
        return Decision(False, "plan only: nobody is asked, nothing is touched")
    if require_approval:
        return Decision(True, "the server requires a second person (require_approval: true; confirm is ignored)")
    if confirmed:
        return Decision(False, "pre-approved by confirm")
    return Decision(True, "not pre-approved (no confirm): a second person must approve the plan")


def check_response(responder: str | None, requester: str | None, eligible: Iterable[str]) -> str | None:
    """Why a response must not count (None when it does)."""
    if not responder:
        return "the response names no user"
    if requester and responder == requester:
        return f"{responder} triggered this run and cannot also approve it (four eyes)"
    if responder not in set(eligible):
        return f"{responder} is not one of this server's approvers ({', '.join(eligible)})"
    return None


def plan_hash(plan: Mapping[str, Any]) -> str:
    """A stable hash of what the approver saw (timing keys excluded)."""
    body = {k: v for k, v in plan.items() if k not in {"started_at", "ended_at", "duration_s"}}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


def approval_body(*, noun: str, server: str, plan_text: str, requester: str | None, why: str,
                  approvers: Iterable[str], timeout_s: int, digest: str) -> str:
    """The Required Actions body (Markdown): the plan itself, then who asks and who may answer."""
    minutes = f"{timeout_s / 60:g}"
    return "\n".join([
        f"### {noun} of `{server}` waits for a second person",
        "",
        f"- requested by **{requester or '(unknown: scheduled or in-process)'}**; {why}",
        f"- may approve: {', '.join(approvers)} (never the requester)",
        f"- no answer within {minutes} min ends the run with nothing touched",
        f"- plan hash `{digest}` (recorded with both names in the audit trail)",
        "",
        "```text",
        plan_text.replace("```", "'''"),
        "```",
        "",
        f"**{APPROVE}** executes exactly these steps. **{REJECT}** ends the run; nothing is touched.",
    ])
