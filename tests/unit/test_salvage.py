"""dr_salvage's pure parts: the request, and the facts it takes from a dr_pitr run's audit trail."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from barman_dr.exceptions import PreflightError, ValidationError
from barman_dr.hooks.remote import sh_argv
from barman_dr.operators.salvage import _REMOVE_COPY, pitr_facts
from barman_dr.params.salvage_request import SalvageRequest, validate_salvage_conf


def test_plan_only_by_default(inventory):
    req = validate_salvage_conf({"server": "pg-primary"}, inventory)
    assert not req.confirmed and req.pitr_run_id is None and req.tables == ()
    assert SalvageRequest.from_dict(req.to_dict()) == req


def test_confirmed_with_a_run_and_tables(inventory):
    req = validate_salvage_conf({"server": "pg-primary", "pitr_run_id": "manual__2026-12-04T05:26:53.594262+00:00",
                                 "tables": ["public.critical_orders"], "confirm": "SALVAGE pg-primary"}, inventory)
    assert req.confirmed and req.tables == ("public.critical_orders",)


@pytest.mark.parametrize(("conf", "field"), [
    ({"confirm": "SALVAGE pg-primary2"}, "confirm"),
    ({"confirm": "PITR pg-primary"}, "confirm"),
    ({"pitr_run_id": "x; rm -rf /"}, "pitr_run_id"),
    ({"pitr_run_id": "../../etc"}, "pitr_run_id"),
    ({"tables": ["critical_orders; drop"]}, "tables"),
    ({"tables": "public.critical_orders"}, "tables"),
    ({"target_time": "2026-12-04T05:00:00Z"}, "target_time"),
])
def test_refusals_name_the_field(inventory, conf, field):
    with pytest.raises(ValidationError) as ei:
        validate_salvage_conf({"server": "pg-primary", **conf}, inventory)
    assert ei.value.field == field and ei.value.fix


class FakeAudit:
    def __init__(self, events):
        self._events = events

    def events(self, *, server=None, run_id=None, dag_id=None, action=None, limit=500, incident_id=None):
        out = [e for e in self._events if (server is None or e.get("server") == server)
               and (run_id is None or e["run_id"] == run_id) and (action is None or e["action"] == action)]
        return list(reversed(out))[:limit]


def pitr_run(run_id: str, *, discarded=None, report=True):
    ev = [
        {"run_id": run_id, "server": "pg-primary", "action": "validate", "outcome": "ok",
         "details": {"restore_to": "in_place"}},
        {"run_id": run_id, "server": "pg-primary", "action": "resolve_target", "outcome": "ok",
         "details": {"stop": {"lsn": "0/B333808", "described": "before commit of transaction 759"}}},
        {"run_id": run_id, "server": "pg-primary", "action": "move_aside", "outcome": "ok",
         "details": {"moved_to": "/data.pre-x", "host": "pg-primary"}},
        {"run_id": run_id, "server": "pg-primary", "action": "discarded", "outcome": "ok",
         "details": discarded if discarded is not None else
         {"xid_ranges": [[759, 770]], "tables": {"public.critical_orders": {"inserted": 200, "deleted": 7465}}}},
    ]
    if report:
        ev.append({"run_id": run_id, "server": "pg-primary", "action": "report", "outcome": "ok", "details": {}})
    return ev


def test_facts_of_the_last_successful_pitr():
    audit = FakeAudit([*pitr_run("old"), *pitr_run("failed", report=False), *pitr_run("new")])
    f = pitr_facts(audit, "pg-primary", None)
    assert f["pitr_run_id"] == "new" and f["moved_to"] == "/data.pre-x" and f["xid_ranges"] == [[759, 770]]


def test_a_failed_pitr_is_not_salvaged():
    with pytest.raises(ValidationError, match="has not finished successfully") as ei:
        pitr_facts(FakeAudit(pitr_run("failed", report=False)), "pg-primary", "failed")
    assert ei.value.field == "pitr_run_id"


def test_no_pitr_at_all():
    with pytest.raises(ValidationError, match="nothing to salvage"):
        pitr_facts(FakeAudit([]), "pg-primary", None)


def test_a_pitr_without_its_discarded_list_is_refused():
    with pytest.raises(PreflightError, match="no usable list of discarded"):
        pitr_facts(FakeAudit(pitr_run("r", discarded={"error": "SshConnectError: x"})), "pg-primary", "r")


def test_the_copy_remover_only_removes_a_salvage_copy(tmp_path: Path):
    parent = tmp_path / "pg"
    (parent / "salvage-abc").mkdir(parents=True)
    (parent / "salvage-abc-run").mkdir()
    (parent / "data").mkdir()

    def remove(copy: str) -> subprocess.CompletedProcess:
        argv = sh_argv(_REMOVE_COPY, str(parent), copy, "/bin/false")
        return subprocess.run(["sh", "-c", shlex.join(argv)], capture_output=True, text=True, check=False)

    assert remove(str(parent / "data")).returncode == 3
    assert remove(str(parent / "salvage-abc-run")).returncode == 3
    assert remove(str(tmp_path / "elsewhere" / "salvage-abc")).returncode == 3
    assert remove(str(parent / "salvage-abc" / ".." / "data")).returncode == 3
    r = remove(str(parent / "salvage-abc"))
    assert r.returncode == 0, r.stderr
    assert (parent / "data").exists() and not (parent / "salvage-abc").exists() and not (parent / "salvage-abc-run").exists()


def test_subtract_xids():
    from barman_dr.forensics.target_resolution import subtract_xids

    assert subtract_xids([[759, 770]], [759]) == [[760, 770]]
    assert subtract_xids([[759, 770]], [765, 770]) == [[759, 764], [766, 769]]
    assert subtract_xids([[5, 5], [9, 12]], [5, 11]) == [[9, 10], [12, 12]]
    assert subtract_xids([[1, 3]], []) == [[1, 3]]


def test_parents_before_children():
    from barman_dr.operators.salvage import parents_first

    edges = [["public.order_lines", "public.orders"], ["public.orders", "public.customers"],
             ["public.audit", "public.audit"]]
    assert parents_first(["public.order_lines", "public.orders", "public.customers"], edges) == [
        "public.customers", "public.orders", "public.order_lines"]
    # a table outside the chosen set does not hold anything back
    assert parents_first(["public.order_lines", "public.zeta"], edges) == ["public.order_lines", "public.zeta"]


def test_exclude_xids(inventory):
    req = validate_salvage_conf({"server": "pg-primary", "exclude_xids": [761, "4294968057"]}, inventory)
    assert req.exclude_xids == (761, 761)  # an epoch-qualified xid keeps its 32 bits, as row xmins do
    with pytest.raises(ValidationError) as ei:
        validate_salvage_conf({"server": "pg-primary", "exclude_xids": ["12; drop"]}, inventory)
    assert ei.value.field == "exclude_xids"


def test_the_incident_is_never_put_back_when_the_pitr_targeted_its_xid():
    run = pitr_run("r", discarded={"xid_ranges": [[759, 770]], "stop_transaction": {"xid": 759, "subxacts": [760]},
                                   "tables": {}})
    for e in run:
        if e["action"] == "resolve_target":
            e["details"] = {**e["details"], "requested": {"kind": "xid", "value": "759", "inclusive": False}}
    f = pitr_facts(FakeAudit(run), "pg-primary", "r")
    assert f["incident_xids"] == [759, 760]
    # a time target: the first transaction after it is not known to be the incident, nothing is left out
    f2 = pitr_facts(FakeAudit(pitr_run("t", discarded={"xid_ranges": [[759, 770]],
                                                       "stop_transaction": {"xid": 759, "subxacts": []}})),
                    "pg-primary", "t")
    assert f2["incident_xids"] == []
