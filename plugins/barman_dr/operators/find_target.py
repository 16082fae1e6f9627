"""dr_find_target's steps: validate the request, then decode the WAL Barman holds and rank the candidates.

Read-only for the data: the only writes are the ones dr_pitr's WAL coverage step also
makes (one empty transaction on the primary and `barman switch-wal --force --archive`, so
the segment holding a DELETE committed seconds ago is archived). No server lock is taken:
nothing here conflicts with a running PITR.

pg_waldump runs on the barman host, over SSH, on the WAL Barman holds (the matching
PostgreSQL version: Barman's own `path_prefix`); its output streams back line by line
and is aggregated on the worker as it arrives (`waldump.TxnAggregator`). Only the ranked,
bounded candidate list reaches XCom, the audit trail and the run note.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from functools import cached_property
from typing import Any

from barman_dr.exceptions import BarmanCommandError, BarmanDrError, PreflightError, RemoteCommandError
from barman_dr.forensics.find_target import (
    DATABASES_SQL,
    Catalog,
    DecodeRun,
    WalSelectionError,
    build_candidates,
    catalog_inputs,
    catalog_sql,
    note_text,
    parse_catalog_result,
    select_wal,
)
from barman_dr.forensics.recovery_proof import parse_history_file
from barman_dr.forensics.waldump import CommittedTxn, TxnAggregator
from barman_dr.forensics.walswitch import nudging
from barman_dr.hooks.waldecode import DECODE_SCRIPT, END_OF_WAL_RE, WalDecodeHook, WaldumpError  # noqa: F401
from barman_dr.models import WalSegment, is_wal_segment_name
from barman_dr.operators.base import DrBaseOperator
from barman_dr.params.find_target_request import FindTargetRequest, validate_find_target_conf
from barman_dr.surfaces.run_note import set_run_note


class FindTargetBaseOperator(DrBaseOperator):
    """A dr_find_target step: its request is a `FindTargetRequest`, not a PITR request."""

    @cached_property
    def find_req(self) -> FindTargetRequest:
        if not isinstance(self.request, dict):
            from barman_dr.exceptions import ValidationError

            raise ValidationError("request", self.request, "the validated request (XCom of validate_params) is missing")
        return FindTargetRequest.from_dict(self.request)

    @property
    def server_name(self) -> str:
        return self.find_req.server

    def audit_target(self) -> str | None:
        try:
            return self.find_req.describe()
        except Exception:  # noqa: BLE001 - the request may be what failed
            return None


class ValidateFindTargetOperator(FindTargetBaseOperator):
    """Step 1: the params, validated and typed, before anything runs anywhere; the audit trail must be writable."""
    runs_on_site = False  # bookkeeping: the `default` queue

    action = "find_target_validate"
    request_task_id = None

    def run(self, context: Any) -> dict[str, Any]:
        conf = dict(context["params"])
        conf.update(dict(getattr(context.get("dag_run"), "conf", None) or {}))
        req = validate_find_target_conf(conf, self.inventory)
        self.request = req.to_dict()
        self.__dict__.pop("find_req", None)
        self.require_workers(req.server, context)
        return req.to_dict()

    def next_action(self, context: Any, exc: BaseException) -> str | None:
        return "Nothing was read. Correct the field named above and trigger again."


class FindCandidatesOperator(FindTargetBaseOperator):
    """Step 2: decode the window's WAL on the barman host and rank the destructive transactions.

    Retry-safe: it only reads (plus the WAL switch), and a retry decodes again from scratch.
    """

    action = "find_target"
    template_fields: Sequence[str] = ("request", "limit")

    def __init__(self, *, limit: int = 20, clock_margin_s: float = 300, chunk_segments: int = 256,
                 decode_inactivity_s: float = 600, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.limit = limit
        self.clock_margin_s = clock_margin_s
        self.chunk_segments = chunk_segments
        self.decode_inactivity_s = decode_inactivity_s

    # ------------------------------------------------------------------ steps
    @cached_property
    def decoder(self) -> WalDecodeHook:
        return WalDecodeHook(barman=self.barman, decode_inactivity_s=self.decode_inactivity_s)

    def _waldump(self, info: dict[str, Any], warnings: list[str]) -> str:
        return self.decoder.waldump(info, self.find_req.server, warnings)

    def _switch(self, warnings: list[str]) -> tuple[bool, str | None, str | None]:
        """Close and archive the current segment (as dr_pitr's WAL coverage does). (primary up, closed WAL, current WAL)."""
        srv = self.srv
        db = self.db(srv.primary.host)
        up = db.status(srv.primary.data_directory) == "running" and db.is_ready(srv.primary)
        if not up:
            warnings.append(f"{srv.primary.name} is down: decoding what Barman has, the streamed .partial included")
            return False, None, None
        db.psql(srv.primary, "SELECT pg_current_xact_id()", database=srv.database)
        current = db.psql(srv.primary, "SELECT pg_walfile_name(pg_current_wal_lsn())")
        try:
            with nudging(lambda: db.psql(srv.primary, "SELECT pg_current_xact_id()", database=srv.database)):
                closed = self.barman.switch_wal(srv.name, archive_timeout=srv.switch_wal_timeout_seconds)
        except BarmanCommandError as exc:
            warnings.append(f"switch-wal --archive failed ({str(exc).splitlines()[-1][:200]}): the newest WAL is "
                            "read from the streaming directory")
            closed = None
        return True, closed, current

    def _decode(self, runs: Sequence[DecodeRun], waldump: str, agg: TxnAggregator) -> list[dict[str, Any]]:
        return self.decoder.decode(runs, waldump, agg.feed_line, mode="find")

    def _catalog(self, txns: Sequence[CommittedTxn], up: bool) -> Catalog:
        """Name the WAL's relfilenodes and OIDs through the primary's live catalogue (one query per database)."""
        srv = self.srv
        cat = Catalog()
        if not up:
            cat.error = "the primary is down"
            return cat
        db = self.db(srv.primary.host)
        import json

        try:
            cat.databases = {int(k): v for k, v in json.loads(db.psql(srv.primary, DATABASES_SQL,
                                                                      database=srv.database)).items()}
            for dboid, (filenodes, oids) in sorted(catalog_inputs(txns).items()):
                name = cat.databases.get(dboid)
                if name is None:
                    continue  # the database is gone (or does not accept connections)
                out = db.psql(srv.primary, catalog_sql(filenodes, oids, self.find_req.table), database=name,
                              timeout=120)
                parse_catalog_result(cat, dboid, out)
            if self.find_req.table and srv.database not in {cat.databases.get(d) for d in catalog_inputs(txns)}:
                # no candidate in the server's own database: still learn whether the named table exists there
                parse_catalog_result(cat, 0, db.psql(srv.primary, catalog_sql((), (), self.find_req.table),
                                                     database=srv.database))
            cat.available = True
        except (RemoteCommandError, ValueError) as exc:
            cat.error = f"catalogue query failed: {str(exc).splitlines()[0][:200]}"
        return cat

    def run(self, context: Any) -> dict[str, Any]:
        req, srv = self.find_req, self.srv
        warnings: list[str] = []
        info = self.barman.show_server(srv.name)
        wals_dir, stream_dir = info.get("wals_directory"), info.get("streaming_wals_directory")
        if not wals_dir:
            raise PreflightError("barman show-server gives no wals_directory")
        waldump = self._waldump(info, warnings)
        up, closed, current = self._switch(warnings)
        catalog = self.barman.wal_catalog(srv.name)
        streaming = self.barman.host.run(["ls", "-1", stream_dir], check=False).stdout.split() if stream_dir else []
        names = [e.name for e in catalog if is_wal_segment_name(e.name)] + [s[:24] for s in streaming
                                                                             if is_wal_segment_name(s[:24])]
        if not names:
            raise PreflightError(f"Barman holds no WAL for {srv.name}")
        timeline = WalSegment.parse(closed or current or max(names, key=lambda n: WalSegment.parse(n).segno)).timeline
        history = self.barman.timeline_history(srv.name, timeline) if timeline > 1 else None
        if timeline > 1 and history is None:
            warnings.append(f"no history file for timeline {timeline}: only its own segments are decoded")
        switches = [(e.parent_timeline, e.switch_lsn) for e in parse_history_file(history or "")]
        try:
            sel = select_wal(catalog, streaming, wals_directory=wals_dir, streaming_directory=stream_dir,
                             timeline=timeline, switches=switches, start=req.start, end=req.end,
                             margin_s=self.clock_margin_s, chunk=self.chunk_segments)
        except WalSelectionError as exc:
            raise PreflightError(str(exc)) from exc
        if sel.gaps:
            warnings.append(f"{len(sel.gaps)} WAL segment(s) missing from Barman's archive in the window (e.g. "
                            f"{', '.join(sel.gaps[:3])}): transactions there cannot be seen")

        def keep(t: CommittedTxn) -> bool:
            whole = bool(t.dropped or t.truncated_oids or t.smgr_truncated)
            return req.start <= t.commit_time <= req.end and (whole or t.rows_deleted + t.rows_updated >= req.min_rows)

        agg = TxnAggregator(keep)
        runs = self._decode(sel.runs, waldump, agg)
        if agg.pruned:
            warnings.append(f"{agg.pruned} smaller transactions were not kept (too many in the window): narrow the "
                            "window or name a table")
        cat = self._catalog([*agg.committed, *agg.rewrites], up)
        if not cat.available:
            warnings.append(f"relations are not named ({cat.error}): the table filter is not applied")
        elif req.table and not cat.table_found:
            warnings.append(f"table {req.table} does not exist in the live catalogue: DROPs are listed (it may be one)")
        backups = []
        try:
            for b in sorted((b for b in self.barman.list_backups(srv.name) if b.is_done),
                            key=lambda b: b.backup_id, reverse=True)[:10]:
                backups.append(self.barman.show_backup(srv.name, b.backup_id))
        except BarmanDrError as exc:
            warnings.append(f"backups not listed ({exc}): the PITR confs use backup_id auto")
        candidates, matched = build_candidates(
            agg.committed, cat, server=srv.name, start=req.start, end=req.end, table=req.table,
            min_rows=req.min_rows, limit=int(self.limit), backups=backups, timeline=timeline,
            incident_id=req.incident_id, rewrites=agg.rewrites)
        result = {
            "server": srv.name, "window": {"start": req.window_start, "end": req.window_end}, "table": req.table,
            "min_rows": req.min_rows, "timeline": timeline, "closed_wal": closed, "primary_running": up,
            "wal": {**sel.to_dict(), "decoded": runs}, "decode": agg.stats(), "catalogue": cat.available,
            "matched": matched, "candidates": candidates, "warnings": warnings,
            "decoded_at": datetime.now(UTC).isoformat(),
        }
        set_run_note(context["dag"].dag_id, context["run_id"], note_text(srv.name, result))
        return result

    def on_kill(self) -> None:
        # closing the session ends the remote pipeline (pg_waldump gets SIGPIPE); its temp dir is removed by its trap
        if "barman" in self.__dict__:
            self.barman.close()

    def next_action(self, context: Any, exc: BaseException) -> str | None:
        return ("Nothing was changed. Check that Barman holds the window's WAL (`barman show-server`, `barman check`) "
                "and that pg_waldump runs on the barman host, then clear this task.")
