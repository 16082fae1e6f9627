"""dr_surgical_recovery without the lab: the request validator, the inventory's surgical_tables, the diff SQL's shape."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from psycopg import sql

from barman_dr.exceptions import InventoryError, ValidationError
from barman_dr.forensics.rowdiff import (
    TableRefusedError,
    TableSpec,
    check_same_shape,
    counts_query,
    insert_missing_query,
    update_changed_query,
)
from barman_dr.inventory import parse_inventory
from barman_dr.models import RecoveryTarget
from barman_dr.params.surgical_request import MAX_TABLES, SurgicalRequest, parse_tables, validate_surgical_conf

LAB_YAML = Path(__file__).resolve().parents[2] / "include" / "inventory" / "lab.yaml"
NOW = datetime(2026, 11, 25, 14, 0, 0, tzinfo=UTC)
ENV = {"LAB_DIR": "/var/tmp/lab-x", "LAB_NET": "127.0.77"}


@pytest.fixture(scope="module")
def raw():
    return yaml.safe_load(LAB_YAML.read_text())


@pytest.fixture(scope="module")
def inv(raw):
    return parse_inventory(raw, str(LAB_YAML), ENV)


def ok(inv, **conf):
    return validate_surgical_conf({"server": "pg-primary", "target_time": "2026-11-25T11:45:00Z", **conf}, inv, now=NOW)


def rejected(inv, field: str, **conf) -> ValidationError:
    with pytest.raises(ValidationError) as ei:
        validate_surgical_conf({"server": "pg-primary", "target_time": "2026-11-25T11:45:00Z", **conf}, inv, now=NOW)
    assert ei.value.field == field, str(ei.value)
    assert ei.value.fix
    return ei.value


def test_defaults_come_from_the_inventory(inv):
    r = ok(inv)
    assert isinstance(r, SurgicalRequest)
    assert r.tables == ("public.critical_orders",) and r.tables_source == "inventory"
    assert r.restore_to == "pg-nonprod" and not r.in_place
    assert r.confirmed is False and r.restore_changed is False
    assert r.target == RecoveryTarget("time", "2026-11-25T11:45:00+00:00", True)


def test_confirmed_with_tables_and_xid_target(inv):
    r = validate_surgical_conf({"server": "pg-primary", "target_xid": "7312", "target_inclusive": False,
                                "tables": ["public.critical_orders", "shop.Order_Lines", "public.critical_orders"],
                                "restore_changed": True, "confirm": "SURGICAL pg-primary", "incident_id": "INC-9"},
                               inv, now=NOW)
    assert r.confirmed and r.confirm_text() == "SURGICAL pg-primary"
    assert r.tables == ("public.critical_orders", "shop.Order_Lines") and r.tables_source == "param"
    assert r.target == RecoveryTarget("xid", "7312", False) and r.restore_changed is True


def test_round_trip_through_xcom(inv):
    r = ok(inv, tables=["public.a", "public.b"], restore_changed=True)
    again = SurgicalRequest.from_dict(json.loads(json.dumps(r.to_dict())))
    assert again == r and isinstance(again.tables, tuple)


@pytest.mark.parametrize("value", ["critical_orders", "public.critical_orders; DROP TABLE x", 'public."x"',
                                   "a.b.c", "public.", ".t", "public.t\n", "1abc.t", 42, "pub lic.t"])
def test_bad_table_names(inv, value):
    rejected(inv, "tables", tables=[value])


def test_tables_must_be_a_list_and_bounded(inv):
    rejected(inv, "tables", tables="public.critical_orders")
    rejected(inv, "tables", tables=[f"public.t{i}" for i in range(MAX_TABLES + 1)])
    assert parse_tables(None) == () and parse_tables([]) == ()


def test_confirm_must_be_exact(inv):
    e = rejected(inv, "confirm", confirm="PITR pg-primary")
    assert "SURGICAL pg-primary" in str(e)
    rejected(inv, "confirm", confirm="surgical pg-primary")


def test_other_fields(inv):
    rejected(inv, "restore_changed", restore_changed="yes")
    rejected(inv, "expected", expected={"orders_total": 1})  # a dr_pitr field: unknown here
    rejected(inv, "target", target_time=None)
    rejected(inv, "target_time", target_time="2026-11-25T11:45:00")  # naive: never guessed
    rejected(inv, "backup_id", backup_id="latest; rm")
    rejected(inv, "jobs", jobs=0)


def test_server_without_nonprod_is_refused(inv):
    e = rejected(inv, "server", server="pg-primary2")
    assert "nonprod" in str(e)


def test_no_tables_anywhere_is_refused(raw):
    doc = json.loads(json.dumps(raw))
    del doc["servers"]["pg-primary"]["surgical_tables"]
    inv = parse_inventory(doc, "x", ENV)
    e = rejected(inv, "tables")
    assert "surgical_tables" in str(e)


def test_inventory_surgical_tables_validated(raw):
    doc = json.loads(json.dumps(raw))
    doc["servers"]["pg-primary"]["surgical_tables"] = ["public.ok", "no_schema"]
    with pytest.raises(InventoryError, match="surgical_tables"):
        parse_inventory(doc, "x", ENV)


# ----------------------------------------------------------------------------- diff SQL (no DB)

ORDERS = TableSpec("public", "critical_orders", (("order_id", "bigint"), ("status", "text"), ("doc", "json")),
                   ("order_id",))
PAIRS = TableSpec("app", "Line Items", (("a", "integer"), ("b", "text"), ("v", "integer")), ("a", "b"), True)


def text(q) -> str:
    return q.as_string(None)


def test_identifiers_are_quoted_never_formatted():
    q = text(insert_missing_query(PAIRS, sql.Identifier("s"), sql.Identifier("m"), sql.Identifier("i")))
    assert '"app"."Line Items"' in q and "OVERRIDING SYSTEM VALUE" in q
    assert "ON CONFLICT DO NOTHING" in q and "ON CONFLICT (" not in q  # any unique constraint: skip, never overwrite
    assert 'USING ("a", "b")' in q


def test_changed_rows_compare_as_text_and_update_only_non_key_columns():
    q = text(counts_query(ORDERS, sql.Identifier("s")))
    assert 'ROW("l"."order_id"::text, "l"."status"::text, "l"."doc"::text) IS DISTINCT FROM' in q
    u = text(update_changed_query(ORDERS, sql.Identifier("s")))
    assert 'SET ("status", "doc") = ROW("r"."status", "r"."doc")' in u and '"l"."order_id" = "r"."order_id"' in u
    assert update_changed_query(TableSpec("p", "k", (("id", "int"),), ("id",)), sql.Identifier("s")) is None


def test_shape_mismatch_is_refused():
    other = TableSpec("public", "critical_orders", (("order_id", "bigint"), ("status", "character varying(10)"),
                                                    ("doc", "json")), ("order_id",))
    with pytest.raises(TableRefusedError, match="columns differ"):
        check_same_shape(ORDERS, other)
    check_same_shape(ORDERS, ORDERS)
