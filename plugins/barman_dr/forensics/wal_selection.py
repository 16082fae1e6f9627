"""Which of Barman's WAL segments to decode, along a timeline's history, as pg_waldump runs (pure).

Shared by dr_find_target (a time window: `select_wal`) and the target resolution of every
recovery (a segment range: `select_range`). Barman keeps archived segments under
`wals/<hex16>/` (listed in its WAL catalogue, `xlog.db`, with the time each was archived)
and the newest in its streaming directory (the `.partial` being written under its segment
name). A recovery along timeline T reads, for each segment number, the segment of the
timeline T's history says was current there (`timeline_for_segment`); an earlier PITR's
abandoned branch is never read.

**Runs.** pg_waldump reads consecutive segments of one timeline from one directory. A run
is split at gaps (named: a transaction there cannot be seen), at timeline switches (the
parent's switch segment is decoded up to the switch LSN) and every `chunk` segments;
consecutive runs overlap by one segment so that a record crossing a segment boundary is
never lost (consumers skip records they have already seen, by LSN).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from barman_dr.hooks.barman import WalCatalogEntry, timeline_for_segment
from barman_dr.models import Lsn, WalSegment, is_wal_segment_name

#: WAL compressions Barman may use -> the standard tool that decompresses them (`tool -dc file`)
DECOMPRESSORS = {"gzip": "gzip", "pigz": "gzip", "pygzip": "gzip", "bzip2": "bzip2", "pybzip2": "bzip2",
                 "xz": "xz", "zstd": "zstd", "lz4": "lz4"}


class WalSelectionError(ValueError):
    """The archive cannot be decoded as asked (e.g. a compression no standard tool reads)."""


@dataclass(frozen=True)
class WalFile:
    """One segment to decode: its name, where it is on the barman host, and how to read it."""

    name: str
    path: str
    how: str = "link"            # "link" (as is) or a decompressor: gzip, bzip2, xz, zstd, lz4
    time: float | None = None    # archived at (epoch, Barman host clock); None: still in the streaming directory
    partial: bool = False
    size: int | None = None      # bytes as archived (compressed size when compressed)

    @property
    def segno(self) -> int:
        return WalSegment.parse(self.name).segno

    @property
    def timeline(self) -> int:
        return WalSegment.parse(self.name).timeline


@dataclass(frozen=True)
class DecodeRun:
    """One pg_waldump invocation: consecutive segments of one timeline, optionally stopping at an LSN."""

    timeline: int
    files: tuple[WalFile, ...]
    end_lsn: str | None = None

    @property
    def partial(self) -> bool:
        return self.files[-1].partial

    def args(self) -> list[str]:
        """The positional arguments of the remote decode script after its fixed ones: name, path, how per file."""
        out: list[str] = []
        for f in self.files:
            out += [f.name, f.path, f.how]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"timeline": self.timeline, "first": self.files[0].name, "last": self.files[-1].name,
                "segments": len(self.files), "end_lsn": self.end_lsn, "partial": self.partial}


@dataclass
class WalSelection:
    runs: list[DecodeRun] = field(default_factory=list)
    gaps: list[str] = field(default_factory=list)
    segments: int = 0
    newest_archived_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"runs": [r.to_dict() for r in self.runs], "gaps": self.gaps[:20], "segments": self.segments,
                "newest_archived_at": self.newest_archived_at}


def _how(entry: WalCatalogEntry) -> str:
    if not entry.compression:
        return "link"
    tool = DECOMPRESSORS.get(entry.compression)
    if tool is None:
        raise WalSelectionError(f"segment {entry.name} is compressed with {entry.compression!r}, which barman-dr cannot "
                                f"decompress for pg_waldump (supported: {', '.join(sorted(DECOMPRESSORS))})")
    return tool


@dataclass
class PathFiles:
    """The segments recovery along `timeline` would read, by segment number, plus the parents' switch segments."""

    timeline: int
    switches: tuple[tuple[int, str], ...]
    files: dict[int, WalFile] = field(default_factory=dict)
    #: switch segno -> (the parent's segment with that number, the switch LSN)
    switch_files: dict[int, tuple[WalFile, str]] = field(default_factory=dict)
    newest_archived_at: float | None = None

    @property
    def segnos(self) -> list[int]:
        return sorted(self.files)


def path_files(catalog: Iterable[WalCatalogEntry], streaming: Iterable[str], *, wals_directory: str,
               streaming_directory: str | None, timeline: int,
               switches: Sequence[tuple[int, str]] | None) -> PathFiles:
    """Every segment Barman holds on `timeline`'s history (archived first, then the streaming directory)."""
    out = PathFiles(timeline, tuple(switches or ()))
    switch_segnos = {WalSegment.from_lsn(tli, Lsn.parse(lsn)).segno: (tli, lsn) for tli, lsn in (switches or ())}
    for e in catalog:
        if not is_wal_segment_name(e.name):
            continue
        seg = WalSegment.parse(e.name)
        f = WalFile(e.name, f"{wals_directory.rstrip('/')}/{e.name[:16]}/{e.name}", _how(e), e.time, size=e.size)
        if seg.timeline == timeline_for_segment(seg.segno, switches, timeline):
            out.files[seg.segno] = f
        elif seg.segno in switch_segnos and switch_segnos[seg.segno][0] == seg.timeline:
            out.switch_files[seg.segno] = (f, switch_segnos[seg.segno][1])
    archived_times = [f.time for f in out.files.values() if f.time is not None]
    out.newest_archived_at = max(archived_times) if archived_times else None
    if streaming_directory:
        for name in streaming:
            base, partial = (name[:-8], True) if name.endswith(".partial") else (name, False)
            if not is_wal_segment_name(base):
                continue
            seg = WalSegment.parse(base)
            if seg.segno in out.files or seg.timeline != timeline_for_segment(seg.segno, switches, timeline):
                continue
            out.files[seg.segno] = WalFile(base, f"{streaming_directory.rstrip('/')}/{name}", "link", None, partial)
    return out


def group_runs(pf: PathFiles, chosen: Sequence[int], chunk: int = 256) -> WalSelection:
    """Consecutive chosen segments as pg_waldump runs (split at gaps, timeline switches and every `chunk`)."""
    sel = WalSelection(segments=len(chosen), newest_archived_at=pf.newest_archived_at)
    groups: list[list[WalFile]] = []
    for segno in chosen:
        f = pf.files[segno]
        prev = groups[-1][-1] if groups else None
        if prev is not None and prev.segno + 1 == segno and prev.timeline == f.timeline and not prev.partial:
            groups[-1].append(f)
            continue
        if prev is not None and prev.segno + 1 < segno:
            for missing in range(prev.segno + 1, segno):
                sel.gaps.append(WalSegment(timeline_for_segment(missing, pf.switches, pf.timeline), missing).name)
        groups.append([f])
    for i, group in enumerate(groups):
        g, end_lsn = group, None
        nxt = groups[i + 1][0] if i + 1 < len(groups) else None
        if nxt is not None and nxt.segno == g[-1].segno + 1 and nxt.timeline != g[-1].timeline \
                and nxt.segno in pf.switch_files:
            parent_file, end_lsn = pf.switch_files[nxt.segno]
            g = [*g, parent_file]
        for j in range(0, max(len(g) - 1, 1), max(chunk - 1, 1)):
            piece = g[j:j + chunk]
            last = j + chunk >= len(g)
            sel.runs.append(DecodeRun(piece[0].timeline, tuple(piece), end_lsn if last else None))
            if last:
                break
    return sel


def select_wal(catalog: Iterable[WalCatalogEntry], streaming: Iterable[str], *, wals_directory: str,
               streaming_directory: str | None, timeline: int, switches: Sequence[tuple[int, str]] | None,
               start: datetime, end: datetime, margin_s: float = 300, chunk: int = 256) -> WalSelection:
    """The segments that can hold commits of [start, end] on `timeline`'s history, as pg_waldump runs.

    A segment archived before `start - margin` cannot hold a commit of the window: decoding
    starts at the newest such segment (one segment of slack for a transaction that began
    just before the window) and stops at the first one archived after `end + margin` (the
    margin absorbs clock skew between hosts). Segments still in the streaming directory
    have no archive time: decoding never stops before one.
    """
    pf = path_files(catalog, streaming, wals_directory=wals_directory, streaming_directory=streaming_directory,
                    timeline=timeline, switches=switches)
    if not pf.files:
        return WalSelection(newest_archived_at=pf.newest_archived_at)
    order = pf.segnos
    inf = float("inf")
    times = [pf.files[s].time if pf.files[s].time is not None else inf for s in order]
    lo_t, hi_t = start.timestamp() - margin_s, end.timestamp() + margin_s
    before = [i for i, t in enumerate(times) if t < lo_t]
    lo = before[-1] if before else 0
    after = [i for i, t in enumerate(times) if hi_t <= t < inf and i >= lo]
    hi = after[0] if after else len(order) - 1
    return group_runs(pf, order[lo:hi + 1], chunk)


def select_range(pf: PathFiles, first_segno: int, last_segno: int | None = None, chunk: int = 256) -> WalSelection:
    """The path's segments from `first_segno` to `last_segno` (default: the newest held), as runs; gaps named."""
    last = max(pf.files) if last_segno is None and pf.files else last_segno
    if last is None:
        return WalSelection(newest_archived_at=pf.newest_archived_at)
    chosen = [s for s in pf.segnos if first_segno <= s <= last]
    sel = group_runs(pf, chosen, chunk)
    # gaps at the ends of the range are gaps too (group_runs only sees the holes between held segments)
    held = set(chosen)
    edge = [s for s in range(first_segno, (min(held) if held else last + 1)) if s not in held]
    edge += [s for s in range((max(held) if held else last) + 1, last + 1)]
    sel.gaps = sorted({*sel.gaps, *(WalSegment(timeline_for_segment(s, pf.switches, pf.timeline), s).name
                                    for s in edge)}, key=lambda n: WalSegment.parse(n).segno)
    return sel


def segment_archived_before(pf: PathFiles, when: datetime, margin_s: float) -> int | None:
    """The newest segment archived before `when - margin` (decoding from it cannot miss a later commit)."""
    cutoff = when.timestamp() - margin_s
    older = [s for s in pf.segnos if pf.files[s].time is not None and pf.files[s].time < cutoff]
    return older[-1] if older else None
