"""The seed's recovery triggered like an incident tool does: through the real Airflow REST API.

The lab's api-server, scheduler, dag-processor and triggerer (started by `make lab-up`)
run the DAG; the run id is derived from the incident id, so a repeated trigger returns the
existing run instead of starting a second PITR.
"""

from __future__ import annotations

import time

import pytest

from barman_dr.surfaces.api_client import ApiError, incident_run_id
from include.lab import seed_scenario
from tests.pitr_support import counts, pgbouncer_paused, primary_timeline

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_the_api_rejects_a_naive_target_time(api):
    with pytest.raises(ApiError) as exc:
        api.trigger("dr_pitr", {"server": "pg-primary", "target_time": "2026-11-25T10:00:00"})
    assert exc.value.status == 400
    assert "target_time" in exc.value.body or "date-time" in exc.value.body


def test_seed_recovery_through_the_rest_api(api):
    tli_before = primary_timeline()
    writer = seed_scenario.AppWriter()
    writer.start()
    scenario = seed_scenario.play()
    incident = f"INC-REST-{int(time.time())}"
    run_id = incident_run_id("dr_pitr", incident)
    # the DELETE's own xid, exclusive (what dr_find_target recommends): resolved in the WAL, from the newest backup
    conf = {"server": "pg-primary", "target_xid": str(scenario.delete_xid), "target_inclusive": False,
            "incident_id": incident, "reason": "REST e2e: mass DELETE",
            "expected": {"orders_total": 10500, "orders_completed": 7465},
            # the unstaged path (restore inside the downtime); the seed integration test covers the staged one
            "staged_restore": False, "confirm": "PITR pg-primary"}
    run, created = api.trigger("dr_pitr", conf, run_id=run_id)
    assert created and run["dag_run_id"] == run_id
    again, created_again = api.trigger("dr_pitr", conf, run_id=run_id)
    assert not created_again and again["dag_run_id"] == run_id

    final = api.wait("dr_pitr", run_id, timeout=900)
    app = writer.stop()
    states = {t["task_id"]: t["state"] for t in api.task_instances("dr_pitr", run_id)}
    assert final["state"] == "success", states
    assert counts() == {"orders_total": 10500, "orders_completed": 7465}
    assert primary_timeline() > tli_before
    assert not pgbouncer_paused()
    assert app["commits"] > 0

    report = api.xcom("dr_pitr", run_id, "report")
    assert report["incident_id"] == incident
    assert report["stop"]["kind"] == "commit" and report["stop"]["xid"] == scenario.delete_xid
    assert report["stop"]["when"] == "before"
    # every backup on the path ended before the DELETE: the newest is used, not the oldest
    assert report["backup_id"] == api.xcom("dr_pitr", run_id, "resolve_target")["newest_backup"]
    assert report["counts"] == {"orders_total": 10500, "orders_completed": 7465}
    assert report["rto_s"] > 0
    assert report["staged_restore"] is False and report["outside_downtime_s"] == {}
    # Barman's slot reserved on the recovered server right after the proof (before the rebuilds' checkpoints
    # could recycle the new timeline's first WAL), and Barman archived that timeline from the fork on
    verify = api.xcom("dr_pitr", run_id, "verify_target")
    assert verify["barman_wal"]["reserved"] is True, verify["barman_wal"]
    rebase = api.xcom("dr_pitr", run_id, "rebase_barman")
    assert not rebase["backfill"].get("lost") and not (rebase["fork"] or {}).get("gap"), rebase
    assert states["stage_restore"] == "success"  # a no-op when staged_restore is off
    note = api.get_run("dr_pitr", run_id).get("note") or ""
    assert "DONE" in note and "RTO" in note


def test_dr_page_shows_the_recovery(api):
    """The DR page (plugin FastAPI app in the API server): behind Airflow's auth, shows the PITR run."""
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(f"{api.base_url}/barman-dr/", timeout=30)
    assert exc.value.code == 401
    data = api._call("GET", "/barman-dr/api/summary")
    assert [s["server"] for s in data["servers"]] == ["pg-primary"] or "pg-primary" in [s["server"] for s in
                                                                                         data["servers"]]
    rest_runs = [r for r in data["pitr_runs"] if (r["incident_id"] or "").startswith("INC-REST-")]
    assert rest_runs and rest_runs[0]["outcome"] == "success" and rest_runs[0]["rto_s"] > 0
    req = urllib.request.Request(f"{api.base_url}/barman-dr/?incident_id={rest_runs[0]['incident_id']}",
                                 headers={"Authorization": f"Bearer {api.token()}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        page = resp.read().decode()
    assert "PITR runs" in page and rest_runs[0]["run_id"] in page and "barman_restore" in page
