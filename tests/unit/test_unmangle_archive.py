"""Putting back the archive_command `barman restore` replaced with `false` (the host script, run locally).

The mangled text is what Barman 3.19.1's `ConfigurationFileMangeler.mangle_options` writes:
the original line prefixed with `#BARMAN#`, then `archive_command = false`.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from barman_dr.hooks.dbhost import _UNMANGLE_ARCHIVE
from barman_dr.hooks.remote import sh_argv

ORIGINAL = "archive_command = 'barman-wal-archive backup pg-primary %p'  # ship WAL\n"


def run(*files: Path) -> list[str]:
    out = subprocess.run(sh_argv(_UNMANGLE_ARCHIVE, *map(str, files)), check=True, capture_output=True, text=True)
    return out.stdout.split()


def test_the_barman_pair_becomes_the_original_line_again(tmp_path):
    conf = tmp_path / "postgresql.conf"
    conf.write_text("shared_buffers = 128MB\n#BARMAN#" + ORIGINAL + "archive_command = false\n"
                    "#BARMAN#recovery_target_time = '2026-01-01'\nport = 5432\n")
    os.chmod(conf, 0o600)
    assert run(conf, tmp_path / "postgresql.auto.conf") == [str(conf)]  # a missing file is skipped
    assert conf.read_text() == ("shared_buffers = 128MB\n" + ORIGINAL +
                                "#BARMAN#recovery_target_time = '2026-01-01'\nport = 5432\n")
    assert conf.stat().st_mode & 0o777 == 0o600
    assert run(conf) == []  # idempotent: nothing left to undo


def test_only_the_exact_pair_is_rewritten(tmp_path):
    auto = tmp_path / "postgresql.auto.conf"
    # a commented original without Barman's `false` after it, and a `false` someone set on purpose
    text = "#BARMAN#" + ORIGINAL + "wal_level = replica\narchive_command = false\n"
    auto.write_text(text)
    run(auto)
    assert auto.read_text() == text
    last = tmp_path / "last.conf"
    last.write_text("#BARMAN#" + ORIGINAL)  # at the end of the file
    run(last)
    assert last.read_text() == "#BARMAN#" + ORIGINAL


def test_a_setting_without_equals_sign_is_restored_too_and_unchanged_files_are_not_reported(tmp_path):
    conf = tmp_path / "postgresql.conf"
    conf.write_text("#BARMAN#archive_command 'cp %p /arch/%f'\narchive_command = false\n")
    assert run(conf) == [str(conf)]
    assert conf.read_text() == "archive_command 'cp %p /arch/%f'\n"
    kept = tmp_path / "kept.conf"
    kept.write_text("#BARMAN#archive_command = 'x'\nport = 5432\n")  # Barman's pair is not there: not touched
    assert run(kept) == [] and kept.read_text() == "#BARMAN#archive_command = 'x'\nport = 5432\n"
