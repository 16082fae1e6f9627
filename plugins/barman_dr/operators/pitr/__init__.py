"""dr_pitr's steps, one operator each, one module per phase of the seed's runbook.

* `assess`: validate_params, preflight, wal_coverage (and `resolve`: resolve_target, the
  target located in the WAL before anything moves);
* `plan`: the plan, what it discards and what it costs; the gate (typed confirmation);
* `stage`: stage_restore (restore and replay before the freeze);
* `execute`: freeze_app, stop_postgres, move_aside, barman_restore, start_recovery;
* `verify`: verify_target (the exact stop point), validate_data;
* `post_incident`: unfreeze_app, discarded, rebuild_standby, rebase_barman;
* `report`: report, failure_summary, release_lock;
* `delayed`: the delayed standbys paused while the run lasts (resume_delayed_replay).

Nothing destructive runs before `plan` has passed, and `plan` passes only when the request
carries the typed confirmation.
"""

from barman_dr.forensics.walswitch import nudging
from barman_dr.operators.pitr.assess import PitrPreflightOperator, ValidatePitrRequestOperator, WalCoverageOperator
from barman_dr.operators.pitr.delayed import ResumeDelayedReplayOperator
from barman_dr.operators.pitr.errors import VerificationError
from barman_dr.operators.pitr.execute import (
    BarmanRestoreOperator,
    FreezeAppOperator,
    MoveAsideOperator,
    StartRecoveryOperator,
    StopPostgresOperator,
    freeze_app,
)
from barman_dr.operators.pitr.plan import PlanGateOperator
from barman_dr.operators.pitr.post_incident import (
    DiscardedOperator,
    RebaseBarmanOperator,
    RebuildStandbyOperator,
    StandbysToRebuildOperator,
    UnfreezeAppOperator,
    app_connectivity,
)
from barman_dr.operators.pitr.report import (
    PitrFailureSummaryOperator,
    PitrReportOperator,
    ReleaseLockOperator,
    staging_leftover,
)
from barman_dr.operators.pitr.resolve import ResolveTargetOperator, TargetResolver, resolution_for
from barman_dr.operators.pitr.stage import SEGMENT_BYTES, StageRestoreOperator, check_staging_space
from barman_dr.operators.pitr.verify import (
    RECOVERY_SETTINGS,
    ValidateDataOperator,
    VerifyTargetOperator,
    clear_recovery_settings,
)

__all__ = [
    "RECOVERY_SETTINGS",
    "SEGMENT_BYTES",
    "BarmanRestoreOperator",
    "DiscardedOperator",
    "FreezeAppOperator",
    "MoveAsideOperator",
    "PitrFailureSummaryOperator",
    "PitrPreflightOperator",
    "PitrReportOperator",
    "PlanGateOperator",
    "RebaseBarmanOperator",
    "RebuildStandbyOperator",
    "ReleaseLockOperator",
    "ResolveTargetOperator",
    "ResumeDelayedReplayOperator",
    "StageRestoreOperator",
    "StandbysToRebuildOperator",
    "StartRecoveryOperator",
    "StopPostgresOperator",
    "TargetResolver",
    "UnfreezeAppOperator",
    "ValidateDataOperator",
    "ValidatePitrRequestOperator",
    "VerificationError",
    "VerifyTargetOperator",
    "WalCoverageOperator",
    "app_connectivity",
    "check_staging_space",
    "clear_recovery_settings",
    "freeze_app",
    "nudging",
    "resolution_for",
    "staging_leftover",
]
