"""The trigger-form params every four-eyes DAG shares (dr_pitr, dr_surgical_recovery, dr_salvage)."""

from __future__ import annotations

from airflow.sdk import Param


def plan_only_param() -> Param:
    """`plan_only`: a preview that asks nobody; off, an unconfirmed plan waits for a second person."""
    return Param(False, type="boolean", title="Plan only (preview)",
                 description="On: stop after the plan, ask nobody, touch nothing (a preview). Off (default): "
                             "without confirm, the plan waits in Required Actions for a second person "
                             "(the server's approvers, never you) to approve or reject it.")
