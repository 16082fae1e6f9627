"""Surgical recovery's default tables: what the dr_find_target candidate with that xid touched."""

from __future__ import annotations

from barman_dr.operators.surgical import tables_found_for_xid


class FakeAudit:
    def __init__(self, events):
        self._events = events

    def events(self, **kw):
        assert kw["action"] == "find_target" and kw["server"] == "pg-primary"
        return self._events


def rel(name, op="DELETE", resolved=True):
    return {"relation": name, "operation": op, "resolved": resolved}


EVENTS = [
    {"outcome": "started", "details": {}},
    {"outcome": "ok", "details": {"candidates": [
        {"xid": 1234, "relations": [rel("public.critical_orders"), rel("public.order_lines", "UPDATE"),
                                    rel("oid 99 (dropped: no longer in the catalogue)", "DROP", False),
                                    rel("public.audit_log", "TRUNCATE")]},
        {"xid": 77, "relations": [rel("public.other")]}]}},
    {"outcome": "ok", "details": {"candidates": [{"xid": 1234, "relations": [rel("public.older_run")]}]}},
]


def test_the_newest_run_names_the_deleted_and_updated_tables():
    assert tables_found_for_xid(FakeAudit(EVENTS), "pg-primary", "1234") == ["public.critical_orders",
                                                                            "public.order_lines"]


def test_unknown_xid_or_bad_input_gives_nothing():
    assert tables_found_for_xid(FakeAudit(EVENTS), "pg-primary", "5") == []
    assert tables_found_for_xid(FakeAudit(EVENTS), "pg-primary", "12; DROP TABLE x") == []
    assert tables_found_for_xid(FakeAudit(EVENTS), None, "1234") == []
