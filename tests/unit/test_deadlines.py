"""RTO deadline alerts: one Airflow DeadlineAlert per objective; the callback speaks only for its own servers."""

from __future__ import annotations

from types import SimpleNamespace

from barman_dr.surfaces import deadlines


def srv(objective, nonprod=True):
    return SimpleNamespace(rto_objective_seconds=objective, nonprod=object() if nonprod else None)


INVENTORY = SimpleNamespace(servers={"a": srv(900), "b": srv(20, nonprod=False), "c": srv(900)})


def test_one_alert_per_distinct_objective_from_the_queued_time():
    from airflow.sdk import DeadlineReference, SyncCallback

    alerts = deadlines.rto_deadlines("pitr", list(INVENTORY.servers.values()))
    assert [a.interval.total_seconds() for a in alerts] == [20, 900]
    assert all(a.reference == DeadlineReference.DAGRUN_QUEUED_AT for a in alerts)
    assert all(isinstance(a.callback, SyncCallback) for a in alerts)
    assert alerts[0].callback.kwargs == {"objective_s": 20, "kind": "pitr"}
    assert deadlines.objectives([]) == []


def test_the_alert_speaks_only_for_servers_with_its_objective():
    assert deadlines.servers_at("pitr", {"server": "b"}, 20, INVENTORY) == ["b"]
    assert deadlines.servers_at("pitr", {"server": "b"}, 900, INVENTORY) == []
    assert deadlines.servers_at("pitr", {}, 900, INVENTORY) == ["a"]  # the form's default: the first server
    assert deadlines.servers_at("drill", {}, 900, INVENTORY) == ["a", "c"]
    assert deadlines.servers_at("drill", {}, 20, INVENTORY) == []  # b has no nonprod: never drilled
    assert deadlines.servers_at("pitr", {"server": "b", "plan_only": True}, 20, INVENTORY) == []  # a preview


def test_a_finished_or_foreign_run_pages_nobody(monkeypatch):
    sent = []
    monkeypatch.setattr("barman_dr.surfaces.notifications.DrNotifier.deliver", lambda self, ctx, d, outcome: sent.append(d))
    monkeypatch.setattr("barman_dr.inventory.load_inventory", lambda *a: INVENTORY)
    deadlines.rto_missed(20, "pitr", {"dag_run": {"state": "success", "conf": {"server": "b"}}})
    deadlines.rto_missed(900, "pitr", {"dag_run": {"state": "running", "conf": {"server": "b"}}})
    assert sent == []
    deadlines.rto_missed(20, "pitr", {"dag_run": {"state": "running", "conf": {"server": "b"}, "dag_id": "dr_pitr",
                                                  "dag_run_id": "manual__x"}})
    [d] = sent
    assert "manual__x" in d["message"] and "RTO objective missed" in d["message"] and d["server"] == "b"
