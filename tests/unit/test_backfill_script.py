"""rebase_barman's backfill copy never shows a half-written file where `barman cron` archives from.

CI (2026-12-05): the copy was written as `<seg>.backfill.<pid>` inside Barman's streaming
directory; a concurrent `barman cron` took it for an unknown file and moved it to `errors/`, and
the daily verification then reported archiver_errors CRITICAL. The copy is now written in the
server's own directory and renamed into place whole.
"""

from __future__ import annotations

import subprocess

from barman_dr.operators.pitr.post_incident import BACKFILL_SCRIPT

SEG = "000000140000000000000097"


def _run(dest, src):
    # the login argv of the real script (ssh to the db host) is `env` here: `env cat -- <src>`
    return subprocess.run(["sh", "-c", BACKFILL_SCRIPT, "sh", str(dest), str(src), "env"], capture_output=True,
                          text=True, check=False)


def test_a_whole_segment_is_renamed_in_and_nothing_else_ever_lands_in_the_streaming_directory(tmp_path):
    server, streaming = tmp_path / "pg-primary", tmp_path / "pg-primary" / "streaming"
    streaming.mkdir(parents=True)
    src = tmp_path / SEG
    src.write_bytes(b"\1" * 16 * 1024 * 1024)
    # what a concurrent `barman cron` sees while the copy runs: watch the directory during it
    watcher = subprocess.Popen(["sh", "-c", f"while :; do ls -A {streaming}; done"], stdout=subprocess.PIPE, text=True)
    try:
        r = _run(streaming / SEG, src)
    finally:
        watcher.terminate()
        seen = set(watcher.communicate()[0].split())
    assert r.returncode == 0 and r.stdout.strip() == f"copied {streaming / SEG}", r.stderr
    assert seen <= {SEG}, seen
    assert sorted(p.name for p in server.iterdir()) == ["streaming"]  # no copy left behind
    assert _run(streaming / SEG, src).stdout.strip() == f"exists {streaming / SEG}"


def test_a_short_copy_is_refused_and_removed(tmp_path):
    server, streaming = tmp_path / "pg-primary", tmp_path / "pg-primary" / "streaming"
    streaming.mkdir(parents=True)
    src = tmp_path / SEG
    src.write_bytes(b"\1" * 1000)
    r = _run(streaming / SEG, src)
    assert r.returncode == 1 and "short copy" in r.stderr
    assert list(streaming.iterdir()) == [] and sorted(p.name for p in server.iterdir()) == ["streaming"]
