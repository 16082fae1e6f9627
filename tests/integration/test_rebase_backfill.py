"""rebase_barman backfills the new timeline's first segments when streaming skipped them (issue 18, found by its
crash tests): a segment of the current timeline is taken out of Barman's archive, as a pg_receivewal restart at the
server's current position leaves it, and the backfill copies it back from the primary's pg_wal (real Barman, real SSH).
"""

from __future__ import annotations

import os
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from barman_dr.inventory import load_inventory
from barman_dr.models import WalSegment
from barman_dr.operators.pitr import RebaseBarmanOperator
from barman_dr.params.pitr_request import validate_pitr_conf
from tests.fault_support import barman
from tests.pitr_support import one

pytestmark = pytest.mark.integration

LAB = Path(os.environ.get("LAB_DIR", "."))


class Ti:
    def __init__(self, upstream: dict[str, Any]) -> None:
        self.dag_id, self.run_id, self.task_id, self.try_number = "dr_integration_test", "backfill", "rebase_barman", 1
        self.upstream = upstream

    def xcom_pull(self, task_ids: str, key: str = "return_value") -> Any:
        return self.upstream.get(task_ids)


def test_a_segment_missing_at_the_start_of_the_timeline_is_copied_back():
    tli = int(one("LAB_PRIMARY_DSN", "SELECT timeline_id FROM pg_control_checkpoint()"))
    wals = LAB / "barman" / "home" / "pg-primary" / "wals"
    history = (wals / f"{tli:08X}.history").read_text().split("\n") if tli > 1 else []
    switch_lsn = [line.split("\t")[1] for line in history if line.strip()][-1] if history else None
    if not switch_lsn:
        pytest.skip("the primary is still on timeline 1: no PITR has run on this lab yet")
    # make a complete segment of this timeline the primary still has, then take it out of the archive
    for _ in range(2):
        one("LAB_PRIMARY_DSN", "SELECT pg_switch_wal() FROM (SELECT pg_current_xact_id()) x")
    barman("switch-wal", "--force", "--archive", "--archive-timeout", "60", "pg-primary")
    current = one("LAB_PRIMARY_DSN", "SELECT pg_walfile_name(pg_current_wal_lsn())")
    in_pg_wal = set(one("LAB_PRIMARY_DSN", "SELECT string_agg(name, ' ') FROM pg_ls_waldir()").split())
    archived = sorted(p.name for p in (wals / current[:16]).glob(f"{tli:08X}*") if len(p.name) == 24)
    victim = next(n for n in reversed(archived) if n < current and n in in_pg_wal)
    closed = archived[-1]
    stash = LAB / "fault-stash" / "backfill"
    stash.mkdir(parents=True, exist_ok=True)
    (wals / victim[:16] / victim).rename(stash / victim)
    barman("rebuild-xlogdb", "pg-primary")
    try:
        req = validate_pitr_conf({"server": "pg-primary", "target_immediate": True}, load_inventory(),
                                  now=datetime.now(UTC))
        op = RebaseBarmanOperator(task_id="rebase_barman", request=req.to_dict())
        ti = Ti({"verify_target": {"switch_lsn": switch_lsn, "new_timeline": tli}})
        out = op.backfill_new_timeline({"ti": ti, "dag": SimpleNamespace(dag_id="dr_integration_test"),
                                        "run_id": "backfill"}, closed)
        assert out["checked"] and victim in out["missing"] and victim in out["backfilled"] and not out["lost"], out
        assert (wals / victim[:16] / victim).stat().st_size == 16 * 1024 * 1024
        assert victim in (wals / "pg-primary-xlog.db").read_text()  # in Barman's catalogue again
        # the copy is the primary's own segment: same bytes as the one taken out
        assert subprocess.run(["cmp", str(stash / victim), str(wals / victim[:16] / victim)],
                              check=False).returncode == 0
        # nothing half-written was ever where `barman cron` archives from: nothing rejected, no copy left over
        server_dir = wals.parent
        assert not any(server_dir.joinpath("errors").glob(f"{victim}*")), list(server_dir.joinpath("errors").iterdir())
        assert not list(server_dir.glob(".backfill-*"))
    finally:
        if not (wals / victim[:16] / victim).exists():
            (stash / victim).rename(wals / victim[:16] / victim)
            subprocess.run(["chown", "barman:barman", str(wals / victim[:16] / victim)], check=False)
            barman("rebuild-xlogdb", "pg-primary")
        (stash / victim).unlink(missing_ok=True)
    assert WalSegment.parse(victim).timeline == tli
