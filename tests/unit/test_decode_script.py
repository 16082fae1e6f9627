"""The barman-host decode script (dr_find_target, target resolution), run locally through `sh` as SSH would run it.

A stand-in `pg_waldump` (a shell script) checks what it is given (the private directory
holds every segment under its own name, decompressed) and prints the recorded pg_waldump
output; the real one runs in tests/integration/test_find_target.py.
"""

from __future__ import annotations

import gzip
import shlex
import subprocess
from pathlib import Path

import pytest

from barman_dr.forensics.waldump import TxnAggregator
from barman_dr.hooks.remote import sh_argv
from barman_dr.hooks.waldecode import DECODE_SCRIPT

SEG1, SEG2 = "000000010000000000000007", "000000010000000000000008"

FAKE_WALDUMP = r"""#!/bin/sh
# record the arguments, check the segment files, replay the recording
printf '%s\n' "$@" > "$LOG/args"
dir=""; while [ "$#" -gt 0 ]; do [ "$1" = "--path" ] && dir="$2"; shift; done
ls "$dir" > "$LOG/listing"
for f in "$dir"/0*; do head -c 5 "$f" >> "$LOG/heads"; echo >> "$LOG/heads"; done
echo "TZ=$TZ" > "$LOG/tz"
cat "$RECORDING"
echo "pg_waldump: error: error in WAL record at 0/A07E790: invalid record length at 0/A07E7C8: wanted 24, got 0" >&2
exit "${FAKE_RC:-0}"
"""


@pytest.fixture
def setup(tmp_path: Path, fixtures_dir: Path):
    log = tmp_path / "log"
    log.mkdir()
    fake = tmp_path / "pg_waldump"
    fake.write_text(FAKE_WALDUMP)
    fake.chmod(0o755)
    wals = tmp_path / "wals dir"  # a space in a path: never word-split
    wals.mkdir()
    (wals / SEG1).write_bytes(b"SEG-1" + b"\0" * 100)
    with gzip.open(wals / SEG2, "wb") as f:
        f.write(b"SEG-2" + b"\0" * 100)
    return {"tmp": tmp_path, "log": log, "fake": fake, "wals": wals,
            "recording": fixtures_dir / "waldump" / "workload.waldump.txt"}


def run(setup, *files: str, rc: int = 0, end_lsn: str = "", mode: str = "find",
        arg: str = "") -> subprocess.CompletedProcess:
    argv = sh_argv(DECODE_SCRIPT, str(setup["fake"]), "1", str(setup["tmp"] / "work"), end_lsn, mode, arg, *files)
    env = {"PATH": "/usr/bin:/bin", "LOG": str(setup["log"]), "RECORDING": str(setup["recording"]), "FAKE_RC": str(rc)}
    return subprocess.run(["sh", "-c", shlex.join(argv)], capture_output=True, text=True, env=env, check=False)


def test_segments_are_linked_or_decompressed_and_lines_filtered(setup):
    w = setup["wals"]
    r = run(setup, SEG1, str(w / SEG1), "link", SEG2, str(w / SEG2), "gzip")
    assert r.returncode == 0, r.stderr
    args = (setup["log"] / "args").read_text().split("\n")
    assert args[-3:-1] == [SEG1, SEG2] and "--timeline" in args and "--end" not in args
    assert args.count("--rmgr") == 4
    assert (setup["log"] / "listing").read_text().split() == [SEG1, SEG2]
    assert (setup["log"] / "heads").read_text().split() == ["SEG-1", "SEG-2"]  # the gzip'd one decompressed
    assert (setup["log"] / "tz").read_text().strip() == "TZ=UTC"
    recorded = setup["recording"].read_text().splitlines()
    out = r.stdout.splitlines()
    assert out and len(out) < len(recorded)
    assert not any(" desc: INSERT" in x or " desc: LOCK off" in x for x in out)
    assert [x for x in recorded if " desc: DELETE" in x or " desc: COMMIT" in x] == \
        [x for x in out if " desc: DELETE" in x or " desc: COMMIT" in x]
    assert "invalid record length" in r.stderr
    assert list((setup["tmp"] / "work").iterdir()) == []  # the private directory is gone


def test_exit_code_and_end_lsn_pass_through(setup):
    w = setup["wals"]
    r = run(setup, SEG1, str(w / SEG1), "link", rc=1, end_lsn="0/7000100")
    assert r.returncode == 1 and "invalid record length" in r.stderr
    args = (setup["log"] / "args").read_text().split("\n")
    assert args[args.index("--end") + 1] == "0/7000100"
    assert list((setup["tmp"] / "work").iterdir()) == []


def test_unknown_handling_is_refused(setup):
    r = run(setup, SEG1, str(setup["wals"] / SEG1), "$(touch /tmp/x)")
    assert r.returncode == 2 and "unsupported WAL file handling" in r.stderr


def _totals(lines):
    """Per transaction: rows inserted, deleted, updated (what a PITR would discard), by the aggregator."""
    out = {}
    agg = TxnAggregator(lambda _t: False, on_commit=lambda t: out.__setitem__(
        t.xid, (t.rows_inserted, t.rows_deleted, t.rows_updated, sorted(map(str, t.inserted)))))
    agg.feed_lines(lines)
    return out


def test_discard_mode_folds_row_records_without_changing_any_count(setup):
    """The awk fold on the barman host: far fewer lines, the very same per-transaction counts as the raw records."""
    w = setup["wals"]
    r = run(setup, SEG1, str(w / SEG1), "link", mode="discard")
    assert r.returncode == 0, r.stderr
    args = (setup["log"] / "args").read_text().split("\n")
    assert "Heap2" in args and args.count("--rmgr") == 5
    recorded = setup["recording"].read_text().splitlines()
    out = r.stdout.splitlines()
    assert any(x.startswith("AGG ") for x in out)
    rows = [x for x in recorded if x.startswith("rmgr: Heap") and any(
        f" desc: {op}" in x for op in ("INSERT ", "INSERT+", "MULTI_INSERT", "DELETE", "UPDATE", "HOT_UPDATE"))]
    assert len([x for x in out if x.startswith("AGG ")]) < len(rows) / 2  # (the fake interleaves Btree records)
    assert not any(" desc: PRUNE" in x for x in out)  # row-less Heap2 records are dropped
    raw = _totals(recorded)
    assert raw and any(v[0] for v in raw.values()) and any(v[1] for v in raw.values())
    assert _totals(out) == raw
    # commits pass through untouched, with their prev/len fields (the proof needs them)
    assert [x for x in recorded if " desc: COMMIT" in x] == [x for x in out if " desc: COMMIT" in x]


def test_locate_mode_keeps_commits_and_restore_points_only(setup):
    w = setup["wals"]
    r = run(setup, SEG1, str(w / SEG1), "link", mode="locate")
    assert r.returncode == 0, r.stderr
    args = (setup["log"] / "args").read_text().split("\n")
    assert args[args.index("--rmgr") + 1] == "Transaction" and "XLOG" in args
    out = r.stdout.splitlines()
    recorded = setup["recording"].read_text().splitlines()
    assert out == [x for x in recorded if " desc: COMMIT" in x or " desc: ABORT" in x]


def test_xid_mode_keeps_that_transactions_end_only(setup):
    recorded = setup["recording"].read_text().splitlines()
    commit = next(x for x in recorded if " desc: COMMIT" in x)
    xid = commit.split("tx:")[1].split(",")[0].strip()
    r = run(setup, SEG1, str(setup["wals"] / SEG1), "link", mode="xid", arg=xid)
    assert r.returncode == 0, r.stderr
    assert commit in r.stdout.splitlines()
    assert all(f"tx: {xid:>10}," in x or f"_PREPARED {xid}:" in x for x in r.stdout.splitlines())


def test_one_mode_reads_from_an_lsn(setup):
    r = run(setup, SEG1, str(setup["wals"] / SEG1), "link", mode="one", arg="0/7000100")
    assert r.returncode == 0, r.stderr
    args = (setup["log"] / "args").read_text().split("\n")
    assert args[args.index("--start") + 1] == "0/7000100" and args[args.index("--limit") + 1] == "1"
    assert SEG1 not in args  # pg_waldump finds the segment of --start itself


def test_unknown_mode_is_refused(setup):
    r = run(setup, SEG1, str(setup["wals"] / SEG1), "link", mode="$(id)")
    assert r.returncode == 2 and "unknown decode mode" in r.stderr


def test_xid_mode_finds_a_subtransaction_in_its_parents_commit(setup, tmp_path):
    line = ("rmgr: Transaction len (rec/tot):     46/    46, tx:        761, lsn: 0/0F089000, prev 0/0F088F00, "
            "desc: COMMIT 2026-11-25 19:15:59.476139 UTC; subxacts: 762 7621")
    other = line.replace("subxacts: 762 7621", "subxacts: 7620")
    recording = tmp_path / "sub.txt"
    recording.write_text(line + "\n" + other + "\n")
    setup["recording"] = recording
    r = run(setup, SEG1, str(setup["wals"] / SEG1), "link", mode="xid", arg="762")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [line]  # 762 is listed; 7620 and 7621 are other transactions
