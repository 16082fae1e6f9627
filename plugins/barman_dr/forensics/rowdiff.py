"""Row-level diff between a restored copy of a table and the live table, by primary key.

Used by dr_surgical_recovery. The restored table's rows are streamed (`COPY ... TO STDOUT`
on the restored instance -> `COPY ... FROM STDIN` on live) into a temporary staging table
on the live primary, inside the caller's transaction; everything after that is set-based
SQL on live (anti-joins on the primary key). Identifiers are always composed with
`psycopg.sql` (never string-formatted); values are bound parameters.

Categories, per primary key:

* **missing**: in the restored copy, not in live: what the incident deleted. Re-inserted
  on apply (`INSERT ... SELECT ... ON CONFLICT DO NOTHING`).
* **changed**: in both, with different content (compared column by column as text). Either
  the incident's UPDATE, a legitimate write since, or a key re-used since (deleted by the
  incident, inserted again by the application): we cannot tell which, so they are
  **conflicts**: reported (count + sample), overwritten with the restored version only when
  the run asks for it (`restore_changed`), never silently.
* **live_only**: only in live: new writes since the target. Never touched.
* **skipped** (apply only): a missing row the INSERT could not place because another unique
  constraint already holds its value in live (a re-used natural key): a conflict, reported.

Pure functions of two psycopg 3 connections; the caller owns the transactions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from psycopg import sql

from barman_dr.exceptions import BarmanDrError, PreflightError

SAMPLE = 10


class TableRefusedError(PreflightError):
    """A table surgical recovery cannot compare (missing, no primary key, different shape)."""


class DiffVerificationError(BarmanDrError):
    """The applied diff does not add up: the transaction is rolled back."""


@dataclass(frozen=True)
class TableSpec:
    """What the catalog says about one table: its insertable columns and its primary key."""

    schema: str
    name: str
    columns: tuple[tuple[str, str], ...]
    primary_key: tuple[str, ...]
    identity_always: bool = False

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def ident(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)

    @property
    def column_names(self) -> list[str]:
        return [c for c, _ in self.columns]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: a table's columns and primary key from the catalog, as one JSON value (NULL when there is no such relation);
#: `{schema}` and `{name}` are string literals: bound parameters with psycopg, quoted literals through psql
SPEC_SQL = (
    "SELECT json_build_object('relkind', c.relkind::text, "
    "'columns', (SELECT coalesce(json_agg(json_build_array(attname, format_type(atttypid, atttypmod), attidentity) "
    "ORDER BY attnum), '[]') FROM pg_attribute WHERE attrelid = c.oid AND attnum > 0 AND NOT attisdropped "
    "AND attgenerated = ''), "
    "'pk', (SELECT coalesce(json_agg(a.attname ORDER BY array_position(i.indkey::int2[], a.attnum)), '[]') "
    "FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey) "
    "WHERE i.indrelid = c.oid AND i.indisprimary)) "
    "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = {schema} AND c.relname = {name}")


def spec_sql_for_psql(qualified: str) -> str:
    """SPEC_SQL with the names as quoted literals (for psql, which takes no bound parameters)."""
    schema, _, name = qualified.partition(".")
    lit = lambda v: "'" + v.replace("'", "''") + "'"  # noqa: E731
    return SPEC_SQL.format(schema=lit(schema), name=lit(name))


def spec_from_catalog(qualified: str, data: dict[str, Any] | None, where: str) -> TableSpec:
    """A TableSpec from SPEC_SQL's answer, or the refusal that says why the table cannot be compared."""
    schema, _, name = qualified.partition(".")
    if not data:
        raise TableRefusedError(f"table {qualified} does not exist on {where} (names are case-sensitive): "
                                "correct `tables`")
    relkind = data.get("relkind")
    if relkind not in ("r", "p"):
        raise TableRefusedError(f"{qualified} on {where} is not a table (relkind {relkind!r}): name a table")
    cols = [tuple(c) for c in data.get("columns") or []]
    pk = tuple(data.get("pk") or ())
    if not pk:
        raise TableRefusedError(f"{qualified} on {where} has no primary key: rows are matched by primary key, so "
                                "tables without one are refused. Add a primary key, or repair this table by hand "
                                "from the copy")
    return TableSpec(schema=schema, name=name, columns=tuple((c, t) for c, t, _ in cols), primary_key=pk,
                     identity_always=any(i == "a" for _, _, i in cols))


def read_table_spec(conn: Any, qualified: str, where: str) -> TableSpec:
    """Columns and primary key of `schema.table` from the catalog of `conn` (`where` names it in errors)."""
    schema, _, name = qualified.partition(".")
    with conn.cursor() as cur:
        cur.execute(SPEC_SQL.format(schema="%s", name="%s"), (schema, name))
        row = cur.fetchone()
    return spec_from_catalog(qualified, row[0] if row else None, where)


def check_same_shape(live: TableSpec, restored: TableSpec) -> None:
    """The restored table must have the live table's columns (names and types) and primary key."""
    problems = []
    if live.primary_key != restored.primary_key:
        problems.append(f"primary key {list(restored.primary_key)} in the restored copy, {list(live.primary_key)} in live")
    if live.columns != restored.columns:
        only_live = [f"{c} {t}" for c, t in live.columns if (c, t) not in restored.columns]
        only_restored = [f"{c} {t}" for c, t in restored.columns if (c, t) not in live.columns]
        problems.append(f"columns differ (only in live: {only_live or 'none'}; only in the restored copy: "
                        f"{only_restored or 'none'}; or in another order)")
    if problems:
        raise TableRefusedError(f"{live.qualified}: the restored copy does not have the live table's shape: "
                                + "; ".join(problems) + ". Surgical recovery copies whole rows and refuses to guess "
                                "a column mapping: repair this table by hand")


# ------------------------------------------------------------------------------ SQL pieces


def _cols(names: list[str] | tuple[str, ...], alias: str | None = None) -> sql.Composable:
    if alias is None:
        return sql.SQL(", ").join(sql.Identifier(c) for c in names)
    return sql.SQL(", ").join(sql.Identifier(alias, c) for c in names)


def _key_match(spec: TableSpec, a: str = "l", b: str = "r") -> sql.Composable:
    return sql.SQL(" AND ").join(sql.SQL("{} = {}").format(sql.Identifier(a, c), sql.Identifier(b, c))
                                 for c in spec.primary_key)


def _row_differs(spec: TableSpec, a: str = "l", b: str = "r") -> sql.Composable:
    """Content comparison as text, column by column (works for types without `=`, e.g. json)."""
    def row(alias: str) -> sql.Composable:
        return sql.SQL("ROW({})").format(sql.SQL(", ").join(
            sql.SQL("{}::text").format(sql.Identifier(alias, c)) for c in spec.column_names))
    return sql.SQL("{} IS DISTINCT FROM {}").format(row(a), row(b))


def _key_json(spec: TableSpec, alias: str) -> sql.Composable:
    """A key as JSON: the value itself for a one-column key, an array for a composite key."""
    if len(spec.primary_key) == 1:
        return sql.SQL("to_jsonb({})").format(sql.Identifier(alias, spec.primary_key[0]))
    return sql.SQL("jsonb_build_array({})").format(_cols(spec.primary_key, alias))


def _order(spec: TableSpec, alias: str, desc: bool = False) -> sql.Composable:
    d = sql.SQL(" DESC" if desc else "")
    return sql.SQL(", ").join(sql.SQL("{}{}").format(sql.Identifier(alias, c), d) for c in spec.primary_key)


def missing_where(spec: TableSpec) -> sql.Composable:
    """`r` (the staged restored row) has no row with its key in live."""
    return sql.SQL("NOT EXISTS (SELECT 1 FROM {live} l WHERE {match})").format(live=spec.ident, match=_key_match(spec))


def counts_query(spec: TableSpec, stage: sql.Identifier) -> sql.Composed:
    return sql.SQL(
        "SELECT (SELECT count(*) FROM {stage}), (SELECT count(*) FROM {live}), "
        "(SELECT count(*) FROM {stage} r WHERE {missing}), "
        "(SELECT count(*) FROM {stage} r JOIN {live} l ON {match} WHERE {differs}), "
        "(SELECT count(*) FROM {live} l WHERE NOT EXISTS (SELECT 1 FROM {stage} r WHERE {match}))"
    ).format(stage=stage, live=spec.ident, missing=missing_where(spec), match=_key_match(spec),
             differs=_row_differs(spec))


def insert_missing_query(spec: TableSpec, stage: sql.Identifier, missing: sql.Identifier,
                         inserted: sql.Identifier) -> sql.Composed:
    """Insert the staged rows whose keys are in `missing`; record the keys actually inserted in `inserted`.

    `ON CONFLICT DO NOTHING` has no conflict target on purpose: a row that collides with live
    on *any* unique constraint (a re-used natural key) is skipped, never overwritten.
    """
    return sql.SQL(
        "WITH i AS (INSERT INTO {live} ({cols}){overriding} SELECT {rcols} FROM {stage} r JOIN {missing} m USING ({pk}) "
        "ORDER BY {order} ON CONFLICT DO NOTHING RETURNING {pk}) INSERT INTO {inserted} ({pk}) SELECT {pk} FROM i"
    ).format(live=spec.ident, cols=_cols(spec.column_names), rcols=_cols(spec.column_names, "r"), stage=stage,
             missing=missing, pk=_cols(spec.primary_key), order=_order(spec, "r"), inserted=inserted,
             overriding=sql.SQL(" OVERRIDING SYSTEM VALUE" if spec.identity_always else ""))


def update_changed_query(spec: TableSpec, stage: sql.Identifier) -> sql.Composed | None:
    """Put the restored content back into live rows that differ (non-key columns); returns the keys."""
    rest = [c for c in spec.column_names if c not in spec.primary_key]
    if not rest:
        return None  # a key-only table has no "changed" rows
    return sql.SQL(
        "UPDATE {live} l SET ({cols}) = ROW({rcols}) FROM {stage} r WHERE {match} AND {differs} RETURNING {key}"
    ).format(live=spec.ident, cols=_cols(rest), rcols=_cols(rest, "r"), stage=stage, match=_key_match(spec),
             differs=_row_differs(spec), key=_key_json(spec, "l"))


# ------------------------------------------------------------------------------ staging and diff


def stage_table_from(dst: Any, spec: TableSpec, stage: sql.Identifier, feed: Callable[[Callable[[Any], None]], None]) -> int:
    """Stream source rows into a temporary table on dst, in dst's open transaction; `feed(write)` writes COPY data.

    The staging table has exactly the live columns' types (`CREATE TABLE AS ... WITH NO DATA`),
    is dropped at commit, gets the primary key (proves the source keys are unique, and
    indexes the anti-joins) and fresh statistics.
    """
    cols = _cols(spec.column_names)
    with dst.cursor() as cur:
        cur.execute(sql.SQL("CREATE TEMP TABLE {stage} ON COMMIT DROP AS SELECT {cols} FROM {live} WITH NO DATA")
                    .format(stage=stage, cols=cols, live=spec.ident))
        with cur.copy(sql.SQL("COPY {stage} ({cols}) FROM STDIN").format(stage=stage, cols=cols)) as inp:
            feed(inp.write)
        cur.execute(sql.SQL("ALTER TABLE {stage} ADD PRIMARY KEY ({pk})").format(stage=stage,
                                                                                   pk=_cols(spec.primary_key)))
        cur.execute(sql.SQL("ANALYZE {stage}").format(stage=stage))
        cur.execute(sql.SQL("SELECT count(*) FROM {stage}").format(stage=stage))
        return int(cur.fetchone()[0])


def stage_table(src: Any, dst: Any, spec: TableSpec, stage: sql.Identifier, source: sql.Identifier | None = None) -> int:
    """Stream the restored rows (src, a psycopg connection) into a temporary table on live (dst).

    `source` is the table on src (default: the same name as on live).
    """
    cols = _cols(spec.column_names)

    def feed(write: Callable[[Any], None]) -> None:
        with src.cursor() as scur, scur.copy(sql.SQL("COPY (SELECT {cols} FROM {table}) TO STDOUT")
                                             .format(cols=cols, table=source or spec.ident)) as out:
            for block in out:
                write(block)

    return stage_table_from(dst, spec, stage, feed)


def _first_last(cur: Any, spec: TableSpec, from_where: sql.Composable, alias: str) -> dict[str, Any] | None:
    out = {}
    for label, desc in (("first", False), ("last", True)):
        cur.execute(sql.SQL("SELECT {key} FROM {fw} ORDER BY {order} LIMIT 1").format(
            key=_key_json(spec, alias), fw=from_where, order=_order(spec, alias, desc)))
        row = cur.fetchone()
        if row is None:
            return None
        out[label] = row[0]
    return out


def diff_counts(dst: Any, spec: TableSpec, stage: sql.Identifier) -> dict[str, int]:
    with dst.cursor() as cur:
        cur.execute(counts_query(spec, stage))
        restored, live, missing, changed, live_only = (int(v) for v in cur.fetchone())
    return {"restored_rows": restored, "live_rows": live, "missing": missing, "changed": changed,
            "live_only": live_only, "unchanged": restored - missing - changed}


def diff_table(dst: Any, spec: TableSpec, stage: sql.Identifier, sample: int = SAMPLE) -> dict[str, Any]:
    """Counts per category, the missing keys' range, and samples (<= `sample` rows) of missing and changed rows."""
    counts = diff_counts(dst, spec, stage)
    missing_from = sql.SQL("{stage} r WHERE {missing}").format(stage=stage, missing=missing_where(spec))
    changed_from = sql.SQL("{stage} r JOIN {live} l ON {match} WHERE {differs}").format(
        stage=stage, live=spec.ident, match=_key_match(spec), differs=_row_differs(spec))
    with dst.cursor() as cur:
        cur.execute(sql.SQL("SELECT to_jsonb(r) FROM {fw} ORDER BY {order} LIMIT %s").format(
            fw=missing_from, order=_order(spec, "r")), (sample,))
        missing_sample = [r[0] for r in cur.fetchall()]
        cur.execute(sql.SQL("SELECT jsonb_build_object('key', {key}, 'restored', to_jsonb(r), 'live', to_jsonb(l)) "
                            "FROM {fw} ORDER BY {order} LIMIT %s").format(
            key=_key_json(spec, "r"), fw=changed_from, order=_order(spec, "r")), (sample,))
        changed_sample = [r[0] for r in cur.fetchall()]
        missing_range = _first_last(cur, spec, missing_from, "r") if counts["missing"] else None
    return {"table": spec.qualified, "primary_key": list(spec.primary_key), "columns": spec.column_names,
            **counts, "missing_keys": missing_range, "missing_sample": missing_sample,
            "changed_sample": changed_sample}


def apply_table(dst: Any, spec: TableSpec, stage: sql.Identifier, n: int, *, restore_changed: bool,
                sample: int = SAMPLE) -> dict[str, Any]:
    """Re-insert the missing rows (and, when asked, restore changed rows) in dst's open transaction; verify.

    Meant for a REPEATABLE READ transaction: the counts before and after then come from one
    snapshot plus our own writes, so they must add up exactly; a concurrent write that
    collides with ours makes PostgreSQL raise a serialization failure and the caller retries
    the whole transaction. Raises DiffVerificationError (the caller rolls back) when they
    do not add up.
    """
    before = diff_counts(dst, spec, stage)
    missing, inserted = sql.Identifier(f"barman_dr_missing_{n}"), sql.Identifier(f"barman_dr_inserted_{n}")
    with dst.cursor() as cur:
        cur.execute(sql.SQL("CREATE TEMP TABLE {m} ON COMMIT DROP AS SELECT {pk} FROM {stage} r WHERE {where}").format(
            m=missing, pk=_cols(spec.primary_key, "r"), stage=stage, where=missing_where(spec)))
        cur.execute(sql.SQL("CREATE TEMP TABLE {i} ON COMMIT DROP AS SELECT * FROM {m} WITH NO DATA").format(
            i=inserted, m=missing))
        cur.execute(insert_missing_query(spec, stage, missing, inserted))
        cur.execute(sql.SQL("SELECT count(*) FROM {i}").format(i=inserted))
        n_inserted = int(cur.fetchone()[0])
        inserted_range = _first_last(cur, spec, sql.SQL("{i} k").format(i=inserted), "k") if n_inserted else None
        cur.execute(sql.SQL("SELECT {key} FROM {i} k ORDER BY {order} LIMIT %s").format(
            key=_key_json(spec, "k"), i=inserted, order=_order(spec, "k")), (sample,))
        inserted_sample = [r[0] for r in cur.fetchall()]
        skipped_from = sql.SQL("{m} k WHERE NOT EXISTS (SELECT 1 FROM {i} j WHERE {match})").format(
            m=missing, i=inserted, match=_key_match(spec, "j", "k"))
        cur.execute(sql.SQL("SELECT count(*) FROM {fw}").format(fw=skipped_from))
        n_skipped = int(cur.fetchone()[0])
        cur.execute(sql.SQL("SELECT {key} FROM {fw} ORDER BY {order} LIMIT %s").format(
            key=_key_json(spec, "k"), fw=skipped_from, order=_order(spec, "k")), (sample,))
        skipped_sample = [r[0] for r in cur.fetchall()]
        n_updated, updated_sample = 0, []
        update = update_changed_query(spec, stage) if restore_changed else None
        if update is not None:
            cur.execute(update)
            keys = [r[0] for r in cur.fetchall()]
            n_updated, updated_sample = len(keys), keys[:sample]
    after = diff_counts(dst, spec, stage)
    problems = []
    if after["live_rows"] != before["live_rows"] + n_inserted:
        problems.append(f"live rows {before['live_rows']} + inserted {n_inserted} != {after['live_rows']}")
    if after["missing"] != n_skipped:
        problems.append(f"{after['missing']} keys still missing, {n_skipped} skipped on conflict")
    if n_inserted + n_skipped != before["missing"]:
        problems.append(f"inserted {n_inserted} + skipped {n_skipped} != missing {before['missing']}")
    want_changed = 0 if update is not None else before["changed"]
    if after["changed"] != want_changed:
        problems.append(f"{after['changed']} rows differ after the apply, expected {want_changed}")
    if problems:
        raise DiffVerificationError(f"{spec.qualified}: the applied diff does not add up, rolled back: "
                                    + "; ".join(problems))
    return {"table": spec.qualified, "primary_key": list(spec.primary_key), "before": before, "after": after,
            "inserted": n_inserted, "inserted_keys": inserted_range, "inserted_sample": inserted_sample,
            "skipped_on_conflict": n_skipped, "skipped_sample": skipped_sample,
            "updated": n_updated, "updated_sample": updated_sample,
            "changed_left_alone": 0 if update is not None else before["changed"]}


def stage_name(n: int) -> sql.Identifier:
    return sql.Identifier(f"barman_dr_stage_{n}")
