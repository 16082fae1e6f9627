"""One SSH command for the files of every Barman server of a host: WAL catalogue, WAL files, begin WAL.

The daily verification needs, per server, Barman's WAL catalogue (`<server>-xlog.db`), the
segment files really present in `wals/<hex16>/`, and the begin WAL of the oldest DONE
backup; per host, `df -P` of the backup directory. Barman has no batched command for these
(`show-backup` takes one backup, one Barman start of ~0.3 s each), so one fixed POSIX sh
script reads them all in one SSH exec, every path a positional argument (no interpolation),
each section framed by `@@` marker lines and followed by its exit code, so one missing file
is that server's error and not the host's. The begin WAL comes from the backup's
`backup.info` (`<backup_directory>/meta/<id>-backup.info` in Barman 3.19, `base/<id>/backup.info`
before): the same file `show-backup` reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

#: $1 = the backup directory (df); then groups of 5: server, xlog.db path, wals directory,
#: two candidate backup.info paths of the oldest DONE backup ("" when the server has none).
FILES_SCRIPT = r"""
df -P -- "$1" 2>&1; echo "@@rc df $?"
shift
while [ $# -ge 5 ]; do
  s="$1"; x="$2"; w="$3"; i1="$4"; i2="$5"; shift 5
  echo "@@server $s"
  echo "@@section xlogdb"
  if [ -n "$x" ]; then cat -- "$x" 2>&1; echo "@@rc $?"; else echo "no xlogdb_directory"; echo "@@rc 2"; fi
  echo "@@section files"
  if [ -n "$w" ]; then find "$w" -mindepth 2 -maxdepth 2 -type f -printf '%f\n' 2>&1; echo "@@rc $?"
  else echo "no wals_directory"; echo "@@rc 2"; fi
  echo "@@section begin_wal"
  if [ -z "$i1$i2" ]; then echo "@@rc 0"
  elif [ -n "$i1" ] && [ -f "$i1" ]; then grep '^begin_wal=' -- "$i1" 2>&1; echo "@@rc $?"
  elif [ -n "$i2" ] && [ -f "$i2" ]; then grep '^begin_wal=' -- "$i2" 2>&1; echo "@@rc $?"
  else echo "no backup.info at $i1 or $i2"; echo "@@rc 2"; fi
done
"""


@dataclass(frozen=True)
class FileSection:
    """One section's output lines, or the error text when its command failed."""

    lines: tuple[str, ...] = ()
    error: str | None = None


@dataclass
class ServerFiles:
    server: str
    sections: dict[str, FileSection] = field(default_factory=dict)

    def section(self, name: str) -> FileSection:
        return self.sections.get(name) or FileSection(error=f"no {name} section in the host's output")


def files_args(backup_directory: str, entries: Sequence[tuple[str, str, str, str | None, str | None]]) -> list[str]:
    """FILES_SCRIPT's positional arguments: (server, xlog.db path, wals dir, backup directory, oldest backup id)."""
    args = [backup_directory]
    for server, xlogdb, wals, server_dir, backup_id in entries:
        infos = (f"{server_dir}/meta/{backup_id}-backup.info", f"{server_dir}/base/{backup_id}/backup.info") \
            if backup_id and server_dir else ("", "")
        args += [server, xlogdb, wals, *infos]
    return args


def parse_files_output(text: str) -> tuple[FileSection, dict[str, ServerFiles]]:
    """FILES_SCRIPT output -> (the df section, {server: its sections})."""
    df_lines: list[str] = []
    df = FileSection(error="no df output")
    out: dict[str, ServerFiles] = {}
    current: ServerFiles | None = None
    section: str | None = None
    buf: list[str] = []

    def close(rc: str, lines: list[str]) -> FileSection:
        ok = rc.strip() == "0"
        return FileSection(lines=tuple(lines) if ok else (),
                           error=None if ok else (" ".join(x.strip() for x in lines if x.strip())[-500:]
                                                  or f"exit status {rc.strip()}"))

    for line in text.splitlines():
        if line.startswith("@@rc df "):
            df = close(line[len("@@rc df "):], df_lines)
        elif line.startswith("@@server "):
            current = out.setdefault(line[len("@@server "):], ServerFiles(line[len("@@server "):]))
            section, buf = None, []
        elif line.startswith("@@section "):
            section, buf = line[len("@@section "):], []
        elif line.startswith("@@rc "):
            if current is not None and section is not None:
                current.sections[section] = close(line[len("@@rc "):], buf)
            section, buf = None, []
        elif current is None:
            df_lines.append(line)
        else:
            buf.append(line)
    return df, out


def begin_wal_of(sec: FileSection) -> str | None:
    """`begin_wal=...` of a backup.info section (None when the server has no DONE backup)."""
    for line in sec.lines:
        if line.startswith("begin_wal="):
            value = line.split("=", 1)[1].strip()
            return value if value and value != "None" else None
    return None


def catalog_rows(sec: FileSection) -> list[tuple[str, int, float, str | None]]:
    """xlog.db lines (name, size, time, compression), like BarmanHook.wal_catalog."""
    rows = []
    for line in sec.lines:
        parts = line.split("\t")
        if len(parts) >= 3:
            compression = parts[3].strip() if len(parts) >= 4 and parts[3].strip() not in ("", "None") else None
            rows.append((parts[0], int(parts[1]), float(parts[2]), compression))
    return rows
