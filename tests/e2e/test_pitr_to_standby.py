"""`dr_pitr` with `restore_to: pg-standby`, a whole run through the REST API (issue 17, part 1).

The seed's DELETE is undone onto the standby: the old primary is fenced (stopped, data
untouched), PgBouncer is re-pointed, and Barman follows the new primary (`config-update` of
its conninfo and streaming_conninfo from the inventory, streaming on the new timeline, a fresh
backup from it). The run must be green. Afterwards `labctl failback` puts the lab's topology
back (pg-primary primary again, with the recovered data) for the suites that follow.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import psycopg2
import pytest

from barman_dr.surfaces.api_client import incident_run_id
from include.lab import seed_scenario
from tests.pitr_support import barman_json, counts, pgbouncer_paused, primary_timeline

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

EXPECTED = {"orders_total": 10500, "orders_completed": 7465}


def standby_address(inventory) -> str:
    return inventory.db_host(inventory.server("pg-primary").standby("pg-standby").host).address


def test_restore_to_the_standby_is_green_and_barman_follows(api, inventory, lab_topology_restored):
    tli_before = primary_timeline()
    scenario = seed_scenario.play()
    incident = f"INC-STANDBY-{int(time.time())}"
    run_id = incident_run_id("dr_pitr", incident)
    conf = {"server": "pg-primary", "target_xid": str(scenario.delete_xid), "target_inclusive": False,
            "restore_to": "pg-standby", "incident_id": incident, "reason": "REST e2e: onto the standby",
            "expected": EXPECTED, "confirm": "PITR pg-primary"}
    api.trigger("dr_pitr", conf, run_id=run_id)
    final = api.wait("dr_pitr", run_id, timeout=900)
    states = {t["task_id"]: t["state"] for t in api.task_instances("dr_pitr", run_id)}
    assert final["state"] == "success", states
    assert states["rebase_barman"] == "success" and states["report"] == "success"

    # the app reads the recovered rows through PgBouncer, which now points at the standby, and can write
    assert not pgbouncer_paused()
    assert counts("LAB_APP_DSN") == EXPECTED
    assert counts("LAB_STANDBY_DSN") == EXPECTED
    with psycopg2.connect(os.environ["LAB_APP_DSN"]) as conn, conn.cursor() as cur:
        cur.execute("SELECT host(inet_server_addr())")
        assert cur.fetchone()[0] == standby_address(inventory)
        cur.execute("CREATE TABLE IF NOT EXISTS app_heartbeat (id bigserial PRIMARY KEY, at timestamptz DEFAULT now())")
        cur.execute("INSERT INTO app_heartbeat DEFAULT VALUES RETURNING id")
        assert cur.fetchone()[0] > 0
    conn.close()

    report = api.xcom("dr_pitr", run_id, "report")
    assert report["serving_instance"] == "pg-standby"
    assert report["stop"]["kind"] == "commit" and report["stop"]["xid"] == scenario.delete_xid
    assert report["new_timeline"] > tli_before
    rebase = api.xcom("dr_pitr", run_id, "rebase_barman")
    follows = rebase["barman_follows"]
    assert follows["host"] == standby_address(inventory) and follows["port"] == 5432
    assert set(follows["changed"]) == {"conninfo", "streaming_conninfo"}
    assert follows["previous"]["conninfo"].startswith(inventory.db_host("pg-primary").address + ":")

    # Barman streams from, and backed up, the new primary on its new timeline
    show = barman_json("show-server", "pg-primary")["pg-primary"]
    addr = standby_address(inventory)
    assert f"host={addr}" in show["conninfo"] and f"host={addr}" in show["streaming_conninfo"]
    backup = barman_json("show-backup", "pg-primary", rebase["new_backup_id"])["pg-primary"]
    assert int(backup["base_backup_information"]["timeline"]) == report["new_timeline"]
    assert rebase["new_backup_timeline"] == report["new_timeline"]
    with psycopg2.connect(os.environ["LAB_STANDBY_DSN"]) as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_is_in_recovery(), (SELECT count(*) FROM pg_stat_replication "
                    "WHERE application_name LIKE 'barman%%' AND state = 'streaming'), "
                    "(SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'barman' AND active)")
        in_recovery, barman_streams, slot_active = cur.fetchone()
    conn.close()
    assert in_recovery is False and barman_streams == 1 and slot_active == 1
    checks = barman_json("check", "pg-primary")["pg-primary"]
    failing = {k: v for k, v in checks.items() if v.get("status") != "OK" and k != "minimum_redundancy_requirements"}
    assert not failing, failing

    # the old primary is fenced: stopped, its data directory in place and untouched
    prim = inventory.server("pg-primary").primary
    assert Path(prim.data_directory, "PG_VERSION").exists()
    status = subprocess.run(["runuser", "-u", "postgres", "--", "/usr/lib/postgresql/15/bin/pg_ctl", "status", "-D",
                             prim.data_directory], capture_output=True, text=True, check=False)
    assert status.returncode == 3, status.stdout


def test_failback_left_the_lab_as_the_inventory_says(inventory):
    """After the fixture's failback: pg-primary serves the recovered data, the standby and Barman follow it."""
    assert counts() == EXPECTED and counts("LAB_APP_DSN") == EXPECTED
    with psycopg2.connect(os.environ["LAB_APP_DSN"]) as conn, conn.cursor() as cur:
        cur.execute("SELECT host(inet_server_addr()), pg_is_in_recovery()")
        assert cur.fetchone() == (inventory.db_host("pg-primary").address, False)
    conn.close()
    with psycopg2.connect(os.environ["LAB_STANDBY_DSN"]) as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_is_in_recovery(), status FROM pg_stat_wal_receiver")
        assert cur.fetchone() == (True, "streaming")
    conn.close()
    show = barman_json("show-server", "pg-primary")["pg-primary"]
    assert f"host={inventory.db_host('pg-primary').address}" in show["conninfo"]
    checks = barman_json("check", "pg-primary")["pg-primary"]
    failing = {k: v for k, v in checks.items() if v.get("status") != "OK" and k != "minimum_redundancy_requirements"}
    assert not failing, failing
