"""WalDecodeHook: pg_waldump on the barman host, over the WAL Barman holds, streamed back line by line.

Shared by dr_find_target and the target resolution of every recovery. The barman host has
the WAL and Barman's own PostgreSQL binaries (`path_prefix`), version-checked against the
server's major. Each decode run is one SSH exec of `DECODE_SCRIPT`: the run's segments are
linked (or decompressed) into a private directory, pg_waldump reads them there with
`TZ=UTC`, and a filter chosen by `mode` drops or folds what the caller does not need
before the network:

* `find`: dr_find_target's records (Heap, Transaction, Storage, Standby), row inserts, row
  locks and snapshots dropped;
* `locate`: commit/abort records, restore points and checkpoints only (Transaction and
  XLOG resource managers: fast, ~1.5 GB of WAL per second here);
* `xid`: the commit/abort records of one transaction (its xid is the mode's argument);
* `discard`: everything a PITR would throw away, with each run of row records of one
  transaction on one relation folded into one `AGG` line (a bulk load after the target
  is a handful of lines, not millions);
* `one`: the single record at or after an LSN (the mode's argument), unfiltered.

pg_waldump's exit code is kept (a pipeline would lose it) and returned. Lines stream to
the caller's `on_line`: memory holds what the caller aggregates, never the output.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from barman_dr.exceptions import BarmanDrError, PreflightError
from barman_dr.forensics.recovery_proof import parse_history_file
from barman_dr.forensics.wal_selection import DecodeRun, PathFiles, WalSelectionError, path_files
from barman_dr.hooks.barman import BarmanHook
from barman_dr.hooks.remote import sh_argv
from barman_dr.models import is_wal_segment_name

# Fold consecutive row records (Heap/Heap2 INSERT, MULTI_INSERT, DELETE, UPDATE, HOT_UPDATE) of one
# transaction on one relation into `AGG tx op flags rel rows first_lsn last_lsn`; never across a
# segment boundary (runs overlap by one segment and the consumer de-duplicates by LSN, which only
# works when the same segment folds the same way in both runs). Other Heap/Heap2 records (pruning,
# freezing, row locks) and the noise of the other resource managers are dropped.
COLLAPSE_AWK = r"""
function flush() { if (key != "") { print "AGG " key " " n " " first " " last; key = "" } }
$1 == "rmgr:" && ($2 == "Heap" || $2 == "Heap2") {
  i = index($0, " desc: "); d = substr($0, i + 7); split(d, w, " "); op = w[1]; sub(/\+INIT$/, "", op)
  if (op != "INSERT" && op != "MULTI_INSERT" && op != "DELETE" && op != "UPDATE" && op != "HOT_UPDATE") {
    if (op == "TRUNCATE") { flush(); print }
    next
  }
  if (!match($0, /tx: +[0-9]+/)) next
  tx = substr($0, RSTART + 4, RLENGTH - 4); gsub(/ /, "", tx)
  if (tx == "0" || !match($0, /lsn: [0-9A-F]+\/[0-9A-F]+/)) next
  lsn = substr($0, RSTART + 5, RLENGTH - 5)
  if (!match(d, /blkref #0: rel [0-9]+\/[0-9]+\/[0-9]+ blk/)) next
  rel = substr(d, RSTART + 15, RLENGTH - 19)
  flags = "-"
  if (op == "DELETE" && match(d, /flags 0x[0-9A-Fa-f]+/)) flags = substr(d, RSTART + 6, RLENGTH - 6)
  rows = (op == "MULTI_INSERT") ? w[2] + 0 : 1
  split(lsn, parts, "/"); seg = parts[1] "/" substr(parts[2], 1, length(parts[2]) - 6)
  k = tx " " op " " flags " " rel
  if (k != key || seg != kseg) { flush(); key = k; kseg = seg; n = 0; first = lsn }
  n += rows; last = lsn
  next
}
$1 == "rmgr:" && $2 == "Standby" && index($0, " desc: LOCK ") == 0 && index($0, " desc: RUNNING_XACTS ") == 0 { next }
$1 == "rmgr:" && $2 == "Transaction" && $0 !~ / desc: (COMMIT|ABORT|PREPARE)/ { next }
$1 == "rmgr:" { flush(); print; next }
{ flush(); print }
END { flush() }
"""

# Commit and abort records, restore points (a name may span lines: continuation lines are kept)
# and checkpoints; nothing else.
LOCATE_AWK = r"""
$1 != "rmgr:" { print; next }
/ desc: (COMMIT|ABORT|RESTORE_POINT|CHECKPOINT_|END_OF_RECOVERY)/ { print }
"""

# The commit/abort of one transaction: its own records, a prepared transaction's COMMIT/ABORT PREPARED,
# or a top-level COMMIT/ABORT that lists it among its subtransactions (then it is not a target itself).
XID_AWK = r"""
$0 ~ ("tx: +" x ", ") || index($0, "_PREPARED " x ":") > 0 { print; next }
/ desc: (COMMIT|ABORT)/ && index($0, "subxacts:") > 0 {
  s = substr($0, index($0, "subxacts:") + 9); sub(/;.*/, "", s)
  n = split(s, a, " "); for (i = 1; i <= n; i++) if (a[i] == x) { print; next }
}
"""

#   $1 pg_waldump  $2 timeline  $3 work root  $4 end LSN or ''  $5 mode  $6 mode argument  then: name path how ...
DECODE_SCRIPT = r"""
set -eu
waldump="$1"; tli="$2"; root="$3"; endlsn="$4"; mode="$5"; arg="$6"; shift 6
mkdir -p "$root"
tmp="$(mktemp -d "$root/waldump.XXXXXXXX")"
trap 'rm -rf "$tmp"' EXIT HUP INT TERM
mkdir "$tmp/wal"
first=""; last=""
while [ "$#" -ge 3 ]; do
  name="$1"; path="$2"; how="$3"; shift 3
  case "$how" in
    link) ln -s "$path" "$tmp/wal/$name" ;;
    gzip|bzip2|xz|zstd|lz4) "$how" -dc "$path" > "$tmp/wal/$name" ;;
    *) echo "unsupported WAL file handling: $how" >&2; exit 2 ;;
  esac
  [ -n "$first" ] || first="$name"; last="$name"
done
case "$mode" in
  find) set -- --rmgr Heap --rmgr Transaction --rmgr Storage --rmgr Standby "$first" "$last" ;;
  locate) set -- --rmgr Transaction --rmgr XLOG "$first" "$last" ;;
  xid) set -- --rmgr Transaction "$first" "$last" ;;
  discard) set -- --rmgr Heap --rmgr Heap2 --rmgr Transaction --rmgr Storage --rmgr Standby "$first" "$last" ;;
  one) set -- --start "$arg" --limit 1 ;;
  *) echo "unknown decode mode: $mode" >&2; exit 2 ;;
esac
set -- --path "$tmp/wal" --timeline "$tli" "$@"
[ -z "$endlsn" ] || set -- --end "$endlsn" "$@"
filter() {
  case "$mode" in
    find) grep -v -F -e ' desc: INSERT' -e ' desc: LOCK off' -e ' desc: INPLACE' -e ' desc: RUNNING_XACTS' \
            -e ' desc: INVALIDATIONS' -e ' desc: CONFIRM' || true ;;
    locate) awk '__LOCATE__' ;;
    xid) awk -v x="$arg" '__XID__' ;;
    discard) awk '__COLLAPSE__' ;;
    *) cat ;;
  esac
}
{ rc=0; TZ=UTC "$waldump" "$@" 2> "$tmp/err" || rc=$?; echo "$rc" > "$tmp/rc"; } | filter
cat "$tmp/err" >&2
exit "$(cat "$tmp/rc")"
""".replace("__LOCATE__", LOCATE_AWK).replace("__XID__", XID_AWK).replace("__COLLAPSE__", COLLAPSE_AWK)

MODES = ("find", "locate", "xid", "discard", "one")
#: how pg_waldump says it reached the end of the WAL written so far (the zeroed tail of a `.partial`)
END_OF_WAL_RE = re.compile(r"invalid record length at [0-9A-F/]+: wanted \d+, got 0|invalid magic number 0000|"
                           r"record with incorrect prev-link|could not find a valid record after")
VERSION_RE = re.compile(r"\(PostgreSQL\) (\d+)")


class WaldumpError(BarmanDrError):
    """pg_waldump failed on WAL that should be readable."""


@dataclass
class ArchiveView:
    """What Barman holds for one server, along one timeline's history, at one moment."""

    server: str
    wals_directory: str
    streaming_directory: str | None
    timeline: int
    history: str | None
    switches: list[tuple[int, str]]
    files: PathFiles
    catalog_names: list[str]

    @property
    def newest_segno(self) -> int | None:
        return max(self.files.files) if self.files.files else None


class WalDecodeHook:
    """pg_waldump runs on a barman host (through a BarmanHook's SSH connection)."""

    def __init__(self, *, barman: BarmanHook, decode_inactivity_s: float = 600) -> None:
        self.barman = barman
        self.decode_inactivity_s = decode_inactivity_s

    @cached_property
    def _waldumps(self) -> dict[str, str]:
        return {}

    def waldump(self, info: dict[str, Any], server: str, warnings: list[str]) -> str:
        """Barman's own PostgreSQL binaries (`path_prefix`), checked against the server's major version."""
        prefix = str(info.get("path_prefix") or "").split(":")[0].rstrip("/")
        path = f"{prefix}/pg_waldump" if prefix else "pg_waldump"
        if path in self._waldumps:
            return path
        r = self.barman.host.run([path, "--version"], check=False, timeout=30)
        m = VERSION_RE.search(r.stdout)
        if r.exit_code != 0 or not m:
            raise PreflightError(f"pg_waldump not runnable on the barman host as {path!r} ({r.stderr.strip()[:200]}): "
                                 "install the server's PostgreSQL binaries there and set Barman's path_prefix")
        server_major = str(info.get("server_txt_version") or "").split(".")[0]
        if server_major.isdigit() and int(server_major) != int(m.group(1)):
            raise PreflightError(f"{path} is PostgreSQL {m.group(1)} but {server} runs {server_major}: "
                                 "pg_waldump reads only its own major version's WAL. Point Barman's path_prefix at "
                                 f"PostgreSQL {server_major}'s binaries.")
        if not server_major.isdigit():
            warnings.append(f"server version unknown (server down?): assuming {path} (PostgreSQL {m.group(1)}) matches")
        self._waldumps[path] = m.group(1)
        return path

    def view(self, server: str, info: dict[str, Any], timeline: int, catalog: Any = None) -> ArchiveView:
        """Barman's catalogue and streaming directory along `timeline`'s history (its archived history file)."""
        wals_dir, stream_dir = info.get("wals_directory"), info.get("streaming_wals_directory")
        if not wals_dir:
            raise PreflightError("barman show-server gives no wals_directory")
        if catalog is None:
            catalog = self.barman.wal_catalog(server)
        streaming = self.barman.host.run(["ls", "-1", stream_dir], check=False).stdout.split() if stream_dir else []
        history = self.barman.timeline_history(server, timeline) if timeline > 1 else None
        switches = [(e.parent_timeline, e.switch_lsn) for e in parse_history_file(history or "")]
        try:
            pf = path_files(catalog, streaming, wals_directory=wals_dir, streaming_directory=stream_dir,
                            timeline=timeline, switches=switches)
        except WalSelectionError as exc:
            raise PreflightError(str(exc)) from exc
        names = [e.name for e in catalog if is_wal_segment_name(e.name)]
        return ArchiveView(server, wals_dir, stream_dir, timeline, history, switches, pf, names)

    def decode(self, runs: Sequence[DecodeRun], waldump: str, on_line: Callable[[str], None], *, mode: str,
               arg: str = "") -> list[dict[str, Any]]:
        """Run each decode run, streaming its lines to `on_line`; the runs' facts (records come from the caller)."""
        if mode not in MODES:
            raise ValueError(f"unknown decode mode {mode!r}")
        done = []
        root = f"{self.barman.job_dir.rstrip('/')}/waldump"
        for run in runs:
            argv = sh_argv(DECODE_SCRIPT, waldump, str(run.timeline), root, run.end_lsn or "", mode, arg, *run.args())
            r = self.barman.host.stream_lines(argv, on_line, timeout=self.decode_inactivity_s)
            info = {**run.to_dict(), "seconds": r.duration_s, "mode": mode}
            if r.exit_code != 0:
                if (run.partial and END_OF_WAL_RE.search(r.stderr)) or (mode == "one" and END_OF_WAL_RE.search(r.stderr)):
                    info["end"] = r.stderr.strip().splitlines()[-1][:200]
                else:
                    raise WaldumpError(f"pg_waldump failed on {run.files[0].name}..{run.files[-1].name} (timeline "
                                       f"{run.timeline}, mode {mode}), exit {r.exit_code}: {r.stderr.strip()[-800:]}")
            done.append(info)
        return done
