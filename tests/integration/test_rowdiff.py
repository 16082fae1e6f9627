"""The surgical diff SQL (barman_dr.forensics.rowdiff) on real PostgreSQL, without a restore.

A scratch database on the lab primary holds two schemas: `restored` (the copy as of the
target) and `live` (the same table after an incident and new writes). Both connections of
rowdiff point at that one database; the table names differ only by schema, which is what
the DAG does across two instances. Conflicts covered: a key re-used since the incident
(changed), a re-used natural key on another unique constraint (skipped on INSERT), and a
concurrent insert of a missing key while the apply transaction runs (serialization
failure: the caller retries).
"""

from __future__ import annotations

import os
import uuid

import pytest

pytestmark = pytest.mark.integration

psycopg = pytest.importorskip("psycopg")


def _dsn(dbname: str) -> str:
    parts = dict(p.split("=", 1) for p in os.environ["LAB_PRIMARY_DSN"].split())
    parts["dbname"] = dbname
    return " ".join(f"{k}={v}" for k, v in parts.items())


@pytest.fixture(scope="module")
def scratch():
    name = f"surgical_scratch_{uuid.uuid4().hex[:8]}"
    admin = psycopg.connect(_dsn("postgres"), autocommit=True)
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _dsn(name)
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


DDL = """
DROP SCHEMA IF EXISTS restored CASCADE; DROP SCHEMA IF EXISTS live CASCADE;
CREATE SCHEMA restored; CREATE SCHEMA live;
CREATE TABLE restored.orders (id bigint PRIMARY KEY, ref text UNIQUE, status text NOT NULL, doc json);
INSERT INTO restored.orders SELECT i, 'R' || i, CASE WHEN i % 2 = 0 THEN 'completed' ELSE 'pending' END,
       json_build_object('i', i) FROM generate_series(1, 100) i;
CREATE TABLE live.orders (LIKE restored.orders INCLUDING ALL);
INSERT INTO live.orders SELECT * FROM restored.orders;
-- the incident: every completed order deleted, one pending order updated
DELETE FROM live.orders WHERE status = 'completed';
UPDATE live.orders SET status = 'cancelled' WHERE id = 1;
-- after it: key 2 re-used by a new order, natural key R4 re-used by a new id, 3 new orders
INSERT INTO live.orders VALUES (2, 'NEW-2', 'pending', '{"new": true}'), (1004, 'R4', 'pending', NULL),
       (1001, 'N1', 'pending', NULL), (1002, 'N2', 'completed', NULL), (1003, 'N3', 'pending', NULL);
CREATE TABLE restored.nopk (a int); CREATE TABLE live.nopk (a int);
CREATE TABLE restored.shape (id int PRIMARY KEY, a int); CREATE TABLE live.shape (id int PRIMARY KEY, a bigint);
CREATE TABLE restored.pairs (a int, b text, v int, PRIMARY KEY (a, b));
INSERT INTO restored.pairs SELECT i % 5, 'k' || i, i FROM generate_series(1, 20) i;
CREATE TABLE live.pairs (LIKE restored.pairs INCLUDING ALL);
INSERT INTO live.pairs SELECT * FROM restored.pairs WHERE v > 12;
"""


def spec_pair(conn, table: str):
    """The `live.<table>` spec, and the same spec pointing at `restored.<table>` (what nonprod would hold)."""
    from barman_dr.forensics.rowdiff import check_same_shape, read_table_spec

    live = read_table_spec(conn, f"live.{table}", "live")
    restored = read_table_spec(conn, f"restored.{table}", "restored")
    check_same_shape(live, restored)
    return live, restored


@pytest.fixture
def db(scratch):
    conn = psycopg.connect(scratch, autocommit=True)
    conn.execute(DDL)
    conn.autocommit = False
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ  # what the apply transaction uses
    yield conn
    conn.rollback()
    conn.close()


def stage(src, dst, live, restored, n=0):
    """Stream restored.<t> (src) into a staging table on dst, as the DAG streams nonprod's table to live."""
    from barman_dr.forensics.rowdiff import stage_name, stage_table

    return stage_table(src, dst, live, stage_name(n), source=restored.ident)


def test_plan_counts_categories_and_samples(db, scratch):
    from barman_dr.forensics.rowdiff import diff_table, stage_name

    live, restored = spec_pair(db, "orders")
    assert live.primary_key == ("id",)
    with psycopg.connect(scratch) as src:
        assert stage(src, db, live, restored) == 100
    d = diff_table(db, live, stage_name(0), sample=10)
    # 50 completed deleted; key 2 came back as another row (changed); R4's id 4 is missing but its ref is re-used
    assert d["missing"] == 49 and d["changed"] == 2 and d["live_only"] == 4 and d["unchanged"] == 49
    assert d["restored_rows"] == 100 and d["live_rows"] == 55
    assert d["missing_keys"] == {"first": 4, "last": 100}
    assert len(d["missing_sample"]) == 10 and d["missing_sample"][0]["id"] == 4
    changed = {c["key"]: c for c in d["changed_sample"]}
    assert set(changed) == {1, 2}
    assert changed[2]["live"]["ref"] == "NEW-2" and changed[2]["restored"]["ref"] == "R2"
    db.rollback()


def test_apply_inserts_missing_reports_conflicts_and_adds_up(db, scratch):
    from barman_dr.forensics.rowdiff import apply_table, stage_name

    live, restored = spec_pair(db, "orders")
    with psycopg.connect(scratch) as src:
        stage(src, db, live, restored)
    r = apply_table(db, live, stage_name(0), 0, restore_changed=False)
    # id 4 collides with the re-used natural key R4 (unique on ref): skipped, never overwritten
    assert r["inserted"] == 48 and r["skipped_on_conflict"] == 1 and r["skipped_sample"] == [4]
    assert r["changed_left_alone"] == 2 and r["updated"] == 0
    assert r["after"]["live_rows"] == 55 + 48 and r["after"]["missing"] == 1
    assert r["inserted_keys"] == {"first": 6, "last": 100}
    db.commit()
    with db.cursor() as cur:
        cur.execute("SELECT ref, status FROM live.orders WHERE id IN (1, 2, 4, 1004) ORDER BY id")
        assert cur.fetchall() == [("R1", "cancelled"), ("NEW-2", "pending"), ("R4", "pending")]
        cur.execute("SELECT count(*) FROM live.orders WHERE status = 'completed'")
        assert cur.fetchone()[0] == 48 + 1  # the 48 re-inserted + the new completed order N2
    db.rollback()


def test_restore_changed_overwrites_only_when_asked(db, scratch):
    from barman_dr.forensics.rowdiff import apply_table, stage_name

    live, restored = spec_pair(db, "orders")
    with psycopg.connect(scratch) as src:
        stage(src, db, live, restored)
    r = apply_table(db, live, stage_name(0), 0, restore_changed=True)
    assert r["updated"] == 2 and sorted(r["updated_sample"]) == [1, 2] and r["after"]["changed"] == 0
    db.rollback()


def test_composite_key(db, scratch):
    from barman_dr.forensics.rowdiff import apply_table, diff_table, stage_name

    live, restored = spec_pair(db, "pairs")
    assert live.primary_key == ("a", "b")
    with psycopg.connect(scratch) as src:
        stage(src, db, live, restored)
    d = diff_table(db, live, stage_name(0))
    assert d["missing"] == 12 and d["changed"] == 0
    assert isinstance(d["missing_keys"]["first"], list)
    r = apply_table(db, live, stage_name(0), 0, restore_changed=False)
    assert r["inserted"] == 12 and r["after"]["live_rows"] == 20
    db.rollback()


def test_tables_without_primary_key_or_with_another_shape_are_refused(db):
    from barman_dr.forensics.rowdiff import TableRefusedError

    with pytest.raises(TableRefusedError, match="no primary key"):
        spec_pair(db, "nopk")
    with pytest.raises(TableRefusedError, match="columns differ"):
        spec_pair(db, "shape")
    with pytest.raises(TableRefusedError, match="does not exist"):
        spec_pair(db, "no_such_table")
    db.rollback()


def test_concurrent_insert_of_a_missing_key_rolls_the_apply_back(db, scratch):
    """The app inserts key 6 after our snapshot: REPEATABLE READ makes the INSERT fail, nothing is applied."""
    from barman_dr.forensics.rowdiff import apply_table, stage_name

    live, restored = spec_pair(db, "orders")
    with psycopg.connect(scratch) as src:
        stage(src, db, live, restored)
    with psycopg.connect(scratch, autocommit=True) as app:
        app.execute("INSERT INTO live.orders VALUES (6, 'APP-6', 'pending', NULL)")
    with pytest.raises(psycopg.errors.SerializationFailure):
        apply_table(db, live, stage_name(0), 0, restore_changed=False)
    db.rollback()
    with psycopg.connect(scratch) as check:
        assert check.execute("SELECT count(*) FROM live.orders").fetchone()[0] == 56
