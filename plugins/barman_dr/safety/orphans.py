"""Staging copies and private postmasters left behind by DR runs that did not finish.

A staged restore (`<data>.staged-<tag>` and its `-wal` directory) and a salvage copy
(`salvage-<tag>`) are a run's own scratch space next to a data directory, each possibly
with a private postmaster on it. The run removes them (or renames the staging copy into
place). When the run dies instead (Airflow crashed and the run was never resumed, a task
was marked failed by hand, a retry gave up), they stay: gigabytes of disk next to the live
data, and a postmaster nobody watches. The daily verification lists them per host, names
the run that made each one (from the audit trail) and says whether that run still owns
the server (its lock) or is over, so nothing outlives a run unnoticed. It only reports:
the directories are not live data, but a DBA may still want one (a staged copy is a
proven restore), so deleting them stays a person's decision.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

#: $1 = a data directory. Prints `dir <KiB> <path>` for each scratch directory next to it and
#: `pm <pid> <data dir>` for each postmaster (any `postgres -D <dir>` process) on the host.
LIST_SCRIPT = r"""
d="${1%/}"; parent=$(dirname -- "$d"); base=$(basename -- "$d")
for x in "$parent/$base".staged-* "$parent"/salvage-*; do
  [ -d "$x" ] || continue
  echo "dir $(du -sk -- "$x" 2>/dev/null | cut -f1) $x"
done
ps -eo pid=,args= | awk '{ for (i = 2; i < NF; i++) if ($i == "-D") { print "pm", $1, $(i + 1); break } }'
"""

#: LIST_SCRIPT for many data directories of one host in one SSH exec: `@@dir <path>` before each
#: directory's `dir` lines, the host's postmasters (`pm` lines) once at the end.
LIST_MANY_SCRIPT = r"""
for d0 in "$@"; do
  echo "@@dir $d0"
  d="${d0%/}"; parent=$(dirname -- "$d"); base=$(basename -- "$d")
  for x in "$parent/$base".staged-* "$parent"/salvage-*; do
    [ -d "$x" ] || continue
    echo "dir $(du -sk -- "$x" 2>/dev/null | cut -f1) $x"
  done
done
ps -eo pid=,args= | awk '{ for (i = 2; i < NF; i++) if ($i == "-D") { print "pm", $1, $(i + 1); break } }'
"""


@dataclass(frozen=True)
class Orphan:
    host: str
    path: str
    kib: int
    kind: str  # staging | salvage
    run_id: str | None
    dag_id: str | None
    postmaster_pid: int | None
    in_use: bool

    def describe(self) -> str:
        origin = (f"{self.dag_id} run {self.run_id!r}" if self.run_id else "no run in the audit trail")
        pm = f"; a postmaster (pid {self.postmaster_pid}) still runs on it" if self.postmaster_pid else ""
        return f"{self.host}:{self.path} ({self.kib / 1024:,.0f} MiB, {self.kind} copy of {origin}{pm})"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_listing(text: str) -> tuple[list[tuple[str, int]], dict[str, int]]:
    """`LIST_SCRIPT` output -> ([(path, KiB)], {data dir: postmaster pid})."""
    dirs, pms = [], {}
    for line in text.splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[0] == "dir":
            dirs.append((parts[2], int(parts[1]) if parts[1].isdigit() else 0))
        elif len(parts) == 3 and parts[0] == "pm" and parts[1].isdigit():
            pms[parts[2].rstrip("/")] = int(parts[1])
    return dirs, pms


def parse_listing_many(text: str) -> tuple[dict[str, list[tuple[str, int]]], dict[str, int]]:
    """`LIST_MANY_SCRIPT` output -> ({data directory: [(path, KiB)]}, {data dir: postmaster pid})."""
    per_dir: dict[str, list[str]] = {}
    rest: list[str] = []
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("@@dir "):
            current = per_dir.setdefault(line[len("@@dir "):], [])
        elif line.startswith("pm "):
            rest.append(line)
        elif current is not None:
            current.append(line)
    _, pms = parse_listing("\n".join(rest))
    return {d: parse_listing("\n".join(lines))[0] for d, lines in per_dir.items()}, pms


def owner_dir(path: str) -> str:
    """The directory a run recorded: a staging copy's `-wal` and a salvage copy's `-run` belong to it."""
    for suffix in ("-wal", "-run"):
        if path.endswith(suffix):
            return path[: -len(suffix)]
    return path


def classify(host: str, dirs: Iterable[tuple[str, int]], postmasters: Mapping[str, int],
             recorded: Mapping[str, tuple[str, str]], lock_run_id: str | None) -> list[Orphan]:
    """Each scratch directory with the run that made it (`recorded`: path -> (dag_id, run_id)) and its state.

    `in_use`: that run still holds the server lock (it is running, or crashed and will be
    resumed); such a directory is not reported as an orphan.
    """
    out = []
    dirs = sorted(dirs)
    present = {p.rstrip("/") for p, _ in dirs}
    for path, kib in dirs:
        main = owner_dir(path)
        if path.endswith("-run") and main not in present and not any(
                pm.startswith(main) for pm in postmasters):
            continue  # the socket and log directory of a staging copy that was used (renamed into place)
        dag_id, run_id = recorded.get(main, (None, None))
        kind = "salvage" if posixpath.basename(main).startswith("salvage-") else "staging"
        out.append(Orphan(host, path, kib, kind, run_id, dag_id, postmasters.get(path.rstrip("/")),
                          in_use=bool(run_id and run_id == lock_run_id)))
    return out


def recorded_paths(events: Iterable[Mapping[str, Any]]) -> dict[str, tuple[str, str]]:
    """Scratch directories the audit trail attributes to a run (staging_directory, salvage_prepare events)."""
    out: dict[str, tuple[str, str]] = {}
    for e in events:
        d = e.get("details") or {}
        for key in ("staging_directory", "copy", "copy_directory"):
            p = d.get(key)
            if isinstance(p, str) and p:
                out.setdefault(p.rstrip("/"), (str(e.get("dag_id")), str(e.get("run_id"))))
    return out
