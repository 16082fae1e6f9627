"""The mechanisms behind "the orchestrator itself fails" (issue 18), fed recorded facts.

The lab-level proofs are tests/faults/test_airflow_crash.py; these pin the rules: which
tries were lost, when a frozen app is alerted on and with which next step, which scratch
directories are orphans, when a full staging filesystem is recognised.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from barman_dr.exceptions import BarmanCommandError, InventoryError
from barman_dr.inventory import parse_inventory
from barman_dr.operators.base import interrupted_tries
from barman_dr.operators.pitr.stage import StagingSpaceError, check_staging_space, out_of_space
from barman_dr.safety.freeze_guard import ALERT, FROZEN, OK, assess
from barman_dr.safety.orphans import classify, parse_listing, recorded_paths
from barman_dr.safety.ownership import OWNER_SQL, Owner, owners_from_rows
from barman_dr.verification import orphan_findings

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


def ev(action: str, outcome: str, try_number: int, task_id: str = "barman_restore", **details) -> dict:
    return {"action": action, "outcome": outcome, "try_number": try_number, "task_id": task_id,
            "event_time": f"2026-12-04T11:0{try_number}:00+00:00", "details": details}


# ------------------------------------------------------------------------------------ lost tries


def test_a_try_that_started_and_never_ended_is_interrupted():
    events = [ev("barman_restore", "started", 1)]
    assert interrupted_tries(events, "barman_restore", "barman_restore", 2) == [
        {"interrupted_try": 1, "started_at": "2026-12-04T11:01:00+00:00"}]


@pytest.mark.parametrize("end", ["ok", "failed", "refused"])
def test_a_try_with_an_outcome_is_not_interrupted(end):
    events = [ev("barman_restore", "started", 1), ev("barman_restore", end, 1)]
    assert interrupted_tries(events, "barman_restore", "barman_restore", 2) == []


def test_the_current_try_and_other_tasks_do_not_count():
    events = [ev("barman_restore", "started", 2), ev("move_aside", "started", 1, task_id="move_aside"),
              ev("barman_restore", "started", 1, task_id="other")]
    assert interrupted_tries(events, "barman_restore", "barman_restore", 2) == []


def test_a_lost_try_is_reported_once():
    """Try 3 does not report try 1 again when try 2 already did."""
    events = [ev("barman_restore", "started", 1), ev("barman_restore", "warning", 2, interrupted_try=1),
              ev("barman_restore", "started", 2)]
    assert [t["interrupted_try"] for t in interrupted_tries(events, "barman_restore", "barman_restore", 3)] == [2]


def test_an_audit_event_of_another_action_does_not_end_the_try():
    """stage_restore records `staging_directory` info before its copy: the try is still open."""
    events = [ev("stage_restore", "started", 1, task_id="stage_restore"),
              ev("staging_directory", "info", 1, task_id="stage_restore")]
    assert len(interrupted_tries(events, "stage_restore", "stage_restore", 2)) == 1


# ------------------------------------------------------------------------------------- ownership


def test_ownership_rows_and_description():
    owners = owners_from_rows("pg-primary", [("lock", "dr_pitr", "r1", "pitr", NOW),
                                             ("app_frozen", "dr_pitr", "r0", "frozen", NOW - timedelta(hours=1))])
    assert [o.reason for o in owners] == ["lock", "app_frozen"]
    assert "holds its lock" in owners[0].describe() and "froze its app" in owners[1].describe()
    assert owners[0].since == NOW.isoformat()


def test_the_ownership_query_ends_a_freeze_only_with_a_resume():
    for action in ("unfreeze_app", "rollback"):
        assert f"'{action}'" in OWNER_SQL
    assert "control.server_locks" in OWNER_SQL and "'freeze_app' AND outcome = 'ok'" in OWNER_SQL


# ---------------------------------------------------------------------------------- freeze guard


def owner(reason: str, run_id: str = "manual__inc-7", minutes_ago: float = 5) -> Owner:
    return Owner("pg-primary", reason, "dr_pitr", run_id, "x", (NOW - timedelta(minutes=minutes_ago)).isoformat())


def test_not_frozen_is_ok():
    v = assess("pg-primary", paused=False, frozen_by=None, lock=None, run_events=[], last_alert_at=None, now=NOW,
               max_freeze_s=60)
    assert v.status == OK and v.next_step is None


def test_frozen_within_max_freeze_is_not_an_alert():
    v = assess("pg-primary", paused=True, frozen_by=owner("app_frozen", minutes_ago=0.5), lock=None, run_events=[],
               last_alert_at=None, now=NOW, max_freeze_s=60)
    assert v.status == FROZEN and v.frozen_for_s == 30.0


def test_frozen_past_max_freeze_by_a_running_run_says_bring_airflow_back():
    events = [ev("barman_restore", "started", 1)]
    v = assess("pg-primary", paused=True, frozen_by=owner("app_frozen"), lock=owner("lock"), run_events=events,
               last_alert_at=None, now=NOW, max_freeze_s=60)
    assert v.status == ALERT and not v.repeat
    assert "manual__inc-7" in v.message and "still holds the server lock" in v.message
    assert "barman_restore started" in v.message
    assert "scheduler or workers are down" in v.next_step and "Do not RESUME" in v.next_step


def test_frozen_past_max_freeze_by_a_failed_run_names_the_rollback():
    events = [ev("start_recovery", "failed", 2, task_id="start_recovery", error="recovery ended before target"),
              ev("move_aside", "ok", 1, task_id="move_aside", moved_to="/data.pre-x")]
    v = assess("pg-primary", paused=True, frozen_by=owner("app_frozen"), lock=None, run_events=events,
               last_alert_at=None, now=NOW, max_freeze_s=60)
    assert v.status == ALERT
    assert "start_recovery: recovery ended before target" in v.message
    assert "dr_pitr_rollback" in v.next_step and "pitr_run_id=manual__inc-7" in v.next_step
    assert "/data.pre-x" in v.next_step and "never unfreezes" in v.next_step


def test_an_alert_repeats_once_per_max_freeze():
    kw = dict(paused=True, frozen_by=owner("app_frozen"), lock=None, run_events=[], now=NOW, max_freeze_s=60)
    assert assess("pg-primary", last_alert_at=(NOW - timedelta(seconds=30)).isoformat(), **kw).repeat
    assert not assess("pg-primary", last_alert_at=(NOW - timedelta(seconds=90)).isoformat(), **kw).repeat


def test_a_pause_nobody_recorded_is_an_alert_and_a_resume_outside_is_not():
    v = assess("pg-primary", paused=True, frozen_by=None, lock=None, run_events=[], last_alert_at=None, now=NOW,
               max_freeze_s=60)
    assert v.status == ALERT and "no barman-dr run froze it" in v.message
    v = assess("pg-primary", paused=False, frozen_by=owner("app_frozen", minutes_ago=90), lock=None, run_events=[],
               last_alert_at=None, now=NOW, max_freeze_s=60)
    assert v.status == OK and "resumed outside barman-dr" in v.message


def test_an_unobservable_freeze_is_judged_from_the_audit_trail():
    v = assess("pg-primary", paused=None, frozen_by=owner("app_frozen"), lock=None, run_events=[],
               last_alert_at=None, now=NOW, max_freeze_s=60)
    assert v.status == ALERT


def test_max_freeze_in_the_inventory(inventory):
    assert inventory.server("pg-primary").max_freeze_seconds > 0
    raw = yaml.safe_load(Path(inventory.path).read_text())
    raw["servers"]["pg-primary"]["max_freeze_seconds"] = "soon"
    with pytest.raises(InventoryError, match=r"servers.pg-primary.max_freeze_seconds: 'soon' is not a positive"):
        parse_inventory(raw, env={"LAB_DIR": "/lab", "LAB_NET": "127.0.10"})


# --------------------------------------------------------------------------------------- orphans

LISTING = """dir 51200 /lab/pg/pg-primary/data.staged-abc123
dir 32768 /lab/pg/pg-primary/data.staged-abc123-wal
dir 1024 /lab/pg/pg-primary/data.staged-def456
dir 2048 /lab/pg/pg-primary/salvage-777
dir 8 /lab/pg/pg-primary/data.staged-0used00000-run
pm 4242 /lab/pg/pg-primary/data.staged-abc123
pm 100 /lab/pg/pg-primary/data
"""


def test_orphans_are_attributed_to_their_run_and_the_lock_holder_is_in_use():
    dirs, pms = parse_listing(LISTING)
    assert pms == {"/lab/pg/pg-primary/data.staged-abc123": 4242, "/lab/pg/pg-primary/data": 100}
    recorded = recorded_paths([
        {"dag_id": "dr_pitr", "run_id": "crashed", "details": {"staging_directory": "/lab/pg/pg-primary/data.staged-abc123"}},
        {"dag_id": "dr_pitr", "run_id": "running", "details": {"staging_directory": "/lab/pg/pg-primary/data.staged-def456"}},
    ])
    found = {o.path.rsplit("/", 1)[1]: o for o in classify("pg-primary", dirs, pms, recorded, lock_run_id="running")}
    assert found["data.staged-abc123"].run_id == "crashed" and found["data.staged-abc123"].postmaster_pid == 4242
    assert found["data.staged-abc123-wal"].run_id == "crashed"  # the WAL directory belongs to its copy
    assert found["data.staged-def456"].in_use and not found["data.staged-abc123"].in_use
    assert found["salvage-777"].kind == "salvage" and found["salvage-777"].run_id is None
    assert "data.staged-0used00000-run" not in found  # the log of a staging copy renamed into place
    findings = orphan_findings(list(found.values()))
    assert [f.status for f in findings] == ["WARNING"] * 3
    text = " ".join(f.reason for f in findings)
    assert "pid 4242" in text and "dr_pitr run 'crashed'" in text and "no run in the audit trail" in text


def test_no_orphans_is_ok():
    assert [f.status for f in orphan_findings([])] == ["OK"]


# ---------------------------------------------------------------------------------- full staging


def test_out_of_space_is_recognised_in_the_tools_words():
    rsync = BarmanCommandError("barman-lab", ["barman", "restore"], 1, "rsync: [receiver] write failed on "
                               "\"/x/base/1/123\": No space left on device (28)")
    assert out_of_space(rsync)
    assert out_of_space(RuntimeError("PANIC:  could not write to file \"pg_wal/xlogtemp.1\": No space left on device"))
    assert not out_of_space(BarmanCommandError("barman-lab", ["barman"], 1, "connection refused"))


def test_the_space_check_is_a_staging_space_refusal():
    free = {"path": "/x", "available_bytes": 10 * 2**20, "size_bytes": 2**30, "mount_point": "/x"}
    with pytest.raises(StagingSpaceError, match="not enough free space"):
        check_staging_space("db1", free, 100 * 2**20, 1)


# ------------------------------------------------------------------------ the seed's gap, named early


def archive(newest: int, *, partial_newest: bool = False):
    """An ArchiveView stand-in: segments 0x2E..newest on timeline 7, the newest maybe a streaming `.partial`."""
    from types import SimpleNamespace

    files = {segno: SimpleNamespace(partial=partial_newest and segno == newest) for segno in range(0x2E, newest + 1)}
    return SimpleNamespace(timeline=7, newest_segno=newest, files=SimpleNamespace(files=files))


def test_a_switch_that_never_reached_barman_is_named_as_missing_wal():
    from barman_dr.operators.pitr.resolve import SwitchResult, archive_gap

    view = archive(0x30)
    stalled = SwitchResult(True, None, "000000070000000000000031", 828, "0/31000088",
                           error="The WAL file 000000070000000000000031 has not been received in 20 seconds")
    gap = archive_gap("pg-primary", view, stalled)
    assert gap.startswith("WAL missing") and "ends at 000000070000000000000030" in gap
    assert "never reached Barman (switch-wal --archive: The WAL file" in gap
    assert "barman receive-wal" in gap and "Nothing was touched" in gap
    ok = SwitchResult(True, "000000070000000000000031", "000000070000000000000031", 828, "0/31000088")
    assert archive_gap("pg-primary", archive(0x31), ok) is None
    assert archive_gap("pg-primary", view, SwitchResult(False)) is None  # server down: nothing to compare


# ------------------------------------------------------------------- a failed run names its step


def test_run_failures_name_the_failing_step_and_its_error_in_order():
    from barman_dr.operators.base import run_failures

    events = [  # newest first, as the audit trail returns them
        {"action": "failure_summary", "outcome": "failed", "task_id": "failure_summary", "details": {"error": "x"}},
        {"action": "notify", "outcome": "failed", "task_id": "validate_params", "details": {"error": "y"}},
        {"action": "task_failed", "outcome": "failed", "task_id": "validate_params", "details": {}},
        {"action": "validate", "outcome": "refused", "task_id": "validate_params",
         "details": {"error": "ValidationError: target_time: invalid value '2027-01-01': is in the future\nmore"}},
        {"action": "validate", "outcome": "started", "task_id": "validate_params", "details": {}},
    ]
    assert run_failures(events) == [
        {"task": "validate_params", "error": "target_time: invalid value '2027-01-01': is in the future"}]
    assert run_failures([]) == []


def test_a_pause_while_a_run_holds_the_lock_is_that_run_freezing_not_an_alert():
    v = assess("pg-primary", paused=True, frozen_by=None, lock=owner("lock"), run_events=[], last_alert_at=None,
               now=NOW, max_freeze_s=60)
    assert v.status == FROZEN and "freezing" in v.message


def test_an_unowned_pause_repeats_once_per_max_freeze_too():
    v = assess("pg-primary", paused=True, frozen_by=None, lock=None, run_events=[], now=NOW, max_freeze_s=60,
               last_alert_at=(NOW - timedelta(seconds=30)).isoformat())
    assert v.status == ALERT and v.repeat


def test_no_gap_when_barman_holds_the_segment_after_all():
    from barman_dr.operators.pitr.resolve import SwitchResult, archive_gap

    late = SwitchResult(True, None, "000000070000000000000031", 828, "0/31000088", error="not received in 20 seconds")
    assert archive_gap("pg-primary", archive(0x31), late) is None


def test_a_streaming_partial_is_not_the_segment_archived():
    """receive-wal still streams but nothing archives (barman cron stopped): the `.partial` is no proof."""
    from barman_dr.operators.pitr.resolve import SwitchResult, archive_gap

    late = SwitchResult(True, None, "000000070000000000000031", 828, "0/31000088", error="not received in 20 seconds")
    gap = archive_gap("pg-primary", archive(0x31, partial_newest=True), late)
    assert gap and gap.startswith("WAL missing") and "never reached Barman" in gap


def test_cli_backoff_is_bounded():
    from barman_dr.surfaces.api_client import backoff_delays
    from barman_dr.surfaces.cli import main

    assert backoff_delays(0) == []
    assert backoff_delays(20) == [1.0, 2.0, 4.0, 8.0, 5.0]
    assert sum(backoff_delays(120)) == pytest.approx(120)
    assert main(["--api-wait", "inf", "status", "--incident", "X"]) == 2
